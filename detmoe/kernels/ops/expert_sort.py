"""The MoE layer's bookkeeping in one kernel: its (token, slot) assignments sorted by expert, stably,
and each expert's group end.

The stock form (`expert_sort_torch`) is a stable argsort of the expert ids, a gather and a searchsorted
against 0..E-1: about eight launches per layer, each moving a few kilobytes in a decode step, where a
CUDA-graph step is made of such launches. This kernel computes the same two tensors in one launch by
counting: assignment i goes to row

    rank(i) = #{j : e[j] < e[i]} + #{j < i : e[j] == e[i]}

(a stable sort is unique, so the result is identical to the argsort's), and expert e's group ends at
#{j : e[j] <= e}. That is O(N^2) comparisons for N assignments, cheap for the few thousand of a decode
step and not for a prefill's. Above `MAX_ASSIGNMENTS` the same ranks come from counts, in two launches
(a counting sort): each block of assignments counts its rows per expert, then each block places its
rows at

    rank(i) = #{j : e[j] < e[i]} + #{j in earlier blocks : e[j] == e[i]} + #{j < i in i's block : e[j] == e[i]}

which is the same number. No value is read back to the host, so a step stays capturable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from detmoe.kernels import runtime

# above this many assignments the O(N^2) comparison costs more than the counting sort's second launch
MAX_ASSIGNMENTS = 4096
# the counting sort: assignments per block (one program each), and per step of a block's prefix count
COUNT_BLOCK, COUNT_STEP = 1024, 128


@triton.jit
def _expert_sort_kernel(e_ptr, order_ptr, offsets_ptr, N, E, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    pid = tl.program_id(0)
    i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < N
    e_i = tl.load(e_ptr + i, mask=i_ok, other=0)
    # the experts whose group end this program counts (the same rows of the comparison, read as ids)
    ids = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    ends = tl.zeros([BLOCK_I], dtype=tl.int32)
    for start in range(0, N, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        j_ok = j < N
        e_j = tl.load(e_ptr + j, mask=j_ok, other=0)
        before = (e_j[None, :] < e_i[:, None]) | ((e_j[None, :] == e_i[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((before & j_ok[None, :]).to(tl.int32), axis=1)
        ends += tl.sum(((e_j[None, :] <= ids[:, None]) & j_ok[None, :]).to(tl.int32), axis=1)
    tl.store(order_ptr + rank, i.to(tl.int64), mask=i_ok)
    tl.store(offsets_ptr + ids, ends, mask=ids < E)


@triton.jit
def _count_kernel(e_ptr, counts_ptr, N, BLOCK: tl.constexpr, STEP: tl.constexpr, E_POW2: tl.constexpr):
    """counts[b, e] = rows of block b (assignments b*BLOCK .. b*BLOCK + BLOCK - 1) routed to expert e."""
    b = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    count = tl.zeros([E_POW2], dtype=tl.int32)
    for s in range(0, BLOCK, STEP):
        i = b * BLOCK + s + tl.arange(0, STEP)
        e_i = tl.load(e_ptr + i, mask=i < N, other=E_POW2)          # past N: no expert's
        count += tl.sum((e_i[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + b * E_POW2 + experts, count)


@triton.jit
def _place_kernel(e_ptr, counts_ptr, order_ptr, offsets_ptr, N, E, n_blocks, BLOCK: tl.constexpr,
                  STEP: tl.constexpr, E_POW2: tl.constexpr):
    """Block b writes each of its assignments i at rank(i) (module docstring); block 0 also writes the
    group ends."""
    b = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    total = tl.zeros([E_POW2], dtype=tl.int32)
    earlier = tl.zeros([E_POW2], dtype=tl.int32)      # rows per expert in the blocks before b
    for c in range(0, n_blocks):
        row = tl.load(counts_ptr + c * E_POW2 + experts)
        total += row
        earlier += tl.where(c < b, row, 0)
    ends = tl.cumsum(total, axis=0)
    if b == 0:
        tl.store(offsets_ptr + experts, ends, mask=experts < E)
    base = ends - total + earlier                      # where block b's first row of each expert goes
    for s in range(0, BLOCK, STEP):
        i = b * BLOCK + s + tl.arange(0, STEP)
        i_ok = i < N
        e_i = tl.load(e_ptr + i, mask=i_ok, other=E_POW2)
        hit = (e_i[:, None] == experts[None, :]).to(tl.int32)       # [STEP, E_POW2] one-hot
        before = tl.cumsum(hit, axis=0) - hit                         # same-expert rows earlier in the step
        rank = tl.sum(hit * (base[None, :] + before), axis=1)
        tl.store(order_ptr + rank, i.to(tl.int64), mask=i_ok)
        base += tl.sum(hit, axis=0)


def expert_sort(flat_experts: torch.Tensor, n_experts: int, by_counts: bool | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`expert_sort_torch`'s result: flat_experts [N] int (each in 0..E-1). Up to `MAX_ASSIGNMENTS`
    assignments in one launch (comparisons), above in two (counts); `by_counts` (a test hook) forces
    one of the two."""
    runtime.check_device("flat_experts", flat_experts)
    if flat_experts.dim() != 1 or flat_experts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"flat_experts must be a 1-D int32/int64 tensor, got {flat_experts.dtype} of shape "
                         f"{tuple(flat_experts.shape)}")
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    N = flat_experts.shape[0]
    order = runtime.empty((N,), flat_experts.device, torch.int64)
    offsets = runtime.empty((n_experts,), flat_experts.device, torch.int32)
    e = flat_experts if flat_experts.stride(0) == 1 else flat_experts.contiguous()
    if by_counts if by_counts is not None else N > MAX_ASSIGNMENTS:
        e_pow2 = runtime.next_pow2(n_experts)
        n_blocks = max(runtime.cdiv(N, COUNT_BLOCK), 1)
        counts = runtime.empty((n_blocks, e_pow2), flat_experts.device, torch.int32)
        _count_kernel[(n_blocks,)](e, counts, N, BLOCK=COUNT_BLOCK, STEP=COUNT_STEP, E_POW2=e_pow2)
        _place_kernel[(n_blocks,)](e, counts, order, offsets, N, n_experts, n_blocks, BLOCK=COUNT_BLOCK,
                                   STEP=COUNT_STEP, E_POW2=e_pow2)
        return order, offsets
    # interpreted: few programs, a [block_i, block_j] comparison tile of at most 2**20 elements
    # on the GPU 16 assignments per program: a decode step's few hundred spread over more SMs (64 per
    # program ran 512 assignments in only 8 programs; timings in detmoe/kernels/NOTES.md)
    block_i = 16 if not runtime.interpreting() else runtime.pow2_at_most(max(N, n_experts), 1024)
    block_j = 128 if not runtime.interpreting() else runtime.pow2_at_most(N, 1024)
    grid = (runtime.cdiv(max(N, n_experts), block_i),)
    _expert_sort_kernel[grid](e, order, offsets, N, n_experts, BLOCK_I=block_i, BLOCK_J=max(block_j, 1),
                              num_warps=4 if not runtime.interpreting() else 1)
    return order, offsets
