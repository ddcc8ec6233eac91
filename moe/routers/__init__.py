"""Pluggable MoE routers, built by name with `build_router`."""
from __future__ import annotations

from moe.config import ROUTERS, MoEConfig
from moe.routers.base import Router, expert_capacity
from moe.routers.capacity import CapacityRouter
from moe.routers.expert_choice import ExpertChoiceRouter
from moe.routers.sequence_capacity import SequenceCapacityRouter
from moe.routers.topk import TopKRouter

ROUTER_CLASSES = {cls.name: cls for cls in
                  (TopKRouter, CapacityRouter, ExpertChoiceRouter, SequenceCapacityRouter)}
assert tuple(ROUTER_CLASSES) == ROUTERS


def build_router(name: str, **kw) -> Router:
    """A router by name (`topk`, `capacity`, `expert_choice`, `sequence_capacity`); keyword arguments
    go to its constructor (n_experts, top_k, and the router's own options)."""
    if name not in ROUTER_CLASSES:
        raise ValueError(f"router must be one of {ROUTERS}, got {name!r}")
    cls = ROUTER_CLASSES[name]
    try:
        return cls(**kw)
    except TypeError as e:
        raise ValueError(f"bad options for router {name!r}: {e}") from None


def router_from_config(cfg: MoEConfig) -> Router:
    common = dict(n_experts=cfg.n_experts, top_k=cfg.top_k)
    options = {
        "topk": dict(renormalize=cfg.renormalize),
        "capacity": dict(renormalize=cfg.renormalize, capacity_factor=cfg.capacity_factor,
                         drop_order=cfg.drop_order, min_capacity=cfg.min_capacity),
        "expert_choice": dict(capacity_factor=cfg.capacity_factor),
        "sequence_capacity": dict(renormalize=cfg.renormalize, capacity_factor=cfg.capacity_factor,
                                  group_size=cfg.group_size, min_capacity=cfg.min_capacity),
    }[cfg.router]
    return build_router(cfg.router, **common, **options)


__all__ = ["Router", "TopKRouter", "CapacityRouter", "ExpertChoiceRouter", "SequenceCapacityRouter",
           "build_router", "router_from_config", "expert_capacity"]
