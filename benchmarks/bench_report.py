"""bench_model's report: the batch_invariant / torch ratio of every cell and their geometric means, the
summary text, the CSV of every cell, and the plot of each cell's fraction of the roofline bound."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Sequence

from detmoe import kernels
from benchmarks.bench_steps import shape_of

BACKEND_NAMES = {"torch": "stock kernels (torch)", "batch_invariant": "batch-invariant kernels"}
GRAPH_NAMES = {"off": "eager", "on": "CUDA-graph decode (moe.DecodeGraphs)"}
CPU_GRAPH_NAMES = {"off": "eager", "on": "moe.DecodeGraphs' static-buffer step (eager on a CPU)"}
# a cell, graphs mode included: a ratio divides times of one key, so a CUDA-graph time is only ever
# compared with a CUDA-graph time and an eager time with an eager time
RATIO_KEY = ("preset", "mode", "batch", "seq_len", "context", "graphs")
CSV_FIELDS = ("preset", "mode", "batch", "seq_len", "context", "backend", "graphs", "status", "wall_ms", "gpu_ms",
              "tokens_per_s", "bytes", "flops", "experts_hit_per_layer", "hbm_bound_ms", "tc_bound_ms", "bound",
              "frac_of_bound", "frac_of_bound_gpu")


def ratios(rows: list[dict]) -> list[dict]:
    """batch_invariant / torch wall time of every cell (with its graphs mode) measured on both backends."""
    by_key = {(tuple(r[f] for f in RATIO_KEY), r["backend"]): r for r in rows if r["wall_ms"] is not None}
    out = []
    for (key, backend), r in by_key.items():
        stock = by_key.get((key, "torch"))
        if backend == "batch_invariant" and stock is not None:
            out.append(dict(zip(RATIO_KEY, key), torch_ms=stock["wall_ms"], invariant_ms=r["wall_ms"],
                            ratio=r["wall_ms"] / stock["wall_ms"], frac_torch=stock["frac_of_bound"],
                            frac_invariant=r["frac_of_bound"]))
    return out


def geomean(xs: Sequence[float]) -> Optional[float]:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summary_text(rows: list[dict], meta: dict) -> str:
    b = meta["bounds"]
    commit = f", commit {meta['git_commit']}" if meta.get("git_commit") else ""
    lines = [f"bench_model on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}{commit})",
             f"measured in this run: HBM {b['hbm_bytes_per_s'] / 1e9:.0f} GB/s, bf16 matmul "
             f"{b['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s ({b['how']})",
             "fraction of bound = bound time / wall time: decode against the HBM bound (bytes / bandwidth), "
             "prefill against the bf16 tensor-core bound (FLOPs / peak)", "",
             f"{'cell':34} {'graphs':6} {'torch ms':>9} {'inv ms':>9} {'inv/torch':>9} "
             f"{'torch frac':>10} {'inv frac':>9}"]
    rat = ratios(rows)
    for r in rat:
        lines.append(f"{shape_of(r).label:34} {r['graphs']:6} {r['torch_ms']:9.3f} {r['invariant_ms']:9.3f} "
                     f"{r['ratio']:9.3f} {100 * r['frac_torch']:9.1f}% {100 * r['frac_invariant']:8.1f}%")
    lines.append("")
    groups = (("all cells", lambda r: True),
              ("decode, eager", lambda r: r["mode"] == "decode" and r["graphs"] == "off"),
              ("decode, graphs", lambda r: r["mode"] == "decode" and r["graphs"] == "on"),
              ("prefill", lambda r: r["mode"] == "prefill"))
    for name, sel in ((name, [r for r in rat if keep(r)]) for name, keep in groups):
        g = geomean([r["ratio"] for r in sel])
        if g is not None:
            lines.append(f"geometric mean of batch_invariant / torch wall, {name}: {g:.3f} over {len(sel)} cells")
    for mode in ("decode", "prefill"):
        measured = [r for r in rows if r["mode"] == mode and r["frac_of_bound"] is not None]
        if measured:
            best = max(measured, key=lambda r: r["frac_of_bound"])
            worst = min(r["frac_of_bound"] for r in measured)
            lines.append(f"{mode}: fraction of the {best['bound']} bound from {100 * worst:.1f}% to "
                         f"{100 * best['frac_of_bound']:.1f}% (best: {shape_of(best).label}, {best['backend']}, "
                         f"graphs {best['graphs']})")
    missing = [r for r in rows if r["wall_ms"] is None]
    if missing:
        lines += ["", "not measured:"]
        lines += [f"  {shape_of(r).label:34} {r['backend']:16} "
                  f"graphs {r['graphs']:3} {r['status']}" for r in missing]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    b = meta["bounds"]
    common = dict(hbm_GBps=b["hbm_bytes_per_s"] / 1e9, bf16_TFLOPs=b["matmul_flops_per_s"] / 1e12,
                  device=meta["device"], torch=meta["torch"], triton=meta["triton"],
                  git_commit=meta.get("git_commit") or "")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*CSV_FIELDS, *common])
        w.writeheader()
        for r in rows:
            out = {k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS}
            out.update(common)
            w.writerow(out)


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """Fraction of the bound vs batch size: a row of panels per preset, a panel per decode context and
    one for prefill; colour = backend, line style = graphs on/off."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    contexts = sorted({r["context"] for r in rows if r["mode"] == "decode"})
    panels = [("decode", c) for c in contexts] + ([("prefill", 0)] if any(r["mode"] == "prefill" for r in rows) else [])
    fig, axes = plt.subplots(len(presets), len(panels), figsize=(5.2 * len(panels), 3.8 * len(presets)),
                             squeeze=False)
    colours = {"torch": "tab:red", "batch_invariant": "tab:blue"}
    graph_names = CPU_GRAPH_NAMES if meta["device"] == "cpu" else GRAPH_NAMES
    styles = {"off": dict(linestyle="--", marker="o"), "on": dict(linestyle="-", marker="s")}
    for i, preset in enumerate(presets):
        for j, (mode, context) in enumerate(panels):
            ax = axes[i][j]
            cells = [r for r in rows if r["preset"] == preset and r["mode"] == mode and r["context"] == context]
            for backend in kernels.BACKENDS:
                for graphs in ("off", "on"):
                    pts = sorted((r["batch"], r["frac_of_bound"]) for r in cells if r["backend"] == backend
                                 and r["graphs"] == graphs and r["frac_of_bound"] is not None)
                    if pts:
                        ax.plot(*zip(*pts), color=colours[backend], **styles[graphs],
                                label=f"{BACKEND_NAMES[backend]}, {graph_names[graphs]}")
            batches = sorted({r["batch"] for r in cells})
            ax.set_xscale("log", base=2)
            if batches:
                seq_len = {r["batch"]: r["seq_len"] for r in cells}
                ax.set_xticks(batches)
                ax.set_xticklabels([str(B) if mode == "decode" else f"{B}x{seq_len[B]}" for B in batches])
            ax.set_ylim(bottom=0)
            ax.set_xlabel("batch size (sequences)" if mode == "decode" else "prefill shape (sequences x tokens)")
            ax.set_ylabel("fraction of the bound (wall time)")
            ax.set_title(f"{preset}: decode, context {context} (HBM bound)" if mode == "decode"
                         else f"{preset}: prefill (bf16 tensor-core bound)", fontsize=10)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    b = meta["bounds"]
    fig.suptitle(f"{meta['device']}: wall time against the roofline; measured HBM {b['hbm_bytes_per_s'] / 1e9:.0f} "
                 f"GB/s (copy), bf16 matmul {b['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s (torch.mm)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
