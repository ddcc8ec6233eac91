"""Shared fixtures. Random data is fresh each run: the seed is drawn from the clock and printed, so a
failure can be replayed with DETMOE_SEED=<seed>."""
from __future__ import annotations

import os
import time

import pytest
import torch

import moe

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def seed(request) -> int:
    s = int(os.environ.get("DETMOE_SEED", time.time_ns() % 2**31))
    print(f"{request.node.name}: DETMOE_SEED={s}")
    torch.manual_seed(s)
    return s


def tiny_config(router: str = "topk", **moe_overrides) -> moe.ModelConfig:
    """The tiny preset with a chosen router; seed varies so weights are fresh too."""
    return moe.ModelConfig.from_name("tiny", seed=int(torch.randint(0, 2**31, ()).item()),
                                     moe=dict(router=router, **moe_overrides))


@pytest.fixture
def make_model(seed):
    def make(router: str = "topk", dtype: str = "float32", **moe_overrides) -> moe.MoETransformer:
        cfg = tiny_config(router, **moe_overrides)
        cfg.dtype = dtype
        return moe.MoETransformer(cfg)
    return make


def random_prompts(n: int, vocab: int, min_len: int = 1, max_len: int = 12) -> list[list[int]]:
    lens = torch.randint(min_len, max_len + 1, (n,)).tolist()
    return [torch.randint(0, vocab, (L,)).tolist() for L in lens]
