"""Figures of an ablation run, each with one message a reader gets without the code. Redraw any run
directory (or a multirun sweep, whose runs are merged) without re-running it:

    python -m detmoe.lab.plot outputs/ablate/<run>      # or multirun/ablate/<sweep>

- divergence_heatmap.png: how often each router x kernel setting moves a probe token's logits.
- divergence_by_cause.png: why, one panel per router, a stacked bar per setting (causes add up to it).
- divergence_by_batch_size.png: how that depends on the batch the probe ran in, one panel per router.
- router_margins.png: how near a tie a routing choice was when numeric drift flipped it, one panel per
  dtype (a dtype's rounding sets the size of the drift).

A *setting* is everything but the router: kernels (backend), combine, dtype, and where they are not
the run's defaults the layout and the number of probes. Labels spell every part out in full.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from detmoe.lab.distributed import is_main  # noqa: E402
from detmoe.lab.outputs import atomic_path  # noqa: E402

CAUSE_COLORS = {"arithmetic": "#4C72B0", "structural": "#DD8452", "amplified": "#C44E52",
                "collective": "#55A868"}
CAUSE_MEANING = {"arithmetic": "reduction order", "structural": "capacity: slot taken by another request",
                 "amplified": "numeric drift flipped a near tie", "collective": "cross-rank sums"}
BACKEND_COLORS = {"torch": "#4C72B0", "batch_invariant": "#55A868"}
FIGURES = ("divergence_heatmap.png", "divergence_by_cause.png", "divergence_by_batch_size.png",
           "router_margins.png")


def save_figure(fig: plt.Figure, path: Path) -> Path:
    if is_main():  # one process writes when several run the app (detmoe/lab/distributed.py)
        with atomic_path(path) as tmp:   # the format from `path`: the temporary name ends in .tmp
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or None)
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


def setting_parts(c: dict) -> list[str]:
    """A cell's setting (all but the router), part by part, in full words."""
    parts = [f"{c['backend']} kernels", f"{c['combine']} combine", c["dtype"]]
    if c.get("layout", "none") != "none":
        parts.append(f"layout {c['layout']}")
    if "n_probes" in c:  # a cell with its own number of probes (the run's `extra_cells`)
        parts.append(f"{c['n_probes']} probes")
    return parts


def setting_label(c: dict, sep: str = ", ") -> str:
    return sep.join(setting_parts(c))


def routers_of(cells: list[dict]) -> list[str]:
    return list(dict.fromkeys(c["router"] for c in cells))


def settings_of(cells: list[dict]) -> list[str]:
    return list(dict.fromkeys(setting_label(c) for c in cells))


def _panels(n: int, width: float, height: float, sharex: bool = True, sharey: bool = False
            ) -> tuple[plt.Figure, list[plt.Axes]]:
    """n panels, two per row where there are more than two, laid out with room for a legend outside."""
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), sharex=sharex, sharey=sharey,
                             squeeze=False, layout="constrained")
    axes = list(axes.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def draw_heatmap(cells: list[dict]) -> plt.Figure:
    routers, settings = routers_of(cells), settings_of(cells)
    grid = np.full((len(routers), len(settings)), np.nan)
    for c in cells:
        grid[routers.index(c["router"]), settings.index(setting_label(c))] = c["frac_logits_differ"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(settings) + 3), 0.8 * len(routers) + 3), layout="constrained")
    top = max(1e-9, float(np.nanmax(grid)))
    im = ax.imshow(grid, cmap="magma_r", vmin=0, vmax=top, aspect="auto")
    ax.set_xticks(range(len(settings)), [s.replace(", ", "\n") for s in settings], fontsize=8)
    ax.set_yticks(range(len(routers)), [f"{r} router" for r in routers])
    for i, j in np.ndindex(grid.shape):
        if np.isnan(grid[i, j]):
            ax.text(j, i, "not run", ha="center", va="center", fontsize=7, color="grey")
        else:
            ax.text(j, i, f"{grid[i, j]:.2f}" if grid[i, j] else "0", ha="center", va="center", fontsize=9,
                    color="white" if grid[i, j] > 0.5 * top else "black")
    fig.colorbar(im, ax=ax, label="fraction of probe tokens")
    ax.set_title("How often a request's logits depend on its batch: fraction of probe tokens whose\n"
                 "logits differ bitwise from the probe run alone (0 = batch-invariant)", fontsize=10)
    return fig


def draw_causes(cells: list[dict]) -> plt.Figure:
    """One panel per router; per setting a bar of divergent tokens stacked by cause (its length is the
    fraction of probe tokens whose logits differ)."""
    routers = routers_of(cells)
    settings = settings_of(cells)
    fig, axes = _panels(len(routers), 5.0, 0.42 * len(settings) + 1.2, sharey=True)
    totals = {k: sum(c["causes"][k] for c in cells) for k in CAUSE_COLORS}
    for ax, router in zip(axes, routers):
        mine = {setting_label(c): c for c in cells if c["router"] == router}
        left = np.zeros(len(settings))
        for cause, color in CAUSE_COLORS.items():
            v = np.array([mine[s]["causes"][cause] / max(mine[s]["tokens"], 1) if s in mine else 0.0
                          for s in settings])
            ax.barh(range(len(settings)), v, left=left, color=color,
                    label=f"{cause} ({CAUSE_MEANING[cause]}): {totals[cause]} tokens")
            left += v
        for y, s in enumerate(settings):   # the number, so that an empty bar reads as zero, not as missing
            frac = mine[s]["frac_logits_differ"] if s in mine else None
            text = "not run" if frac is None else f"{frac:.2f}" if frac else "0: none differ"
            if frac:   # a cause too thin to see in the bar is named with its count
                thin = [f"{k} {n}" for k, n in mine[s]["causes"].items() if 0 < n < 0.05 * sum(mine[s]["causes"].values())]
                text += f" ({', '.join(thin)} tokens)" if thin else ""
            ax.text(left[y] + 0.01, y, text, va="center", fontsize=7, color="grey" if frac is None else "black")
        ax.set_yticks(range(len(settings)), settings, fontsize=8)
        ax.set_xlim(0, 1.1)
        ax.set_title(f"{router} router", fontsize=10)
        ax.set_xlabel("fraction of probe tokens whose logits differ")
        ax.tick_params(axis="x", labelbottom=True)
    axes[0].invert_yaxis()   # shared: the first setting on top in every panel
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8,
               title="cause (divergent tokens over all cells)")
    fig.suptitle("Why a request's logits moved: every divergent probe token attributed to one cause", fontsize=11)
    return fig


def draw_by_batch_size(cells: list[dict]) -> plt.Figure:
    """One panel per router; a line per setting, colour by kernels, line style and marker by the rest.
    Settings with equal results would hide each other: each is nudged sideways a little."""
    routers = routers_of(cells)
    settings = settings_of(cells)
    fig, axes = _panels(len(routers), 5.0, 3.0, sharey=True)
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D", "v"]
    sizes_seen = sorted({int(b) for c in cells for b in c["by_batch_size"]})
    for ax, router in zip(axes, routers):
        for c in (c for c in cells if c["router"] == router):
            by = {int(b): v for b, v in c["by_batch_size"].items()}
            sizes = sorted(by)
            k = settings.index(setting_label(c))
            nudge = 1.0 + 0.025 * (k - (len(settings) - 1) / 2)
            ax.plot([b * nudge for b in sizes], [by[b]["frac_logits_differ"] for b in sizes],
                    styles[k % len(styles)], marker=markers[k % len(markers)], ms=4, mfc="none",
                    color=BACKEND_COLORS.get(c["backend"]), label=setting_label(c))
        ax.set_xscale("log")
        ax.set_xticks(sizes_seen, [str(b) for b in sizes_seen])
        ax.minorticks_off()
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{router} router", fontsize=10)
        ax.set_xlabel("batch size the probe ran in")
        ax.tick_params(axis="x", labelbottom=True)
    for ax in axes[::2]:
        ax.set_ylabel("fraction of probe tokens\nwhose logits differ")
    labels = {}
    for ax in axes:   # one legend entry per setting, whichever panel drew it
        for h, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, h)
    fig.legend(labels.values(), labels.keys(), loc="outside lower center", ncol=2, fontsize=8,
               title="setting (colour: kernels)")
    fig.suptitle("Divergence by the size of the batch the probe ran in (a batch of 1 is the reference's "
                 "own schedule)", fontsize=11)
    return fig


def margin_bins(margins: np.ndarray) -> tuple[float, np.ndarray]:
    """(lo, bins): 40 log-spaced bins over the positive margins; lo is where ties (and the non-positive
    margins of biased routers) are drawn."""
    positive = margins[margins > 0]
    lo = max(float(positive.min()) / 2, 1e-12) if positive.size else 1e-9
    hi = max(float(positive.max()) * 2, lo * 10) if positive.size else 1.0
    return lo, np.logspace(np.log10(lo), np.log10(hi), 40)


def hist_margins(ax: plt.Axes, held: np.ndarray, flipped: np.ndarray, cascades: int, lo: float,
                 bins: np.ndarray) -> None:
    """The reference margins of the choices that held against those of primary flips, on one log scale;
    each group sums to 1, so a handful of flips and thousands of held choices compare by shape."""
    share = lambda v: np.full(v.size, 1 / v.size)
    if held.size:
        nonzero = held[held > 0]
        ax.hist(np.clip(held, lo, None), bins=bins, weights=share(held), alpha=0.6, color="#8C8C8C",
                label=f"held: {held.size} choices recorded"
                      + (f", smallest nonzero margin {nonzero.min():.1e}" if nonzero.size else ""))
    if flipped.size:
        ax.hist(np.clip(flipped, lo, None), bins=bins, weights=share(flipped), alpha=0.85,
                color=CAUSE_COLORS["amplified"],
                label=f"primary flips: {flipped.size}, largest margin {flipped.max():.1e}")
    else:
        ax.plot([], [], " ", label="primary flips: none")
    ax.plot([], [], " ", label=f"cascade flips (after a routing change upstream), not shown: {cascades}")
    ties = int((held <= 0).sum() + (flipped <= 0).sum())
    if ties:
        ax.plot([], [], " ", label=f"ties (margin <= 0), drawn at the left edge: {ties}")
    ax.set_xscale("log")
    ax.set_xlabel("router top-k margin in the reference run (k-th minus (k+1)-th probability)")
    ax.set_ylabel("share of the group's choices")
    ax.legend(fontsize=7)


def draw_margins(cells: list[dict]) -> plt.Figure:
    """One panel per dtype, stock-kernel cells only (the batch-invariant ones have no drift to flip a
    choice): reference margins of the choices that held against those of primary flips, on one scale."""
    stock = [c for c in cells if c["backend"] != "batch_invariant"]
    dtypes = list(dict.fromkeys(c["dtype"] for c in stock)) or ["(no stock-kernel cell)"]
    fig, axes = _panels(len(dtypes), 6.5, 3.6)
    lo, bins = margin_bins(np.array([m for c in stock for m in c["flipped_margins"] + c["unflipped_margins"]]))
    for ax, dtype in zip(axes, dtypes):
        mine = [c for c in stock if c["dtype"] == dtype]
        hist_margins(ax, np.array([m for c in mine for m in c["unflipped_margins"]]),
                     np.array([m for c in mine for m in c["flipped_margins"]]),
                     sum(c.get("cascade_flips", 0) for c in mine), lo, bins)
        ax.tick_params(axis="x", labelbottom=True)
        ax.set_title(f"{dtype}, stock kernels: {len(mine)} cell{'' if len(mine) == 1 else 's'}", fontsize=10)
    fig.suptitle("Numeric drift flips a routing choice only at a near tie: reference margins of primary\n"
                 "flips (nothing upstream of the router differed) against choices that held", fontsize=11)
    return fig


def plot_heatmap(cells: list[dict], out: Path) -> Path:
    return save_figure(draw_heatmap(cells), Path(out) / "divergence_heatmap.png")


def plot_causes(cells: list[dict], out: Path) -> Path:
    return save_figure(draw_causes(cells), Path(out) / "divergence_by_cause.png")


def plot_by_batch_size(cells: list[dict], out: Path) -> Path:
    return save_figure(draw_by_batch_size(cells), Path(out) / "divergence_by_batch_size.png")


def plot_margins(cells: list[dict], out: Path) -> Path:
    return save_figure(draw_margins(cells), Path(out) / "router_margins.png")


def plot_run(path: Path) -> list[Path]:
    """Every figure of FIGURES, drawn from the run (or sweep) directory's saved cells into it."""
    path = Path(path)
    cells = load_cells(path)
    return [plot(cells, path) for plot in (plot_heatmap, plot_causes, plot_by_batch_size, plot_margins)]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m detmoe.lab.plot RUN_OR_SWEEP_DIR")
    for p in plot_run(Path(sys.argv[1])):
        print(p)
