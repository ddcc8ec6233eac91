"""How a kernel rounds its fp32 result to the output dtype with the bits torch gives.

On the GPU a conversion rounds to nearest even (cvt.rn), as torch's CUDA kernels do. Triton's
interpreter converts fp32 -> bf16 rounding ties away from zero, so a kernel whose output must equal a
torch form bitwise (not only be batch-invariant) rounds bf16 by integer ops there. fp16 and fp32
convert correctly in both modes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from detmoe.kernels import runtime


def round_by_bits(dtype: torch.dtype) -> bool:
    """The `BY_BITS` flag of `rounded_to`: interpreted bf16 output."""
    return runtime.interpreting() and dtype == torch.bfloat16


@triton.jit
def _bf16_rounded_by_bits(x):
    """fp32 -> bf16 rounded to nearest even in integer ops. A NaN stays a NaN (its payload bits are not
    matched: torch's CPU kernels themselves differ there)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def rounded_to(x, out_dtype: tl.constexpr, BY_BITS: tl.constexpr):
    """fp32 x converted to out_dtype, rounded to nearest even as torch rounds."""
    if BY_BITS:
        return _bf16_rounded_by_bits(x)
    else:
        return x.to(out_dtype)


@triton.jit
def rounded_through(x, out_dtype: tl.constexpr, BY_BITS: tl.constexpr):
    """fp32 x rounded to out_dtype (nearest even) and back to fp32: the value a torch op computing in
    fp32 reads from a tensor of out_dtype. Interpreted bf16 rounds in integer ops and keeps fp32
    storage (the interpreter's bf16 values do not convert back exactly)."""
    if BY_BITS:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))
    else:
        return x.to(out_dtype).to(tl.float32)
