"""RoPE self-attention with grouped KV heads over a ragged batch and a KV cache.

Legend: T = tokens in the step, D = d_model, H = query heads, Hkv = key/value heads, Dh = head dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from detmoe import kernels
from detmoe.moe.cache import KVCache
from detmoe.moe.config import ModelConfig
from detmoe.moe.parallel import Layout, mark_shard, row_parallel_matmul, size_of
from detmoe.moe.step import Step


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, 1, head_dim/2] of each token's rotation angles, fp32 (the same for every layer)."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angle = positions.float()[:, None] * inv_freq[None, :]                     # [T, Dh/2]
    return angle.cos()[:, None, :], angle.sin()[:, None, :]


class Attention(nn.Module):
    """With a layout, this rank's H/W query heads and Hkv/W key/value heads (Megatron-style tensor
    parallelism: wq/wk/wv split by columns, wo by rows, one cross-rank sum after wo)."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, layout: Optional[Layout] = None):
        super().__init__()
        self.cfg, self.layer, self.layout = cfg, layer, layout
        W = size_of(layout)
        self.n_heads, self.n_kv_heads = cfg.n_heads // W, cfg.n_kv_heads // W     # this rank's
        H, Hkv, Dh, D = self.n_heads, self.n_kv_heads, cfg.head_dim, cfg.d_model
        self.wq = nn.Parameter(torch.empty(D, H * Dh, dtype=dtype))
        self.wk = nn.Parameter(torch.empty(D, Hkv * Dh, dtype=dtype))
        self.wv = nn.Parameter(torch.empty(D, Hkv * Dh, dtype=dtype))
        self.wo = nn.Parameter(torch.empty(H * Dh, D, dtype=dtype))
        for name, dim in (("wq", 1), ("wk", 1), ("wv", 1), ("wo", 0)):
            mark_shard(self, name, layout, dim)
        if cfg.qkv_bias:  # Qwen2-MoE
            self.bq, self.bk, self.bv = (nn.Parameter(torch.empty(n * Dh, dtype=dtype)) for n in (H, Hkv, Hkv))
            for name in ("bq", "bk", "bv"):
                mark_shard(self, name, layout, dim=0)
        if cfg.qk_norm:   # OLMoE normalises the whole projection, Qwen3-MoE each head
            self.q_norm = nn.Parameter(torch.ones(H * Dh if cfg.qk_norm == "full" else Dh, dtype=dtype))
            self.k_norm = nn.Parameter(torch.ones(Hkv * Dh if cfg.qk_norm == "full" else Dh, dtype=dtype))

    def forward(self, x: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        cfg, T = self.cfg, x.shape[0]
        q, k, v = kernels.matmul_three(x, self.wq, self.wk, self.wv)   # one launch on batch_invariant
        if cfg.qkv_bias:
            q, k, v = q + self.bq, k + self.bk, v + self.bv
        if cfg.qk_norm == "full":
            q, k = kernels.rms_norm(q, self.q_norm, cfg.norm_eps), kernels.rms_norm(k, self.k_norm, cfg.norm_eps)
        q = q.view(T, self.n_heads, cfg.head_dim)
        k = k.view(T, self.n_kv_heads, cfg.head_dim)
        v = v.view(T, self.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q = kernels.rms_norm(q.reshape(-1, cfg.head_dim), self.q_norm, cfg.norm_eps).view_as(q)
            k = kernels.rms_norm(k.reshape(-1, cfg.head_dim), self.k_norm, cfg.norm_eps).view_as(k)
        cos, sin = step.cached(("rope", cfg.head_dim, cfg.rope_theta),
                               lambda: rope_tables(step.positions, cfg.head_dim, cfg.rope_theta))
        # q and k rotated, k and v stored in the cache (one kernel on batch_invariant: a captured decode
        # step is bound by its kernel count); each token's cache slot is the same for every layer
        token_slots = step.cached("token_slots", lambda: step.slots[step.seq_idx])
        q = kernels.rope_and_store(q, k, v, cos, sin, cache.k[self.layer], cache.v[self.layer], token_slots,
                                   step.positions)
        # the kernels take int32 offsets: converted once per step, not in every layer
        cu, kv_lens = step.cached("int32 lengths", lambda: (step.cu_seqlens.int(), step.kv_lens.int()))
        out = kernels.attention(q, cache.k[self.layer], cache.v[self.layer], cu, kv_lens, step.slots,
                                cfg.head_dim ** -0.5)                              # [T, H, Dh]
        # row-parallel: K (the heads) summed as a fixed tree of chunks, across ranks too (detmoe/moe/parallel.py)
        return row_parallel_matmul(out.reshape(T, self.n_heads * cfg.head_dim), self.wo, cfg.reduce_chunks,
                                   self.layout)

