"""One self-contained report of an ablation run: report.md in the run directory, beside the figures it
links (relative links, so the folder can be moved or zipped whole). It is built only from the saved
results (results.json; the figures of detmoe/lab/plot.py), so it can be rebuilt from any run directory:

    python -m detmoe.lab.report outputs/ablate/<run>

It shows the run's settings, the claims with their verdicts as the run judged them (detmoe/experiments/ablate.py
stores them; nothing is recomputed here), the attribution table, how often the stock kernels' drift
flipped a routing choice (per router and dtype), the stock kernels' variance on the run's device, and
the figures with one sentence each on how to read them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from detmoe.lab.attribution import CAUSES
from detmoe.lab.distributed import is_main
from detmoe.lab.outputs import write_text
from detmoe.lab.plot import FIGURES, setting_label

CAPTIONS = {
    "divergence_heatmap.png": "How often: the fraction of probe tokens whose logits differ bitwise from the "
                              "probe run alone, per router (rows) and setting (columns). 0 means batch-invariant.",
    "divergence_by_cause.png": "Why: each divergent token attributed to one cause, one panel per router; a "
                               "bar's length is the fraction above, its colours the causes.",
    "divergence_by_batch_size.png": "Where: divergence by the size of the batch the probe ran in. A batch of 1 "
                                    "repeats the reference's own schedule, so it is 0 unless something is "
                                    "nondeterministic.",
    "router_margins.png": "How near a tie a routing choice was when numeric drift alone flipped it (primary "
                          "flips, cause `amplified`), against the choices that held, per dtype, on the stock "
                          "kernels.",
}
CAUSE_TEXT = {
    "arithmetic": "all routing that can reach the token was identical; only the kernels' reduction order "
                  "differed",
    "structural": "at the first routing difference, the token kept its own top-k preference but lost or "
                  "gained an expert: another request took the slot (capacity limits, expert choice)",
    "amplified": "at the first routing difference, the token's own top-k choice flipped: numeric drift "
                 "crossed a near tie",
    "collective": "(layout axis) the same batch on one device gives the reference's bits; only the "
                  "cross-rank sums moved the token",
}


def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|")
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def _settings(cfg: dict) -> list[list]:
    exp, model = cfg["experiment"], cfg.get("model", {})
    moe = model.get("moe", {})
    model_text = (f"Hugging Face checkpoint {cfg['pretrained']}" if cfg.get("pretrained") else
                  f"preset {model.get('preset')}: d_model {model.get('d_model')}, {model.get('n_layers')} layers, "
                  f"{moe.get('n_experts')} experts, top-{moe.get('top_k')}")
    extra = [", ".join(f"{k} {v}" for k, v in e.items()) for e in cfg.get("extra_cells") or []]
    text = ("held-out Python stdlib text" if model.get("preset") == "trained" and not cfg.get("pretrained")
            else "random token ids")
    return [
        ["model", model_text],
        ["routers", ", ".join(cfg["router"]["names"])],
        ["kernels (backends)", ", ".join(cfg["kernels"]["backends"])],
        ["combines", ", ".join(cfg["combines"])],
        ["dtypes", ", ".join(cfg["dtypes"])],
        ["layouts", ", ".join(cfg.get("layouts", ["none"]))],
        ["cells beyond the factorial design", "; ".join(extra) or "none"],
        ["probes", f"{exp['n_probes']} per cell (unless a cell says otherwise), {text}, "
                   f"{exp['probe_min_len']}-{exp['probe_max_len']} tokens, {exp['max_new_tokens']} new tokens (greedy)"],
        ["batch compositions", f"batch sizes {', '.join(map(str, exp['batch_sizes']))}; {exp['per_size']} per size "
                               f"(prefill, mixed with decode, chunked prefill); co-requests up to {exp['co_max_len']} tokens"],
        ["device", cfg.get("device", "cpu")],
        ["seed", cfg.get("seed")],
    ]


def _claims(results: dict) -> list[list]:
    verdicts = results.get("claim_verdicts")
    if verdicts is None:  # a run from before verdicts were stored: its True/False/None as they were
        words = {True: "holds", False: "does not hold", None: "no cell to judge it by"}
        return [[name.replace("_", " "), f"**{words[v]}**", ""] for name, v in results["claims"].items()]
    return [[v["statement"], f"**{v['verdict']}**", v["evidence"]] for v in verdicts.values()]


def _cells(results: dict) -> list[list]:
    n_probes = results["config"]["experiment"]["n_probes"]
    rows = []
    for c in results["cells"]:
        divergent = sum(c["causes"].values())
        rows.append([c["router"], setting_label({k: v for k, v in c.items() if k != "n_probes"}),
                     c.get("probes", n_probes), c["tokens"], divergent, f"{c['frac_logits_differ']:.3f}",
                     f"{c['frac_completions_differ']:.3f}", *(c["causes"][k] for k in CAUSES)])
    return rows


def _drift(results: dict) -> list[list]:
    """Per router and dtype, over the stock-kernel cells: of the tokens the kernels' drift moved
    (arithmetic + amplified), how many flipped a routing choice (amplified), the reference margins of
    those primary flips, and where greedy completions first departed."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in results["cells"]:
        if c["backend"] == "torch" and c.get("layout", "none") == "none":
            groups.setdefault((c["router"], c["dtype"]), []).append(c)
    rows = []
    for (router, dtype), cells in groups.items():
        arith = sum(c["causes"]["arithmetic"] for c in cells)
        amp = sum(c["causes"]["amplified"] for c in cells)
        flips = sorted(m for c in cells for m in c.get("flipped_margins", []))
        firsts = sorted(f for c in cells for f in c.get("first_divergence", []))
        margins = (f"{len(flips)}: {flips[0]:.1e} .. {flips[-1]:.1e} (median {flips[len(flips) // 2]:.1e})"
                   if flips else "0")
        departed = (f"{len(firsts)}: at token {firsts[0]} .. {firsts[-1]} (median {firsts[len(firsts) // 2]})"
                    if firsts else "0")
        share = f"{amp / (arith + amp):.1%}" if arith + amp else "n/a"
        rows.append([router, dtype, arith, amp, share, margins, departed])
    return rows


def _stock(results: dict) -> list[str]:
    versions = results.get("stock_kernel_versions")
    if not versions:
        return ["Not measured in this run."]
    dtypes = list(versions)
    ops = list(dict.fromkeys(op for v in versions.values() for op in v))
    rows = [[op, *(("**varies**" if versions[dt][op] > 1 else "invariant") + f" ({versions[dt][op]})"
                   for dt in dtypes)] for op in ops]
    return (["Each stock (`torch` backend) op computed one row alone and inside batches of the run's sizes, at "
             "the model's shapes, on the run's device (detmoe/lab/stock_variance.py); in brackets, the number of "
             "distinct bit patterns of that row. Claims about stock kernels are judged only where one varies.", ""]
            + _table(["stock op", *dtypes], rows))


def render_report(results: dict, figures: list[str], title: str) -> str:
    """The report's Markdown from a run's results.json contents and the figure files present beside it."""
    lines = [f"# Variance ablation: {title}", "",
             "Each probe prompt ran alone (the reference) and inside batch compositions; a probe token "
             "*diverges* when its logits differ bitwise from the reference. Every divergent token is "
             "attributed to one cause (below).", "", "## Settings", ""]
    lines += _table(["setting", "value"], _settings(results["config"]))
    lines += ["", "## Claims", "", "What the design predicts, judged on this run's own cells.", ""]
    lines += _table(["claim", "verdict", "evidence"], _claims(results))
    lines += ["", "## Divergence by cell", "",
              "Tokens: probe tokens compared (prompt, then generated tokens up to the first that differs); "
              "logits / completions: fraction that differ; then divergent tokens by cause.", ""]
    lines += _table(["router", "setting", "probes", "tokens", "divergent", "logits", "completions", *CAUSES],
                    _cells(results))
    lines += ["", "Causes: " + "; ".join(f"**{k}**: {v}" for k, v in CAUSE_TEXT.items()) + ".", ""]
    drift = _drift(results)
    if drift:
        lines += ["## When drift flips a routing choice", "",
                  "Stock-kernel cells, per router and dtype: the tokens the kernels' reduction order moved "
                  "(arithmetic: the routing held; amplified: it flipped a near tie), the share amplified, "
                  "the reference router margins (k-th minus (k+1)-th probability) of the primary flips, and "
                  "where greedy completions first departed from the reference (index of the generated "
                  "token).", ""]
        lines += _table(["router", "dtype", "arithmetic", "amplified", "amplified share",
                         "primary flips: margins", "completions departed"], drift)
        lines += [""]
    lines += ["## Stock kernels on this device", ""] + _stock(results) + ["", "## Figures", ""]
    for name in figures:
        lines += [f"![{name.removesuffix('.png').replace('_', ' ')}]({name})", "", CAPTIONS.get(name, ""), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(run: Path) -> Path:
    """Write report.md into the run directory from its results.json and the figures present there."""
    run = Path(run)
    source = run / "results.json"
    if not source.exists():
        raise ValueError(f"run must be an ablation run directory holding results.json, got {run}")
    results = json.loads(source.read_text())
    figures = [f for f in FIGURES if (run / f).exists()]
    path = run / "report.md"
    if is_main():
        write_text(path, render_report(results, figures, run.name))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m detmoe.lab.report RUN_DIR")
    print(write_report(Path(sys.argv[1])))
