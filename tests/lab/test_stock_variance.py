"""The stock-kernel variance probe counts the bit patterns of one row, and finds what the CPU varies."""
import pytest
import torch

from detmoe.lab.stock_variance import count_versions, stock_kernel_versions
from detmoe.moe import ModelConfig

OPS = ["matmul", "grouped_matmul", "rms_norm", "softmax", "attention"]


def test_count_versions_counts_distinct_bits():
    assert count_versions(lambda n: torch.tensor([n % 3], dtype=torch.float32), [1, 2, 3, 4, 5, 6]) == 3
    # -0.0 == 0.0 as numbers, but not as bits
    assert count_versions(lambda n: torch.tensor([0.0 if n == 1 else -0.0]), [1, 2]) == 2
    assert count_versions(lambda n: torch.ones(4), [1, 7, 64]) == 1


@pytest.mark.cpu_blas_dependent   # fp32 matmul varies with the rows on this CPU
def test_probe_finds_what_varies_on_this_cpu():
    versions = stock_kernel_versions(ModelConfig.from_name("tiny"), "float32", "cpu", [1, 2, 5, 9], context=6)
    assert list(versions) == OPS
    assert versions["matmul"] > 1
    assert versions["rms_norm"] == versions["softmax"] == 1   # row-wise ops: one version whatever the batch


def test_probe_refuses_batch_sizes_below_one():
    with pytest.raises(ValueError, match="batch_sizes must be >= 1"):
        stock_kernel_versions(ModelConfig.from_name("tiny"), "float32", "cpu", [0, 2])
