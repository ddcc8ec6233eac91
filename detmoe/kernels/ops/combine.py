"""The MoE layer's ordered combine in one kernel: y[t] = sum over slots j = 0..S-1, in that order, of
w[t, j] * out[row of (t, j)], in fp32.

The stock form (`kernels.torch_backend.ordered_combine_torch`) scatters each weighted output into a
zeroed [T*S, D] grid of (token, slot) cells and adds the S slot columns one after another: about S + 5
kernels per layer, which dominate a CUDA-graph decode step of a many-layer model. This kernel computes
the same bits in one launch. Each program takes a block of tokens x a block of D and, per token, does
exactly the stock arithmetic:

    acc = p_0;  acc = acc + p_j for j = 1..S-1;  y = acc cast to the output dtype
    p_j = fp32(out[row]) * w[t, j] rounded in fp32, or +0.0 where slot (t, j) was dropped (no row)

`acc` starts as p_0 itself (not 0 + p_0, which would turn a -0.0 product into +0.0), and a dropped
slot's +0.0 is still added, as the stock sum adds its zero cell. The launch disables fp fusion, so the
compiler cannot contract `acc + fp32(out) * w` into an fma (one rounding instead of two). Nothing
depends on how many tokens share a launch, so a token's bits are batch-invariant.

The row of each (token, slot) cell, or -1, is the inverse of `order`, built on the device with two
torch ops (no host sync: a decode step with this op can be captured in a CUDA graph).
"""
from __future__ import annotations

import torch

from detmoe.kernels import runtime
from detmoe.kernels.ops.rounding import round_by_bits, rounded_to
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _slot_product(out_ptr, inv_ptr, w_ptr, tokens, cols, j, tile_ok, token_ok, stride_out, stride_wt,
                  S: tl.constexpr):
    """p_j for a [ROWS, BLOCK_D] tile: fp32(out[row]) * w[t, j] rounded in fp32, +0.0 where dropped."""
    row = tl.load(inv_ptr + tokens * S + j, mask=token_ok, other=-1)
    w = tl.load(w_ptr + tokens * stride_wt + j, mask=token_ok, other=0.0)
    kept = (row >= 0)[:, None]
    v = tl.load(out_ptr + row.to(tl.int64)[:, None] * stride_out + cols[None, :],
                mask=kept & tile_ok, other=0.0).to(tl.float32)
    # where, not the load's `other`: a dropped slot's product is +0.0 whatever its weight
    return tl.where(kept, v * w[:, None], 0.0)


@triton.jit(do_not_specialize=["T"])
def _ordered_combine_kernel(out_ptr, inv_ptr, w_ptr, y_ptr, T, D, stride_out, stride_wt, stride_yt,
                            S: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                            BY_BITS: tl.constexpr):
    tokens = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < T
    tile_ok = token_ok[:, None] & (cols[None, :] < D)
    acc = _slot_product(out_ptr, inv_ptr, w_ptr, tokens, cols, 0, tile_ok, token_ok, stride_out, stride_wt, S)
    for j in tl.static_range(1, S):
        acc = acc + _slot_product(out_ptr, inv_ptr, w_ptr, tokens, cols, j, tile_ok, token_ok,
                                  stride_out, stride_wt, S)
    y = rounded_to(acc, y_ptr.dtype.element_ty, BY_BITS)
    tl.store(y_ptr + tokens.to(tl.int64)[:, None] * stride_yt + cols[None, :], y, mask=tile_ok)


def _tiles(D: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps): fixed per (D, device), never per token count (the arithmetic does not
    depend on them anyway: each element is its own sum). Interpreted, few large programs; on the GPU
    small tiles, so that a decode step's few tokens still spread over the SMs."""
    if runtime.interpreting():
        block_d = runtime.pow2_at_most(D, 1024)
        return max(1, min(64, 16384 // block_d)), block_d, 1
    return 4, runtime.pow2_at_most(D, 256), 4


def slot_rows(order: torch.Tensor, cells: int) -> torch.Tensor:
    """The inverse of `order`: [cells] int32, the row of `out` holding cell t*S+j, or -1 (dropped).
    Two device ops, no host sync."""
    inv = torch.full((cells,), -1, dtype=torch.int32, device=order.device)
    return inv.index_put_((order,), torch.arange(order.shape[0], dtype=torch.int32, device=order.device))


def ordered_combine(out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """out [A, D] (fp16/bf16/fp32): the outputs of the kept assignments, row i being cell order[i] =
    t*S+j; weights [T, S] fp32. Returns y [T, D] in `dtype` (fp16/bf16/fp32), slots summed in order."""
    runtime.check_float("out", out)
    runtime.check_device("out", out)
    runtime.check_float_dtype("dtype", dtype)
    if weights.dtype != torch.float32 or weights.dim() != 2:
        raise ValueError(f"weights must be a [tokens, slots] float32 tensor, got {weights.dtype} "
                         f"of shape {tuple(weights.shape)}")
    if out.dim() != 2 or order.shape != (out.shape[0],):
        raise ValueError(f"out must be [rows, d_model] and order [rows], got {tuple(out.shape)} and "
                         f"{tuple(order.shape)}")
    T, S = weights.shape
    D = out.shape[1]
    y = runtime.empty((T, D), out.device, dtype)
    if out.shape[0] == 0:  # every slot dropped: every sum is of +0.0 cells
        return y.zero_()
    if T == 0 or D == 0:
        return y
    out = runtime.as_rows(out)
    if weights.stride(1) != 1:
        weights = weights.contiguous()
    inv = slot_rows(order, T * S)
    rows, block_d, warps = _tiles(D)
    grid = (runtime.cdiv(T, rows), runtime.cdiv(D, block_d))
    _ordered_combine_kernel[grid](out, inv, weights, y, T, D, out.stride(0), weights.stride(0), y.stride(0),
                                  S=S, ROWS=rows, BLOCK_D=block_d,
                                  BY_BITS=round_by_bits(dtype),
                                  num_warps=warps,
                                  # no fma: each product is rounded to fp32 before its add, as the stock form
                                  enable_fp_fusion=False)
    return y
