"""Capacity-limited top-k, GShard (Lepikhin et al. 2020) / Switch (Fedus et al. 2021) style.

Each expert has ceil(capacity_factor * tokens * top_k / E) slots, where the group is the whole batch.
Assignments beyond an expert's slots are dropped (the token keeps its residual). Who keeps a slot,
`drop_order`:
- `"position"`: batch order, token by token (a token's second choice before the next token's first),
  as MegaBlocks and Tutel's position routing;
- `"choice"`: every token's first choice before any second choice, each in batch order, as GShard and
  DeepSpeed's top-2;
- `"score"`: higher router probability first, ties in batch order (Tutel's batch-prioritised routing).

Batch-dependent by design: another request in the batch can take a token's slot. Do not use it where
a request's output must not depend on its company (serving); it is here so experiments can show that.
"""
from __future__ import annotations

import torch

from detmoe.moe.routers.base import (Router, check_choice, check_int, check_positive, expert_capacity,
                              rank_in_queue)
from detmoe.moe.routers.registry import register_router
from detmoe.moe.routing import Routing

DROP_ORDERS = ("position", "choice", "score")


@register_router
class CapacityRouter(Router):
    name = "capacity"

    def __init__(self, n_experts: int, top_k: int, renormalize: bool = True,
                 capacity_factor: float = 1.25, drop_order: str = "position", min_capacity: int = 0):
        super().__init__(n_experts, top_k, renormalize)
        self.capacity_factor = check_positive("capacity_factor", capacity_factor)
        self.drop_order = check_choice("drop_order", drop_order, DROP_ORDERS)
        self.min_capacity = check_int("min_capacity", min_capacity, 0)

    def assign(self, probs, seq_ids, positions, state) -> Routing:
        T = probs.shape[0]
        experts, weights = self.top_k_choice(probs)                       # [T, k]
        slots = expert_capacity(self.capacity_factor, T, self.top_k, self.n_experts, self.min_capacity)
        flat = torch.arange(T * self.top_k, device=probs.device)          # token-major: t*k + j
        if self.drop_order == "score":
            # flat positions are already in batch order, so the stable sort breaks score ties by it
            priority = -probs.gather(1, experts).flatten()
        elif self.drop_order == "choice":
            priority = (flat % self.top_k) * T + flat // self.top_k        # choice j, then token t
        else:
            priority = flat
        rank = rank_in_queue(experts.flatten(), priority).view(T, self.top_k)
        dropped = rank >= slots
        return Routing(experts, weights.masked_fill(dropped, 0.0), dropped, probs)
