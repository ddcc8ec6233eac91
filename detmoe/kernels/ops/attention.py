"""Batch-invariant causal attention for a ragged batch over a KV cache (prefill and decode alike).

Legend: B = sequences, Tq = query rows of the step, H = query heads, Hkv = KV heads, G = H // Hkv,
S = cache slots, L = cache length, Dh = head dim. q [Tq, H, Dh]; k_cache, v_cache [S, L, Hkv, Dh].
Sequence b owns query rows cu_seqlens_q[b]:cu_seqlens_q[b+1], reads slot slots[b] at key positions
0..kv_lens[b]-1, and its n queries sit at the last n positions.

Why stock attention is batch-variant: flash/SDPA kernels choose their KV split (split-KV / flash-decoding)
and query tiling from the batch and lengths, so the order in which a query's keys are summed differs
between prefill (many queries) and decode (one), and with the batch.

The fixed order used here, for one (query, head) at position p:
  * keys are cut into splits of SPLIT positions (a FIXED SIZE, not a fixed number of splits), each split
    into blocks of BLOCK_N positions, all aligned to key position 0;
  * within split s, an online softmax runs over its blocks in order from the state (m=-inf, l=0, o=0);
  * the split states are folded in split order: state = merge(state, split_s) for s = 0, 1, ... with
    `_merge` (explicit fma, so the compiler cannot contract it differently in two kernels).
A block or split after position p is fully masked for this query and leaves the state bit-for-bit as it
was (max unchanged, rescale by exp2(0) = 1, adds of +0), so the result does not depend on how many
positions the kernel walks past p: the same in prefill (p < kv_len - 1) and decode (p = kv_len - 1).

Within a split, blocks every row of the tile sees in full run without masks (a mask that keeps every
element changes no bit); the kernels launch with enable_fp_fusion=False so that the compiler cannot
contract `dot * scale - max` into an fma in one form of the step and not in the other.

Two schedules compute that order (chosen from the number of query tiles and the cache's capacity in
splits, never from lengths on the device; tests prove they agree bitwise):
  * fold (prefill): one program per (query tile, KV head) walks all splits and folds them in registers;
  * split (decode, few queries): one program per (query tile, KV head, split) writes its split state to
    an fp32 workspace; the program of the tile that finishes last (an arrival counter says which) folds
    the states in split order, in the same launch. The counter decides who folds, never what is added
    or in which order, so the bits do not depend on which program that is.
Query tiles are rows (query, head-in-group) of one sequence and one KV head: row r = query r // G, head
kv_head * G + r % G (GQA heads share their K/V loads). Rows never mix in a dot or a row reduction, so a
row's bits do not depend on its tile-mates (the tile shape of each schedule is a module constant; the
tests compare the schedules bitwise). On the GPU both schedules' tiles have >= 64 rows, so their dots run
on the same wgmma instructions: 16-row tiles (mma.sync) moved a row's bits in a measured variant. Under
the interpreter a third schedule, packed, runs the fold schedule's per-row operations on many tiles per
program (`_attention_packed_kernel`).
Not for: sliding windows, ALiBi or soft-capping (not implemented); non-causal attention.
"""
from __future__ import annotations

import torch

from detmoe.kernels import runtime
from detmoe.kernels.checks import check_attention_indices
from detmoe.kernels.ops.tile_map import group_tile
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _merge(m, l, o, m_s, l_s, o_s):
    """Fold split state (m_s, l_s, o_s) into the running state (m, l, o); log2 domain, rows independent."""
    m_new = tl.maximum(m, m_s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with no visible key yet: no NaN
    alpha = tl.exp2(m - m_safe)
    beta = tl.exp2(m_s - m_safe)
    l_new = tl.fma(l, alpha, l_s * beta)
    o_new = tl.fma(o, alpha[:, None], o_s * beta[:, None])
    return m_new, l_new, o_new


@triton.jit
def _block_step(q, k_base, v_base, n0, kv_len, q_pos, m_s, l_s, o_s, qk_scale, Dh, stride_l,
                offs_n, offs_d, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One BLOCK_N block of keys into a split's online-softmax state (log2 domain). stride_l: between
    key positions, the same in k and v (the launcher checks the caches' strides are equal).

    MASKED=False is for blocks every row of the tile sees in full (inside the cache, at or before each
    row's position): the same operations without the masks, which would keep every element anyway."""
    pos = n0 + offs_n
    if MASKED:
        in_cache = pos < kv_len
        # k^T [BLOCK_D, BLOCK_N], v [BLOCK_N, BLOCK_D]; positions past kv_len read as 0, never garbage
        kt = tl.load(k_base + pos[None, :] * stride_l + offs_d[:, None],
                     mask=in_cache[None, :] & (offs_d[:, None] < Dh), other=0.0)
        v = tl.load(v_base + pos[:, None] * stride_l + offs_d[None, :],
                    mask=in_cache[:, None] & (offs_d[None, :] < Dh), other=0.0)
    else:
        kt = tl.load(k_base + pos[None, :] * stride_l + offs_d[:, None], mask=offs_d[:, None] < Dh, other=0.0)
        v = tl.load(v_base + pos[:, None] * stride_l + offs_d[None, :], mask=offs_d[None, :] < Dh, other=0.0)
    scores = tl.dot(q, kt, input_precision=PRECISION) * qk_scale                    # [BLOCK_M, BLOCK_N]
    if MASKED:
        scores = tl.where(pos[None, :] <= q_pos[:, None], scores, float("-inf"))   # causal + length
    m_new = tl.maximum(m_s, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_s - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_s = tl.fma(l_s, alpha, tl.sum(p, axis=1))
    o_s = tl.dot(p.to(v.dtype), v, o_s * alpha[:, None], input_precision=PRECISION)
    return m_new, l_s, o_s


@triton.jit(do_not_specialize_on_alignment=["B"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, ws_ptr, counts_ptr, cu_q_ptr, kv_lens_ptr, slots_ptr,
    B, qk_scale, n_split_slots, stride_qt, stride_qh, stride_cs, stride_cl, stride_ch,
    G: tl.constexpr, FOLD: tl.constexpr, SPLIT: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, B_POW2: tl.constexpr,
    FOLD_ROWS: tl.constexpr, PRECISION: tl.constexpr,
):
    # -- which sequence, query tile and KV head (tile_map.py: the map is built in the kernel). Programs
    #    take tiles from the last one down: in a causal prefill the deepest tiles are the longest, and
    #    starting them first leaves no long tile running alone at the end. --
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    H = tl.num_programs(1) * G
    seqs = tl.arange(0, B_POW2)
    starts = tl.load(cu_q_ptr + seqs, mask=seqs < B, other=0)
    q_rows = (tl.load(cu_q_ptr + seqs + 1, mask=seqs < B, other=0) - starts) * G   # rows per sequence
    b, tile = group_tile(pid, seqs, q_rows, B, BLOCK_M)
    if b >= B:  # surplus program of the upper-bound grid
        return
    q_start = tl.load(cu_q_ptr + b)
    n_q = tl.load(cu_q_ptr + b + 1) - q_start
    kv_len = tl.load(kv_lens_ptr + b)
    slot = tl.load(slots_ptr + b).to(tl.int64)

    # -- the tile's rows: (query, head) pairs, G heads of one query next to each other --
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // G
    head = kv_head * G + rows % G
    row_ok = qi < n_q
    q_pos = tl.where(row_ok, kv_len - n_q + qi, -1)                  # padding rows see no key
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + (q_start + qi).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
    k_base = k_ptr + slot * stride_cs + kv_head * stride_ch
    v_base = v_ptr + slot * stride_cs + kv_head * stride_ch
    last_pos = kv_len - n_q + tl.minimum(((tile + 1) * BLOCK_M + G - 1) // G, n_q) - 1   # deepest row
    # splits any row of the tile can see; never more than the launch has split programs (a kv_len past
    # the cache's capacity is bad input, but must not leave an arrival counter short of its count)
    n_splits = tl.minimum(tl.cdiv(last_pos + 1, SPLIT), n_split_slots)

    # -- which splits: all of them, folded in registers (fold), or the one named by grid axis 2 (split) --
    if FOLD:
        s_lo = 0
        s_hi = n_splits
    else:
        s_lo = tl.program_id(2)
        s_hi = s_lo + 1
        if s_lo >= n_splits:
            return
        ws_ml_ptr = ws_ptr + tl.load(cu_q_ptr + B).to(tl.int64) * H * n_split_slots * BLOCK_D   # m, l
    offs_n = tl.arange(0, BLOCK_N)
    # blocks ending at or before the tile's shallowest row are visible to every row and inside the cache:
    # they skip the masks (a mask that keeps everything changes no bit, so both loops below run the
    # same operations on every row)
    first_pos = kv_len - n_q + (tile * BLOCK_M) // G
    all_visible_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)      # running state over splits (fold)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    o = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(s_lo, s_hi):
        # -- split s: online softmax over its BLOCK_N blocks, from the empty state --
        m_s = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
        o_s = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        # blocks past the tile's deepest row are fully masked for all its rows: skipping them leaves
        # every row's state bit for bit as it is (see module docstring), and saves the causal half
        split_end = tl.minimum((s + 1) * SPLIT, last_pos + 1)
        visible_end = tl.maximum(tl.minimum(split_end, all_visible_end), s * SPLIT)
        for n0 in range(s * SPLIT, visible_end, BLOCK_N):
            m_s, l_s, o_s = _block_step(q, k_base, v_base, n0, kv_len, q_pos, m_s, l_s, o_s, qk_scale, HEAD_D,
                                        stride_cl, offs_n, offs_d, False, PRECISION)
        for n0 in range(visible_end, split_end, BLOCK_N):
            m_s, l_s, o_s = _block_step(q, k_base, v_base, n0, kv_len, q_pos, m_s, l_s, o_s, qk_scale, HEAD_D,
                                        stride_cl, offs_n, offs_d, True, PRECISION)
        if FOLD:
            m, l, o = _merge(m, l, o, m_s, l_s, o_s)
        else:
            # -- split schedule: this split's state to the workspace: o [R, slots, BLOCK_D], then m, l
            #    [R, slots, 2], R = (query, head) rows of the step --
            ws_row = ((q_start + qi) * H + head).to(tl.int64) * n_split_slots + s                # [BLOCK_M]
            tl.store(ws_ptr + ws_row[:, None] * BLOCK_D + offs_d[None, :], o_s, mask=row_ok[:, None])
            tl.store(ws_ml_ptr + ws_row * 2, m_s, mask=row_ok)
            tl.store(ws_ml_ptr + ws_row * 2 + 1, l_s, mask=row_ok)
    if FOLD:
        _store_rows(out_ptr, o, l, q_start + qi, head, H, row_ok, HEAD_D, BLOCK_D)
    else:
        # The split that finishes last folds all of the tile's splits, in split order (the fold
        # schedule's merges). The counter only decides WHICH program folds, never what is added or in
        # what order. Every thread's stores are issued before the count (barrier), the count releases
        # them to the GPU and acquires the other splits' states; the folder resets the counter to 0 for
        # the next launch, so the buffer never needs clearing.
        tl.debug_barrier()
        counter = counts_ptr + pid * tl.num_programs(1) + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
            tl.store(counter, 0)
            n_rows = tl.minimum(BLOCK_M, n_q * G - tile * BLOCK_M)
            for r0 in range(0, n_rows, FOLD_ROWS):
                _fold_splits(out_ptr, ws_ptr, ws_ml_ptr, tile * BLOCK_M + r0, kv_head, q_start, n_q, kv_len,
                             n_splits, n_split_slots, H, G, SPLIT, HEAD_D, FOLD_ROWS, BLOCK_D)


@triton.jit
def _load_split(ws_ptr, ws_ml_ptr, ws_row, s, have, BLOCK_D: tl.constexpr):
    """Split s's state (m, l, o) of rows ws_row; rows without it (`have` false) get the empty state.

    `.cg` reads bypass the SM's L1, which is not coherent with the other SMs' writes."""
    r = ws_row + s
    m = tl.load(ws_ml_ptr + r * 2, mask=have, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(ws_ml_ptr + r * 2 + 1, mask=have, other=0.0, cache_modifier=".cg")
    offs_d = tl.arange(0, BLOCK_D)
    o = tl.load(ws_ptr + r[:, None] * BLOCK_D + offs_d[None, :], mask=have[:, None], other=0.0,
                cache_modifier=".cg")
    return m, l, o


@triton.jit
def _fold_splits(out_ptr, ws_ptr, ws_ml_ptr, row0, kv_head, q_start, n_q, kv_len, n_splits, n_split_slots, H,
                 G: tl.constexpr, SPLIT: tl.constexpr, HEAD_D: tl.constexpr, FOLD_ROWS: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Fold FOLD_ROWS rows' split states in split order with `_merge` and write their outputs.

    Four splits are loaded before the four merges: the loads do not depend on the running state, so
    they are in flight together (one at a time, a fold over 64 splits waited 64 memory latencies). A
    row without split s (its position is before it) merges the empty state, which leaves it bit for
    bit as it is (see the module docstring), so the order per row is exactly the fold schedule's."""
    rows = row0 + tl.arange(0, FOLD_ROWS)
    qi = rows // G
    head = kv_head * G + rows % G
    ok = qi < n_q
    # splits up to the row's position (never past the tile's count, which only bad input could exceed:
    # reads stay inside the workspace)
    n_row = tl.where(ok, tl.minimum(tl.cdiv(kv_len - n_q + qi + 1, SPLIT), n_splits), 0)
    ws_row = ((q_start + qi) * H + head).to(tl.int64) * n_split_slots
    m = tl.full((FOLD_ROWS,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((FOLD_ROWS,), dtype=tl.float32)
    o = tl.zeros((FOLD_ROWS, BLOCK_D), dtype=tl.float32)
    for s in range(0, n_splits, 4):
        m0, l0, o0 = _load_split(ws_ptr, ws_ml_ptr, ws_row, s, s < n_row, BLOCK_D)
        m1, l1, o1 = _load_split(ws_ptr, ws_ml_ptr, ws_row, s + 1, s + 1 < n_row, BLOCK_D)
        m2, l2, o2 = _load_split(ws_ptr, ws_ml_ptr, ws_row, s + 2, s + 2 < n_row, BLOCK_D)
        m3, l3, o3 = _load_split(ws_ptr, ws_ml_ptr, ws_row, s + 3, s + 3 < n_row, BLOCK_D)
        m, l, o = _merge(m, l, o, m0, l0, o0)
        m, l, o = _merge(m, l, o, m1, l1, o1)
        m, l, o = _merge(m, l, o, m2, l2, o2)
        m, l, o = _merge(m, l, o, m3, l3, o3)
    _store_rows(out_ptr, o, l, q_start + qi, head, H, ok, HEAD_D, BLOCK_D)


@triton.jit
def _store_rows(out_ptr, o, l, token, head, H, ok, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[token, head] = o / l for the rows that are `ok` (out is [Tq, H, HEAD_D], contiguous)."""
    offs_d = tl.arange(0, BLOCK_D)
    out = o / tl.where(ok, l, 1.0)[:, None]
    tl.store(out_ptr + (token * H + head).to(tl.int64)[:, None] * HEAD_D + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=ok[:, None] & (offs_d[None, :] < HEAD_D))


@triton.jit
def _attention_packed_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    cu_q_ptr, kv_lens_ptr, slots_ptr, tile_seq_ptr, tile_kvh_ptr, tile_row0_ptr,
    n_tiles, Dh, qk_scale,
    stride_qt, stride_qh, stride_ks, stride_kl, stride_kh, stride_vs, stride_vl, stride_vh,
    stride_ot, stride_oh,
    G: tl.constexpr, SPLIT: tl.constexpr, TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """The fold schedule for the interpreter, TILES query tiles per program (a leading block dim).

    Interpreted, every tl op costs Python time whatever its block size (detmoe/kernels/NOTES.md), so one
    program works on TILES independent (sequence, KV head, row tile) tiles at once: q [TILES, BLOCK_M, Dh]
    against keys [TILES, Dh, BLOCK_N] gathered per tile (each tile its own slot and KV head), with a
    batched tl.dot.
    Per row, the operations are exactly those of `_attention_kernel`'s fold schedule: the same splits and
    blocks from position 0, the same dot (the interpreter's dot is computed row by row, see runtime.py),
    the same online softmax and the same merge, so its bits equal the fold schedule's (tested).
    The program walks the splits of its deepest row; for every other row the extra blocks and splits are
    fully masked and leave its state unchanged bit for bit.
    """
    # -- this program's tiles: each is BLOCK_M rows (query, head-in-group) of one sequence and KV head --
    tile = tl.program_id(0) * TILES + tl.arange(0, TILES)
    tile_ok = tile < n_tiles
    b = tl.load(tile_seq_ptr + tile, mask=tile_ok, other=0)
    kv_head = tl.load(tile_kvh_ptr + tile, mask=tile_ok, other=0)
    q_start = tl.load(cu_q_ptr + b, mask=tile_ok, other=0)
    n_q = tl.load(cu_q_ptr + b + 1, mask=tile_ok, other=0) - q_start   # padding tiles: no queries
    kv_len = tl.load(kv_lens_ptr + b, mask=tile_ok, other=0)
    slot = tl.load(slots_ptr + b, mask=tile_ok, other=0).to(tl.int64)

    # -- rows [TILES, BLOCK_M], as in _attention_kernel: row r = query r // G, head kv_head * G + r % G --
    rows = tl.load(tile_row0_ptr + tile, mask=tile_ok, other=0)[:, None] + tl.arange(0, BLOCK_M)[None, :]
    qi = rows // G
    head = kv_head[:, None] * G + rows % G
    row_ok = qi < n_q[:, None]
    q_pos = tl.where(row_ok, kv_len[:, None] - n_q[:, None] + qi, -1)     # padding rows see no key
    offs_d = tl.arange(0, BLOCK_D)[None, None, :]                         # [1, 1, BLOCK_D]
    q_off = (q_start[:, None] + qi).to(tl.int64) * stride_qt + head * stride_qh   # [TILES, BLOCK_M]
    q = tl.load(q_ptr + q_off[:, :, None] + offs_d, mask=row_ok[:, :, None] & (offs_d < Dh), other=0.0)
    k_base = (k_ptr + slot * stride_ks + kv_head * stride_kh)[:, None, None]      # [TILES, 1, 1]
    v_base = (v_ptr + slot * stride_vs + kv_head * stride_vh)[:, None, None]
    n_splits = tl.cdiv(tl.max(tl.max(q_pos, axis=1), axis=0) + 1, SPLIT)   # splits the deepest row sees

    offs_n = tl.arange(0, BLOCK_N)
    m = tl.full((TILES, BLOCK_M), float("-inf"), dtype=tl.float32)
    l = tl.zeros((TILES, BLOCK_M), dtype=tl.float32)
    o = tl.zeros((TILES, BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(0, n_splits):
        # -- split s: online softmax over its BLOCK_N blocks, from the empty state --
        m_s = tl.full((TILES, BLOCK_M), float("-inf"), dtype=tl.float32)
        l_s = tl.zeros((TILES, BLOCK_M), dtype=tl.float32)
        o_s = tl.zeros((TILES, BLOCK_M, BLOCK_D), dtype=tl.float32)
        for n0 in range(s * SPLIT, (s + 1) * SPLIT, BLOCK_N):
            pos = n0 + offs_n
            in_cache = pos[None, :] < kv_len[:, None]                       # [TILES, BLOCK_N]
            # k^T [TILES, BLOCK_D, BLOCK_N], v [TILES, BLOCK_N, BLOCK_D]; past kv_len reads 0
            kt = tl.load(k_base + pos[None, None, :] * stride_kl + tl.arange(0, BLOCK_D)[None, :, None],
                         mask=in_cache[:, None, :] & (tl.arange(0, BLOCK_D)[None, :, None] < Dh), other=0.0)
            v = tl.load(v_base + pos[None, :, None] * stride_vl + offs_d,
                        mask=in_cache[:, :, None] & (offs_d < Dh), other=0.0)
            scores = tl.dot(q, kt, input_precision=PRECISION) * qk_scale            # [TILES, BLOCK_M, BLOCK_N]
            scores = tl.where(pos[None, None, :] <= q_pos[:, :, None], scores, float("-inf"))
            m_new = tl.maximum(m_s, tl.max(scores, axis=2))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_s - m_safe)
            p = tl.exp2(scores - m_safe[:, :, None])
            l_s = tl.fma(l_s, alpha, tl.sum(p, axis=2))
            o_s = tl.dot(p.to(v.dtype), v, o_s * alpha[:, :, None], input_precision=PRECISION)
            m_s = m_new
        # -- fold split s into the running state: `_merge`, written out for the extra block dim --
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l = tl.fma(l, alpha, l_s * beta)
        o = tl.fma(o, alpha[:, :, None], o_s * beta[:, :, None])
        m = m_new
    out = o / tl.where(row_ok, l, 1.0)[:, :, None]
    o_off = (q_start[:, None] + qi).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_off[:, :, None] + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, :, None] & (offs_d < Dh))


def tiles() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, SPLIT) for this device: fixed, never chosen from the batch or the lengths.

    Interpreter: short splits (the CPU model's sequences are < 64 positions: one split of two blocks).
    """
    if runtime.interpreting():
        return 256, 32, 64
    return GPU_BLOCK_M, GPU_BLOCK_N, GPU_SPLIT


# GPU: query-row tile of the split schedule, key block, and the fixed KV split size. BLOCK_N and SPLIT
# set the bits (the online-softmax steps and the merge structure); BLOCK_M only groups query rows, as
# long as it stays >= 64: a 16-row tile runs mma.sync instead of wgmma and moved a row's bits
# (benchmarks/results/kernels/attention_variants/).
GPU_BLOCK_M, GPU_BLOCK_N, GPU_SPLIT = 64, 64, 512
# software-pipeline depth of the key/value loads (scheduling only): 3 measured faster than 2 over
# bench_kernels' attention cells (detmoe/kernels/NOTES.md;
# benchmarks/results/kernels/attention_stages/)
GPU_STAGES = 3


# The fold schedule's tile rows on the GPU: 128 rows with 8 warps (two warpgroups, each running the
# 64-row tile's instructions on its rows) when the step averages >= 128 query rows per sequence (a
# prefill: 1.40 against 1.50 of SDPA's time at 16k tokens), else 64 (decode at large batch, which also
# takes the fold schedule: a tile then holds G useful rows, and 128 rows measured slower there). Both
# give a row the same bits: the GPU tests compare prefill on 128-row tiles with decode on 64-row tiles
# (benchmarks/results/kernels/attention_variants/).
FOLD_BLOCK_M, FOLD_BLOCK_M_PREFILL = 64, 128

# Rows the split schedule's last program folds at a time (GPU): four splits of 16 rows are in flight.
FOLD_ROWS = 16

# Lanes of the in-kernel tile map (tile_map.py), at least: a power of two >= the batch's sequences is a
# compile-time size, so each power of two compiled a kernel of its own (~1.5-2.4 s each on an H200, two
# schedules each: most of a serving run's first-use compiles). One kernel for every batch of 2 to 64
# sequences (one sequence keeps its own, B == 1 being specialized); the wider scan is a few loads and a
# 64-lane cumsum per program. Which program takes which tile is all it decides, never a row's
# arithmetic, so the bits are the same.
MIN_SEQ_LANES = 64

# The interpreter's packed schedule: PACKED_TILES tiles of PACKED_BLOCK_M rows per program. Small tiles
# waste little on decode (G useful rows per tile); many tiles per program keep the program count low.
PACKED_BLOCK_M, PACKED_TILES = 16, 128


def schedules() -> tuple[str, ...]:
    """The schedules this device can run (test hook): packed is the interpreter's."""
    return ("packed", "fold", "split") if runtime.interpreting() else ("fold", "split")


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
              kv_lens: torch.Tensor, slots: torch.Tensor, scale: float,
              schedule: str | None = None) -> torch.Tensor:
    """Causal ragged attention over a KV cache -> [Tq, H, Dh] in q's dtype (see module docstring).

    `schedule` ("fold" or "split") is a test hook; by default split when the step has few query rows.
    """
    # 1. check shapes
    runtime.check_float("q", q)
    runtime.check_device("q", q)
    if q.dim() != 3:
        raise ValueError(f"q must be [Tq, H, Dh], got shape {tuple(q.shape)}")
    Tq, H, Dh = q.shape
    if k_cache.dim() != 4 or k_cache.shape[-1] != Dh or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache, v_cache must be [S, L, Hkv, Dh={Dh}], got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"k_cache/v_cache must have q's dtype {q.dtype}, got {k_cache.dtype}, {v_cache.dtype}")
    Hkv = k_cache.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"q heads H={H} must be a multiple of the cache's KV heads Hkv={Hkv}")
    B = kv_lens.shape[0]
    if cu_seqlens_q.shape != (B + 1,) or slots.shape != (B,):
        raise ValueError(f"cu_seqlens_q must be [B+1={B + 1}] and slots [B={B}], got "
                         f"{tuple(cu_seqlens_q.shape)}, {tuple(slots.shape)}")
    if any(t.device != q.device for t in (cu_seqlens_q, kv_lens, slots)):
        raise ValueError(f"cu_seqlens_q, kv_lens and slots must be on q's device {q.device}")
    if not q.is_cuda:
        # their values too, where reading them costs no device sync (the interpreter's host tensors); on
        # the GPU the model has checked its batch once per forward (detmoe/moe/model.py), not once per layer
        check_attention_indices(cu_seqlens_q, kv_lens, slots, Tq, k_cache.shape[0], k_cache.shape[1])
    if k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache must be contiguous in their last dim (Dh)")
    if v_cache.stride() != k_cache.stride():   # one set of cache strides goes to the kernel
        raise ValueError(f"k_cache and v_cache must have the same strides, got {k_cache.stride()}, "
                         f"{v_cache.stride()}")
    G = H // Hkv
    block_m, block_n, split = tiles()
    block_d = runtime.next_pow2(Dh)
    n_split_slots = runtime.cdiv(k_cache.shape[1], split)   # from the cache's capacity: no host sync
    if schedule is None and runtime.interpreting():
        schedule = "packed"
    elif schedule is None:
        # split pays when the tiles alone leave SMs idle and the cache holds more than one split
        n_tiles_bound = runtime.cdiv(Tq * G, block_m) + B   # query tiles per KV head, at most
        many_tiles = n_tiles_bound * Hkv >= 2 * runtime.num_sms()
        schedule = "fold" if many_tiles or n_split_slots == 1 else "split"
    if schedule not in schedules():
        raise ValueError(f"schedule must be one of {schedules()}, got {schedule!r}")

    # 2. allocate output (the tile map is built in the kernel: no host sync, no extra launches)
    out = runtime.empty((Tq, H, Dh), q.device, q.dtype)
    if Tq == 0 or B == 0:
        return out
    cu = cu_seqlens_q if cu_seqlens_q.dtype == torch.int32 else cu_seqlens_q.to(torch.int32)
    kv = kv_lens if kv_lens.dtype == torch.int32 else kv_lens.to(torch.int32)
    if schedule == "packed":
        _launch_packed(q, k_cache, v_cache, out, cu, kv, slots, (cu[1:] - cu[:-1]) * G, scale, G, Hkv,
                       block_n, split, block_d)
        return out
    fold = schedule == "fold"
    if fold and not runtime.interpreting():
        block_m = FOLD_BLOCK_M_PREFILL if Tq * G >= FOLD_BLOCK_M_PREFILL * B else FOLD_BLOCK_M
    if runtime.interpreting():   # exact grid: every interpreted program costs milliseconds
        n_tiles = int((((cu[1:] - cu[:-1]) * G + block_m - 1) // block_m).sum())
        n_split_slots = runtime.cdiv(int(kv.max()), split)
    else:                        # upper bounds: no host sync; surplus programs return at once
        n_tiles = runtime.cdiv(Tq * G, block_m) + B
    if fold:
        ws = counts = out  # unused
    else:
        # split states: o [rows, slots, block_d], then (m, l) [rows, slots, 2], rows = (query, head) pairs
        # (the kernel puts (m, l) after cu_seqlens_q[B] * H rows of o, <= Tq * H); one allocation
        ws = runtime.empty((Tq * H * n_split_slots * (block_d + 2),), q.device, torch.float32)
        counts = _split_counters(q.device, n_tiles * Hkv)

    # 3. launch
    _attention_kernel[(n_tiles, Hkv, 1 if fold else n_split_slots)](
        q, k_cache, v_cache, out, ws, counts, cu, kv, slots,
        B, scale * LOG2E, n_split_slots, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        G=G, FOLD=fold, SPLIT=split, HEAD_D=Dh, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        B_POW2=max(MIN_SEQ_LANES, runtime.next_pow2(B)), FOLD_ROWS=min(block_m, FOLD_ROWS),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=8 if block_m >= 128 else 4, num_stages=GPU_STAGES,
        # no mul+add contraction by the compiler: the masked and unmasked block steps (and the split
        # fold) then run the same IEEE operations, so no contraction choice can differ between them
        enable_fp_fusion=False,
    )
    return out


# The split schedule's arrival counters, one int32 per (query tile, KV head) of a launch, per device.
# They start at zero and every launch leaves them at zero (the folding program resets its own), so they
# are allocated once and grown when a launch needs more. One stream at a time: two launches running
# concurrently on different streams would share them.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
# Buffers outgrown by a larger launch stay allocated: a CUDA graph captured before the growth keeps
# pointing at its buffer (and still finds it zeroed, as every launch leaves it).
_OUTGROWN: list[torch.Tensor] = []


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n zeroed arrival counters on `device`."""
    counts = _COUNTERS.get(device)
    if counts is None or counts.numel() < n:
        if counts is not None:
            _OUTGROWN.append(counts)
        counts = torch.zeros(max(n, 4096), device=device, dtype=torch.int32)
        _COUNTERS[device] = counts
    return counts


def _launch_packed(q, k_cache, v_cache, out, cu, kv, slots, q_rows, scale, G, Hkv, block_n, split, block_d):
    """Interpreter only: list the (sequence, KV head, row tile) tiles on the host, TILES per program."""
    bm = PACKED_BLOCK_M
    tiles_per_seq = (q_rows + bm - 1) // bm                          # per sequence, for each KV head
    per_seq = tiles_per_seq.repeat_interleave(Hkv)                   # [(b, kv_head)]
    tile_seq = torch.arange(len(q_rows), dtype=torch.int32).repeat_interleave(Hkv).repeat_interleave(per_seq)
    tile_kvh = torch.arange(Hkv, dtype=torch.int32).repeat(len(q_rows)).repeat_interleave(per_seq)
    first = torch.cumsum(per_seq, 0) - per_seq                       # first tile of each (b, kv_head)
    tile_row0 = ((torch.arange(len(tile_seq)) - first.repeat_interleave(per_seq)) * bm).to(torch.int32)
    n_tiles = len(tile_seq)
    if n_tiles == 0:
        return
    _attention_packed_kernel[(runtime.cdiv(n_tiles, PACKED_TILES),)](
        q, k_cache, v_cache, out, cu, kv, slots, tile_seq, tile_kvh, tile_row0,
        n_tiles, q.shape[2], scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        G=G, SPLIT=split, TILES=PACKED_TILES, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
