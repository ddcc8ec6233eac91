"""Batch-invariant grouped expert GEMM: rows of x sorted by expert, row t of group e -> x[t] @ w[e].

x [T, K], w [E, K, N], offsets [E] int32 cumulative row ends (group e owns rows offsets[e-1]:offsets[e]),
the layout `torch._grouped_mm(x, w, offs=offsets)` takes. Output [T, N] in x's dtype, fp32 accumulation.

A token's output must not depend on how many tokens its expert got, nor on where in the group it sits.
Each program computes one BLOCK_M x BLOCK_N tile of one expert with the same BLOCK_K loop for every tile
(no split-K), and rows never mix in a dot, so a row's bits depend only on (its x row, w[e], N, K, dtype).
BLOCK_M is chosen from the average group size on the GPU (64 or 128); the GPU tests prove that this
leaves a row's bits unchanged.

Tile scheduling without a host sync: tile_ends[e] = cumulative number of BLOCK_M tiles of groups 0..e,
computed on the device; program m finds its expert as #{e : tile_ends[e] <= m}. On the GPU the grid is
the upper bound cdiv(T, BLOCK_M) + E (surplus programs return at once); under the interpreter, where
every program costs milliseconds, the exact count is read on the host.
Not for: unsorted rows (sort by expert first), or groups whose rows are not contiguous.
"""
from __future__ import annotations

import torch

from kernels import runtime
from kernels.ops.matmul import config_for
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, out_ptr, row_starts_ptr, row_ends_ptr, tile_starts_ptr, tile_ends_ptr, E, N, K,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # -- which expert and which of its row tiles this program computes --
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    experts = tl.arange(0, E_POW2)
    tile_ends = tl.load(tile_ends_ptr + experts, mask=experts < E, other=2147483647)
    e = tl.sum((tile_ends <= pid_m).to(tl.int32), axis=0)
    if e >= E:  # surplus program of the upper-bound grid
        return
    row_end = tl.load(row_ends_ptr + e)
    first_row = tl.load(row_starts_ptr + e) + (pid_m - tl.load(tile_starts_ptr + e)) * BLOCK_M

    offs_m = (first_row + tl.arange(0, BLOCK_M)).to(tl.int64)   # int64: T*N can pass 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < row_end
    w_e = w_ptr + e.to(tl.int64) * stride_we

    # -- K loop: the same BLOCK_K steps, in the same order, for every tile of every expert --
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=row_ok[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(w_e + k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # -- write this tile's rows of this expert --
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


def _block_m_for(T: int, E: int) -> int:
    """The one size-dependent choice (GPU only); tests prove it leaves a row's bits unchanged."""
    if runtime.interpreting():
        return 128
    return 64 if T <= 64 * E else 128


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   block_m: int | None = None) -> torch.Tensor:
    """x [T, K] (sorted by group), w [E, K, N], offsets [E] cumulative row ends -> [T, N] in x's dtype.

    Rows at or after offsets[-1] are not written (as torch._grouped_mm). `block_m` is a test hook.
    """
    # 1. check shapes
    runtime.check_float("x", x)
    runtime.check_device("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, K], got shape {tuple(x.shape)}")
    if w.dim() != 3 or w.shape[1] != x.shape[1]:
        raise ValueError(f"w must be [E, K={x.shape[1]}, N], got shape {tuple(w.shape)}")
    if w.dtype != x.dtype or w.device != x.device:
        raise ValueError(f"w must match x's dtype/device ({x.dtype}, {x.device}), got {w.dtype}, {w.device}")
    if offsets.dim() != 1 or offsets.shape[0] != w.shape[0] or offsets.device != x.device:
        raise ValueError(f"offsets must be [E={w.shape[0]}] on {x.device}, got {tuple(offsets.shape)} "
                         f"on {offsets.device}")
    T, K = x.shape
    E, _, N = w.shape
    cfg = config_for(N, K, x.dtype)   # the dense matmul's BLOCK_N / BLOCK_K for this (N, K)
    bm = block_m or _block_m_for(T, E)

    # 2. allocate output and the tile map (device ops only: no host sync on the GPU)
    out = runtime.empty((T, N), x.device, x.dtype)
    if T == 0 or N == 0:
        return out
    row_ends = offsets.to(torch.int32)
    row_starts = torch.cat([row_ends.new_zeros(1), row_ends[:-1]])
    tiles = (row_ends - row_starts + bm - 1) // bm
    tile_ends = torch.cumsum(tiles, 0, dtype=torch.int32)
    tile_starts = tile_ends - tiles
    m_programs = int(tile_ends[-1]) if runtime.interpreting() else triton.cdiv(T, bm) + E

    # 3. launch
    grid = lambda meta: (m_programs, triton.cdiv(N, meta["BLOCK_N"]))
    _grouped_mm_kernel[grid](
        x, w, out, row_starts, row_ends, tile_starts, tile_ends, E, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=bm, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, E_POW2=triton.next_power_of_2(E),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4 if bm <= 64 else 8, num_stages=cfg.num_stages,
    )
    return out
