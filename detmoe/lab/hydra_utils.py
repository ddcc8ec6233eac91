"""Glue between Hydra configs and the library: build a model from the `model` and `router` groups,
run a grid of cells that survives interruption, find the run directory (and record the run there:
meta.json, detmoe/lab/run_meta.py), write JSON/CSV results (atomically: detmoe/lab/outputs.py).

Stopping a run: kill it however you like (Ctrl-C, kill, kill -9). Its worker processes (run_cells' parallel
cells, a Hydra joblib sweep's jobs) exit with it (`exit_with_parent`) and save nothing more; every
cell saved before is kept, and a rerun in the same folder (hydra.run.dir=<dir>) resumes from them.

The `router` group has no YAML files: it is generated from the router registry when this module is
imported (`register_router_group`), so a new router is selectable as `router=<name>` with no config edit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from detmoe import kernels
from detmoe.lab.distributed import is_main
from detmoe.lab.outputs import write_csv, write_json  # noqa: F401  (the apps' writers, from here too)
from detmoe.lab.run_meta import run_meta, write_meta
from detmoe.moe.trained import PRESET as TRAINED_PRESET, load_trained_weights
from detmoe.moe import ModelConfig, MoEConfig, MoETransformer, from_pretrained, pretrained_config
from detmoe.moe.parallel import Layout, shard_model
from detmoe.moe.routers import registry

# The Hydra YAML (detmoe/configs, shipped in the wheel). Absolute, so @hydra.main finds it however the
# app is started (python -m, a console script, from any directory, or imported by a launcher).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def router_group_options() -> dict:
    """The keys of every `router` group entry besides `names`: each registered router's options that are
    MoEConfig fields (an option without one cannot be set from a config), at MoEConfig's defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(MoEConfig) if f.default is not dataclasses.MISSING}
    used = {k for name in registry.router_names() for k in registry.router_options(name)}
    return {k: defaults[k] for k in sorted(used & set(defaults))}


def router_group() -> dict[str, dict]:
    """The Hydra `router` group's entries, from the registry: `router=<name>` for every registered router,
    and `router=all` (the batch-invariant routers first, then the batch-dependent ones, each in
    registration order). Each entry holds `names` and every router option (`router_group_options`)."""
    names = registry.router_names()
    if "all" in names:
        raise ValueError("a router must not be named 'all': `router=all` selects every router")
    options = router_group_options()
    invariant = [n for n in names if registry.router_class(n).batch_invariant]
    every = invariant + [n for n in names if n not in invariant]
    return {**{n: {"names": [n], **options} for n in names}, "all": {"names": every, **options}}


def register_router_group() -> None:
    """Put the `router` group into Hydra's config store. Runs on import; a router registered later needs a
    second call."""
    store = ConfigStore.instance()
    for name, node in router_group().items():
        store.store(group="router", name=name, node=node)


register_router_group()


def router_options(router: DictConfig) -> dict:
    """The router group's MoEConfig options (capacity_factor, drop_order, ...)."""
    return {k: router[k] for k in router_group_options() if k in router}


def model_config(model: DictConfig, router: DictConfig, router_name: str, combine: str = "ordered",
                 dtype: str | None = None) -> ModelConfig:
    """The model group's fields, with the router group's options and the chosen router/combine/dtype.
    Values reach the dataclasses as Hydra parsed them (`+model.tie_embeddings=no` is the string "no"):
    ModelConfig's own checks reject them, and `from_dict` an unknown field (`+model.tie_embedding=true`)."""
    kw = OmegaConf.to_container(model, resolve=True)
    kw.pop("preset", None)
    moe_kw = dict(kw.pop("moe", {}))
    moe_kw.update(router_options(router))
    moe_kw.update(router=router_name, combine=combine)
    if dtype is not None:
        kw["dtype"] = dtype
    return ModelConfig.from_dict({**kw, "moe": moe_kw})


def build_model(cfg: DictConfig, router: str, combine: str, dtype: str,
                layout: Optional[Layout] = None) -> MoETransformer:
    """One cell's model, with the weights every cell of a run shares: a local Hugging Face checkpoint
    (`pretrained=/path`), the shipped trained model (`model=trained`), or random ones from cfg.seed;
    with a layout, this rank's shard of it."""
    if cfg.get("pretrained"):
        return from_pretrained(cfg.pretrained, dtype=dtype, device=cfg.device, layout=layout, router=router,
                               combine=combine, **router_options(cfg.router))
    mcfg = dataclasses.replace(model_config(cfg.model, cfg.router, router, combine, dtype), seed=cfg.seed)
    if cfg.model.get("preset") == TRAINED_PRESET:
        model = load_trained_weights(MoETransformer(mcfg, device=cfg.device))
        return model if layout is None else shard_model(model, layout)
    return MoETransformer(mcfg, device=cfg.device, layout=layout)


def vocab_size(cfg: DictConfig) -> int:
    return pretrained_config(cfg.pretrained).vocab_size if cfg.get("pretrained") else cfg.model.vocab_size


def router_backend_grid(cfg: DictConfig) -> list[dict]:
    return [dict(router=r, backend=b) for r in cfg.router.names for b in cfg.kernels.backends]


def run_cells(cfg: DictConfig, out: Path, grid: list[dict], measure: Callable[[MoETransformer, dict], dict],
              desc: str, layout: Optional[Layout] = None) -> list[dict]:
    """For each grid point (router, backend and optionally combine, dtype; cfg's otherwise), build its
    model and record `measure(model, point)` under its backend. Each cell is saved as it finishes
    (cells/<name>.json), and a cell already saved in `out` (an interrupted run) is loaded instead of run
    again; how many were is printed. A folder whose cells were made with other settings is refused
    (`check_run_folder`); a torn cell file is named in a warning and its cell run again. With cfg.jobs > 1
    the cells run in that many worker processes, which exit if this process dies (`exit_with_parent`). Under a
    process group (torchrun, detmoe/lab/distributed.py) every rank runs every cell with its shard of the model
    (`layout`), none is skipped, and rank 0 writes."""
    path = lambda point: out / "cells" / (cell_name(point) + ".json")
    check_run_folder(cfg, out)
    fingerprint = config_fingerprint(cfg)
    write_json(out / SETTINGS_FILE, cell_settings(cfg))   # what check_run_folder compares a rerun with
    parent = os.getpid()
    if dist.is_initialized():  # several ranks run every cell together; rank 0 writes (detmoe/lab/distributed.py)
        return [_run_cell(cfg, p, measure, path(p), fingerprint, parent, layout=layout)
                for p in tqdm(grid, desc=desc, unit="cell", disable=not is_main())]
    done = [p for p in grid if read_cell(path(p)) is not None]   # check_run_folder: all of these settings
    if done:
        print(f"{out}: {len(done)} of {len(grid)} cells reused from an earlier run with these settings, "
              f"{len(grid) - len(done)} to run", flush=True)
    # slowest first (the interpreted Triton kernels on a CPU), so parallel workers finish together
    todo = sorted((p for p in grid if p not in done), key=lambda p: p["backend"] != "batch_invariant")
    jobs = min(int(cfg.get("jobs", 1)), len(todo))
    if jobs > 1:
        from joblib import Parallel, delayed
        threads = max(1, torch.get_num_threads() // jobs)
        run = Parallel(n_jobs=jobs, return_as="generator_unordered")(
            delayed(_run_cell)(cfg, p, measure, path(p), fingerprint, parent, threads) for p in todo)
        for _ in tqdm(run, total=len(todo), desc=desc, unit="cell"):
            pass
    else:
        for p in tqdm(todo, desc=desc, unit="cell"):
            _run_cell(cfg, p, measure, path(p), fingerprint, parent)
    return [json.loads(path(p).read_text()) for p in grid]


# The settings every cell of a run folder was made with (config_fingerprint hashes them).
SETTINGS_FILE = "cell_settings.json"


def read_cell(path: Path) -> Optional[dict]:
    """A saved cell, or None where there is none. A torn one (not JSON: written in place before outputs
    were atomic, or damaged since) is named in a warning and counts as missing, so its cell runs again."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        warnings.warn(f"{path} is torn (not JSON: {e}); its cell runs again", RuntimeWarning, stacklevel=2)
        return None


def check_run_folder(cfg: DictConfig, out: Path) -> None:
    """Refuse, with a ValueError before any work, a run folder holding cells made with other settings.

    Why refuse rather than keep both or recompute: a run folder is one experiment. Its .hydra/config.yaml,
    results.json, report and figures describe one set of settings, and readers of an unfinished run
    (plot.load_cells, experiments.collect) take every cells/*.json as that experiment's; cells of two
    settings side by side would be mixed there, and recomputing in place (as this did before) overwrote
    finished work. So a rerun in the same folder resumes, and may grow or shrink the grid (routers,
    backends, combines, dtypes, extra cells, layouts, graphs); a changed setting goes to a new folder."""
    cells = out / "cells"
    if not cells.is_dir():
        return
    fingerprint = config_fingerprint(cfg)
    with warnings.catch_warnings():   # a torn file is reported where its cell is run again
        warnings.simplefilter("ignore", RuntimeWarning)
        other = [p.name for p in sorted(cells.glob("*.json")) if (c := read_cell(p)) is not None
                 and c.get("config") != fingerprint]
    if not other:
        return
    saved = out / SETTINGS_FILE
    changed = ""
    if saved.exists():
        old, new = _flat(json.loads(saved.read_text())), _flat(cell_settings(cfg))
        diff = [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in sorted(old.keys() | new.keys())
                if old.get(k, "(unset)") != new.get(k, "(unset)")]
        changed = f" (changed: {'; '.join(diff)})" if diff else ""
    raise ValueError(
        f"{out} holds {len(other)} cell(s) made with other settings{changed}, e.g. cells/{other[0]}. A run in "
        f"the same folder resumes that run and keeps its cells; to run these settings, start a new folder "
        f"(leave out hydra.run.dir for a new dated one, or give another), or resume this one with its "
        f"settings ({saved.name} there)")


def _flat(tree: dict, prefix: str = "") -> dict:
    """{dotted.key: value} of a nested dict."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


_watching: Optional[int] = None
_watch_lock = threading.Lock()


def parent_gone() -> bool:
    """In a worker process (started by multiprocessing or joblib's loky): has the process that started it
    died? (Its orphans are adopted by another process, so the parent pid changes.)"""
    parent = multiprocessing.parent_process()
    return parent is not None and os.getppid() != parent.pid


def exit_with_parent() -> None:
    """In a worker process, exit as soon as the process that started it dies; nothing in any other process.

    Why: joblib's loky workers (run_cells' parallel cells, the jobs of a Hydra joblib sweep) outlive a
    main process killed with SIGKILL, and went on running and saving cells nobody waits for, beside the
    rerun a researcher starts. A daemon thread looks at the parent pid every 0.2 s (loky offers no such
    switch; Linux's PR_SET_PDEATHSIG would fire when the thread that spawned the worker ends, not the
    process), and `_run_cell` looks once more right before it saves."""
    global _watching
    parent = multiprocessing.parent_process()
    if parent is None:   # the process a user started: it lives on whatever becomes of its shell
        return
    with _watch_lock:
        if _watching == parent.pid:
            return
        _watching = parent.pid
    threading.Thread(target=_watch_parent, args=(parent.pid,), name="detmoe-exit-with-parent", daemon=True).start()


def _watch_parent(pid: int) -> None:
    while True:
        if os.getppid() != pid:
            _exit_orphan()
        time.sleep(0.2)


def _exit_orphan() -> None:
    print(f"detmoe worker {os.getpid()}: its parent process died; exiting without saving", file=sys.stderr,
          flush=True)
    os._exit(1)   # no cleanup: nothing of this worker's is wanted, and joblib's atexit would wait on the dead parent


def cell_name(point: dict) -> str:
    """A grid point's file name stem, its values in order: e.g. topk-torch-auto."""
    return "-".join(map(str, point.values()))


def cell_settings(cfg: DictConfig) -> dict:
    """Everything that shapes a cell's result except which cells the grid holds (its axes: routers,
    backends, combines, dtypes, extra cells, layouts, serve.graphs; each point names its own) and how
    many processes run them."""
    kw = OmegaConf.to_container(cfg, resolve=True)
    for key in ("combines", "dtypes", "jobs", "hydra", "extra_cells", "layouts"):
        kw.pop(key, None)
    kw.get("router", {}).pop("names", None)
    kw.get("kernels", {}).pop("backends", None)
    kw.get("serve", {}).pop("graphs", None)
    return kw


def config_fingerprint(cfg: DictConfig) -> str:
    """A hash of `cell_settings`, so a rerun resumes a folder only with the settings it was made with."""
    return hashlib.sha256(json.dumps(cell_settings(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_cell(cfg: DictConfig, point: dict, measure: Callable[[MoETransformer, dict], dict], path: Path,
              fingerprint: str, parent: int, threads: int | None = None, layout: Optional[Layout] = None) -> dict:
    if os.getpid() != parent:   # a worker process of run_cells (not a thread of its caller)
        exit_with_parent()
    if threads:
        torch.set_num_threads(threads)
    model = build_model(cfg, point["router"], point.get("combine", cfg.get("combine")),
                        point.get("dtype", cfg.get("dtype")), layout)
    with kernels.use_backend(point["backend"]):
        cell = {**point, **measure(model, point), "config": fingerprint}
    if parent_gone():   # the watchdog's 0.2 s would leave a cell finished meanwhile to be saved
        _exit_orphan()
    write_json(path, cell)
    return cell


def run_dir(cfg: Optional[DictConfig] = None) -> Path:
    """The Hydra run directory. Given the app's config, the run's meta.json is written there first (command,
    device, torch and triton versions, date, git commit: detmoe/lab/run_meta.py; rank 0 only)."""
    from hydra.core.hydra_config import HydraConfig
    exit_with_parent()   # a job of a Hydra joblib sweep runs in a worker process
    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg is not None:
        check_run_folder(cfg, out)   # before meta.json records a run that will not happen
        write_meta(out, run_meta(device=cfg.get("device")))
    return out


