"""Gaps left by recent fixes.

* ``GroupGaussianLikelihood`` given its training groups as 1-D ids compared them with the model's inputs' column
  ``group_dim`` (default -1) even when no column was declared to hold the ids: a model whose last input column was a
  whole-number feature (rooms, 1 .. 5) was refused with "hold other group ids than the training inputs".
* ``ChunkedInducingPointKernel(chunk_rows=...)`` refused NumPy integers and one-element integer tensors, which
  ``kernel_block_mean(chunk_size=...)`` takes.
* ``kmeans_partition`` (and the builders' conversion of NumPy, list and string input) created tensors on torch's global
  default device instead of the inputs' (the CPU): under ``torch.set_default_device("meta")`` k-means failed with
  "Cannot copy out of meta tensor".
"""

from __future__ import annotations

import contextlib
import copy

import gpytorch
import numpy as np
import pytest
import torch

from bma_gp import GroupKernel
from bma_gp.kernels import ChunkedInducingPointKernel
from bma_gp.likelihoods import GroupGaussianLikelihood
from bma_gp.partition_builders import (
    group_partition,
    kdtree_partition,
    kmeans_objective,
    kmeans_partition,
    sorted_partition,
)

DTYPE = torch.float64
REFUSED = "hold other group ids than the training inputs given to the likelihood"


# ---------------------------------------------------------------------------- GroupGaussianLikelihood, 1-D ids
class _Smooth(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean = gpytorch.means.ConstantMean()
        self.cov = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.cov(x))


def _rooms(seed: int, n: int = 40):
    """The only input is a whole-number feature (rooms, 1 .. 5); the noise groups (0 .. 7) are no input column."""
    g = torch.Generator().manual_seed(seed)
    rooms = torch.randint(1, 6, (n, 1), generator=g).to(DTYPE)
    groups = torch.randint(0, 8, (n,), generator=g)
    y = torch.sin(rooms[:, 0]) + 0.1 * torch.randn(n, dtype=DTYPE, generator=g)
    return rooms, y, groups


def test_one_d_ids_with_a_whole_number_last_column_are_not_refused():
    rooms, y, groups = _rooms(0)
    likelihood = GroupGaussianLikelihood(8, train_inputs=groups).to(DTYPE)
    likelihood.noise = torch.linspace(0.05, 0.4, 8, dtype=DTYPE)
    model = _Smooth(rooms, y, likelihood).to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    loss = mll(model(rooms), y)  # raised "hold other group ids than the training inputs"
    torch.testing.assert_close(loss, mll(model(rooms), y, groups=groups), rtol=1e-12, atol=0)  # the working form
    # new training data, and the ids with it: trains on the new groups
    rooms2, y2, groups2 = _rooms(1)
    model.set_train_data(rooms2, y2, strict=False)
    likelihood.set_train_inputs(groups2)
    torch.testing.assert_close(mll(model(rooms2), y2), mll(model(rooms2), y2, groups=groups2), rtol=1e-12, atol=0)


def _grouped(seed: int, n: int = 40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (n,), generator=g)
    x = torch.stack([torch.randn(n, dtype=DTYPE, generator=g), ids.to(DTYPE)], -1)  # last column: the ids
    return x, torch.randn(n, dtype=DTYPE, generator=g), ids


class _Grouped(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.covar = GroupKernel(4, active_dims=[1])

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(torch.zeros_like(x[..., 0]), self.covar(x))


@pytest.mark.parametrize("group_dim", [{}, {"group_dim": -1}, {"group_dim": 1}], ids=["inferred", "-1", "1"])
def test_stale_one_d_ids_are_still_refused_where_the_column_holds_the_ids(group_dim):
    """The protection the 1-D id check was added for: after ``model.set_train_data`` with other groups the old ids
    are refused, with the column declared (``group_dim=``) or seen to hold the ids at an earlier call."""
    X, y, ids = _grouped(0)
    X2, y2, ids2 = _grouped(1)
    likelihood = GroupGaussianLikelihood(4, train_inputs=ids, **group_dim).to(DTYPE)
    model = _Grouped(X, y, likelihood).to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    mll(model(X), y)  # the column holds the stored ids
    model.set_train_data(X2, y2, strict=False)
    with pytest.raises(ValueError, match=REFUSED):
        mll(model(X2), y2)
    likelihood.set_train_inputs(ids2)  # the documented fix
    torch.testing.assert_close(mll(model(X2), y2), mll(model(X2), y2, groups=ids2), rtol=1e-12, atol=0)
    # a copy keeps the check (the column it learned holds the ids)
    copied = copy.deepcopy(model)
    copied.set_train_data(X, y, strict=False)
    with pytest.raises(ValueError, match=REFUSED):
        gpytorch.mlls.ExactMarginalLogLikelihood(copied.likelihood, copied)(copied(X), y)


def test_declared_group_column_is_checked_from_the_first_call():
    X, y, ids = _grouped(0)
    X2, y2, _ = _grouped(1)
    likelihood = GroupGaussianLikelihood(4, group_dim=-1, train_inputs=ids).to(DTYPE)
    model = _Grouped(X2, y2, likelihood).to(DTYPE)  # other data than the ids from the start
    model.train()
    with pytest.raises(ValueError, match=REFUSED):
        gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(X2), y2)


def test_group_dim_none_is_the_default_and_bad_group_dim_is_refused():
    assert GroupGaussianLikelihood(3, group_dim=None).group_dim == -1
    assert GroupGaussianLikelihood(3).group_dim == -1
    for bad in (1.0, True, "1"):
        with pytest.raises(TypeError, match="group_dim must be an int"):
            GroupGaussianLikelihood(3, group_dim=bad)


def test_likelihood_from_an_older_pickle_keeps_comparing():
    """A likelihood unpickled from a version without the new attributes compares the column, as it did."""
    X, y, ids = _grouped(0)
    X2, y2, _ = _grouped(1)
    likelihood = GroupGaussianLikelihood(4, train_inputs=ids).to(DTYPE)
    del likelihood.noise_covar.__dict__["_group_dim_declared"], likelihood.noise_covar.__dict__["_ids_column_seen"]
    model = _Grouped(X2, y2, likelihood).to(DTYPE)
    model.train()
    with pytest.raises(ValueError, match=REFUSED):
        gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(X2), y2)


# ---------------------------------------------------------------------------- ChunkedInducingPointKernel(chunk_rows=)
def _chunked(chunk_rows):
    z = torch.linspace(0, 1, 6, dtype=DTYPE).unsqueeze(-1)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    return ChunkedInducingPointKernel(gpytorch.kernels.RBFKernel().to(DTYPE), z, likelihood, chunk_rows=chunk_rows)


@pytest.mark.parametrize(
    "value",
    [np.int64(8), np.int32(8), np.uint8(8), torch.tensor(8), torch.tensor([8]), torch.tensor(8, dtype=torch.int32)],
    ids=["np.int64", "np.int32", "np.uint8", "tensor", "tensor1", "tensor-int32"],
)
def test_chunk_rows_takes_any_integer(value):
    kernel = _chunked(value)  # raised TypeError
    assert kernel.chunk_rows == 8 and type(kernel.chunk_rows) is int
    x = torch.rand(30, 1, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    reference = _chunked(8)
    kernel.eval(), reference.eval()
    torch.testing.assert_close(kernel(x).to_dense(), reference(x).to_dense(), rtol=0, atol=0)
    assert copy.deepcopy(kernel).chunk_rows == 8


@pytest.mark.parametrize(
    "value", [True, np.True_, torch.tensor(True), 2.5, np.float64(8.0), torch.tensor(8.0), "8", torch.tensor([1, 2])]
)
def test_chunk_rows_refuses_non_integers(value):
    with pytest.raises(TypeError, match="chunk_rows must be a positive int or None, got"):
        _chunked(value)


@pytest.mark.parametrize("value", [0, -1, np.int64(0), torch.tensor(-3)])
def test_chunk_rows_refuses_numbers_below_one(value):
    with pytest.raises(ValueError, match=r"chunk_rows must be a positive int or None \(the default\)"):
        _chunked(value)


# ---------------------------------------------------------------------------- builders under another default device
@contextlib.contextmanager
def _default_device(device):
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None)


def _builder_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 2, dtype=DTYPE, generator=g)
    xi = torch.randint(0, 100, (60, 2), generator=g)
    twins = torch.zeros(10, 2, dtype=DTYPE)
    twins[0] = 1.0  # two distinct points for three clusters: the empty-cluster path
    ids = torch.arange(60) % 7
    return {
        "kmeans": lambda: kmeans_partition(x, 4, seed=0),
        "kmeans-subsample": lambda: kmeans_partition(x, 4, seed=3, sample_size=20),
        "kmeans-integers": lambda: kmeans_partition(xi, 4),
        "kmeans-numpy": lambda: kmeans_partition(x.numpy(), 4),
        "kmeans-list": lambda: kmeans_partition(x.tolist(), 4),
        "kmeans-duplicates": lambda: kmeans_partition(twins, 3),
        "kdtree-numpy": lambda: kdtree_partition(x.numpy(), 8),
        "sorted-numpy": lambda: sorted_partition(x.numpy(), 5),
        "group-numpy": lambda: group_partition(ids.numpy()),
        "group-list": lambda: group_partition([1, 5, 5, 2]),
        "group-strings": lambda: group_partition(["b", "a", "b", "c"]),
        "objective-numpy": lambda: kmeans_objective(x.numpy(), group_partition(ids)),
    }


@pytest.mark.parametrize("name", list(_builder_cases()))
def test_builders_follow_the_inputs_device_not_the_default(name):
    cases = _builder_cases()  # the inputs are built on the CPU default

    def warns():  # two distinct points for three clusters: "fewer than k distinct points"
        return pytest.warns(UserWarning) if name == "kmeans-duplicates" else contextlib.nullcontext()

    with warns():
        reference = cases[name]()
    with _default_device("meta"), warns():
        result = cases[name]()  # raised "Cannot copy out of meta tensor" or "x is on the meta device"
    if torch.is_tensor(reference):
        assert result.device.type == "cpu"
        torch.testing.assert_close(result, reference, rtol=0, atol=0)
    else:
        assert result.labels.device.type == "cpu"
        assert torch.equal(result.labels, reference.labels)


def test_meta_inputs_are_still_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="on the meta device"):
        kmeans_partition(torch.rand(10, 2, device="meta"), 2)


def test_partition_from_a_list_under_another_default_device_is_built_on_the_cpu():
    from bma_gp import Partition

    torch.set_default_device("meta")
    try:
        p = Partition.from_labels([0, 1, 1, 0])
        q = Partition.from_sizes([2, 3])
    finally:
        torch.set_default_device(None)  # not back to get_default_device() ("cpu"): that leaves a mode active
    assert p.device.type == "cpu" and p.sizes.tolist() == [2, 2]
    assert q.device.type == "cpu" and q.n == 5
