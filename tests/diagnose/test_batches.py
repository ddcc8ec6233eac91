"""detmoe.diagnose.batches: rows padded on either side, with generate's positions."""
import pytest
import torch

from detmoe.diagnose.batches import pad_rows, positions_from_mask


def test_rows_padded_left_and_right_with_generates_positions():
    rows = [[5, 6, 7], torch.tensor([8]), (9, 10)]
    ids, mask = pad_rows(rows, "left", pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]] and mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    ids, mask = pad_rows(rows, "right", pad_id=3)
    assert ids.tolist() == [[5, 6, 7], [8, 3, 3], [9, 10, 3]] and mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0], [0, 1, 1]]


@pytest.mark.parametrize("rows, side, match", [([[1]], "middle", "side must be"), ([], "left", "rows must be"),
                                               ([[1], []], "left", "rows must be")])
def test_bad_rows_are_refused(rows, side, match):
    with pytest.raises(ValueError, match=match):
        pad_rows(rows, side)
