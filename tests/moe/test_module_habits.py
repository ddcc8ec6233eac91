"""MoETransformer behaves like any nn.Module: `.to(dtype)`, `.half()`, `.float()`, `.cuda()` give a
model that runs (forward, generate, the serving engine), and a cast model computes the same bits as
one built in that dtype. Its config is frozen, so nothing read at forward time can drift from what
the modules were built with."""
import copy
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from detmoe import kernels
from detmoe import moe
from detmoe.moe.engine import Engine, Request
from tests.conftest import random_prompts, tiny_config

CASTS = {  # name -> (dtype the model is built in, the cast, dtype it ends in)
    "to_bfloat16": ("float32", lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "half": ("float32", lambda m: m.half(), torch.float16),
    "float": ("bfloat16", lambda m: m.float(), torch.float32),
}


def run_everything(model: moe.MoETransformer, prompt: list[int]) -> None:
    """Forward without and with a cache, generate, and the engine; the engine's tokens for a lone
    request are generate's (the same steps)."""
    logits, _ = model(*moe.cu_seqlens_of([prompt, prompt[:2]]))
    assert logits.shape == (len(prompt) + 2, model.cfg.vocab_size) and logits.isfinite().all()
    cache = model.new_cache(1, len(prompt) + 1)
    assert cache.k[0].dtype == model.dtype and cache.k[0].device == model.device
    model(*moe.cu_seqlens_of([prompt], model.device), cache)
    model(*moe.cu_seqlens_of([[prompt[0]]], model.device), cache)
    generated = moe.generate(model, [prompt], 3)[0]
    r = Request(prompt, 3)
    Engine(model, 2, 16).run([r])
    assert len(generated) == 3 and r.generated == generated


@pytest.mark.parametrize("cast", list(CASTS))
def test_cast_model_runs_forward_generate_and_engine(seed, cast):
    built, fn, dtype = CASTS[cast]
    model = fn(moe.MoETransformer(dataclasses.replace(tiny_config(), dtype=built)))
    assert model.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
    prompt = random_prompts(1, model.cfg.vocab_size, 3, 6)[0]
    with kernels.use_backend("torch"):
        run_everything(model, prompt)


@pytest.mark.gpu
def test_model_moved_to_cuda_runs_forward_generate_and_engine(seed):
    model = moe.MoETransformer(tiny_config()).to("cuda")
    assert model.device.type == "cuda"
    with kernels.use_backend("batch_invariant"):
        run_everything(model, random_prompts(1, model.cfg.vocab_size, 3, 6)[0])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cast_model_equals_model_built_in_that_dtype(seed, dtype):
    """fp32 model cast to dtype == model built in dtype with the fp32 model's weights, bit for bit."""
    cfg = tiny_config()
    fp32 = moe.MoETransformer(cfg)
    cast = copy.deepcopy(fp32).to(moe.config.DTYPES[dtype])
    built = moe.MoETransformer(dataclasses.replace(cfg, dtype=dtype))
    # the same seed draws the same weights, rounded to dtype; loading the fp32 ones changes nothing
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), cast.state_dict().values()))
    built.load_state_dict(fp32.state_dict())
    prompts = random_prompts(2, cfg.vocab_size, 2, 5)
    with kernels.use_backend("batch_invariant"):
        outs = []
        for model in (cast, built):
            cache = model.new_cache(2, 8)
            prefill, _ = model(*moe.cu_seqlens_of(prompts), cache)
            decode, _ = model(*moe.cu_seqlens_of([[1], [2]]), cache)
            outs.append((prefill, decode, cache.k[-1], cache.v[-1]))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_parameters_are_created_in_the_config_dtype():
    """The wide preset (bf16) allocates no fp32 tensor while it is built: no fp32 copy, then a cast."""
    created: list[torch.dtype] = []

    class RecordFloatDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            created.extend(t.dtype for t in (out if isinstance(out, (tuple, list)) else [out])
                           if isinstance(t, torch.Tensor) and t.is_floating_point())
            return out

    with RecordFloatDtypes():
        model = moe.MoETransformer(moe.ModelConfig.from_name("wide"), device="meta")
    assert created and set(created) == {torch.bfloat16}
    assert model.dtype == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("field, value", [("qk_norm", "full"), ("qkv_bias", True), ("norm_eps", 1e-3),
                                          ("dtype", "bfloat16"), ("moe", None)])
def test_model_config_fields_cannot_be_assigned(field, value):
    cfg = tiny_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, value)


@pytest.mark.parametrize("field, value", [("combine", "scatter_add"), ("router", "capacity"),
                                          ("renormalize", False), ("capacity_factor", 0.5)])
def test_moe_config_fields_cannot_be_assigned(field, value):
    cfg = tiny_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg.moe, field, value)


def test_moe_given_as_a_dict_becomes_a_frozen_moe_config():
    cfg = moe.ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
                          moe=dict(n_experts=4, top_k=2, d_expert=8))
    assert isinstance(cfg.moe, moe.MoEConfig)
    assert dataclasses.replace(cfg, n_layers=2).moe is cfg.moe  # variants are made by replace


def test_model_behaviour_cannot_be_changed_through_its_config(seed):
    model = moe.MoETransformer(tiny_config("capacity", capacity_factor=0.5))
    tokens, cu = moe.cu_seqlens_of(random_prompts(2, model.cfg.vocab_size, 3, 6))
    before, routings = model(tokens, cu)
    assert any(r.dropped.any() for r in routings)  # so the router and its capacity matter here
    attempts = [(model.cfg, "norm_eps", 1.0), (model.cfg, "qk_norm", "head"), (model.cfg, "qkv_bias", True),
                (model.cfg.moe, "router", "topk"), (model.cfg.moe, "combine", "scatter_add"),
                (model.cfg.moe, "capacity_factor", 4.0), (model.blocks[0].moe.cfg, "renormalize", False),
                (model.blocks[0].attn.cfg, "rope_theta", 1.0)]
    for cfg, field, value in attempts:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, field, value)
    # a variant is another config: the model keeps the one it was built from
    dataclasses.replace(model.cfg, moe=dataclasses.replace(model.cfg.moe, router="topk"), norm_eps=1.0)
    after, _ = model(tokens, cu)
    assert torch.equal(before, after)
