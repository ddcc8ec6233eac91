"""Batch-invariant dense matmul: out[T, N] = x[T, K] @ w[K, N], fp32 accumulation.

Why stock GEMMs are batch-variant: cuBLAS (and MKL on the CPU) pick a kernel per problem shape, and some
of those kernels split the K reduction across thread blocks (split-K / stream-K) or change the K tile, so
the order in which a row's K products are summed depends on how many rows M the batch has.

What this kernel fixes, for a given (N, K, dtype, device):
  * BLOCK_K, the dot instruction and the order of the K loop;
  * the K *chunks*: K is cut into N_CHUNKS chunks of CHUNK_K (a multiple of BLOCK_K). Each chunk is summed
    from zero, and the chunk sums are added in chunk order:   out = ((0 + c_0) + c_1) + ... + c_{S-1}.
This order is the same whatever M is. Two schedules compute it:
  * fused (large M, enough tiles to fill the GPU): one program walks all chunks of its tile, keeping the
    running total in registers;
  * split (small M, memory-bound decode shapes): one program per (tile, chunk) writes its chunk sum to an
    fp32 workspace, and a second tiny kernel adds the chunks in order. This fills the GPU when M is small
    without making the split depend on M (it depends only on (N, K)).
Both do the same fp32 operations on every element, so a row's bits do not depend on which one ran; the
tests check this bitwise, and also that BLOCK_M (chosen from M on the GPU) does not change a row's bits.

Not for: fp8, or shapes with K so small that the per-call overhead dominates (use torch there if
invariance is not needed).
"""
from __future__ import annotations

import dataclasses

import torch

from kernels import runtime
import triton  # noqa: E402  (after kernels.runtime, which may switch on the interpreter)
import triton.language as tl  # noqa: E402


@triton.jit
def _matmul_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_om, stride_on, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNK_K: tl.constexpr, N_CHUNKS: tl.constexpr, FUSED: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # -- which output tile: grouped ordering so that GROUP_M row-tiles share the same W columns in L2 --
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)   # int64: M*N can pass 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    # -- which K chunks: all of them (fused) or the one named by the second grid axis (split) --
    if FUSED:
        k_lo = 0
        k_hi = N_CHUNKS * CHUNK_K
    else:
        k_lo = tl.program_id(1) * CHUNK_K
        k_hi = k_lo + CHUNK_K

    # -- one flat loop of BLOCK_K steps (the same steps whatever M is). Each chunk is summed from zero in
    #    `acc`; at a chunk's end it is added to `total`: ((0 + c_0) + c_1) + ..., the adds the split
    #    schedule's reduce does. Flat, so the software pipeline keeps prefetching across chunk ends
    #    (a loop nested per chunk gives the same bits and measured the same speed on the H100). --
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(w_ptr + k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if (k0 + BLOCK_K) % CHUNK_K == 0:       # end of a chunk (CHUNK_K is a multiple of BLOCK_K)
            total = total + acc
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # -- write: the final result (fused) or this chunk's fp32 sum into workspace slice c (split) --
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if FUSED:
        tl.store(ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs + tl.program_id(1) * stride_os, total, mask=mask)


@triton.jit
def _sum_chunks_kernel(part_ptr, out_ptr, numel, N_CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = ((0 + part[0, i]) + part[1, i]) + ... : the fused schedule's adds, in the same order."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(N_CHUNKS):
        total = total + tl.load(part_ptr + c * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Tiles for one (N, K, dtype). Everything but BLOCK_M (and the schedule) is fixed per weight shape."""
    BLOCK_N: int
    BLOCK_K: int
    CHUNK_K: int      # K elements per chunk, a multiple of BLOCK_K
    N_CHUNKS: int     # cdiv(K, CHUNK_K): fixed per (N, K), never per M
    num_warps: int = 4
    num_stages: int = 3


def _pow2_at_most(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


def config_for(N: int, K: int, dtype: torch.dtype) -> MatmulConfig:
    """The fixed tiling for a weight of shape [K, N]. Depends on (N, K, dtype, device kind) only."""
    if runtime.interpreting():
        # Few, large programs: each interpreted program costs milliseconds; numpy does the block dot.
        bk = _pow2_at_most(K, 512)
        return MatmulConfig(BLOCK_N=_pow2_at_most(N, 512), BLOCK_K=bk, CHUNK_K=triton.cdiv(K, bk) * bk,
                            N_CHUNKS=1)
    bn = 128 if N >= 2048 else 64 if N >= 64 else _pow2_at_most(N, 64)
    bk = 64 if dtype != torch.float32 else 32
    # Split K only where the N tiles alone cannot fill the GPU (decode): up to ~2 programs per SM at
    # M <= 64, chunks of at least 256. Fixed per (N, K), never per M.
    n_tiles = triton.cdiv(N, bn)
    chunks = 1
    while (n_tiles * chunks * 2 <= 2 * runtime.num_sms() and K % (chunks * 2 * bk) == 0
           and K // (chunks * 2) >= 256):
        chunks *= 2
    chunk_k = triton.cdiv(triton.cdiv(K, chunks), bk) * bk
    return MatmulConfig(BLOCK_N=bn, BLOCK_K=bk, CHUNK_K=chunk_k, N_CHUNKS=triton.cdiv(K, chunk_k),
                        num_stages=4)


def _block_m_for(M: int) -> int:
    """BLOCK_M is the one M-dependent choice; the GPU tests prove it leaves a row's bits unchanged."""
    if runtime.interpreting():
        return 256
    return 64 if M <= 64 else 128


def matmul(x: torch.Tensor, w: torch.Tensor, config: MatmulConfig | None = None,
           fused: bool | None = None, block_m: int | None = None) -> torch.Tensor:
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype, with a reduction order fixed per (N, K, dtype).

    `config`, `fused` and `block_m` are for tests and benchmarks (defaults: `config_for`, automatic).
    """
    # 1. check shapes
    runtime.check_float("x", x)
    runtime.check_device("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if w.dim() != 2 or w.shape[0] != x.shape[1]:
        raise ValueError(f"w must be [K={x.shape[1]}, N], got shape {tuple(w.shape)}")
    runtime.check_like("w", w, "x", x)
    M, K = x.shape
    N = w.shape[1]
    cfg = config or config_for(N, K, x.dtype)
    bm = block_m or _block_m_for(M)
    if fused is None:
        fused = cfg.N_CHUNKS == 1 or triton.cdiv(M, bm) * triton.cdiv(N, cfg.BLOCK_N) >= runtime.num_sms()

    # 2. allocate
    out = runtime.empty((M, N), x.device, x.dtype)
    if M == 0 or N == 0:
        return out
    target = out if fused else runtime.empty((cfg.N_CHUNKS, M, N), x.device, torch.float32)

    # 3. launch
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),
                         1 if fused else cfg.N_CHUNKS)
    _matmul_kernel[grid](
        x, w, target, M, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), target.stride(-2), target.stride(-1),
        0 if fused else target.stride(0),
        BLOCK_M=bm, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, CHUNK_K=cfg.CHUNK_K, N_CHUNKS=cfg.N_CHUNKS,
        FUSED=fused, GROUP_M=8,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        # pipeline depth is a scheduling choice (same dots, same order): 3 stages for the large tiles,
        # which measured faster there than 4 (kernels/NOTES.md, runs 1 and 2)
        num_warps=cfg.num_warps if bm <= 64 else 8, num_stages=cfg.num_stages if bm <= 64 else 3,
    )
    if not fused:
        block = 1024
        _sum_chunks_kernel[(triton.cdiv(M * N, block),)](target, out, M * N, N_CHUNKS=cfg.N_CHUNKS,
                                                         BLOCK=block)
    return out
