"""Batch-invariant RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, row by row, computed in fp32.

A row's sum of squares is accumulated elementwise over fixed BLOCK_D-wide chunks (chunk order fixed) and
then reduced once with `tl.sum` over a block whose shape depends only on D and the device, never on the
number of rows T. ROWS rows share a program (one on the GPU, many under the interpreter to keep program
count low); rows never mix, so a row's bits do not depend on its position or on its co-rows.
Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019).
"""
from __future__ import annotations

import torch

from detmoe.kernels import runtime
from detmoe.kernels.ops.rounding import round_by_bits, rounded_through, rounded_to
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _row(x_ptr, r_ptr, offs, m, RESIDUAL: tl.constexpr, BY_BITS: tl.constexpr):
    """fp32 values of a chunk of rows: x, or x + r rounded to x's dtype as torch's add rounds it."""
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    if RESIDUAL:
        r = tl.load(r_ptr + offs, mask=m, other=0.0)
        return rounded_through(x.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty, BY_BITS)
    else:
        return x.to(tl.float32)


@triton.jit(do_not_specialize=["T"])
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, T, D, stride_xt, stride_ot, eps,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr, RESIDUAL: tl.constexpr, BY_BITS: tl.constexpr):
    """RESIDUAL: the rows normalised are x + r (r laid out as x), written to sum_ptr (laid out as x)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows[:, None] < T

    # -- pass 1: sum of squares, elementwise over chunks, then one fixed-shape reduction per row --
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m = row_ok & (d0 + cols[None, :] < D)
        x = _row(x_ptr, r_ptr, rows[:, None] * stride_xt + d0 + cols[None, :], m, RESIDUAL, BY_BITS)
        acc += x * x
    inv_rms = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / D + eps)                     # [ROWS]

    # -- pass 2: scale and write in the output dtype (and the sum, recomputed: the same bits) --
    for d0 in range(0, D, BLOCK_D):
        m = row_ok & (d0 + cols[None, :] < D)
        offs = rows[:, None] * stride_xt + d0 + cols[None, :]
        x = _row(x_ptr, r_ptr, offs, m, RESIDUAL, BY_BITS)
        if RESIDUAL:
            tl.store(sum_ptr + offs, rounded_to(x, sum_ptr.dtype.element_ty, BY_BITS), mask=m)
        w = tl.load(w_ptr + d0 + cols, mask=d0 + cols < D, other=0.0).to(tl.float32)
        y = x * inv_rms[:, None] * w[None, :]
        tl.store(out_ptr + rows[:, None] * stride_ot + d0 + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


def _tiles(D: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps) for a row length D: fixed per (D, device), never per row count."""
    return runtime.row_tiles(D, interpreter_cap=4096, gpu_cap=8192, eight_warps_above=2048)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D] (any leading dims are flattened) -> same shape and dtype, normalised per row."""
    return _launch(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) with h = x + residual in x's dtype (rounded as torch's add rounds), in one kernel:
    a residual stream's add and the next norm, one launch instead of two."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual must match x ({tuple(x.shape)}, {x.dtype}), got {tuple(residual.shape)}, "
                         f"{residual.dtype}")
    return _launch(x, residual, weight, eps)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    runtime.check_float("x", x)
    runtime.check_device("x", x)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [{x.shape[-1]}], got shape {tuple(weight.shape)}")
    shape = x.shape
    x2 = runtime.as_rows(x)
    T, D = x2.shape
    out = runtime.empty((T, D), x.device, x.dtype)
    if residual is None:
        r2, total = x2, x2
    else:   # x, the residual and the sum contiguous: one row stride serves all three
        x2, r2 = x2.contiguous(), residual.reshape(T, D).contiguous()
        total = runtime.empty((T, D), x.device, x.dtype)
    if T == 0:
        return total.reshape(shape), out.reshape(shape)
    rows, block_d, warps = _tiles(D)
    grid = lambda meta: (runtime.cdiv(T, meta["ROWS"]),)
    _rms_norm_kernel[grid](x2, r2, weight, out, total, T, D, x2.stride(0), out.stride(0), eps,
                           ROWS=rows, BLOCK_D=block_d, RESIDUAL=residual is not None,
                           BY_BITS=round_by_bits(x.dtype), num_warps=warps)
    return total.reshape(shape), out.reshape(shape)
