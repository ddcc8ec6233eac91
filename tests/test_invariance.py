"""Model-level batch invariance, compared bitwise.

With the batch_invariant backend and a batch-invariant router, a request's logits and its greedy
completion are the same bits alone and in any ragged batch: other batch sizes, other places in the
batch, co-requests of other lengths and contents, prefill beside decode, chunked prefill; and a
token's logits are the same whether it was prefilled or decoded. (That the stock torch backend is not
invariant on this CPU is asserted by tests/experiments/test_ablate.py and tests/lab/test_attribution.py.)
"""
import pytest
import torch

from detmoe import kernels
from detmoe import moe
from detmoe.lab.compositions import Composition
from detmoe.moe.engine import Engine, Request
from tests.conftest import random_prompts, tiny_config


def probe_run(model, probe, comp: Composition | None, new_tokens: int) -> Request:
    if comp is None:
        req = Request(probe, new_tokens, track=True)
        Engine(model, 1, 128).run([req])
        return req
    req, batch = comp.requests(probe, new_tokens)
    Engine(model, len(batch), 128).run(batch, until_tracked_done=True)
    return req


def random_composition(B: int, mode: str, vocab: int) -> Composition:
    co = random_prompts(B - 1, vocab, 1, 12)
    return Composition(batch_size=B, probe_index=int(torch.randint(0, B, ())), mode=mode, co_prompts=co,
                       co_new_tokens=[int(torch.randint(4, 8, ())) for _ in co],
                       chunk=int(torch.randint(2, 5, ())) if mode == "chunked" else None)


@pytest.mark.parametrize("router", ["topk", "sequence_capacity"])
def test_logits_and_completion_bitwise_invariant(seed, router):
    model = moe.MoETransformer(tiny_config(router, group_size=4, capacity_factor=1.0))
    V = model.cfg.vocab_size
    probe = random_prompts(1, V, 3, 10)[0]
    with kernels.use_backend("batch_invariant"):
        ref = probe_run(model, probe, None, 3)
        for B, mode in [(2, "prefill"), (5, "mixed"), (3, "chunked"), (7, "prefill")]:
            test = probe_run(model, probe, random_composition(B, mode, V), 3)
            assert test.generated == ref.generated, (B, mode)
            assert torch.equal(test.token_logits(), ref.token_logits()), (B, mode)
            assert torch.equal(test.token_routes().kept, ref.token_routes().kept), (B, mode)


@pytest.mark.parametrize("router", ["topk", "sequence_capacity"])
def test_prefill_equals_decode_bitwise(seed, router):
    # capacity 0.5 over chunks of 3: sequence_capacity drops, and its state crosses chunk boundaries
    model = moe.MoETransformer(tiny_config(router, group_size=3, capacity_factor=0.5))
    seq = random_prompts(1, model.cfg.vocab_size, 6, 9)[0]
    with kernels.use_backend("batch_invariant"):
        prefill, _ = model(*moe.cu_seqlens_of([seq]))
        cache = model.new_cache(1, len(seq))
        decoded = [model(*moe.cu_seqlens_of([[t]]), cache)[0] for t in seq]
    assert torch.equal(torch.cat(decoded), prefill)


def test_freed_slots_are_reused_without_a_trace(seed):
    """Fewer cache slots than requests: a request served in a slot another one used (and freed) gets
    the same bits as alone."""
    model = moe.MoETransformer(tiny_config("sequence_capacity", group_size=4, capacity_factor=0.75))
    prompts = random_prompts(6, model.cfg.vocab_size, 2, 10)
    with kernels.use_backend("batch_invariant"):
        alone = []
        for p in prompts:
            r = Request(p, 3, track=True)
            Engine(model, 1, 32).run([r])
            alone.append(r)
        shared = [Request(p, 3, arrival=i, order=i, track=True) for i, p in enumerate(prompts)]
        Engine(model, 2, 32).run(shared)
    for a, b in zip(alone, shared):
        assert b.generated == a.generated
        assert torch.equal(b.token_logits(), a.token_logits())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_model_bitwise_invariant(seed, dtype):
    cfg = moe.ModelConfig.from_name("small", dtype=dtype, max_seq_len=512)
    model = moe.MoETransformer(cfg).cuda()
    V = cfg.vocab_size
    probe = random_prompts(1, V, 20, 60)[0]
    with kernels.use_backend("batch_invariant"):
        ref = probe_run(model, probe, None, 8)
        for B in (2, 3, 8, 17, 33, 64):
            for mode in ("prefill", "mixed", "chunked"):
                test = probe_run(model, probe, random_composition(B, mode, V), 8)
                assert test.generated == ref.generated, (B, mode)
                assert torch.equal(test.token_logits(), ref.token_logits()), (B, mode)
