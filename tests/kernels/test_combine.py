"""The ordered MoE combine: the one-kernel Triton op gives the stock torch form's bits exactly (fp32,
bf16, fp16 outputs; dropped slots; negative zeros; ragged tiles), and switching the model to it changes
no logit bit."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from detmoe import kernels
from detmoe import moe
from detmoe.kernels.batch_invariant import BatchInvariantBackend
from detmoe.kernels.ops.combine import ordered_combine, slot_rows
from detmoe.kernels.torch_backend import ordered_combine_torch
from detmoe.moe import cu_seqlens_of
from tests.conftest import random_prompts, tiny_config
from tests.kernels.conftest import DEVICE, assert_same_bits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
def random_assignments(gen: torch.Generator, T: int, S: int, keep: float) -> torch.Tensor:
    """`order`: the kept (token, slot) cells t*S+j (a `keep` share of them), in a random order."""
    kept = (torch.rand(T * S, generator=gen) < keep).nonzero().squeeze(1)
    return kept[torch.randperm(kept.shape[0], generator=gen)].to(DEVICE)


def random_outputs(gen: torch.Generator, A: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert outputs of mixed magnitudes (so that sums round), a few rows of -0.0."""
    out = torch.randn(A, D, generator=gen) * torch.exp2(torch.randint(-6, 7, (A, 1), generator=gen).float())
    out[torch.rand(A, generator=gen) < 0.2] = -0.0
    return out.to(dtype=dtype, device=DEVICE)


def random_weights(gen: torch.Generator, T: int, S: int) -> torch.Tensor:
    """Weights of either sign (the op's contract does not need a router's non-negative ones: a dropped
    slot must give +0.0 even with a negative weight), a few 0.0 (0 * a negative output: a -0.0 product)."""
    w = torch.rand(T, S, generator=gen) * 2 - 1
    w[torch.rand(T, S, generator=gen) < 0.2] = 0.0
    return w.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [1, 2, 8])
@pytest.mark.parametrize("keep", [1.0, 0.6])
def test_equals_torch_form_bitwise(gen, dtype, S, keep):
    T, D = 37, 200  # neither a multiple of a tile
    order = random_assignments(gen, T, S, keep)
    out = random_outputs(gen, order.shape[0], D, dtype)
    w = random_weights(gen, T, S)
    if keep == 1.0 and S == 2:
        # signed zeros for sure: token 0 sums (-0.0) + (-0.0) = -0.0, token 1 (+0.0) + (-0.0) = +0.0
        for cell, weight in [(0, 1.0), (1, 1.0), (2, -1.0), (3, 1.0)]:
            out[(order == cell).nonzero().squeeze(1)] = -0.0
            w[cell // S, cell % S] = weight
    ref = ordered_combine_torch(out, order, w, dtype)
    assert_same_bits(ordered_combine(out, order, w, dtype), ref)
    if keep == 1.0 and S == 2:
        # the data must exercise the edge cases, or the bitwise claim above says nothing about them
        negative_zero = (ref == 0) & torch.signbit(ref)
        assert negative_zero.any() and ((ref == 0) & ~torch.signbit(ref)).any()


def test_sum_starts_from_slot_zero_and_adds_dropped_cells(gen):
    """-0.0 products: kept as -0.0 when every slot is -0.0, turned to +0.0 by a dropped slot's +0.0."""
    T, S, D = 3, 2, 5
    w = torch.ones(T, S, device=DEVICE)
    order = torch.tensor([0, 1, 2, 5], device=DEVICE)          # token 1 keeps slot 0 only, token 2 slot 1
    out = torch.full((4, D), -0.0, device=DEVICE)
    y = ordered_combine(out, order, w, torch.float32)
    assert torch.signbit(y[0]).all()                          # -0 + -0 = -0
    assert not torch.signbit(y[1]).any() and not torch.signbit(y[2]).any()   # -0 + (+0) = +0
    assert_same_bits(y, ordered_combine_torch(out, order, w, torch.float32))


def test_every_slot_dropped_gives_zeros(gen):
    w = random_weights(gen, 4, 2)
    order = torch.empty(0, dtype=torch.long, device=DEVICE)
    out = torch.empty(0, 6, dtype=torch.bfloat16, device=DEVICE)
    y = ordered_combine(out, order, w, torch.bfloat16)
    assert_same_bits(y, ordered_combine_torch(out, order, w, torch.bfloat16))


def test_slot_rows_inverts_order(gen):
    order = random_assignments(gen, 9, 3, 0.5)
    inv = slot_rows(order, 27)
    assert inv.dtype == torch.int32
    assert torch.equal(inv[order].long(), torch.arange(order.shape[0], device=DEVICE))
    dropped = torch.ones(27, dtype=torch.bool, device=DEVICE)
    dropped[order] = False
    assert (inv[dropped] == -1).all()


def test_bad_inputs_raise(gen):
    out, order, w = torch.zeros(2, 4, device=DEVICE), torch.tensor([0, 1], device=DEVICE), torch.ones(1, 2)
    with pytest.raises(ValueError, match="dtype"):
        ordered_combine(out, order, w.to(DEVICE), torch.int32)
    with pytest.raises(ValueError, match="weights"):
        ordered_combine(out, order, w.to(DEVICE, torch.float16), torch.float32)
    with pytest.raises(ValueError, match="order"):
        ordered_combine(out, order[:1], w.to(DEVICE), torch.float32)


def test_backend_keeps_float64_on_the_torch_form(gen):
    order = random_assignments(gen, 5, 2, 0.7)
    out = random_outputs(gen, order.shape[0], 8, torch.float64)
    w = random_weights(gen, 5, 2)
    with kernels.use_backend("batch_invariant"):
        y = kernels.ordered_combine(out, order, w, torch.float64)
    assert torch.equal(y, ordered_combine_torch(out, order, w, torch.float64))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_logits_unchanged_by_the_kernel(seed, monkeypatch, dtype):
    """The batch_invariant model with the one-kernel combine against the same model with the torch form,
    with a dropping router so that some slots have no row."""
    cfg = dataclasses.replace(tiny_config("capacity", capacity_factor=0.6), dtype=dtype)
    model = moe.MoETransformer(cfg, device=DEVICE)
    assert model.cfg.moe.combine == "ordered"
    tokens, cu = (t.to(DEVICE) for t in cu_seqlens_of(random_prompts(3, cfg.vocab_size, 4, 12)))
    calls = []
    fused = BatchInvariantBackend.ordered_combine

    def counted(self, *args):
        calls.append(1)
        return fused(self, *args)

    monkeypatch.setattr(BatchInvariantBackend, "ordered_combine", counted)
    with kernels.use_backend("batch_invariant"):
        logits, routings = model(tokens, cu)
    assert len(calls) == cfg.n_layers
    assert any((~r.kept).any() for r in routings), "no slot was dropped: the test would miss that case"
    monkeypatch.setattr(BatchInvariantBackend, "ordered_combine",
                        lambda self, out, order, w, dt: ordered_combine_torch(out, order, w, dt))
    with kernels.use_backend("batch_invariant"):
        ref, _ = model(tokens, cu)
    assert_same_bits(logits, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 64, 256])
@pytest.mark.parametrize("keep", [1.0, 0.8])
def test_gpu_equals_torch_form_bitwise(gen, T, keep):
    S, D = 8, 4096
    order = random_assignments(gen, T, S, keep)
    out = random_outputs(gen, order.shape[0], D, torch.bfloat16)
    w = random_weights(gen, T, S)
    assert_same_bits(ordered_combine(out, order, w, torch.bfloat16),
                     ordered_combine_torch(out, order, w, torch.bfloat16))
