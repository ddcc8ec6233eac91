"""Glue between Hydra configs and the library: build a model from the `model` and `router` groups,
run a grid of cells that survives interruption, find the run directory (and record the run there:
meta.json, detmoe/lab/run_meta.py), write JSON/CSV results.

The `router` group has no YAML files: it is generated from the router registry when this module is
imported (`register_router_group`), so a new router is selectable as `router=<name>` with no config edit.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from detmoe import kernels
from detmoe.lab.distributed import is_main
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
    """The model group's fields, with the router group's options and the chosen router/combine/dtype."""
    kw = OmegaConf.to_container(model, resolve=True)
    kw.pop("preset", None)
    moe_kw = dict(kw.pop("moe"))
    moe_kw.update(router_options(router))
    moe_kw.update(router=router_name, combine=combine)
    if dtype is not None:
        kw["dtype"] = dtype
    return ModelConfig(moe=moe_kw, **kw)


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
    model and record `measure(model, point)` under its backend. Each cell is saved as it finishes, and a cell
    already saved in `out` with the same settings (an interrupted run) is loaded instead of run again;
    one saved with other settings is run again. With cfg.jobs > 1 the
    cells run in that many worker processes (the Triton interpreter is single-threaded). Under a
    process group (torchrun, detmoe/lab/distributed.py) every rank runs every cell with its shard of the model
    (`layout`), none is skipped, and rank 0 writes."""
    path = lambda point: out / "cells" / (cell_name(point) + ".json")
    fingerprint = config_fingerprint(cfg)
    if dist.is_initialized():  # several ranks run every cell together; rank 0 writes (detmoe/lab/distributed.py)
        return [_run_cell(cfg, p, measure, path(p), fingerprint, layout=layout)
                for p in tqdm(grid, desc=desc, unit="cell", disable=not is_main())]
    done = lambda point: path(point).exists() and json.loads(path(point).read_text()).get("config") == fingerprint
    # slowest first (the interpreted Triton kernels on a CPU), so parallel workers finish together
    todo = sorted((p for p in grid if not done(p)), key=lambda p: p["backend"] != "batch_invariant")
    jobs = min(int(cfg.get("jobs", 1)), len(todo))
    if jobs > 1:
        from joblib import Parallel, delayed
        threads = max(1, torch.get_num_threads() // jobs)
        run = Parallel(n_jobs=jobs, return_as="generator_unordered")(
            delayed(_run_cell)(cfg, p, measure, path(p), fingerprint, threads) for p in todo)
        for _ in tqdm(run, total=len(todo), desc=desc, unit="cell"):
            pass
    else:
        for p in tqdm(todo, desc=desc, unit="cell"):
            _run_cell(cfg, p, measure, path(p), fingerprint)
    return [json.loads(path(p).read_text()) for p in grid]


def cell_name(point: dict) -> str:
    """A grid point's file name stem, its values in order: e.g. topk-torch-auto."""
    return "-".join(map(str, point.values()))


def config_fingerprint(cfg: DictConfig) -> str:
    """A hash of everything that shapes a cell's result except which cells the grid holds, so a re-run
    reuses a saved cell only if it was made with the same settings."""
    kw = OmegaConf.to_container(cfg, resolve=True)
    for key in ("combines", "dtypes", "jobs", "hydra"):
        kw.pop(key, None)
    kw.get("router", {}).pop("names", None)
    kw.get("kernels", {}).pop("backends", None)
    return hashlib.sha256(json.dumps(kw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_cell(cfg: DictConfig, point: dict, measure: Callable[[MoETransformer, dict], dict], path: Path,
              fingerprint: str, threads: int | None = None, layout: Optional[Layout] = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    model = build_model(cfg, point["router"], point.get("combine", cfg.get("combine")),
                        point.get("dtype", cfg.get("dtype")), layout)
    with kernels.use_backend(point["backend"]):
        cell = {**point, **measure(model, point), "config": fingerprint}
    write_json(path, cell)
    return cell


def run_dir(cfg: Optional[DictConfig] = None) -> Path:
    """The Hydra run directory. Given the app's config, the run's meta.json is written there first (command,
    device, torch and triton versions, date, git commit: detmoe/lab/run_meta.py; rank 0 only)."""
    from hydra.core.hydra_config import HydraConfig
    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg is not None:
        write_meta(out, run_meta(device=cfg.get("device")))
    return out


def write_json(path: Path, obj) -> None:
    """(On rank 0 only, when several processes run the app.)"""
    if not is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)  # atomic: an interrupted run never leaves half a file


def write_csv(path: Path, rows: list[dict]) -> None:
    """(On rank 0 only, as write_json; nothing for no rows.)"""
    if not rows or not is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
