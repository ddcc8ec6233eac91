"""Serving simulation: the same prompt, submitted many times at temperature 0 among random traffic
on a continuous-batching engine. How many distinct completions does each configuration give?

This reproduces the published dense-model result (1000 runs of one prompt: 80 distinct completions
on stock kernels, 1 with batch-invariant kernels) on our MoE models, and adds the routing axis.

    python -m detmoe.experiments.serve_sim                         # CPU default: every router x backend
    python -m detmoe.experiments.serve_sim serve.n_probe_runs=1000 device=cuda model=large
    # long prompts, where stock kernels vary (model wide: K >= 4096; decode over >= 1024 keys), and a
    # load that swings between an empty and a full batch (bash benchmarks/gpu_checks.sh repro OUT):
    python -m detmoe.experiments.serve_sim device=cuda model=wide dtype=bfloat16 router.names=[topk] \
        serve.probe_len=1280 serve.max_new_tokens=32 serve.load=1.25 serve.load_period=100 \
        serve.max_slots=64 serve.traffic_max_len=64 serve.traffic_max_new=16 serve.n_probe_runs=1000

The whole config is checked before anything runs (`validate_config`): prompt lengths are limited only by
the model's max_seq_len; each of
the max_slots KV-cache slots holds the longest request (wide: 32 KB per position, 2.8 GB for 64 slots
of 1313 positions).

On a GPU the engine's decode steps run as CUDA graphs padded to bucket sizes where the step can be
captured (`serve.graphs`: auto). Padding puts the real requests in a larger batch, a variance source
of its own for stock kernels: `serve.graphs=[off,on]` runs each configuration both ways.

Per configuration it saves cells/<router>-<backend>-<graphs>.json (skipped when re-run in the same directory)
and steps/<router>-<backend>-<graphs>.csv (every engine step: kind, requests, tokens, wall seconds), then
results.json, distinct_completions.csv, distinct_completions.png and step_times.png (each step's wall
time: where first-use compiles, prefill and captured decode steps spend the run).

Sharded over several GPUs (one process each; `serve.layout`: experts ep or tp, attention tp):

    torchrun --nproc_per_node 4 -m detmoe.experiments.serve_sim device=cuda model=wide serve.layout=ep hydra.run.dir=DIR
"""
from __future__ import annotations

import csv
import dataclasses
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from detmoe.lab.compositions import random_prompt  # noqa: E402
from detmoe.lab.distributed import is_main, layout_named  # noqa: E402
from detmoe.moe.engine import Engine, Request, poisson  # noqa: E402
from detmoe.lab.hydra_utils import (CONFIG_DIR, cell_name, router_backend_grid, run_cells, run_dir, write_csv,  # noqa: E402
                             write_json)
from detmoe.lab.outputs import write_summary  # noqa: E402
from detmoe.lab.plot import save_figure  # noqa: E402
from detmoe.lab import config_checks as checks  # noqa: E402
from detmoe.moe import MoETransformer  # noqa: E402


# serve.graphs: decode steps as CUDA graphs padded to bucket sizes (detmoe/moe/graphs.py). auto: where the step can
# be captured on a CUDA device; on: also on a CPU (the padded step, run eagerly); off: eager, unpadded.
GRAPHS = {"auto": None, "on": True, "off": False}


def arrival_rates(serve: DictConfig, span: int) -> list[float]:
    """Mean arrivals per engine step: `load` throughout, or with `load_period` a wave between 0 and
    2 x load (mean `load`) with that period in steps, so the running batch sweeps from nearly empty to
    full and a request meets every batch size."""
    period = serve.get("load_period")
    if not period:
        return [serve.load] * span
    return [serve.load * (1.0 - math.cos(2 * math.pi * step / period)) for step in range(span)]


def make_traffic(serve: DictConfig, vocab: int, seed: int) -> tuple[list[int], list[Request], list[Request]]:
    """The probe prompt, its n_probe_runs copies at random arrival steps, and Poisson background traffic
    over the same span (both following `arrival_rates`). Traffic is a function of the seed only, the
    same for every configuration."""
    rng = random.Random(seed)
    probe = random_prompt(rng, vocab, serve.probe_len)
    span = max(1, int(serve.n_probe_runs / max(serve.load, 1e-9) * 2))
    if serve.get("load_period"):
        span = max(span, serve.load_period)   # at least one whole wave (its first step has rate 0)
    rates = arrival_rates(serve, span)
    if serve.get("load_period"):
        arrivals = rng.choices(range(span), weights=rates, k=serve.n_probe_runs)
    else:  # constant load: the draws of the original design, so earlier results replay exactly
        arrivals = [rng.randrange(span) for _ in range(serve.n_probe_runs)]
    copies = [Request(probe, serve.max_new_tokens, arrival=a, chunk=serve.chunk) for a in arrivals]
    traffic = []
    for step in range(span):
        for _ in range(poisson(rng, rates[step])):
            prompt = random_prompt(rng, vocab, rng.randint(1, serve.traffic_max_len))
            traffic.append(Request(prompt, rng.randint(1, serve.traffic_max_new), arrival=step, chunk=serve.chunk))
    every = sorted(copies + traffic, key=lambda r: r.arrival)
    for i, r in enumerate(every):
        r.order = i  # first come, first placed in the batch
    return probe, copies, every


def summarize(completions: list[list[int]]) -> dict:
    """Distinct completions, most common first, each with its count and where it departs from the
    most common one."""
    counts = Counter(tuple(c) for c in completions)
    ranked = counts.most_common()
    mode = ranked[0][0]
    variants = []
    for comp, n in ranked:
        first = next((i for i, (a, b) in enumerate(zip(comp, mode)) if a != b), None)
        variants.append(dict(count=n, first_divergence=first, completion=list(comp)))
    return dict(runs=len(completions), distinct=len(ranked), variants=variants)


def load_record(batch_sizes: list[int], max_slots: int, seconds: float, times: Optional[dict] = None) -> dict:
    """How the running batch varied: steps, their sizes in 8 bins up to max_slots, and the time taken
    (in all, and by kind of step: `moe.engine.StepTimes`)."""
    edges = [math.ceil(max_slots * i / 8) for i in range(9)]
    bins = {f"{edges[i] + 1}-{edges[i + 1]}": sum(edges[i] < b <= edges[i + 1] for b in batch_sizes)
            for i in range(8) if edges[i + 1] > edges[i]}
    return dict(steps=len(batch_sizes), seconds=round(seconds, 2), batch_size_steps=bins,
                mean_batch_size=round(sum(batch_sizes) / max(len(batch_sizes), 1), 2), step_times=times)


def plot_distinct(cells: list[dict], max_new_tokens: int, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(cells) + 2))
    cmap = plt.get_cmap("viridis")
    for row, c in enumerate(cells):
        for j, v in enumerate(c["variants"]):
            first = v["first_divergence"]
            depart = 0.0 if first is None else 1.0 - first / max_new_tokens  # 1: departs at token 0
            ax.scatter(j, row, s=20 + 200 * v["count"] / c["runs"], color=cmap(depart), edgecolor="k", lw=0.3)
        # in points from the last mark, so the label clears the (large) marks at any number of variants
        ax.annotate(f"{c['distinct']} distinct / {c['runs']}", (len(c["variants"]) - 1, row), xytext=(14, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(range(len(cells)), [f"{c['router']} / {c['backend']}" + (" / CUDA graphs" if c["graphs_used"] else "")
                                      for c in cells])
    ax.set_xlabel("distinct completions of the same prompt (most common first; size: how often)")
    widest = max(len(c["variants"]) for c in cells)
    ax.set_xlim(-1, widest * 1.15 + 6)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=ax, label="departure from the most common\n(1: at the first token, 0: never)")
    ax.set_title("Same prompt, temperature 0, among random traffic")
    return save_figure(fig, path)


def steps_csv(out: Path, point: dict) -> Path:
    """Where a configuration's per-step record goes (named as its cell file)."""
    return out / "steps" / (cell_name(point) + ".csv")


def plot_step_times(out: Path, grid: list[dict], path: Path) -> Optional[Path]:
    """One panel per configuration: each engine step's wall time against its index, graph and eager steps
    apart (log scale: first-use compiles stand out as spikes)."""
    found = [(p, steps_csv(out, p)) for p in grid if steps_csv(out, p).exists()]
    if not found:
        return None
    fig, axes = plt.subplots(len(found), 1, figsize=(10, 2.4 * len(found) + 0.6), squeeze=False, sharex=True)
    for ax, (point, csv_path) in zip(axes[:, 0], found):
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        for kind, color in (("eager", "#DD8452"), ("graph", "#4C72B0")):
            mine = [r for r in rows if r["kind"] == kind]
            total = sum(float(r["seconds"]) for r in mine)
            ax.scatter([int(r["step"]) for r in mine], [1e3 * float(r["seconds"]) for r in mine], s=4,
                       color=color, label=f"{kind}: {len(mine)} steps, {total:.1f} s")
        ax.set_yscale("log")
        ax.set_ylabel("wall ms")
        ax.set_title(" / ".join(map(str, point.values())), fontsize=9)
        ax.legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("engine step")
    fig.suptitle("Each serving step's wall time (graph: all-decode steps, CUDA graphs on a GPU; eager: "
                 "prefill or mixed)", fontsize=9)
    return save_figure(fig, path)


def longest_request(serve: DictConfig) -> int:
    """Tokens the longest request can hold: its prompt and every generated token (the KV cache needs one
    fewer: the last token is never fed back)."""
    return max(serve.probe_len, serve.traffic_max_len) + max(serve.max_new_tokens, serve.traffic_max_new)


def validate_config(cfg: DictConfig) -> None:
    """Every key of the serving simulation's config, before any work: a ValueError naming the first bad one."""
    c, models = checks.check_common(cfg, "serve_sim", lists=False)
    serve = checks.check_keys(c["serve"], checks.yaml_keys("serve_sim.yaml", "serve"), "serve")
    checks.check_name("serve.name", serve["name"])
    for key in ("n_probe_runs", "probe_len", "max_new_tokens", "max_slots", "traffic_max_len", "traffic_max_new"):
        checks.check_int(f"serve.{key}", serve[key], 1)
    checks.check_span("serve.load", serve["load"], "serve.n_probe_runs", serve["n_probe_runs"])
    checks.check_optional_int("serve.chunk", serve["chunk"], 1, "the whole prompt in one step")
    checks.check_optional_int("serve.load_period", serve["load_period"], 1, "constant load")
    checks.check_list("serve.graphs", serve["graphs"], tuple(GRAPHS))
    checks.check_layouts({"serve.layout": serve["layout"]})
    checks.check_fits(longest_request(cfg.serve) + 1, f"requests of up to {longest_request(cfg.serve)} tokens "
                      "(serve.probe_len or traffic_max_len, plus max_new_tokens or traffic_max_new, and a spare)",
                      models[0].max_seq_len)


def run_serve_sim(cfg: DictConfig, out: Path) -> dict:
    validate_config(cfg)
    serve = cfg.serve
    max_len = longest_request(serve) + 1   # KV-cache positions per slot (one spare)
    layout = layout_named(serve.get("layout"))   # sharded over the ranks of a torchrun launch

    def measure(model: MoETransformer, point: dict) -> dict:
        _, copies, every = make_traffic(serve, model.cfg.vocab_size, cfg.seed)
        engine = Engine(model, serve.max_slots, max_len, graphs=GRAPHS[point["graphs"]])
        start = time.perf_counter()
        engine.run(every)
        seconds = time.perf_counter() - start
        write_csv(steps_csv(out, point), [dict(step=i, **dataclasses.asdict(r))
                                          for i, r in enumerate(engine.times.steps)])
        return dict(**summarize([r.generated for r in copies]), graphs_used=engine.graphs is not None,
                    engine=load_record(engine.batch_sizes, serve.max_slots, seconds, engine.times.as_dict()))

    grid = [dict(**p, graphs=g) for p in router_backend_grid(cfg) for g in serve.graphs]
    cells = run_cells(cfg, out, grid, measure, desc="serving configurations", layout=layout)
    results = dict(config=OmegaConf.to_container(cfg, resolve=True), cells=cells)
    write_json(out / "results.json", results)
    write_csv(out / "distinct_completions.csv",
              [dict(router=c["router"], backend=c["backend"], graphs=c["graphs_used"], runs=c["runs"],
                    distinct=c["distinct"], seconds=c["engine"]["seconds"],
                    earliest_divergence=min((v["first_divergence"] for v in c["variants"][1:]), default=None))
               for c in cells])
    plot_distinct(cells, serve.max_new_tokens, out / "distinct_completions.png")
    plot_step_times(out, grid, out / "step_times.png")
    return results


def summary_lines(results: dict) -> list[str]:
    """One line per configuration (router, backend, CUDA-graph decode used or not: padded to buckets, or
    eager), then the run's steps by batch size."""
    mode = lambda c: "graphs" if c.get("graphs_used") else "eager"
    lines = [f"{c['router']:18} {c['backend']:16} {mode(c):6} "
             f"{c['distinct']:5d} distinct of {c['runs']}"
             + (f"  ({c['engine']['steps']} steps, mean batch {c['engine']['mean_batch_size']}, "
                f"{c['engine']['seconds']:.0f} s)" if "engine" in c else "") for c in results["cells"]]
    for c in results["cells"]:
        t = c.get("engine", {}).get("step_times")
        if t:
            lines.append(f"  {c['router']} {c['backend']} {mode(c)}: "
                         f"{t['graph_steps']} graph steps {t['graph_seconds']:.1f} s (recording graphs "
                         f"{t['capture_seconds']:.1f} s of it), {t['eager_steps']} eager steps "
                         f"{t['eager_seconds']:.1f} s ({t['eager_tokens']} tokens)")
    cell = results["cells"][0]
    if "engine" in cell:
        lines.append("steps by batch size: " + ", ".join(f"{k}: {v}" for k, v in cell["engine"]["batch_size_steps"].items()))
    return lines


@hydra.main(config_path=CONFIG_DIR, config_name="serve_sim", version_base=None)
def main(cfg: DictConfig) -> None:
    validate_config(cfg)   # before run_dir records the run
    out = run_dir(cfg)
    results = run_serve_sim(cfg, out)
    lines = summary_lines(results)
    text = write_summary(out, lines + [f"results and plot: {out.resolve()}"])
    if is_main():
        print(text)


if __name__ == "__main__":
    # run the importable module's main, not __main__'s: sweep launchers (joblib) pickle the task
    # function by reference, which works only for a function of an importable module
    from detmoe.experiments.serve_sim import main as importable_main
    importable_main()
