"""Shared fixtures for the kernel tests: fresh random inputs each run, and NaN-poisoned outputs."""
from __future__ import annotations

import time

import pytest
import torch

from kernels import runtime

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def gen() -> torch.Generator:
    """A generator seeded from the clock; the seed is printed so a failure can be replayed."""
    seed = time.time_ns() % 2**31
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Launchers fill outputs/workspaces with NaN first: an element a kernel forgot to write shows up."""
    runtime.poison_outputs = True
    yield
    runtime.poison_outputs = False


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "output has NaN (an unwritten element?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def batches_with_probe(gen: torch.Generator, probe: torch.Tensor, sizes, make_rows):
    """Yield (batch, position) with `probe` placed at first, middle and last position of each batch size,
    the other rows fresh random (make_rows(n) -> n rows)."""
    for m in sizes:
        for pos in sorted({0, m // 2, m - 1}):
            batch = make_rows(m)
            batch[pos] = probe
            yield batch, pos
