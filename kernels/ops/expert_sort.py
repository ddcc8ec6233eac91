"""The MoE layer's bookkeeping in one kernel: its (token, slot) assignments sorted by expert, stably,
and each expert's group end.

The stock form (`expert_sort_torch`) is a stable argsort of the expert ids, a gather and a searchsorted
against 0..E-1: about eight launches per layer, each moving a few kilobytes in a decode step, where a
CUDA-graph step is made of such launches. This kernel computes the same two tensors in one launch by
counting: assignment i goes to row

    rank(i) = #{j : e[j] < e[i]} + #{j < i : e[j] == e[i]}

(a stable sort is unique, so the result is identical to the argsort's), and expert e's group ends at
#{j : e[j] <= e}. That is O(N^2) comparisons for N assignments, cheap for the few thousand of a decode
step and not for a prefill's: `MAX_ASSIGNMENTS` bounds where the launcher uses it (the backend keeps
the stock form above). No value is read back to the host, so the step stays capturable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import runtime

# above this many assignments the O(N^2) count costs more than the sort's launches save
MAX_ASSIGNMENTS = 4096


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


def expert_sort_torch(flat_experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock form: (order [N] int64, the assignments stably sorted by expert; offsets [E] int32, each
    expert's group end in that order), by argsort and searchsorted (no host sync)."""
    order = torch.argsort(flat_experts, stable=True)
    ids = torch.arange(n_experts, device=order.device, dtype=flat_experts.dtype)
    offsets = torch.searchsorted(flat_experts[order], ids, right=True).to(torch.int32)
    return order, offsets


def expert_sort(flat_experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`expert_sort_torch`'s result in one kernel: flat_experts [N] int (each in 0..E-1), N at most
    `MAX_ASSIGNMENTS`."""
    runtime.check_device("flat_experts", flat_experts)
    if flat_experts.dim() != 1 or flat_experts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"flat_experts must be a 1-D int32/int64 tensor, got {flat_experts.dtype} of shape "
                         f"{tuple(flat_experts.shape)}")
    N = flat_experts.shape[0]
    if N > MAX_ASSIGNMENTS:
        raise ValueError(f"expert_sort takes at most MAX_ASSIGNMENTS={MAX_ASSIGNMENTS} assignments, got {N}")
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    order = runtime.empty((N,), flat_experts.device, torch.int64)
    offsets = runtime.empty((n_experts,), flat_experts.device, torch.int32)
    e = flat_experts if flat_experts.stride(0) == 1 else flat_experts.contiguous()
    # interpreted: few programs, a [block_i, block_j] comparison tile of at most 2**20 elements
    # on the GPU 16 assignments per program: a decode step's few hundred spread over more SMs (64 per
    # program took 11 us for 512 assignments on an H200, in 8 programs)
    block_i = 16 if not runtime.interpreting() else runtime.pow2_at_most(max(N, n_experts), 1024)
    block_j = 128 if not runtime.interpreting() else runtime.pow2_at_most(N, 1024)
    grid = (runtime.cdiv(max(N, n_experts), block_i),)
    _expert_sort_kernel[grid](e, order, offsets, N, n_experts, BLOCK_I=block_i, BLOCK_J=max(block_j, 1),
                              num_warps=4 if not runtime.interpreting() else 1)
    return order, offsets
