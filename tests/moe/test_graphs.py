"""Decode graphs (detmoe/moe/graphs.py): the padded static-buffer step gives each real request the bits of the
eager, unpadded step with the batch_invariant backend (on the CPU the step runs eagerly with the same
buffers; the GPU test below captures and replays it), and it refuses what it cannot capture."""
import pytest
import torch

from detmoe import kernels
from detmoe import moe
from detmoe.moe.engine import Engine, Request
from detmoe.moe.graphs import BUCKETS, DecodeGraphs, bucket_for
from tests.conftest import random_prompts


def _prefilled(model, prompts, n_slots):
    """A cache holding the prompts in slots 0..len-1 (more slots free), and each prompt's next token."""
    cache = model.new_cache(n_slots, 64)
    tokens, cu = moe.cu_seqlens_of(prompts)
    logits, _ = model(tokens, cu, cache)
    return cache, logits[cu[1:] - 1].argmax(-1)


@pytest.mark.parametrize("b", [1, 3, 5])
def test_padded_step_equals_the_eager_step_bitwise(make_model, b):
    """b sequences run in the bucket above b: their logits and routings equal an ordinary forward of the
    b sequences alone, and the caches agree afterwards (the padding touched only its own slot)."""
    model = make_model(dtype="float32")
    prompts = random_prompts(b, model.cfg.vocab_size, 2, 9)
    with kernels.use_backend("batch_invariant"):
        cache_a, nxt = _prefilled(model, prompts, b + 1)
        cache_b, _ = _prefilled(model, prompts, b + 1)
        slots = torch.randperm(b)                      # slots in any order
        eager, eager_routes = model(nxt[slots], torch.arange(b + 1), cache_a, slots)
        graphs = DecodeGraphs(model, cache_b, buckets=(1, 2, 4, 8))
        padded = graphs.step(nxt[slots], slots)
    assert bucket_for(b, (1, 2, 4, 8)) >= b
    assert torch.equal(padded, eager)
    for r_graph, r_eager in zip(graphs.routings, eager_routes):
        assert torch.equal(r_graph.experts[:b], r_eager.experts)
        assert torch.equal(r_graph.weights[:b], r_eager.weights)
    assert torch.equal(cache_a.lengths[:b], cache_b.lengths[:b])
    for layer in range(model.cfg.n_layers):
        assert torch.equal(cache_a.k[layer][:b], cache_b.k[layer][:b])
        assert torch.equal(cache_a.v[layer][:b], cache_b.v[layer][:b])


def test_engine_and_generate_with_graphs_give_the_eager_bits(make_model):
    """A tracked request among co-requests: the engine with graphs (decode steps padded to buckets, their
    batch sizes changing as requests finish) gives it the logits, tokens and routes of the eager engine;
    generate likewise."""
    model = make_model(dtype="float32")
    V = model.cfg.vocab_size
    probe = random_prompts(1, V, 5, 9)[0]
    co = random_prompts(4, V, 2, 9)

    def serve(graphs: bool) -> Request:
        req = Request(probe, 6, order=2, track=True)
        others = [Request(p, n, order=i) for i, (p, n) in enumerate(zip(co, [2, 7, 3, 5]))]
        Engine(model, 5, 32, graphs=graphs).run([req] + others)
        return req

    with kernels.use_backend("batch_invariant"):
        eager, graphed = serve(False), serve(True)
        gen_eager = moe.generate(model, [probe] + co, 5, graphs=False)
        gen_graphed = moe.generate(model, [probe] + co, 5, graphs=True)
    assert graphed.generated == eager.generated
    assert torch.equal(graphed.token_logits(), eager.token_logits())
    for field in ("kept", "preferred", "margin"):
        assert torch.equal(getattr(graphed.token_routes(), field), getattr(eager.token_routes(), field))
    assert gen_graphed == gen_eager


def test_graphs_refuse_what_they_cannot_capture(make_model):
    capacity = make_model(router="capacity")
    with pytest.raises(ValueError, match="router 'capacity' can drop"):
        DecodeGraphs(capacity, capacity.new_cache(3, 16))
    with pytest.raises(ValueError, match="router 'capacity' can drop"):
        Engine(capacity, 2, 16, graphs=True)
    model = make_model()
    cache = model.new_cache(3, 16)
    with pytest.raises(ValueError, match="buckets"):
        DecodeGraphs(model, cache, buckets=(4, 2))
    with pytest.raises(ValueError, match="pad_slot"):
        DecodeGraphs(model, cache, pad_slot=3)
    with pytest.raises(ValueError, match="capture=True"):
        DecodeGraphs(model, cache, capture=True)
    graphs = DecodeGraphs(model, cache, buckets=(1, 2))
    with pytest.raises(ValueError, match="pad_slot=2"):
        graphs.step(torch.tensor([1, 2]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="distinct"):
        graphs.step(torch.tensor([1, 2]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="largest bucket"):
        DecodeGraphs(model, model.new_cache(5, 16), buckets=(1, 2)).step(torch.tensor([1, 2, 3]),
                                                                          torch.tensor([0, 1, 2]))


def test_engine_refuses_a_request_longer_than_the_cache_before_any_step(make_model):
    model = make_model()
    engine = Engine(model, 2, 8)
    ok, too_long = Request([1, 2, 3], 6), Request([1, 2, 3], 7)
    with pytest.raises(ValueError, match=r"requests\[1\] needs 9 cache positions"):
        engine.run([ok, too_long])
    assert engine.steps == 0 and ok.generated == []


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["batch_invariant", "torch"])
def test_captured_step_equals_the_eager_step_for_every_bucket(backend):
    """On a GPU, at a real size: for every bucket, the replayed graph gives the static-buffer step's
    eager bits (the same launches), and it stays right as the cache grows over many replays. With the
    batch_invariant backend the replay also equals the unpadded eager forward."""
    torch.manual_seed(0)
    cfg = moe.ModelConfig.from_name("small", dtype="bfloat16")
    model = moe.MoETransformer(cfg, device="cuda")
    n = max(BUCKETS)
    prompts = random_prompts(n, cfg.vocab_size, 3, 40)
    with kernels.use_backend(backend):
        for b in (1, 3, 16, 100, n):
            caches, nxt = zip(*(_prefilled(model, prompts[:b], b + 1) for _ in range(3)))
            slots = torch.randperm(b, device="cuda")
            tokens = nxt[0][slots]
            captured = DecodeGraphs(model, caches[0])
            static = DecodeGraphs(model, caches[1], capture=False)
            for step in range(12):           # replays over a growing cache
                got, ref = captured.step(tokens, slots), static.step(tokens, slots)
                assert torch.equal(got, ref), (b, step)
                if backend == "batch_invariant":
                    eager, _ = model(tokens, torch.arange(b + 1, device="cuda"), caches[2], slots)
                    assert torch.equal(got, eager), (b, step)
                tokens = got.argmax(-1)
