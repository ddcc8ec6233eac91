"""The router registry: a router class registers itself here under its `name`, and every list of
routers is read from here (`moe.ROUTERS`, `router_from_config`, `MoEConfig`'s check of `router`, the
Hydra `router` group, the ablation's batch-invariant routers).

A router's options are its constructor's keyword parameters after `n_experts` and `top_k`, each with
its default: the signature is the one declaration, so nothing else has to be kept in step with it.

This module imports nothing of `moe`: `moe.config` reads it (lazily) and `moe.routers` fills it.
"""
from __future__ import annotations

import inspect
from typing import Any, TypeVar

R = TypeVar("R", bound=type)

_ROUTERS: dict[str, type] = {}   # name -> class, in registration order
_COMMON = ("n_experts", "top_k")  # every router's first two parameters, given by the caller


def register_router(cls: R) -> R:
    """Class decorator: make a router class buildable by its `name` (`build_router`, `MoEConfig.router`).

    The class takes `(n_experts, top_k, **options)`; every option needs a default, so a config that does
    not mention it still builds the router."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"router class {cls.__qualname__} must set `name` to an identifier, got {name!r}")
    if _ROUTERS.get(name, cls) is not cls:
        raise ValueError(f"router name {name!r} is already registered by {_ROUTERS[name].__qualname__}")
    params = list(inspect.signature(cls).parameters.values())
    if [p.name for p in params[:2]] != list(_COMMON):
        raise ValueError(f"router class {cls.__qualname__} must take (n_experts, top_k, **options), got "
                         f"{[p.name for p in params]}")
    for p in params[2:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            raise ValueError(f"router option {p.name!r} of {cls.__qualname__} must be a named parameter "
                             "with a default")
    _ROUTERS[name] = cls
    return cls


def router_names() -> tuple[str, ...]:
    """Every registered router's name, in registration order."""
    return tuple(_ROUTERS)


def router_class(name: str) -> type:
    if name not in _ROUTERS:
        raise ValueError(f"router must be one of {router_names()}, got {name!r}")
    return _ROUTERS[name]


def router_options(name: str) -> dict[str, Any]:
    """A router's options and their defaults, in its constructor's order."""
    params = list(inspect.signature(router_class(name)).parameters.values())
    return {p.name: p.default for p in params[len(_COMMON):]}
