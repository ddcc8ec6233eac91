"""KV cache for ragged, continuously batched decoding.

Each sequence owns a slot; a slot holds its keys and values for every layer up to `max_len`
positions, its current length, and the router state that sequence_capacity carries across steps.
A serving engine assigns slots to requests and frees them when requests finish.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from detmoe.moe.config import ModelConfig
from detmoe.moe.routing import ChunkState


class KVCache:
    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: Optional[int] = None, *,
                 dtype: torch.dtype, device: torch.device | str, n_kv_heads: Optional[int] = None):
        """dtype and device of the keys and values: the model's (`model.new_cache`), which after a
        `.to()` cast are not cfg.dtype. n_kv_heads: the heads this rank holds (default all)."""
        if not _is_count(n_slots) or n_slots < 1:
            raise ValueError(f"n_slots must be an int >= 1, got {n_slots!r}")
        # None means the model's longest sequence; 0 is not None (it would be a cache of no positions)
        if max_len is not None and not (_is_count(max_len) and 1 <= max_len <= cfg.max_seq_len):
            raise ValueError(f"max_len must be None or an int in 1..max_seq_len={cfg.max_seq_len}, got {max_len!r}")
        self.max_len = cfg.max_seq_len if max_len is None else int(max_len)
        n_slots = int(n_slots)
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

    def check_fits(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, n_kv_heads: int) -> None:
        """Refuse a cache made for another model: its layers, heads, head size, experts, dtype or device."""
        want = (cfg.n_layers, self.n_slots, self.max_len, n_kv_heads, cfg.head_dim)
        if tuple(self.k.shape) != want or self.router_counts.shape[2] != cfg.moe.n_experts:
            raise ValueError(f"cache holds [layers, slots, positions, kv heads, head_dim] = {tuple(self.k.shape)} "
                             f"and {self.router_counts.shape[2]} experts; this model needs {want} and "
                             f"{cfg.moe.n_experts} experts (make it with model.new_cache)")
        if self.k.dtype != dtype or self.k.device != device:
            raise ValueError(f"cache is {self.k.dtype} on {self.k.device}; the model computes in {dtype} on "
                             f"{device} (make it with model.new_cache after moving the model)")

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


def _is_count(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
