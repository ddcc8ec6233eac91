"""The continuous-batching engine: arrivals, slots, chunked prefill, requests with nothing to do, and
requests it refuses."""
import pytest

from detmoe import moe
from detmoe.moe.engine import Engine, Request
from tests.conftest import random_prompts, tiny_config


def test_engine_finishes_requests_with_nothing_to_generate():
    model = moe.MoETransformer(tiny_config("topk"))
    r = Request([1, 2, 3], 0)
    Engine(model, 1, 8).run([r])
    assert r.generated == [] and r.fed == 0


def test_chunked_prefill_and_late_arrivals_use_few_slots(seed):
    """Six requests through two slots, prefilled in chunks of 3: every one is fed its whole prompt and
    gets all its tokens, and every slot is free at the end."""
    model = moe.MoETransformer(tiny_config("topk"))
    prompts = random_prompts(6, model.cfg.vocab_size, 1, 9)
    reqs = [Request(p, 4, arrival=i // 2, order=i, chunk=3) for i, p in enumerate(prompts)]
    engine = Engine(model, 2, 16)
    engine.run(reqs)
    assert all(len(r.generated) == 4 and r.fed == len(r.prompt) + 3 for r in reqs)
    assert sorted(engine.free_slots) == [0, 1]


@pytest.mark.parametrize("kw, field", [
    (dict(prompt=[]), "prompt"), (dict(prompt=(1, 2)), "prompt"), (dict(prompt=[1, "2"]), "prompt"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(arrival=-1), "arrival"), (dict(chunk=0), "chunk"),
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(seed=0.5), "seed"),
])
def test_request_refuses_bad_arguments(kw, field):
    args = dict(prompt=[1, 2, 3], max_new_tokens=2)
    args.update(kw)
    with pytest.raises(ValueError, match=field):
        Request(**args)


def test_engine_refuses_token_ids_outside_the_vocabulary_before_any_step():
    model = moe.MoETransformer(tiny_config("topk"))
    ok, bad = Request([1, 2], 2), Request([3, model.cfg.vocab_size], 2)
    engine = Engine(model, 2, 8)
    with pytest.raises(ValueError, match=r"requests\[1\]\.prompt.*vocab_size"):
        engine.run([ok, bad])
    assert engine.steps == 0 and ok.generated == []
