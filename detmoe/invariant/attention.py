"""Padding-invariant attention for third-party model code: a batch of padded rows, with the mask the model
built, run on detmoe's ragged attention kernel (detmoe/kernels/ops/attention.py).

Why padding moves bits: a fused attention kernel sums a query's keys in tiles counted from key 0 of the
padded row, so the same request left-padded by 3 has its real keys cut at other tile boundaries (and the
kernel itself is chosen by the batch's shape). Here each row's real keys are first packed from its first
real key (a gather, only where some row's keys do not already start at 0), and the kernel sums them from
there in a fixed order per position: the bits of a query depend on its request's keys alone, not on the
padding, the side it is on, the batch size or whether the step is a prefill or a decode.

The mask must be what causal decoding with padding gives: each query sees exactly its row's real keys up
to and including its own position. `padded_attention` checks that on the device and returns None for any
other mask (sliding windows, packed documents, bidirectional blocks, biases), for the caller to fall back.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from detmoe import kernels


def allowed_from_mask(attn_mask: Optional[torch.Tensor], is_causal: bool, B: int, Sq: int,
                      Sk: int) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """SDPA's (attn_mask, is_causal) as a [B, Sq, Sk] bool "query may see key" tensor, or None for "every
    query sees every key up to its own, queries last" (no mask). Returns (allowed, None), or (None, why)
    where the mask is not one this attention runs."""
    if attn_mask is None:
        if is_causal and Sq == Sk or not is_causal and Sq == 1:
            return None, None
        if is_causal:   # SDPA's is_causal aligns queries to the top left when Sq != Sk (one query: key 0;
            # queries past the last key all see every key, each its own run in padded_attention)
            q = torch.arange(Sq)[:, None]
            k = torch.arange(Sk)[None, :]
            return (k <= q).expand(B, Sq, Sk), None
        return None, "no mask and is_causal=False over several queries (bidirectional attention)"
    if is_causal:
        return None, "both attn_mask and is_causal given"
    m = attn_mask
    if m.dim() > 4 or m.shape[-2:] != (Sq, Sk) and not (m.shape[-1] == Sk and m.shape[-2] in (1, Sq)):
        return None, f"a mask of shape {tuple(m.shape)}"
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[1] > 1:   # one mask per head: allowed only where every head's is the same
        if not bool((m == m[:, :1]).all()):
            return None, "a mask that differs between heads"
    m = m[:, 0]
    if m.dtype == torch.bool:
        allowed = m
    elif m.is_floating_point():
        # additive: 0 where a key counts, a huge negative (or -inf) where not; any other value is a bias
        masked = m <= torch.finfo(m.dtype).min / 2
        if not bool(((m == 0) | masked).all()):
            return None, "an additive mask with values other than 0 and -inf (a bias)"
        allowed = ~masked
    else:
        return None, f"a {m.dtype} mask"
    return allowed.expand(B, Sq, Sk), None


@dataclass(frozen=True)
class Plan:
    """How a batch's mask maps onto the kernel's ragged sequences; the same for every layer of a step."""
    gather: Optional[torch.Tensor]      # [B, longest] each row's real key positions, None: they start at 0
    longest: int                        # the most real keys of a row
    queries: Optional[torch.Tensor]     # flat indices (b * Sq + i) of the queries computed; None: all
    cu_seqlens: torch.Tensor            # [runs + 1] int32: the kernel's sequences (runs of queries)
    run_keys: torch.Tensor              # [runs] int32: keys the last query of a run sees
    slots: torch.Tensor                 # [runs] int32: the batch row whose packed keys a run reads


def plan_for(allowed: Optional[torch.Tensor], B: int, Sq: int, Sk: int, dev: torch.device) -> Optional[Plan]:
    """The Plan for a mask (see `padded_attention`), or None where it is not causal attention over padded
    rows. Without a mask: computed on the host, no device sync."""
    if allowed is None:
        if Sq > Sk:
            return None
        return Plan(None, Sk, None, torch.arange(B + 1, dtype=torch.int32, device=dev) * Sq,
                    torch.full((B,), Sk, dtype=torch.int32, device=dev), torch.arange(B, dtype=torch.int32, device=dev))
    allowed = allowed.to(dev)
    key_valid = allowed.any(1)                                          # [B, Sk]: keys some query sees
    seen = allowed.sum(-1)                                              # [B, Sq]: keys each query sees
    rank = key_valid.cumsum(-1)                                         # [B, Sk]: 1-based rank of a real key
    # each query sees exactly the real keys up to its own position, and only those
    if not torch.equal(allowed, key_valid[:, None, :] & (rank[:, None, :] <= seen[:, :, None])):
        return None
    n_keys = key_valid.sum(-1)                                          # [B]
    longest = int(n_keys.max()) if B else 0
    # every row's real keys are its first ones (no padding, right padding): read in place
    prefix = torch.equal(key_valid, torch.arange(Sk, device=dev)[None, :] < n_keys[:, None])
    # each row's real keys packed from its first one, in order (padding last, never read)
    gather = None if prefix else torch.argsort((~key_valid).to(torch.int8), dim=-1, stable=True)[:, :longest]
    sees_any = (seen > 0).flatten()                                     # the others (left padding) get zeros
    queries = None if bool(sees_any.all()) else sees_any.nonzero().squeeze(1)
    # The kernel takes sequences whose queries are the last positions of their keys, one after another. A
    # query that sees c keys sits at position c - 1 of its row's packed keys; runs of queries at consecutive
    # positions form one sequence each (a prefill row is one run; a query that repeats a position, as
    # transformers' GQA packing of a decode step or a right-padding row does, starts another).
    q_seen = seen.flatten() if queries is None else seen.flatten()[queries]
    q_row = torch.arange(B, device=dev).repeat_interleave(Sq)
    q_row = q_row if queries is None else q_row[queries]
    starts = torch.ones_like(q_seen, dtype=torch.bool)
    starts[1:] = (q_row[1:] != q_row[:-1]) | (q_seen[1:] != q_seen[:-1] + 1)
    first = starts.nonzero().squeeze(1)                                 # [runs]
    cu = torch.cat([first, first.new_tensor([q_seen.shape[0]])]).to(torch.int32)
    return Plan(gather, longest, queries, cu, q_seen[cu[1:].long() - 1].to(torch.int32), q_row[first].to(torch.int32))


_cache = threading.local()


def cached_plan(allowed: Optional[torch.Tensor], key: Optional[torch.Tensor], B: int, Sq: int, Sk: int,
                dev: torch.device) -> Optional[Plan]:
    """plan_for, computed once per mask: transformers passes one mask tensor to every layer of a step.
    `key` is that tensor (the plan is reused while it is the same object, unchanged)."""
    shape = (B, Sq, Sk, dev)
    if allowed is None:
        hit = getattr(_cache, "unmasked", {}).get(shape)
        if hit is None:
            hit = plan_for(None, B, Sq, Sk, dev)
            _cache.unmasked = {shape: hit}
        return hit
    if key is not None and key.is_inference():
        key = None   # an inference tensor keeps no version counter: planned per call
    last = getattr(_cache, "masked", None)
    if key is not None and last is not None and last[0]() is key and last[1] == (key._version, shape):
        return last[2]
    plan = plan_for(allowed, B, Sq, Sk, dev)
    if key is not None:
        _cache.masked = (weakref.ref(key), (key._version, shape), plan)
    return plan


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[torch.Tensor],
                     scale: float, mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """q [B, H, Sq, D], k and v [B, Hkv, Sk, D], allowed [B, Sq, Sk] bool or None (see `allowed_from_mask`)
    -> [B, H, Sq, D] in q's dtype, or None where `allowed` is not causal attention over padded rows: each
    query sees its row's first c real keys for some c. A query that sees no key (left padding) gets zeros.
    `mask`: the caller's mask tensor, whose plan is then kept for the next layer's call."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    plan = cached_plan(allowed, mask, B, Sq, Sk, q.device)
    if plan is None:
        return None
    if plan.longest == 0:
        return q.new_zeros(B, Sq, H, D).transpose(1, 2)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)                       # [B, Sk, Hkv, D] views
    if plan.gather is None:
        kc, vc = kt[:, :plan.longest], vt[:, :plan.longest]
    else:
        kc = torch.take_along_dim(kt, plan.gather[:, :, None, None], dim=1)
        vc = torch.take_along_dim(vt, plan.gather[:, :, None, None], dim=1)
    if kc.stride(-1) != 1 or vc.stride() != kc.stride():
        kc, vc = kc.contiguous(), vc.contiguous()
    q_rows = q.transpose(1, 2).reshape(B * Sq, H, D)                    # row-major: b, then query
    if plan.queries is not None:
        q_rows = q_rows.index_select(0, plan.queries)
    if q_rows.stride(-1) != 1:
        q_rows = q_rows.contiguous()
    with kernels.use_backend("batch_invariant"):
        out_rows = kernels.attention(q_rows, kc, vc, plan.cu_seqlens, plan.run_keys, plan.slots, float(scale))
    if plan.queries is None:
        return out_rows.view(B, Sq, H, D).transpose(1, 2)
    out = q.new_zeros(B * Sq, H, D).index_copy_(0, plan.queries, out_rows)
    return out.view(B, Sq, H, D).transpose(1, 2)
