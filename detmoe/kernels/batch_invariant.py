"""The `batch_invariant` backend: our Triton kernels, each with a reduction order fixed per weight shape.

    with kernels.use_backend("batch_invariant"):
        logits, routings = model(tokens, cu_seqlens)

A row's output bits depend only on that row (and, for attention, its sequence's keys): not on the batch
size, the row's position, its co-rows, the group sizes of the other experts, prefill vs decode, or the
cache slot. On a CUDA GPU the kernels are compiled; on a machine without one they run under Triton's
interpreter on CPU tensors (switched on when the kernels are first needed: detmoe/kernels/runtime.py; no env var
needed). Importing `detmoe` does not import this module (or triton): the backend is built on first use.

Threads may share the backend: under the interpreter (not thread-safe) every call holds one process-wide
lock (`runtime.serialised`), so concurrent forwards give the one-thread bits, running one kernel at a time;
compiled kernels take no lock.

Every op is one of ours: no stock op was kept (see docs/kernels.md: stock rms_norm/log_softmax measured
invariant on the H100, but our kernels also run on the CPU interpreter and keep one code path).
"""
from __future__ import annotations

import torch

from detmoe.kernels import runtime
from detmoe.kernels.ops.activations import sigmoid as _sigmoid
from detmoe.kernels.ops.activations import swiglu as _swiglu
from detmoe.kernels.ops.attention import attention as _attention
from detmoe.kernels.ops.combine import ordered_combine as _ordered_combine
from detmoe.kernels.ops.expert_sort import expert_sort as _expert_sort
from detmoe.kernels.ops.grouped_gemm import grouped_matmul as _grouped_matmul
from detmoe.kernels.ops.grouped_gemm import grouped_matmul_chunk_sum as _grouped_matmul_chunk_sum
from detmoe.kernels.ops.grouped_gemm import grouped_matmul_partials as _grouped_matmul_partials
from detmoe.kernels.ops.grouped_gemm import grouped_swiglu as _grouped_swiglu
from detmoe.kernels.ops.matmul import matmul as _matmul
from detmoe.kernels.ops.matmul import matmul_chunk_sum as _matmul_chunk_sum
from detmoe.kernels.ops.matmul import matmul_partials as _matmul_partials
from detmoe.kernels.ops.matmul import matmul_three as _matmul_three
from detmoe.kernels.ops.matmul import matmul_widened as _matmul_widened
from detmoe.kernels.ops.rmsnorm import add_rms_norm as _add_rms_norm
from detmoe.kernels.ops.rmsnorm import rms_norm as _rms_norm
from detmoe.kernels.ops.rope import rope_and_store as _rope_and_store
from detmoe.kernels.ops.top_k import top_k as _top_k
from detmoe.kernels.ops.softmax import log_softmax as _log_softmax
from detmoe.kernels.ops.softmax import softmax as _softmax
from detmoe.kernels.ops.tree_sum import tree_sum as _tree_sum
from detmoe.kernels.torch_backend import (expert_sort_torch, grouped_swiglu_torch, ordered_combine_torch,
                                          rope_and_store_torch, swiglu_torch, top_k_torch, tree_sum_torch)


class BatchInvariantBackend:
    name = "batch_invariant"
    ordered_collectives = True

    def matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _matmul(x, w)

    def matmul_widened(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _matmul_widened(x, w)

    def matmul_three(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                     w3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _matmul_three(x, w1, w2, w3)

    def grouped_matmul(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return _grouped_matmul(x, w, offsets)

    def grouped_swiglu(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                       rows: torch.Tensor | None = None, top_k: int = 1) -> torch.Tensor:
        # one kernel on the GPU (tested equal to the composition there in bf16); under the interpreter the
        # composition, whose packed GEMM is fast there, with our swiglu (torch's CPU silu gives an element
        # other bits by where it falls in a vector: activations.py)
        if runtime.interpreting() or x.dtype not in runtime.FLOATS:
            return grouped_swiglu_torch(self.grouped_matmul, x, w, offsets, rows, top_k, self.swiglu)
        return _grouped_swiglu(x, w, offsets, rows, top_k)

    def swiglu(self, h: torch.Tensor) -> torch.Tensor:
        if h.dtype not in runtime.FLOATS:   # fp64 (CPU reference runs): the stock ops
            return swiglu_torch(h)
        return _swiglu(h)

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in runtime.FLOATS:
            return torch.sigmoid(x)
        return _sigmoid(x)

    def matmul_partials(self, x: torch.Tensor, w: torch.Tensor, chunks: int) -> torch.Tensor:
        return _matmul_partials(x, w, chunks)

    def grouped_matmul_partials(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                                chunks: int) -> torch.Tensor:
        return _grouped_matmul_partials(x, w, offsets, chunks)

    def matmul_chunk_sum(self, x: torch.Tensor, w: torch.Tensor, chunks: int, dtype: torch.dtype) -> torch.Tensor:
        return _matmul_chunk_sum(x, w, chunks, dtype)

    def grouped_matmul_chunk_sum(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, chunks: int,
                                 dtype: torch.dtype) -> torch.Tensor:
        return _grouped_matmul_chunk_sum(x, w, offsets, chunks, dtype)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return _rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _add_rms_norm(x, residual, weight, eps)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        return _softmax(x)

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        return _log_softmax(x)

    def ordered_combine(self, out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
        # fp64 (CPU reference runs) stays on the stock ops, which already fix the order: the kernel
        # accumulates in fp32 only
        if dtype not in runtime.FLOATS or out.dtype not in runtime.FLOATS or weights.dtype != torch.float32:
            return ordered_combine_torch(out, order, weights, dtype)
        return _ordered_combine(out, order, weights, dtype)

    def expert_sort(self, flat_experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        # one or two launches instead of the stock form's eight or so (a decode step is made of such
        # launches; at a prefill's 65536 assignments the argsort alone was costly: detmoe/kernels/NOTES.md);
        # the stock form under the interpreter, where argsort is one fast CPU call and a program is milliseconds
        if flat_experts.is_cuda:
            return _expert_sort(flat_experts, n_experts)
        return expert_sort_torch(flat_experts, n_experts)

    def tree_sum(self, partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if partials.dtype != torch.float32 or dtype not in runtime.FLOATS or partials.shape[0] > 64:
            return tree_sum_torch(partials, dtype)     # fp64 CPU reference runs: the stock form's order
        return _tree_sum(partials, dtype)

    def top_k(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype not in runtime.FLOATS:   # fp64 (CPU reference runs): the same selection, stock ops
            return top_k_torch(x, k)
        return _top_k(x, k)

    def rope_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, token_slots: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
        # elementwise, so the stock ops are invariant too: they stay for fp64 (CPU reference runs) and
        # head dims whose half is not a power of two
        half = q.shape[-1] // 2
        if q.dtype not in runtime.FLOATS or half & (half - 1):
            return rope_and_store_torch(q, k, v, cos, sin, k_cache, v_cache, token_slots, positions)
        return _rope_and_store(q, k, v, cos, sin, k_cache, v_cache, token_slots, positions)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor,
                  scale: float) -> torch.Tensor:
        return _attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, slots, scale)


# every op under the interpreter's lock (runtime.serialised): one place, so an op added later is covered too
for _name, _op in list(vars(BatchInvariantBackend).items()):
    if not _name.startswith("_") and callable(_op):
        setattr(BatchInvariantBackend, _name, runtime.serialised(_op))
del _name, _op
