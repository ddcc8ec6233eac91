"""bench_report from hand-made rows: the backends paired cell by cell and graphs mode by graphs mode,
the geometric means per group in the summary, and the cells not measured listed."""
import math

import pytest

from benchmarks.bench_report import geomean, ratios, summary_text


def row(backend, graphs, ms, frac, batch=4, mode="decode"):
    return dict(preset="p", mode=mode, batch=batch, seq_len=1, context=8, backend=backend, graphs=graphs,
                wall_ms=ms, frac_of_bound=frac, bound="hbm", status="ok" if ms is not None else "failed: X")


def test_ratios_pair_the_backends_cell_by_cell():
    rows = [row("torch", "off", 2.0, 0.5), row("batch_invariant", "off", 3.0, 0.25),
            row("torch", "on", 1.0, 0.8), row("batch_invariant", "on", None, None)]
    assert ratios(rows) == [dict(preset="p", mode="decode", batch=4, seq_len=1, context=8, graphs="off",
                                 torch_ms=2.0, invariant_ms=3.0, ratio=1.5, frac_torch=0.5, frac_invariant=0.25)]
    assert geomean([2.0, 8.0]) == pytest.approx(4.0) and geomean([]) is None


def test_a_graph_time_is_never_divided_by_an_eager_time():
    # each backend measured in one graphs mode only: no pair, whichever way round
    rows = [row("torch", "on", 1.0, 0.8), row("batch_invariant", "off", 3.0, 0.3),
            row("torch", "off", 2.0, 0.5, batch=8), row("batch_invariant", "on", 1.5, 0.6, batch=8)]
    assert ratios(rows) == []


def test_summary_groups_eager_and_graph_ratios_apart():
    rows = [row("torch", "off", 2.0, 0.5), row("batch_invariant", "off", 4.0, 0.25),
            row("torch", "on", 1.0, 0.8), row("batch_invariant", "on", 1.5, 0.6),
            row("torch", "on", 1.0, 0.8, batch=16), row("batch_invariant", "on", None, None, batch=16)]
    meta = dict(device="cpu", torch="t", triton="tr",
                bounds=dict(hbm_bytes_per_s=2e9, matmul_flops_per_s=3e12, how="given"))
    text = summary_text(rows, meta)
    assert [(q["graphs"], q["ratio"]) for q in ratios(rows)] == [("off", 2.0), ("on", 1.5)]
    assert "decode, eager: 2.000 over 1 cells" in text and "decode, graphs: 1.500 over 1 cells" in text
    assert f"all cells: {math.sqrt(3.0):.3f} over 2 cells" in text and "wall, prefill" not in text
    assert "not measured:\n  p decode B=16 ctx=8" in text and "batch_invariant  graphs on  failed: X" in text
