"""Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of the batch.

C = ceil(capacity_factor * tokens * top_k / E), at most the number of tokens. A token may be taken
by zero or many experts, so the routing record has one slot per expert (S = E), best-scored first,
with `dropped` marking the experts that did not take it. Weights are the token's router probability.

Batch-dependent by design, and in a decoder it also looks at future tokens of the same sequence
(allenai/OLMoE#46): not for autoregressive serving; here so experiments can show that.
"""
from __future__ import annotations

import torch

from detmoe.moe.routers.base import Router, check_positive, expert_capacity
from detmoe.moe.routers.registry import register_router
from detmoe.moe.routing import Routing


@register_router
class ExpertChoiceRouter(Router):
    name = "expert_choice"

    def __init__(self, n_experts: int, top_k: int, capacity_factor: float = 1.25):
        super().__init__(n_experts, top_k, renormalize=False)
        self.capacity_factor = check_positive("capacity_factor", capacity_factor)

    def assign(self, probs, seq_ids, positions, state) -> Routing:
        T, E = probs.shape
        C = min(expert_capacity(self.capacity_factor, T, self.top_k, E), T)
        # per expert, its top-C tokens; ties go to the earlier token
        chosen_tokens = torch.sort(probs, dim=0, descending=True, stable=True).indices[:C]  # [C, E]
        taken = torch.zeros_like(probs, dtype=torch.bool)
        taken.scatter_(0, chosen_tokens, True)                                            # [T, E]
        experts = torch.sort(probs, dim=1, descending=True, stable=True).indices          # [T, E]
        dropped = ~taken.gather(1, experts)
        weights = probs.gather(1, experts).masked_fill(dropped, 0.0)
        return Routing(experts, weights, dropped, probs)
