"""The stock path: PyTorch and vendor kernels (cuBLAS, torch._grouped_mm, FlexAttention or SDPA,
MKL/oneDNN on the CPU).

This is what an ordinary serving stack runs, batch-variance included; the ablation measures it against
the `batch_invariant` backend. Each op is written the way production code writes it (one batched call),
not rewritten to be invariant. On a GPU a decode step reads no value back to the host, so it can be
captured in a CUDA graph (detmoe/moe/graphs.py); prefill and mixed steps, which run eagerly, read the batch's
lengths back once per step for their attention (the "split" candidate, with its index check: two reads),
and autograd and fp64 take a syncing attention fallback. Index values are checked where they are host
tensors. Attention is detmoe/kernels/stock_attention.py: its docstring says which kernel runs and why.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from detmoe.kernels.checks import check_group_offsets, check_tree_leaves
from detmoe.kernels.stock_attention import stock_attention


class TorchBackend:
    name = "torch"
    ordered_collectives = False

    def matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, w)

    def matmul_widened(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, w).float()

    def matmul_three(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                     w3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # through self.matmul, so that a backend overriding matmul (tests/lab's rowwise) gets all three
        return self.matmul(x, w1), self.matmul(x, w2), self.matmul(x, w3)

    def grouped_matmul(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if not offsets.is_cuda:  # the values only on the host: on a GPU reading them is a sync per call
            check_group_offsets(offsets, w.shape[0], x.shape[0])
        # torch._grouped_mm wants 16-byte aligned strides (and, by torch version, some dtypes or GPUs);
        # where it can't run, a fallback that reads offsets only where they are host tensors
        try:
            return torch._grouped_mm(x, w, offs=offsets.to(torch.int32))
        except (RuntimeError, NotImplementedError):
            if offsets.is_cuda:
                return grouped_mm_masked(x, w, offsets)
            out = x.new_empty(x.shape[0], w.shape[2])
            start = 0
            for e, end in enumerate(offsets.tolist()):
                if end > start:
                    out[start:end] = torch.mm(x[start:end], w[e])
                start = end
            return out

    def grouped_swiglu(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                       rows: torch.Tensor | None = None, top_k: int = 1) -> torch.Tensor:
        return grouped_swiglu_torch(self.grouped_matmul, x, w, offsets, rows, top_k)

    # Partials for completeness (a stock layer all-reduces its rounded local product instead): each chunk
    # as the stock GEMM computes it, in fp32.
    def matmul_partials(self, x: torch.Tensor, w: torch.Tensor, chunks: int) -> torch.Tensor:
        return torch.stack([torch.mm(xc, wc).float() for xc, wc in zip(x.chunk(chunks, 1), w.chunk(chunks, 0))])

    def grouped_matmul_partials(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                                chunks: int) -> torch.Tensor:
        return torch.stack([self.grouped_matmul(xc.contiguous(), wc.contiguous(), offsets).float()
                            for xc, wc in zip(x.chunk(chunks, 1), w.chunk(chunks, 1))])

    def matmul_chunk_sum(self, x: torch.Tensor, w: torch.Tensor, chunks: int, dtype: torch.dtype) -> torch.Tensor:
        return tree_sum_torch(self.matmul_partials(x, w, chunks), dtype)

    def grouped_matmul_chunk_sum(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, chunks: int,
                                 dtype: torch.dtype) -> torch.Tensor:
        return tree_sum_torch(self.grouped_matmul_partials(x, w, offsets, chunks), dtype)

    def swiglu(self, h: torch.Tensor) -> torch.Tensor:
        return swiglu_torch(h)

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + residual
        return h, self.rms_norm(h, weight, eps)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.float(), dim=-1)

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x.float(), dim=-1)

    def ordered_combine(self, out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
        return ordered_combine_torch(out, order, weights, dtype)

    def expert_sort(self, flat_experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        return expert_sort_torch(flat_experts, n_experts)

    def tree_sum(self, partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return tree_sum_torch(partials, dtype)

    def top_k(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return top_k_torch(x, k)

    def rope_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, token_slots: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
        return rope_and_store_torch(q, k, v, cos, sin, k_cache, v_cache, token_slots, positions)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor,
                  scale: float) -> torch.Tensor:
        return stock_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, slots, scale)


def ordered_combine_torch(out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """`Backend.ordered_combine` in stock ops: put each weighted output in its (token, slot) cell of a
    zeroed grid, then sum the slot columns 0..S-1 in that order (about S + 5 kernels)."""
    T, S = weights.shape
    acc = torch.promote_types(dtype, torch.float32)  # fp32 accumulate (fp64 stays fp64)
    cells = torch.zeros(T * S, out.shape[1], dtype=acc, device=out.device)
    cells[order] = out.to(acc) * weights.flatten()[order, None]
    cells = cells.view(T, S, out.shape[1])
    y = cells[:, 0]  # not 0 + cells[:, 0], which would turn a -0.0 into +0.0
    for j in range(1, S):
        y = y + cells[:, j]
    return y.to(dtype)


def grouped_mm_masked(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`grouped_matmul` with no data-dependent shape (so no host sync): every group's GEMM over all rows,
    each row kept from its own group. E times the work of the grouped GEMM: only where torch._grouped_mm
    cannot run on a GPU (odd sizes or dtypes)."""
    T, E = x.shape[0], w.shape[0]
    group = torch.searchsorted(offsets.long(), torch.arange(T, device=x.device), right=True)   # [T]
    out = x.new_zeros(T, w.shape[2])
    for e in range(E):
        out = torch.where((group == e)[:, None], torch.mm(x, w[e]), out)
    return out


def expert_sort_torch(flat_experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock form: (order [N] int64, the assignments stably sorted by expert; offsets [E] int32, each
    expert's group end in that order), by argsort and searchsorted (no host sync)."""
    order = torch.argsort(flat_experts, stable=True)
    ids = torch.arange(n_experts, device=order.device, dtype=flat_experts.dtype)
    offsets = torch.searchsorted(flat_experts[order], ids, right=True).to(torch.int32)
    return order, offsets


def grouped_swiglu_torch(grouped_matmul, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                         rows: torch.Tensor | None, top_k: int, swiglu=None) -> torch.Tensor:
    """`Backend.grouped_swiglu` as the composition of a backend's `grouped_matmul` and stock ops: the
    assignments' rows gathered, gate and up projected in one grouped GEMM, silu(gate) * up."""
    h = grouped_matmul(x if rows is None else x[rows // top_k], w, offsets)
    return (swiglu or swiglu_torch)(h)


def swiglu_torch(h: torch.Tensor) -> torch.Tensor:
    """`Backend.swiglu` in stock ops: h [T, 2F] = [gate | up] -> silu(gate) * up [T, F]."""
    gate, up = h.chunk(2, dim=1)
    return F.silu(gate) * up


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, Dh] by its tokens' angles (cos, sin [T, 1, Dh/2] fp32), half-split layout
    (Llama / HF `rotate_half`). Elementwise in fp32, so a token's result depends only on its own position."""
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_and_store_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, token_slots: torch.Tensor,
                         positions: torch.Tensor) -> torch.Tensor:
    """`Backend.rope_and_store` in stock ops: q and k rotated in one pass (the same elementwise ops, so
    the same bits as one call each), k and v written to their cache cells, rotated q returned."""
    H = q.shape[1]
    T, _, Dh = q.shape
    qk = rope_torch(torch.cat([q, k], dim=1), cos.reshape(T, 1, Dh // 2), sin.reshape(T, 1, Dh // 2))
    k_cache[token_slots, positions] = qk[:, H:]
    v_cache[token_slots, positions] = v
    return qk[:, :H]


def top_k_torch(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`Backend.top_k` in stock ops: a stable descending sort of each row, its first k columns, and
    their values gathered."""
    if x.dim() != 2 or not 1 <= k <= x.shape[1]:
        raise ValueError(f"x must be 2-D [rows, columns] and k in 1..N, got shape {tuple(x.shape)} and k={k}")
    cols = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
    return cols, x.gather(1, cols)


def tree_sum_torch(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The stock form: p [n, ...] (n a power of two) -> ((p0 + p1) + (p2 + p3)) + ... in p's dtype, then
    rounded to `dtype`; log2(n) additions and a cast."""
    check_tree_leaves(p)
    while p.shape[0] > 1:
        p = p[0::2] + p[1::2]
    return p[0].to(dtype)
