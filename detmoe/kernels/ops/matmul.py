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
every M, with a second accumulator that slowed large M: docs/kernels.md), small M takes narrow
column tiles so that the weight streams through every SM.

Not for: fp8, or shapes with K so small that the per-call overhead dominates (use torch there if
invariance is not needed).
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from detmoe.kernels import runtime
from detmoe.kernels.ops.rounding import round_by_bits, rounded_through, rounded_to
from detmoe.kernels.ops.tree_sum import tree_sum
from detmoe.kernels.torch_backend import tree_sum_torch
import triton  # noqa: E402  (after kernels.runtime, which may switch on the interpreter)
import triton.language as tl  # noqa: E402


@triton.jit
def _k_range(x_rows, w_cols, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """One K range [0, K) of the tile's rows and columns in BLOCK_K steps, in K order, into one fresh fp32
    accumulator: the same steps whatever M is (no split-K)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            a = tl.load(x_rows + k[None, :] * stride_xk, mask=m_ok, other=0.0)
            b = tl.load(w_cols + k[:, None] * stride_wk, mask=n_ok, other=0.0)
        else:
            a = tl.load(x_rows + k[None, :] * stride_xk, mask=m_ok & (k[None, :] < K), other=0.0)
            b = tl.load(w_cols + k[:, None] * stride_wk, mask=n_ok & (k[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _k_ranges_at_once(x_rows, w_cols, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                      AT_ONCE: tl.constexpr):
    """AT_ONCE (2 or 4) consecutive K chunks of K each in ONE loop, each into its own fresh accumulator,
    then added in the tree's order ((c0 + c1) + (c2 + c3)). Each accumulator takes the same BLOCK_K steps
    in the same order as `_k_range` would give it, so the bits are those of the chunks run one after
    another; what changes is that the loads run ahead across all of them (one pipeline fill, not one
    per chunk)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        if EVEN_K:   # every step whole: a test the compiler folds away
            k_ok = k >= 0
        a_ok, b_ok = m_ok & k_ok[None, :], n_ok & k_ok[:, None]
        xa = x_rows + k[None, :] * stride_xk
        wb = w_cols + k[:, None] * stride_wk
        acc0 = tl.dot(tl.load(xa, mask=a_ok, other=0.0), tl.load(wb, mask=b_ok, other=0.0), acc0,
                      input_precision=PRECISION)
        acc1 = tl.dot(tl.load(xa + K * stride_xk, mask=a_ok, other=0.0),
                      tl.load(wb + K * stride_wk, mask=b_ok, other=0.0), acc1, input_precision=PRECISION)
        if AT_ONCE == 4:
            acc2 = tl.dot(tl.load(xa + 2 * K * stride_xk, mask=a_ok, other=0.0),
                          tl.load(wb + 2 * K * stride_wk, mask=b_ok, other=0.0), acc2, input_precision=PRECISION)
            acc3 = tl.dot(tl.load(xa + 3 * K * stride_xk, mask=a_ok, other=0.0),
                          tl.load(wb + 3 * K * stride_wk, mask=b_ok, other=0.0), acc3, input_precision=PRECISION)
    if AT_ONCE == 4:
        return (acc0 + acc1) + (acc2 + acc3)
    return acc0 + acc1


@triton.jit
def _k_pair(x_rows, w_cols, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, AT_ONCE: tl.constexpr):
    """Two consecutive K chunks of K each, each from a fresh accumulator, added: one pair of a tree's leaves
    (one after the other, or both in one loop: the same bits)."""
    if AT_ONCE == 1:
        first = _k_range(x_rows, w_cols, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                         PRECISION)
        return first + _k_range(x_rows + K * stride_xk, w_cols + K * stride_wk, m_ok, n_ok, K, stride_xk,
                                stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION)
    return _k_ranges_at_once(x_rows, w_cols, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K,
                             EVEN_K, PRECISION, 2)


@triton.jit
def k_chunk_tree(x_rows, w_cols, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, SUMMED: tl.constexpr,
                 AT_ONCE: tl.constexpr):
    """The tile's K chunks 0..SUMMED-1 (K each), each from a fresh accumulator, added in tree_sum.py's
    tree, pair by pair: ((c0 + c1) + (c2 + c3)) + ((c4 + c5) + (c6 + c7)). One chunk: a plain K loop.
    AT_ONCE (Tiles.chunks_per_loop: 1, 2 or 4) chunks share one loop; the bits do not depend on it.
    The grouped GEMM runs the same steps (EVEN_K=False: its K loads are always masked)."""
    if SUMMED == 1:
        acc = _k_range(x_rows, w_cols, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                       PRECISION)
    elif AT_ONCE == 4 and SUMMED >= 4:
        dx, dw = 4 * K * stride_xk, 4 * K * stride_wk    # from one quad of K chunks to the next
        acc = _k_ranges_at_once(x_rows, w_cols, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K,
                                EVEN_K, PRECISION, 4)
        if SUMMED == 8:
            acc = acc + _k_ranges_at_once(x_rows + dx, w_cols + dw, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M,
                                          BLOCK_N, BLOCK_K, EVEN_K, PRECISION, 4)
    else:
        pair = 1 if AT_ONCE == 1 else 2
        dx, dw = 2 * K * stride_xk, 2 * K * stride_wk    # from one pair of K chunks to the next
        acc = _k_pair(x_rows, w_cols, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                      PRECISION, pair)
        if SUMMED >= 4:
            acc = acc + _k_pair(x_rows + dx, w_cols + dw, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N,
                                BLOCK_K, EVEN_K, PRECISION, pair)
        if SUMMED == 8:
            acc = acc + (_k_pair(x_rows + 2 * dx, w_cols + 2 * dw, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M,
                                 BLOCK_N, BLOCK_K, EVEN_K, PRECISION, pair)
                         + _k_pair(x_rows + 3 * dx, w_cols + 3 * dw, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M,
                                   BLOCK_N, BLOCK_K, EVEN_K, PRECISION, pair))
    return acc


@triton.jit(do_not_specialize_on_alignment=["M"])
def _matmul_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_om, stride_on, stride_oc,
    w2_ptr, w3_ptr, N1, N2, stride_wk2, stride_wk3,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, SUMMED: tl.constexpr, BY_BITS: tl.constexpr,
    THREE: tl.constexpr, AT_ONCE: tl.constexpr, WIDEN: tl.constexpr,
):
    """THREE: the output's N columns are those of three weights side by side, w [K, N1], w2 [K, N2] and
    w3 [K, N - N1 - N2] (N1 and N2 whole numbers of BLOCK_N, so a tile reads one weight)."""
    # -- which K chunk (grid axis 1): chunk c sums x's K range [c*K, (c+1)*K) into its own output
    #    out[c]; a plain matmul is the one chunk 0. SUMMED > 1: this program computes chunks
    #    0..SUMMED-1 itself and adds them in tree_sum.py's tree (grid axis 1 is then 1) --
    chunk = tl.program_id(1).to(tl.int64)
    x_ptr += chunk * K * stride_xk
    w_ptr += chunk * K * stride_wk
    out_ptr += chunk * stride_oc

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
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    if THREE:   # which weight this tile's columns come from, and where in it
        second, third = pid_n * BLOCK_N >= N1, pid_n * BLOCK_N >= N1 + N2
        w_ptr = tl.where(third, w3_ptr, tl.where(second, w2_ptr, w_ptr))
        stride_wk = tl.where(third, stride_wk3, tl.where(second, stride_wk2, stride_wk))
        first_col = tl.where(third, N1 + N2, tl.where(second, N1, 0))
        w_cols = w_ptr + (offs_n - first_col)[None, :] * stride_wn
    else:
        w_cols = w_ptr + offs_n[None, :] * stride_wn
    acc = k_chunk_tree(x_rows, w_cols, m_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                       PRECISION, SUMMED, AT_ONCE)
    if WIDEN:   # rounded to x's dtype as a plain launch rounds it, then stored in out's wider dtype
        val = rounded_through(acc, x_ptr.dtype.element_ty, BY_BITS)
    else:
        val = rounded_to(acc, out_ptr.dtype.element_ty, BY_BITS)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, val, mask=m_ok & n_ok)


@dataclasses.dataclass(frozen=True)
class Reduction:
    """How a row's K products are summed: one program, the whole K range in K order, in steps of BLOCK_K.
    Fixed per (N, K, dtype, device kind). The step is part of the order under the interpreter; on the
    GPU a tile may regroup the same MMA steps into a longer loop step (Tiles.BLOCK_K)."""
    BLOCK_K: int


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How the output is cut into programs, chosen per M. The dense-M GPU test shows these leave a
    row's bits unchanged: a tile decides which rows and columns share a program, and at most how many
    of the same 16-deep MMA steps one loop trip takes (BLOCK_K), not their order."""
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int = 4
    num_stages: int = 3
    # GPU only: step K by this many elements instead of the reduction's BLOCK_K. On the
    # GPU a tl.dot is a chain of 16-deep MMA (or FMA) steps into the accumulator, in K order, so the loop
    # step only groups those steps (tune_kernels.py measured 64 and 128 bit-identical; the dense-M test
    # checks every bucket). Not under the interpreter, where a block dot is one BLAS call per row.
    BLOCK_K: int | None = None
    # Summed chunk trees only (matmul_chunk_sum, grouped_matmul_chunk_sum): how many K chunks one loop
    # walks side by side, each into its own accumulator (1, 2 or 4). The same steps per accumulator, so the
    # same bits; more chunks per loop keep the loads running across them, at one more accumulator for 4.
    chunks_per_loop: int = 1

    def __post_init__(self):
        if self.chunks_per_loop not in (1, 2, 4):
            raise ValueError(f"chunks_per_loop must be 1, 2 or 4, got {self.chunks_per_loop!r}")


@functools.lru_cache(maxsize=4096)
def reduction_for(N: int, K: int, dtype: torch.dtype) -> Reduction:
    """The fixed K order for a weight of shape [K, N]: one BLOCK_K-step loop, no split-K."""
    if runtime.interpreting():
        # Few, large programs: each interpreted program costs milliseconds; numpy does the block dot.
        bk = runtime.pow2_at_most(K, 512)
    else:
        bk = BLOCK_K_GPU_FP32 if dtype == torch.float32 else BLOCK_K_GPU
    return Reduction(BLOCK_K=bk)


# GPU BLOCK_K for 16-bit inputs and for fp32 inputs (one wgmma chain per 64 K elements for bf16).
BLOCK_K_GPU, BLOCK_K_GPU_FP32 = 64, 32

# GPU tiles by weight width N, then by rows M: {largest N: [(largest M, Tiles), ...]}. Chosen from an
# H100 run of benchmarks/tune_kernels.py (benchmarks/results/kernels/tune_matmul/; N <= 1024 from its
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


def matmul(x: torch.Tensor, w: torch.Tensor, reduction: Reduction | None = None,
           tiles: Tiles | None = None) -> torch.Tensor:
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype, with a reduction order fixed per (N, K, dtype).

    `reduction` and `tiles` are for tests and benchmarks (defaults: `reduction_for`, `tiles_for`). An
    explicit `reduction` runs as given: a tile's BLOCK_K step applies only to the default one.
    """
    _check(x, w)
    out = runtime.empty((x.shape[0], w.shape[1]), x.device, x.dtype)
    return _launch(x, w, out, 1, reduction, tiles)


def matmul_widened(x: torch.Tensor, w: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """`matmul(x, w).float()` bit for bit in one pass -> [M, N] fp32: the product rounded to x's dtype
    as `matmul` rounds it, stored widened (the model's logits, whose separate conversion read and wrote
    the whole [tokens, vocab] again). Under the interpreter, whose bf16 conversion is its own, the
    composition runs; `fused` (a test hook) forces the one-pass kernel (exact there for fp16 and fp32)."""
    _check(x, w)
    use_kernel = not runtime.interpreting() if fused is None else fused
    if use_kernel:
        out = runtime.empty((x.shape[0], w.shape[1]), x.device, torch.float32)
        return _launch(x, w, out, 1, None, None, widen=True)
    return matmul(x, w).float()


def matmul_three(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                 tiles: Tiles | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x @ w1, x @ w2, x @ w3) in one launch, each with `matmul`'s bits: on the GPU the tiles only say
    which columns share a program, and every column keeps its K order (a query, key and value projection
    reads x once and launches once, with no concatenated weight). Returns views into one [M, N1+N2+N3]
    buffer. Three launches instead where one would not give those bits or cannot address the weights:
    N1 or N2 not a whole number of the launch's BLOCK_N, column strides that differ, or (under the
    interpreter, whose block dot sums a column by the block's width) a weight whose own BLOCK_N differs.
    `tiles` (a test hook) sets the one launch's tiles."""
    for w in (w1, w2, w3):
        _check(x, w)
    M, fp32 = x.shape[0], x.dtype == torch.float32
    widths = [w.shape[1] for w in (w1, w2, w3)]
    t = tiles or tiles_for(M, sum(widths), fp32)
    one_launch = (widths[0] % t.BLOCK_N == 0 and widths[1] % t.BLOCK_N == 0
                  and w1.stride(1) == w2.stride(1) == w3.stride(1)
                  and (tiles is not None or not runtime.interpreting()
                       or all(tiles_for(M, n, fp32).BLOCK_N == t.BLOCK_N for n in widths)))
    if not one_launch:
        return matmul(x, w1), matmul(x, w2), matmul(x, w3)
    out = runtime.empty((M, sum(widths)), x.device, x.dtype)
    _launch(x, w1, out, 1, None, t, more=(w2, w3))
    return tuple(out.split(widths, dim=1))


def matmul_partials(x: torch.Tensor, w: torch.Tensor, chunks: int) -> torch.Tensor:
    """The K axis cut into `chunks` equal chunks: [chunks, M, N] fp32, chunk c = x[:, c*Kc:(c+1)*Kc] @
    w[c*Kc:(c+1)*Kc] (Kc = K / chunks), unrounded, each summed exactly as `matmul` sums a K of Kc.

    For row-parallel layers: a rank holding chunks c0..c1 of K computes the same bits for them as one
    device holding all of K, and the partials are added in a fixed order afterwards (detmoe/moe/parallel.py).
    One launch (the chunks are a grid axis)."""
    _check(x, w)
    M, K = x.shape
    check_chunks(chunks, K)
    out = runtime.empty((chunks, M, w.shape[1]), x.device, torch.float32)
    return _launch(x, w, out, chunks, None, None)


def matmul_chunk_sum(x: torch.Tensor, w: torch.Tensor, chunks: int, dtype: torch.dtype,
                     tiles: Tiles | None = None) -> torch.Tensor:
    """`tree_sum(matmul_partials(x, w, chunks), dtype)` bit for bit -> [M, N] in `dtype`; chunks: a power
    of two. Where it pays (`one_kernel_sum`), in one kernel that never writes the partials: each program
    computes its tile's chunks (one after another, or `Tiles.chunks_per_loop` side by side), adds them in
    the tree's order in registers and rounds once. `tiles` (a test hook) forces the one-kernel form with those tiles."""
    _check(x, w)
    M, K = x.shape
    check_chunk_tree(chunks, K, dtype, tiles)
    if tiles is None and not one_kernel_sum(chunks, K, M):
        return tree_of(matmul_partials(x, w, chunks), dtype)
    out = runtime.empty((M, w.shape[1]), x.device, dtype)
    if tiles is None:
        tiles = (tiles_for(M, w.shape[1], x.dtype == torch.float32) if runtime.interpreting()
                 else fit_for_chunk_sum(next(t for max_m, t in CHUNK_SUM_TILES if M <= max_m), chunks))
    return _launch(x, w, out, chunks, None, tiles, summed=True)


# The chunk counts the summed kernels write out (their trees are unrolled in the kernel).
CHUNK_SUM_LEAVES = (1, 2, 4, 8)
# When the tree runs inside the GEMM: where the whole K (all the chunks, which one program walks) is at
# most CHUNK_SUM_MAX_K, or the rows are from CHUNK_SUM_MIN_ROWS to CHUNK_SUM_MAX_ROWS. Its launch has C
# times fewer programs than the partials', each C times longer, but writes no fp32 partials and leaves no
# tree_sum to launch.
# On one H200, 4 chunks (benchmarks/results/kernels/tune_chunk_sum/, on the tables below):
# - `large` (attention output K = 2048, expert down K = 768): 0.3-0.8x the time of partials + tree_sum at
#   1-1024 tokens, 0.78x (attention output) and 0.41x (down) at 8192.
# - `wide` (K = 4096 and 14336): 0.35-0.97x up to 256 tokens (attention output up to 1024), but at 8192
#   tokens the partials were faster. Below 16 rows the sweep favoured one kernel too, but in the
#   captured decode step of one sequence it was slower than the partials; 4 sequences came out even
#   (the times of both: detmoe/kernels/NOTES.md, "The chunk sums, measured").
#   The grouped form counts rows as tokens x top_k: `wide`'s down projection takes it from 8 to 512
#   tokens (512 itself was not in the sweep; 256 was, at 0.85x of the partials).
CHUNK_SUM_MAX_K = 2048
CHUNK_SUM_MIN_ROWS, CHUNK_SUM_MAX_ROWS = 16, 1024
# The dense one-kernel form's tiles by M (largest M of the bucket, Tiles), from the attention output of
# both GPU presets (the candidate with the least mean time relative to each cell's best): small M walks
# four chunks side by side on narrow tiles (16 or 32 rows; faster than the 64x64 tiles used for every M
# before: detmoe/kernels/NOTES.md), 1024 rows and more two chunks on 128x64.
CHUNK_SUM_TILES: list[tuple[float, Tiles]] = [
    (4, Tiles(16, 128, 4, 4, chunks_per_loop=2)),
    (16, Tiles(16, 64, 4, 4, chunks_per_loop=4)),
    (64, Tiles(32, 64, 4, 4, 32, chunks_per_loop=4)),
    (256, Tiles(64, 64, 4, 3, 32, chunks_per_loop=4)),
    (1024, Tiles(128, 64, 4, 4, chunks_per_loop=2)),
    (2**62, Tiles(128, 64, 8, 3, chunks_per_loop=2)),
]
# fp32 accumulator registers per thread that a summed tile may hold in all: a tree of 2^n leaves keeps
# n + 1 accumulators alive at once (for 4: a pair's first leaf, its second, the sum so far), so a
# 128x256 tile on 8 warps (128 registers each) would spill; 3 x 64 leaves room for the loads.
CHUNK_SUM_ACC_REGS = 192


def one_kernel_sum(chunks: int, K: int, M: int) -> bool:
    """Whether a sum of `chunks` chunks over a K of K for M rows runs as one kernel (else partials +
    tree_sum, the same bits): a tree the kernels unroll, over a K short enough for one program to walk
    or few enough rows that the partials' extra launch and traffic cost more than the longer walk."""
    short_k = K <= CHUNK_SUM_MAX_K
    return chunks in CHUNK_SUM_LEAVES and (short_k or CHUNK_SUM_MIN_ROWS <= M <= CHUNK_SUM_MAX_ROWS)


def tree_of(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The partials' tree, rounded once: tree_sum's kernel, or its stock form past 64 leaves (same bits)."""
    return tree_sum(partials, dtype) if partials.shape[0] <= 64 else tree_sum_torch(partials, dtype)


def fit_for_chunk_sum(t: Tiles, chunks: int) -> Tiles:
    """t with BLOCK_N halved until the tree's live accumulators fit CHUNK_SUM_ACC_REGS per thread (bits
    unchanged: tiles only group rows and columns). One leaf (chunks == 1) is a plain matmul and keeps t."""
    if chunks == 1 or runtime.interpreting():
        return t
    live = chunks.bit_length()          # log2(chunks) + 1
    if t.chunks_per_loop == 4 and chunks >= 4:
        live += 1                       # four chunks' accumulators at once, and the sum so far past 4 leaves
    bn = t.BLOCK_N
    while bn > 32 and live * t.BLOCK_M * bn // (32 * t.num_warps) > CHUNK_SUM_ACC_REGS:
        bn //= 2
    return dataclasses.replace(t, BLOCK_N=bn)


def check_chunk_tree(chunks: int, K: int, dtype: torch.dtype, tiles: Tiles | None) -> None:
    check_chunks(chunks, K)
    if not isinstance(chunks, int) or chunks & (chunks - 1):   # tree_sum's balanced tree
        raise ValueError(f"chunks must be a power of two dividing K={K}, got {chunks!r}")
    runtime.check_float_dtype("dtype", dtype)
    if tiles is not None and chunks not in CHUNK_SUM_LEAVES:
        raise ValueError(f"tiles force the one-kernel sum, which takes chunks in {CHUNK_SUM_LEAVES}, "
                         f"got {chunks}")


def check_chunks(chunks: int, K: int) -> None:
    if chunks < 1 or K % chunks:
        raise ValueError(f"chunks must be >= 1 and divide K={K}, got {chunks}")


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    runtime.check_float("x", x)
    runtime.check_device("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if w.dim() != 2 or w.shape[0] != x.shape[1]:
        raise ValueError(f"w must be [K={x.shape[1]}, N], got shape {tuple(w.shape)}")
    runtime.check_like("w", w, "x", x)


def _launch(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, chunks: int, reduction: Reduction | None,
            tiles: Tiles | None, summed: bool = False,
            more: tuple[torch.Tensor, torch.Tensor] | None = None, widen: bool = False) -> torch.Tensor:
    """Launch over `chunks` equal K chunks into out [chunks, M, N] (or [M, N] for one chunk, or for the
    chunks summed in the kernel). `more`: two further weights whose columns follow w's in out (one chunk;
    the tiles, reduction and N of the launch are then out's)."""
    M, N = x.shape[0], out.shape[-1]
    K = x.shape[1] // chunks                  # the K that one program sums
    t = tiles or tiles_for(M, N, x.dtype == torch.float32)
    block_k = (reduction or reduction_for(N, K, x.dtype)).BLOCK_K
    if reduction is None and t.BLOCK_K is not None and K % t.BLOCK_K == 0 and not runtime.interpreting():
        # only where K is a whole number of the tile's steps: a zero-padded last step would add +0.0
        # products that the reduction's own step does not (a -0.0 sum would come out +0.0)
        block_k = t.BLOCK_K

    if M == 0 or N == 0:
        return out
    if more is None:   # one weight: the THREE arguments are placeholders
        w2, w3, n1, n2 = w, w, N, 0
    else:
        w2, w3 = more
        n1, n2 = w.shape[1], w2.shape[1]
        N = n1 + n2 + w3.shape[1]
    _matmul_kernel[(runtime.cdiv(M, t.BLOCK_M) * runtime.cdiv(N, t.BLOCK_N), 1 if summed else chunks)](
        x, w, out, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(-2), out.stride(-1),
        out.stride(0) if chunks > 1 and not summed else 0, w2, w3, n1, n2, w2.stride(0), w3.stride(0),
        BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=block_k, GROUP_M=8, EVEN_K=K % block_k == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        SUMMED=chunks if summed else 1, BY_BITS=summed and round_by_bits(out.dtype), THREE=more is not None,
        AT_ONCE=t.chunks_per_loop if summed else 1, WIDEN=widen, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out
