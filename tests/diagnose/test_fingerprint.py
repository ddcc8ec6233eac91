"""fingerprint_rows: bitwise, per row, the same on a GPU (one Triton kernel) as in torch ops."""
from __future__ import annotations

import pytest
import torch

from detmoe.diagnose.fingerprint import fingerprint_rows, fingerprint_rows_torch


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (37, 1024), (3, 4099), (2, 7, 151936)])
def test_the_gpu_kernel_gives_the_torch_forms_numbers(dtype, shape):
    x = (torch.randn(shape) * 100).to(dtype).cuda()
    assert torch.equal(fingerprint_rows(x).cpu(), fingerprint_rows_torch(x.cpu()))


def test_a_changed_bit_changes_its_rows_fingerprint_only():
    x = torch.randn(7, 33)
    fp = fingerprint_rows(x)
    assert torch.equal(fingerprint_rows(x[torch.randperm(7)]).sort().values, fp.sort().values)
    assert torch.equal(fingerprint_rows(x[2:5]), fp[2:5])
    y = x.clone()
    y[3, int(torch.randint(0, 33, ()))] *= 1 + 2**-23
    assert (fingerprint_rows(y) != fp).tolist() == [i == 3 for i in range(7)]
    assert fingerprint_rows(torch.zeros(1, 4)) != fingerprint_rows(torch.tensor([[0.0, -0.0, 0.0, 0.0]]))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert fingerprint_rows(x.to(dtype)).shape == (7,)
        assert fingerprint_rows(x[:, :5].to(dtype)).shape == (7,)      # an odd count of 16-bit values
    with pytest.raises(ValueError, match="float16/bfloat16/float32/float64"):
        fingerprint_rows(torch.ones(2, 3, dtype=torch.int32))
