"""The one switch that decides how the model's arithmetic runs.

Every matmul, norm, softmax, attention and expert GEMM of the model goes through the functions in
`detmoe/kernels/__init__.py`, which look up the active backend here. A backend is a plain object with the
methods of `Backend` below; `torch` (stock PyTorch/vendor kernels) and `batch_invariant` (our Triton
kernels with a fixed reduction order) are registered by name.

    with kernels.use_backend("batch_invariant"):
        logits, routings = model(tokens, cu_seqlens)
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Protocol

import torch


class Backend(Protocol):
    """What a backend must provide. Shapes use T = tokens (rows), K = reduction dim, N = output dim."""

    name: str
    # How a sum across ranks (multi-GPU layers, detmoe/moe/parallel.py) is formed: True moves every rank's fp32
    # partial sums and adds them in one fixed tree, so the bits do not depend on the number of ranks
    # (the layers then call the *_partials ops); False is the collective serving engines use (an
    # all-reduce, whose order depends on the rank count).
    ordered_collectives: bool

    def matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, K] @ w [K, N] -> [T, N] in x's dtype (fp32 accumulate)."""

    def matmul_widened(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """`matmul(x, w).float()`, bit for bit -> [T, N] fp32 (the logits; the batch_invariant backend
        stores them widened from its one launch instead of converting them in a second pass)."""

    def matmul_three(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                     w3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x @ w1, x @ w2, x @ w3), each bitwise `matmul`'s (the batch_invariant backend launches once:
        a query, key and value projection)."""

    def grouped_matmul(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows of x [T, K] sorted by group; w [E, K, N]; offsets [E] int32 cumulative row ends, the
        last at most T. Row t of group e gives x[t] @ w[e]. Returns [T, N]; rows past offsets[-1]
        belong to no group and hold unspecified values."""

    def grouped_swiglu(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                       rows: torch.Tensor | None = None, top_k: int = 1) -> torch.Tensor:
        """The experts' SwiGLU input projection: h = grouped_matmul(x[rows // top_k], w, offsets) (x
        itself where rows is None) with w [E, K, 2F] = [gate | up] -> silu(h[:, :F]) * h[:, F:] [A, F]
        in x's dtype, each op rounded as torch's ops round the composition (`grouped_swiglu_torch`)."""

    def swiglu(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, 2F] = [gate | up] -> silu(gate) * up [T, F] in h's dtype, silu computed in fp32 and
        rounded, then the product rounded (as torch's ops round `F.silu(gate) * up`)."""

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        """1 / (1 + exp(-x)) elementwise, computed in fp32, in x's dtype."""

    def matmul_partials(self, x: torch.Tensor, w: torch.Tensor, chunks: int) -> torch.Tensor:
        """The K axis in `chunks` equal chunks: [chunks, T, N] fp32, chunk c = x[:, Kc-range c] @ w[Kc-range c]."""

    def grouped_matmul_partials(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                                chunks: int) -> torch.Tensor:
        """`grouped_matmul` with its K axis in `chunks` equal chunks: [chunks, T, N] fp32 partials."""

    def matmul_chunk_sum(self, x: torch.Tensor, w: torch.Tensor, chunks: int, dtype: torch.dtype) -> torch.Tensor:
        """`tree_sum(matmul_partials(x, w, chunks), dtype)`, bit for bit: the K chunks' fp32 products
        added in the tree's order and rounded once -> [T, N] in `dtype` (the batch_invariant backend
        does it in one kernel that never writes the partials where that pays: matmul.one_kernel_sum)."""

    def grouped_matmul_chunk_sum(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, chunks: int,
                                 dtype: torch.dtype) -> torch.Tensor:
        """`tree_sum(grouped_matmul_partials(x, w, offsets, chunks), dtype)`, bit for bit -> [T, N]."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, D] normalised per row, times weight [D]."""

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, rms_norm(h, weight, eps)) with h = x + residual in x's dtype: the residual stream's add and
        the next norm, bitwise equal to the two ops."""

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax over the last dim, computed and returned in fp32."""

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        """Log-softmax over the last dim, computed and returned in fp32."""

    def ordered_combine(self, out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
        """The MoE combine with a fixed order: y [T, D] in `dtype`, y[t] = sum of w[t, j] * out[row of
        cell t*S+j] over slots j = 0..S-1, added in slot order. out [A, D]: row i holds cell order[i]
        (token-major t*S+j, each at most once); weights [T, S]. Accumulated in fp32 (fp64 if `dtype` is
        fp64), each product rounded before its add (no fma); a cell with no row is +0.0 and is
        still added; the sum starts from slot 0's value itself (a -0.0 stays -0.0). Bitwise equal to
        `kernels.torch_backend.ordered_combine_torch` (NaN payloads aside), with no host sync."""

    def expert_sort(self, flat_experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The MoE layer's assignments [N] (expert ids) sorted by expert: (order [N] int64, the stable
        argsort; offsets [E] int32, each expert's group end in that order). Exact (integers), so every
        backend gives the same tensors; no host sync."""

    def tree_sum(self, partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """partials [n, ...] (n a power of two) -> [...] in `dtype`: ((p0 + p1) + (p2 + p3)) + ... added
        level by level in the partials' dtype, rounded once. Bitwise equal to
        `kernels.torch_backend.tree_sum_torch`, for any n and shape (the row-parallel sums rely on it)."""

    def top_k(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row of x [T, N]'s k largest values, best first, equal values in column order (NaN before
        any number): (columns [T, k] int64, values [T, k]), the first k of a stable descending sort.
        Exact (a selection), so every backend gives the same tensors; no host sync."""

    def rope_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, token_slots: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of the step's q [T, H, Dh] and k [T, Hkv, Dh] by cos, sin [T, 1, Dh/2] fp32
        (half-split layout), in fp32, each product rounded before its add; rotated k and v [T, Hkv, Dh]
        stored in k_cache, v_cache [slots, L, Hkv, Dh] at (token_slots[t], positions[t]). Returns the
        rotated q in q's dtype. Bitwise equal to `kernels.torch_backend.rope_and_store_torch`."""

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor,
                  scale: float) -> torch.Tensor:
        """Causal attention for a ragged batch over a KV cache.

        q [Tq, H, Dh]: the step's queries, sequence b owning rows cu_seqlens_q[b]:cu_seqlens_q[b+1].
        k_cache, v_cache [S, L, Hkv, Dh]: cache slots; sequence b reads slot slots[b], positions
        0..kv_lens[b]-1 (the step's own keys already written). Its queries sit at the last positions,
        so query i of a sequence with n queries is at position kv_lens[b] - n + i and sees keys <= it.
        H must be a multiple of Hkv (grouped-query attention). Returns [Tq, H, Dh] in q's dtype.
        """


_BACKENDS: dict[str, Callable[[], Backend]] = {}
_state = threading.local()


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make a backend selectable by name; `factory` is called once, on first use."""
    _BACKENDS[name] = factory


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


_instances: dict[str, Backend] = {}


def _instance(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {available_backends()}, got {name!r}")
    if name not in _instances:
        _instances[name] = _BACKENDS[name]()
    return _instances[name]


def get_backend() -> Backend:
    """The backend in force on this thread (`torch` unless a `use_backend` block says otherwise)."""
    return _instance(getattr(_state, "name", "torch"))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """Run the enclosed model code on the named backend; nests and restores on exit."""
    backend = _instance(name)
    previous = getattr(_state, "name", "torch")
    _state.name = name
    try:
        yield backend
    finally:
        _state.name = previous
