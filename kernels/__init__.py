"""Kernels behind one switch: `use_backend("torch")` (stock) or `use_backend("batch_invariant")`.

The model calls only the functions below; each forwards to the backend in force.
"""
from __future__ import annotations

import torch

from kernels.backend import Backend, available_backends, get_backend, register_backend, use_backend
from kernels.torch_backend import TorchBackend



def _batch_invariant_backend() -> Backend:
    # imported on first use, so that `import kernels` does not import triton
    from kernels.batch_invariant import BatchInvariantBackend
    return BatchInvariantBackend()


register_backend("torch", TorchBackend)
register_backend("batch_invariant", _batch_invariant_backend)

BACKENDS = ("torch", "batch_invariant")


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return get_backend().matmul(x, w)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return get_backend().grouped_matmul(x, w, offsets)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return get_backend().rms_norm(x, weight, eps)


def softmax(x: torch.Tensor) -> torch.Tensor:
    return get_backend().softmax(x)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    return get_backend().log_softmax(x)


def attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, slots, scale: float) -> torch.Tensor:
    return get_backend().attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, slots, scale)


__all__ = ["Backend", "BACKENDS", "available_backends", "get_backend", "register_backend", "use_backend",
           "matmul", "grouped_matmul", "rms_norm", "softmax", "log_softmax", "attention"]
