"""The torch backend's expert GEMM where torch._grouped_mm cannot run: the host loop for host offsets,
and the sync-free masked form that a GPU step (and its CUDA graph) uses instead."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from detmoe.kernels.torch_backend import TorchBackend, grouped_mm_masked
from tests.kernels.conftest import DEVICE, randn

SIZES = [[3, 0, 5, 1], [0, 0, 7, 0], [1, 1, 1, 1], [0, 4, 0, 9]]   # rows per group, empty groups included


def _reference(x, w, sizes):
    outs, start = [], 0
    for e, n in enumerate(sizes):
        outs.append(x[start:start + n] @ w[e])
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("sizes", SIZES)
def test_masked_grouped_mm_equals_per_group_products(gen, sizes):
    x, w = randn(gen, sum(sizes), 24, dtype=torch.float64), randn(gen, len(sizes), 24, 40, dtype=torch.float64)
    offsets = torch.tensor(sizes, device=DEVICE).cumsum(0).to(torch.int32)
    torch.testing.assert_close(grouped_mm_masked(x, w, offsets), _reference(x, w, sizes), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes", SIZES)
def test_host_loop_fallback_where_grouped_mm_refuses(gen, sizes, monkeypatch):
    def refuse(*args, **kwargs):
        raise NotImplementedError("not for this shape")
    monkeypatch.setattr(torch, "_grouped_mm", refuse)
    x, w = randn(gen, sum(sizes), 24, dtype=torch.float64), randn(gen, len(sizes), 24, 40, dtype=torch.float64)
    offsets = torch.tensor(sizes, device=DEVICE).cumsum(0).to(torch.int32)
    torch.testing.assert_close(TorchBackend().grouped_matmul(x, w, offsets), _reference(x, w, sizes),
                               rtol=1e-12, atol=1e-12)


class _SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_masked_grouped_mm_reads_nothing_back(gen):
    x, w = randn(gen, 9, 8), randn(gen, 3, 8, 4)
    offsets = torch.tensor([2, 2, 9], device=DEVICE, dtype=torch.int32)
    with _SyncCounter() as counter:
        grouped_mm_masked(x, w, offsets)
    assert counter.ops == []
