"""Each row's k largest values and their columns, in one kernel: the first k entries of a stable
descending sort (equal values in column order; NaN first, as torch.sort puts it).

The stock form (`top_k_torch`, the torch backend's) is a stable sort of the whole row and a gather:
about seven launches per MoE layer (copies, an arange, the sort, the gather) for a few kilobytes of
router probabilities in a decode step, where a CUDA-graph step is bound by its kernel count. This kernel
picks the k columns one after another: the largest value among the columns not yet taken (a NaN
before any number), ties to the lowest column. Selection is exact (no arithmetic), so every backend and
device gives the same columns and values, and a row's result depends on that row only.
"""
from __future__ import annotations

import torch

from detmoe.kernels import runtime
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit(do_not_specialize=["T"])
def _top_k_kernel(x_ptr, idx_ptr, val_ptr, T, N, stride_xt, stride_it, stride_vt,
                  K: tl.constexpr, ROWS: tl.constexpr, N_POW2: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, N_POW2)
    row_ok = rows < T
    ok = row_ok[:, None] & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    free = ok                                       # columns not taken yet
    for j in range(K):
        nan = free & (x != x)
        any_nan = tl.max(nan.to(tl.int32), axis=1) > 0                              # [ROWS]
        best = tl.max(tl.where(free & (x == x), x, float("-inf")), axis=1)            # [ROWS]
        # the candidates: a NaN if the row has one left, else the columns holding the best value (-inf
        # included, so a row of -inf still yields its columns in order)
        hit = tl.where(any_nan[:, None], nan, free & (x == best[:, None]))
        col = tl.min(tl.where(hit, cols[None, :], N_POW2), axis=1)                   # [ROWS]
        free = free & (cols[None, :] != col[:, None])
        # the value read back from memory: exact, NaN payload included
        val = tl.load(x_ptr + rows * stride_xt + col, mask=row_ok, other=0.0)
        tl.store(idx_ptr + rows * stride_it + j, col.to(tl.int64), mask=row_ok)
        tl.store(val_ptr + rows * stride_vt + j, val, mask=row_ok)


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, N] (fp16/bf16/fp32), 1 <= k <= N -> (columns [T, k] int64, values [T, k] in x's dtype): the
    first k of a stable descending sort of each row, as `top_k_torch` gives them."""
    runtime.check_float("x", x)
    runtime.check_device("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, columns], got shape {tuple(x.shape)}")
    T, N = x.shape
    if not 1 <= k <= N:
        raise ValueError(f"k must be in 1..N={N}, got {k}")
    idx = runtime.empty((T, k), x.device, torch.int64)
    val = runtime.empty((T, k), x.device, x.dtype)
    if T == 0:
        return idx, val
    x = runtime.as_rows(x)
    n_pow2 = runtime.next_pow2(N)
    # interpreted: few programs; on the GPU one row per program (the k picks are a chain of reductions,
    # so a decode step's few rows finish soonest spread over the SMs)
    rows = runtime.pow2_at_most(max(1, 16384 // n_pow2), 256) if runtime.interpreting() else 1
    _top_k_kernel[(runtime.cdiv(T, rows),)](x, idx, val, T, N, x.stride(0), idx.stride(0), val.stride(0),
                                             K=k, ROWS=rows, N_POW2=n_pow2, num_warps=4 if n_pow2 >= 512 else 1)
    return idx, val
