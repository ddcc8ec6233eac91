"""Batch-invariant dense matmul: out[T, N] = x[T, K] @ w[K, N], fp32 accumulation.

Why stock GEMMs are batch-variant: cuBLAS (and MKL on the CPU) pick a kernel per problem shape, and some
of those kernels split the K reduction across thread blocks (split-K / stream-K) or change the K tile, so
the order in which a row's K products are summed depends on how many rows M the batch has.

What this kernel fixes, for a given (N, K, dtype, device), is the `Reduction`: one program sums a row's
whole K range, in K order, with a fixed dot instruction; no split-K. What it lets M choose are the
`Tiles`: which rows and columns share a program, the warps and the pipeline depth, and on the GPU the
loop step BLOCK_K (a tl.dot there is a chain of 16-deep MMA steps into one accumulator, so the step only
groups the same steps). A row's bits therefore do not depend on M; the GPU test sweeps M densely
(every M up to 300, then up to 4096) and forces every entry of TILES_GPU to prove it.

Small M (decode) is memory-bound; instead of splitting K (which a fixed order would then impose on
every M, with a second accumulator that slows large M by ~1.5x), small M takes narrow column tiles so
that the weight streams through every SM. A chunked K order (`Reduction.N_CHUNKS` > 1, chunk sums added
in order, run fused or split into a workspace) is kept for shapes that need it; no default uses it.

Not for: fp8, or shapes with K so small that the per-call overhead dominates (use torch there if
invariance is not needed).
"""
from __future__ import annotations

import dataclasses
import functools

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
    """How a row's K products are summed: fixed per (N, K, dtype, device kind). The K loop step BLOCK_K is
    part of it under the interpreter; on the GPU a tile may regroup the same steps (Tiles.BLOCK_K)."""
    BLOCK_K: int
    CHUNK_K: int      # K elements per chunk, a multiple of BLOCK_K
    N_CHUNKS: int     # cdiv(K, CHUNK_K); 1 = no split-K


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How the output is cut into programs, chosen per M. The dense-M GPU test shows these leave a
    row's bits unchanged: a tile decides which rows and columns share a program, and at most how many
    of the same 16-deep MMA steps one loop trip takes (BLOCK_K), not their order."""
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int = 4
    num_stages: int = 3
    # GPU only, with one chunk: step K by this many elements instead of the reduction's BLOCK_K. On the
    # GPU a tl.dot is a chain of 16-deep MMA (or FMA) steps into the accumulator, in K order, so the loop
    # step only groups those steps (tune_kernels.py measured 64 and 128 bit-identical; the dense-M test
    # checks every bucket). Not under the interpreter, where a block dot is one BLAS call per row.
    BLOCK_K: int | None = None


@functools.lru_cache(maxsize=4096)
def reduction_for(N: int, K: int, dtype: torch.dtype) -> Reduction:
    """The fixed K order for a weight of shape [K, N]: one BLOCK_K-step loop, no split-K."""
    if runtime.interpreting():
        # Few, large programs: each interpreted program costs milliseconds; numpy does the block dot.
        bk = runtime.pow2_at_most(K, 512)
    else:
        bk = BLOCK_K_GPU_FP32 if dtype == torch.float32 else BLOCK_K_GPU
    return Reduction(BLOCK_K=bk, CHUNK_K=runtime.cdiv(K, bk) * bk, N_CHUNKS=1)


# GPU BLOCK_K for 16-bit inputs and for fp32 inputs (one wgmma chain per 64 K elements for bf16).
BLOCK_K_GPU, BLOCK_K_GPU_FP32 = 64, 32

# GPU tiles by weight width N, then by rows M: {largest N: [(largest M, Tiles), ...]}. Chosen from an
# H100 run of experiments/tune_kernels.py (experiments/results/tune_20261125/; N <= 1024 from its
# `--only narrow` run, tune_narrow.csv): the best geometric mean
# over the benchmark shapes of each (N, M) bucket, among candidates with unchanged row bits. Small M is
# memory-bound: narrow tiles spread the weight over the SMs, and a 128-deep K step halves the loop trips.
# Large M takes 128x256 tiles with 8 warps. fp32 uses the same tiles (BLOCK_K from BLOCK_K_GPU_FP32).
# Keys: N <= 1024 (narrow), N < 8192, any N.
_BIG = 2**62
TILES_GPU: dict[int, list[tuple[int, Tiles]]] = {
    1024: [(64, Tiles(64, 32, 4, 4, BLOCK_K=128)), (256, Tiles(64, 32, 4, 5, BLOCK_K=128)),
           (1024, Tiles(64, 128, 8, 4, BLOCK_K=128)), (4096, Tiles(64, 128, 4, 3)),
           (_BIG, Tiles(128, 256, 8, 4))],
    8191: [(64, Tiles(64, 64, 4, 5, BLOCK_K=128)), (256, Tiles(64, 128, 4, 4, BLOCK_K=128)),
           (_BIG, Tiles(128, 256, 8, 3))],
    _BIG: [(64, Tiles(64, 128, 4, 4)), (_BIG, Tiles(128, 256, 8, 4))],
}


@functools.lru_cache(maxsize=4096)
def tiles_for(M: int, N: int, fp32: bool = False) -> Tiles:
    """Output tiles for M rows: the one M-dependent choice (proved bit-neutral by the GPU tests)."""
    if runtime.interpreting():
        return Tiles(BLOCK_M=256, BLOCK_N=runtime.pow2_at_most(N, 512))
    by_m = next(table for max_n, table in TILES_GPU.items() if N <= max_n)
    tiles = next(t for max_m, t in by_m if M <= max_m)
    # fp32 keeps the fixed BLOCK_K (its ieee dot is an FMA loop with twice the bytes per element)
    return dataclasses.replace(tiles, BLOCK_K=None) if fp32 else tiles


@functools.lru_cache(maxsize=4096)
def _stepped(red: Reduction, block_k: int, K: int) -> Reduction:
    """The same one-chunk reduction, looped in steps of block_k (GPU only; see Tiles.BLOCK_K). A chunked
    reduction, or the interpreter, keeps its own BLOCK_K: there the step is part of the order."""
    if red.N_CHUNKS != 1 or runtime.interpreting():
        return red
    return Reduction(BLOCK_K=block_k, CHUNK_K=runtime.cdiv(K, block_k) * block_k, N_CHUNKS=1)


def matmul(x: torch.Tensor, w: torch.Tensor, reduction: Reduction | None = None,
           tiles: Tiles | None = None, fused: bool | None = None) -> torch.Tensor:
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype, with a reduction order fixed per (N, K, dtype).

    `reduction`, `tiles` and `fused` are for tests and benchmarks (defaults: `reduction_for`,
    `tiles_for`, fused whenever there is one chunk or enough tiles to fill the GPU). An explicit
    `reduction` runs as given: a tile's BLOCK_K step applies only to the default one.
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
    t = tiles or tiles_for(M, N, x.dtype == torch.float32)
    if reduction is None and t.BLOCK_K is not None and t.BLOCK_K != red.BLOCK_K and K % t.BLOCK_K == 0:
        # only where K is a whole number of the tile's steps: a zero-padded last step would add +0.0
        # products that the reduction's own step does not (a -0.0 sum would come out +0.0)
        red = _stepped(red, t.BLOCK_K, K)
    n_tiles = runtime.cdiv(M, t.BLOCK_M) * runtime.cdiv(N, t.BLOCK_N)
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
        _sum_chunks_kernel[(runtime.cdiv(M * N, block),)](target, out, M * N, N_CHUNKS=red.N_CHUNKS,
                                                         BLOCK=block)
    return out
