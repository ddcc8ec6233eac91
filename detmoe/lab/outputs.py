"""Every result file the apps write (JSON, CSV, text, Markdown, figures, checkpoints) goes through
`atomic_path`: written to a temporary file in the same folder, then moved onto its name with os.replace.
A run killed mid-write leaves the previous file or the new one, never half of one beside a complete
results.json. The temporary file's name starts with a dot and ends in `.tmp`, so globs such as
`cells/*.json` never see one left behind by a kill.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import threading
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; moved onto `path` when the block ends, removed
    if it raises. A writer that reads the format from the suffix (savefig) must be given it explicitly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # same folder: os.replace is atomic only within one file system. Named by process and thread, not by
    # mkstemp, whose 0600 file would make every result unreadable to the rest of a group
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> Path:
    """`path` holding `text`, atomically (every process that calls it writes: see write_json for rank 0)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, newline="")   # as given: csv's own \r\n line ends stay as they are
    return Path(path)


def write_json(path: Path, obj) -> None:
    """(On rank 0 only, when several processes run the app.)"""
    from detmoe.lab.distributed import is_main   # torch.distributed: not at import (run_meta stays light)
    if is_main():
        write_text(path, json.dumps(obj, indent=2, default=float))


def csv_text(rows: list[dict]) -> str:
    """The CSV of `rows`: a header of every key in order of first appearance, a line per row."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_csv(path: Path, rows: list[dict]) -> None:
    """(On rank 0 only, as write_json; nothing for no rows.)"""
    from detmoe.lab.distributed import is_main
    if rows and is_main():
        write_text(path, csv_text(rows))


def write_summary(out: Path, lines: list[str]) -> str:
    """An app's closing lines, the ones a person reads first: joined, written to OUT/summary.txt (on rank 0
    only, as write_json) and returned."""
    from detmoe.lab.distributed import is_main
    text = "\n".join(lines)
    if is_main():
        write_text(Path(out) / "summary.txt", text + "\n")
    return text
