"""Batch compositions: every mode and batch size appears, and a chunked probe's prefill takes a bounded
number of steps whatever its length."""
from __future__ import annotations

import random

from detmoe.lab.compositions import MODES, make_compositions
from detmoe.moe.engine import Engine
from tests.conftest import tiny_config
from detmoe import moe


def test_modes_and_sizes_cycle():
    comps = make_compositions([1, 2, 3, 5], per_size=3, vocab=100, max_len=12, max_new_tokens=4, seed=0)
    assert [c.batch_size for c in comps] == [1] * 3 + [2] * 3 + [3] * 3 + [5] * 3
    assert all(c.mode == "prefill" for c in comps if c.batch_size == 1)
    assert {c.mode for c in comps if c.batch_size > 1} == set(MODES)
    assert all(len(c.co_prompts) == c.batch_size - 1 and 0 <= c.probe_index < c.batch_size for c in comps)


def test_chunk_grows_with_the_probe():
    """2-4 tokens per chunk for a short probe (as drawn), and 8-16 chunks for a long one."""
    chunked = [c for c in make_compositions([2, 3, 4, 5, 6, 7], 3, 100, 12, 4, seed=1) if c.mode == "chunked"]
    assert chunked
    rng = random.Random(0)
    for c in chunked:
        short, _ = c.requests([rng.randrange(100) for _ in range(12)], 4)
        assert short.chunk == c.chunk and 2 <= c.chunk <= 4
        long_probe = [rng.randrange(100) for _ in range(rng.randint(500, 1300))]
        long, _ = c.requests(long_probe, 4)
        assert 8 <= -(-len(long_probe) // long.chunk) <= 16


def test_chunked_probe_runs_in_few_steps(seed):
    model = moe.MoETransformer(tiny_config())
    comp = next(c for c in make_compositions([3], 3, model.cfg.vocab_size, 8, 2, seed=seed) if c.mode == "chunked")
    probe = [random.Random(seed).randrange(model.cfg.vocab_size) for _ in range(200)]
    req, batch = comp.requests(probe, 2)
    engine = Engine(model, len(batch), 256)
    engine.run(batch, until_tracked_done=True)
    assert len(req.generated) == 2 and engine.steps <= 16 + 2 + 2
