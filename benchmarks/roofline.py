"""The roofline of one model step: the bytes it must move and the FLOPs it must do, the device's bounds
measured in the same run, and the fraction of the bound a measured time reaches.

"Must move" is the least traffic to HBM any implementation of the step needs, each tensor read or
written once: the weights of what the step uses (every dense weight; of the experts, only those some
token of the step was routed to), the embedding rows of its distinct tokens, the LM head, the KV cache
the sequences had before the step (read) and the step's own keys and values (written; reading them back
within the step could stay on chip). Activations are left out: at decode they are a few MB against GBs
of weights, and at prefill the bound that matters is the tensor cores'. So the bytes are a lower
bound, and the fraction of the HBM bound is an upper bound on how well a step uses the memory system.

FLOPs: 2 per weight a token meets in a matmul (attention projections, router, its experts' SwiGLU
(kept assignments only), shared experts, the LM head over every token: the model computes all T logit
rows), plus attention's QK^T and PV over the keys each query sees (causal): 4 x H x Dh per (query, key).
Norms, RoPE, softmax and the combine are left out (a few FLOPs per element).

The bounds are measured, never taken from a datasheet: HBM bandwidth from a large device-to-device copy
(bytes counted as read + write), the bf16 tensor-core peak from a large bf16 `torch.mm`.

Legend: D = d_model, L = layers, H = query heads, Hkv = key/value heads, Dh = head dim, V = vocab,
E = experts, F = d_expert, T = tokens in the step, B = sequences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from detmoe.moe.config import ModelConfig
from detmoe.moe.routing import Routing

GiB = 1 << 30


def experts_hit(routings: Sequence[Routing]) -> list[int]:
    """Per layer, how many distinct experts processed at least one token of the step (kept
    assignments only: a dropped assignment reads no weight)."""
    return [int(r.experts[r.kept].unique().numel()) for r in routings]


def assignments(routings: Sequence[Routing]) -> list[int]:
    """Per layer, the kept (token, expert) assignments: each runs one token through one expert."""
    return [int(r.kept.sum()) for r in routings]


@dataclass(frozen=True)
class StepCost:
    """What one step must move (bytes) and compute (FLOPs), by part."""
    expert_weights: int         # routed experts hit in the step, every layer
    shared_expert_weights: int
    attention_weights: int      # q/k/v/o projections (and their biases, q/k norms)
    router_weights: int
    norm_weights: int
    embedding_rows: int         # the rows of the step's distinct tokens
    lm_head: int
    kv_read: int                # the cache the sequences had before the step
    kv_write: int               # the step's own keys and values
    matmul_flops: int
    attention_flops: int        # QK^T and PV

    @property
    def bytes(self) -> int:
        return (self.expert_weights + self.shared_expert_weights + self.attention_weights
                + self.router_weights + self.norm_weights + self.embedding_rows + self.lm_head
                + self.kv_read + self.kv_write)

    @property
    def flops(self) -> int:
        return self.matmul_flops + self.attention_flops


def step_cost(cfg: ModelConfig, q_lens: Sequence[int], context_lens: Sequence[int], hit: Sequence[int],
              kept: Sequence[int], distinct_tokens: int, elt_bytes: int) -> StepCost:
    """The cost of a step of B sequences: sequence b brings q_lens[b] new tokens after context_lens[b]
    cached ones. hit / kept: per layer, the distinct experts and the kept assignments of the step's
    routing (`experts_hit`, `assignments`). elt_bytes: bytes per weight and cache element."""
    if len(q_lens) != len(context_lens) or len(q_lens) == 0:
        raise ValueError(f"q_lens and context_lens must be non-empty and of one length, got "
                         f"{len(q_lens)} and {len(context_lens)}")
    if len(hit) != cfg.n_layers or len(kept) != cfg.n_layers:
        raise ValueError(f"hit and kept must give one count per layer ({cfg.n_layers}), got "
                         f"{len(hit)} and {len(kept)}")
    D, L, H, Hkv, Dh, V = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size
    E, F, Fs = cfg.moe.n_experts, cfg.moe.d_expert, cfg.moe.n_shared_experts * cfg.moe.d_expert
    T = sum(q_lens)

    # weights each token meets in a matmul, per layer: the FLOPs' count, and the bytes of dense weights
    attn_mm = D * (H + 2 * Hkv) * Dh + H * Dh * D
    router_mm = D * E
    shared_mm = 3 * D * Fs + (D if Fs and cfg.moe.shared_expert_gate else 0)
    expert = 3 * D * F                                   # gate, up (fused) and down of one expert
    attn_extra = (H + 2 * Hkv) * Dh if cfg.qkv_bias else 0
    if cfg.qk_norm == "full":
        attn_extra += (H + Hkv) * Dh
    elif cfg.qk_norm == "head":
        attn_extra += 2 * Dh
    kv_per_token = L * 2 * Hkv * Dh                      # keys and values, every layer

    # causal: a sequence with c cached and q new tokens gives its queries c+1 .. c+q keys
    keys = sum(q * c + q * (q + 1) // 2 for q, c in zip(q_lens, context_lens))
    return StepCost(
        expert_weights=sum(hit) * expert * elt_bytes,
        shared_expert_weights=L * shared_mm * elt_bytes,
        attention_weights=L * (attn_mm + attn_extra) * elt_bytes,
        router_weights=L * router_mm * elt_bytes,
        norm_weights=(2 * L + 1) * D * elt_bytes,
        # tied: the LM head reads the whole table, rows included
        embedding_rows=0 if cfg.tie_embeddings else distinct_tokens * D * elt_bytes,
        lm_head=D * V * elt_bytes,
        kv_read=sum(context_lens) * kv_per_token * elt_bytes,
        kv_write=T * kv_per_token * elt_bytes,
        matmul_flops=2 * (T * (L * (attn_mm + router_mm + shared_mm) + D * V) + sum(kept) * expert),
        attention_flops=L * 4 * H * Dh * keys,
    )


@dataclass(frozen=True)
class DeviceBounds:
    """The device's measured limits, and how they were measured."""
    hbm_bytes_per_s: float
    matmul_flops_per_s: float
    how: str

    def hbm_ms(self, n_bytes: float) -> float:
        """The least time moving n_bytes takes at the measured bandwidth."""
        return n_bytes / self.hbm_bytes_per_s * 1e3

    def matmul_ms(self, flops: float) -> float:
        """The least time doing `flops` takes at the measured bf16 matmul peak."""
        return flops / self.matmul_flops_per_s * 1e3


def measure_device_bounds(device: torch.device | str, timer: Callable[[Callable[[], None]], float],
                          copy_bytes: int = 2 * GiB, mm_n: int = 8192) -> DeviceBounds:
    """HBM bandwidth: one copy of copy_bytes between two device buffers, 2 x copy_bytes moved (read +
    write). bf16 peak: torch.mm of two mm_n x mm_n bf16 matrices, 2 x mm_n^3 FLOPs. `timer(fn)` returns
    fn's time in ms (do_bench's median on a GPU)."""
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    del src, dst
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(mm_n, mm_n, generator=g, device=device).to(torch.bfloat16)
    b = torch.randn(mm_n, mm_n, generator=g, device=device).to(torch.bfloat16)
    mm_ms = timer(lambda: torch.mm(a, b))
    del a, b
    how = (f"HBM: copy of {copy_bytes / GiB:g} GiB device to device, read + write counted, median "
           f"{copy_ms:.4g} ms; bf16 peak: torch.mm {mm_n}^3 bf16, median {mm_ms:.4g} ms")
    return DeviceBounds(hbm_bytes_per_s=2 * copy_bytes / (copy_ms * 1e-3),
                        matmul_flops_per_s=2 * mm_n ** 3 / (mm_ms * 1e-3), how=how)


def fraction_of_bound(bound_ms: float, measured_ms: float) -> float:
    """How close a measured time comes to the bound's time: 1.0 is at the roofline."""
    if measured_ms <= 0:
        raise ValueError(f"measured_ms must be > 0, got {measured_ms}")
    return bound_ms / measured_ms
