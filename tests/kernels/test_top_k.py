"""detmoe/kernels/ops/top_k.py: the first k columns of a stable descending sort and their values, exactly as
the stock form gives them, with many ties, -inf and NaN in the rows, on fresh random data."""
import pytest
import torch

from detmoe import kernels
from detmoe.kernels.ops.top_k import top_k
from detmoe.kernels.torch_backend import top_k_torch
from tests.kernels.conftest import DEVICE


def _rows(gen, T, N, dtype):
    # values from a small set: most rows hold ties, which the order must break by column
    x = torch.randint(0, 6, (T, N), generator=gen).to(dtype) / 4
    x[torch.rand(T, N, generator=gen) < 0.05] = float("-inf")
    x[torch.rand(T, N, generator=gen) < 0.03] = float("nan")
    x[0] = float("-inf")                                            # a row of -inf only
    return x.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,k", [(8, 2), (64, 8), (60, 60), (5, 1)])
def test_top_k_is_the_stable_sorts_head(gen, dtype, N, k):
    x = _rows(gen, 37, N, dtype)
    cols, vals = top_k(x, k)
    ref_cols, ref_vals = top_k_torch(x, k)
    assert torch.equal(cols, ref_cols)
    _assert_same_values(vals, ref_vals)


def _assert_same_values(a, b):
    """Bitwise equal, NaN payloads aside (the interpreter's bf16 conversion does not keep them)."""
    bits = torch.int32 if a.dtype == torch.float32 else torch.int16
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(0.5).view(bits), b.nan_to_num(0.5).view(bits))


def test_top_k_of_softmax_probabilities_through_both_backends(gen):
    probs = torch.softmax(torch.randn(50, 64, generator=gen), dim=1).to(DEVICE)
    outs = []
    for backend in kernels.BACKENDS:
        with kernels.use_backend(backend):
            outs.append(kernels.top_k(probs, 8))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    # a row's result does not depend on the other rows
    alone = top_k(probs[17:18], 8)
    assert torch.equal(alone[0][0], outs[1][0][17]) and torch.equal(alone[1][0], outs[1][1][17])


def test_top_k_checks_k(gen):
    x = torch.randn(3, 8, generator=gen).to(DEVICE)
    for k in (0, 9):
        with pytest.raises(ValueError, match="k must be in 1..N=8"):
            top_k(x, k)
        with pytest.raises(ValueError, match="k in 1..N"):      # the stock form refuses it too
            top_k_torch(x, k)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 32768])
def test_gpu_top_k_at_router_sizes(gen, T):
    for N, k in ((64, 8), (8, 2), (128, 8), (256, 8)):
        x = _rows(gen, T, N, torch.float32)
        cols, vals = top_k(x, k)
        ref_cols, ref_vals = top_k_torch(x, k)
        assert torch.equal(cols, ref_cols)
        _assert_same_values(vals, ref_vals)
