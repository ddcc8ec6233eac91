"""bench_model on the CPU (its numbers need a GPU): the command-line syntax, a report per backend from
the profile option, a smoke run of the whole benchmark on the tiny preset, graph cells marked when
moe.DecodeGraphs is missing, failures recorded, and the backends paired cell by cell."""
import argparse
import csv
import json

import pytest
import torch

import moe
from benchmarks.bench_model import (Settings, Shape, bench_decode, build_model, geomean, main, measure, parse_case,
                                    parse_prefill_shape, profile_case, ratios)
from benchmarks.roofline import DeviceBounds


def test_case_syntax():
    assert parse_case("large:decode:256") == ("large", "decode", 256)
    for bad in ("large:decode", "large:train:4", "large:decode:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="PRESET:prefill"):
            parse_case(bad)


def test_profile_reports_both_backends(tmp_path):
    text = profile_case("tiny", "decode", 2, prefill_len=4, context=8, device="cpu", out=tmp_path,
                        iters=1, warmup=1, top=5)
    assert (tmp_path / "profile_tiny_decode_B2.txt").read_text() == text
    for backend in ("torch", "batch_invariant"):
        assert f"== {backend}" in text and (tmp_path / f"profile_tiny_decode_B2_{backend}.trace.json").exists()
    assert text.count("host wall per step") == 2 and text.count("host-sync events per step") == 2


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
    with open(tmp_path / "bench_model.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 10 and {"wall_ms", "gpu_ms", "frac_of_bound", "hbm_GBps", "bf16_TFLOPs", "device",
                                 "torch", "triton"} <= set(table[0])
    assert (tmp_path / "bench_model_summary.txt").read_text() == data["summary"]
    assert "geometric mean of batch_invariant / torch wall" in data["summary"]
    assert (tmp_path / "bench_model_roofline.png").stat().st_size > 0


def test_graph_cells_without_decode_graphs_are_marked_not_faked(monkeypatch):
    monkeypatch.delattr(moe, "DecodeGraphs", raising=False)
    model = build_model("tiny", 8, "cpu")
    bounds = DeviceBounds(hbm_bytes_per_s=1e9, matmul_flops_per_s=1e9, how="given")
    rows = bench_decode(model, Shape("tiny", "decode", 1, 1, 4), Settings(bounds, rounds=1, graph_modes=("on",)))
    assert [(r["backend"], r["status"]) for r in rows] == [("torch", "graphs unavailable"),
                                                           ("batch_invariant", "graphs unavailable")]
    assert all(r["wall_ms"] is None and r["frac_of_bound"] is None and r["bytes"] > 0 for r in rows)


def test_a_failing_variant_is_recorded_and_the_others_run():
    def broken():
        raise RuntimeError("CUDA out of memory.\nsecond line")
    status = {}
    settings = Settings(DeviceBounds(1.0, 1.0, "given"), rounds=2)
    timed = measure({("torch", "off"): lambda: None, ("torch", "on"): broken}, status, settings, torch.device("cpu"))
    assert status == {("torch", "on"): "failed: RuntimeError: CUDA out of memory."}
    assert list(timed) == [("torch", "off")] and len(timed[("torch", "off")][0]) == 2


def test_ratios_pair_the_backends_cell_by_cell():
    def row(backend, graphs, ms, frac):
        return dict(preset="p", mode="decode", batch=4, seq_len=1, context=8, backend=backend, graphs=graphs,
                    wall_ms=ms, frac_of_bound=frac)
    rows = [row("torch", "off", 2.0, 0.5), row("batch_invariant", "off", 3.0, 0.25),
            row("torch", "on", 1.0, 0.8), row("batch_invariant", "on", None, None)]
    assert ratios(rows) == [dict(preset="p", mode="decode", batch=4, seq_len=1, context=8, graphs="off",
                                 torch_ms=2.0, invariant_ms=3.0, ratio=1.5, frac_torch=0.5, frac_invariant=0.25)]
    assert geomean([2.0, 8.0]) == pytest.approx(4.0) and geomean([]) is None
