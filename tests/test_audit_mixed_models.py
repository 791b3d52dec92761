"""Mixed-effects models as a statsmodels / lme4 user builds them: GroupKernel, GroupGaussianLikelihood, their
arguments and inputs, against dense references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bma_gp import GroupGaussianLikelihood, GroupKernel
from bma_gp.partition_builders import group_partition

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64


@pytest.mark.parametrize(
    "count",
    [np.int64(5), np.int32(5), torch.tensor(5), torch.tensor([3, 4]).max() + 1],
    ids=["numpy-int64", "numpy-int32", "tensor", "ids.max()+1"],
)
def test_integer_counts_of_any_integer_type(count):
    """``GroupKernel(ids.max() + 1)`` with NumPy or torch ids: an integer is an integer (as for Partition)."""
    kernel = GroupKernel(count, rank=np.int64(2), per_group_variance=True)
    assert kernel.num_groups == 5 and type(kernel.num_groups) is int and kernel.rank == 2
    assert kernel.var.shape == (5,) and kernel.covar_factor.shape == (5, 2)
    likelihood = GroupGaussianLikelihood(count)
    assert likelihood.num_groups == 5 and likelihood.noise.shape == (5,)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: GroupKernel(5.0), "num_groups must be a positive int"),
        (lambda: GroupKernel(True), "num_groups must be a positive int"),
        (lambda: GroupKernel(torch.tensor(5.0)), "num_groups must be a positive int"),
        (lambda: GroupKernel(np.int64(0)), "num_groups must be a positive int"),
        (lambda: GroupKernel(4, rank=1.0), r"rank must be an int in \[0, num_groups=4\]"),
        (lambda: GroupKernel(4, rank=np.int64(5)), r"rank must be an int in \[0, num_groups=4\]"),
        (lambda: GroupGaussianLikelihood(2.5), "num_groups must be a positive int"),
    ],
)
def test_counts_that_are_not_integers_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_float_ids_past_the_exact_integers_raise_instead_of_merging_groups():
    """In float32, ids 2^24 and 2^24 + 1 are one number: two groups would silently become one."""
    ids = torch.tensor([2**24 + 1, 2**24, 5])
    kernel = GroupKernel(2**25)
    with pytest.raises(ValueError, match=r"group ids of 16777216 or more in torch.float32.*float64"):
        kernel(ids.float().unsqueeze(-1)).to_dense()
    likelihood = GroupGaussianLikelihood(2**25)
    with pytest.raises(ValueError, match="group ids of 16777216 or more"):
        likelihood.set_train_inputs(ids.float())
    with pytest.raises(ValueError, match="not exact integers"):
        group_partition(ids.float())
    with pytest.raises(ValueError, match="not exact integers"):
        group_partition(torch.tensor([2048.0, 3.0], dtype=torch.float16))
    # the same ids in float64 are exact: three groups, and the kernel tells the first two apart
    covar = kernel(ids.double().unsqueeze(-1)).to_dense()
    torch.testing.assert_close(covar, kernel.var * torch.eye(3))
    assert group_partition(ids.double()).num_blocks == 3
    # below the limit float32 ids keep working
    small = GroupKernel(2**24)(torch.tensor([[2.0**24 - 1], [3.0], [2.0**24 - 1]]))
    assert small.to_dense()[0, 2] > 0 and small.to_dense()[0, 1] == 0
