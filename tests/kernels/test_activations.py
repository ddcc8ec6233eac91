"""swiglu and sigmoid (detmoe/kernels/ops/activations.py): every element computed one way wherever it sits
(a row alone or in a batch, a column shard or the whole width), close to torch's composition on the CPU
and bitwise torch's on the GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detmoe.kernels.ops.activations import sigmoid, swiglu
from tests.kernels.conftest import DEVICE, TOL, assert_same_bits, randn, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def stock_swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=1)
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, F_", [(1, 1), (5, 7), (37, 16), (64, 96), (3, 1408)])
def test_swiglu_is_the_composition(gen, dtype, T, F_):
    h = randn(gen, T, 2 * F_, dtype=dtype) * 3
    out = swiglu(h)
    assert out.shape == (T, F_) and out.dtype == dtype
    if DEVICE == "cuda":   # torch's CUDA kernels compute each element one way too: the same bits
        assert_same_bits(out, stock_swiglu(h))
    else:                  # torch's CPU kernels do not (vector body vs scalar tail): close, not equal
        assert rel_err(out, stock_swiglu(h.double())) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_rows_and_column_shards_get_the_whole_tensors_bits(gen, dtype):
    """A row's bits whatever the batch; a rank's column shard of gate and up (tensor-parallel experts)
    gives the same bits as those columns of the whole width, for widths drawn at random."""
    for _ in range(4):
        T, F_ = int(torch.randint(1, 80, (1,), generator=gen)), int(torch.randint(1, 200, (1,), generator=gen))
        h = randn(gen, T, 2 * F_, dtype=dtype) * 3
        whole = swiglu(h)
        for t in {0, T // 2, T - 1}:
            assert_same_bits(swiglu(h[t:t + 1]), whole[t:t + 1])
        for W in (2, 3, 4):
            if F_ % W:
                continue
            s = F_ // W
            for r in range(W):
                shard = torch.cat([h[:, r * s:(r + 1) * s], h[:, F_ + r * s:F_ + (r + 1) * s]], dim=1)
                assert_same_bits(swiglu(shard), whole[:, r * s:(r + 1) * s])


def test_swiglu_reads_a_strided_view_and_refuses_bad_input(gen):
    h = randn(gen, 9, 64)
    assert_same_bits(swiglu(h[:, :32]), swiglu(h[:, :32].contiguous()))
    with pytest.raises(ValueError, match="h must be 2-D"):
        swiglu(randn(gen, 4, 7))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        swiglu(torch.ones(2, 4, dtype=torch.int32, device=DEVICE))
    assert swiglu(randn(gen, 0, 8)).shape == (0, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_is_torchs_and_the_same_for_an_element_anywhere(gen, dtype):
    x = randn(gen, 5000, dtype=dtype) * 6
    whole = sigmoid(x)
    if DEVICE == "cuda":
        assert_same_bits(whole, torch.sigmoid(x))
    else:
        assert rel_err(whole, torch.sigmoid(x.double())) < TOL[dtype]
    for start in torch.randint(0, 4990, (8,), generator=gen).tolist():
        n = int(torch.randint(1, 10, (1,), generator=gen))
        assert_same_bits(sigmoid(x[start:start + n]), whole[start:start + n])
    assert_same_bits(sigmoid(x.view(50, 100)[:, 3:5]), whole.view(50, 100)[:, 3:5])   # any layout and shape
