"""Softmax / log-softmax (fp32 out): a row's bits do not depend on the number of rows; accuracy."""
from __future__ import annotations

import pytest
import torch

from detmoe.kernels.ops.softmax import log_softmax, softmax
from tests.kernels.conftest import batches_with_probe, randn, rel_err

SIZES = [1, 2, 3, 7, 13, 64, 67, 300]


@pytest.mark.parametrize("fn,ref", [(softmax, torch.softmax), (log_softmax, torch.log_softmax)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [50, 3000])    # 3000 > the interpreter's 2048 block: the chunk loop runs
def test_row_invariant_and_accurate(gen, fn, ref, dtype, N):
    probe = randn(gen, N, dtype=dtype) * 4
    alone = fn(probe[None])[0]
    assert alone.dtype == torch.float32
    for batch, pos in batches_with_probe(gen, probe, SIZES, lambda m: randn(gen, m, N, dtype=dtype) * 4):
        out = fn(batch)
        assert torch.equal(out[pos], alone), f"row changed at {len(batch)} rows, position {pos}"
    assert rel_err(out, ref(batch.double(), -1)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("N", [512, 151936])
def test_gpu_row_invariant(gen, N):
    x = randn(gen, 1024, N, dtype=torch.bfloat16) * 4
    alone = log_softmax(x[:1])[0]
    for m in list(range(1, 300, 7)) + [1024]:
        assert torch.equal(log_softmax(x[:m])[0], alone), f"row 0 changed at {m} rows"
