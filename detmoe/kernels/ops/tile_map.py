"""Which group, and which of its row tiles, a program computes: the tile map of grouped kernels.

Rows come in groups: the tokens of one expert (grouped GEMM), the (query, head) rows of one sequence
(attention). Each group is cut into BLOCK_M-row tiles, and program `pid` of a flat grid takes tile `pid`
of the concatenation. The map is built inside every program from the group sizes (a cumsum over a few
lanes) rather than by torch ops before the launch: no host sync, and no tiny extra kernels, which cost
more than the GEMM or the attention itself at decode sizes. The grid is an upper bound on the number of
tiles; programs past the last tile find no group and return.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def group_tile(pid, lanes, rows, n_groups, BLOCK_M: tl.constexpr):
    """(group, tile index in that group) of program `pid`; group == n_groups for a surplus program.

    lanes: tl.arange over a power of two >= n_groups; rows: rows per group on those lanes (any value
    past n_groups). Tiles never straddle groups, so a row's tile-mates all belong to its own group."""
    valid = lanes < n_groups
    n_tiles = tl.where(valid, (rows + BLOCK_M - 1) // BLOCK_M, 0)
    tile_ends = tl.where(valid, tl.cumsum(n_tiles, axis=0), 2147483647)
    group = tl.sum((tile_ends <= pid).to(tl.int32), axis=0)
    tile = pid - tl.sum(tl.where(lanes == group, tile_ends - n_tiles, 0), axis=0)
    return group, tile
