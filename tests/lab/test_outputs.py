"""Every output is written atomically (detmoe/lab/outputs.py): a writer killed or failing mid-write leaves the
file as it was, never half of it; no temporary file is left behind; and every writer of the apps and the lab
goes through it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from detmoe.lab.outputs import atomic_path, write_csv, write_json, write_text
from detmoe.lab.plot import plt, save_figure

DETMOE = Path(__file__).resolve().parents[2] / "detmoe"


def test_a_writer_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "cells.csv"
    write_text(path, "a,b\n1,2\n")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("a,b\n3,")      # half a file: then the process is stopped
            raise RuntimeError("killed")
    assert path.read_text() == "a,b\n1,2\n" and sorted(p.name for p in tmp_path.iterdir()) == ["cells.csv"]


def test_json_csv_text_and_figures_land_whole_with_the_usual_permissions(tmp_path):
    write_json(tmp_path / "r.json", {"x": 1.5})
    write_csv(tmp_path / "c.csv", [dict(a=1, b=2), dict(a=3, c=4)])
    write_text(tmp_path / "deep" / "report.md", "# r\n")
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    save_figure(fig, tmp_path / "f.png")
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1.5}
    assert (tmp_path / "c.csv").read_bytes() == b"a,b,c\r\n1,2,\r\n3,,4\r\n"   # as csv wrote it before
    assert (tmp_path / "deep" / "report.md").read_text() == "# r\n"
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = tmp_path / "plain"
    plain.write_text("")
    assert {(p.stat().st_mode & 0o777) for p in tmp_path.glob("*.*")} == {plain.stat().st_mode & 0o777}
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


WRITE = re.compile(r"\.(write_text|write_bytes|savefig)\(|torch\.save\(|open\([^)]*[\"'][wax]b?[\"']")


@pytest.mark.parametrize("folder", ["lab", "experiments"])
def test_every_writer_goes_through_atomic_path(folder):
    """A file written in place is what a kill mid-write tears: each write must be outputs.py's, or into the
    temporary path of an `atomic_path` block."""
    found = []
    for source in sorted((DETMOE / folder).rglob("*.py")):
        if source.name == "outputs.py":
            continue
        lines = source.read_text().splitlines()
        for i, line in enumerate(lines):
            if WRITE.search(line) and not any("with atomic_path(" in prev for prev in lines[max(0, i - 3):i]):
                found.append(f"{source.relative_to(DETMOE)}:{i + 1}: {line.strip()}")
    assert not found, "written in place:\n" + "\n".join(found)
