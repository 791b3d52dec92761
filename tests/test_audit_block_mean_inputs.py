"""Audit of the inputs of block mean approximations: ``block_mean``, ``kernel_block_mean`` and ``Partition``."""

from __future__ import annotations

import pytest
import torch

from bma_gp import Partition


# ---------------------------------------------------------------- Partition on the meta device
@pytest.mark.parametrize(
    "build",
    [
        lambda: Partition.from_sizes([2, 3, 4]),
        lambda: Partition.from_sizes([3, 3, 3]),
        lambda: Partition.from_sizes(list(range(1, 12))),
        lambda: Partition.from_labels([0, 0, 1, 1, 1, 2]),
        lambda: Partition.from_labels([0, 1, 0, 2, 1, 2]),
        lambda: Partition.from_labels([0]),
    ],
    ids=["sizes", "equal-sizes", "many-runs", "contiguous-labels", "scattered", "singleton"],
)
def test_partition_to_meta(build):
    """A partition from sizes (no label vector yet) summed its sizes on the target device: Tensor.item() on meta
    raised a RuntimeError, while partitions from labels moved."""
    partition = build()
    moved = partition.to("meta")
    assert moved.device.type == "meta" and len(moved) == len(partition) and moved.num_blocks == partition.num_blocks
    assert moved.is_contiguous == partition.is_contiguous
    assert moved.labels.device.type == "meta" and moved.labels.shape == (len(partition),)
    assert moved.block_sum(torch.ones(len(partition), device="meta")).shape == (partition.num_blocks,)
    assert partition.to(torch.device("meta")).device.type == "meta"
