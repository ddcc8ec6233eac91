"""The MoE feed-forward layer: route, sort tokens by expert, run SwiGLU experts as grouped GEMMs,
combine each token's expert outputs, add optional shared experts.

Legend: T = tokens, D = d_model, E = experts, F = d_expert, S = expert slots per token,
A = kept assignments.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from moe.config import MoEConfig
from moe.routers import router_from_config
from moe.routing import ChunkState, Routing


class MoELayer(nn.Module):
    """`y, routing = layer(x, seq_ids)` for a ragged batch x [T, D] with seq_ids [T]."""

    def __init__(self, cfg: MoEConfig, d_model: int, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        E, Fd = cfg.n_experts, cfg.d_expert
        kw = dict(dtype=dtype)  # None: torch's default dtype, as for nn.Linear
        self.router = router_from_config(cfg)
        self.w_router = nn.Parameter(torch.empty(d_model, E, **kw))
        self.w_gate_up = nn.Parameter(torch.empty(E, d_model, 2 * Fd, **kw))  # gate and up projections, fused
        self.w_down = nn.Parameter(torch.empty(E, Fd, d_model, **kw))
        if cfg.n_shared_experts:
            Fs = cfg.n_shared_experts * Fd
            self.w_shared_gate_up = nn.Parameter(torch.empty(d_model, 2 * Fs, **kw))
            self.w_shared_down = nn.Parameter(torch.empty(Fs, d_model, **kw))
            if cfg.shared_expert_gate:
                self.w_shared_gate = nn.Parameter(torch.empty(d_model, 1, **kw))

    def forward(self, x: torch.Tensor, seq_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                state: Optional[ChunkState] = None) -> tuple[torch.Tensor, Routing]:
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x must have shape [tokens, d_model={self.d_model}], got {tuple(x.shape)}")
        if seq_ids.shape != (x.shape[0],):
            raise ValueError(f"seq_ids must have shape [tokens]={x.shape[0]}, got {tuple(seq_ids.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x must hold at least one token")
        if positions is None:
            positions = _positions_in_sequence(seq_ids)
        routing = self.router(kernels.matmul(x, self.w_router), seq_ids, positions, state)
        y = self._experts(x, routing)
        if self.cfg.n_shared_experts:
            y = y + self._shared(x)
        return y, routing

    def _experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        T, S = routing.experts.shape
        flat_experts = routing.experts.flatten()                                  # [T*S]
        if self.router.drops:
            kept = routing.kept.flatten().nonzero().squeeze(1)                    # token-major ids (a sync)
            order = kept[torch.argsort(flat_experts[kept], stable=True)]          # [A], sorted by expert
        else:  # dropless: every slot is kept, so the same order without nonzero's device sync
            order = torch.argsort(flat_experts, stable=True)                      # [T*S]
        # group ends: how many sorted assignments go to experts <= e, the cumsum of a bincount without
        # bincount's device sync
        ids = torch.arange(self.cfg.n_experts, device=order.device, dtype=flat_experts.dtype)
        offsets = torch.searchsorted(flat_experts[order], ids, right=True).to(torch.int32)  # [E]
        h = kernels.grouped_matmul(x[order // S], self.w_gate_up, offsets)       # [A, 2F]
        gate, up = h.chunk(2, dim=1)
        out = kernels.grouped_matmul(F.silu(gate) * up, self.w_down, offsets)     # [A, D]
        w = routing.weights.flatten()[order, None]
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 accumulate (fp64 stays fp64)
        if self.cfg.combine == "scatter_add":
            # what most MoE code does: atomic adds, order of arrival decides the rounding on GPU
            y = torch.zeros(T, self.d_model, dtype=acc, device=x.device)
            y.index_add_(0, order // S, out.to(acc) * w)
            return y.to(x.dtype)
        # ordered: put each output in its (token, slot) cell, then sum slots 0..S-1 in that order in fp32
        cells = torch.zeros(T * S, self.d_model, dtype=acc, device=x.device)
        cells[order] = out.to(acc) * w
        cells = cells.view(T, S, self.d_model)
        y = cells[:, 0]
        for j in range(1, S):
            y = y + cells[:, j]
        return y.to(x.dtype)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = kernels.matmul(x, self.w_shared_gate_up).chunk(2, dim=1)
        y = kernels.matmul(F.silu(gate) * up, self.w_shared_down)
        if self.cfg.shared_expert_gate:
            y = y * torch.sigmoid(kernels.matmul(x, self.w_shared_gate))
        return y


def _positions_in_sequence(seq_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its sequence, counting in batch order (for a layer used alone)."""
    _, dense = torch.unique(seq_ids, return_inverse=True)
    one_hot = F.one_hot(dense).long()
    return (torch.cumsum(one_hot, 0) - 1).gather(1, dense[:, None]).squeeze(1)
