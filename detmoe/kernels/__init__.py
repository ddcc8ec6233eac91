"""Kernels behind one switch: `use_backend("torch")` (stock) or `use_backend("batch_invariant")`.

The model calls only the functions below; each forwards to the backend in force.
"""
from __future__ import annotations

import torch

from detmoe.kernels.backend import Backend, available_backends, get_backend, register_backend, use_backend
from detmoe.kernels.torch_backend import TorchBackend


def _batch_invariant_backend() -> Backend:
    # imported on first use, so that importing detmoe imports no triton and changes nothing in it
    from detmoe.kernels.batch_invariant import BatchInvariantBackend
    return BatchInvariantBackend()


register_backend("torch", TorchBackend)
register_backend("batch_invariant", _batch_invariant_backend)

BACKENDS = ("torch", "batch_invariant")


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return get_backend().matmul(x, w)


def matmul_widened(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return get_backend().matmul_widened(x, w)


def matmul_three(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 w3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return get_backend().matmul_three(x, w1, w2, w3)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return get_backend().grouped_matmul(x, w, offsets)


def grouped_swiglu(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor | None = None,
                   top_k: int = 1) -> torch.Tensor:
    return get_backend().grouped_swiglu(x, w, offsets, rows, top_k)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    return get_backend().swiglu(h)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return get_backend().sigmoid(x)


def matmul_partials(x: torch.Tensor, w: torch.Tensor, chunks: int) -> torch.Tensor:
    return get_backend().matmul_partials(x, w, chunks)


def grouped_matmul_partials(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, chunks: int) -> torch.Tensor:
    return get_backend().grouped_matmul_partials(x, w, offsets, chunks)


def matmul_chunk_sum(x: torch.Tensor, w: torch.Tensor, chunks: int, dtype: torch.dtype) -> torch.Tensor:
    return get_backend().matmul_chunk_sum(x, w, chunks, dtype)


def grouped_matmul_chunk_sum(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, chunks: int,
                             dtype: torch.dtype) -> torch.Tensor:
    return get_backend().grouped_matmul_chunk_sum(x, w, offsets, chunks, dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return get_backend().rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return get_backend().add_rms_norm(x, residual, weight, eps)


def softmax(x: torch.Tensor) -> torch.Tensor:
    return get_backend().softmax(x)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    return get_backend().log_softmax(x)


def ordered_combine(out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    return get_backend().ordered_combine(out, order, weights, dtype)


def expert_sort(flat_experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    return get_backend().expert_sort(flat_experts, n_experts)


def tree_sum(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return get_backend().tree_sum(partials, dtype)


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return get_backend().top_k(x, k)


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, token_slots: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    return get_backend().rope_and_store(q, k, v, cos, sin, k_cache, v_cache, token_slots, positions)


def attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, slots, scale: float) -> torch.Tensor:
    return get_backend().attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, slots, scale)


__all__ = ["Backend", "BACKENDS", "available_backends", "get_backend", "register_backend", "use_backend",
           "matmul", "matmul_widened", "matmul_three", "grouped_matmul", "grouped_swiglu", "swiglu", "sigmoid", "matmul_partials",
           "grouped_matmul_partials", "matmul_chunk_sum", "grouped_matmul_chunk_sum", "rms_norm", "add_rms_norm",
           "softmax", "log_softmax", "top_k", "rope_and_store", "attention", "ordered_combine", "tree_sum",
           "expert_sort"]
