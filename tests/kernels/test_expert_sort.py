"""The expert sort kernels give the stock argsort + searchsorted result exactly (stable order, group
ends) for any assignment count (one launch up to its bound, two above) and any expert count, and the
model's logits do not change when its dropless layers use it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from detmoe import kernels
from detmoe import moe
from detmoe.kernels.batch_invariant import BatchInvariantBackend
from detmoe.kernels.ops.expert_sort import MAX_ASSIGNMENTS, expert_sort
from detmoe.kernels.torch_backend import expert_sort_torch
from detmoe.moe import cu_seqlens_of
from tests.conftest import random_prompts, tiny_config
from tests.kernels.conftest import DEVICE


def assert_same_sort(flat: torch.Tensor, n_experts: int, by_counts: bool | None = None) -> None:
    order, offsets = expert_sort(flat, n_experts, by_counts=by_counts)
    ref_order, ref_offsets = expert_sort_torch(flat, n_experts)
    assert order.dtype == torch.int64 and offsets.dtype == torch.int32
    assert torch.equal(order, ref_order) and torch.equal(offsets, ref_offsets)


@pytest.mark.parametrize("N, E", [(1, 1), (1, 8), (7, 3), (37, 8), (256, 64), (100, 129), (1000, 16)])
def test_equals_stock_form(gen, N, E):
    flat = torch.randint(0, E, (N,), generator=gen).to(DEVICE)
    assert_same_sort(flat, E)
    assert_same_sort(flat.to(torch.int32), E)


def test_ties_keep_token_order_and_empty_experts(gen):
    """Every assignment to one expert (order = identity) and experts with no rows (repeated ends)."""
    assert_same_sort(torch.full((50,), 3, device=DEVICE), 8)
    assert_same_sort(torch.tensor([5, 0, 5, 0, 7], device=DEVICE), 9)
    assert_same_sort(torch.randint(0, 8, (64,), generator=gen).to(DEVICE)[::2], 8)   # strided input


@pytest.mark.parametrize("N, E", [(0, 4), (1, 1), (1500, 1), (37, 8), (1023, 3), (2048, 5), (1025, 64), (3000, 129),
                                  (MAX_ASSIGNMENTS + 5, 16)])
def test_counting_sort_equals_stock_form(gen, N, E):
    """The two-launch counting sort (forced below its bound): no assignment, one expert, blocks of 1024
    assignments whole or with a last block cut short, more experts than a power of two, and a skewed
    expert distribution."""
    flat = torch.randint(0, E, (N,), generator=gen).to(DEVICE)
    for f in (flat, flat.to(torch.int32), torch.where(flat % 3 == 0, flat, 0)):
        assert_same_sort(f, E, by_counts=True)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="1-D int32/int64"):
        expert_sort(torch.zeros(2, 2, dtype=torch.long, device=DEVICE), 4)
    with pytest.raises(ValueError, match="n_experts"):
        expert_sort(torch.zeros(3, dtype=torch.long, device=DEVICE), 0)


def test_model_logits_unchanged_by_the_kernel(seed, monkeypatch):
    """The dropless batch_invariant model with every layer's sort on the kernel (on the CPU the backend
    keeps the stock form) against the stock form."""
    cfg = dataclasses.replace(tiny_config("topk"), dtype="bfloat16")
    model = moe.MoETransformer(cfg, device=DEVICE)
    tokens, cu = (t.to(DEVICE) for t in cu_seqlens_of(random_prompts(3, cfg.vocab_size, 4, 12)))
    with kernels.use_backend("batch_invariant"):
        ref, _ = model(tokens, cu)
    calls = []

    def kernel_sort(self, flat, n_experts):
        calls.append(1)
        return expert_sort(flat, n_experts)

    monkeypatch.setattr(BatchInvariantBackend, "expert_sort", kernel_sort)
    with kernels.use_backend("batch_invariant"):
        logits, _ = model(tokens, cu)
    assert len(calls) == cfg.n_layers
    assert torch.equal(logits, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("N, E", [(8, 64), (128, 64), (2048, 64), (4096, 8), (512, 128), (4097, 64),
                                  (65536, 64), (32768, 8), (100000, 129)])
def test_gpu_equals_stock_form(gen, N, E):
    assert_same_sort(torch.randint(0, E, (N,), generator=gen).to(DEVICE), E)
