"""Unusual dtypes, shapes and values at the public entry points, found by an audit.

* ``Partition.block_sum`` of an int8 .. int32 (or uint8) tensor summed in the tensor's own dtype, and wrapped
  around, for scattered blocks and contiguous blocks of many sizes, while runs of equal-size blocks gave int64
  sums (as ``torch.sum`` does): the same sums had another dtype, and another value, by layout;
"""

from __future__ import annotations

import pytest
import torch

from bma_gp import Partition

DTYPE = torch.float64

LAYOUTS = {
    "scattered": [0, 1, 0, 2, 1, 2, 2],
    "runs": [0, 0, 1, 1, 2, 2, 2],
    "many sizes": [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9, 9, 9, 9, 9],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool])
def test_block_sum_of_integers_is_the_int64_sum_in_every_layout(layout, dtype):
    partition = Partition.from_labels(LAYOUTS[layout])
    n, k = len(partition), partition.num_blocks
    x = torch.full((n, 2), 1 if dtype == torch.bool else 100, dtype=dtype)  # 2 x 100 wraps in int8 and uint8
    expected = torch.nn.functional.one_hot(partition.labels, k).mT @ x.long()

    res = partition.block_sum(x, dim=0)

    assert res.dtype == torch.int64 == torch.sum(x).dtype
    assert torch.equal(res, expected)
    assert torch.equal(partition.block_sum(x[:, 0]), expected[:, 0])  # the 1-d path too
