"""A sweep's collection: every run's cells once each (a cell with its own probe count is a cell of its
own), the figures of a single run, and the device-dependent claims judged on the runs' merged
measurement of which stock kernels vary."""
import json

from detmoe.experiments.collect import collect
from detmoe.lab.plot import FIGURES
from tests.lab.fake_cells import factorial_cells


def _run(folder, cells, stock):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(dict(cells=cells, stock_kernel_versions=stock)))


def test_collect_merges_runs_cells_figures_and_stock_variance(tmp_path):
    cells = factorial_cells()
    fp32, bf16 = [c for c in cells if c["dtype"] == "float32"], [c for c in cells if c["dtype"] == "bfloat16"]
    _run(tmp_path / "router=topk", fp32[:4] + bf16, {"float32": {"matmul": 1}, "bfloat16": {"matmul": 1}})
    _run(tmp_path / "router=capacity", fp32[4:] + fp32[:1], {"float32": {"matmul": 3}})
    got = collect(tmp_path)
    assert len(got) == len(cells)                          # the repeated cell once; the 48-probe cell kept
    saved = json.loads((tmp_path / "collected.json").read_text())
    assert saved["stock_kernel_versions"] == {"float32": {"matmul": 3}, "bfloat16": {"matmul": 1}}
    assert set(saved["claim_verdicts"]) == set(saved["claims"])
    assert saved["claims"]["torch_backend_diverges_arithmetically_with_topk"] is True
    assert all((tmp_path / name).exists() for name in FIGURES)
    rows = (tmp_path / "collected.csv").read_text().splitlines()
    assert len(rows) == len(cells) + 1 and "probes" in rows[0]
