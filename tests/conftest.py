"""Shared fixtures and markers. Random data is fresh each run: the seed is drawn from the clock and printed,
so a failure can be replayed with DETMOE_SEED=<seed>.

Markers (pyproject.toml): `gpu` tests need CUDA and are skipped without it (`pytest -m gpu` selects them
all); `cpu_blas_dependent` tests need stock fp32 torch.mm to be batch-variant on this CPU and are skipped,
with one reason, where its BLAS is not."""
from __future__ import annotations

import dataclasses
import functools
import os
import time

import pytest
import torch

from detmoe import moe

CPU_BLAS_REASON = "stock fp32 torch.mm is batch-invariant on this CPU (its BLAS): no stock variance to measure"


@functools.cache
def stock_mm_is_batch_variant() -> bool:
    """Does fp32 torch.mm on this CPU give row 0 other bits as the batch grows (README: at 1-3 rows against
    4 or more)? The premise of every `cpu_blas_dependent` test."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 512, generator=g), torch.randn(512, 512, generator=g)
    return len({torch.mm(x[:m], w)[0].numpy().tobytes() for m in (1, 2, 3, 4, 8, 16, 64)}) > 1


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def pytest_runtest_setup(item):
    if item.get_closest_marker("cpu_blas_dependent") and not stock_mm_is_batch_variant():
        pytest.skip(CPU_BLAS_REASON)


def draw_seed(name: str) -> int:
    """DETMOE_SEED if set, else a seed from the clock; printed with the test's name for a replay."""
    s = int(os.environ.get("DETMOE_SEED", time.time_ns() % 2**31))
    print(f"{name}: DETMOE_SEED={s}")
    return s


@pytest.fixture
def seed(request) -> int:
    s = draw_seed(request.node.name)
    torch.manual_seed(s)
    return s


def tiny_config(router: str = "topk", **moe_overrides) -> moe.ModelConfig:
    """The tiny preset with a chosen router; seed varies so weights are fresh too."""
    return moe.ModelConfig.from_name("tiny", seed=int(torch.randint(0, 2**31, ()).item()),
                                     moe=dict(router=router, **moe_overrides))


@pytest.fixture
def make_model(seed):
    def make(router: str = "topk", dtype: str = "float32", **moe_overrides) -> moe.MoETransformer:
        cfg = dataclasses.replace(tiny_config(router, **moe_overrides), dtype=dtype)
        return moe.MoETransformer(cfg)
    return make


def random_prompts(n: int, vocab: int, min_len: int = 1, max_len: int = 12) -> list[list[int]]:
    lens = torch.randint(min_len, max_len + 1, (n,)).tolist()
    return [torch.randint(0, vocab, (L,)).tolist() for L in lens]
