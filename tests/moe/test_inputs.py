"""Bad input to the model, the cache, generate and the engine is refused before any work, with the
parameter's name; inputs that are fine in another form (numpy ints, a generator of requests, a tiny
temperature) work."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detmoe import moe
from detmoe.moe.engine import Engine, Request


@pytest.fixture
def model(make_model) -> moe.MoETransformer:
    return make_model()


@pytest.mark.parametrize("seqs, match", [
    ([[1.5, 2.2]], r"seqs\[0\] must be a non-empty 1-D sequence of int token ids"),
    ([[True, 3]], r"seqs\[0\] must be"),
    ([[1], []], r"seqs\[1\] must be"),
    ([], "seqs must be a non-empty list"),
    ("abc", "seqs must be a non-empty list"),
])
def test_cu_seqlens_of_refuses_what_is_not_int_ids(seqs, match):
    with pytest.raises(ValueError, match=match):
        moe.cu_seqlens_of(seqs)


def test_cu_seqlens_of_takes_numpy_and_tensor_ids():
    tokens, cu = moe.cu_seqlens_of([np.array([3, 4], dtype=np.int32), torch.tensor([5])])
    assert tokens.tolist() == [3, 4, 5] and cu.tolist() == [0, 2, 3]


def test_forward_refuses_index_tensors_of_other_types(model):
    tokens, cu = moe.cu_seqlens_of([[1, 2, 3], [4]])
    for bad_tokens, bad_cu, slots, name in [(tokens.float(), cu, None, "tokens"), (tokens.bool(), cu, None, "tokens"),
                                            (tokens, cu.tolist(), None, "cu_seqlens"),
                                            (tokens, cu.float(), None, "cu_seqlens"),
                                            (tokens, cu, torch.tensor([0.0, 1.0]), "slots"),
                                            (tokens, cu, [0, 1], "slots"), (tokens, cu, torch.tensor([True, False]), "slots")]:
        with pytest.raises(ValueError, match=f"{name} must be an int32/int64 tensor"):
            model(bad_tokens, bad_cu, model.new_cache(2) if slots is not None else None, slots)


def test_forward_refuses_a_cache_of_another_model(model, make_model):
    tokens, cu = moe.cu_seqlens_of([[1, 2, 3]])
    cfg = model.cfg
    for other in [moe.ModelConfig.from_name("tiny", n_layers=cfg.n_layers + 1),
                  moe.ModelConfig.from_name("tiny", n_kv_heads=1),
                  moe.ModelConfig.from_name("tiny", moe=dict(n_experts=4))]:
        with pytest.raises(ValueError, match="make it with model.new_cache"):
            model(tokens, cu, moe.MoETransformer(other).new_cache(1))
    wrong_dtype = moe.KVCache(cfg, 1, dtype=torch.float64, device="cpu")
    with pytest.raises(ValueError, match="cache is torch.float64"):
        model(tokens, cu, wrong_dtype)


@pytest.mark.parametrize("max_len", [0, -1, 2.0, True])
def test_a_cache_of_no_positions_is_refused_not_widened(model, max_len):
    with pytest.raises(ValueError, match="max_len must be None or an int in 1..max_seq_len"):
        model.new_cache(2, max_len)
    with pytest.raises(ValueError, match="max_len must be None or an int"):
        Engine(model, 2, max_len)
    with pytest.raises(ValueError, match="max_len must be None or an int"):
        model.new_cache(2, model.cfg.max_seq_len + 1)
    assert model.new_cache(2).max_len == model.cfg.max_seq_len


def test_sequences_longer_than_max_seq_len_are_refused(model):
    L = model.cfg.max_seq_len
    with pytest.raises(ValueError, match=f"longer than the model's max_seq_len={L}"):
        model(*moe.cu_seqlens_of([[1] * (L + 1)]))
    with pytest.raises(ValueError, match=f"exceeds the model's max_seq_len={L}"):
        moe.generate(model, [[1] * (L - 2)], max_new_tokens=3)
    assert len(moe.generate(model, [[1] * (L - 2)], max_new_tokens=2)[0]) == 2


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-324])
def test_a_tiny_temperature_samples_the_argmax_not_nan(model, temperature):
    prompts = [[5, 6, 7], [9]]
    greedy = moe.generate(model, prompts, 6)
    assert moe.generate(model, prompts, 6, temperature=temperature, seed=3) == greedy


def test_seeds_numpy_ints_work_and_overflowing_ones_are_refused(model):
    prompts = [[5, 6, 7], [9]]
    a = moe.generate(model, prompts, 4, temperature=1.0, seed=np.int64(7))
    assert a == moe.generate(model, prompts, 4, temperature=1.0, seed=7)
    for bad in (2**63, 2**63 - 1, -1, 1.0, "7"):   # 2**63 - 1: prompt 1 would draw seed 2**63
        with pytest.raises(ValueError, match="seed must be None or an int in 0.."):
            moe.generate(model, prompts, 4, temperature=1.0, seed=bad)
    assert Request([1, 2], 2, seed=np.int32(5)).seed == 5
    for bad in (None, 2**64, -3):
        with pytest.raises(ValueError, match="seed must be"):
            Request([1, 2], 2, seed=bad)


def test_engine_serves_a_generator_of_requests(model):
    prompts = [[1, 2, 3], [4, 5]]
    served = Engine(model, 2, 16).run(Request(p, 3) for p in prompts)
    assert [r.generated for r in served] == moe.generate(model, prompts, 3)


def test_engine_refuses_a_request_given_twice_before_any_step(model):
    r, other = Request([1, 2, 3], 3), Request([4], 2)
    engine = Engine(model, 3, 16)
    with pytest.raises(ValueError, match="one appears twice"):
        engine.run([r, other, r])
    assert engine.steps == 0 and r.generated == [] and other.generated == []
    with pytest.raises(ValueError, match=r"requests\[1\] must be a Request"):
        engine.run([other, [1, 2]])
