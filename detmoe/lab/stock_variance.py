"""Do the stock kernels vary with the batch on this device, at one model's shapes?

Each op of the `torch` backend computes one row (or one sequence's query) alone and inside batches of
the sizes an experiment uses; the number of distinct bit patterns of that row is its count of versions
(1: invariant). The ablation records these counts beside its cells, so that a claim about what stock
kernels do is judged only where the device shows them varying: at small shapes a GPU's cuBLAS and SDPA
may give the same bits at every batch size, while on this project's CPU fp32 attention varies from
2 sequences and fp32 matmul from 4 rows.

Legend: M = rows, D = d_model, H / Hkv = query / KV heads, Dh = head dim, E = experts, F = d_expert,
S = cache slots, L = cache length.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from detmoe import kernels
from detmoe.lab.op_variance import over_batch
from detmoe.moe import ModelConfig


def count_versions(row_of: Callable[[int], torch.Tensor], sizes: Iterable[int]) -> int:
    """Distinct bit patterns of `row_of(n)` over the sizes n (the per-op probes' count)."""
    return over_batch(row_of, list(sizes))[0]


def stock_kernel_versions(cfg: ModelConfig, dtype: str, device: str, batch_sizes: Iterable[int],
                          context: int = 32, seed: int = 0) -> dict[str, int]:
    """Versions of row 0 of each stock op at the model's shapes, `dtype` on `device`: matmul and
    grouped matmul over 1 to (largest batch x `context`) rows, norm and softmax likewise; attention of a
    sequence that prefills `context` tokens and decodes one more, alone and beside the other sequences
    of each batch size (each a decode or a short prefill of its own length). More than 1 anywhere: the
    stock kernels vary here."""
    sizes = sorted({1, *batch_sizes})
    if sizes[0] < 1:
        raise ValueError(f"batch_sizes must be >= 1, got {sorted(batch_sizes)}")
    rows = sorted({*sizes, *(b * context for b in sizes)})
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)

    D, H, Hkv, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    # every row goes to expert 0, so more experts would add weights and nothing to the measurement
    E, F = min(cfg.moe.n_experts, 8), cfg.moe.d_expert
    x = rand(rows[-1], D)                                            # [M, D]
    w = rand(D, H * Dh, scale=D ** -0.5)                             # a q projection
    w_experts = rand(E, D, F, scale=D ** -0.5)                       # experts' up projections
    norm_weight = rand(D)
    # row 0 in expert 0's group, which grows with the batch (every row goes to expert 0)
    group_offsets = lambda m: torch.full((E,), m, dtype=torch.int32, device=device)
    # attention: a probe sequence, last in the batch, prefills `context` tokens and decodes one more,
    # beside sequences of their own lengths, each sending 1 query (decode) or several (prefill)
    B = sizes[-1]
    k_cache, v_cache = rand(B, context + 1, Hkv, Dh), rand(B, context + 1, Hkv, Dh)   # [S, L, Hkv, Dh]
    q = rand(B * (context + 1), H, Dh)                                                # [Tq, H, Dh]
    kv_others = torch.randint(1, context + 2, (B - 1,), generator=gen)
    q_others = torch.minimum(kv_others, torch.randint(1, 4, (B - 1,), generator=gen))

    def attention_rows(b: int) -> torch.Tensor:
        outs = []
        for q_probe, kv_probe in ((context, context), (1, context + 1)):      # prefill, then decode
            q_lens = torch.cat([q_others[: b - 1], torch.tensor([q_probe])])
            kv_lens = torch.cat([kv_others[: b - 1], torch.tensor([kv_probe])])
            cu = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)])
            slots = torch.cat([torch.arange(1, b), torch.tensor([0])])    # the probe in slot 0
            out = kernels.attention(q[: int(cu[-1])], k_cache, v_cache, *(t.to(device=device, dtype=torch.int32)
                                    for t in (cu, kv_lens, slots)), Dh ** -0.5)
            outs.append(out[-q_probe:].flatten())
        return torch.cat(outs)

    with torch.no_grad(), kernels.use_backend("torch"):
        return {
            "matmul": count_versions(lambda m: kernels.matmul(x[:m], w)[0], rows),
            "grouped_matmul": count_versions(lambda m: kernels.grouped_matmul(x[:m], w_experts, group_offsets(m))[0], rows),
            "rms_norm": count_versions(lambda m: kernels.rms_norm(x[:m], norm_weight, cfg.norm_eps)[0], rows),
            "softmax": count_versions(lambda m: kernels.softmax(x[:m])[0], rows),
            "attention": count_versions(attention_rows, sizes),
        }
