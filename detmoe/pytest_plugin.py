"""The `detmoe` pytest plugin (entry point `pytest11`, installed with the package): batch-invariance checks
as fixtures, so a test of your own code reads

    def test_my_kernel(batch_invariant):
        batch_invariant(my_fn, row, [1, 7, 64])

    def test_my_model(model_batch_invariant):
        model_batch_invariant(model, input_ids, batch_sizes=[2, 7], padding_side="both")

`batch_invariant` is `detmoe.testing.assert_batch_invariant`, `model_batch_invariant` is
`detmoe.testing.assert_model_batch_invariant` (detmoe/testing.py says what they check and report).

pytest imports this module at start-up in every project where detmoe is installed, so it imports nothing
but pytest (torch and detmoe.testing are imported when a test asks for a fixture) and defines no hook, no
option and no marker: a test session that uses no fixture of it runs as if it were not installed.
"""
from __future__ import annotations

from typing import Callable

import pytest


@pytest.fixture
def batch_invariant() -> Callable[..., None]:
    """`detmoe.testing.assert_batch_invariant(fn, row, batches, others=None)`."""
    from detmoe.testing import assert_batch_invariant
    return assert_batch_invariant


@pytest.fixture
def model_batch_invariant() -> Callable[..., None]:
    """`detmoe.testing.assert_model_batch_invariant(model, input_ids, batch_sizes=(2, 7), padding_side="both",
    attention_mask=None, positions_from_mask=True)`."""
    from detmoe.testing import assert_model_batch_invariant
    return assert_model_batch_invariant
