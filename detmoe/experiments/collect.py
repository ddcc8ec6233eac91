"""Merge a Hydra sweep of the ablation into one table and one set of figures.

    python -m detmoe.experiments.ablate -m router=topk,capacity kernels=torch,batch_invariant
    python -m detmoe.experiments.collect multirun/ablate/<sweep>

Writes collected.csv, collected.json (the claims judged on every cell of the sweep) and the figures of
detmoe/lab/plot.py into the sweep directory. Runs still in progress contribute the cells they have finished.
A cell is one (router, backend, combine, dtype, layout, probes); the runs' measurements of which stock
kernels vary on their device are merged (the largest count of versions per op and dtype), so that the
device-dependent claims are judged as in one run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from detmoe.experiments.ablate import check_claims, judge_claims
from detmoe.lab.hydra_utils import write_csv, write_json
from detmoe.lab.plot import load_cells, plot_by_batch_size, plot_causes, plot_heatmap, plot_margins

TABLE_KEYS = ("router", "backend", "combine", "dtype", "tokens", "frac_logits_differ", "frac_routes_differ",
              "max_abs_delta_logit", "mean_abs_delta_logit", "frac_completions_differ")


def cell_key(c: dict) -> tuple:
    return (c["router"], c["backend"], c["combine"], c["dtype"], c.get("layout", "none"), c.get("probes", 0))


def stock_versions(sweep: Path) -> dict[str, dict[str, int]] | None:
    """Every run's `stock_kernel_versions`, merged: per dtype and op, the most versions any run saw."""
    merged: dict[str, dict[str, int]] = {}
    for path in sorted(sweep.rglob("results.json")):
        for dtype, ops in (json.loads(path.read_text()).get("stock_kernel_versions") or {}).items():
            for op, n in ops.items():
                merged.setdefault(dtype, {})[op] = max(n, merged.get(dtype, {}).get(op, 0))
    return merged or None


def collect(sweep: Path) -> list[dict]:
    cells = load_cells(sweep)
    if not cells:
        raise ValueError(f"sweep holds no ablation results: {sweep}")
    unique = {cell_key(c): c for c in cells}
    cells = [unique[k] for k in sorted(unique)]
    write_csv(sweep / "collected.csv", [{**{k: c[k] for k in TABLE_KEYS}, "layout": c.get("layout", "none"),
                                         "probes": c.get("probes"), **c["causes"]} for c in cells])
    stock = stock_versions(sweep)
    write_json(sweep / "collected.json", dict(claims=check_claims(cells, stock),
                                              claim_verdicts=judge_claims(cells, stock),
                                              stock_kernel_versions=stock, cells=cells))
    for plot in (plot_heatmap, plot_causes, plot_by_batch_size, plot_margins):
        plot(cells, sweep)
    return cells


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m detmoe.experiments.collect SWEEP_DIR")
    cells = collect(Path(sys.argv[1]))
    print(f"{len(cells)} cells -> {Path(sys.argv[1]).resolve() / 'collected.csv'}")
