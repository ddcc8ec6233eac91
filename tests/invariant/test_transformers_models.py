"""invariant_mode on transformers' own MoE models (tiny random configs, their own modelling code, on the CPU):
detmoe.diagnose finds no divergent token between a request alone and the same request in left-padded greedy
generation or right-padded forwards of batches up to 64, for Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE; the
same check finds the stock runs' divergences; the model gets its own implementations back; what the
registries cannot run falls back loudly."""
from __future__ import annotations

import contextlib
import random
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import detmoe
from detmoe.diagnose import compare, record, recording
from detmoe.diagnose.batches import pad_rows, positions_from_mask
from detmoe.diagnose.tiny import tiny_model
from detmoe.invariant import transformers_hooks
from detmoe.testing import assert_model_batch_invariant

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
NEW = 3


def batch_with(probe: list, B: int, side: str, rng: random.Random, row: int):
    rows = [probe if b == row else [rng.randrange(1, 97) for _ in range(rng.randint(1, 24))] for b in range(B)]
    return pad_rows(rows, side)


def generate_recorded(lm, ids, mask, **mode):
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad(), detmoe.invariant_mode(**mode) if mode else contextlib.nullcontext(), recording(lm) as rec:
        out = lm.generate(ids, attention_mask=mask, **kw)
    return out, rec.trace()


def alone_and_batches(lm, seed: int, sizes, **mode):
    """(comparisons, completions equal) of the probe alone vs at a random row of left-padded batches."""
    rng = random.Random(seed)
    probe = [rng.randrange(1, 97) for _ in range(rng.randint(1, 16))]
    one = torch.tensor([probe])
    out_alone, alone = generate_recorded(lm, one, torch.ones_like(one), **mode)
    results = []
    for B in sizes:
        row = rng.randrange(B)
        ids, mask = batch_with(probe, B, "left", rng, row)
        out, trace = generate_recorded(lm, ids, mask, **mode)
        results.append((B, compare(alone, trace, other_row=row),
                        out[row, -NEW:].tolist() == out_alone[0, -NEW:].tolist()))
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_in_any_batch_keeps_every_bit_inside_the_mode(arch, seed):
    model = tiny_model(arch, seed)
    for B, comparison, same_completion in alone_and_batches(model, seed, (3, 64), model=model, strict=True):
        assert comparison.invariant, f"batch of {B}: {comparison.summary()}"
        assert same_completion, f"batch of {B}: another completion"


@pytest.mark.parametrize("arch", ARCHS)
def test_a_right_padded_forward_keeps_every_bit_inside_the_mode(arch, seed):
    model = tiny_model(arch, seed)
    rng = random.Random(seed)
    probe = [rng.randrange(1, 97) for _ in range(rng.randint(2, 16))]
    with torch.no_grad(), detmoe.invariant_mode(model, strict=True):
        alone = record(model, torch.tensor([probe]))
        for B in (2, 64):
            row = rng.randrange(B)
            ids, mask = batch_with(probe, B, "right", rng, row)
            comparison = compare(alone, record(model, ids, mask, position_ids=positions_from_mask(mask)), other_row=row)
            assert comparison.invariant, f"batch of {B}: {comparison.summary()}"


def test_the_aten_overrides_alone_make_transformers_default_paths_invariant(seed):
    """No model given: transformers' own sdpa attention and grouped_mm experts run on the overrides."""
    model = tiny_model("mixtral", seed)
    assert model.config._attn_implementation == "sdpa" and model.config._experts_implementation == "grouped_mm"
    for B, comparison, same in alone_and_batches(model, seed, (3, 64), strict=True):
        assert comparison.invariant and same, f"batch of {B}: {comparison.summary()}"


@pytest.mark.cpu_blas_dependent
def test_the_same_check_finds_the_stock_runs_divergences(seed):
    """Outside the mode the same comparisons see tokens move (the check can fail), on two archs."""
    moved = 0
    for arch in ("mixtral", "qwen3_moe"):
        model = tiny_model(arch, seed)
        model.set_experts_implementation("eager")      # per-expert products: the CPU's BLAS picks by rows
        moved += sum(len(c.divergent) for _, c, _ in alone_and_batches(model, seed, (7, 64)))
    assert moved > 0


def test_the_model_gets_its_own_implementations_and_bits_back(seed):
    model = tiny_model("qwen3_moe", seed)
    ids = torch.randint(1, 97, (3, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with detmoe.invariant_mode(model):
            assert model.config._attn_implementation == transformers_hooks.NAME
            assert model.config._experts_implementation == transformers_hooks.NAME
            norms = [m for m in model.modules() if "forward" in m.__dict__]
            assert len(norms) == 2 * model.config.num_hidden_layers + 1 + 2 * model.config.num_hidden_layers
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert (model.config._attn_implementation, model.config._experts_implementation) == ("sdpa", "grouped_mm")
    assert not [m for m in model.modules() if "forward" in m.__dict__ or "_kernel_repo" in m.__dict__]
    assert torch.equal(before, after) and not torch.equal(before, inside)
    torch.testing.assert_close(inside, before, rtol=1e-4, atol=1e-4)


def test_an_exception_inside_restores_the_model(seed):
    model = tiny_model("mixtral", seed)
    with pytest.raises(RuntimeError, match="boom"), detmoe.invariant_mode(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa" and not detmoe.invariant.active()


def test_what_the_registries_cannot_run_falls_back_loudly(seed):
    """A sliding window: transformers' sdpa attention instead, with a warning (an error under strict)."""
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=4)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        with pytest.raises(detmoe.NotInvariantError, match="sliding window"), detmoe.invariant_mode(model, strict=True):
            model(input_ids=ids)
        detmoe.invariant.fallback.forget_warnings()
        with detmoe.invariant_mode(model), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inside = model(input_ids=ids).logits
        torch.testing.assert_close(inside, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert any(issubclass(w.category, detmoe.InvariantModeWarning) and "sliding window" in str(w.message)
               for w in caught)


def test_the_pytest_helper_passes_inside_the_mode(seed):
    model = tiny_model("olmoe", seed)
    request = torch.randint(1, 97, (11,))
    with detmoe.invariant_mode(model, strict=True):
        assert_model_batch_invariant(model, request, batch_sizes=(1, 3, 16))
