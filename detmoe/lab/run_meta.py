"""What a result folder records about the run that made it: `meta.json` with the command, the device, the
torch and triton versions, the date and the git commit of the code.

    from detmoe.lab.run_meta import run_meta, write_meta
    write_meta(out, run_meta(command=..., device="cuda"))          # OUT/meta.json

    python -m detmoe.lab.run_meta OUT_DIR --command "bash benchmarks/gpu_checks.sh tests OUT_DIR"

The benchmark scripts (benchmarks/) and the Hydra apps (`detmoe.lab.hydra_utils.run_dir`) call it, so
every run records the same fields the same way; benchmarks/results_index.py builds
benchmarks/results/README.md from the meta.json files (there each result also needs a one-line
`shows`, written by hand when the result is kept).

The commit is the environment variable DETMOE_GIT_COMMIT when set (a copy of the tree on a GPU machine may
carry a stale .git of its own: whoever sends the copy knows its commit), else `git rev-parse HEAD` of the
checkout this package was imported from, with "-dirty" when a tracked file differs from it (untracked
files, such as the run's own outputs, do not count, as with `git describe --dirty`), else None (an
installed wheel).

Several runs into one folder (the GPU counts of a multi-GPU check, a shell script and the script it
calls) share one meta.json: `command` lists every run's command in order, the other fields are the
latest run's, and fields the file already had and the new record lacks (`shows`, notes) are kept.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch

GIT_COMMIT_ENV = "DETMOE_GIT_COMMIT"
META_FILE = "meta.json"
# the package's checkout: detmoe/lab/run_meta.py -> the directory holding detmoe/
SOURCE_ROOT = Path(__file__).resolve().parent.parent.parent


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def git_commit(repo: Optional[Path] = None) -> Optional[str]:
    """$DETMOE_GIT_COMMIT if set; else HEAD of `repo` (default: the checkout of this package), + "-dirty"
    when a tracked file differs from it. `repo` must be the top of a work tree: a package installed inside
    some other checkout (a venv there) is not taken for that checkout. Neither: None."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    root = Path(repo) if repo is not None else SOURCE_ROOT
    try:
        if Path(_git(root, "rev-parse", "--show-toplevel")).resolve() == root.resolve():
            head = _git(root, "rev-parse", "HEAD")
            dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
            return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):   # no git, not a work tree, no commit yet
        pass
    return None


def device_name(device: Any = None) -> str:
    """"cuda"/"cuda:N"/a torch.device: that GPU's name; "cpu": "cpu"; None: the GPU if there is one, else
    "cpu"; each "W x" before it in a launch of W processes (torchrun: "4 x NVIDIA H200"). Any other string
    (e.g. "2 and 4 x NVIDIA H200") as given."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = str(device)
    kind = name.split(":")[0]
    if kind not in ("cuda", "cpu"):
        return name
    if kind == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(name))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"{world} x {name}" if world > 1 else name


def default_command() -> str:
    """This process's command line, as typed from the repository root: `python -m module args`
    (`torchrun --nproc_per_node N -m module args` in a torchrun worker); the interpreter's own options
    are left out."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])[1:]
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-m", "-c"):
        i += 2 if argv[i] in ("-X", "-W", "-Q") else 1
    argv = argv[i:]
    if "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        launcher = ["torchrun", "--nproc_per_node", os.environ["LOCAL_WORLD_SIZE"]]
    else:
        launcher = ["python"]
    return shlex.join(launcher + argv)


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def run_meta(command: Optional[str] = None, device: Any = None, **extra: Any) -> dict[str, Any]:
    """{command, device, torch, triton, date (UTC, ISO 8601), git_commit}, then `extra`.
    command: default `default_command()`; device: see `device_name`."""
    meta: dict[str, Any] = dict(
        command=command or default_command(), device=device_name(device), torch=torch.__version__,
        triton=_triton_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit())
    meta.update(extra)
    return meta


def _commands(value: Any) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def write_meta(folder: Path | str, meta: dict[str, Any]) -> Optional[Path]:
    """Write `meta` to FOLDER/meta.json (on rank 0 only, when several processes run), merged with one
    already there (see the module docstring). Returns the path (None on other ranks)."""
    from detmoe.lab.distributed import is_main
    if not is_main():
        return None
    path = Path(folder) / META_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = json.loads(path.read_text())
        commands = _commands(old.get("command"))
        commands += [c for c in _commands(meta.get("command")) if c not in commands]
        meta = {**old, **meta, "command": commands[0] if len(commands) == 1 else commands}
        if old.get("shows"):
            meta["shows"] = old["shows"]
    from detmoe.lab.outputs import write_text
    return write_text(path, json.dumps(meta, indent=1) + "\n")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Write OUT_DIR/meta.json for a run started from a shell script.")
    ap.add_argument("out", type=Path, help="the result folder")
    ap.add_argument("--command", help="the command that makes the result (default: this one)")
    ap.add_argument("--device", help="cuda, cpu or a name (default: the GPU if there is one)")
    args = ap.parse_args(argv)
    path = write_meta(args.out, run_meta(args.command, args.device))
    if path is not None:
        print(path.read_text(), end="")


if __name__ == "__main__":
    main()
