"""The report shows a run's settings, its claims with the verdicts the run stored, every cell and the
figures beside it, from the saved files alone."""
import json
import subprocess
import sys

import pytest

from detmoe.experiments.ablate import judge_claims
from detmoe.lab.plot import FIGURES, plot_run
from detmoe.lab.report import write_report
from tests.lab.fake_cells import factorial_cells

CONFIG = dict(
    model=dict(preset="trained", d_model=128, n_layers=4, moe=dict(n_experts=8, top_k=2)),
    router=dict(names=["topk", "capacity"]), kernels=dict(backends=["torch", "batch_invariant"]),
    combines=["ordered", "scatter_add"], dtypes=["float32"], layouts=["none"],
    extra_cells=[dict(router="topk", backend="torch", combine="ordered", dtype="bfloat16", n_probes=48)],
    experiment=dict(n_probes=1, probe_min_len=4, probe_max_len=12, max_new_tokens=6, batch_sizes=[1, 4, 16],
                    per_size=1, co_max_len=12),
    device="cpu", seed=0)
STOCK = {"float32": {"matmul": 2, "attention": 4}, "bfloat16": {"matmul": 1, "attention": 3}}


def saved_run(tmp_path, stock=STOCK):
    cells = factorial_cells()
    verdicts = judge_claims(cells, stock)
    results = dict(config=CONFIG, claims={k: v["holds"] for k, v in verdicts.items()}, claim_verdicts=verdicts,
                   stock_kernel_versions=stock, cells=cells)
    (tmp_path / "results.json").write_text(json.dumps(results))
    plot_run(tmp_path)
    return results


def test_report_holds_settings_claims_cells_and_figures(tmp_path):
    results = saved_run(tmp_path)
    text = write_report(tmp_path).read_text()
    assert "| routers | topk, capacity |" in text
    assert "router topk, backend torch, combine ordered, dtype bfloat16, n_probes 48" in text
    for v in results["claim_verdicts"].values():   # the run's own verdicts, word for word
        assert f"| {v['statement']} | **{v['verdict']}** | {v['evidence']} |" in text
    assert "**holds** | 4 amplified tokens" in text
    assert "| topk | torch kernels, ordered combine, bfloat16 | 48 | 200 | 64 | 0.320 | 0.000 | 60 | 0 | 4 | 0 |" in text
    assert "| attention | **varies** (4) | **varies** (3) |" in text
    for name in FIGURES:   # relative links to the PNGs beside it
        assert f"]({name})" in text and (tmp_path / name).exists()


def test_report_rebuilds_from_the_command_line(tmp_path):
    saved_run(tmp_path)
    done = subprocess.run([sys.executable, "-m", "detmoe.lab.report", str(tmp_path)], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == str(tmp_path / "report.md")
    assert (tmp_path / "report.md").read_text().startswith(f"# Variance ablation: {tmp_path.name}")


def test_report_refuses_a_directory_without_results(tmp_path):
    with pytest.raises(ValueError, match="results.json"):
        write_report(tmp_path)


def test_report_says_how_often_drift_flips_a_routing_choice(tmp_path):
    """Per router and dtype over the stock cells: arithmetic and amplified tokens, the amplified share and
    the primary flips' margins, from the cells' own numbers."""
    saved_run(tmp_path)
    text = write_report(tmp_path).read_text()
    section = text.split("## When drift flips a routing choice")[1].split("## ")[0]
    # fake cells: topk float32 stock cells (ordered, scatter_add) 12 arithmetic each; bf16 cell 60 + 4
    assert "| topk | float32 | 24 | 0 | 0.0% | 0 |" in section
    assert "| topk | bfloat16 | 60 | 4 | 6.2% | 2: 1.0e-03 .. 1.3e-03 (median 1.3e-03) |" in section
    assert "| capacity | float32 | 24 | 0 | 0.0% |" in section
