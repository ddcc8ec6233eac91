"""Value checks of the index tensors that attention and the grouped GEMM take (their contracts are in
detmoe/kernels/backend.py), shared by both backends so that they refuse the same inputs with a ValueError
instead of reading out of range.

Reading index values costs a device->host sync when they live on a GPU. Each function here reads all of
its values in one transfer; a caller on a path that must not sync calls it only for host tensors (the
model checks its own batch once per forward, detmoe/moe/model.py, and builds the rest correct by construction).
"""
from __future__ import annotations

import torch


def _integer(name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")


def check_index_range(name: str, t: torch.Tensor, n: int, what: str = "") -> None:
    """An integer index tensor whose values lie in 0..n-1 (`what` names n in the message): its dtype
    always, its values where it is a host tensor (reading a GPU tensor's would be a device sync)."""
    _integer(name, t)
    if t.is_cuda or t.numel() == 0:
        return
    lo, hi = torch.stack([t.min(), t.max()]).long().tolist()
    if lo < 0 or hi >= n:
        raise ValueError(f"{name} must be in 0..{n - 1}{what}, got {lo}..{hi}")


def check_attention_indices(cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor,
                            n_rows: int, n_slots: int, cache_len: int) -> tuple[int, int]:
    """Check a ragged attention batch of B sequences over a cache of n_slots x cache_len positions:
    cu_seqlens_q [B+1] starts at 0, never decreases and ends at n_rows (the query rows); kv_lens [B] is at
    least each sequence's query count (its queries sit at its last positions) and at most cache_len;
    slots [B] are in 0..n_slots-1. Returns (most queries, longest kv_len) of a sequence, read with the
    checks in one transfer."""
    B = kv_lens.shape[0]
    if kv_lens.dim() != 1 or cu_seqlens_q.shape != (B + 1,) or slots.shape != (B,):
        raise ValueError(f"cu_seqlens_q must be [B+1={B + 1}], kv_lens and slots [B={B}], got "
                         f"{tuple(cu_seqlens_q.shape)}, {tuple(kv_lens.shape)}, {tuple(slots.shape)}")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("kv_lens", kv_lens), ("slots", slots)):
        _integer(name, t)
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    ends = [cu_seqlens_q[0], cu_seqlens_q[-1]]
    per_seq = [q_lens.min(), q_lens.max(), (kv_lens - q_lens).min(), kv_lens.max(), slots.min(), slots.max()]
    first, last, *stats = torch.stack([s.long() for s in ends + (per_seq if B else [])]).tolist()
    if first != 0 or last != n_rows or (B and stats[0] < 0):
        raise ValueError(f"cu_seqlens_q must start at 0, never decrease and end at the query rows Tq={n_rows}, "
                         f"got {cu_seqlens_q.tolist()}")
    if not B:
        return 0, 0
    q_max, room, kv_max, slot_lo, slot_hi = stats[1:]
    if room < 0 or kv_max > cache_len:
        b = int(((kv_lens < q_lens) | (kv_lens > cache_len)).nonzero()[0])
        raise ValueError(f"kv_lens must be >= the sequence's query count and <= the cache length {cache_len}, "
                         f"got kv_lens[{b}]={int(kv_lens[b])} for {int(q_lens[b])} queries")
    if slot_lo < 0 or slot_hi >= n_slots:
        raise ValueError(f"slots must be cache slots in 0..{n_slots - 1}, got {slots.tolist()}")
    return q_max, kv_max


def check_group_offsets(offsets: torch.Tensor, n_groups: int, n_rows: int) -> None:
    """Check a grouped GEMM's offsets [n_groups]: cumulative row ends, so >= 0, non-decreasing, and the
    last one at most n_rows (rows past it belong to no group: their outputs are left unwritten)."""
    if offsets.shape != (n_groups,):
        raise ValueError(f"offsets must be [E={n_groups}], got {tuple(offsets.shape)}")
    _integer("offsets", offsets)
    if n_groups == 0:
        if n_rows:
            raise ValueError(f"offsets must assign the {n_rows} rows to groups, got no groups")
        return
    steps = offsets[1:] - offsets[:-1]
    first, last, step = torch.stack([offsets[0].long(), offsets[-1].long(),
                                     steps.min().long() if n_groups > 1 else offsets[0].long()]).tolist()
    if first < 0 or step < 0 or last > n_rows:
        raise ValueError(f"offsets must be cumulative row ends: >= 0, non-decreasing, the last at most the "
                         f"rows of x ({n_rows}), got {offsets.tolist()}")


def check_tree_leaves(p: torch.Tensor) -> None:
    """A tree sum's partials p [n, ...]: n (dim 0) must be a power of two."""
    n = p.shape[0] if p.dim() else 0
    if n < 1 or n & (n - 1):
        raise ValueError(f"a tree sum needs a power-of-two number of leaves (dim 0), got shape {tuple(p.shape)}")
