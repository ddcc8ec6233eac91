"""KV cache for ragged, continuously batched decoding.

Each sequence owns a slot; a slot holds its keys and values for every layer up to `max_len`
positions, its current length, and the router state that sequence_capacity carries across steps.
A serving engine assigns slots to requests and frees them when requests finish.
"""
from __future__ import annotations

from typing import Optional

import torch

from detmoe.moe.config import ModelConfig
from detmoe.moe.routing import ChunkState


class KVCache:
    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: Optional[int] = None, *,
                 dtype: torch.dtype, device: torch.device | str, n_kv_heads: Optional[int] = None):
        """dtype and device of the keys and values: the model's (`model.new_cache`), which after a
        `.to()` cast are not cfg.dtype. n_kv_heads: the heads this rank holds (default all)."""
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self.max_len = max_len or cfg.max_seq_len
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        shape = (n_slots, self.max_len, n_kv_heads or cfg.n_kv_heads, cfg.head_dim)
        # one zeroed tensor per side, [layers, slots, positions, heads, head_dim]: two fills for a fresh
        # cache instead of one per layer and side. `k[layer]` is a view taken at each use, so that under
        # autograd (forward_train) each layer's in-place store is a plain write into the current tensor.
        self.k = torch.zeros((cfg.n_layers, *shape), dtype=dtype, device=device)
        self.v = torch.zeros((cfg.n_layers, *shape), dtype=dtype, device=device)
        self.lengths = torch.zeros(n_slots, dtype=torch.long, device=device)
        E = cfg.moe.n_experts
        self.router_counts = torch.zeros(cfg.n_layers, n_slots, E, dtype=torch.long, device=device)
        self.router_chunk = torch.full((cfg.n_layers, n_slots), -1, dtype=torch.long, device=device)

    @property
    def n_slots(self) -> int:
        return self.lengths.shape[0]

    def free(self, slot: int) -> None:
        """Forget a finished sequence so its slot can take a new one."""
        self.lengths[slot] = 0
        self.router_counts[:, slot] = 0
        self.router_chunk[:, slot] = -1

    def router_state(self, layer: int, slots: torch.Tensor) -> ChunkState:
        return ChunkState(self.router_counts[layer, slots], self.router_chunk[layer, slots])

    def set_router_state(self, layer: int, slots: torch.Tensor, state: ChunkState) -> None:
        self.router_counts[layer, slots] = state.counts
        self.router_chunk[layer, slots] = state.chunk
