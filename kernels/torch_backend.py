"""The stock path: PyTorch and vendor kernels (cuBLAS, torch._grouped_mm, FlexAttention or SDPA,
MKL/oneDNN on the CPU).

This is what an ordinary serving stack runs, batch-variance included; the ablation measures it against
the `batch_invariant` backend. Each op is written the way production code writes it (one batched call),
not rewritten to be invariant. On a GPU a decode step reads no value back to the host, so it can be
captured in a CUDA graph (moe/graphs.py); prefill and mixed steps, which run eagerly, read the batch's
lengths back once per step for their attention (the "split" candidate, with its index check: two reads),
and autograd and fp64 take a syncing attention fallback. Index values are checked where they are host
tensors. Attention is kernels/stock_attention.py: its docstring says which kernel runs and why.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.checks import check_group_offsets
from kernels.ops.expert_sort import expert_sort_torch
from kernels.ops.grouped_gemm import grouped_swiglu_torch
from kernels.ops.rope import rope_and_store_torch
from kernels.ops.top_k import top_k_torch
from kernels.ops.tree_sum import tree_sum_torch
from kernels.stock_attention import stock_attention


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
