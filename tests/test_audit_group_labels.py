"""Group labels as a mixed-effects user brings them from real data (numpy, pandas, polars' unsigned codes, ids in a
column of x): the kernel, the likelihood and the partitions take them exactly or refuse them in words, and the values
match an explicit indicator matrix in training and at new levels."""

from __future__ import annotations

import gpytorch
import numpy as np
import pytest
import torch

from bma_gp import GroupGaussianLikelihood, GroupKernel
from bma_gp.kernels.group_kernel import check_group_ids

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64
IDS = [3, 1, 3, 0, 2]


def indicator(a, b) -> torch.Tensor:
    """The explicit ``[a_i == b_j]`` matrix."""
    a, b = torch.as_tensor(a).long(), torch.as_tensor(b).long()
    return (a[:, None] == b[None, :]).to(DTYPE)


# ---------------------------------------------------------------------------- unsigned integer ids
UNSIGNED = [getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)]


@pytest.mark.parametrize("dtype", UNSIGNED, ids=str)
def test_group_kernel_takes_unsigned_ids(dtype):
    """uint16 / uint32 / uint64 ids (polars' category codes are UInt32) raised torch's NotImplementedError
    ("lt_cpu" not implemented for 'UInt32') from the range check: compared as int64 now, with the values of int64
    ids."""
    kernel = GroupKernel(5).to(DTYPE)
    kernel.var = 1.5
    train, test = torch.tensor(IDS).to(dtype)[:, None], torch.tensor([3, 4, 0]).to(dtype)[:, None]
    with torch.no_grad():
        torch.testing.assert_close(kernel(train).to_dense(), 1.5 * indicator(IDS, IDS))
        torch.testing.assert_close(kernel(test, train).to_dense(), 1.5 * indicator([3, 4, 0], IDS))
        torch.testing.assert_close(kernel(train, diag=True), torch.full((5,), 1.5, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"holds 7, which is not an integer group id in \[0, 5\)"):
        kernel(torch.tensor([1, 7]).to(dtype)[:, None]).to_dense()


def test_uint64_ids_from_two_to_the_63_are_refused_in_words():
    """A uint64 id of ``2^63`` or more wraps to a negative int64: refused as out of range, not read as another id."""
    ids = torch.tensor([2**63 + 1, 1], dtype=torch.uint64)
    with pytest.raises(ValueError, match=r"2\^63 or more, which is not an integer group id in \[0, 5\)"):
        check_group_ids(ids, 5)


def test_group_likelihood_takes_unsigned_numpy_groups():
    """``likelihood(f, groups=codes)`` with numpy's uint32 codes: the noise of each point's group."""
    likelihood = GroupGaussianLikelihood(4).to(DTYPE)
    likelihood.noise = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DTYPE)
    f = gpytorch.distributions.MultivariateNormal(torch.zeros(5, dtype=DTYPE), torch.eye(5, dtype=DTYPE))
    groups = np.array([3, 1, 3, 0, 2], dtype=np.uint32)
    with torch.no_grad():
        variance = likelihood(f, groups=groups).variance
    torch.testing.assert_close(variance, 1 + torch.tensor([0.4, 0.2, 0.4, 0.1, 0.3], dtype=DTYPE))
