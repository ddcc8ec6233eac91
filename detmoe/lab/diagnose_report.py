"""The report of a diagnosis run (detmoe/experiments/diagnose.py): report.md and the three figures it shows,
built only from the run's results.json, so any run folder can be redrawn without re-running it:

    python -m detmoe.lab.diagnose_report outputs/diagnose/<run>

- first_divergence_by_layer.png: where a divergent token's bits first differ, by decoder layer and cause.
- causes_by_batch_size.png: how much diverges, and why, by the size of the batch the probe ran in, one
  panel per call and padding side (a batch of 1, the probe alone again, in each).
- router_margins.png: how near a tie a routing choice was when it flipped (primary flips) against the
  choices that held, in the reference run.
The report: what was run (and which of transformers' own paths: attention, experts, dtype), the table by
batch size and padding, the causes explained, the first divergence of each cell, the figures.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from detmoe.diagnose.compare import CAUSES  # noqa: E402
from detmoe.lab.outputs import write_text  # noqa: E402
from detmoe.lab.plot import CAUSE_COLORS as ABLATION_COLORS  # noqa: E402
from detmoe.lab.plot import _panels, hist_margins, margin_bins, save_figure  # noqa: E402
from detmoe.lab.report import _table  # noqa: E402

FIGURES = ("first_divergence_by_layer.png", "causes_by_batch_size.png", "router_margins.png")
CAUSE_COLORS = {"padding": "#8172B3", **{k: v for k, v in ABLATION_COLORS.items() if k in CAUSES}}
CAUSE_TEXT = {
    "padding": "the batch's padding changed the token's inputs, not only the arithmetic: its position "
               "embedding (or an earlier token's) differs from the alone run's, positions counted from the "
               "padding. Fix: pass `position_ids=(mask.cumsum(-1) - 1).clamp(min=0)` to a padded forward, "
               "as generate does",
    "arithmetic": "every routing decision that can reach the token was identical; only the reduction order of "
                  "some kernel (a matmul, attention, the experts' grouped GEMM) differed at another batch size "
                  "or padding. Fix: batch-invariant kernels",
    "amplified": "a top-k routing choice flipped at a near tie: the kernels' drift crossed it and the token went "
                 "to other experts (its reference margin: the figure below). Removed with the arithmetic drift",
    "structural": "the token kept its own top-k choice but lost or gained an expert slot: another request took "
                  "it (a capacity-limited router). A property of the router, not of the kernels",
}
CAPTIONS = {
    "first_divergence_by_layer.png": "Where: every divergent probe token by the first decoder layer whose output "
                                     "for it differs bitwise, coloured by cause; `head` means no layer's output "
                                     "differed, only the final norm or the LM head's.",
    "causes_by_batch_size.png": "How much and why, by the size of the batch the probe ran in: the fraction of "
                                "compared probe tokens that diverge, split by cause. A batch of 1 runs the probe "
                                "alone again: above 0 only if the run itself is nondeterministic.",
    "router_margins.png": "How near a tie: the reference run's top-k margins (k-th minus (k+1)-th router "
                          "probability) of the choices that flipped with nothing different upstream (primary "
                          "flips) against those that held.",
}
MAX_CELL_ROWS = 200   # the report's per-cell table; cells.csv has every cell


def _cells_text(n: int) -> str:
    return f"{n} cell{'' if n == 1 else 's'}"


def _layer_label(layer) -> str:
    return "head" if layer is None else str(layer)


def draw_first_layers(cells: list[dict]) -> plt.Figure:
    """One panel per call: divergent tokens by their first differing decoder layer, stacked by cause."""
    calls = list(dict.fromkeys(c["call"] for c in cells))
    fig, axes = _panels(len(calls), 5.5, 3.2, sharex=False, sharey=False)
    every = [d for c in cells for d in c["divergences"]]
    layers = sorted({d["first_layer"] for d in every if d["first_layer"] is not None})
    labels = [str(x) for x in layers] + (["head"] if any(d["first_layer"] is None for d in every) else [])
    for ax, call in zip(axes, calls):
        mine = [d for c in cells if c["call"] == call for d in c["divergences"]]
        bottom = np.zeros(len(labels))
        for cause in CAUSES:
            v = np.array([sum(d["cause"] == cause and _layer_label(d["first_layer"]) == x for d in mine)
                          for x in labels], dtype=float)
            if v.any():
                ax.bar(range(len(labels)), v, bottom=bottom, color=CAUSE_COLORS[cause], label=cause)
            bottom += v
        if not mine:
            ax.text(0.5, 0.5, "no probe token diverged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("first decoder layer whose output for the token differs")
        ax.set_ylabel("divergent probe tokens")
        ax.set_title(f"{call}: {len(mine)} divergent tokens in {len(cells_of(cells, call))} cells", fontsize=10)
        if mine:
            ax.legend(fontsize=8, title="cause")
    fig.suptitle("Where a divergent token's bits first differ", fontsize=11)
    return fig


def cells_of(cells: list[dict], call: str) -> list[dict]:
    return [c for c in cells if c["call"] == call]


def draw_causes_by_batch_size(cells: list[dict]) -> plt.Figure:
    """One panel per call x padding side: per batch size, the fraction of compared tokens that diverge, stacked
    by cause. The batch of 1 (no padding) appears in each of its call's panels."""
    panels = list(dict.fromkeys((c["call"], c["padding_side"]) for c in cells if c["padding_side"] != "none"))
    panels = panels or list(dict.fromkeys((c["call"], "none") for c in cells))
    fig, axes = _panels(len(panels), 5.0, 3.0, sharex=False, sharey=True)
    for ax, (call, side) in zip(axes, panels):
        mine = [c for c in cells if c["call"] == call and c["padding_side"] in (side, "none")]
        sizes = sorted({c["batch_size"] for c in mine})
        tokens = np.array([sum(c["tokens"] for c in mine if c["batch_size"] == b) for b in sizes], dtype=float)
        bottom = np.zeros(len(sizes))
        for cause in CAUSES:
            n = np.array([sum(c["causes"][cause] for c in mine if c["batch_size"] == b) for b in sizes])
            v = n / np.maximum(tokens, 1)
            if v.any():
                ax.bar(range(len(sizes)), v, bottom=bottom, color=CAUSE_COLORS[cause], label=cause)
            bottom += v
        for x, (b, total) in enumerate(zip(sizes, tokens)):   # the count, so an empty bar reads as 0, not missing
            n = sum(c["divergent"] for c in mine if c["batch_size"] == b)
            ax.text(x, bottom[x] + 0.02, f"{n}/{int(total)}", ha="center", fontsize=7)
        ax.set_xticks(range(len(sizes)), [str(b) for b in sizes])
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("batch size the probe ran in")
        ax.set_ylabel("fraction of probe tokens\nthat diverge")
        ax.set_title(f"{call}, {side} padding" if side != "none" else call, fontsize=10)
        ax.tick_params(axis="y", labelleft=True)
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=len(handles), fontsize=8,
                   title="cause")
    fig.suptitle("How much of a probe diverges, and why, by the batch it ran in (labels: divergent / compared)",
                 fontsize=11)
    return fig


def draw_margins(cells: list[dict]) -> plt.Figure:
    """Reference margins of primary flips against those of the choices that held, each group summing to 1."""
    flipped = np.array([m for c in cells for m in c["flipped_margins"]])
    held = np.array([m for c in cells for m in c["unflipped_margins"]])
    lo, bins = margin_bins(np.concatenate([flipped, held]))
    fig, ax = plt.subplots(figsize=(6.5, 3.6), layout="constrained")
    hist_margins(ax, held, flipped, sum(c["cascade_flips"] for c in cells), lo, bins)
    ax.set_title("A routing choice flips only at a near tie: reference margins of primary flips\n"
                 "against the choices that held", fontsize=10)
    return fig


def plot_run(run: Path, cells: list[dict]) -> list[str]:
    """The figures into the run folder; their names."""
    for name, draw in zip(FIGURES, (draw_first_layers, draw_causes_by_batch_size, draw_margins)):
        save_figure(draw(cells), Path(run) / name)
    return list(FIGURES)


def group_totals(cells: list[dict]) -> list[dict]:
    """Per call, batch size and padding side: cells, those with a divergent token, tokens compared, divergent
    tokens (and by cause), cells whose greedy answer differs. Calls in the run's order."""
    groups: dict[tuple, dict] = {}
    for c in cells:
        g = groups.setdefault((c["call"], c["batch_size"], c["padding_side"]), dict(
            call=c["call"], batch_size=c["batch_size"], padding_side=c["padding_side"], cells=0, diverging_cells=0,
            tokens=0, divergent=0, greedy_differs=0, **dict.fromkeys(CAUSES, 0)))
        g["cells"] += 1
        g["diverging_cells"] += c["divergent"] > 0
        g["tokens"] += c["tokens"]
        g["divergent"] += c["divergent"]
        g["greedy_differs"] += bool(c["greedy_differs"])
        for k in CAUSES:
            g[k] += c["causes"][k]
    calls = list(dict.fromkeys(c["call"] for c in cells))
    return sorted(groups.values(), key=lambda g: (calls.index(g["call"]), g["batch_size"], g["padding_side"]))


def _group_rows(cells: list[dict]) -> list[list]:
    return [[g["call"], g["batch_size"], g["padding_side"], g["cells"], g["diverging_cells"], g["tokens"],
             g["divergent"], g["greedy_differs"], *(g[k] for k in CAUSES)] for g in group_totals(cells)]


def _cell_rows(cells: list[dict]) -> list[list]:
    rows = []
    for c in cells[:MAX_CELL_ROWS]:
        where = ("none diverge" if not c["divergent"] else
                 f"position {c['first_position']} (id {c['first_token']})")
        site = c["first_decided_at"]
        decided = "" if site is None else f"position {site[0]}, layer {site[1]}, margin {c['first_margin']:.2g}"
        greedy = ("" if not c["greedy_differs"] else
                  f"differs at {c['first_greedy_difference']}" if c["call"] == "generate" else
                  f"next token differs at {c['first_greedy_difference']}")
        rows.append([c["probe"], c["call"], c["batch_size"], c["padding_side"], c["probe_row"],
                     f"{c['divergent']}/{c['tokens']}", where, _layer_label(c["first_layer"]) if c["divergent"] else "",
                     f"`{c['first_module']}`" if c["first_module"] else "", c["first_cause"] or "", decided, greedy,
                     "next token read at a padding column" if c["read_at_padding"] else ""])
    return rows


def _first_modules(cells: list[dict]) -> list[list]:
    """Divergent tokens by their first differing module, its layer index replaced by `*`, most frequent first."""
    counts: dict[str, int] = {}
    for d in (d for c in cells for d in c["divergences"]):
        name = "(no decoder layer: final norm or head)" if d["first_layer"] is None else (
            "(the layer's output only)" if d["first_module"] is None else
            d["first_module"].replace(f".{d['first_layer']}.", ".*.", 1))
        counts[name] = counts.get(name, 0) + 1
    return [[f"`{k}`" if k[0] != "(" else k, n] for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]


def _answers(cells: list[dict]) -> list[list]:
    """The generate cells whose greedy completion differs: the alone answer and the batch's."""
    rows = []
    for c in cells:
        if c["call"] == "generate" and c["greedy_differs"]:
            show = lambda ids, text: repr(text) if text is not None else str(ids)   # text where a tokenizer was
            rows.append([c["probe"], c["batch_size"], c["padding_side"],
                         show(c["reference_completion"], c.get("reference_text")),
                         show(c["completion"], c.get("completion_text"))])
    return rows[:MAX_CELL_ROWS]


def render_report(results: dict, figures: list[str], title: str) -> str:
    """report.md's Markdown from a run's results.json contents and the figures present beside it."""
    m, cfg, cells = results["model"], results["config"], results["cells"]
    d = cfg["diagnose"]
    probes = results["probes"]
    lengths = sorted(len(p) for p in probes)
    source = ("`diagnose.probe_text`, through the folder's tokenizer" if d["probe_text"] is not None
              else f"random token ids (seed {cfg['seed']})")
    diverging = [c for c in cells if c["divergent"]]
    greedy = [c for c in cells if c["greedy_differs"]]
    causes = {k: sum(c["causes"][k] for c in cells) for k in CAUSES}
    lines = [f"# Diagnosis: {m['model_class']} ({title})", "",
             "Each probe ran alone (the reference) and inside batch compositions; a probe token *diverges* when "
             "its output (its logits, or where the run computed none, its last decoder layer's output) differs "
             "bitwise from the reference's. Each divergent token is traced to the first decoder layer and module "
             "where its bits differ and given one cause (detmoe/diagnose).", "", "## What was run", ""]
    lines += _table(["setting", "value"], [
        ["model", f"`{m['model']}`: {m['model_class']}"],
        ["structure", m["structure"]],
        ["attention (transformers' `attn_implementation`)", f"`{m['attn_implementation']}`"
         + (" (transformers' default)" if cfg["attn_implementation"] is None else " (set)")],
        ["experts (transformers' `experts_implementation`)", f"`{m['experts_implementation']}`"
         + (" (transformers' default)" if cfg["experts_implementation"] is None else " (set)")],
        ["dtype, device", f"{m['dtype']}, {m['device']}"],
        ["versions", f"transformers {m['transformers']}, torch {m['torch']}"],
        ["probes", f"{len(probes)}: {source}, {lengths[0]}-{lengths[-1]} tokens; {d['max_new_tokens']} new tokens "
                   "(greedy)"],
        ["batch compositions", f"batch sizes {', '.join(map(str, d['batch_sizes']))}, {d['per_size']} per size; "
                               f"co-requests of random tokens up to {d['co_max_len']}; padding "
                               f"{', '.join(d['padding_sides'])} (pad id {m['pad_token_id']})"],
        ["calls", ", ".join(d["calls"])],
    ])
    lines += ["", "## Verdict", "",
              f"- {len(diverging)} of {_cells_text(len(cells))} have a probe token whose bits differ from the probe "
              f"run alone; {sum(c['divergent'] for c in cells)} of {sum(c['tokens'] for c in cells)} probe tokens "
              "in all.",
              "- causes: " + ", ".join(f"{k} {n}" for k, n in causes.items()) + ".",
              f"- {_cells_text(len(greedy))} change a greedy answer (generate: the completion; forward: some "
              "position's next token)."]
    right = [c for c in cells if c["read_at_padding"]]
    if right:
        lines += [f"- in {_cells_text(len(right))} (right padding, generate) the probe's first new token was read "
                  "from a padding column's logits, not from its last token's: generate reads every row at the "
                  f"batch's last column. {sum(c['greedy_differs'] for c in right)} of them changed the answer. "
                  "transformers warns of this; pad on the left for generate."]
    lines += ["", "## By batch size and padding", "",
              "cells: runs of a probe in a composition; diverging: cells with a divergent probe token; tokens: "
              "probe tokens compared (prompt, then new tokens up to the first that differs); greedy: cells whose "
              "greedy completion (generate) or a greedy next token (forward) differs.", ""]
    lines += _table(["call", "batch size", "padding side", "cells", "diverging", "tokens", "divergent", "greedy",
                     *CAUSES], _group_rows(cells))
    lines += ["", "## The causes", ""] + [f"- **{k}**: {v}." for k, v in CAUSE_TEXT.items()]
    lines += ["", "## Where divergence starts", "",
              "Divergent tokens by the first module (in the order they ran) of their first differing layer:", ""]
    lines += _table(["module", "divergent tokens"], _first_modules(cells)) if diverging else ["No token diverged."]
    lines += ["", "## The first divergence of each cell", "",
              "Position: among the probe's compared tokens; decided at: the routing difference that decided an "
              "amplified or structural token (position, decoder layer, reference margin)."
              + (f" The first {MAX_CELL_ROWS} cells; cells.csv has all {len(cells)}." if len(cells) > MAX_CELL_ROWS
                 else ""), ""]
    lines += _table(["probe", "call", "batch", "padding side", "row", "divergent", "first", "layer", "module", "cause",
                     "decided at", "greedy", "note"], _cell_rows(cells))
    answers = _answers(cells)
    if answers:
        lines += ["", "## Answers that changed", "", "generate cells whose greedy completion differs.", ""]
        lines += _table(["probe", "batch", "padding side", "alone", "in the batch"], answers)
    lines += ["", "## Figures", ""]
    for name in figures:
        lines += [f"![{name.removesuffix('.png').replace('_', ' ')}]({name})", "", CAPTIONS[name], ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(run: Path) -> Path:
    """The figures and report.md into the run folder, from its results.json."""
    run = Path(run)
    source = run / "results.json"
    if not source.exists():
        raise ValueError(f"run must be a diagnosis run folder holding results.json, got {run}")
    results = json.loads(source.read_text())
    figures = plot_run(run, results["cells"])
    return write_text(run / "report.md", render_report(results, figures, run.name))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m detmoe.lab.diagnose_report RUN_DIR")
    print(write_report(Path(sys.argv[1])))
