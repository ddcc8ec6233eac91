"""benchmarks/results/README.md, made from the result folders' meta.json files.

    python -m benchmarks.results_index            # rewrite benchmarks/results/README.md
    python -m benchmarks.results_index --check    # exit 1 when the README is stale or a result lacks its meta

A result is a folder under benchmarks/results/<section>/ holding a meta.json (detmoe/lab/run_meta.py writes
one for every benchmark run: command, device, torch and triton versions, date, git commit). `shows`, one
line on what the result shows, is added by hand when a result is kept here. The README has one table per
section (kernels, model_step, serving, ...): folder, what it shows, command, device, torch / triton, date,
commit.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

RESULTS = Path(__file__).resolve().parent / "results"
README = "README.md"
META = "meta.json"
REQUIRED = ("shows", "command", "device", "torch", "triton", "date", "git_commit")

# the sections in README order, each with its line; a section not listed here comes after them
SECTIONS = {
    "kernels": "One kernel at a time: the batch-invariant kernels against their stock peers, tile tuning, "
               "attention variants and schedules, the stock attention candidates, host launch cost.",
    "model_step": "One model step end to end: bench_model against the stock backend and the roofline, and "
                  "profiles of a step.",
    "serving": "Serving simulations (detmoe.experiments.serve_sim): the published experiment reproduced, and "
               "its variants.",
    "science": "What moves the bits: ablations of the three causes, stock-op variance probes, RL consistency.",
    "parallel": "Several GPUs: the same bits on 1, 2 and 4 GPUs, batch invariance under each layout, step "
                "times.",
    "fingerprints": "Fingerprints of the batch_invariant model's outputs, recorded on one GPU and checked on "
                    "another.",
    "gpu_tests": "The GPU test runs (the tests' `gpu` marker).",
}

HEADER = """\
# Measured results

Made by `python -m benchmarks.results_index` from each result folder's `meta.json`: edit those, not this
file (`python -m benchmarks.results_index --check` fails when this file is stale).

One folder per result, the latest of its kind; older runs are in git history (`git log --
benchmarks/results`). Commands run from the repository root; `DIR` stands for the output folder. The
benchmark scripts and the Hydra apps write `meta.json` themselves (`detmoe/lab/run_meta.py`: command,
device, torch and triton versions, date, git commit, `-dirty` when tracked files differed from it); a
result kept here also gets `shows`, one line on what it shows, and may get `notes`. Results made before
the scripts recorded their commit give the commit that added them and that commit's date (their
`git_commit_note`).
"""


def result_folders(root: Path) -> list[Path]:
    """Every folder under `root` holding a meta.json, relative to `root`, sorted."""
    return sorted(p.parent.relative_to(root) for p in root.rglob(META))


def load(root: Path, folder: Path) -> dict[str, Any]:
    return json.loads((root / folder / META).read_text())


def problems(root: Path = RESULTS) -> list[str]:
    """What keeps `root` from being an index of results: a result folder outside a section, a meta.json that
    is not JSON or lacks a required field, a file in no result folder."""
    out: list[str] = []
    folders = result_folders(root)
    for folder in folders:
        if len(folder.parts) < 2:
            out.append(f"{folder or '.'}/: a result folder must sit inside a section (<section>/<name>/)")
            continue
        try:
            meta = load(root, folder)
        except json.JSONDecodeError as e:
            out.append(f"{folder}/{META}: not JSON ({e})")
            continue
        missing = [k for k in REQUIRED if k not in meta]
        if missing:
            out.append(f"{folder}/{META}: missing {', '.join(missing)}")
        if not meta.get("shows"):
            out.append(f"{folder}/{META}: `shows` (one line on what the result shows) is empty")
    homes = {root / f for f in folders}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path == root / README:
            continue
        if not any(parent in homes for parent in path.parents):
            out.append(f"{path.relative_to(root)}: in no result folder (a folder with a {META})")
    return out


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
    text = " ".join(text.split())
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def _commands(value: Any) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _sentence(text: str) -> str:
    text = " ".join(str(text).split())
    return text if not text or text[-1] in ".!?" else text + "."


def _commit(value: Optional[str]) -> str:
    if not value:
        return "not recorded"
    head, dirty = (value[:-6], "-dirty") if value.endswith("-dirty") else (value, "")
    return f"`{head[:10]}{dirty}`"


def row(folder: Path, meta: dict[str, Any]) -> str:
    rel = Path(*folder.parts[1:]).as_posix()
    shows = _sentence(meta.get("shows", ""))
    if meta.get("notes"):
        shows += " " + _sentence(meta["notes"])
    cells = [f"[{rel}/]({folder.as_posix()}/)", _cell(shows),
             "; ".join(_code(c) for c in _commands(meta.get("command"))),
             _cell(meta.get("device") or ""),
             _cell(f"{meta.get('torch') or '-'} / {meta.get('triton') or '-'}"),
             _cell(str(meta.get("date") or "")[:10]), _commit(meta.get("git_commit"))]
    return "| " + " | ".join(cells) + " |"


def render(root: Path = RESULTS) -> str:
    """The README for the results under `root`."""
    by_section: dict[str, list[Path]] = {}
    for folder in result_folders(root):
        if len(folder.parts) >= 2:
            by_section.setdefault(folder.parts[0], []).append(folder)
    order = [s for s in SECTIONS if s in by_section] + sorted(s for s in by_section if s not in SECTIONS)
    lines = [HEADER, "Sections: " + ", ".join(f"[{s}](#{s})" for s in order) + ".", ""]
    for section in order:
        lines += [f"## {section}", ""]
        if section in SECTIONS:
            lines += [SECTIONS[section], ""]
        lines += ["| folder | what it shows | command | device | torch / triton | date | commit |",
                  "|---|---|---|---|---|---|---|"]
        lines += [row(folder, load(root, folder)) for folder in by_section[section]]
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=RESULTS, help=f"the results folder (default {RESULTS})")
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 if the README is stale or a result lacks its meta")
    args = ap.parse_args(argv)
    readme = args.root / README
    found = problems(args.root)
    for p in found:
        print(p, file=sys.stderr)
    try:
        text = render(args.root)
    except json.JSONDecodeError:
        return 1
    if args.check:
        stale = not readme.exists() or readme.read_text() != text
        if stale:
            print(f"{readme} is stale: run python -m benchmarks.results_index", file=sys.stderr)
        return 1 if stale or found else 0
    readme.write_text(text)
    print(f"wrote {readme} ({len(result_folders(args.root))} results)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
