"""Serving simulation: the same prompt, submitted many times at temperature 0 among random traffic
on a continuous-batching engine. How many distinct completions does each configuration give?

This reproduces the published dense-model result (1000 runs of one prompt: 80 distinct completions
on stock kernels, 1 with batch-invariant kernels) on our MoE models, and adds the routing axis.

    python -m experiments.serve_sim                         # CPU default: every router x backend
    python -m experiments.serve_sim serve.n_probe_runs=1000 device=cuda model=large

Per configuration it saves cells/<router>-<backend>.json (skipped when re-run in the same directory),
then results.json, distinct_completions.csv and distinct_completions.png.
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from experiments.compositions import random_prompt  # noqa: E402
from experiments.engine import Engine, Request, poisson  # noqa: E402
from experiments.hydra_utils import CONFIG_DIR, router_backend_grid, run_cells, run_dir, write_csv, write_json  # noqa: E402
from experiments.plot import save_figure  # noqa: E402
from moe import MoETransformer  # noqa: E402


def make_traffic(serve: DictConfig, vocab: int, seed: int) -> tuple[list[int], list[Request], list[Request]]:
    """The probe prompt, its n_probe_runs copies at random arrival steps, and Poisson background traffic
    over the same span. Traffic is a function of the seed only, the same for every configuration."""
    rng = random.Random(seed)
    probe = random_prompt(rng, vocab, serve.probe_len)
    span = max(1, int(serve.n_probe_runs / max(serve.load, 1e-9) * 2))
    copies = [Request(probe, serve.max_new_tokens, arrival=rng.randrange(span), chunk=serve.chunk)
              for _ in range(serve.n_probe_runs)]
    traffic = []
    for step in range(span):
        for _ in range(poisson(rng, serve.load)):
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


def plot_distinct(cells: list[dict], max_new_tokens: int, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(cells) + 2))
    cmap = plt.get_cmap("viridis")
    for row, c in enumerate(cells):
        for j, v in enumerate(c["variants"]):
            first = v["first_divergence"]
            depart = 0.0 if first is None else 1.0 - first / max_new_tokens  # 1: departs at token 0
            ax.scatter(j, row, s=20 + 200 * v["count"] / c["runs"], color=cmap(depart), edgecolor="k", lw=0.3)
        ax.text(len(c["variants"]) + 0.3, row, f"{c['distinct']} distinct / {c['runs']}", va="center", fontsize=8)
    ax.set_yticks(range(len(cells)), [f"{c['router']} / {c['backend']}" for c in cells])
    ax.set_xlabel("distinct completions of the same prompt (most common first; size: how often)")
    ax.set_xlim(-1, max(len(c["variants"]) for c in cells) + 6)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=ax, label="departure from the most common\n(1: at the first token, 0: never)")
    ax.set_title("Same prompt, temperature 0, among random traffic")
    return save_figure(fig, path)


def run_serve_sim(cfg: DictConfig, out: Path) -> dict:
    serve = cfg.serve
    max_len = max(serve.probe_len, serve.traffic_max_len) + max(serve.max_new_tokens, serve.traffic_max_new) + 1

    def measure(model: MoETransformer) -> dict:
        _, copies, every = make_traffic(serve, model.cfg.vocab_size, cfg.seed)
        Engine(model, serve.max_slots, max_len).run(every)
        return summarize([r.generated for r in copies])

    grid = router_backend_grid(cfg)
    cells = run_cells(cfg, out, grid, measure, desc="serving configurations")
    results = dict(config=OmegaConf.to_container(cfg, resolve=True), cells=cells)
    write_json(out / "results.json", results)
    write_csv(out / "distinct_completions.csv",
              [dict(router=c["router"], backend=c["backend"], runs=c["runs"], distinct=c["distinct"],
                    earliest_divergence=min((v["first_divergence"] for v in c["variants"][1:]), default=None))
               for c in cells])
    plot_distinct(cells, serve.max_new_tokens, out / "distinct_completions.png")
    return results


@hydra.main(config_path=CONFIG_DIR, config_name="serve_sim", version_base=None)
def main(cfg: DictConfig) -> None:
    out = run_dir()
    results = run_serve_sim(cfg, out)
    lines = [f"{c['router']:18} {c['backend']:16} {c['distinct']:5d} distinct of {c['runs']}" for c in results["cells"]]
    text = "\n".join(lines + [f"results and plot: {out.resolve()}"])
    (out / "summary.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    # run the importable module's main, not __main__'s: sweep launchers (joblib) pickle the task
    # function by reference, which works only for a function of an importable module
    from experiments.serve_sim import main as importable_main
    importable_main()
