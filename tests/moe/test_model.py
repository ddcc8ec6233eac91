"""MoETransformer on ragged batches: each sequence as if alone, KV-cache decoding equal to full
recomputation, and clear errors for bad input. Numerical agreement here is allclose (stock backend);
the bitwise claims live in tests/kernels and tests/test_invariance.py."""
import pytest
import torch

from detmoe.moe import cu_seqlens_of
from tests.conftest import random_prompts

ATOL = 2e-5


@pytest.mark.parametrize("router", ["topk", "sequence_capacity"])
def test_ragged_batch_matches_each_sequence_alone(make_model, router):
    model = make_model(router, group_size=4, capacity_factor=0.7)
    prompts = random_prompts(5, model.cfg.vocab_size, 1, 17)
    logits, routings = model(*cu_seqlens_of(prompts))
    assert logits.shape == (sum(map(len, prompts)), model.cfg.vocab_size)
    assert len(routings) == model.cfg.n_layers
    start = 0
    for p in prompts:
        alone, alone_routings = model(*cu_seqlens_of([p]))
        torch.testing.assert_close(logits[start:start + len(p)], alone, atol=ATOL, rtol=1e-4)
        start += len(p)


@pytest.mark.parametrize("router", ["topk", "sequence_capacity"])
def test_kv_cache_decoding_matches_full_recompute(make_model, router):
    model = make_model(router, group_size=3, capacity_factor=0.7)
    prompts = random_prompts(3, model.cfg.vocab_size, 6, 14)
    full, full_routings = model(*cu_seqlens_of(prompts))
    # prefill the first 3 tokens of each, then feed one token per step with all sequences decoding
    cache = model.new_cache(3, 16)
    pieces = {i: [] for i in range(3)}
    routes = {i: [] for i in range(3)}
    logits, r = model(*cu_seqlens_of([p[:3] for p in prompts]), cache)
    for i in range(3):
        pieces[i].append(logits[3 * i:3 * i + 3])
        routes[i].append(r[-1].dropped[3 * i:3 * i + 3])
    for t in range(3, max(map(len, prompts))):
        active = [i for i, p in enumerate(prompts) if t < len(p)]
        toks, cu = cu_seqlens_of([[prompts[i][t]] for i in active])
        logits, r = model(toks, cu, cache, slots=torch.tensor(active))
        for j, i in enumerate(active):
            pieces[i].append(logits[j:j + 1])
            routes[i].append(r[-1].dropped[j:j + 1])
    start = 0
    for i, p in enumerate(prompts):
        torch.testing.assert_close(torch.cat(pieces[i]), full[start:start + len(p)], atol=ATOL, rtol=1e-4)
        assert torch.equal(torch.cat(routes[i]), full_routings[-1].dropped[start:start + len(p)])
        start += len(p)


def test_mixed_prefill_and_decode_step(make_model):
    model = make_model()
    a, b = random_prompts(2, model.cfg.vocab_size, 5, 9)
    cache = model.new_cache(2, 32)
    model(*cu_seqlens_of([a[:-1]]), cache, slots=torch.tensor([0]))
    # one step: a's last token (decode) beside b's whole prompt (prefill)
    logits, _ = model(*cu_seqlens_of([a[-1:], b]), cache)
    torch.testing.assert_close(logits[:1], model(*cu_seqlens_of([a]))[0][-1:], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(logits[1:], model(*cu_seqlens_of([b]))[0], atol=ATOL, rtol=1e-4)
    assert cache.lengths.tolist() == [len(a), len(b)]


def test_bfloat16_model_runs(make_model):
    model = make_model(dtype="bfloat16")
    logits, _ = model(*cu_seqlens_of(random_prompts(3, model.cfg.vocab_size)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_bad_inputs_raise_clear_errors(make_model):
    model = make_model()
    V = model.cfg.vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([0, V]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.tensor([], dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.tensor([1, 2, 3]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 3]))
    with pytest.raises(ValueError, match="tokens must be an int32/int64 tensor"):
        model(torch.tensor([1.0, 2.0]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="seqs"):
        cu_seqlens_of([])
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="max_len"):
        model(*cu_seqlens_of([[1, 2, 3, 4, 5]]), cache)
    with pytest.raises(ValueError, match="slots"):
        model(*cu_seqlens_of([[1], [2]]), cache)
