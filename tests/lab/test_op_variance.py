"""The per-op probes' version counting against hand-made rows, the batch sizes they walk, and the sizes
they refuse."""
import dataclasses

import pytest
import torch

from detmoe.lab import op_variance as ov

TINY = ov.ProbeSizes(mm_k=(8,), mm_n=(4,), grouped=((8, 4),), n_experts=2, heads=1, head_dim=4, context=8,
                     row_len=16, max_batch=6, runs=3, index_add_rows=16)


def test_versions_are_bit_patterns_in_order_of_appearance():
    """0.0 and -0.0 are two versions; the sizes listed are those whose result is not batch 1's."""
    def row(m: int) -> torch.Tensor:
        return torch.tensor([0.0 if m < 4 else -0.0 if m < 8 else 1.0])

    sizes = [1, 2, 3, 4, 5, 7, 8, 9]
    assert ov.over_batch(row, sizes) == (3, [4, 5, 7, 8, 9])
    assert ov.over_batch(lambda m: torch.ones(3, dtype=torch.bfloat16), sizes) == (1, [])


def test_repeats_count_the_worst_size():
    calls = {1: 0, 5: 0}

    def row(m: int) -> torch.Tensor:   # batch 5 alternates between two results, batch 1 never changes
        calls[m] += 1
        return torch.tensor([float(calls[m] % 2 if m == 5 else 0)])

    assert ov.over_runs(row, [1, 5], runs=4) == 2
    assert ov.over_runs(row, [1], runs=4) == 1


def test_record_walks_the_batch_sizes_then_repeats_at_both_ends():
    """A row that changes from batch 4 on: two versions, differing at 4..6; repeats give one version."""
    probe = ov.Probe(TINY, torch.device("cpu"), seed=0)
    record = probe.record("op", "shape", torch.bfloat16, lambda m: torch.tensor([float(m >= 4)]))
    assert (record.op, record.dtype, record.varies, record.status) == ("op", "bfloat16", "batch size", "ok")
    assert (record.versions, record.differs_at, record.versions_over_runs, record.runs) == (2, [4, 5, 6], 1, 3)


@pytest.mark.parametrize("max_batch", [1, 5, 32, 33, 100, 256])
def test_batch_sizes(max_batch):
    sizes = ov.batch_sizes(max_batch)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_batch
    assert sizes[:min(32, max_batch)] == list(range(1, min(32, max_batch) + 1))


@pytest.mark.parametrize("field, value", [("max_batch", 0), ("runs", -1), ("mm_k", ()), ("mm_n", (0,)),
                                          ("grouped", ((4, 0),)), ("context", 3)])
def test_bad_sizes_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})
