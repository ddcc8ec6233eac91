"""profile_step on the CPU: the case syntax and a report per backend."""
import argparse

import pytest

from benchmarks.profile_step import parse_case, profile_case


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
    assert text.count("top CPU ops by self time (no GPU in this run)") == 2
