"""The run record every benchmark and app writes (detmoe/lab/run_meta.py): the git commit of a fresh
repository, its dirty flag, the fallback where the code is no checkout, and meta.json across runs."""
import json
import random
import subprocess
import sys

import pytest
import torch

from detmoe.lab import run_meta as rm

FIELDS = ("command", "device", "torch", "triton", "date", "git_commit")


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, seed):
    """A fresh repository with one commit of a file of random lines."""
    rng = random.Random(seed)
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "code.py").write_text("\n".join(str(rng.random()) for _ in range(rng.randint(1, 20))) + "\n")
    git(root, "add", "code.py")
    git(root, "commit", "-q", "-m", "first")
    return root


def test_commit_of_a_fresh_repository_and_its_dirty_flag(repo, monkeypatch):
    monkeypatch.delenv(rm.GIT_COMMIT_ENV, raising=False)
    head = git(repo, "rev-parse", "HEAD")
    assert rm.git_commit(repo) == head
    (repo / "outputs.json").write_text("{}")                    # untracked: a run's outputs do not count
    assert rm.git_commit(repo) == head
    (repo / "code.py").write_text("changed\n")                  # a tracked change does
    assert rm.git_commit(repo) == head + "-dirty"
    git(repo, "commit", "-q", "-am", "second")
    second = git(repo, "rev-parse", "HEAD")
    assert second != head and rm.git_commit(repo) == second
    # a copy sent to a GPU machine may carry a stale .git: the commit its sender names comes first
    monkeypatch.setenv(rm.GIT_COMMIT_ENV, head)
    assert rm.git_commit(repo) == head


def test_no_checkout_takes_the_environments_commit_or_none(tmp_path, repo, monkeypatch):
    copy = tmp_path / "copy"                                    # a tree copied without .git
    copy.mkdir()
    (copy / "code.py").write_text((repo / "code.py").read_text())
    inside = repo / "sub"                                       # not the top of the work tree
    inside.mkdir()
    monkeypatch.delenv(rm.GIT_COMMIT_ENV, raising=False)
    assert rm.git_commit(copy) is None and rm.git_commit(inside) is None
    monkeypatch.setenv(rm.GIT_COMMIT_ENV, "abc123")
    assert rm.git_commit(copy) == "abc123" and rm.git_commit(inside) == "abc123"


def test_run_meta_fields(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    meta = rm.run_meta(command="python -m benchmarks.x --out DIR", device="cpu", extra=1)
    assert list(meta)[:len(FIELDS)] == list(FIELDS) and meta["extra"] == 1
    assert meta["command"] == "python -m benchmarks.x --out DIR" and meta["device"] == "cpu"
    assert meta["torch"] == torch.__version__
    assert meta["date"][:4].isdigit() and meta["date"].endswith("+00:00")
    # this checkout's commit (or the environment's, or None where the tests run from a copy)
    assert meta["git_commit"] == rm.git_commit()
    assert rm.device_name("4 x NVIDIA H200") == "4 x NVIDIA H200"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rm.device_name("cpu") == "2 x cpu"


def test_default_command(monkeypatch):
    argv = ["/usr/bin/python3", "-u", "-X", "dev", "-m", "benchmarks.parallel_check", "--out", "a b"]
    monkeypatch.setattr(sys, "orig_argv", argv)
    for key in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert rm.default_command() == "python -m benchmarks.parallel_check --out 'a b'"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert rm.default_command() == "torchrun --nproc_per_node 4 -m benchmarks.parallel_check --out 'a b'"


def test_runs_into_one_folder_share_its_meta(tmp_path, seed):
    """The second run's fields win, every run's command is kept in order, a hand-written `shows` stays."""
    rng = random.Random(seed)
    commands = [f"torchrun --nproc_per_node {w} -m benchmarks.parallel_check --out DIR" for w in (1, 2, 4)]
    first = rm.run_meta(command=commands[0], device="cpu")
    rm.write_meta(tmp_path, first)
    assert json.loads((tmp_path / "meta.json").read_text()) == first
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({"shows": "hand-written", **meta}))
    for c in commands[1:] + [commands[0]]:                          # the same command again adds nothing
        rm.write_meta(tmp_path, dict(rm.run_meta(command=c, device=f"{rng.randint(2, 8)} x cpu"), w=c[-20:]))
    merged = json.loads((tmp_path / "meta.json").read_text())
    assert merged["command"] == commands and merged["shows"] == "hand-written"
    assert merged["w"] == commands[0][-20:]


def test_command_line_writes_the_folder_meta(tmp_path):
    rm.main([str(tmp_path / "out"), "--command", "bash benchmarks/gpu_checks.sh tests OUT", "--device", "cpu"])
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert set(FIELDS) <= set(meta) and meta["command"] == "bash benchmarks/gpu_checks.sh tests OUT"
