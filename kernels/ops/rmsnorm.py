"""Batch-invariant RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, row by row, computed in fp32.

A row's sum of squares is accumulated elementwise over fixed BLOCK_D-wide chunks (chunk order fixed) and
then reduced once with `tl.sum` over a block whose shape depends only on D and the device, never on the
number of rows T. ROWS rows share a program (one on the GPU, many under the interpreter to keep program
count low); rows never mix, so a row's bits do not depend on its position or on its co-rows.
Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019).
"""
from __future__ import annotations

import torch

from kernels import runtime
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit(do_not_specialize=["T"])
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, T, D, stride_xt, stride_ot, eps,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows[:, None] < T

    # -- pass 1: sum of squares, elementwise over chunks, then one fixed-shape reduction per row --
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m = row_ok & (d0 + cols[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += x * x
    inv_rms = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / D + eps)                     # [ROWS]

    # -- pass 2: scale and write in the output dtype --
    for d0 in range(0, D, BLOCK_D):
        m = row_ok & (d0 + cols[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + d0 + cols, mask=d0 + cols < D, other=0.0).to(tl.float32)
        y = x * inv_rms[:, None] * w[None, :]
        tl.store(out_ptr + rows[:, None] * stride_ot + d0 + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


def _tiles(D: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps) for a row length D: fixed per (D, device), never per row count."""
    return runtime.row_tiles(D, interpreter_cap=4096, gpu_cap=8192, eight_warps_above=2048)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D] (any leading dims are flattened) -> same shape and dtype, normalised per row."""
    runtime.check_float("x", x)
    runtime.check_device("x", x)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [{x.shape[-1]}], got shape {tuple(weight.shape)}")
    shape = x.shape
    x2 = runtime.as_rows(x)
    T, D = x2.shape
    out = runtime.empty((T, D), x.device, x.dtype)
    if T == 0:
        return out.reshape(shape)
    rows, block_d, warps = _tiles(D)
    grid = lambda meta: (runtime.cdiv(T, meta["ROWS"]),)
    _rms_norm_kernel[grid](x2, weight, out, T, D, x2.stride(0), out.stride(0), eps,
                           ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return out.reshape(shape)
