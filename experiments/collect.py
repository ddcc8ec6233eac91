"""Merge a Hydra sweep of the ablation into one table and one set of figures.

    python -m experiments.ablate -m router=topk,capacity kernels=torch,batch_invariant
    python -m experiments.collect multirun/ablate/<sweep>

Writes collected.csv, collected.json and the plots of lab/plot.py into the sweep directory.
Runs still in progress contribute the cells they have finished.
"""
from __future__ import annotations

import sys
from pathlib import Path

from experiments.ablate import check_claims
from lab.hydra_utils import write_csv, write_json
from lab.plot import load_cells, plot_by_batch_size, plot_heatmap, plot_margins

TABLE_KEYS = ("router", "backend", "combine", "dtype", "tokens", "frac_logits_differ", "frac_routes_differ",
              "max_abs_delta_logit", "mean_abs_delta_logit", "frac_completions_differ")


def collect(sweep: Path) -> list[dict]:
    cells = load_cells(sweep)
    if not cells:
        raise ValueError(f"sweep holds no ablation results: {sweep}")
    unique = {(c["router"], c["backend"], c["combine"], c["dtype"]): c for c in cells}
    cells = [unique[k] for k in sorted(unique)]
    write_csv(sweep / "collected.csv", [{**{k: c[k] for k in TABLE_KEYS}, **c["causes"]} for c in cells])
    write_json(sweep / "collected.json", dict(claims=check_claims(cells), cells=cells))
    for plot in (plot_heatmap, plot_by_batch_size, plot_margins):
        plot(cells, sweep)
    return cells


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m experiments.collect SWEEP_DIR")
    cells = collect(Path(sys.argv[1]))
    print(f"{len(cells)} cells -> {Path(sys.argv[1]).resolve() / 'collected.csv'}")
