"""Plots of an ablation run, readable without the code. Redraw any run directory (or a multirun
sweep, whose runs are merged) without re-running it:

    python -m lab.plot outputs/ablate/<run>      # or multirun/ablate/<sweep>
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lab.distributed import is_main  # noqa: E402

CAUSE_COLORS = {"arithmetic": "#4C72B0", "structural": "#DD8452", "amplified": "#C44E52",
                "collective": "#55A868"}


def save_figure(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    if is_main():  # one process writes when several run the app (lab/distributed.py)
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_cells(path: Path) -> list[dict]:
    """Cells of one run (results.json, or cells/*.json of an unfinished one), or of every run below."""
    path = Path(path)
    if (path / "results.json").exists():
        return json.loads((path / "results.json").read_text())["cells"]
    if (path / "cells").is_dir():
        return [json.loads(p.read_text()) for p in sorted((path / "cells").glob("*.json"))]
    runs = sorted({p.parent for p in path.rglob("results.json")} | {p.parent.parent for p in path.rglob("cells/*.json")})
    return [c for run in runs for c in load_cells(run)]


def _label(c: dict) -> str:
    layout = c.get("layout", "none")
    return f"{c['backend']}\n{c['combine']}\n{c['dtype']}" + ("" if layout == "none" else f"\nlayout {layout}")


def plot_heatmap(cells: list[dict], out: Path) -> Path:
    routers = list(dict.fromkeys(c["router"] for c in cells))
    columns = list(dict.fromkeys(_label(c) for c in cells))
    grid = np.full((len(routers), len(columns)), np.nan)
    for c in cells:
        grid[routers.index(c["router"]), columns.index(_label(c))] = c["frac_logits_differ"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(columns) + 6), 1.1 * len(routers) + 3),
                                 gridspec_kw=dict(width_ratios=[max(len(columns), 2), 3]))
    im = ax.imshow(grid, cmap="magma_r", vmin=0, vmax=max(1e-9, np.nanmax(grid)), aspect="auto")
    ax.set_xticks(range(len(columns)), columns, fontsize=7)
    ax.set_yticks(range(len(routers)), routers)
    for i in range(len(routers)):
        for j in range(len(columns)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] > 0.5 * np.nanmax(grid) else "black")
    fig.colorbar(im, ax=ax, label="fraction of probe tokens whose logits differ bitwise")
    ax.set_title("Divergence from the request run alone")
    # attribution: divergent tokens by cause, stacked, one bar per cell
    names = [f"{c['router']}|{c['backend'][:5]}|{c['combine'][:4]}|{c['dtype'][:4]}" for c in cells]
    left = np.zeros(len(cells))
    for cause, color in CAUSE_COLORS.items():
        v = np.array([c["causes"][cause] / max(c["tokens"], 1) for c in cells])
        bx.barh(range(len(cells)), v, left=left, color=color, label=cause)
        left += v
    bx.set_yticks(range(len(cells)), names, fontsize=6)
    bx.invert_yaxis()
    bx.set_xlim(0, 1)
    bx.set_xlabel("fraction of probe tokens, by cause")
    bx.set_title("Attribution")
    bx.legend(fontsize=7)
    return save_figure(fig, out / "divergence_heatmap.png")


def plot_by_batch_size(cells: list[dict], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5))
    for c in cells:
        sizes = sorted(int(b) for b in c["by_batch_size"])
        rates = [c["by_batch_size"][str(b) if str(b) in c["by_batch_size"] else b]["frac_logits_differ"] for b in sizes]
        style = "-" if c["backend"] == "torch" else "--"
        ax.plot(sizes, rates, style, marker="o", ms=3, label=f"{c['router']} / {c['backend']} / {c['combine']} / {c['dtype']}"
                + ("" if c.get("layout", "none") == "none" else f" / layout {c['layout']}"))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size the probe ran in")
    ax.set_ylabel("fraction of probe tokens whose logits differ")
    ax.set_title("Divergence vs batch size (solid: torch kernels, dashed: batch-invariant)")
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, out / "divergence_by_batch_size.png")


def plot_margins(cells: list[dict], out: Path) -> Path:
    flipped = np.array([m for c in cells for m in c["flipped_margins"]])
    held = np.array([m for c in cells for m in c["unflipped_margins"]])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    top = max(float(held.max()) if held.size else 1e-3, 1e-6)
    bins = np.logspace(-9, np.log10(top), 40)
    if held.size:
        ax.hist(np.clip(held, 1e-9, None), bins=bins, alpha=0.6, density=True, label=f"held ({held.size})")
    if flipped.size:
        ax.hist(np.clip(flipped, 1e-9, None), bins=bins, alpha=0.8, density=True, label=f"primary flips ({flipped.size})")
    else:
        ax.plot([], [], " ", label="primary flips: none")
    cascades = sum(c.get("cascade_flips", 0) for c in cells)
    ax.plot([], [], " ", label=f"cascade flips, not shown: {cascades}\n(after a routing change upstream)")
    ax.set_xscale("log")
    ax.set_xlabel("router top-k margin in the reference run (k-th minus (k+1)-th probability)")
    ax.set_ylabel("density")
    ax.set_title("Margins of routing choices: primary flips (numeric drift crossed a near tie) vs held")
    ax.legend()
    return save_figure(fig, out / "router_margins.png")


def plot_run(path: Path) -> list[Path]:
    path = Path(path)
    cells = load_cells(path)
    return [plot_heatmap(cells, path), plot_by_batch_size(cells, path), plot_margins(cells, path)]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m lab.plot RUN_OR_SWEEP_DIR")
    for p in plot_run(Path(sys.argv[1])):
        print(p)
