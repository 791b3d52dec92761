"""Attacks on the session 30 workflow fixes (branch s30b): each test below failed on the code before its fix.

Models, data and the dense float64 posterior are tests/test_session30_workflows.py's."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning, GroupKernel
from closed_form_guard import closed_forms_only
from test_session30_workflows import GP, TASKS, _data, _dense_posterior, _partition

pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_batch_predictions(model, X, y, batch, dtype):
    """``model`` (float64, moved off its defaults) predicts the batch of test sets ``batch`` in ``dtype`` as the dense
    float64 posterior does, in closed form (no CG, no Lanczos, under ``max_cholesky_size(0)``) and without a fallback
    warning."""
    wants = [_dense_posterior(model, X, y, batch[i]) for i in range(batch.shape[0])]
    model = model.to(dtype)
    model.train()
    model.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), closed_forms_only(X.shape[0]):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            pred = model(batch.to(dtype))
            mean, variance = pred.mean, pred.variance
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for i, (want_mean, want_variance) in enumerate(wants):
        torch.testing.assert_close(mean[i].double(), want_mean, rtol=rtol, atol=rtol / 10)
        torch.testing.assert_close(variance[i].double(), want_variance, rtol=10 * rtol, atol=rtol / 10)


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
    X, y, ids, new, _ = _data(torch.float64)
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
    _assert_batch_predictions(model, X, y, torch.stack([new, new.flip(0)]), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_of_test_sets_with_a_linear_summand_times_task_kernel(dtype):
    """``(GroupKernel + LinearKernel) * IndexKernel`` asked for a batch of test sets whose ids differ across the batch:
    among the new points the group kernel's covariance is dense and the linear kernel's a root, whose sum
    linear_operator formed by ``add_low_rank``, a root of the dense matrix (a jittered Cholesky, Lanczos past
    ``max_cholesky_size``: under ``max_cholesky_size(0)`` this model's prediction raised a ``LinAlgError`` on
    non-finite values, and on other data its variances were 54-86 % off, silently). The sum stays plain and its
    product with the task kernel's is formed densely, exactly."""
    X, y, _, new, _ = _data(torch.float64)
    task = gpytorch.kernels.IndexKernel(TASKS, rank=1, active_dims=[2])
    groups = GroupKernel(12, active_dims=[1]) + GroupKernel(12, per_group_variance=True, active_dims=[1])
    kernel = (groups + gpytorch.kernels.LinearKernel(active_dims=[0])) * task
    model = GP(X, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):  # away from the defaults
            p.add_(0.1 + 0.05 * i)
    _assert_batch_predictions(model, X, y, torch.stack([new, new.flip(0)]), dtype)
