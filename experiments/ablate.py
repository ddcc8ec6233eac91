"""The variance ablation: which source makes a request's output depend on its batch, and how often.

For every cell of router x backend x combine x dtype, each probe prompt runs alone (the reference) and
inside many batch compositions (lab/compositions.py). Per cell it records how many probe
tokens' logits differ bitwise, by how much, how many greedy completions change and where, and the
cause of every divergent token (lab/attribution.py). Results go to the Hydra run directory:
results.json, cells.csv, by_batch_size.csv and PNG plots (lab/plot.py).

    python -m experiments.ablate                                  # the default factorial, CPU
    python -m experiments.ablate -m router=topk,capacity kernels=torch,batch_invariant

A run that is interrupted keeps every finished cell (cells/*.json) and skips them when re-run in the
same directory (hydra.run.dir=<dir>).

The layout axis (several processes): the probe alone runs on one device, every batch composition runs
on the model spread over the ranks (attention tp, experts ep or tp) and again on one device, so a token
that only the layout moved is counted as `collective`:

    torchrun --nproc_per_node 2 -m experiments.ablate 'layouts=[none,tp]' hydra.run.dir=DIR
"""
from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lab.attribution import CAUSES, attribute_divergence
from lab.compositions import make_compositions, make_probes
from lab.distributed import is_main, layout_named
from moe.engine import Engine, Request
from lab.hydra_utils import (CONFIG_DIR, TRAINED_PRESET, run_cells, run_dir, vocab_size, write_csv,
                                     write_json)
from lab.stdlib_text import load_corpus
from moe import MoETransformer
from moe.parallel import shard_model
from moe.routers import registry


def run_cell(model: MoETransformer, probes, compositions, max_new_tokens: int,
             sharded: MoETransformer | None = None) -> dict:
    """All probes x compositions for one model on the backend in force; returns the cell's record.
    With `sharded` (the same model on a parallel layout) the compositions run on it, the references
    stay on one device, and each composition also runs on one device to tell the `collective` cause."""
    # room for the longest request: a probe or a co-request, and its new tokens
    longest = max([len(p) for p in probes] + [len(p) for c in compositions for p in c.co_prompts])
    most_new = max([max_new_tokens] + [n for c in compositions for n in c.co_new_tokens])
    max_len = longest + most_new + 1
    refs = []
    for p in probes:
        ref = Request(p, max_new_tokens, track=True)
        Engine(model, 1, max_len).run([ref])
        refs.append(ref)
    tokens = differ = route_differ = completions = completions_differ = 0
    causes = dict.fromkeys(CAUSES, 0)
    max_delta, mean_deltas, first_div, flipped, unflipped, cascade_flips = 0.0, [], [], [], [], 0
    by_size: dict[int, list[int]] = {}
    for (pi, ref), comp in itertools.product(enumerate(refs), compositions):
        probe_req, batch = comp.requests(probes[pi], max_new_tokens)
        Engine(sharded or model, len(batch), max_len).run(batch, until_tracked_done=True)
        same_batch = None
        if sharded is not None:
            same_batch, batch = comp.requests(probes[pi], max_new_tokens)
            Engine(model, len(batch), max_len).run(batch, until_tracked_done=True)
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


def check_claims(cells: list[dict]) -> dict:
    """What the design says the data must show; None where this run has no cell to judge by."""
    def rows(pred):
        return [c for c in cells if pred(c)]
    # routers batch-invariant by design (their class says so) must show zero divergence on these kernels
    by_design = lambda c: registry.router_class(c["router"]).batch_invariant
    inv = rows(lambda c: c["backend"] == "batch_invariant" and by_design(c) and c["combine"] == "ordered")
    struct = rows(lambda c: c["backend"] == "batch_invariant" and c["router"] == "capacity")
    arith = rows(lambda c: c["backend"] == "torch" and c["router"] == "topk")
    sharded_stock = rows(lambda c: c["backend"] == "torch" and c.get("layout", "none") != "none")
    return {
        "invariant_kernels_and_router_give_zero_divergence":
            all(c["frac_logits_differ"] == 0 and c["frac_completions_differ"] == 0 for c in inv) if inv else None,
        "capacity_router_diverges_structurally_with_invariant_kernels":
            any(c["causes"]["structural"] > 0 for c in struct) if struct else None,
        "torch_backend_diverges_arithmetically_with_topk":
            any(c["causes"]["arithmetic"] > 0 for c in arith) if arith else None,
        "stock_collectives_diverge_on_a_parallel_layout":
            any(c["causes"]["collective"] > 0 for c in sharded_stock) if sharded_stock else None,
    }


def run_ablation(cfg: DictConfig, out: Path) -> dict:
    exp = cfg.experiment
    vocab = vocab_size(cfg)
    # the byte-level trained model reads real text (held-out stdlib source); other models random ids
    text = bytes(load_corpus(max_bytes=400_000).val) if cfg.model.get("preset") == TRAINED_PRESET and not cfg.get("pretrained") else None
    probes = make_probes(exp.n_probes, vocab, exp.probe_min_len, exp.probe_max_len, cfg.seed, text)
    comps = make_compositions(list(exp.batch_sizes), exp.per_size, vocab, exp.co_max_len, exp.max_new_tokens,
                              cfg.seed, text)
    grid = [dict(router=r, backend=b, combine=c, dtype=d) for r, b, c, d in
            itertools.product(cfg.router.names, cfg.kernels.backends, cfg.combines, cfg.dtypes)]
    layouts = list(cfg.get("layouts", ["none"]))
    if layouts != ["none"]:  # the layout axis (a torchrun launch): reference on one device, tests sharded
        grid = [dict(**p, layout=name) for p in grid for name in layouts]
        for name in layouts:
            layout_named(name)   # joins the process group before any model is built

    def measure(model: MoETransformer, point: dict) -> dict:
        layout = layout_named(point.get("layout"))
        sharded = None if layout is None else shard_model(model, layout)
        return run_cell(model, probes, comps, exp.max_new_tokens, sharded)

    cells = run_cells(cfg, out, grid, measure, desc="ablation cells")
    results = dict(config=OmegaConf.to_container(cfg, resolve=True), claims=check_claims(cells), cells=cells)
    write_json(out / "results.json", results)
    keys = ("router", "backend", "combine", "dtype", *(("layout",) if "layout" in grid[0] else ()), "tokens", "frac_logits_differ", "frac_routes_differ",
            "max_abs_delta_logit", "mean_abs_delta_logit", "frac_completions_differ")
    write_csv(out / "cells.csv", [{**{k: c[k] for k in keys}, **c["causes"]} for c in cells])
    write_csv(out / "by_batch_size.csv", [
        dict(router=c["router"], backend=c["backend"], combine=c["combine"], dtype=c["dtype"],
             layout=c.get("layout", "none"), batch_size=B, **v)
        for c in cells for B, v in c["by_batch_size"].items()])
    if is_main():  # (the plots read the results back from disk)
        from lab.plot import plot_run
        plot_run(out)
    return results


def summary(results: dict, out: Path) -> str:
    lines = [f"{'router':18} {'backend':16} {'combine':12} {'dtype':9} {'layout':7} {'logits':>7} {'compl.':>7}  "
             + " ".join(f"{c:>10}" for c in CAUSES)]
    for c in results["cells"]:
        lines.append(f"{c['router']:18} {c['backend']:16} {c['combine']:12} {c['dtype']:9} {c.get('layout', 'none'):7} "
                     f"{c['frac_logits_differ']:7.3f} {c['frac_completions_differ']:7.3f}  "
                     + " ".join(f"{c['causes'][k]:10d}" for k in CAUSES))
    lines += ["", "fraction of probe tokens whose logits differ bitwise from the probe run alone;",
              "fraction of greedy completions that differ; divergent tokens by cause.", "",
              "claims: " + json.dumps(results["claims"], indent=1), "", f"results and plots: {out.resolve()}"]
    text = "\n".join(lines)
    if is_main():
        (out / "summary.txt").write_text(text + "\n")
    return text


@hydra.main(config_path=CONFIG_DIR, config_name="ablate", version_base=None)
def main(cfg: DictConfig) -> None:
    out = run_dir()
    text = summary(run_ablation(cfg, out), out)
    if is_main():
        print(text)


if __name__ == "__main__":
    # run the importable module's main, not __main__'s: sweep launchers (joblib) pickle the task
    # function by reference, which works only for a function of an importable module
    from experiments.ablate import main as importable_main
    importable_main()
