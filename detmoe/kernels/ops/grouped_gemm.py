"""Batch-invariant grouped expert GEMM: rows of x sorted by expert, row t of group e -> x[t] @ w[e].

x [T, K], w [E, K, N], offsets [E] int32 cumulative row ends (group e owns rows offsets[e-1]:offsets[e]),
the layout `torch._grouped_mm(x, w, offs=offsets)` takes. Output [T, N] in x's dtype, fp32 accumulation.

A token's output must not depend on how many tokens its expert got, nor on where in the group it sits.
Each program computes one BLOCK_M x BLOCK_N tile of one expert with the same BLOCK_K loop for every tile
(no split-K), and rows never mix in a dot, so a row's bits depend only on (its x row, w[e], N, K, dtype).
BLOCK_M is chosen from the average group size on the GPU (64 or 128); the GPU tests prove that this
leaves a row's bits unchanged.

Tile scheduling without a host sync (tile_map.py): tile_ends[e] = cumulative number of BLOCK_M tiles of
groups 0..e, computed inside each program from `offsets` (tl.cumsum); program m finds its expert as
#{e : tile_ends[e] <= m}. On the GPU the grid is the upper bound cdiv(T, BLOCK_M) + E (surplus programs
return at once). Under the interpreter, where every program costs milliseconds,
`_grouped_mm_packed_kernel` runs instead: one program per row tile of all experts at once (the per-tile
kernel stays reachable there with packed=False, for the tests).
Not for: unsorted rows (sort by expert first), or groups whose rows are not contiguous.
"""
from __future__ import annotations

import dataclasses

import torch

from detmoe.kernels import runtime
from detmoe.kernels.checks import check_group_offsets, check_index_range
from detmoe.kernels.ops.activations import silu_times
from detmoe.kernels.ops.matmul import (Tiles, check_chunk_tree, check_chunks, fit_for_chunk_sum, k_chunk_tree,
                                one_kernel_sum, reduction_for, tree_of)
from detmoe.kernels.ops.rounding import round_by_bits, rounded_through, rounded_to
from detmoe.kernels.ops.tile_map import group_tile
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _swiglu(h, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, out_dtype: tl.constexpr, BY_BITS: tl.constexpr,
            INTERPRETED: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 products whose first half of columns are gate and second half up (of the
    same output columns) -> silu(gate) * up [BLOCK_M, BLOCK_N / 2] in out_dtype, rounded as torch's ops
    round: h rounded to out_dtype, silu(g) = g / (1 + exp(-g)) in fp32 (expf and an IEEE division, as
    torch's CUDA kernel computes it) rounded, then the product of the two rounded values, rounded."""
    h = rounded_through(h, out_dtype, BY_BITS)
    gate, up = tl.split(tl.permute(tl.reshape(h, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    return silu_times(gate, up, out_dtype, BY_BITS, INTERPRETED)


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, out_ptr, row_ends_ptr, src_ptr, E, N, K,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on, stride_oc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
    PRECISION: tl.constexpr, SUMMED: tl.constexpr, BY_BITS: tl.constexpr, GATHER: tl.constexpr,
    SRC_DIV: tl.constexpr, SWIGLU: tl.constexpr, INTERPRETED: tl.constexpr,
    AT_ONCE: tl.constexpr,
):
    """GATHER: output row i reads x row src[i] // SRC_DIV (the MoE layer's assignments, sorted by expert,
    read from the token rows in place). SWIGLU: w's columns are [gate | up] (N each, w 2N wide); the
    program's BLOCK_N columns are BLOCK_N / 2 of gate and the same of up, and it writes silu(gate) * up."""
    # -- which K chunk (grid axis 2, as in matmul.py: chunk c sums K range [c*K, (c+1)*K) into out[c];
    #    SUMMED > 1: this program sums chunks 0..SUMMED-1 itself, the grid's axis 2 is then 1) --
    chunk = tl.program_id(2).to(tl.int64)
    x_ptr += chunk * K * stride_xk
    w_ptr += chunk * K * stride_wk
    out_ptr += chunk * stride_oc
    # -- which expert and which of its row tiles this program computes (tile_map.py: the map is built
    #    in the kernel from the group ends) --
    pid_n = tl.program_id(1)
    experts = tl.arange(0, E_POW2)
    ends = tl.load(row_ends_ptr + experts, mask=experts < E, other=0)
    starts = tl.load(row_ends_ptr + experts - 1, mask=(experts > 0) & (experts < E), other=0)
    e, tile = group_tile(tl.program_id(0), experts, ends - starts, E, BLOCK_M)
    if e >= E:  # surplus program of the upper-bound grid
        return
    row_end = tl.sum(tl.where(experts == e, ends, 0), axis=0)
    first_row = tl.sum(tl.where(experts == e, starts, 0), axis=0) + tile * BLOCK_M

    offs_m = (first_row + tl.arange(0, BLOCK_M)).to(tl.int64)   # int64: T*N can pass 2**31
    row_ok = offs_m[:, None] < row_end
    if GATHER:   # the same x values as a gathered copy would hold, so the same bits
        src = tl.load(src_ptr + offs_m, mask=offs_m < row_end, other=0) // SRC_DIV
        x_rows = x_ptr + src.to(tl.int64)[:, None] * stride_xm
    else:
        x_rows = x_ptr + offs_m[:, None] * stride_xm
    if SWIGLU:   # output columns pid_n * BLOCK_N / 2 + j, read as gate column c and up column N + c
        # arithmetic, not a select: the compiler then sees runs of BLOCK_N / 2 contiguous columns and
        # vectorizes the weight loads (a select hid that, and the decode GEMM ran ~18% slower)
        j = tl.arange(0, BLOCK_N)
        offs_n = pid_n * (BLOCK_N // 2) + j % (BLOCK_N // 2)
        w_n = offs_n + (j // (BLOCK_N // 2)) * N
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_n = offs_n
    n_ok = offs_n[None, :] < N
    w_cols = w_ptr + e.to(tl.int64) * stride_we + w_n[None, :] * stride_wn

    # -- K loop: the same BLOCK_K steps, in the same order, for every tile of every expert; SUMMED > 1:
    #    chunks 0..SUMMED-1 (AT_ONCE of them side by side), added in tree_sum.py's tree (matmul.k_chunk_tree) --
    acc = k_chunk_tree(x_rows, w_cols, row_ok, n_ok, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, False,
                       PRECISION, SUMMED, AT_ONCE)

    # -- write this tile's rows of this expert --
    if SWIGLU:
        cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        act = _swiglu(acc, BLOCK_M, BLOCK_N, out_ptr.dtype.element_ty, BY_BITS, INTERPRETED)
        tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :] * stride_on, act,
                 mask=row_ok & (cols[None, :] < N))
    else:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 rounded_to(acc, out_ptr.dtype.element_ty, BY_BITS), mask=row_ok & n_ok)


@triton.jit
def _grouped_mm_packed_kernel(
    x_ptr, w_ptr, out_ptr, row_starts_ptr, row_ends_ptr, E, N, K,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on, stride_oc,
    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """`_grouped_mm_kernel` for the interpreter: program m computes row tile m of EVERY expert at once.

    Interpreted, every tl op costs Python time whatever its block size (detmoe/kernels/NOTES.md), so one
    program works on all experts with a batched dot: x [E, BLOCK_M, BLOCK_K] @ w [E, BLOCK_K, BLOCK_N],
    expert e's block holding its rows m*BLOCK_M ... (m+1)*BLOCK_M - 1 (the grid has cdiv(largest group, BLOCK_M) programs).
    Per row it does the same BLOCK_K steps and the same dot as the per-tile kernel (the interpreter's dot
    runs row by row, see runtime.py), so a row's bits are the same (tested).
    """
    chunk = tl.program_id(2).to(tl.int64)   # K chunk, as in _grouped_mm_kernel
    x_ptr += chunk * K * stride_xk
    w_ptr += chunk * K * stride_wk
    out_ptr += chunk * stride_oc
    experts = tl.arange(0, E_POW2)
    e_ok = experts < E
    row_end = tl.load(row_ends_ptr + experts, mask=e_ok, other=0)                     # [E_POW2]
    first_row = tl.load(row_starts_ptr + experts, mask=e_ok, other=0) + tl.program_id(0) * BLOCK_M
    offs_m = (first_row[:, None] + tl.arange(0, BLOCK_M)[None, :]).to(tl.int64)        # [E_POW2, BLOCK_M]
    row_ok = (offs_m < row_end[:, None])[:, :, None]                                   # [E_POW2, BLOCK_M, 1]
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, None, :]       # [1, 1, BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)
    w_e = (w_ptr + experts.to(tl.int64) * stride_we)[:, None, None]                    # [E_POW2, 1, 1]

    acc = tl.zeros((E_POW2, BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, :, None] * stride_xm + k[None, None, :] * stride_xk,
                    mask=row_ok & (k[None, None, :] < K), other=0.0)
        b = tl.load(w_e + k[None, :, None] * stride_wk + offs_n * stride_wn,
                    mask=e_ok[:, None, None] & (k[None, :, None] < K) & (offs_n < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(out_ptr + offs_m[:, :, None] * stride_om + offs_n * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok & (offs_n < N))


# Rows per expert per program of the interpreter's packed kernel.
PACKED_BLOCK_M = 128


def tiles_for(T: int, E: int, N: int, table: list[tuple[float, Tiles]] | None = None) -> Tiles:
    """Tiles for T rows over E experts from `table` (default TILES_GPU): the size-dependent choice; tests
    prove it bit-neutral. There is no split-K here, so the tiles only group rows and columns."""
    if runtime.interpreting():
        return Tiles(BLOCK_M=128, BLOCK_N=runtime.pow2_at_most(N, 512))
    for max_rows_per_expert, tiles in table or TILES_GPU:
        if T <= max_rows_per_expert * E:
            return dataclasses.replace(tiles, BLOCK_N=min(tiles.BLOCK_N, max(16, runtime.next_pow2(N))))
    raise AssertionError("a tile table must end with an unbounded bucket")


# GPU tiles by mean rows per expert: (largest mean of the bucket, Tiles). Chosen from
# benchmarks/results/kernels/tune_matmul/ (tune_kernels.py on an H100): 64x128 tiles win up to ~64 rows per
# expert, 128x256 with 8 warps above (what that did at 65536 rows: detmoe/kernels/NOTES.md).
TILES_GPU: list[tuple[float, Tiles]] = [
    (64, Tiles(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)),
    (2**62, Tiles(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3)),
]
# The fused SwiGLU projection's tiles (BLOCK_N counts gate and up columns together), from one H200
# (benchmarks/results/kernels/tune_swiglu/, every candidate with the composition's bits): at up to 4 rows
# per expert 16x256 was the fastest candidate in every cell (`large` at 2 rows, ahead of TILES_GPU's
# 64x128; `wide` at 0.25 and 4 rows), at 8-32 rows 32x128 was within 2% of the best, and at 1024 rows
# 128x256 on 8 warps the best. Not taken yet: at 64 rows (`wide`, 256 tokens) 64x128 with 3 stages was
# faster than 32x128 (detmoe/kernels/NOTES.md, "Left undone").
SWIGLU_TILES_GPU: list[tuple[float, Tiles]] = [
    (4, Tiles(BLOCK_M=16, BLOCK_N=256, num_warps=4, num_stages=4)),
    (64, Tiles(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=4)),
    (2**62, Tiles(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3)),
]
# The one-kernel chunk sum's tiles before `fit_for_chunk_sum`, from the expert down projections of both
# GPU presets with 4 leaves on one H200 (benchmarks/results/kernels/tune_chunk_sum/; the candidate with the
# least mean time relative to each cell's best). Chunks walked side by side (Tiles.chunks_per_loop) won
# in most buckets, e.g. `large` at 8192 tokens with 128x128 tiles and two chunks per loop; the times
# against the tiles used before are in detmoe/kernels/NOTES.md ("The chunk sums, measured").
CHUNK_SUM_TILES_GPU: list[tuple[float, Tiles]] = [
    (1, Tiles(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4, chunks_per_loop=2)),
    (4, Tiles(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=4, chunks_per_loop=2)),
    (16, Tiles(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)),
    (64, Tiles(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3, BLOCK_K=32, chunks_per_loop=4)),
    (256, Tiles(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4, BLOCK_K=32, chunks_per_loop=2)),
    (2**62, Tiles(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, chunks_per_loop=2)),
]


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   tiles: Tiles | None = None, packed: bool | None = None) -> torch.Tensor:
    """x [T, K] (sorted by group), w [E, K, N], offsets [E] cumulative row ends -> [T, N] in x's dtype.

    offsets[-1] <= T: rows past it belong to no group and their output rows are left unwritten (an
    expert-parallel rank's buffer of all rows, of which it computes its own run). `tiles` and `packed`
    (the interpreter's many-tiles-per-program kernel; default: on under the interpreter) are test hooks.
    """
    return _grouped(x, w, offsets, 1, "plain", tiles, packed)


def grouped_matmul_partials(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, chunks: int) -> torch.Tensor:
    """The K axis cut into `chunks` equal chunks: [chunks, T, N] fp32, chunk c = rows @ w[e, c*Kc:(c+1)*Kc]
    of the rows' K range c (Kc = K / chunks), unrounded, each summed as `grouped_matmul` sums a K of Kc:
    the partials of a row-parallel expert projection (matmul.matmul_partials; detmoe/moe/parallel.py)."""
    check_chunks(chunks, x.shape[-1])
    return _grouped(x, w, offsets, chunks, "partials", None, None)


def grouped_matmul_chunk_sum(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, chunks: int,
                             dtype: torch.dtype, tiles: Tiles | None = None,
                             packed: bool | None = None) -> torch.Tensor:
    """`tree_sum(grouped_matmul_partials(x, w, offsets, chunks), dtype)` bit for bit -> [T, N] in `dtype`,
    without writing the partials where that pays (matmul.one_kernel_sum). Under the interpreter (packed,
    the default there) it is that composition itself. Test hooks: `tiles` forces the one-kernel form
    with those tiles (on the interpreter too), `packed` the interpreter's packed partials."""
    check_chunk_tree(chunks, x.shape[-1], dtype, tiles)
    if tiles is not None and packed:
        raise ValueError("tiles force the one-kernel sum; packed=True asks for the packed partials")
    interpreted_default = packed if packed is not None else runtime.interpreting()
    if tiles is None and (interpreted_default or not one_kernel_sum(chunks, x.shape[-1], x.shape[0])):
        return tree_of(_grouped(x, w, offsets, chunks, "partials", None, packed), dtype)
    return _grouped(x, w, offsets, chunks, "summed", tiles, False, dtype)


def grouped_swiglu(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor | None = None,
                   top_k: int = 1, tiles: Tiles | None = None) -> torch.Tensor:
    """The experts' SwiGLU input projection in one kernel: h = grouped_matmul(x[rows // top_k], w, offsets)
    (x itself where rows is None), w [E, K, 2F] holding gate and up, -> silu(h[:, :F]) * h[:, F:] [A, F]
    in x's dtype, rounded as torch's ops round that composition: h to x's dtype, silu in fp32, the
    product. The assignments' rows are read from x in place (no gathered copy) and gate and up never
    reach memory. rows [A] int: row i of the product is token rows[i] // top_k. `tiles`: a test hook."""
    if w.dim() != 3 or w.shape[2] % 2:
        raise ValueError(f"w must be [E, K, 2F] (gate and up columns), got shape {tuple(w.shape)}")
    if rows is not None and (rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64)
                             or rows.device != x.device):
        raise ValueError(f"rows must be a 1-D int32/int64 tensor on {x.device}, got {rows.dtype} of shape "
                         f"{tuple(rows.shape)} on {rows.device}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if rows is not None:
        check_index_range("rows", rows, x.shape[0] * top_k, " (tokens x top_k)")
        rows = rows.contiguous()        # the kernel reads rows[i] at i
    return _grouped(x, w, offsets, 1, "swiglu", tiles, False, rows=rows, top_k=top_k)


def _grouped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, chunks: int, kind: str,
             tiles: Tiles | None, packed: bool | None, dtype: torch.dtype | None = None,
             rows: torch.Tensor | None = None, top_k: int = 1) -> torch.Tensor:
    """Check, allocate and launch over `chunks` K chunks. kind: "plain" ([T, N] in x's dtype),
    "partials" ([chunks, T, N] fp32), "summed" ([T, N] in `dtype`, the chunks added in the kernel) or
    "swiglu" ([T, N/2] in x's dtype; T = len(rows) where rows are given)."""
    # 1. check shapes
    runtime.check_float("x", x)
    runtime.check_device("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, K], got shape {tuple(x.shape)}")
    if w.dim() != 3 or w.shape[1] != x.shape[1]:
        raise ValueError(f"w must be [E, K={x.shape[1]}, N], got shape {tuple(w.shape)}")
    runtime.check_like("w", w, "x", x)
    if offsets.dim() != 1 or offsets.shape[0] != w.shape[0] or offsets.device != x.device:
        raise ValueError(f"offsets must be [E={w.shape[0]}] on {x.device}, got {tuple(offsets.shape)} "
                         f"on {offsets.device}")
    T = x.shape[0] if rows is None else rows.shape[0]   # rows of the product
    K = x.shape[1] // chunks                   # the K that one program sums
    E, _, N = w.shape
    swiglu = kind == "swiglu"
    if not offsets.is_cuda:
        # their values too, where reading them costs no device sync (the interpreter's host tensors); on
        # the GPU the MoE layer's searchsorted makes them right by construction (detmoe/moe/layer.py), and a
        # check would cost a sync per expert GEMM
        check_group_offsets(offsets, E, T)
    block_k = reduction_for(N, K, x.dtype).BLOCK_K   # the dense matmul's K step for this (N, K)
    summed = kind == "summed"
    if tiles is not None:
        t = tiles
    elif summed:
        t = fit_for_chunk_sum(tiles_for(T, E, N, CHUNK_SUM_TILES_GPU), chunks)
    else:
        t = tiles_for(T, E, N, SWIGLU_TILES_GPU if swiglu else TILES_GPU)
    bm = t.BLOCK_M
    if t.BLOCK_K is not None and K % t.BLOCK_K == 0 and x.dtype != torch.float32 and not runtime.interpreting():
        # a longer loop trip over the same 16-deep MMA steps, as in matmul.py (and only where K is a
        # whole number of steps, for the same reason)
        block_k = t.BLOCK_K

    # 2. allocate output (the tile map is built in the kernel: no host sync, no extra launches on the GPU)
    if kind == "partials":
        out = runtime.empty((chunks, T, N), x.device, torch.float32)
    else:
        out = runtime.empty((T, N // 2 if swiglu else N), x.device, dtype if summed else x.dtype)
    if T == 0 or N == 0:
        return out
    strides_out = (out.stride(-2), out.stride(-1), out.stride(0) if kind == "partials" else 0)
    row_ends = offsets if offsets.dtype == torch.int32 else offsets.to(torch.int32)
    if packed if packed is not None else runtime.interpreting() and packed_fits(E, t.BLOCK_N, block_k):
        row_starts = torch.cat([row_ends.new_zeros(1), row_ends[:-1]])
        _launch_packed(x, w, out, strides_out, row_starts, row_ends, K, chunks, t.BLOCK_N, block_k)
        return out
    if runtime.interpreting():   # exact grid: every interpreted program costs milliseconds
        sizes = torch.diff(row_ends, prepend=row_ends.new_zeros(1))
        m_programs = int(((sizes + bm - 1) // bm).sum())
    else:                        # upper bound: surplus programs return at once
        m_programs = runtime.cdiv(T, bm) + E

    # 3. launch (swiglu: each program's BLOCK_N columns are BLOCK_N / 2 of gate and as many of up)
    block_n = t.BLOCK_N
    n_out = N // 2 if swiglu else N
    grid = (m_programs, runtime.cdiv(n_out, block_n // 2 if swiglu else block_n), 1 if summed else chunks)
    _grouped_mm_kernel[grid](
        x, w, out, row_ends, x if rows is None else rows, E, n_out, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), *strides_out,
        BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k, E_POW2=runtime.next_pow2(E),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        SUMMED=chunks if summed else 1, BY_BITS=(summed or swiglu) and round_by_bits(out.dtype),
        GATHER=rows is not None, SRC_DIV=top_k, SWIGLU=swiglu, INTERPRETED=runtime.interpreting(),
        AT_ONCE=t.chunks_per_loop if summed else 1, num_warps=t.num_warps, num_stages=t.num_stages,
        # swiglu: no fma in the epilogue's 1 + exp(-g), nor anywhere the stock ops round twice
        enable_fp_fusion=not swiglu,
    )
    return out


def packed_fits(E: int, block_n: int, block_k: int) -> bool:
    """Whether the packed kernel's blocks (all experts at once) stay within Triton's 2**20 elements a block;
    where they would not (many experts or groups), the per-tile kernel runs instead (the same bits)."""
    e_pow2 = runtime.next_pow2(E)
    return e_pow2 * max(PACKED_BLOCK_M * block_k, block_k * block_n, PACKED_BLOCK_M * block_n) <= 2**20


def _launch_packed(x, w, out, strides_out, row_starts, row_ends, K: int, chunks: int, block_n: int,
                   block_k: int) -> None:
    """Interpreter only: cdiv(largest group, PACKED_BLOCK_M) programs, each on all experts."""
    E, _, N = w.shape
    m_programs = runtime.cdiv(int((row_ends - row_starts).max()), PACKED_BLOCK_M)
    if m_programs == 0:
        return
    grid = (m_programs, runtime.cdiv(N, block_n), chunks)
    _grouped_mm_packed_kernel[grid](
        x, w, out, row_starts, row_ends, E, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), *strides_out,
        E_POW2=runtime.next_pow2(E), BLOCK_M=PACKED_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
