"""The one-kernel tree sum gives the stock form's bits exactly (any leaf count, output dtype and shape,
ties of the final rounding, negative zeros), and the batch_invariant backend routes to it."""
from __future__ import annotations

import pytest
import torch

from detmoe import kernels
from detmoe.kernels.ops.tree_sum import tree_sum
from detmoe.kernels.torch_backend import tree_sum_torch
from tests.kernels.conftest import DEVICE, assert_same_bits

def random_partials(gen: torch.Generator, n: int, *shape: int) -> torch.Tensor:
    """Partials of mixed magnitudes (so the order of the additions shows in the bits), some -0.0, and
    some leaves that cancel exactly (a sum that is +0.0 or -0.0 depending on the order)."""
    scale = torch.exp2(torch.randint(-12, 12, (n, *shape), generator=gen).float())
    p = torch.randn(n, *shape, generator=gen) * scale
    p[torch.rand(n, *shape, generator=gen) < 0.1] = -0.0
    if n >= 2:
        cancel = torch.rand(*shape, generator=gen) < 0.1
        p[1][cancel] = -p[0][cancel]
    return p.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_equals_stock_form_bitwise(gen, dtype, n):
    p = random_partials(gen, n, 37, 129)          # neither a multiple of a block
    ref = tree_sum_torch(p, dtype)
    assert_same_bits(tree_sum(p, dtype), ref)
    if n == 4 and dtype == torch.float32:
        # the data must tell the tree from other orders, or the check above would say little
        assert not torch.equal(ref, ((p[0] + p[1]) + p[2]) + p[3])


def test_bf16_ties_round_to_even(gen):
    """Sums that land exactly halfway between two bf16 values: torch rounds them to even."""
    base = torch.tensor([1.0, 1.0078125, -3.0, 256.0])            # bf16 values, ulp 2**-7 at 1.0
    half_ulp = torch.tensor([2.0 ** -8, 2.0 ** -8, -(2.0 ** -6), 1.0])
    p = torch.stack([base, half_ulp]).to(DEVICE)
    assert_same_bits(tree_sum(p, torch.bfloat16), tree_sum_torch(p, torch.bfloat16))


def test_non_contiguous_and_empty(gen):
    p = random_partials(gen, 4, 20, 30)[:, :, ::3]
    assert_same_bits(tree_sum(p, torch.bfloat16), tree_sum_torch(p, torch.bfloat16))
    assert tree_sum(torch.empty(2, 0, 5, device=DEVICE), torch.float32).shape == (0, 5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="power-of-two"):
        tree_sum(torch.zeros(3, 4, device=DEVICE), torch.float32)
    with pytest.raises(ValueError, match="float32 partials"):
        tree_sum(torch.zeros(2, 4, device=DEVICE, dtype=torch.float16), torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        tree_sum(torch.zeros(2, 4, device=DEVICE), torch.int32)


def test_backends_agree(gen):
    p = random_partials(gen, 4, 9, 17)
    with kernels.use_backend("batch_invariant"):
        a = kernels.tree_sum(p, torch.bfloat16)
        wide = kernels.tree_sum(p.double(), torch.float64)        # fp64 stays on the stock form
    with kernels.use_backend("torch"):
        b = kernels.tree_sum(p, torch.bfloat16)
    assert_same_bits(a, b)
    assert torch.equal(wide, tree_sum_torch(p.double(), torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("rows", [1, 64, 8192])
def test_gpu_equals_stock_form_bitwise(gen, n, rows):
    p = random_partials(gen, n, rows, 4096)
    for dtype in (torch.bfloat16, torch.float32):
        assert_same_bits(tree_sum(p, dtype), tree_sum_torch(p, dtype))
