"""RMSNorm: a row's bits do not depend on the number of rows or its position; accuracy vs float64."""
from __future__ import annotations

import pytest
import torch

from detmoe.kernels.ops.rmsnorm import add_rms_norm, rms_norm
from tests.kernels.conftest import TOL, assert_same_bits, batches_with_probe, randn, rel_err

SIZES = [1, 2, 3, 7, 13, 64, 67, 300]


def _reference(x, w, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 200])
def test_row_invariant_and_accurate(gen, dtype, D):
    w = randn(gen, D, dtype=dtype)
    probe = randn(gen, D, dtype=dtype) * 3
    alone = rms_norm(probe[None], w, 1e-6)[0]
    for batch, pos in batches_with_probe(gen, probe, SIZES, lambda m: randn(gen, m, D, dtype=dtype)):
        out = rms_norm(batch, w, 1e-6)
        assert torch.equal(out[pos], alone), f"row changed at {len(batch)} rows, position {pos}"
    assert rel_err(out, _reference(batch, w, 1e-6)) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("D", [2048, 4096, 7168])
def test_gpu_row_invariant(gen, D):
    w = randn(gen, D, dtype=torch.bfloat16)
    x = randn(gen, 8192, D, dtype=torch.bfloat16)
    alone = rms_norm(x[:1], w, 1e-6)[0]
    for m in list(range(1, 300, 7)) + [1024, 8192]:
        assert torch.equal(rms_norm(x[:m], w, 1e-6)[0], alone), f"row 0 changed at {m} rows"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 200])
def test_add_rms_norm_is_the_add_then_the_norm(gen, dtype, D):
    """The fused residual add + norm gives torch's add and our norm of the sum, bit for bit (the sum
    rounded to x's dtype as torch rounds it, then normalised), batch-invariant like rms_norm itself."""
    w = randn(gen, D, dtype=dtype)
    x, r = randn(gen, 37, D, dtype=dtype) * 3, randn(gen, 37, D, dtype=dtype)
    total, normed = add_rms_norm(x, r, w, 1e-6)
    assert_same_bits(total, x + r)
    assert_same_bits(normed, rms_norm(x + r, w, 1e-6))
    alone = add_rms_norm(x[5:6], r[5:6], w, 1e-6)
    assert_same_bits(alone[0][0], total[5])
    assert_same_bits(alone[1][0], normed[5])
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, r[:3], w, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [2048, 4096])
def test_gpu_add_rms_norm_is_the_add_then_the_norm(gen, D):
    w = randn(gen, D, dtype=torch.bfloat16)
    for T in (1, 64, 8192):
        x, r = randn(gen, T, D, dtype=torch.bfloat16) * 3, randn(gen, T, D, dtype=torch.bfloat16)
        total, normed = add_rms_norm(x, r, w, 1e-6)
        assert_same_bits(total, x + r)
        assert_same_bits(normed, rms_norm(x + r, w, 1e-6))
