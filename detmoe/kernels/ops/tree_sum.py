"""The sum of n fp32 partials in one fixed binary tree, rounded once: y = round(((p0 + p1) + (p2 + p3)) + ...).

The multi-GPU layers sum a row-parallel matmul's K chunks this way (detmoe/moe/parallel.py): first the chunks a
rank holds, then one subtree sum per rank, so the bits are the same on any number of ranks. In stock ops
that is log2(n) additions and a cast, each a kernel reading and writing the whole tensor; this kernel
does the tree and the cast in one launch (one read of the partials, one write of the result), which
matters for decode steps made of many small launches and for prefill, where the partials are large.

The tree is level by level, pairs (0, 1), (2, 3), ... then pairs of those, exactly as the stock form
`tree_sum_torch`; each addition is one IEEE fp32 add, so the two give the same bits. Nothing depends on
how many elements share a launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from detmoe.kernels import runtime
from detmoe.kernels.checks import check_tree_leaves
from detmoe.kernels.ops.rounding import round_by_bits, rounded_to


@triton.jit
def _tree_sum_kernel(p_ptr, y_ptr, M, stride_leaf, LEAVES: tl.constexpr, LEVELS: tl.constexpr,
                     BLOCK: tl.constexpr, BY_BITS: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < M
    leaves = tl.arange(0, LEAVES)
    x = tl.load(p_ptr + leaves[None, :].to(tl.int64) * stride_leaf + cols[:, None],
                mask=ok[:, None], other=0.0)                                      # [BLOCK, LEAVES]
    for level in tl.static_range(LEVELS):
        # [BLOCK, pairs, 2]: leaves 2k and 2k+1 side by side, split and added
        even, odd = tl.split(tl.reshape(x, [BLOCK, LEAVES >> (level + 1), 2]))
        x = even + odd
    y = tl.reshape(x, [BLOCK])
    tl.store(y_ptr + cols, rounded_to(y, y_ptr.dtype.element_ty, BY_BITS), mask=ok)


def tree_sum(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """p [n, ...] fp32, n a power of two (at most 64) -> [...] in `dtype` (fp16/bf16/fp32): the bits of
    `tree_sum_torch` in one kernel."""
    check_tree_leaves(p)
    runtime.check_device("p", p)
    if p.dtype != torch.float32:
        raise ValueError(f"p must be float32 partials, got {p.dtype}")
    runtime.check_float_dtype("dtype", dtype)
    n = p.shape[0]
    if n > 64:
        raise ValueError(f"tree_sum takes at most 64 leaves, got {n}")
    if n == 1 and dtype == torch.float32:
        return p[0]
    y = runtime.empty(tuple(p.shape[1:]), p.device, dtype)
    M = y.numel()
    if M == 0:
        return y
    flat = p.reshape(n, M)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    # about 4096 fp32 values per program on the GPU (16 KiB in flight), few large programs interpreted
    block = runtime.pow2_at_most(M, 1 << 16 if runtime.interpreting() else max(128, 4096 // n))
    _tree_sum_kernel[(runtime.cdiv(M, block),)](flat, y, M, flat.stride(0), LEAVES=n, LEVELS=n.bit_length() - 1,
                                                BLOCK=block, BY_BITS=round_by_bits(dtype),
                                                num_warps=1 if runtime.interpreting() else 4)
    return y
