"""Mixed-effects models as a statsmodels / lme4 user builds them: GroupKernel, GroupGaussianLikelihood, their
arguments and inputs, against dense references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bma_gp import GroupGaussianLikelihood, GroupKernel

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
