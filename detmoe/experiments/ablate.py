"""The variance ablation: which source makes a request's output depend on its batch, and how often.

For every cell of router x backend x combine x dtype, each probe prompt runs alone (the reference) and
inside many batch compositions (detmoe/lab/compositions.py). Per cell it records how many probe
tokens' logits differ bitwise, by how much, how many greedy completions change and where, and the
cause of every divergent token (detmoe/lab/attribution.py). `extra_cells` adds cells beyond the factorial
design, each with its own number of probes. The claims the design predicts are judged on the run's own
cells; those about stock kernels only where the run's device shows them varying with the batch
(detmoe/lab/stock_variance.py). Results go to the Hydra run directory: results.json, cells.csv,
by_batch_size.csv, the figures (detmoe/lab/plot.py) and report.md, which shows them all (detmoe/lab/report.py).

    python -m detmoe.experiments.ablate                                  # the default factorial, CPU
    python -m detmoe.experiments.ablate -m router=topk,capacity kernels=torch,batch_invariant

The whole config is checked before any work (`validate_config`). A run that is interrupted keeps every
finished cell (cells/*.json) and skips them when re-run in the same directory (hydra.run.dir=<dir>); a
rerun there with other settings is refused (detmoe/lab/hydra_utils.py, check_run_folder).

The layout axis (several processes): the probe alone runs on one device, every batch composition runs
on the model spread over the ranks (attention tp, experts ep, tp or e.g. ep2xtp2: detmoe/lab/distributed.py)
and again on one device, so a token that only the layout moved is counted as `collective`:

    torchrun --nproc_per_node 2 -m detmoe.experiments.ablate 'layouts=[none,tp]' hydra.run.dir=DIR
"""
from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from detmoe import kernels
from detmoe.lab.attribution import CAUSES, attribute_divergence
from detmoe.lab.compositions import make_compositions, make_probes, slot_positions
from detmoe.lab import config_checks as checks
from detmoe.lab.distributed import is_main, layout_named
from detmoe.moe.engine import Engine, Request
from detmoe.lab.hydra_utils import (CONFIG_DIR, TRAINED_PRESET, model_config, run_cells, run_dir, vocab_size,
                             write_csv, write_json)
from detmoe.lab.outputs import write_summary
from detmoe.lab.stock_variance import stock_kernel_versions
from detmoe.lab.stdlib_text import load_corpus
from detmoe.moe import COMBINES, MoETransformer, pretrained_config
from detmoe.moe.config import DTYPES
from detmoe.moe.parallel import shard_model
from detmoe.moe.routers import registry


def run_cell(model: MoETransformer, probes, compositions, max_new_tokens: int,
             sharded: MoETransformer | None = None, graphs: bool = False) -> dict:
    """All probes x compositions for one model on the backend in force; returns the cell's record.
    With `sharded` (the same model on a parallel layout) the compositions run on it, the references
    stay on one device, and each composition also runs on one device to tell the `collective` cause."""
    # room for the longest request: a probe or a co-request, and its new tokens
    longest = max([len(p) for p in probes] + [len(p) for c in compositions for p in c.co_prompts])
    most_new = max([max_new_tokens] + [n for c in compositions for n in c.co_new_tokens])
    max_len = longest + most_new + 1
    # one cache size for every run of the cell, as a server has: the stock attention's compiled kernels
    # depend on the cache's shape, so an engine sized per batch would compile one per batch size
    n_slots = max([1] + [len(c.co_prompts) + 1 for c in compositions])
    refs = []
    for p in probes:
        ref = Request(p, max_new_tokens, track=True)
        Engine(model, n_slots, max_len, graphs=graphs).run([ref])
        refs.append(ref)
    tokens = differ = route_differ = completions = completions_differ = 0
    causes = dict.fromkeys(CAUSES, 0)
    max_delta, mean_deltas, first_div, flipped, unflipped, cascade_flips = 0.0, [], [], [], [], 0
    by_size: dict[int, list[int]] = {}
    for (pi, ref), comp in itertools.product(enumerate(refs), compositions):
        probe_req, batch = comp.requests(probes[pi], max_new_tokens)
        Engine(sharded or model, n_slots, max_len, graphs=graphs).run(batch, until_tracked_done=True)
        same_batch = None
        if sharded is not None:
            same_batch, batch = comp.requests(probes[pi], max_new_tokens)
            Engine(model, n_slots, max_len, graphs=graphs).run(batch, until_tracked_done=True)
        d = attribute_divergence(ref, probe_req, same_batch)
        tokens += d.n_compared
        differ += int(d.logits_differ.sum())
        route_differ += int(d.routes_differ.sum())
        for c, n in d.cause_counts().items():
            causes[c] += n
        max_delta = max(max_delta, d.max_abs_delta)
        mean_deltas.append(d.mean_abs_delta)
        completions += 1
        completions_differ += d.completion_differs
        if d.first_divergence is not None:
            first_div.append(d.first_divergence)
        flipped += d.flipped_margins.tolist()
        cascade_flips += d.cascade_flips
        unflipped += d.unflipped_margins[torch.isfinite(d.unflipped_margins)].tolist()
        s = by_size.setdefault(comp.batch_size, [0, 0, 0, 0])
        s[0] += d.n_compared
        s[1] += int(d.logits_differ.sum())
        s[2] += 1
        s[3] += d.completion_differs
    return dict(
        tokens=tokens, frac_logits_differ=differ / max(tokens, 1), frac_routes_differ=route_differ / max(tokens, 1),
        max_abs_delta_logit=max_delta, mean_abs_delta_logit=statistics.fmean(mean_deltas),
        completions=completions, frac_completions_differ=completions_differ / completions,
        first_divergence=first_div, causes=causes,
        by_batch_size={B: dict(tokens=v[0], frac_logits_differ=v[1] / max(v[0], 1),
                               frac_completions_differ=v[3] / v[2]) for B, v in sorted(by_size.items())},
        flipped_margins=flipped, cascade_flips=cascade_flips, unflipped_margins=unflipped[:5000])


STOCK_INVARIANT = "not applicable on this device: stock kernels were invariant at these shapes"
NOT_MEASURED = "not judged: whether the stock kernels vary on this device was not measured"
NO_CELL = "not applicable: this run has no cell to judge it by"


def _verdict(statement: str, holds: bool | None, evidence: str, why_not: str = NO_CELL) -> dict:
    """A claim as results.json keeps it: the sentence, holds (True/False/None) and the verdict in words."""
    words = {True: "holds", False: "does not hold", None: why_not}[holds]
    return dict(statement=statement, holds=holds, verdict=words, evidence=evidence)


def judge_claims(cells: list[dict], stock_versions: dict[str, dict[str, int]] | None = None) -> dict[str, dict]:
    """What the design says the data must show, judged on the run's own cells. A claim about the stock
    kernels depends on the device: where `stock_versions` (detmoe/lab/stock_variance.py, per dtype) shows no
    stock op varying at the run's shapes, a claim not borne out is not applicable rather than false."""
    def rows(pred):
        return [c for c in cells if pred(c)]

    def varying_ops(group: list[dict]) -> dict[str, list[str]]:
        """Per dtype of the group's cells, the stock ops that gave a row other bits inside a batch."""
        dtypes = dict.fromkeys(c["dtype"] for c in group)
        return {dt: [op for op, v in (stock_versions or {}).get(dt, {}).items() if v > 1] for dt in dtypes}

    def device_dependent(group: list[dict], observed: bool) -> tuple[bool | None, str, str]:
        """(holds, why not judged, evidence of the device). Observed: holds. Not observed: false only
        where the stock kernels varied here; not applicable where they were measured invariant."""
        if not group:
            return None, NO_CELL, ""
        ops = varying_ops(group)
        device = "; stock ops varying here: " + (", ".join(f"{dt} ({', '.join(o) or 'none'})" for dt, o in ops.items())
                                                 if stock_versions is not None else "not measured")
        if observed:
            return True, "", device
        if any(ops.values()):
            return False, "", device
        measured = stock_versions is not None and all(dt in stock_versions for dt in ops)
        return None, STOCK_INVARIANT if measured else NOT_MEASURED, device

    total = lambda group, cause: sum(c["causes"][cause] for c in group)
    n_cells = lambda group: f"{len(group)} cell{'' if len(group) == 1 else 's'}"
    # routers batch-invariant by design (their class says so) must show zero divergence on these kernels
    by_design = lambda c: registry.router_class(c["router"]).batch_invariant
    inv = rows(lambda c: c["backend"] == "batch_invariant" and by_design(c) and c["combine"] == "ordered")
    struct = rows(lambda c: c["backend"] == "batch_invariant" and c["router"] == "capacity")
    arith = rows(lambda c: c["backend"] == "torch" and c["router"] == "topk")
    stock = rows(lambda c: c["backend"] == "torch")
    # the ordered combine: scatter_add's atomics may drift on a GPU even with the invariant kernels
    invariant_ordered = rows(lambda c: c["backend"] == "batch_invariant" and c["combine"] == "ordered")
    sharded_stock = rows(lambda c: c["backend"] == "torch" and c.get("layout", "none") != "none")
    out = {}
    out["invariant_kernels_and_router_give_zero_divergence"] = _verdict(
        "batch-invariant kernels with a batch-invariant router (ordered combine) give zero divergence",
        all(c["frac_logits_differ"] == 0 and c["frac_completions_differ"] == 0 for c in inv) if inv else None,
        f"{n_cells(inv)}, {sum(sum(c['causes'].values()) for c in inv)} divergent tokens")
    out["capacity_router_diverges_structurally_with_invariant_kernels"] = _verdict(
        "the capacity router diverges even with batch-invariant kernels (cause: structural)",
        total(struct, "structural") > 0 if struct else None,
        f"{n_cells(struct)}, {total(struct, 'structural')} structural tokens")
    holds, why, device = device_dependent(arith, total(arith, "arithmetic") > 0)
    out["torch_backend_diverges_arithmetically_with_topk"] = _verdict(
        "stock kernels make even the per-token topk router diverge (cause: arithmetic), where they vary "
        "with the batch on this device", holds, f"{n_cells(arith)}, {total(arith, 'arithmetic')} arithmetic tokens{device}",
        why)
    holds, why, device = device_dependent(stock, total(stock, "amplified") > 0)
    if total(invariant_ordered, "amplified"):
        holds, why = False, ""      # with no drift in the numbers, no near tie can flip
    out["amplified_routing_observed_with_stock_kernels"] = _verdict(
        "observed: numeric drift of the stock kernels flipped a near-tie routing choice (cause: amplified), "
        "and the batch-invariant kernels (ordered combine) never did; judged where stock kernels vary on this device",
        holds, f"{total(stock, 'amplified')} amplified tokens in {n_cells(stock)} on stock kernels, "
               f"{total(invariant_ordered, 'amplified')} in {n_cells(invariant_ordered)} on batch-invariant ones{device}", why)
    out["stock_collectives_diverge_on_a_parallel_layout"] = _verdict(
        "on a parallel layout the stock collectives move tokens that one device does not (cause: collective)",
        total(sharded_stock, "collective") > 0 if sharded_stock else None,
        f"{n_cells(sharded_stock)}, {total(sharded_stock, 'collective')} collective tokens")
    return out


def check_claims(cells: list[dict], stock_versions: dict[str, dict[str, int]] | None = None) -> dict:
    """Each claim of `judge_claims` as True, False or None (not applicable or no cell to judge by)."""
    return {name: v["holds"] for name, v in judge_claims(cells, stock_versions).items()}


def extra_cell_points(cfg: DictConfig) -> list[dict]:
    """`extra_cells`: grid points beyond the factorial design, each {router, backend, combine, dtype}
    and optionally its own n_probes (the first n of the run's probes)."""
    points = []
    allowed = dict(router=registry.router_names(), backend=list(kernels.BACKENDS), combine=list(COMBINES),
                   dtype=list(DTYPES))
    for i, entry in enumerate(cfg.get("extra_cells") or []):
        entry = dict(entry)
        unknown = set(entry) - {*allowed, "n_probes"}
        if unknown or set(allowed) - set(entry):
            raise ValueError(f"extra_cells[{i}] must have the keys {sorted(allowed)} (and optionally n_probes), "
                             f"got {sorted(entry)}")
        for key, values in allowed.items():
            if entry[key] not in values:
                raise ValueError(f"extra_cells[{i}].{key} must be one of {values}, got {entry[key]!r}")
        n = entry.get("n_probes")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"extra_cells[{i}].n_probes must be an int >= 1, got {n!r}")
        points.append({k: entry[k] for k in (*allowed, *(("n_probes",) if n is not None else ()))})
    return points


def stock_kernel_versions_of_run(cfg: DictConfig, dtypes: list[str]) -> dict[str, dict[str, int]]:
    """Per dtype of the run, how many versions each stock op gives a row across the run's batch sizes
    at its model's shapes on its device (detmoe/lab/stock_variance.py): what the device-dependent claims need."""
    mcfg = (pretrained_config(cfg.pretrained) if cfg.get("pretrained")
            else model_config(cfg.model, cfg.router, cfg.router.names[0]))
    exp = cfg.experiment
    return {dt: stock_kernel_versions(mcfg, dt, cfg.device, exp.batch_sizes, context=exp.probe_max_len, seed=cfg.seed)
            for dt in dtypes}


def validate_config(cfg: DictConfig) -> None:
    """Every key of the ablation's config, before any work: a ValueError naming the first bad one."""
    c, models = checks.check_common(cfg, "ablate", lists=True)
    exp = checks.check_keys(c["experiment"], checks.yaml_keys("experiment/ablate.yaml"), "experiment")
    checks.check_name("experiment.name", exp["name"])
    for key in ("n_probes", "probe_min_len", "max_new_tokens", "per_size", "co_max_len"):
        checks.check_int(f"experiment.{key}", exp[key], 1)
    checks.check_int("experiment.probe_max_len", exp["probe_max_len"], 1)
    checks.check_order("experiment.probe_min_len", exp["probe_min_len"], "experiment.probe_max_len", exp["probe_max_len"])
    checks.check_list("experiment.batch_sizes", exp["batch_sizes"], lo=1)
    extra_cell_points(cfg)
    checks.check_list("layouts", c["layouts"])
    checks.check_layouts({f"layouts[{i}]": name for i, name in enumerate(c["layouts"])})
    checks.check_bool("graphs", c["graphs"])
    checks.check_int("jobs", c["jobs"], 1)
    positions = slot_positions(exp["batch_sizes"], exp["probe_max_len"], exp["co_max_len"], exp["max_new_tokens"])
    checks.check_fits(positions, "experiment.probe_max_len or co_max_len with max_new_tokens (co-requests generate "
                      "up to 2 x max_new_tokens + 1)", min(m.max_seq_len for m in models))


def run_ablation(cfg: DictConfig, out: Path) -> dict:
    validate_config(cfg)
    exp = cfg.experiment
    vocab = vocab_size(cfg)
    grid = [dict(router=r, backend=b, combine=c, dtype=d) for r, b, c, d in
            itertools.product(cfg.router.names, cfg.kernels.backends, cfg.combines, cfg.dtypes)]
    grid += [p for p in extra_cell_points(cfg) if p not in grid]
    # the byte-level trained model reads real text (held-out stdlib source); other models random ids
    text = bytes(load_corpus(max_bytes=400_000).val) if cfg.model.get("preset") == TRAINED_PRESET and not cfg.get("pretrained") else None
    # every cell's probes are the first n of one list, so cells with more probes extend the others'
    probes = make_probes(max([exp.n_probes] + [p.get("n_probes", 0) for p in grid]), vocab, exp.probe_min_len,
                         exp.probe_max_len, cfg.seed, text)
    comps = make_compositions(list(exp.batch_sizes), exp.per_size, vocab, exp.co_max_len, exp.max_new_tokens,
                              cfg.seed, text)
    layouts = list(cfg.get("layouts", ["none"]))
    if layouts != ["none"]:  # the layout axis (a torchrun launch): reference on one device, tests sharded
        grid = [dict(**p, layout=name) for p in grid for name in layouts]
        for name in layouts:
            layout_named(name)   # joins the process group before any model is built

    def measure(model: MoETransformer, point: dict) -> dict:
        layout = layout_named(point.get("layout"))
        sharded = None if layout is None else shard_model(model, layout)
        n = point.get("n_probes", exp.n_probes)
        return dict(probes=n, **run_cell(model, probes[:n], comps, exp.max_new_tokens, sharded,
                                         bool(cfg.get("graphs", False))))

    stock = stock_kernel_versions_of_run(cfg, list(dict.fromkeys(p["dtype"] for p in grid)))
    # cells with many probes are handed out first (within run_cells' order, which puts the slow
    # interpreted kernels first), so that the short cells fill in beside them; reported in grid order
    by_size = sorted(grid, key=lambda p: -p.get("n_probes", exp.n_probes))
    cells = run_cells(cfg, out, by_size, measure, desc="ablation cells")
    cells = [cells[by_size.index(p)] for p in grid]
    results = dict(config=OmegaConf.to_container(cfg, resolve=True), claims=check_claims(cells, stock),
                   claim_verdicts=judge_claims(cells, stock), stock_kernel_versions=stock, cells=cells)
    write_json(out / "results.json", results)
    keys = ("router", "backend", "combine", "dtype", *(("layout",) if "layout" in grid[0] else ()), "probes", "tokens",
            "frac_logits_differ", "frac_routes_differ", "max_abs_delta_logit", "mean_abs_delta_logit",
            "frac_completions_differ")
    write_csv(out / "cells.csv", [{**{k: c.get(k, exp.n_probes) if k == "probes" else c[k] for k in keys}, **c["causes"]}
                                  for c in cells])
    write_csv(out / "by_batch_size.csv", [
        dict(router=c["router"], backend=c["backend"], combine=c["combine"], dtype=c["dtype"],
             layout=c.get("layout", "none"), probes=c.get("probes", exp.n_probes), batch_size=B, **v)
        for c in cells for B, v in c["by_batch_size"].items()])
    if is_main():  # the figures and the report read the results back from disk
        from detmoe.lab.plot import plot_run
        from detmoe.lab.report import write_report
        plot_run(out)
        write_report(out)
    return results


def summary(results: dict, out: Path) -> str:
    lines = [f"{'router':18} {'backend':16} {'combine':12} {'dtype':9} {'layout':7} {'probes':>6} {'logits':>7} {'compl.':>7}  "
             + " ".join(f"{c:>10}" for c in CAUSES)]
    for c in results["cells"]:
        lines.append(f"{c['router']:18} {c['backend']:16} {c['combine']:12} {c['dtype']:9} {c.get('layout', 'none'):7} "
                     f"{c.get('probes', results['config']['experiment']['n_probes']):6d} {c['frac_logits_differ']:7.3f} {c['frac_completions_differ']:7.3f}  "
                     + " ".join(f"{c['causes'][k]:10d}" for k in CAUSES))
    lines += ["", "fraction of probe tokens whose logits differ bitwise from the probe run alone;",
              "fraction of greedy completions that differ; divergent tokens by cause.", "",
              "claims:"] + [f"  [{v['verdict']}] {v['statement']}" for v in results["claim_verdicts"].values()] + [
              "", f"results and plots: {out.resolve()}", f"report: {(out / 'report.md').resolve()}"]
    return write_summary(out, lines)


@hydra.main(config_path=CONFIG_DIR, config_name="ablate", version_base=None)
def main(cfg: DictConfig) -> None:
    validate_config(cfg)   # before run_dir records the run
    out = run_dir(cfg)
    text = summary(run_ablation(cfg, out), out)
    if is_main():
        print(text)


if __name__ == "__main__":
    # run the importable module's main, not __main__'s: sweep launchers (joblib) pickle the task
    # function by reference, which works only for a function of an importable module
    from detmoe.experiments.ablate import main as importable_main
    importable_main()
