"""Ragged attention over a KV cache: a query's bits are the same in prefill and in decode, and do not
depend on the batch, the other sequences, the slot or the schedule; accuracy against float64 SDPA."""
from __future__ import annotations

import pytest
import torch

from detmoe.kernels.ops.attention import attention, schedules, tiles
from detmoe.kernels.torch_backend import TorchBackend
from tests.kernels.conftest import DEVICE, TOL, randn, rel_err


def _cache(gen, S, L, Hkv, Dh, dtype):
    k, v = randn(gen, S, L, Hkv, Dh, dtype=dtype), randn(gen, S, L, Hkv, Dh, dtype=dtype)
    return k, v


def _run(q_rows, k, v, seqs, scale, schedule=None):
    """seqs: list of (n_queries, kv_len, slot); q_rows: [sum n, H, Dh]."""
    cu = torch.tensor([0] + [n for n, _, _ in seqs], device=DEVICE).cumsum(0).to(torch.int32)
    kv = torch.tensor([l for _, l, _ in seqs], device=DEVICE, dtype=torch.int32)
    slots = torch.tensor([s for _, _, s in seqs], device=DEVICE, dtype=torch.int32)
    return attention(q_rows, k, v, cu, kv, slots, scale, schedule=schedule), (cu, kv, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (3, 3)])
def test_prefill_equals_decode_and_batch_invariant(gen, dtype, H, Hkv):
    _, block_n, split = tiles()
    S, L, Dh, scale = 5, 3 * split + 20, 32, 0.17
    k, v = _cache(gen, S, L, Hkv, Dh, dtype)
    n, kv_len, slot = 2 * split + 9, 2 * split + 9 + 5, 2       # a prompt of n tokens after 5 cached ones
    k[slot, kv_len:] = float("nan")                               # never read past kv_len
    v[slot, kv_len:] = float("nan")
    q = randn(gen, n, H, Dh, dtype=dtype)

    # prefill, alone and inside a batch of other sequences (other slots, lengths), both schedules
    alone, meta = _run(q, k, v, [(n, kv_len, slot)], scale)
    ref = TorchBackend().attention(q.double(), k.double(), v.double(), *[t.long() for t in meta], scale)
    assert rel_err(alone, ref) < TOL[dtype]
    for schedule in schedules():
        others = [(7, 40, 0), (n, kv_len, slot), (1, 3 * split + 1, 4), (30, 30, 1)]
        qs = [randn(gen, m, H, Dh, dtype=dtype) for m, _, _ in others]
        qs[1] = q
        out, _ = _run(torch.cat(qs), k, v, others, scale, schedule)
        assert torch.equal(out[7:7 + n], alone), f"prefill changed inside a batch ({schedule})"

    # decode: query i alone, cache holding positions 0..pos, at another slot, with co-sequences
    k2, v2 = k.clone(), v.clone()
    k2[4], v2[4] = k[slot], v[slot]
    positions = sorted({0, 1, block_n - 1, block_n, split - 1, split, split + 1, n - 1})
    for i in positions:
        pos = kv_len - n + i
        dec, _ = _run(q[i:i + 1], k2, v2, [(1, pos + 1, 4)], scale)
        assert torch.equal(dec[0], alone[i]), f"decode of query {i} (position {pos}) != prefill"
        batch = [(1, 77, 0), (1, pos + 1, 4), (1, 3 * split, 1)]
        qb = torch.cat([randn(gen, 1, H, Dh, dtype=dtype), q[i:i + 1], randn(gen, 1, H, Dh, dtype=dtype)])
        for schedule in schedules():
            out, _ = _run(qb, k2, v2, batch, scale, schedule)
            assert torch.equal(out[1], alone[i]), f"batched decode of query {i} != prefill ({schedule})"


def test_bad_heads_named():
    q = torch.randn(2, 3, 8, device=DEVICE)
    k = torch.randn(1, 4, 2, 8, device=DEVICE)
    one = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="H=3"):
        attention(q, k, k, torch.tensor([0, 2], dtype=torch.int32, device=DEVICE), one * 2, one * 0, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ctx", [1000, 8500])
def test_gpu_prefill_equals_decode(gen, ctx, dtype):
    H, Hkv, Dh = 32, 8, 128
    S, L, scale = 4, ctx + 64, Dh ** -0.5
    k, v = _cache(gen, S, L, Hkv, Dh, dtype)
    n, slot = ctx, 1
    q = randn(gen, n, H, Dh, dtype=dtype)
    alone, meta = _run(q, k, v, [(n, ctx, slot)], scale)
    ref = TorchBackend().attention(q.float(), k.float(), v.float(), *[t.long() for t in meta], scale)
    assert rel_err(alone, ref) < TOL[dtype]
    others = [(100, 5000, 0), (n, ctx, slot), (1, 7000, 2)]
    out, _ = _run(torch.cat([randn(gen, 100, H, Dh, dtype=dtype), q, randn(gen, 1, H, Dh, dtype=dtype)]),
                  k, v, others, scale)
    assert torch.equal(out[100:100 + n], alone)
    # the last 100 queries as one prefill chunk on the split schedule: tiles of many rows, folded by
    # the last split in several row chunks
    chunk, _ = _run(q[-100:], k, v, [(100, ctx, slot)], scale, "split")
    assert torch.equal(chunk, alone[-100:])
    for i in sorted({0, 63, 64, 511, 512, 513, n // 2, n - 1}):
        pos = ctx - n + i
        for bsz in (1, 3, 32):
            batch = [(1, pos + 1, slot)] + [(1, 1 + (37 * j) % (L - 1), j % S) for j in range(1, bsz)]
            qb = torch.cat([q[i:i + 1], randn(gen, bsz - 1, H, Dh, dtype=dtype)])
            dec, _ = _run(qb, k, v, batch, scale)
            assert torch.equal(dec[0], alone[i]), f"decode of query {i} at batch {bsz} != prefill"


def test_split_schedule_counters_and_repeats(gen):
    """The split schedule's arrival counters are back at zero after every launch, so a second launch
    folds exactly like the first (a counter left behind would make the wrong program fold)."""
    from detmoe.kernels.ops import attention as attention_module
    _, _, split = tiles()
    k, v = _cache(gen, 2, 3 * split + 5, 2, 16, torch.float32)
    seqs = [(3, 3 * split + 5, 1), (1, split + 2, 0)]
    q = randn(gen, 4, 4, 16, dtype=torch.float32)
    first, _ = _run(q, k, v, seqs, 0.25, "split")
    assert int(attention_module._COUNTERS[q.device].count_nonzero()) == 0
    again, _ = _run(q, k, v, seqs, 0.25, "split")
    assert torch.equal(first, again)
    fold, _ = _run(q, k, v, seqs, 0.25, "fold")
    assert torch.equal(first, fold)


def test_cache_strides_must_match():
    q = torch.randn(1, 2, 8, device=DEVICE)
    k = torch.randn(1, 4, 2, 8, device=DEVICE)
    v = torch.randn(1, 2, 4, 8, device=DEVICE).transpose(1, 2)   # same shape, other strides
    one = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="same strides"):
        attention(q, k, v, torch.tensor([0, 1], dtype=torch.int32, device=DEVICE), one, one * 0, 1.0)


# A valid batch: sequences (2 queries, kv_len 3, slot 0) and (1 query, kv_len 5, slot 1) over a cache of
# 2 slots x 8 positions; each row below breaks one index tensor.
BAD_INDICES = [
    (dict(cu=[0, 2, 4]), "cu_seqlens_q"),       # ends past the 3 query rows
    (dict(cu=[1, 2, 3]), "cu_seqlens_q"),       # does not start at 0
    (dict(cu=[0, 4, 3]), "cu_seqlens_q"),       # decreases
    (dict(kv=[1, 5]), "kv_lens"),               # fewer keys than the sequence's 2 queries
    (dict(kv=[3, 9]), "kv_lens"),               # past the cache length 8
    (dict(kv=[3.0, 5.0]), "kv_lens"),           # not integers
    (dict(slots=[0, 2]), "slots"),              # past the 2 slots
    (dict(slots=[-1, 1]), "slots"),
]


@pytest.mark.parametrize("bad, field", BAD_INDICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_indices_named(bad, field, backend):
    if backend == "triton" and DEVICE != "cpu":
        pytest.skip("on the GPU the launcher leaves value checks to the model (one sync per forward)")
    q = torch.randn(3, 4, 8, device=DEVICE)
    k = torch.randn(2, 8, 2, 8, device=DEVICE)
    idx = {**dict(cu=[0, 2, 3], kv=[3, 5], slots=[0, 1]), **bad}
    cu, kv, slots = (torch.tensor(idx[n], device=DEVICE) for n in ("cu", "kv", "slots"))
    run = attention if backend == "triton" else TorchBackend().attention
    with pytest.raises(ValueError, match=field):
        run(q, k, k, cu, kv, slots, 1.0)
