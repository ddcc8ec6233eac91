"""Why did my model answer differently? For your own Hugging Face MoE model, run with its own transformers code:
each probe runs alone (the reference) and inside batch compositions, and every token whose output moved is
traced to the first decoder layer and module where its bits differ and to its cause (padding, arithmetic,
amplified, structural: detmoe/diagnose/compare.py, through the ablation's attribution).

    python -m detmoe.experiments.diagnose                                   # a tiny random Mixtral, CPU
    python -m detmoe.experiments.diagnose model=tiny-qwen3_moe 'diagnose.batch_sizes=[1,3,16]'
    python -m detmoe.experiments.diagnose model=/path/to/saved/folder device=cuda dtype=bfloat16 \
        'diagnose.probe_text=["The capital of France is","def fibonacci(n):"]'

`model` is a folder saved by transformers (`AutoModelForCausalLM.from_pretrained(path, dtype=...)`, with
`attn_implementation` / `experts_implementation` where set, else transformers' defaults), or `tiny-<arch>`:
a tiny random model transformers builds (detmoe/diagnose/tiny.py). Probes are seeded random tokens, or
`diagnose.probe_text` through the folder's tokenizer.

The batch compositions are the ablation's (detmoe/lab/compositions.py: batch sizes, the probe's row, co-requests
of other lengths), each padded on the left and on the right (`diagnose.padding_sides`; a batch of 1 has no
padding). `generate` runs every row together, prefill then decode, so the compositions' serving modes (mixed,
chunked) do not apply. Each cell, probe x composition x padding side x call, is one of:
- `generate`: `model.generate(..., do_sample=False)` recorded (detmoe/diagnose/trace.py); the prompt's
  tokens compare by their last layer's output (generate computes only the last one's logits), the new ones
  by their logits; and whether the greedy completion differs.
- `forward`: one `model(input_ids, attention_mask)` of the padded prompts, every token's logits compared.
  It passes no position_ids, as a scoring or training loop often does: left padding then moves positions
  (cause `padding`), which generate computes from the mask.

The whole config is checked first (`validate_config`). Each cell is saved as it finishes (cells/*.json), and a
rerun in the same folder (hydra.run.dir=<dir>) skips them; other settings there are refused
(detmoe/lab/hydra_utils.py, check_run_folder). Outputs: results.json, cells.csv (a row per cell), summary.txt,
report.md and three figures (detmoe/lab/diagnose_report.py).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import hydra
import torch
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from detmoe.diagnose import CAUSES, Comparison, compare, record, recording
from detmoe.diagnose.structure import find_structure
from detmoe.diagnose.tiny import ARCHS, COMMON
from detmoe.lab import config_checks as checks
from detmoe.lab.diagnose_report import group_totals, write_report
from detmoe.diagnose.batches import pad_rows
from detmoe.lab.compositions import Composition, make_compositions, make_probes
from detmoe.lab.hydra_utils import (CONFIG_DIR, SETTINGS_FILE, cell_name, cell_settings, check_run_folder,
                                    config_fingerprint, read_cell, run_dir, write_csv, write_json)
from detmoe.lab.outputs import write_summary

CONFIG_NAME = "diagnose"
TINY = "tiny-"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
CALLS = ("generate", "forward")
SIDES = ("left", "right")
# per cell: the held choices' margins are many (tokens x MoE layers); their figure needs the shape, not each one
MAX_HELD_MARGINS = 2000
CSV_KEYS = ("probe", "call", "batch_size", "probe_row", "padding_side", "composition", "tokens", "divergent", *CAUSES,
            "first_position", "first_layer", "first_module", "first_cause", "greedy_differs",
            "first_greedy_difference", "max_abs_delta_logit", "routes_differ", "primary_flips", "cascade_flips",
            "read_at_padding")


def register_config() -> None:
    """detmoe/configs/diagnose.yaml into Hydra's config store. Why not from the config folder, as the other
    apps: there `model` is a config group (the presets), and Hydra reads `model=<folder>` as picking one of
    its entries. From the store, `model` is a plain key (the folder, or tiny-<arch>)."""
    node = yaml.safe_load((Path(CONFIG_DIR) / f"{CONFIG_NAME}.yaml").read_text())
    ConfigStore.instance().store(name=CONFIG_NAME, node=node)


register_config()


# -- the config ---------------------------------------------------------------------------------------------

def _implementations() -> Optional[tuple[list[str], list[str]]]:
    """transformers' attention and experts implementation names, or None where this transformers does not
    list them where we look (it then checks the names itself, when the model loads)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return None
    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()], ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]


def _has_tokenizer(folder: str) -> bool:
    return any((Path(folder) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def model_limits(model: str) -> dict:
    """The model's config as far as the checks need it (max_position_embeddings), without its weights."""
    if model.startswith(TINY):
        return dict(COMMON)
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model).to_dict()
    except (OSError, ValueError) as e:
        raise ValueError(f"model={model!r}: transformers cannot read its config.json: {e}") from e


def validate_config(cfg: DictConfig) -> None:
    """Every key of the diagnosis config, before any work: a ValueError naming the first bad one."""
    c = checks.plain(cfg)
    checks.check_keys(c, checks.yaml_keys(f"{CONFIG_NAME}.yaml") + ["hydra"], "the config")
    model = c["model"]
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a folder saved by transformers or {TINY}<arch>, got {model!r}")
    if model.startswith(TINY):
        from detmoe.diagnose.tiny import available_archs
        if model[len(TINY):] not in available_archs():
            raise ValueError(f"model={model!r}: a tiny model must be one of "
                             f"{[TINY + a for a in available_archs()]} (this transformers' of {sorted(ARCHS)})")
    elif not (Path(model) / "config.json").is_file():
        raise ValueError(f"model={model!r} is neither {TINY}<arch> nor a folder saved by transformers "
                         "(save_pretrained: a folder holding config.json)")
    checks.check_choice("dtype", c["dtype"], tuple(DTYPES))
    checks.check_device(c["device"])
    names = _implementations()
    for key, known in zip(("attn_implementation", "experts_implementation"), names or (None, None)):
        value = c[key]
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key} must be null (transformers' default) or a name, got {value!r}")
        # a hub kernel ("kernels-community/...") is transformers' to check
        if isinstance(value, str) and known is not None and "/" not in value and value not in known:
            raise ValueError(f"{key} must be null (transformers' default) or one of {known}, got {value!r}")
    checks.check_seed(c["seed"])
    d = checks.check_keys(c["diagnose"], checks.yaml_keys(f"{CONFIG_NAME}.yaml", "diagnose"), "diagnose")
    checks.check_name("diagnose.name", d["name"])
    for key in ("n_probes", "probe_min_len", "probe_max_len", "max_new_tokens", "per_size", "co_max_len"):
        checks.check_int(f"diagnose.{key}", d[key], 1)
    checks.check_order("diagnose.probe_min_len", d["probe_min_len"], "diagnose.probe_max_len", d["probe_max_len"])
    checks.check_list("diagnose.batch_sizes", d["batch_sizes"], lo=1)
    checks.check_list("diagnose.padding_sides", d["padding_sides"], SIDES)
    checks.check_list("diagnose.calls", d["calls"], CALLS)
    checks.check_bool("diagnose.keep_tensors", d["keep_tensors"])
    text = d["probe_text"]
    if text is not None:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"diagnose.probe_text must be null, a string or a non-empty list of non-empty strings, "
                             f"got {text!r}")
        if model.startswith(TINY) or not _has_tokenizer(model):
            raise ValueError(f"diagnose.probe_text needs the model folder's tokenizer, and model={model!r} has none "
                             "(tokenizer.json or tokenizer_config.json): leave probe_text null for random tokens")
    limit = model_limits(model).get("max_position_embeddings")
    longest = max(d["probe_max_len"], d["co_max_len"] if any(b > 1 for b in d["batch_sizes"]) else 0)
    if isinstance(limit, int) and longest + d["max_new_tokens"] > limit:
        raise ValueError(f"diagnose.probe_max_len or co_max_len with max_new_tokens: {longest + d['max_new_tokens']} "
                         f"positions, more than the model's max_position_embeddings={limit}: shorten them")


# -- the model ----------------------------------------------------------------------------------------------

def load_model(cfg: DictConfig) -> tuple[torch.nn.Module, Any]:
    """(the model in eval mode on cfg.device, the folder's tokenizer or None), by transformers' own code."""
    impl = {k: cfg[k] for k in ("attn_implementation", "experts_implementation") if cfg[k] is not None}
    dtype = DTYPES[cfg.dtype]
    if cfg.model.startswith(TINY):
        from detmoe.diagnose.tiny import tiny_model
        model = tiny_model(cfg.model[len(TINY):], cfg.seed, torch.float32 if dtype == "auto" else dtype, **impl)
        return model.to(cfg.device), None
    import transformers
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, **impl)
    except ValueError as e:   # e.g. an implementation this model or machine cannot run: named by transformers
        raise ValueError(f"model={cfg.model!r} with {impl or 'transformers defaults'}: {e}") from e
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model) if _has_tokenizer(cfg.model) else None
    return model.to(cfg.device).eval(), tokenizer


def model_info(model: torch.nn.Module, cfg: DictConfig, pad_id: int) -> dict:
    """What the report says was run: the class, its structure and which of transformers' paths it took."""
    import transformers
    config = model.config
    return dict(model=cfg.model, model_class=type(model).__name__, structure=find_structure(model).describe(),
                attn_implementation=getattr(config, "_attn_implementation", None),
                experts_implementation=getattr(config, "_experts_implementation", None),
                dtype=str(next(model.parameters()).dtype).removeprefix("torch."), device=str(cfg.device),
                vocab_size=config.vocab_size, pad_token_id=pad_id, transformers=transformers.__version__,
                torch=torch.__version__)


def pad_token_id(model: torch.nn.Module) -> int:
    """The id padding is filled with (its value never matters to the masked rows' math, only to what the MoE
    layers route: padding tokens are routed too): the generation config's, the model's, else EOS, else 0."""
    for source in (getattr(model, "generation_config", None), model.config):
        for key in ("pad_token_id", "eos_token_id"):
            value = getattr(source, key, None)
            value = value[0] if isinstance(value, (list, tuple)) and value else value
            if isinstance(value, int):
                return value
    return 0


def eos_ids(model: torch.nn.Module) -> set[int]:
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(value) if isinstance(value, (list, tuple)) else {value} if isinstance(value, int) else set()


# -- probes, batches and cells ------------------------------------------------------------------------------

def probes_of(cfg: DictConfig, vocab: int, tokenizer: Any) -> list[list[int]]:
    """The probes' token ids: seeded random ones (the ablation's make_probes), or probe_text tokenized."""
    d = cfg.diagnose
    if d.probe_text is None:
        return make_probes(d.n_probes, vocab, d.probe_min_len, d.probe_max_len, cfg.seed)
    texts = [d.probe_text] if isinstance(d.probe_text, str) else list(d.probe_text)
    probes = [tokenizer(t)["input_ids"] for t in texts]
    limit = model_limits(cfg.model).get("max_position_embeddings")
    for t, p in zip(texts, probes):
        if isinstance(limit, int) and len(p) + d.max_new_tokens > limit:
            raise ValueError(f"diagnose.probe_text {t[:40]!r}: {len(p)} tokens and max_new_tokens="
                             f"{d.max_new_tokens}, more than the model's max_position_embeddings={limit}")
    return probes


def cell_points(n_probes: int, comps: list[Composition], sides: list[str], calls: list[str]) -> list[dict]:
    """Every cell: probe x composition x padding side (none for a batch of 1) x call."""
    return [dict(probe=i, composition=j, batch_size=comp.batch_size, padding_side=side, call=call)
            for i in range(n_probes) for j, comp in enumerate(comps)
            for side in (sides if comp.batch_size > 1 else ["none"]) for call in calls]


def padded_batch(probe: list[int], comp: Composition, side: str, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The composition's rows (the probe in its row, the co-requests around it), padded to the longest on `side`:
    ids and attention mask [B, longest]."""
    rows = list(comp.co_prompts)
    rows.insert(comp.probe_index, probe)
    return pad_rows(rows, side, pad)


@contextlib.contextmanager
def _quiet_right_padding(side: str) -> Iterator[None]:
    """transformers warns at every right-padded generate; this app pads on the right on purpose (the report
    explains what it does), so the warning is held back there, and only there."""
    from transformers.utils import logging
    level = logging.get_verbosity()
    if side == "right":
        logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def completion(new_tokens: torch.Tensor, eos: set[int]) -> list[int]:
    """The greedy completion: the new tokens up to and including the first EOS (a batch pads a finished row)."""
    out = []
    for t in new_tokens.tolist():
        out.append(t)
        if t in eos:
            break
    return out


def generate_traced(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pad: int,
                    keep: bool, side: str = "none"):
    """(trace, output ids) of one greedy generate."""
    with recording(model, keep_tensors=keep) as rec, _quiet_right_padding(side):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
    return rec.trace(), out.cpu()


def measure(c: Comparison, **extra) -> dict:
    """One cell's record from its `Comparison`."""
    first = c.divergent[0] if c.divergent else None
    at = lambda attr: getattr(first, attr) if first is not None else None
    held = c.unflipped_margins[torch.isfinite(c.unflipped_margins)].tolist()[:MAX_HELD_MARGINS]
    return dict(
        tokens=c.n_compared, divergent=len(c.divergent), causes=c.cause_counts(),
        first_position=at("position"), first_token=at("token"), first_layer=at("first_layer"),
        first_module=at("first_module"), first_cause=at("cause"),
        first_decided_at=list(at("decided_at")) if at("decided_at") else None, first_margin=at("margin"),
        routes_differ=int(c.routes_differ.sum()), primary_flips=len(c.flipped_margins), cascade_flips=c.cascade_flips,
        flipped_margins=c.flipped_margins.tolist(), unflipped_margins=held, max_abs_delta_logit=c.max_abs_delta,
        divergences=[dict(position=d.position, token=d.token, cause=d.cause, first_layer=d.first_layer,
                          first_module=d.first_module) for d in c.divergent],
        summary=c.summary(), **extra)


def run_cell(model: torch.nn.Module, point: dict, probe: list[int], comp: Composition, refs: dict, cfg: DictConfig,
             pad: int, eos: set[int]) -> dict:
    """One cell: the probe in its composition, padded on its side, through its call; compared with the alone run."""
    d, device = cfg.diagnose, cfg.device
    side = point["padding_side"] if point["padding_side"] != "none" else "left"
    ids, mask = padded_batch(probe, comp, side, pad)
    ids, mask = ids.to(device), mask.to(device)
    row = comp.probe_index
    info = dict(probe_row=row, probe_len=len(probe), co_lengths=[len(p) for p in comp.co_prompts],
                batch_width=ids.shape[1])
    if point["call"] == "forward":
        c = compare(refs["forward"], record(model, ids, mask, keep_tensors=d.keep_tensors), 0, row)
        return measure(c, **info, greedy_differs=c.first_greedy_difference is not None,
                       first_greedy_difference=c.first_greedy_difference, read_at_padding=False)
    trace, out = generate_traced(model, ids, mask, d.max_new_tokens, pad, d.keep_tensors, side)
    ref_trace, ref_completion = refs["generate"]
    mine = completion(out[row, ids.shape[1]:], eos)
    differs = next((k for k, (a, b) in enumerate(zip(ref_completion, mine)) if a != b),
                   None if len(ref_completion) == len(mine) else min(len(ref_completion), len(mine)))
    # generate reads each row's next token at the batch's last column: a right-padded row's is a pad
    at_padding = side == "right" and len(probe) < ids.shape[1]
    return measure(compare(ref_trace, trace, 0, row), **info, greedy_differs=differs is not None,
                   first_greedy_difference=differs, reference_completion=ref_completion, completion=mine,
                   read_at_padding=at_padding)


def references(model: torch.nn.Module, probe: list[int], cfg: DictConfig, pad: int, eos: set[int],
               calls: set[str]) -> dict:
    """The probe alone, through each call the pending cells need."""
    ids = torch.tensor([probe], dtype=torch.long, device=cfg.device)
    mask = torch.ones_like(ids)
    refs: dict = {}
    if "forward" in calls:
        refs["forward"] = record(model, ids, mask, keep_tensors=cfg.diagnose.keep_tensors)
    if "generate" in calls:
        trace, out = generate_traced(model, ids, mask, cfg.diagnose.max_new_tokens, pad, cfg.diagnose.keep_tensors)
        refs["generate"] = (trace, completion(out[0, len(probe):], eos))
    return refs


# -- the run ------------------------------------------------------------------------------------------------

def run_diagnosis(cfg: DictConfig, out: Path) -> dict:
    """Every cell (saved as it finishes; saved ones reused), then results.json, cells.csv and the report."""
    validate_config(cfg)
    check_run_folder(cfg, out)
    d = cfg.diagnose
    model, tokenizer = load_model(cfg)
    pad, eos = pad_token_id(model), eos_ids(model)
    vocab = model.config.vocab_size
    probes = probes_of(cfg, vocab, tokenizer)
    comps = make_compositions(list(d.batch_sizes), d.per_size, vocab, d.co_max_len, d.max_new_tokens, cfg.seed)
    points = cell_points(len(probes), comps, list(d.padding_sides), list(d.calls))
    fingerprint = config_fingerprint(cfg)
    write_json(out / SETTINGS_FILE, cell_settings(cfg))   # what check_run_folder compares a rerun with
    path = lambda p: out / "cells" / f"{cell_name(p)}.json"   # e.g. 0-1-3-left-generate
    todo = [p for p in points if read_cell(path(p)) is None]
    if len(todo) < len(points):
        print(f"{out}: {len(points) - len(todo)} of {len(points)} cells reused from an earlier run with these "
              f"settings, {len(todo)} to run", flush=True)
    with tqdm(total=len(todo), desc="diagnose cells", unit="cell") as bar:
        for i, probe in enumerate(probes):
            mine = [p for p in todo if p["probe"] == i]
            if not mine:
                continue
            refs = references(model, probe, cfg, pad, eos, {p["call"] for p in mine})
            for p in mine:
                cell = run_cell(model, p, probe, comps[p["composition"]], refs, cfg, pad, eos)
                write_json(path(p), {**p, **cell, "config": fingerprint})
                bar.update()
    cells = [json.loads(path(p).read_text()) for p in points]
    if tokenizer is not None:   # the answers as text, beside their ids
        for c in (c for c in cells if "completion" in c):
            c.update(reference_text=tokenizer.decode(c["reference_completion"]),
                     completion_text=tokenizer.decode(c["completion"]))
    results = dict(config=OmegaConf.to_container(cfg, resolve=True), model=model_info(model, cfg, pad),
                   probes=probes, compositions=[dict(batch_size=c.batch_size, probe_row=c.probe_index,
                                                     co_lengths=[len(p) for p in c.co_prompts]) for c in comps],
                   cells=cells)
    write_json(out / "results.json", results)
    write_csv(out / "cells.csv", [csv_row(c) for c in cells])
    write_report(out)
    return results


def csv_row(cell: dict) -> dict:
    """cells.csv's row of a cell: its CSV_KEYS, the cause counts as columns of their own."""
    flat = {**cell, **cell["causes"]}
    return {k: flat.get(k) for k in CSV_KEYS}


def summary(results: dict, out: Path) -> str:
    """The table a person reads first (summary.txt, printed): per call, batch size and padding side."""
    m = results["model"]
    lines = [f"{m['model_class']} ({m['model']}): attention {m['attn_implementation']}, experts "
             f"{m['experts_implementation']}, {m['dtype']} on {m['device']}", "",
             f"{'call':9} {'batch':>5} {'side':8} {'cells':>5} {'diverge':>7} {'tokens':>7} {'divergent':>9} "
             f"{'greedy':>6}  " + " ".join(f"{k:>10}" for k in CAUSES)]
    for g in group_totals(results["cells"]):
        lines.append(f"{g['call']:9} {g['batch_size']:5d} {g['padding_side']:8} {g['cells']:5d} "
                     f"{g['diverging_cells']:7d} {g['tokens']:7d} {g['divergent']:9d} {g['greedy_differs']:6d}  "
                     + " ".join(f"{g[k]:10d}" for k in CAUSES))
    lines += ["", "side: padding side; cells: probe x composition runs; diverge: cells where a probe token's output",
              "differs bitwise from the probe run alone; greedy: cells whose greedy completion (generate) or a greedy",
              "next token (forward) differs; then divergent probe tokens by cause."]
    first = next((c for c in results["cells"] if c["divergent"]), None)
    if first is not None:
        lines += ["", f"e.g. probe {first['probe']}, {first['call']}, batch of {first['batch_size']} "
                      f"({first['padding_side']} padding):"] + ["  " + s for s in first["summary"].splitlines()]
    lines += ["", f"results: {out.resolve()}", f"report: {(out / 'report.md').resolve()}"]
    return write_summary(out, lines)


@hydra.main(config_path=None, config_name=CONFIG_NAME, version_base=None)
def main(cfg: DictConfig) -> None:
    validate_config(cfg)   # before run_dir records the run
    out = run_dir(cfg)
    print(summary(run_diagnosis(cfg, out), out))


if __name__ == "__main__":
    # the importable module's main (see detmoe/experiments/ablate.py): sweep launchers pickle it by reference
    from detmoe.experiments.diagnose import main as importable_main
    importable_main()
