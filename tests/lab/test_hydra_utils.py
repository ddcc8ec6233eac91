"""run_cells keeps every finished cell: a rerun resumes and says how many it reused, a torn cell file is
named and its cell run again, a folder made with other settings is refused (the grid may change), and its
worker processes exit with the main process rather than go on saving cells."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from detmoe.lab.hydra_utils import CONFIG_DIR, SETTINGS_FILE, router_backend_grid, run_cells

REPO = Path(__file__).resolve().parents[2]


def config(*overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("rl_consistency", overrides=["router.names=[topk,capacity]", "kernels=torch", *overrides])


def counting_measure():
    calls = []

    def measure(model, point):
        calls.append(point["router"])
        return dict(value=len(calls))
    return measure, calls


def test_a_rerun_reuses_cells_runs_torn_ones_again_and_says_so(tmp_path, capsys):
    cfg = config()
    measure, calls = counting_measure()
    first = run_cells(cfg, tmp_path, router_backend_grid(cfg), measure, desc="cells")
    assert calls == ["topk", "capacity"] and (tmp_path / SETTINGS_FILE).exists()
    torn = tmp_path / "cells" / "capacity-torch.json"
    torn.write_text(torn.read_text()[:25])   # what a kill mid-write left before outputs were atomic
    with pytest.warns(RuntimeWarning, match=r"capacity-torch\.json is torn .*runs again"):
        again = run_cells(cfg, tmp_path, router_backend_grid(cfg), measure, desc="cells")
    assert calls == ["topk", "capacity", "capacity"]
    assert again[0] == first[0] and json.loads(torn.read_text())["value"] == 3
    assert "1 of 2 cells reused" in capsys.readouterr().out


def test_a_rerun_with_other_settings_is_refused_and_the_grid_may_change(tmp_path):
    cfg = config()
    measure, calls = counting_measure()
    run_cells(cfg, tmp_path, router_backend_grid(cfg), measure, desc="cells")
    saved = {p.name: p.read_text() for p in (tmp_path / "cells").iterdir()}
    with pytest.raises(ValueError, match=r"changed: rl.max_new_tokens: 12 -> 5\).*start a new folder"):
        run_cells(config("rl.max_new_tokens=5"), tmp_path, router_backend_grid(cfg), measure, desc="cells")
    assert {p.name: p.read_text() for p in (tmp_path / "cells").iterdir()} == saved and len(calls) == 2
    # a grid axis is not a setting: a new router runs beside the saved cells, which are reused
    wider = config("router.names=[topk,capacity,expert_choice]")
    cells = run_cells(wider, tmp_path, router_backend_grid(wider), measure, desc="cells")
    assert calls == ["topk", "capacity", "expert_choice"] and [c["value"] for c in cells] == [1, 2, 3]


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by whoever adopted it, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_workers_exit_with_a_killed_main_process_and_save_nothing_more(tmp_path):
    """kill -9 of a run with parallel cells: its joblib workers are gone within seconds, and no cell file
    appears after the kill (before, they ran on and saved the cells nobody waited for)."""
    seconds = 2.0
    script = textwrap.dedent("""
        import functools, pathlib, sys
        from hydra import compose, initialize_config_dir
        from detmoe.lab.hydra_utils import CONFIG_DIR, run_cells
        from tests.lab.fake_cells import slow_cell
        out, seconds = pathlib.Path(sys.argv[1]), float(sys.argv[2])
        with initialize_config_dir(CONFIG_DIR, version_base=None):
            cfg = compose("rl_consistency", overrides=["router=topk", "kernels=torch", "+jobs=2"])
        grid = [dict(router="topk", backend="torch", n=n) for n in range(12)]
        run_cells(cfg, out, grid, functools.partial(slow_cell, out=str(out), seconds=seconds), desc="slow cells")
    """)
    main = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(seconds)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    cells, started = tmp_path / "cells", tmp_path / "started"
    try:
        deadline = time.monotonic() + 180
        # mid-sweep: both workers running a cell, and at least one cell saved
        while not (started.is_dir() and len(list(started.iterdir())) >= 2 and cells.is_dir() and any(cells.iterdir())):
            assert main.poll() is None and time.monotonic() < deadline, "the sweep did not get going"
            time.sleep(0.1)
    finally:
        main.send_signal(signal.SIGKILL)
        main.wait()
    saved = sorted(p.name for p in cells.iterdir())
    workers = [int(p.name) for p in started.iterdir()]
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    still = [pid for pid in workers if alive(pid)]
    for pid in still:   # leave nothing running, whatever the assertion says
        os.kill(pid, signal.SIGKILL)
    assert not still, f"workers {still} outlived the killed main process"
    time.sleep(seconds + 0.5)   # a cell a surviving worker was running would have been saved by now
    assert sorted(p.name for p in cells.iterdir()) == saved
