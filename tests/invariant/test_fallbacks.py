"""What invariant_mode cannot run, it says, and what it runs instead is the model's own computation: the
attention registry honours bidirectional attention and refuses arguments it would drop; its fallback is the
attention the model had (gpt_oss: eager with sinks); autograd, NaN among the smallest top-k and a model
transformers cannot switch fall back loudly; blocks of two threads on one model leave it as it was;
inference_mode and many experts on the CPU run."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import detmoe
from detmoe.diagnose.tiny import tiny_model
from detmoe.invariant import fallback, transformers_hooks
from detmoe.invariant.transformers_hooks import invariant_attention


class Attention(torch.nn.Module):
    is_causal = True


def _qkv(B=2, H=4, Hkv=2, S=7, D=16):
    return torch.randn(B, H, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)


def test_the_registry_runs_bidirectional_attention_when_told_so(seed):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    q, k, v = _qkv()
    module = Attention().eval()
    module.num_key_value_groups = 2
    with detmoe.invariant_mode(strict=True):
        ours, _ = invariant_attention(module, q, k, v, None, scaling=0.25, is_causal=False)
    theirs, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25, is_causal=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    causal, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    assert not torch.allclose(ours, causal, atol=1e-3)          # the flag mattered


@pytest.mark.parametrize("argument", [dict(position_bias=torch.zeros(1)), dict(s_aux=torch.zeros(4))])
def test_the_registry_refuses_arguments_it_would_drop(seed, argument):
    q, k, v = _qkv()
    with detmoe.invariant_mode(strict=True), pytest.raises(detmoe.NotInvariantError, match=next(iter(argument))):
        invariant_attention(Attention().eval(), q, k, v, None, scaling=0.25, **argument)


def test_the_fallback_is_the_models_own_attention_with_its_sinks(seed):
    model = tiny_model("gpt_oss", seed)                          # eager attention with sinks, interleaved experts
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        outside = model(input_ids=ids).logits
        with detmoe.invariant_mode(model), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inside = model(input_ids=ids).logits
    torch.testing.assert_close(inside, outside, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "eager"


def test_autograd_falls_back_loudly(seed):
    x = torch.randn(5, 8, requires_grad=True)
    with detmoe.invariant_mode(strict=True), pytest.raises(detmoe.NotInvariantError, match="autograd"):
        x @ torch.randn(8, 3)
    with detmoe.invariant_mode(strict=True), torch.no_grad():
        x @ torch.randn(8, 3)                                    # no graph: the kernel runs


def test_nan_among_the_smallest_falls_back_to_pytorchs_choice(seed):
    x = torch.tensor([[float("nan"), 1.0, 2.0, 3.0]])
    fallback.forget_warnings()
    with detmoe.invariant_mode(), pytest.warns(detmoe.InvariantModeWarning, match="NaN"):
        values, idx = torch.topk(x, 2, largest=False)
    assert idx.tolist() == [[1, 2]]


def test_mv_rows_keep_their_bits_in_any_batch(seed):
    a, x = torch.randn(40, 33), torch.randn(33)
    with detmoe.invariant_mode(strict=True):
        full = torch.mv(a, x)
        assert all(torch.equal(torch.mv(a[i:i + n], x), full[i:i + n]) for i, n in ((0, 1), (7, 3), (5, 35)))
    torch.testing.assert_close(full, a @ x, rtol=1e-5, atol=1e-5)


def test_a_model_transformers_cannot_switch_is_named(seed, monkeypatch):
    model = tiny_model("mixtral", seed)
    monkeypatch.setattr(type(model.model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(detmoe.NotInvariantError, match="could not switch"), detmoe.invariant_mode(model, strict=True):
        pass
    assert model.config._attn_implementation == "sdpa" and not detmoe.invariant.active()


def test_two_threads_blocks_on_one_model_leave_it_as_it_was(seed):
    model = tiny_model("qwen3_moe", seed)
    inside, leave_a = threading.Event(), threading.Event()

    def a():
        with detmoe.invariant_mode(model):
            inside.set()
            leave_a.wait(30)

    t = threading.Thread(target=a)
    t.start()
    inside.wait(30)
    with detmoe.invariant_mode(model):
        leave_a.set()
        t.join(30)                                               # A leaves while B is still inside
        assert model.config._attn_implementation == transformers_hooks.NAME
    assert (model.config._attn_implementation, model.config._experts_implementation) == ("sdpa", "grouped_mm")
    assert not [m for m in model.modules() if "forward" in m.__dict__]


def test_inference_mode_and_many_experts_run_on_the_cpu(seed):
    """inference tensors keep no version counter (the attention's plan cache skips them); 64 experts exceed
    the interpreter's packed grouped kernel, which then runs per tile."""
    cfg = transformers.OlmoeConfig(vocab_size=97, hidden_size=256, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, num_experts=64,
                                   num_experts_per_tok=4, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(1, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.inference_mode():
        outside = model(input_ids=ids, attention_mask=mask).logits
        with detmoe.invariant_mode(model, strict=True):
            inside = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(inside[mask.bool()], outside[mask.bool()], rtol=1e-4, atol=1e-4)
