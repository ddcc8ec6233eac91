"""Dropless per-token top-k (Mixtral, Qwen-MoE, OLMoE; MegaBlocks dMoE).

softmax -> top-k experts per token -> optionally renormalised weights. Nothing is dropped and a
token's route reads only its own logits, so routing is batch-invariant by design; the numbers that
reach the router are invariant only if the kernels are.
"""
from __future__ import annotations

import torch

from detmoe.moe.routers.base import Router
from detmoe.moe.routers.registry import register_router
from detmoe.moe.routing import Routing


@register_router
class TopKRouter(Router):
    name = "topk"
    drops = False
    batch_invariant = True

    def assign(self, probs, seq_ids, positions, state) -> Routing:
        experts, weights = self.top_k_choice(probs)
        return Routing(experts, weights, torch.zeros_like(experts, dtype=torch.bool), probs)
