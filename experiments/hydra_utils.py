"""Glue between Hydra configs and the library: build a ModelConfig from the `model` and `router`
groups, find the run directory, write JSON/CSV results."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from moe import ModelConfig

# absolute, so @hydra.main finds it however the app is started (python -m, or imported by a launcher)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")

ROUTER_OPTIONS = ("capacity_factor", "drop_order", "group_size", "min_capacity", "renormalize")


def model_config(model: DictConfig, router: DictConfig, router_name: str, combine: str = "ordered",
                 dtype: str | None = None) -> ModelConfig:
    """The model group's fields, with the router group's options and the chosen router/combine/dtype."""
    kw = OmegaConf.to_container(model, resolve=True)
    kw.pop("preset", None)
    moe_kw = dict(kw.pop("moe"))
    moe_kw.update({k: router[k] for k in ROUTER_OPTIONS if k in router})
    moe_kw.update(router=router_name, combine=combine)
    if dtype is not None:
        kw["dtype"] = dtype
    return ModelConfig(moe=moe_kw, **kw)


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig
    return Path(HydraConfig.get().runtime.output_dir)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)  # atomic: an interrupted run never leaves half a file


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
