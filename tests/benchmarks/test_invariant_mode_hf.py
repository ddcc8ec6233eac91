"""benchmarks/invariant_mode_hf.py on the CPU at a tiny shape: the proof cells and the distinct completions run
(inside the mode none diverges), the files are written."""
import csv
import json

import pytest

pytest.importorskip("transformers")

from benchmarks import invariant_mode_hf  # noqa: E402


def test_the_script_runs_its_parts_and_writes_its_files(tmp_path):
    invariant_mode_hf.main(["--cpu-check", "--layers", "2", "--parts", "proof", "distinct", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "invariant_mode_hf.json").read_text())
    cells = result["cells"]
    assert {(c["mode"], c["run"]) for c in cells} == {(m, r) for m in ("stock", "invariant")
                                                     for r in ("generate", "forward")}
    assert all(c["divergent"] == 0 for c in cells if c["mode"] == "invariant")
    assert result["distinct"]["tiny/invariant"] == 1
    with open(tmp_path / "distinct.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 3          # two modes, three runs each at --cpu-check
    assert json.loads((tmp_path / "meta.json").read_text())["device"] == "cpu"
