"""Session 36 user trial: ids given as pairs (a nested id written as tuples) are refused for their shape, with the
way to number the combinations, not as "strings mixed with other objects"."""

from __future__ import annotations

import pytest
import torch

from bma_gp.partition_builders import group_partition


@pytest.mark.parametrize(
    "ids",
    [
        [("a", 1), ("b", 2), ("a", 1)],
        [("a", "x"), ("b", "y")],
        [(1, 2), (3, 4), (1, 2)],
        torch.tensor([[1, 2], [3, 4]]),
    ],
    ids=["mixed-pairs", "string-pairs", "integer-pairs", "tensor"],
)
def test_pairs_of_ids_are_refused_for_their_shape_with_the_fix(ids):
    with pytest.raises(ValueError, match=r"got shape \((3|2), 2\)\. Each point has 2 values.*MultiIndex") as info:
        group_partition(ids)
    assert "mix strings" not in str(info.value)


def test_a_column_of_string_ids_still_works():
    assert group_partition([["b"], ["a"], ["b"]]).labels.tolist() == [1, 0, 1]
    assert group_partition([[2], [0], [2]]).labels.tolist() == [1, 0, 1]
