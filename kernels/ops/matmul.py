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
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
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
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_cols = w_ptr + offs_n[None, :] * stride_wn
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N

    # -- which K chunks: all of them (fused) or the one named by the second grid axis (split) --
    if FUSED:
        k_lo = 0
        k_hi = N_CHUNKS * CHUNK_K
    else:
        k_lo = tl.program_id(1) * CHUNK_K
        k_hi = k_lo + CHUNK_K

    # -- one flat loop of BLOCK_K steps, the same steps whatever M is. With one chunk (the usual case)
    #    there is one accumulator. With several, each chunk is summed from zero in `acc` and added to
    #    `total` at its end: ((0 + c_0) + c_1) + ..., the adds the split schedule's reduce does. (The
    #    second accumulator doubles the registers a tile needs, which is why one chunk is preferred.) --
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            a = tl.load(x_rows + k[None, :] * stride_xk, mask=m_ok, other=0.0)
            b = tl.load(w_cols + k[:, None] * stride_wk, mask=n_ok, other=0.0)
        else:
            a = tl.load(x_rows + k[None, :] * stride_xk, mask=m_ok & (k[None, :] < K), other=0.0)
            b = tl.load(w_cols + k[:, None] * stride_wk, mask=n_ok & (k[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if N_CHUNKS > 1:
            if (k0 + BLOCK_K) % CHUNK_K == 0:       # end of a chunk (CHUNK_K is a multiple of BLOCK_K)
                total = total + acc
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if N_CHUNKS == 1:
        total = acc

    # -- write: the final result (fused) or this chunk's fp32 sum into workspace slice c (split) --
    mask = m_ok & n_ok
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
class Reduction:
    """How a row's K products are summed. Fixed per (N, K, dtype, device kind): this alone sets the bits."""
    BLOCK_K: int
    CHUNK_K: int      # K elements per chunk, a multiple of BLOCK_K
    N_CHUNKS: int     # cdiv(K, CHUNK_K); 1 = no split-K


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How the output is cut into programs, chosen per M. The dense-M GPU test shows these leave a
    row's bits unchanged (a tile only decides which rows and columns share a program, not the K order)."""
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int = 4
    num_stages: int = 3


def _pow2_at_most(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


def reduction_for(N: int, K: int, dtype: torch.dtype) -> Reduction:
    """The fixed K order for a weight of shape [K, N]: one BLOCK_K-step loop, no split-K."""
    if runtime.interpreting():
        # Few, large programs: each interpreted program costs milliseconds; numpy does the block dot.
        bk = _pow2_at_most(K, 512)
    else:
        bk = BLOCK_K_GPU[dtype == torch.float32]
    return Reduction(BLOCK_K=bk, CHUNK_K=triton.cdiv(K, bk) * bk, N_CHUNKS=1)


# GPU BLOCK_K for 16-bit inputs / fp32 inputs (one wgmma chain per 64 K elements for bf16).
BLOCK_K_GPU = {False: 64, True: 32}
# GPU tiles by the number of rows M: (largest M of the bucket, Tiles). Small M is memory-bound, so narrow
# column tiles spread the weight over every SM; large M takes wide tiles with 8 warps.
TILES_GPU: list[tuple[int, Tiles]] = [
    (64, Tiles(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)),
    (2**62, Tiles(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)),
]


def tiles_for(M: int, N: int) -> Tiles:
    """Output tiles for M rows: the one M-dependent choice (proved bit-neutral by the GPU tests)."""
    if runtime.interpreting():
        return Tiles(BLOCK_M=256, BLOCK_N=_pow2_at_most(N, 512))
    for max_m, tiles in TILES_GPU:
        if M <= max_m:
            return tiles
    raise AssertionError("TILES_GPU must end with an unbounded bucket")


def matmul(x: torch.Tensor, w: torch.Tensor, reduction: Reduction | None = None,
           tiles: Tiles | None = None, fused: bool | None = None) -> torch.Tensor:
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype, with a reduction order fixed per (N, K, dtype).

    `reduction`, `tiles` and `fused` are for tests and benchmarks (defaults: `reduction_for`,
    `tiles_for`, fused whenever there is one chunk or enough tiles to fill the GPU).
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
    red = reduction or reduction_for(N, K, x.dtype)
    t = tiles or tiles_for(M, N)
    n_tiles = triton.cdiv(M, t.BLOCK_M) * triton.cdiv(N, t.BLOCK_N)
    if fused is None:
        fused = red.N_CHUNKS == 1 or n_tiles >= runtime.num_sms()

    # 2. allocate
    out = runtime.empty((M, N), x.device, x.dtype)
    if M == 0 or N == 0:
        return out
    target = out if fused else runtime.empty((red.N_CHUNKS, M, N), x.device, torch.float32)

    # 3. launch
    _matmul_kernel[(n_tiles, 1 if fused else red.N_CHUNKS)](
        x, w, target, M, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), target.stride(-2), target.stride(-1),
        0 if fused else target.stride(0),
        BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=red.BLOCK_K, CHUNK_K=red.CHUNK_K,
        N_CHUNKS=red.N_CHUNKS, FUSED=fused, GROUP_M=8, EVEN_K=K % red.BLOCK_K == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    if not fused:
        block = 1024
        _sum_chunks_kernel[(triton.cdiv(M * N, block),)](target, out, M * N, N_CHUNKS=red.N_CHUNKS,
                                                         BLOCK=block)
    return out
