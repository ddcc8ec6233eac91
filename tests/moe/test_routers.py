"""Router semantics on hand-built cases, batch-(in)variance as properties, the constructors' checks, and
the registry (a router defined here is built by name with no other edit)."""
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from detmoe import moe
from detmoe.moe.routers import Router, check_positive, expert_capacity, register_router, registry
from detmoe.moe.routing import Routing
from tests.conftest import tiny_config


def route(name, logits, seq_ids=None, positions=None, state=None, **kw):
    T, E = logits.shape
    router = moe.build_router(name, n_experts=E, **kw)
    if seq_ids is None:
        seq_ids = torch.zeros(T, dtype=torch.long)
    if positions is None:
        positions = torch.arange(T)
    return router(logits, seq_ids, positions, state)


def test_capacity_arithmetic():
    assert expert_capacity(1.25, 10, 2, 4) == math.ceil(6.25) == 7
    assert expert_capacity(1.0, 4, 1, 2) == 2
    assert expert_capacity(0.1, 4, 1, 8, min_capacity=4) == 4


def test_topk_ties_go_to_lower_expert_index():
    r = route("topk", torch.zeros(3, 4), top_k=2)
    assert r.experts.tolist() == [[0, 1]] * 3
    assert torch.equal(r.weights, torch.full((3, 2), 0.5))
    assert not r.dropped.any()


def test_margins_gap_between_kth_and_next_probability():
    r = route("topk", torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])), top_k=1)
    assert torch.allclose(r.margins(1), torch.tensor([0.2, 0.0]), atol=1e-6)
    assert torch.isinf(r.margins(3)).all()    # every expert chosen: no other set to flip to
    on_meta = dataclasses.replace(r, probs=r.probs.to("meta"))
    assert on_meta.margins(3).device == on_meta.probs.device   # the probabilities' device, not the CPU


def test_topk_renormalize_off_keeps_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    r = route("topk", logits, top_k=2, renormalize=False)
    assert r.experts.tolist() == [[0, 1]]
    assert torch.allclose(r.weights, torch.softmax(logits, -1)[:, :2])


def test_capacity_drops_later_tokens_first():
    # 4 tokens all prefer expert 0; capacity ceil(1.0 * 4 * 1 / 2) = 2
    logits = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    r = route("capacity", logits, top_k=1, capacity_factor=1.0)
    assert r.dropped[:, 0].tolist() == [False, False, True, True]
    assert r.weights[2:].eq(0).all() and r.weights[:2].gt(0).all()


def test_capacity_drop_by_score_keeps_the_most_confident():
    logits = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    r = route("capacity", logits, top_k=1, capacity_factor=1.0, drop_order="score")
    assert r.dropped[:, 0].tolist() == [True, True, False, False]


def test_capacity_first_choices_queue_in_token_order():
    # top-2 over 2 experts: every token sends one assignment to each; capacity ceil(0.5*3*2/2)=2
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    r = route("capacity", logits, top_k=2, capacity_factor=0.5)
    # expert 0 queue: t0 (1st), t1 (2nd), t2 (1st) -> t2 dropped; expert 1: t0, t1, t2 -> t2 dropped
    assert r.dropped.tolist() == [[False, False], [False, False], [True, True]]


def test_expert_choice_takes_top_tokens_per_expert():
    # capacity ceil(1.0 * 4 * 1 / 2) = 2 tokens per expert
    logits = torch.tensor([[4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    r = route("expert_choice", logits, top_k=1, capacity_factor=1.0)
    taken = r.expert_sets()
    assert taken[:, 0].tolist() == [True, True, False, False]
    # expert 1 takes the tokens with the highest p(expert 1): the last two
    assert taken[:, 1].tolist() == [False, False, True, True]
    assert r.experts.shape == (4, 2)


def test_sequence_capacity_chunks_and_ignores_other_sequences():
    # group_size 4, 2 experts, top-1, cf 1 -> 2 slots per (chunk, expert); everyone prefers expert 0
    logits = torch.tensor([[1.0, 0.0]] * 8)
    r = route("sequence_capacity", logits, top_k=1, capacity_factor=1.0, group_size=4)
    assert r.dropped[:, 0].tolist() == [False, False, True, True] * 2
    # the same sequence after 3 tokens of another one: same drops
    both = torch.cat([torch.tensor([[5.0, 0.0]] * 3), logits])
    seq = torch.tensor([1] * 3 + [0] * 8)
    pos = torch.cat([torch.arange(3), torch.arange(8)])
    r2 = route("sequence_capacity", both, seq, pos, top_k=1, capacity_factor=1.0, group_size=4)
    assert torch.equal(r2.dropped[3:], r.dropped)


def test_sequence_capacity_decode_state_matches_prefill():
    T, E = 11, 4
    logits = torch.randn(T, E) * 0.1
    kw = dict(top_k=2, capacity_factor=0.6, group_size=4)
    full = route("sequence_capacity", logits, **kw)
    state, drops = None, []
    for t in range(T):  # one token per step, carrying the state
        r = route("sequence_capacity", logits[t:t + 1], positions=torch.tensor([t]), state=state, **kw)
        state = r.state
        drops.append(r.dropped)
    assert torch.equal(torch.cat(drops), full.dropped)
    assert full.dropped.any(), "the case should exercise dropping"


# ---- batch (in)variance as properties -------------------------------------------------------------

def _probe_in_batch(name, probe, others, where, **kw):
    """Route the probe sequence alone and inside a batch at position `where`; return both routings."""
    alone = route(name, probe, **kw)
    seqs = others[:where] + [probe] + others[where:]
    logits = torch.cat(seqs)
    seq_ids = torch.cat([torch.full((s.shape[0],), i) for i, s in enumerate(seqs)])
    pos = torch.cat([torch.arange(s.shape[0]) for s in seqs])
    r = route(name, logits, seq_ids, pos, **kw)
    start = sum(s.shape[0] for s in seqs[:where])
    sl = slice(start, start + probe.shape[0])
    return alone, r, sl


@settings(max_examples=25, deadline=None)
@given(n_others=st.integers(0, 6), where=st.integers(0, 6), probe_len=st.integers(1, 20),
       top_k=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
@pytest.mark.parametrize("name", ["topk", "sequence_capacity"])
def test_invariant_routers_ignore_the_batch(name, n_others, where, probe_len, top_k, seed):
    g = torch.Generator().manual_seed(seed)
    E = 6
    probe = torch.randn(probe_len, E, generator=g)
    others = [torch.randn(int(torch.randint(1, 20, (1,), generator=g)), E, generator=g) for _ in range(n_others)]
    kw = dict(top_k=top_k) if name == "topk" else dict(top_k=top_k, capacity_factor=0.75, group_size=5)
    alone, r, sl = _probe_in_batch(name, probe, others, min(where, n_others), **kw)
    assert torch.equal(r.experts[sl], alone.experts)
    assert torch.equal(r.dropped[sl], alone.dropped)
    assert torch.equal(r.weights[sl], alone.weights)


@pytest.mark.parametrize("name", ["capacity", "expert_choice"])
def test_batch_dependent_routers_have_a_counterexample(name):
    # a co-request that comes first and wants the probe's expert takes its slot
    # alone: capacity ceil(1 * 1 * 1 / 4) = 1 slot per expert; with 6 co-tokens: 2 slots, both taken
    probe = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    hog = torch.tensor([[9.0, 0.0, 0.0, 0.0]] * 6)
    alone, r, sl = _probe_in_batch(name, probe, [hog], 1, top_k=1, capacity_factor=1.0)
    assert not alone.dropped[:, 0].any()
    assert not torch.equal(r.expert_sets()[sl], alone.expert_sets())


def test_capacity_choice_order_serves_first_choices_first():
    # GShard / DeepSpeed top-2: every first choice queues before any second choice. Capacity
    # ceil(0.5 * 3 * 2 / 2) = 2; expert 0 is t0's and t2's first choice, t1's second
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    r = route("capacity", logits, top_k=2, capacity_factor=0.5, drop_order="choice")
    # expert 0 queue: t0 (1st), t2 (1st), t1 (2nd) -> t1's second choice dropped
    # expert 1 queue: t1 (1st), t0 (2nd), t2 (2nd) -> t2's second choice dropped
    assert r.dropped.tolist() == [[False, False], [False, True], [False, True]]


def test_capacity_is_exact_rational_arithmetic():
    # 1.1 * 25 * 8 / 4 = 55 exactly; floats give 55.000000000000007
    assert expert_capacity(1.1, 25, 8, 4) == 55


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.integers(1, 6), min_size=1, max_size=8), seed=st.integers(0, 2**31 - 1))
def test_sequence_capacity_state_across_multi_token_steps(steps, seed):
    """Prefill in steps of any sizes (crossing chunk boundaries), carrying the state: the same drops as
    one whole-sequence prefill."""
    g = torch.Generator().manual_seed(seed)
    T = sum(steps)
    logits = torch.randn(T, 4, generator=g) * 0.1
    kw = dict(top_k=2, capacity_factor=0.6, group_size=4)
    full = route("sequence_capacity", logits, **kw)
    state, drops, start = None, [], 0
    for n in steps:
        r = route("sequence_capacity", logits[start:start + n], positions=torch.arange(start, start + n),
                  state=state, **kw)
        state, start = r.state, start + n
        drops.append(r.dropped)
    assert torch.equal(torch.cat(drops), full.dropped)


# ---- every constructor checks its arguments ---------------------------------------------------------

BAD_ARGUMENTS = [  # (routers, keyword arguments, the parameter the message must name)
    (moe.ROUTERS, dict(n_experts=0, top_k=1), "n_experts"),
    (moe.ROUTERS, dict(n_experts=4.0, top_k=1), "n_experts"),
    (moe.ROUTERS, dict(n_experts=4, top_k=6), "top_k"),     # once silently clipped to 4 experts
    (moe.ROUTERS, dict(n_experts=4, top_k=0), "top_k"),
    (moe.ROUTERS, dict(n_experts=4, top_k=True), "top_k"),
    (("capacity",), dict(drop_order="postion"), "drop_order"),   # once silently meant "position"
    (("capacity", "expert_choice", "sequence_capacity"), dict(capacity_factor=0.0), "capacity_factor"),
    (("capacity", "expert_choice", "sequence_capacity"), dict(capacity_factor=-1), "capacity_factor"),
    (("capacity", "expert_choice", "sequence_capacity"), dict(capacity_factor="1.25"), "capacity_factor"),
    (("capacity", "sequence_capacity"), dict(min_capacity=-1), "min_capacity"),
    (("sequence_capacity",), dict(group_size=0), "group_size"),
    (("sequence_capacity",), dict(group_size=2.5), "group_size"),
    (("topk", "capacity", "sequence_capacity"), dict(renormalize="yes"), "renormalize"),
    (moe.ROUTERS, dict(no_such_option=1), "no_such_option"),
]


@pytest.mark.parametrize("names, kw, field", BAD_ARGUMENTS)
def test_build_router_refuses_bad_arguments(names, kw, field):
    for name in names:
        with pytest.raises(ValueError, match=field):
            moe.build_router(name, **{"n_experts": 4, "top_k": 2, **kw})


@pytest.mark.parametrize("names, kw, field", [b for b in BAD_ARGUMENTS if b[2] != "no_such_option"])
def test_moe_config_refuses_what_the_routers_refuse(names, kw, field):
    """MoEConfig shares the routers' rules, for its chosen router and for options it does not use."""
    for name in ("topk", *names):
        with pytest.raises(ValueError, match=field):
            moe.MoEConfig(**{"n_experts": 4, "top_k": 2, "d_expert": 8, "router": name, **kw})


def test_router_options_are_the_constructor_parameters():
    assert registry.router_options("capacity") == dict(renormalize=True, capacity_factor=1.25,
                                                       drop_order="position", min_capacity=0)
    assert registry.router_options("expert_choice") == dict(capacity_factor=1.25)


# ---- a router added in one file --------------------------------------------------------------------

@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as it is, restored after the test: routers registered in it do not outlive it."""
    monkeypatch.setattr(registry, "_ROUTERS", dict(registry._ROUTERS))


def test_a_router_defined_here_is_built_by_name(scratch_registry, seed):
    @register_router
    class HashRouter(Router):
        """Each token goes to experts (token position + j) mod E, weights from its probabilities."""
        name = "hash_test"
        drops = False
        batch_invariant = True

        def __init__(self, n_experts: int, top_k: int, capacity_factor: float = 1.25):
            super().__init__(n_experts, top_k, renormalize=False)
            self.capacity_factor = check_positive("capacity_factor", capacity_factor)

        def assign(self, probs, seq_ids, positions, state) -> Routing:
            experts = (positions[:, None] + torch.arange(self.top_k)) % self.n_experts   # [T, k]
            return Routing(experts, probs.gather(1, experts), torch.zeros_like(experts, dtype=torch.bool), probs)

    assert moe.ROUTERS[-1] == "hash_test"
    r = moe.build_router("hash_test", n_experts=4, top_k=2, capacity_factor=2.0)
    assert isinstance(r, HashRouter) and r.capacity_factor == 2.0
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.build_router("hash_test", n_experts=4, top_k=2, capacity_factor=0)
    model = moe.MoETransformer(tiny_config("hash_test", capacity_factor=1.5))
    assert isinstance(model.blocks[0].moe.router, HashRouter) and model.blocks[0].moe.router.capacity_factor == 1.5
    tokens, cu = moe.cu_seqlens_of([[1, 2, 3], [4, 5]])
    _, routings = model(tokens, cu)
    assert routings[0].experts.tolist() == [[0, 1], [1, 2], [2, 3], [0, 1], [1, 2]]


def test_register_router_refuses_what_cannot_be_built(scratch_registry):
    with pytest.raises(ValueError, match="name"):
        register_router(type("NoName", (Router,), {"name": "not an identifier"}))

    class Taken(Router):
        name = "topk"
    with pytest.raises(ValueError, match="already registered"):
        register_router(Taken)

    class NoDefault(Router):
        name = "no_default_test"

        def __init__(self, n_experts: int, top_k: int, spread: float):
            super().__init__(n_experts, top_k)
    with pytest.raises(ValueError, match="spread"):
        register_router(NoDefault)
    assert "no_default_test" not in moe.ROUTERS
