"""Group labels as a mixed-effects user brings them from real data (numpy, pandas, polars' unsigned codes, ids in a
column of x): the kernel, the likelihood and the partitions take them exactly or refuse them in words, and the values
match an explicit indicator matrix in training and at new levels."""

from __future__ import annotations

import warnings

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


# ---------------------------------------------------------------------------- pandas columns of a filtered frame
def filtered_frame():
    """A frame after a row filter (its index has gaps, as every training subset's has)."""
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"a": [1.0, 2, 3, 4, 5, 6], "b": [6.0, 5, 4, 3, 2, 1], "g": [2, 9, 0, 1, 1, 2]})
    return frame[frame.g != 9]


def test_partition_from_a_filtered_pandas_column():
    """``Partition.from_labels(frame["g"])`` and ``from_sizes`` of a filtered frame's column: torch reads a Series as
    a sequence by index label, so the missing label 1 gave "could not convert it (1)"; read by position now."""
    from bma_gp import Partition

    frame = filtered_frame()
    partition = Partition.from_labels(frame["g"])
    assert partition.labels.tolist() == [2, 0, 1, 1, 2]
    assert Partition.from_sizes(frame["g"] + 1).sizes.tolist() == [3, 1, 2, 2, 3]


def test_partition_builders_take_a_filtered_frame():
    """The builders' points from a filtered pandas frame or column: a ``KeyError`` (``sorted_partition``) or "could
    not determine the shape of object type 'DataFrame'" (``kmeans_partition``, ``kdtree_partition``) before."""
    from bma_gp.partition_builders import kdtree_partition, kmeans_partition, sorted_partition

    frame = filtered_frame()
    assert sorted_partition(frame["a"], 2).labels.tolist() == [0, 0, 0, 1, 1]
    points = torch.tensor(frame[["a", "b"]].to_numpy())
    assert kdtree_partition(frame[["a", "b"]], 3) == kdtree_partition(points, 3)
    assert kmeans_partition(frame[["a", "b"]], 2, seed=0) == kmeans_partition(points, 2, seed=0)


def test_group_likelihood_takes_a_filtered_pandas_column_as_groups():
    """``likelihood(f, groups=frame["g"])`` for a filtered frame raised "groups must hold integer group ids", which
    they were: each point gets its own group's noise now."""
    frame = filtered_frame()
    likelihood = GroupGaussianLikelihood(3).to(DTYPE)
    likelihood.noise = torch.tensor([0.1, 0.2, 0.3], dtype=DTYPE)
    f = gpytorch.distributions.MultivariateNormal(torch.zeros(5, dtype=DTYPE), torch.eye(5, dtype=DTYPE))
    with torch.no_grad():
        variance = likelihood(f, groups=frame["g"]).variance
    torch.testing.assert_close(variance, 1 + torch.tensor([0.3, 0.1, 0.2, 0.2, 0.3], dtype=DTYPE))


# ---------------------------------------------------------------------------- ids a float column cannot hold
def test_ids_past_float_precision_are_refused_with_advice_that_applies():
    """Ids of ``2^24`` or more in float32 inputs (``2^53`` in float64) would merge neighbouring groups: refused. The
    message told float64 inputs to be passed "in float64"; it now offers float64 only to narrower dtypes."""
    with pytest.raises(ValueError, match=r"16777216 or more in torch\.float32.*pass the inputs in float64, or relabel"):
        GroupKernel(2**25)(torch.tensor([[2.0**24], [2.0**24 + 2]])).to_dense()
    wide = torch.tensor([[2.0**53], [2.0**53 + 2]], dtype=DTYPE)
    with pytest.raises(ValueError, match=r"or more in torch\.float64.*would merge; relabel the ids") as info:
        GroupKernel(2**54)(wide).to_dense()
    assert "in float64, or" not in str(info.value)


# ---------------------------------------------------------------------------- test ids equal to the training ids
class _ZeroMeanGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar):
        super().__init__(x, y, likelihood)
        self.covar_module = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(torch.zeros_like(x[..., 0]), self.covar_module(x))


@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("per_group_variance", [False, True])
def test_test_ids_equal_to_the_training_ids_in_one_grouping_stay_closed_form(combine, per_group_variance):
    """Crossed groupings where the test rows hold the training rows' ids in one column (as many, in the same order:
    the training schools at another district, a counterfactual) and other ids in the other: that ``GroupKernel``
    returned its training form for the cross covariance (the same matrix), which the sum's and the product's
    prediction did not recognise (a ``ClosedFormFallbackWarning`` and a dense ``t x n`` cross covariance). Values
    against the explicit indicator matrices, with no warning."""
    g1, g2 = torch.tensor([0, 1, 2, 1, 3, 0]), torch.tensor([0, 0, 1, 1, 2, 2])
    new2 = torch.tensor([1, 0, 0, 2, 4, 1])  # level 4 is new
    x = torch.stack([g1, g2], -1).to(DTYPE)
    x_new = torch.stack([g1, new2], -1).to(DTYPE)
    first = GroupKernel(4, active_dims=[0], per_group_variance=per_group_variance).to(DTYPE)
    second = GroupKernel(5, active_dims=[1]).to(DTYPE)
    first.var = torch.tensor([0.7, 1.1, 1.3, 0.9], dtype=DTYPE) if per_group_variance else 0.9
    second.var = 0.6
    v1 = first.var.detach().expand(4)

    def covar(a, b):
        one = v1[a[:, 0].long()][:, None] * indicator(a[:, 0], b[:, 0])
        two = 0.6 * indicator(a[:, 1], b[:, 1])
        return one + two if combine == "sum" else one * two

    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    likelihood.noise = 0.2
    y = torch.linspace(-1, 1, 6, dtype=DTYPE)
    model = _ZeroMeanGP(x, y, likelihood, first + second if combine == "sum" else first * second).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            f = model(x_new)
            mean, cov = f.mean, f.covariance_matrix
    K = covar(x, x) + likelihood.noise.detach() * torch.eye(6, dtype=DTYPE)
    cross = covar(x_new, x)
    torch.testing.assert_close(mean, cross @ torch.linalg.solve(K, y))
    torch.testing.assert_close(cov, covar(x_new, x_new) - cross @ torch.linalg.solve(K, cross.T))


def test_group_likelihood_takes_an_n_by_1_column_of_groups():
    """``groups=frame[["g"]].to_numpy()``, an ``(n, 1)`` column (``group_partition`` takes one), was read as ``n``
    batch entries of one point: "the group ids hold 1 points but the distribution has 5". A column of ``n`` ids for
    a distribution of ``n > 1`` points is the ids."""
    likelihood = GroupGaussianLikelihood(4).to(DTYPE)
    likelihood.noise = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DTYPE)
    f = gpytorch.distributions.MultivariateNormal(torch.zeros(5, dtype=DTYPE), torch.eye(5, dtype=DTYPE))
    with torch.no_grad():
        variance = likelihood(f, groups=np.array([[3], [1], [3], [0], [2]])).variance
    assert variance.shape == (5,)
    torch.testing.assert_close(variance, 1 + torch.tensor([0.4, 0.2, 0.4, 0.1, 0.3], dtype=DTYPE))


def test_an_id_equal_to_num_groups_gets_the_new_level_advice():
    kernel = GroupKernel(num_groups=5)
    train = torch.tensor([[0.0], [1.0], [4.0]])
    with pytest.raises(ValueError, match=r"holds 5\.0.*\[0, 5\).*not seen in training.*num_groups = levels seen \+ 1"):
        kernel(train, torch.tensor([[5.0]])).to_dense()
    with pytest.raises(ValueError, match=r"holds 7\.0") as info:  # further out: no advice about a spare id
        kernel(train, torch.tensor([[7.0]])).to_dense()
    assert "not seen in training" not in str(info.value)
