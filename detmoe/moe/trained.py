"""The default model of the experiments: preset "trained" with the weights that detmoe/experiments/train.py
learned on the Python stdlib (detmoe/moe/checkpoints/trained.pt, ~4 MB fp32, shipped in the repo).

    model = load_trained_model(router="capacity", capacity_factor=1.0)

Routers have no parameters besides `w_router`, so one set of weights serves every router and its
options; dtype and device are free too (the weights are cast on load).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from detmoe.moe.config import ModelConfig
from detmoe.moe.model import MoETransformer

CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "trained.pt"
PRESET = "trained"


def load_checkpoint(path: Path = CHECKPOINT) -> dict:
    if not Path(path).exists():
        raise FileNotFoundError(f"no trained checkpoint at {path}; make one with "
                                "`python -m detmoe.experiments.train export=true`")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_trained_weights(model: MoETransformer, path: Path = CHECKPOINT) -> MoETransformer:
    """Copy the trained weights into `model` (any router/combine/dtype/device of the trained shapes)."""
    state = load_checkpoint(path)["state_dict"]
    own = model.state_dict()
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        raise ValueError(f"model must have the shapes of preset {PRESET!r} to take the trained weights")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])  # copy_ casts to the model's dtype and device
    return model


def load_trained_model(device: torch.device | str = "cpu", dtype: Optional[str] = None,
                       **moe_overrides) -> MoETransformer:
    """The trained default model; keyword arguments override MoEConfig fields (router, capacity_factor,
    combine, drop_order, group_size, min_capacity, renormalize), dtype the parameter dtype."""
    for field in ("n_experts", "top_k", "d_expert", "n_shared_experts"):
        if field in moe_overrides:
            raise ValueError(f"{field} is fixed by the trained weights; it cannot be overridden")
    saved = load_checkpoint()["model_config"]
    cfg = ModelConfig.from_name(PRESET, moe=moe_overrides, **({"dtype": dtype} if dtype else {}))
    shapes = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k not in ("dtype", "moe", "seed")}
    if shapes(cfg) != shapes(ModelConfig(**saved)):
        raise ValueError(f"preset {PRESET!r} no longer matches the checkpoint's config; retrain with "
                         "`python -m detmoe.experiments.train export=true`")
    return load_trained_weights(MoETransformer(cfg, device=device))
