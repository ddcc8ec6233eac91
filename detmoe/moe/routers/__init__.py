"""Pluggable MoE routers, built by name with `build_router` or from a `MoEConfig`.

How to add a router: write one file, e.g. `detmoe/moe/routers/my_router.py`:

    @register_router
    class MyRouter(Router):
        name = "my_router"          # what MoEConfig.router, build_router and `router=` in Hydra say
        batch_invariant = False     # True only if a token's route never depends on its batch
        def __init__(self, n_experts: int, top_k: int, renormalize: bool = True, capacity_factor: float = 1.25):
            super().__init__(n_experts, top_k, renormalize)           # checks n_experts, top_k, renormalize
            self.capacity_factor = check_positive("capacity_factor", capacity_factor)
        def assign(self, probs, seq_ids, positions, state) -> Routing: ...

and import it below (the import registers it). Its constructor's keyword parameters are its options:
`router_from_config` fills each from the MoEConfig field of the same name (an option with no such field
keeps its default; add the field to MoEConfig to configure it), `MoEConfig` checks its option fields by
building the registered routers from them, and the Hydra `router` group (detmoe/lab/hydra_utils.py) gets an
entry for it; `moe.ROUTERS` and the ablation's list of routers read the registry too. Check each
option in the constructor with `check_int` / `check_positive` / `check_choice` / `check_bool`
(detmoe/moe/routers/base.py), so a bad value is a ValueError naming it.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from detmoe.moe.routers.base import (Router, check_bool, check_choice, check_int, check_positive,
                              expert_capacity)
from detmoe.moe.routers.registry import register_router, router_class, router_names, router_options
# importing a router registers it; this order is the order of moe.ROUTERS
from detmoe.moe.routers.topk import TopKRouter
from detmoe.moe.routers.capacity import CapacityRouter
from detmoe.moe.routers.expert_choice import ExpertChoiceRouter
from detmoe.moe.routers.sequence_capacity import SequenceCapacityRouter

if TYPE_CHECKING:  # moe.config reads this package when it checks a config
    from detmoe.moe.config import MoEConfig


def build_router(name: str, **kw) -> Router:
    """A router by name (one of `moe.ROUTERS`: `topk`, `capacity`, `expert_choice`, `sequence_capacity`,
    and any other registered); keyword arguments go to its constructor (n_experts, top_k, and the
    router's own options, see `router_options(name)`)."""
    cls = router_class(name)
    allowed = ("n_experts", "top_k", *router_options(name))
    unknown = sorted(set(kw) - set(allowed))
    if unknown or "n_experts" not in kw or "top_k" not in kw:
        raise ValueError(f"router {name!r} takes n_experts, top_k and the options {allowed[2:]}, got "
                         f"{sorted(kw)}")
    return cls(**kw)


def router_from_config(cfg: MoEConfig, name: str | None = None) -> Router:
    """The router `cfg.router` (or the registered router `name`), each of its options taken from the
    MoEConfig field of that name."""
    name = cfg.router if name is None else name
    fields = {f.name for f in dataclasses.fields(cfg)}
    options = {k: getattr(cfg, k) for k in router_options(name) if k in fields}
    return build_router(name, n_experts=cfg.n_experts, top_k=cfg.top_k, **options)


__all__ = ["Router", "TopKRouter", "CapacityRouter", "ExpertChoiceRouter", "SequenceCapacityRouter",
           "build_router", "router_from_config", "expert_capacity", "register_router", "router_names",
           "router_class", "router_options", "check_int", "check_positive", "check_choice", "check_bool"]
