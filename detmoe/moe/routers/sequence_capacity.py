"""Capacity-limited top-k with groups that never span requests (cf. HF SwitchTransformers, which caps
experts per sequence).

A sequence is cut into fixed chunks of `group_size` positions; each (chunk, expert) pair has
ceil(capacity_factor * group_size * top_k / E) slots, filled in position order (a token's first choice
before its second). Capacity uses the chunk's fixed size, not how many of its tokens are present, and
the counts of a chunk's earlier tokens are carried across decode steps (`ChunkState`), so a token's
route depends only on its own sequence's earlier tokens: batch-invariant, and prefill equals decode.
"""
from __future__ import annotations

from typing import Optional

import torch

from detmoe.moe.routers.base import Router, check_int, check_positive, expert_capacity, rank_in_queue
from detmoe.moe.routers.registry import register_router
from detmoe.moe.routing import ChunkState, Routing


@register_router
class SequenceCapacityRouter(Router):
    name = "sequence_capacity"
    stateful = True
    batch_invariant = True

    def __init__(self, n_experts: int, top_k: int, renormalize: bool = True,
                 capacity_factor: float = 1.25, group_size: int = 64, min_capacity: int = 0):
        super().__init__(n_experts, top_k, renormalize)
        capacity_factor = check_positive("capacity_factor", capacity_factor)
        self.group_size = check_int("group_size", group_size, 1)
        min_capacity = check_int("min_capacity", min_capacity, 0)
        self.slots = expert_capacity(capacity_factor, self.group_size, self.top_k, self.n_experts, min_capacity)

    def assign(self, probs, seq_ids, positions, state: Optional[ChunkState]) -> Routing:
        T, E, k = probs.shape[0], self.n_experts, self.top_k
        if positions is None:
            raise ValueError("positions is required by the sequence_capacity router")
        seq = _dense_ids(seq_ids)
        # the state has one row per sequence; only a router used without one counts them (a device sync)
        n_seqs = state.chunk.shape[0] if state is not None else int(seq.max()) + 1
        experts, weights = self.top_k_choice(probs)                       # [T, k]
        chunk = positions // self.group_size                              # [T]
        flat_e = experts.flatten()
        flat_chunk = chunk.repeat_interleave(k)
        flat_seq = seq.repeat_interleave(k)
        priority = positions.repeat_interleave(k) * k + torch.arange(T * k, device=probs.device) % k
        rank = rank_in_queue(flat_e, priority, (flat_chunk, flat_seq))   # queues per (sequence, chunk, expert)
        if state is None:
            state = ChunkState(torch.zeros(n_seqs, E, dtype=torch.long, device=probs.device),
                               torch.full((n_seqs,), -1, dtype=torch.long, device=probs.device))
        # earlier tokens of the same chunk, seen in earlier steps, queue first
        same_chunk = state.chunk[flat_seq] == flat_chunk
        rank = rank + torch.where(same_chunk, state.counts[flat_seq, flat_e], 0)
        dropped = (rank >= self.slots).view(T, k)
        return Routing(experts, weights.masked_fill(dropped, 0.0), dropped, probs,
                       state=_next_state(state, flat_seq, flat_chunk, flat_e, n_seqs, E))


def _dense_ids(seq_ids: torch.Tensor) -> torch.Tensor:
    """Map arbitrary sequence labels to 0..B-1 in ascending label order (torch.unique's inverse,
    by a sort: unique's output size costs a device sync)."""
    ordered, order = torch.sort(seq_ids, stable=True)
    new_label = torch.zeros_like(ordered, dtype=torch.long)
    new_label[1:] = (ordered[1:] != ordered[:-1]).long()
    dense = torch.empty_like(new_label)
    dense[order] = torch.cumsum(new_label, 0)
    return dense


def _next_state(state: ChunkState, seq, chunk, experts, n_seqs: int, E: int) -> ChunkState:
    """Counts per expert inside each sequence's last chunk, after this step."""
    last_chunk = torch.full((n_seqs,), -1, dtype=torch.long, device=seq.device)
    last_chunk = last_chunk.scatter_reduce(0, seq, chunk, reduce="amax")
    in_last = chunk == last_chunk[seq]
    counts = torch.where((state.chunk == last_chunk)[:, None], state.counts, 0).clone()
    # +1 per assignment in its sequence's last chunk, +0 for the others (no boolean indexing, whose
    # size costs a device sync); integer adds: exact and order-free, so deterministic
    counts.view(-1).scatter_add_(0, seq * E + experts, in_last.long())
    return ChunkState(counts, last_chunk)
