"""benchmarks/diagnose_hf.py on the CPU at a tiny shape: every cell compares, the files are written."""
import json

import pytest

pytest.importorskip("transformers")

from benchmarks import diagnose_hf  # noqa: E402


def test_the_script_runs_its_cells_and_writes_its_files(tmp_path):
    diagnose_hf.main(["--cpu-check", "--layers", "2", "--new-tokens", "3", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "diagnose_hf.json").read_text())
    cells = result["cells"]
    assert len(cells) == len(diagnose_hf.PATHS) * 2 * 2 + 1
    assert all(c["divergent"] == sum(c[k] for k in ("padding", "arithmetic", "amplified", "structural"))
               for c in cells)
    assert result["tiny"]["overhead_16x512"]["ratio"] > 0
    assert (tmp_path / "cells.csv").exists() and json.loads((tmp_path / "meta.json").read_text())["device"] == "cpu"
