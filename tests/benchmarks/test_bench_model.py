"""bench_model on the CPU (its numbers need a GPU): the prefill-shape syntax, a smoke run of the whole
benchmark on the tiny preset, --profile through the command line, and graph cells marked when
moe.DecodeGraphs is missing."""
import argparse
import csv
import json

import pytest

from detmoe import moe
from benchmarks.bench_model import bench_decode, main, parse_prefill_shape
from benchmarks.bench_steps import Shape, build_model
from benchmarks.bench_timing import Settings
from benchmarks.roofline import DeviceBounds


def test_prefill_shape_syntax():
    assert parse_prefill_shape("16x512") == (16, 512)
    for bad in ("16", "16x", "0x4", "ax4", "2x3x4"):
        with pytest.raises(argparse.ArgumentTypeError, match="BxL"):
            parse_prefill_shape(bad)


def test_smoke_run_on_the_tiny_preset(tmp_path):
    """The whole benchmark on the CPU: every cell, both backends, graphs on and off, the files; the
    accounting of decode at B=1 is checked by hand (tiny: top 2 of 8 experts, 2 layers, Hkv 2, Dh 16, fp32)."""
    main(["--device", "cpu", "--presets", "tiny", "--batch-sizes", "1", "2", "--contexts", "8",
          "--prefill-shapes", "1x8", "--rounds", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_model.json").read_text())
    rows, meta = data["rows"], data["meta"]
    assert meta["device"] == "cpu" and meta["bounds"]["hbm_bytes_per_s"] > 0 and meta["triton"]
    # 2 batch sizes x 2 backends x graphs off/on, then 1 prefill shape x 2 backends
    assert len(rows) == 10
    graphs_status = "ok" if hasattr(moe, "DecodeGraphs") else "graphs unavailable"
    for r in rows:
        assert r["status"] == (graphs_status if r["graphs"] == "on" else "ok"), r
        assert r["bytes"] > 0 and r["flops"] > 0
        if r["status"] == "ok":
            assert r["wall_ms"] > 0 and r["gpu_ms"] is None   # no GPU: no device busy time
            bound = r["hbm_bound_ms"] if r["mode"] == "decode" else r["tc_bound_ms"]
            assert r["frac_of_bound"] == pytest.approx(bound / r["wall_ms"])
            assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] / r["wall_ms"] * 1e3)
    b1 = [r for r in rows if r["mode"] == "decode" and r["batch"] == 1]
    for r in b1:
        assert r["experts_hit"] == [2, 2]                   # one token, top 2, dropless
        assert r["cost"]["kv_read"] == 8 * 2 * 2 * 2 * 16 * 4  # ctx 8 x layers x (k, v) x Hkv x Dh x 4 bytes
        assert r["cost"]["kv_write"] == 1 * 2 * 2 * 2 * 16 * 4
    prefill = [r for r in rows if r["mode"] == "prefill"]
    assert {(r["batch"], r["seq_len"], r["context"], r["graphs"]) for r in prefill} == {(1, 8, 0, "off")}
    assert all(r["cost"]["kv_read"] == 0 for r in prefill)
    # every ratio divides two times of one graphs mode, each the wall time of its own row
    wall = {(r["mode"], r["batch"], r["graphs"], r["backend"]): r["wall_ms"] for r in rows}
    assert len(data["ratios"]) == 5
    for q in data["ratios"]:
        assert q["torch_ms"] == wall[(q["mode"], q["batch"], q["graphs"], "torch")]
        assert q["invariant_ms"] == wall[(q["mode"], q["batch"], q["graphs"], "batch_invariant")]
    with open(tmp_path / "bench_model.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 10 and {"wall_ms", "gpu_ms", "frac_of_bound", "hbm_GBps", "bf16_TFLOPs", "device",
                                 "torch", "triton"} <= set(table[0])
    assert (tmp_path / "bench_model_summary.txt").read_text() == data["summary"]
    assert "geometric mean of batch_invariant / torch wall" in data["summary"]
    assert (tmp_path / "bench_model_roofline.png").stat().st_size > 0


def test_profile_option_writes_a_report_per_case(tmp_path, capsys):
    main(["--device", "cpu", "--profile", "tiny:prefill:1", "--prefill-len", "4", "--context", "4",
          "--out", str(tmp_path)])
    text = (tmp_path / "profile_tiny_prefill_B1.txt").read_text()
    assert text.startswith("tiny prefill B=1 (prefill_len=4, context=4) on cpu") and text in capsys.readouterr().out
    assert not (tmp_path / "bench_model.json").exists()   # profiling instead of the benchmark


def test_graph_cells_without_decode_graphs_are_marked_not_faked(monkeypatch):
    monkeypatch.delattr(moe, "DecodeGraphs", raising=False)
    model = build_model("tiny", 8, "cpu")
    bounds = DeviceBounds(hbm_bytes_per_s=1e9, matmul_flops_per_s=1e9, how="given")
    rows = bench_decode(model, Shape("tiny", "decode", 1, 1, 4), Settings(bounds, rounds=1, graph_modes=("on",)))
    assert [(r["backend"], r["status"]) for r in rows] == [("torch", "graphs unavailable"),
                                                           ("batch_invariant", "graphs unavailable")]
    assert all(r["wall_ms"] is None and r["frac_of_bound"] is None and r["bytes"] > 0 for r in rows)
