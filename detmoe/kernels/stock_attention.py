"""Stock attention over the slot KV cache: what the `torch` backend runs (contract: `Backend.attention`,
detmoe/kernels/backend.py), the way a serving stack would run it with PyTorch's own fused kernels.

Legend: B = sequences, Tq = query rows, H = query heads, Hkv = KV heads (G = H // Hkv), S = cache slots,
L = cache length, Dh = head dim, C = query chunks, QC = query rows per chunk, W = KV blocks per list.

Candidates (`KERNELS`; benchmarks/stock_attention.py times them against each other and against the
batch-invariant Triton kernel, and checks each one's output first):
  * "flex": FlexAttention (torch.nn.attention.flex_attention), compiled, over the cache read in place as
    one long KV sequence [1, Hkv, S*L, Dh] (past flex's int32 key offsets, 2**31 elements, in windows of
    slots that fit, one call each: `flex_windows`). The queries are cut into chunks of QC rows of one
    sequence each, one chunk per batch element [C, H, QC, Dh], so that a BlockMask row names only its own
    sequence's KV blocks, built on the device from the index tensors (`flex_plan`: no host sync, no
    create_block_mask, so a CUDA graph can capture it). A batch element per chunk, rather than one long
    query sequence whose 128-row blocks would straddle up to 128 decode sequences and visit all of their
    keys, lets flex use its decoding kernel (QC < 128: the G heads of a query share one tile and the
    keys are split across programs) and its prefill kernel (QC = 128: causal blocks of one sequence).
  * "split": for prefill and mixed steps. The decode rows go to flex as a sub-batch (the decode steps'
    compiled kernels, so nothing more to compile), the prefill sequences to F.scaled_dot_product_attention,
    one call per shape (queries, kv_len) over a view of the slot (or a gathered copy of the slots of
    several sequences of that shape), causal without a mask for a fresh prompt, so SDPA can take its
    flash / cuDNN kernels. Nothing is padded to the batch's longest sequence. It reads the lengths back
    to the host once per step (its check's read and its own: two syncs a step, not a layer), so it
    cannot be captured.
  * "sdpa_gather": the batch's cache rows gathered into [B, max_k] (a copy of K and V in every layer)
    and one masked F.scaled_dot_product_attention call (cuDNN, memory-efficient or math kernel) over the
    batch padded to its longest query run. It reads max_q and max_k back to the host: a sync, so it
    cannot be captured. In a serving engine's mixed step (one 1280-token prompt among 40 decodes) each
    decode sequence is padded to the prompt's 1280 queries
    (benchmarks/results/kernels/stock_attention_prefill_mixed/).
  * "varlen": torch.nn.attention.varlen.varlen_attn (FlashAttention-2 varlen) with the cache as pages
    of `VARLEN_PAGE` positions and a block table: in place and sync-free. Offered only where the
    installed torch has its `block_table` and `seqused_k` arguments, and the cache length is a multiple
    of the page.
Default (`kernel_for`), on a CUDA device for forward-only steps in fp16/bf16/fp32 with Dh >= 16
(Triton's smallest dot): "flex" for decode steps over a cache whose slots lie end to end (`flex_fits`),
"split" for prefill and mixed steps; "sdpa_gather" otherwise (the CPU, float64 references, autograd:
flex is built here without its backward block lists). flex is the decode default because it alone meets
every need of a captured decode step (in place, no sync, any cache length, GQA) with nothing newer than
the BlockMask API; varlen's paged arguments exist only in recent torch builds and need L % 256 == 0.
Prefill and mixed steps run eagerly, and their shapes change every step: flex would compile a kernel
per (QC, C) shape, seconds each, where "split" compiles nothing. Per call on an H200 (eager), "split"
was the fastest candidate at 1 x 4096, 16 x 512 and a 1280-token prompt among 40 or 63 decodes, flex
only at 8 decodes; a step pays its plan once, not per layer, plus the decode sub-batch's flex plan (the
times: detmoe/kernels/NOTES.md, "The stock attention, measured"). Which candidate is fastest is measured
by benchmarks/stock_attention.py on the GPU; its results (benchmarks/results/kernels/stock_attention_*/)
are the record to read before changing `DEFAULT`.

Compiled shapes: flex's compiled kernels depend on (QC, C, keys read, dtype, H, Hkv, Dh); the keys read
are S*L, or a window's n_slots*L (every window of a cache has the same length). QC is one of
`CHUNK_LENS`, picked from the mean rows per sequence, and C is padded to a power of two (padding chunks
list no blocks and cost an idle program each), so a serving run compiles a few shapes per cache, not
one per batch. C is not padded further: the decoding kernel splits each chunk's keys over about
2 * SMs / (C * Hkv) programs, so idle chunks would take splits from a small batch's real ones.
Not for: sliding windows, ALiBi or soft-capping; non-causal attention.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from detmoe.kernels.checks import check_attention_indices

KERNELS = ("flex", "split", "sdpa_gather", "varlen")
DEFAULT: Optional[str] = None     # None: `kernel_for` decides per call; else one of KERNELS for every call
CHUNK_LENS = (1, 4, 16, 128)      # query rows per chunk; below 128 flex runs its decoding kernel
KV_BLOCK = 128                    # keys per BlockMask block (flex's default tile of keys)
RECOMPILE_LIMIT = 64              # dynamo's per-function limit is raised to this (never lowered)
VARLEN_PAGE = 256                 # FlashAttention-2 pages must be multiples of 256 positions
FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# flex's kernels address keys with int32 offsets: a KV tensor it reads holds fewer elements than this
# (at exactly 2**31, torch 2.11's compiled decoding kernel fails to compile: measured on an H200)
FLEX_MAX_ELEMENTS = 2 ** 31


# ---------------------------------------------------------------------------------------------------
# flex: chunked queries, block lists built on the device
# ---------------------------------------------------------------------------------------------------

def chunk_len_for(n_rows: int, n_seqs: int) -> int:
    """QC: the smallest of CHUNK_LENS that holds a sequence of the mean length (host ints, no sync)."""
    mean = -(-n_rows // max(n_seqs, 1))
    return next((c for c in CHUNK_LENS if c >= mean), CHUNK_LENS[-1])


def n_chunks_for(n_rows: int, n_seqs: int, chunk: int) -> int:
    """C: at least sum_b ceil(q_len_b / QC) whatever the split of n_rows among n_seqs sequences
    (sum_b floor((q_b + QC - 1) / QC) <= floor((Tq + B (QC - 1)) / QC)), as a power of two."""
    need = (n_rows + n_seqs * (chunk - 1)) // chunk
    return 1 << max(need - 1, 0).bit_length()


@dataclass(frozen=True)
class FlexWindow:
    """A run of slots flex reads as one KV sequence: slots base .. base + n_slots - 1, of which it answers
    the sequences in slots lo .. hi - 1 (each slot is answered by exactly one window)."""
    base: int
    lo: int
    hi: int
    n_slots: int


def flex_windows(cache_shape: torch.Size) -> list[FlexWindow]:
    """The windows that cover a cache [S, L, Hkv, Dh]: one (the whole cache) where its keys stay under
    flex's int32 offsets, else as many as needed, all of one length (one compiled kernel), the last
    one overlapping its neighbour's slots rather than shorter. [] if not even one slot fits."""
    S, L, Hkv, Dh = cache_shape
    fits = lambda n: -(-n * L // KV_BLOCK) * KV_BLOCK * Hkv * Dh < FLEX_MAX_ELEMENTS
    # rounding each slot up to whole blocks over-counts the keys, so this many fit; the true fit may be more
    n = min(S, (FLEX_MAX_ELEMENTS - 1) // (-(-L // KV_BLOCK) * KV_BLOCK * Hkv * Dh))
    while n < S and fits(n + 1):
        n += 1
    if n == 0:
        return []
    return [FlexWindow(min(lo, S - n), lo, min(lo + n, S), n) for lo in range(0, S, n)]


@dataclass(frozen=True)
class FlexPlan:
    """Where each query row goes and what each chunk may see, all device tensors."""
    chunk: int                 # QC
    n_chunks: int              # C
    row_chunk: torch.Tensor    # [Tq] chunk of each query row
    row_offset: torch.Tensor   # [Tq] its row within the chunk
    n_real: torch.Tensor       # [C] int32 rows of the chunk that are queries (0 for a padding chunk)
    first_key: torch.Tensor    # [C] int32 flat index of the chunk's slot position 0 ((slot - base) * L)
    last_key0: torch.Tensor    # [C] int32 flat index of the last key the chunk's first row sees
    block_mask: BlockMask


def chunk_mask(n_real: torch.Tensor, first_key: torch.Tensor, last_key0: torch.Tensor) -> Callable:
    """mask_mod: row q of chunk b sees flat keys first_key[b] .. last_key0[b] + q (its slot, causal, its
    length); padding rows see none."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx < n_real[b]) & (kv_idx >= first_key[b]) & (kv_idx <= last_key0[b] + q_idx)
    return mask_mod


def block_lists(n_real: torch.Tensor, first_key: torch.Tensor, last_key0: torch.Tensor, cache_len: int,
                kv_block: int, with_full: bool) -> tuple[torch.Tensor, ...]:
    """Per chunk, the KV blocks its real rows touch: (n_partial [C], partial [C, W], n_full [C],
    full [C, W]), ascending, unused entries 0. A full block lies inside [first_key, last_key0], so every
    real row sees all of it (flex skips the mask there); partial blocks get mask_mod. Without full
    blocks, every touched block is partial: flex's decoding kernel sizes its KV splits by the whole KV
    length when a chunk has full blocks, by its own blocks when it has none."""
    kb, has_rows = kv_block, n_real > 0
    t_lo, t_hi = first_key // kb, (last_key0 + n_real - 1) // kb           # touched: [t_lo, t_hi]
    f_lo, f_hi = (first_key + kb - 1) // kb, (last_key0 + 1) // kb        # full: [f_lo, f_hi)
    n_full = torch.where(has_rows, (f_hi - f_lo).clamp(min=0), 0) if with_full else torch.zeros_like(t_lo)
    some_full = n_full > 0
    head = torch.where(some_full, f_lo - t_lo, 0)      # 0 or 1 partial block before the full run
    tail = torch.where(some_full, f_hi, t_lo)          # first partial block after it (or of all)
    n_partial = torch.where(has_rows, head + t_hi + 1 - tail, 0).clamp(min=0)
    j = torch.arange(-(-cache_len // kb) + 1, device=n_real.device)       # a slot spans <= ceil(L/kb)+1
    partial = torch.where(j < head[:, None], t_lo[:, None] + j, tail[:, None] + j - head[:, None])
    partial = torch.where(j < n_partial[:, None], partial, 0)
    full = torch.where(j < n_full[:, None], f_lo[:, None] + j, 0)
    return n_partial, partial, n_full, full


def flex_plan(cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor, n_rows: int,
              n_slots: int, cache_len: int, group: int, chunk: Optional[int] = None,
              kv_block: int = KV_BLOCK, window: Optional["FlexWindow"] = None) -> FlexPlan:
    """Cut the batch's n_rows query rows into chunks and build their BlockMask, on the indices' device
    with no host sync (only host ints pick the shapes). `chunk` overrides QC (tests and benchmarks).
    window: flex reads only that window's slots (`flex_windows`), and only the sequences whose slots
    it answers get rows (the other chunks list no blocks); None: the whole cache."""
    window = window or FlexWindow(0, 0, n_slots, n_slots)
    B, dev = kv_lens.shape[0], kv_lens.device
    QC = chunk or chunk_len_for(n_rows, B)
    C = n_chunks_for(n_rows, B, QC)
    # values are only checked on the host (stock_attention); clamped here so that bad indices on a GPU
    # give wrong rows, never reads or writes out of bounds
    cu = cu_seqlens_q.long()
    q_lens = (cu[1:] - cu[:-1]).clamp(min=0)
    kv, sl = kv_lens.long().clamp(0, cache_len), slots.long().clamp(0, n_slots - 1)
    per_seq = (q_lens + QC - 1) // QC
    ends = per_seq.cumsum(0)                        # [B] chunk ends of each sequence
    starts = ends - per_seq
    # -- each chunk: its sequence, first row in it, and the keys it may see --
    c = torch.arange(C, device=dev)
    seq = torch.searchsorted(ends, c, right=True).clamp(max=B - 1)
    j0 = (c - starts[seq]) * QC
    mine = (c < ends[-1]) & (sl[seq] >= window.lo) & (sl[seq] < window.hi)
    n_real = torch.where(mine, (q_lens[seq] - j0).clamp(0, QC), 0)
    first_key = (sl[seq] - window.base).clamp(min=0) * cache_len
    last_key0 = first_key + kv[seq] - q_lens[seq] + j0
    # -- each query row: its chunk and row in the chunk --
    t = torch.arange(n_rows, device=dev)
    row_seq = torch.searchsorted(cu[1:], t, right=True).clamp(max=B - 1)
    i = t - cu[row_seq]
    row_chunk, row_offset = (starts[row_seq] + i // QC).clamp(0, C - 1), i % QC
    # -- block lists: full blocks only for the prefill kernel (see block_lists) --
    n_partial, partial, n_full, full = block_lists(n_real, first_key, last_key0, cache_len, kv_block,
                                                   with_full=QC >= 128)
    n_real, first_key, last_key0 = (x.to(torch.int32) for x in (n_real, first_key, last_key0))
    as_rows = lambda n, idx: (n.to(torch.int32).view(C, 1, 1), idx.to(torch.int32).view(C, 1, 1, -1))
    kv_num, kv_idx = as_rows(n_partial, partial)
    full_num, full_idx = as_rows(n_full, full) if QC >= 128 else (None, None)
    # one BlockMask row per chunk; the decoding kernel's query tile (QC*G rows, a power of two >= 16)
    # must fit in it
    q_block = 128 if QC >= 128 else max(128, 1 << (QC * group - 1).bit_length())
    block_mask = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(q_block, kv_block),
        mask_mod=chunk_mask(n_real, first_key, last_key0), seq_lengths=(QC, window.n_slots * cache_len),
        compute_q_blocks=False)   # forward only: the backward's transposed lists are not built
    return FlexPlan(QC, C, row_chunk, row_offset, n_real, first_key, last_key0, block_mask)


# The last plan built, with the index tensors it was built from. Every layer of a step passes the same
# index tensors (unchanged in between), so the step builds its block mask once, as a serving engine
# builds its attention metadata once per step, not once per layer. Held by identity and version counter:
# an index tensor written in place, or another tensor, builds a new plan. Also keyed by whether a CUDA
# graph is being captured: a plan built eagerly before a capture must not be reused inside it, or the
# graph would hold no plan-building ops and replay the eager plan whatever its index tensors hold then.
_last_plan: Optional[tuple[tuple, tuple[FlexPlan, ...]]] = None


def _step_key(cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor, *rest) -> tuple:
    """What names a step's plan: its index tensors by identity and version counter (an in-place write
    bumps it), and the call's other arguments."""
    return (cu_seqlens_q, kv_lens, slots, *(t._version for t in (cu_seqlens_q, kv_lens, slots)), *rest)


def _same_step(cached: Optional[tuple], key: tuple) -> bool:
    """Whether a cached (key, plan) was built for this key: the same tensors (`is`), equal other values."""
    return cached is not None and len(cached[0]) == len(key) and all(
        a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(cached[0], key))


def _shared_plans(cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor, *shape,
                  windows: tuple[FlexWindow, ...]) -> tuple[FlexPlan, ...]:
    """One plan per window, built once per step (see above)."""
    global _last_plan
    capturing = kv_lens.is_cuda and torch.cuda.is_current_stream_capturing()
    key = _step_key(cu_seqlens_q, kv_lens, slots, capturing, *shape, windows)
    if _same_step(_last_plan, key):
        return _last_plan[1]
    plans = tuple(flex_plan(cu_seqlens_q, kv_lens, slots, *shape, window=w) for w in windows)
    _last_plan = (key, plans)
    return plans


_compiled_flex: Optional[Callable] = None


def compiled_flex() -> Callable:
    """flex_attention compiled once per process (static shapes: the decoding kernel needs a static
    batch), with dynamo's recompile limit raised so that each chunk shape keeps its compiled kernel."""
    global _compiled_flex
    if _compiled_flex is None:
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
        _compiled_flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    return _compiled_flex


def flex_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor,
                         scale: float, compiled: Optional[bool] = None, chunk: Optional[int] = None,
                         kv_block: int = KV_BLOCK) -> torch.Tensor:
    """The "flex" candidate. compiled: default on CUDA; eager (the CPU) materialises each chunk's scores
    over the whole cache and ignores the block lists: for tests at small sizes."""
    Tq, H, Dh = q.shape
    S, L, Hkv, _ = k_cache.shape
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise ValueError("kernel 'flex' is forward-only here (no backward block lists); use 'sdpa_gather' "
                         "for autograd")
    if not (flex_fits(k_cache) and flex_fits(v_cache)):
        raise ValueError(f"kernel 'flex' needs a cache whose slots lie end to end (a view [S*L, Hkv, Dh]) "
                         f"and whose one slot, rounded up to whole {KV_BLOCK}-key blocks, holds fewer "
                         f"than {FLEX_MAX_ELEMENTS} elements (int32 offsets), got shape "
                         f"{tuple(k_cache.shape)}, strides {k_cache.stride()}, {v_cache.stride()}")
    windows = tuple(flex_windows(k_cache.shape))
    plans = _shared_plans(cu_seqlens_q, kv_lens, slots, Tq, S, L, H // Hkv, chunk, kv_block, windows=windows)
    first = plans[0]                        # every window's plan cuts the rows into the same chunks
    qc = q.new_zeros(first.n_chunks, first.chunk, H, Dh)
    qc[first.row_chunk, first.row_offset] = q                                # [C, QC, H, Dh]
    run = compiled_flex() if (q.is_cuda if compiled is None else compiled) else flex_attention
    out = None
    for w, plan in zip(windows, plans):
        n = w.n_slots * L
        k = k_cache[w.base:w.base + w.n_slots].view(1, n, Hkv, Dh).transpose(1, 2)   # [1, Hkv, n, Dh], no copy
        v = v_cache[w.base:w.base + w.n_slots].view(1, n, Hkv, Dh).transpose(1, 2)
        with torch.no_grad():   # forward only: the block lists for a backward are not built
            o = run(qc.transpose(1, 2), k, v, block_mask=plan.block_mask, scale=scale, enable_gqa=H != Hkv)
        o = o.transpose(1, 2)[plan.row_chunk, plan.row_offset]             # [Tq, H, Dh]
        # a row takes its own window's output (the others saw no keys for it): selected, never added
        out = o if out is None else torch.where((plan.n_real[plan.row_chunk] > 0)[:, None, None], o, out)
    return out


# ---------------------------------------------------------------------------------------------------
# split: decode rows through flex, each prefill sequence through SDPA on its own slot
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrefillGroup:
    """Prefill sequences of one shape: n queries each (the last of kv_len positions) in these slots."""
    n: int
    kv_len: int
    slots: list[int]
    rows: list[int]                       # each sequence's first query row
    slot_index: Optional[torch.Tensor]    # [g] slots on the device, row_index [g * n] its query rows
    row_index: Optional[torch.Tensor]     # (both None for a group of one: its slot is read as a view)
    mask: Optional[torch.Tensor]          # [n, kv_len] lower-right causal (None for a fresh prompt)


@dataclass(frozen=True)
class SplitPlan:
    """A mixed step cut in two: its decode sequences (one query each) as a sub-batch for flex, and its
    prefill sequences grouped by shape; device tensors built once per step."""
    decode_rows: torch.Tensor      # [Bd] the query row of each decode sequence
    decode_cu: torch.Tensor        # [Bd + 1] 0, 1, .., Bd
    decode_kv: torch.Tensor        # [Bd]
    decode_slots: torch.Tensor     # [Bd]
    decode_max_kv: int             # the longest decode kv_len (sdpa_gather's bound, where flex cannot run)
    prefill: tuple[PrefillGroup, ...]


_last_split: Optional[tuple[tuple, SplitPlan]] = None


def split_plan(cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor, n_rows: int,
               n_slots: int, cache_len: int) -> SplitPlan:
    """The step's SplitPlan, built (and its indices checked) on the first layer's call and reused by the
    others, as the flex plan is (`_shared_plans`): two host reads per step (the check's and the
    lengths'), not per layer. Not inside a CUDA graph capture: the plan is the host's copy of the step's
    lengths, which a replay would not update."""
    global _last_split
    if kv_lens.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError("kernel 'split' reads the batch's lengths back to the host, so it cannot run inside a "
                         "CUDA graph capture; use 'flex' (the default for a captured decode step)")
    key = _step_key(cu_seqlens_q, kv_lens, slots, n_rows, n_slots, cache_len)
    if _same_step(_last_split, key):
        return _last_split[1]
    check_attention_indices(cu_seqlens_q, kv_lens, slots, n_rows, n_slots, cache_len)
    dev = kv_lens.device
    cu = cu_seqlens_q.long()
    starts, q_lens = cu[:-1], cu[1:] - cu[:-1]
    seqs = list(zip(*torch.stack([starts, q_lens, kv_lens.long(), slots.long()]).tolist()))  # one transfer
    decode = [b for b, (_, n, _, _) in enumerate(seqs) if n == 1]
    shapes: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for row, n, kv, slot in seqs:
        if n > 1:
            shapes.setdefault((n, kv), []).append((row, slot))
    groups = []
    for (n, kv), members in shapes.items():
        rows, group_slots = [r for r, _ in members], [s for _, s in members]
        one = len(members) == 1
        row_index = None if one else (torch.tensor(rows)[:, None] + torch.arange(n)).flatten().to(dev)
        # a fresh prompt (n == kv) is causal from the top left (SDPA's is_causal); a later chunk's queries
        # are the last n of kv positions, so its mask is aligned to the bottom right
        mask = None if n == kv else torch.ones(n, kv, dtype=torch.bool, device=dev).tril(kv - n)
        groups.append(PrefillGroup(n, kv, group_slots, rows,
                                   None if one else torch.tensor(group_slots, device=dev), row_index, mask))
    dec = torch.tensor(decode, dtype=torch.long, device=dev)
    plan = SplitPlan(decode_rows=starts[dec],
                     decode_cu=torch.arange(len(decode) + 1, dtype=torch.int32, device=dev),
                     decode_kv=kv_lens[dec], decode_slots=slots[dec],
                     decode_max_kv=max((seqs[b][2] for b in decode), default=0), prefill=tuple(groups))
    _last_split = (key, plan)
    return plan


def split_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """The "split" candidate, for prefill and mixed steps: the decode rows in one flex call (the decode
    step's own kernel: nothing to compile beyond the decode steps'; sdpa_gather where flex cannot read the
    cache), and the prefill sequences in one F.scaled_dot_product_attention call per shape (queries,
    kv_len): a sequence alone reads a view of its slot, several of one shape read a gathered copy of
    their slots, none is padded to the longest. Causal, lower-right aligned (the queries are the last
    positions): a fresh prompt (queries == kv_len) without a mask, so SDPA may pick its flash kernels; a
    later chunk with one. Reads the batch's lengths back to the host once per step (`split_plan`: with
    its index check, two reads a step), so only for eager steps: a CUDA graph capture is refused."""
    H, Hkv = q.shape[1], k_cache.shape[2]
    plan = split_plan(cu_seqlens_q, kv_lens, slots, q.shape[0], k_cache.shape[0], k_cache.shape[1])
    out = q.new_empty(q.shape)
    if plan.decode_rows.numel():
        q_dec = q[plan.decode_rows]
        args = (q_dec, k_cache, v_cache, plan.decode_cu, plan.decode_kv, plan.decode_slots, scale)
        out[plan.decode_rows] = (flex_paged_attention(*args) if flex_runs(q, k_cache, v_cache)
                                 else sdpa_gather_attention(*args, max_q=1, max_k=plan.decode_max_kv))
    for g in plan.prefill:
        n, kv = g.n, g.kv_len
        if g.slot_index is None:
            qs = q[g.rows[0]:g.rows[0] + n][None]                                 # [1, n, H, Dh]
            ks, vs = (c[g.slots[0], :kv][None] for c in (k_cache, v_cache))      # [1, kv, Hkv, Dh]
        else:
            qs = q[g.row_index].view(-1, n, H, q.shape[2])                        # [g, n, H, Dh]
            ks, vs = (c[g.slot_index, :kv] for c in (k_cache, v_cache))           # [g, kv, Hkv, Dh]
        o = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                           attn_mask=g.mask, is_causal=g.mask is None, scale=scale,
                                           enable_gqa=H != Hkv).transpose(1, 2)   # [g, n, H, Dh]
        if g.slot_index is None:
            out[g.rows[0]:g.rows[0] + n] = o[0]
        else:
            out[g.row_index] = o.reshape(-1, H, q.shape[2])
    return out


# ---------------------------------------------------------------------------------------------------
# sdpa_gather and varlen
# ---------------------------------------------------------------------------------------------------

def sdpa_gather_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor,
                          scale: float, max_q: Optional[int] = None, max_k: Optional[int] = None) -> torch.Tensor:
    """The "sdpa_gather" candidate: one masked SDPA call over the padded batch. Padded query rows sit past
    their sequence's end, so they see all of its keys (never an empty row, so no NaN) and are dropped.
    max_q, max_k: the longest query run and kv_len, read back from the device when not given."""
    H = q.shape[1]
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    if max_q is None or max_k is None:
        max_q, max_k = torch.stack([q_lens.max(), kv_lens.max()]).tolist()   # a device sync
    row = torch.arange(max_q, device=q.device)
    valid_q = row[None, :] < q_lens[:, None]                                # [B, max_q]
    src = (cu_seqlens_q[:-1, None] + row[None, :]).clamp(max=q.shape[0] - 1)
    qb = q[src] * valid_q[..., None, None]                                   # [B, max_q, H, Dh]
    kb = k_cache[slots, :max_k]                                              # [B, max_k, Hkv, Dh]
    vb = v_cache[slots, :max_k]
    q_pos = (kv_lens - q_lens)[:, None] + row[None, :]                       # [B, max_q]
    k_pos = torch.arange(max_k, device=q.device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < kv_lens[:, None, None])
    out = F.scaled_dot_product_attention(
        qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=H != k_cache.shape[2])
    return out.transpose(1, 2)[valid_q]                                     # [Tq, H, Dh]


@functools.cache
def _varlen_fn() -> Optional[Callable]:
    """varlen_attn with the GQA flag bound where this torch has one, if it has paged arguments."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if not {"block_table", "seqused_k"} <= params.keys():
        return None
    return functools.partial(varlen_attn, enable_gqa=True) if "enable_gqa" in params else varlen_attn


def varlen_available(k_cache: Optional[torch.Tensor] = None) -> bool:
    """Does this torch offer paged varlen_attn (and, given a cache, is its length a multiple of pages)?"""
    return _varlen_fn() is not None and (k_cache is None or k_cache.shape[1] % VARLEN_PAGE == 0)


def varlen_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """The "varlen" candidate: FlashAttention-2 varlen over the cache as pages, sequence b reading the
    pages of slot slots[b]. max_q and max_k are host bounds (Tq, L): no sync. CUDA, fp16/bf16 only."""
    varlen_attn = _varlen_fn()
    if varlen_attn is None or not varlen_available(k_cache):
        raise ValueError(f"kernel 'varlen' needs torch.nn.attention.varlen with block_table and a cache "
                         f"length that is a multiple of {VARLEN_PAGE}, got L={k_cache.shape[1]}")
    Tq, H, _ = q.shape
    S, L, Hkv, Dh = k_cache.shape
    per_slot = L // VARLEN_PAGE
    pages = lambda c: c.view(S * per_slot, VARLEN_PAGE, Hkv, Dh)             # [S*L/P, P, Hkv, Dh]
    table = slots.long()[:, None] * per_slot + torch.arange(per_slot, device=q.device)  # [B, L/P]
    cu_k = F.pad(kv_lens.cumsum(0), (1, 0))
    return varlen_attn(q, pages(k_cache), pages(v_cache), cu_seqlens_q.to(torch.int32), cu_k.to(torch.int32),
                       Tq, L, scale=scale, window_size=(-1, 0), seqused_k=kv_lens.to(torch.int32),
                       block_table=table.to(torch.int32))


# ---------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------

def flex_fits(cache: torch.Tensor) -> bool:
    """Can flex read this cache: slots that lie end to end (a run of them is a view [n*L, Hkv, Dh] without
    a copy), one slot's keys within flex's int32 offsets. A larger cache is read in windows of slots
    (`flex_windows`), one flex call each."""
    S, L, Hkv, Dh = cache.shape
    end_to_end = cache.stride()[1:] == (Hkv * Dh, Dh, 1) and (S == 1 or cache.stride(0) == L * Hkv * Dh)
    return end_to_end and bool(flex_windows(cache.shape))


def flex_runs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Can flex run this call: fp16/bf16/fp32, Dh >= 16 (Triton's smallest dot), a cache it reads
    (`flex_fits`). (Compiled on CUDA, eagerly on the CPU.)"""
    return q.dtype in FLEX_DTYPES and q.shape[-1] >= 16 and flex_fits(k_cache) and flex_fits(v_cache)


def kernel_for(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               n_seqs: Optional[int] = None) -> str:
    """The candidate a call runs by default (module docstring): `DEFAULT` if set, else flex for a decode
    step, split for prefill and mixed steps (on CUDA, forward only), sdpa_gather elsewhere. Given n_seqs,
    a decode step is one query per sequence (q.shape[0] == n_seqs, known from shapes): the step a CUDA
    graph captures. Without n_seqs the call is taken for a decode step."""
    if DEFAULT is not None:
        return DEFAULT
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    decode = n_seqs is None or q.shape[0] == n_seqs
    if not (q.is_cuda and q.dtype in FLEX_DTYPES and q.shape[-1] >= 16 and not needs_grad):
        return "sdpa_gather"
    if not decode:
        return "split"
    return "flex" if flex_runs(q, k_cache, v_cache) else "sdpa_gather"


def stock_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor, scale: float,
                    kernel: Optional[str] = None) -> torch.Tensor:
    """`Backend.attention` on stock kernels: `kernel` (one of KERNELS) or the default (`kernel_for`).
    Index values are checked where that costs no extra sync: for host index tensors, for sdpa_gather
    (which reads values back anyway) and by split's plan once per step (its own read). flex and varlen
    on a GPU read none (a captured step cannot), and flex clamps its indices so that bad values give
    wrong rows, not out-of-bounds reads."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q must be [Tq, H, Dh] and k_cache, v_cache [S, L, Hkv, Dh] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"query heads H={q.shape[1]} must be a multiple of the KV heads Hkv={k_cache.shape[2]}")
    kernel = kernel or kernel_for(q, k_cache, v_cache, kv_lens.shape[0])
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    bounds = None
    if cu_seqlens_q.device.type == "cpu" or kernel == "sdpa_gather":
        # free for host tensors; sdpa_gather reads its padded sizes back anyway, checks in the same transfer
        bounds = check_attention_indices(cu_seqlens_q, kv_lens, slots, q.shape[0], k_cache.shape[0],
                                         k_cache.shape[1])
    if q.shape[0] == 0 or kv_lens.shape[0] == 0:
        return q.new_empty(q.shape)
    if kernel == "flex":
        return flex_paged_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, slots, scale)
    if kernel == "split":
        return split_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, slots, scale)
    if kernel == "varlen":
        return varlen_paged_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, slots, scale)
    return sdpa_gather_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, slots, scale,
                                 *(bounds or (None, None)))
