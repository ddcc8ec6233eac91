"""Shared machinery of all routers: fp32 probabilities, top-k with ties broken by expert index, and
the rank of each assignment inside its expert's queue (for capacity limits).

A router subclass overrides one method, `assign(probs, seq_ids, positions, state)`, and checks its own
options in its constructor with the `check_*` helpers below (a ValueError naming the option and what is
allowed), so `build_router` and `MoEConfig` share one set of rules.
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any, Optional, Sequence

import torch

from detmoe import kernels
from detmoe.moe.routing import ChunkState, Routing


class Router:
    """Base class: `router(logits, seq_ids, positions, state) -> Routing`."""

    name = "base"
    drops = True      # may drop assignments (a capacity limit); False lets the MoE layer skip a device sync
    stateful = False  # reads and returns a per-sequence ChunkState carried across steps
    batch_invariant = False  # a token's route never depends on other requests in the batch (by design)

    def __init__(self, n_experts: int, top_k: int, renormalize: bool = True):
        self.n_experts = check_int("n_experts", n_experts, 1)
        self.top_k = check_int("top_k", top_k, 1, n_experts, hi_name="n_experts")
        self.renormalize = check_bool("renormalize", renormalize)

    def __call__(self, logits: torch.Tensor, seq_ids: torch.Tensor,
                 positions: Optional[torch.Tensor] = None, state: Optional[ChunkState] = None) -> Routing:
        if logits.dim() != 2 or logits.shape[1] != self.n_experts:
            raise ValueError(f"logits must have shape [tokens, n_experts={self.n_experts}], "
                             f"got {tuple(logits.shape)}")
        probs = kernels.softmax(logits)  # fp32, through the backend switch
        return self.assign(probs, seq_ids, positions, state)

    def assign(self, probs: torch.Tensor, seq_ids: torch.Tensor, positions: Optional[torch.Tensor],
               state: Optional[ChunkState]) -> Routing:
        raise NotImplementedError

    def top_k_choice(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts, best first; equal probabilities go to the lower expert index
        (the first k of a stable sort, so the tie rule holds on every backend and device)."""
        order, weights = kernels.top_k(probs, self.top_k)
        if self.renormalize:
            weights = weights / weights.sum(dim=1, keepdim=True)
        return order, weights


def check_int(name: str, value: Any, lo: int, hi: Optional[int] = None, hi_name: str = "") -> int:
    """`value` as an int in lo..hi (hi None: no upper bound), else a ValueError naming `name`."""
    # bool is an int subclass, but True experts is a typo, not a count
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi_name + '=' if hi_name else ''}{hi}"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return int(value)


def check_positive(name: str, value: Any) -> float:
    """`value` as a finite number > 0, else a ValueError naming `name`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def expert_capacity(capacity_factor: float, tokens: int, top_k: int, n_experts: int, min_capacity: int = 0) -> int:
    """GShard/Switch slots per expert: ceil(cf * tokens * top_k / E), at least min_capacity."""
    # exact rational arithmetic: 1.1 * 25 * 8 / 4 is 55.000000000000007 in floats, and ceil would add a slot
    return max(math.ceil(Fraction(str(capacity_factor)) * tokens * top_k / n_experts), min_capacity)


def rank_in_queue(experts: torch.Tensor, priority: torch.Tensor,
                  group: Optional[torch.Tensor | Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """For assignments (flat [A]) to `experts`, the 0-based rank of each in its expert's queue, ordered
    by ascending `priority` (ties: lower index first); with `group`, queues are per (group, expert).
    `group` may be several tensors, minor first: queues are then per (group[-1], ..., group[0], expert).
    Deterministic: successive stable sorts, no atomics, no device sync."""
    groups = [] if group is None else [group] if isinstance(group, torch.Tensor) else list(group)
    order = torch.argsort(priority, stable=True)
    order = order[torch.argsort(experts[order], stable=True)]
    for g in groups:
        order = order[torch.argsort(g[order], stable=True)]
    # a queue starts wherever the expert or any group label changes along the sorted order
    idx = torch.arange(order.numel(), device=order.device)
    starts = torch.zeros_like(order, dtype=torch.bool)
    starts[:1] = True
    for key in [experts] + groups:
        key = key[order]
        starts[1:] |= key[1:] != key[:-1]
    run_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
    rank = torch.empty_like(idx)
    rank[order] = idx - run_start
    return rank
