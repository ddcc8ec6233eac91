"""Batch-invariant softmax and log-softmax over the last dim, computed and returned in fp32.

Three passes over a row, each in fixed BLOCK_N chunks: the row max (exact, order-free), the sum of
exp(x - max) accumulated elementwise over chunks and reduced once with a fixed-shape `tl.sum`, then the
write. Block shapes depend on the row length N and the device only, never on the number of rows; ROWS
rows share a program without mixing. Long rows (a 150k vocabulary) loop over chunks.
"""
from __future__ import annotations

import torch

from detmoe.kernels import runtime
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit(do_not_specialize=["T"])
def _softmax_kernel(x_ptr, out_ptr, T, N, stride_xt, stride_ot,
                    LOG: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows[:, None] < T

    # -- pass 1: row max (max is exact, so its order does not matter) --
    mx = tl.full((ROWS, BLOCK_N), float("-inf"), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        m = row_ok & (n0 + cols[None, :] < N)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + n0 + cols[None, :], mask=m, other=float("-inf"))
        mx = tl.maximum(mx, x.to(tl.float32))
    row_max = tl.max(mx, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)   # padding rows / all -inf rows: no NaN

    # -- pass 2: sum of exp, elementwise over chunks, then one fixed-shape reduction per row --
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        m = row_ok & (n0 + cols[None, :] < N)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + n0 + cols[None, :], mask=m, other=float("-inf"))
        acc += tl.exp(x.to(tl.float32) - row_max[:, None])
    total = tl.where(rows < T, tl.sum(acc, axis=1), 1.0)  # padding rows: avoid 1/0

    # -- pass 3: write --
    if LOG:
        log_total = tl.log(total)
    else:
        inv_total = 1.0 / total
    for n0 in range(0, N, BLOCK_N):
        m = row_ok & (n0 + cols[None, :] < N)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + n0 + cols[None, :], mask=m, other=float("-inf"))
        z = x.to(tl.float32) - row_max[:, None]
        if LOG:
            y = z - log_total[:, None]
        else:
            y = tl.exp(z) * inv_total[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + n0 + cols[None, :], y, mask=m)


def _tiles(N: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_N, num_warps) for a row length N: fixed per (N, device), never per row count."""
    return runtime.row_tiles(N, interpreter_cap=2048, gpu_cap=4096, eight_warps_above=1024)


def _launch(x: torch.Tensor, log: bool) -> torch.Tensor:
    runtime.check_float("x", x)
    runtime.check_device("x", x)
    shape = x.shape
    x2 = runtime.as_rows(x)
    T, N = x2.shape
    out = runtime.empty((T, N), x.device, torch.float32)
    if T == 0 or N == 0:
        return out.reshape(shape)
    rows, block_n, warps = _tiles(N)
    grid = lambda meta: (runtime.cdiv(T, meta["ROWS"]),)
    _softmax_kernel[grid](x2, out, T, N, x2.stride(0), out.stride(0),
                          LOG=log, ROWS=rows, BLOCK_N=block_n, num_warps=warps)
    return out.reshape(shape)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of x (any float dtype) -> fp32, same shape."""
    return _launch(x, log=False)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last dim of x (any float dtype) -> fp32, same shape."""
    return _launch(x, log=True)
