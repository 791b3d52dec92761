"""Attacks on the session 30 workflow fixes (branch s30b): each test below failed on the code before its fix.

Models and data follow tests/test_session30_workflows.py; the reference is the dense float64 posterior."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning, GroupKernel, Partition
from closed_form_guard import closed_forms_only

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = 3


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _data(dtype=torch.float64, n: int = 48):
    """Columns: a smooth input, a group id (0..5, a singleton 6 and a non-contiguous 8), a task id, a crossed
    grouping; test sets with unseen ids (7, 10)."""
    gen = torch.Generator().manual_seed(3)
    x = 4 * torch.rand(n, 1, generator=gen, dtype=dtype)
    ids = torch.randint(0, 6, (n,), generator=gen)
    ids[0], ids[1] = 6, 8
    tasks = torch.randint(0, TASKS, (n,), generator=gen)
    second = torch.arange(n) % 4
    X = torch.stack([x[:, 0], ids.to(dtype), tasks.to(dtype), second.to(dtype)], -1)
    y = torch.sin(2 * x[:, 0]) + 0.3 * tasks.to(dtype) + 0.1 * torch.randn(n, generator=gen, dtype=dtype)
    new = torch.tensor([[0.5, 0, 0, 0], [1.5, 1, 1, 1], [2.5, 3, 2, 2], [3.0, 7, 1, 3], [0.2, 10, 0, 5]], dtype=dtype)
    return X, y, ids, new


def _partition(ids):
    return Partition.from_labels(torch.unique(ids, return_inverse=True)[1])


def _dense_posterior(model, X, y, new):
    """Mean and variance at ``new`` from the dense joint prior covariance of ``cat(X, new)``, by ``torch.linalg``."""
    model.eval()
    n = X.shape[0]
    with torch.no_grad():
        prior = model.forward(X)
        noise = model.likelihood(prior).lazy_covariance_matrix.to_dense() - prior.lazy_covariance_matrix.to_dense()
        joint = model.forward(torch.cat([X, new]))
        K = joint.lazy_covariance_matrix.to_dense()
        train, cross = K[:n, :n] + noise, K[n:, :n]
        mean = joint.mean[n:] + cross @ torch.linalg.solve(train, y - prior.mean)
        variance = K[n:, n:].diagonal() - (cross * torch.linalg.solve(train, cross.mT).mT).sum(-1)
    return mean, variance


# ------------------------------------------------------------------ a batch of test sets, a scaled block mean summand
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["scaled block mean + group", "block mean differs by one label"])
def test_batch_of_test_sets_with_a_scaled_block_mean_summand_times_task_kernel(kind, dtype):
    """``(ScaleKernel(BlockMeanKernel) + GroupKernel) * IndexKernel`` (the ScaleKernel inside the sum, not around it)
    asked for a batch of test sets whose ids differ across the batch: the covariance among the test points is a sum
    of two dense matrices (the block mean kernel's between new points, scaled, and the group kernel's at ids that
    differ), which the product with the task kernel's multiplied through roots of both factors: a jittered Cholesky,
    Lanczos past ``max_cholesky_size`` (variances 1e-8 off at 900 test points, silently). Its product is formed
    densely (as for a scaled dense factor alone), exactly; the same with the block mean kernel's blocks one label
    off the group ids (two partitions)."""
    X, y, ids, new = _data(torch.float64)
    blocks = ids.clone()
    if kind == "block mean differs by one label":
        blocks[5] = 9
    smooth = gpytorch.kernels.ScaleKernel(
        BlockMeanKernel(gpytorch.kernels.RBFKernel(active_dims=[0]), X, _partition(blocks))
    )
    task = gpytorch.kernels.IndexKernel(TASKS, rank=1, active_dims=[2])
    model = GP(X, y, gpytorch.likelihoods.GaussianLikelihood(), (smooth + GroupKernel(12, active_dims=[1])) * task)
    model = model.double()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):  # away from the defaults
            p.add_(0.1 + 0.05 * i)
    batch = torch.stack([new, new.flip(0)])
    wants = [_dense_posterior(model, X, y, batch[i]) for i in range(2)]
    model = model.to(dtype)
    model.train()
    model.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), closed_forms_only(X.shape[0]):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            pred = model(batch.to(dtype))
            mean, variance = pred.mean, pred.variance
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for i in range(2):
        torch.testing.assert_close(mean[i].double(), wants[i][0], rtol=rtol, atol=rtol / 10)
        torch.testing.assert_close(variance[i].double(), wants[i][1], rtol=10 * rtol, atol=rtol / 10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_of_test_sets_with_a_linear_summand_times_task_kernel(dtype):
    """``(GroupKernel + LinearKernel) * IndexKernel`` asked for a batch of test sets whose ids differ across the batch:
    among the new points the group kernel's covariance is dense and the linear kernel's a root, whose sum
    linear_operator formed by ``add_low_rank``, a root of the dense matrix (a jittered Cholesky, Lanczos past
    ``max_cholesky_size``: under ``max_cholesky_size(0)`` this model's prediction raised a ``LinAlgError`` on
    non-finite values, and on other data its variances were 54-86 % off, silently). The sum stays plain and its
    product with the task kernel's is formed densely, exactly."""
    X, y, _, new = _data(torch.float64)
    task = gpytorch.kernels.IndexKernel(TASKS, rank=1, active_dims=[2])
    groups = GroupKernel(12, active_dims=[1]) + GroupKernel(12, per_group_variance=True, active_dims=[1])
    kernel = (groups + gpytorch.kernels.LinearKernel(active_dims=[0])) * task
    model = GP(X, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):  # away from the defaults
            p.add_(0.1 + 0.05 * i)
    batch = torch.stack([new, new.flip(0)])
    wants = [_dense_posterior(model, X, y, batch[i]) for i in range(2)]
    model = model.to(dtype)
    model.train()
    model.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), closed_forms_only(X.shape[0]):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            pred = model(batch.to(dtype))
            mean, variance = pred.mean, pred.variance
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for i in range(2):
        torch.testing.assert_close(mean[i].double(), wants[i][0], rtol=rtol, atol=rtol / 10)
        torch.testing.assert_close(variance[i].double(), wants[i][1], rtol=10 * rtol, atol=rtol / 10)
