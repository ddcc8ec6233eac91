"""The attribution names the right cause on cases where the cause is known."""
import pytest
import torch

from detmoe import kernels
from detmoe import moe
from detmoe.lab.attribution import attribute_divergence
from detmoe.moe.engine import Engine, Request, TokenRoutes
from tests.conftest import random_prompts, tiny_config
from tests.lab.rowwise_backend import PerturbedRowwiseBackend, RowwiseBackend

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


@pytest.mark.cpu_blas_dependent
def test_stock_kernel_variance_is_arithmetic(seed):
    # fp32 torch.mm on this CPU rounds a row differently at 1-3 rows than at >= 4: the probe's 2-3 prompt
    # tokens are prefilled alone, then among 6 longer prompts
    model = moe.MoETransformer(tiny_config("topk"))
    prompt = random_prompts(1, 256, 2, 3)[0]
    with kernels.use_backend("torch"):
        ref = run(model, prompt)
        test = run(model, prompt, company=random_prompts(6, 256, 8, 12), where=3)
    d = attribute_divergence(ref, test)
    assert d.logits_differ.any()
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
    cfg = tiny_config("topk", n_experts=2, top_k=1)
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


# ---- the cause logic on synthetic records, where every difference is placed by hand --------------

def synthetic(n: int, L: int, flips=(), drops=(), bumps=()) -> Request:
    """A tracked request of n processed tokens over L layers, top-1 of 4 experts: every token prefers
    expert 0 and keeps it, except (token, layer) in `flips` (prefers expert 1) and in `drops` (expert
    0 dropped); tokens in `bumps` get different logits."""
    r = Request(list(range(n)), 1, track=True)
    r.generated = [0]
    logits = torch.zeros(n, 5)
    for t in bumps:
        logits[t, 1] = 1e-6
    r.logits = [logits]
    pref = torch.zeros(n, L, 1, dtype=torch.long)
    for t, layer in flips:
        pref[t, layer, 0] = 1
    kept = torch.zeros(n, L, 4, dtype=torch.bool).scatter_(2, pref, True)
    for t, layer in drops:
        kept[t, layer] = False
    r.route_parts = [TokenRoutes(kept, pref, torch.full((n, L), 0.5))]
    return r


def test_last_layer_routing_of_an_earlier_token_does_not_reach_later_tokens():
    # token 1 flips at the last layer: only token 1 can feel it; token 3's drift is arithmetic
    d = attribute_divergence(synthetic(4, 2), synthetic(4, 2, flips=[(1, 1)], bumps=[1, 3]))
    assert d.causes == [None, "amplified", None, "arithmetic"]


def test_earlier_token_routing_reaches_later_tokens_through_attention():
    d = attribute_divergence(synthetic(4, 2), synthetic(4, 2, drops=[(1, 0)], bumps=[1, 3]))
    assert d.causes == [None, "structural", None, "structural"]


def test_the_earliest_difference_at_the_first_layer_decides():
    # a flip at token 0 comes before a lost slot at token 2 (the flip shifted the queue): amplified
    d = attribute_divergence(synthetic(4, 2), synthetic(4, 2, flips=[(0, 0)], drops=[(2, 0)], bumps=[2]))
    assert d.causes[2] == "amplified"
    d = attribute_divergence(synthetic(4, 2), synthetic(4, 2, drops=[(0, 0)], flips=[(2, 0)], bumps=[2]))
    assert d.causes[2] == "structural"


def test_a_flip_onto_a_dropped_expert_is_still_a_routing_difference():
    # token 1 flips to expert 1, dropped in the test run, while the reference also dropped its expert:
    # kept sets agree (empty), preferences do not
    ref = synthetic(3, 2, drops=[(1, 0)])
    test = synthetic(3, 2, flips=[(1, 0)], drops=[(1, 0)], bumps=[1])
    d = attribute_divergence(ref, test)
    assert d.causes[1] == "amplified" and bool(d.routes_differ[1])
    # a primary flip, and a later flip downstream of it is a cascade
    d = attribute_divergence(synthetic(3, 2), synthetic(3, 2, flips=[(0, 0), (2, 1)], bumps=[0, 2]))
    assert d.flipped_margins.numel() == 1 and d.cascade_flips == 1

