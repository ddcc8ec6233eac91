"""Shared fixtures for the kernel tests: fresh random inputs each run, and NaN-poisoned outputs. GPU-only
tests carry the `gpu` marker (tests/conftest.py skips them without CUDA)."""
from __future__ import annotations

import pytest
import torch

from detmoe.kernels import runtime
from tests.conftest import draw_seed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded as the `seed` fixture is: DETMOE_SEED, or the clock (printed for a replay)."""
    return torch.Generator().manual_seed(draw_seed(request.node.name))


@pytest.fixture(autouse=True)
def poison_outputs():
    """Launchers fill outputs/workspaces with NaN first: an element a kernel forgot to write shows up."""
    runtime.poison_outputs = True
    yield
    runtime.poison_outputs = False


BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equality of two float tensors (NaN-free, so that an unwritten element shows), signed
    zeros told apart."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert not torch.isnan(a).any(), "NaN in the output (an unwritten element?)"
    assert torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


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
