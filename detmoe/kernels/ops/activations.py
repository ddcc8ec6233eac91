"""Elementwise activations with the bits of torch's CUDA kernels on every element, wherever it sits.

torch's CPU kernels for silu and sigmoid are not position-independent: a loop runs vectorised (SLEEF's
exp) over whole vector-widths and scalar (libm's exp) over the rest, and the two round differently. On a
CPU with AVX-512, `F.silu(gate)` of a [T, 16] view of a wider tensor takes the scalar path and gives other
bits than the same 16 columns inside a 64-wide row; `torch.sigmoid` of T rows gives a row other bits in
the scalar tail than in the vector body. So a shared expert's SwiGLU split over ranks, or its sigmoid gate
over a batch, changes bits on such a CPU. These kernels compute every element the same way: on the GPU
with CUDA's expf and an IEEE division, as torch's CUDA kernels do (same bits); under the interpreter with
numpy's float32 exp, one rule for all elements.

    swiglu(h)   h [T, 2F] = [gate | up] -> silu(gate) * up [T, F]
    sigmoid(x)  1 / (1 + exp(-x)), any shape

Each rounds as torch's composition rounds: silu (or sigmoid) computed in fp32 and rounded to the output
dtype, then the product of the two rounded values, rounded.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from detmoe.kernels import runtime
from detmoe.kernels.ops.rounding import round_by_bits, rounded_through, rounded_to


@triton.jit
def exp_of(x, INTERPRETED: tl.constexpr):
    """fp32 exp: CUDA's expf on the GPU (torch's CUDA kernels call it), numpy's under the interpreter
    (which has no libdevice)."""
    if INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def silu_times(gate, up, out_dtype: tl.constexpr, BY_BITS: tl.constexpr, INTERPRETED: tl.constexpr):
    """silu(gate) * up for fp32 blocks holding out_dtype values: silu(g) = g / (1 + exp(-g)) in fp32 (an IEEE
    division) rounded to out_dtype, then the product rounded."""
    silu = tl.math.div_rn(gate, 1.0 + exp_of(-gate, INTERPRETED))
    silu = rounded_through(silu, out_dtype, BY_BITS)
    return rounded_to(silu * up, out_dtype, BY_BITS)


@triton.jit(do_not_specialize=["T"])
def _swiglu_kernel(h_ptr, out_ptr, T, F, stride_ht, stride_ot, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                   BY_BITS: tl.constexpr, INTERPRETED: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (rows[:, None] < T) & (cols[None, :] < F)
    src = h_ptr + rows[:, None] * stride_ht + cols[None, :]
    gate = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(src + F, mask=ok, other=0.0).to(tl.float32)
    y = silu_times(gate, up, out_ptr.dtype.element_ty, BY_BITS, INTERPRETED)
    tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :], y, mask=ok)


@triton.jit(do_not_specialize=["n"])
def _sigmoid_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, BY_BITS: tl.constexpr, INTERPRETED: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
    y = tl.math.div_rn(1.0, 1.0 + exp_of(-x, INTERPRETED))
    tl.store(out_ptr + i, rounded_to(y, out_ptr.dtype.element_ty, BY_BITS), mask=ok)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h [T, 2F] (gate columns, then up columns) -> silu(gate) * up [T, F] in h's dtype."""
    runtime.check_float("h", h)
    runtime.check_device("h", h)
    if h.dim() != 2 or h.shape[1] % 2:
        raise ValueError(f"h must be 2-D [T, 2F] (gate columns, then up), got shape {tuple(h.shape)}")
    if h.stride(1) != 1:
        h = h.contiguous()
    T, F = h.shape[0], h.shape[1] // 2
    out = runtime.empty((T, F), h.device, h.dtype)
    if T == 0 or F == 0:
        return out
    rows, block, warps = runtime.row_tiles(F, interpreter_cap=4096, gpu_cap=1024, eight_warps_above=1024)
    grid = (runtime.cdiv(T, rows), runtime.cdiv(F, block))
    _swiglu_kernel[grid](h, out, T, F, h.stride(0), out.stride(0), ROWS=rows, BLOCK=block,
                         BY_BITS=round_by_bits(h.dtype), INTERPRETED=runtime.interpreting(), num_warps=warps)
    return out


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """1 / (1 + exp(-x)) elementwise, computed in fp32 -> x's dtype and shape."""
    runtime.check_float("x", x)
    runtime.check_device("x", x)
    x_flat = x.contiguous().view(-1)
    out = runtime.empty(x.shape, x.device, x.dtype)
    n = x_flat.shape[0]
    if n == 0:
        return out
    block = 65536 if runtime.interpreting() else 1024
    _sigmoid_kernel[(runtime.cdiv(n, block),)](x_flat, out, n, BLOCK=block, BY_BITS=round_by_bits(x.dtype),
                                               INTERPRETED=runtime.interpreting(), num_warps=4)
    return out
