"""The attribution names the right cause on cases where the cause is known."""
import pytest
import torch

import kernels
import moe
from experiments.attribution import attribute_divergence
from experiments.engine import Engine, Request
from tests.conftest import random_prompts, tiny_config
from tests.experiments.rowwise_backend import PerturbedRowwiseBackend, RowwiseBackend

kernels.register_backend("rowwise", RowwiseBackend)
kernels.register_backend("rowwise_perturbed", PerturbedRowwiseBackend)


def run(model, prompt, company=(), where=0, new_tokens=3):
    probe = Request(prompt, new_tokens, order=where, track=True)
    others = [Request(p, new_tokens, order=i if i < where else i + 1) for i, p in enumerate(company)]
    Engine(model, 1 + len(others), 64).run([probe] + others)
    return probe


def test_no_company_no_divergence(seed):
    model = moe.MoETransformer(tiny_config("topk"))
    prompt = random_prompts(1, 256, 5, 9)[0]
    d = attribute_divergence(run(model, prompt), run(model, prompt))
    assert d.n_compared == len(prompt) + 2 and not d.logits_differ.any() and not d.completion_differs


def test_stock_kernel_variance_is_arithmetic(seed):
    # fp32 torch.mm on this CPU rounds a row differently at 1-3 rows than at >= 4 (README, FACTS)
    model = moe.MoETransformer(tiny_config("topk"))
    prompt = random_prompts(1, 256, 2, 3)[0]
    with kernels.use_backend("torch"):
        ref = run(model, prompt)
        test = run(model, prompt, company=random_prompts(6, 256, 8, 12), where=3)
    d = attribute_divergence(ref, test)
    if not d.logits_differ.any():
        pytest.xfail("stock CPU kernels were batch-invariant here; nothing to attribute")
    assert set(c for c in d.causes if c) == {"arithmetic"}


def test_forced_capacity_overflow_is_structural(seed):
    model = moe.MoETransformer(tiny_config("capacity", capacity_factor=0.5))
    prompt = random_prompts(1, 256, 6, 10)[0]
    with kernels.use_backend("rowwise"):
        ref = run(model, prompt)
        # copies of the probe ahead of it in the batch want the same experts and take their slots
        test = run(model, prompt, company=[prompt] * 3, where=3)
    d = attribute_divergence(ref, test)
    assert d.logits_differ.any()
    assert set(c for c in d.causes if c) == {"structural"}
    assert d.flipped_margins.numel() == 0  # identical numbers upstream: no choice flips on its own


def test_injected_one_ulp_near_tie_is_amplified(seed):
    cfg = tiny_config("topk")
    cfg.moe.n_experts, cfg.moe.top_k = 2, 1
    model = moe.MoETransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:  # experts 0 and 1 score exactly the same for every token
            block.moe.w_router[:, 1] = block.moe.w_router[:, 0]
    prompt = random_prompts(1, 256, 4, 8)[0]
    with kernels.use_backend("rowwise"):
        ref = run(model, prompt)
    with kernels.use_backend("rowwise_perturbed"):  # one ulp more for expert 1: the tie flips
        test = run(model, prompt)
    d = attribute_divergence(ref, test)
    assert d.logits_differ.all()
    assert set(d.causes) == {"amplified"}
    # every token flips at layer 0, where nothing upstream differs: primary flips, each from an exact tie
    assert d.flipped_margins.numel() >= d.n_compared and bool((d.flipped_margins == 0).all())
