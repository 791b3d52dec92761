"""A batch of output scales around an unbatched kernel, at test inputs that broadcast against it.

A fully Bayesian model (``ScaleKernel(..., batch_shape=(S,))`` with S samples of the output scale) predicted at test
inputs ``(b, 1, q, d)`` (a batched acquisition function) multiplied the unbatched test-by-training covariance
``(b, 1, q, n)`` by the ``(S, 1, 1)`` scales densely: linear_operator's ``mul`` takes a tensor for a batch of constants
only when the batch shapes are equal. The prediction then left its closed form with a warning and formed the dense
``(b, S, q, n)`` cross covariance. The product is now the lazy constant multiple, and the predictions equal those at
``(b, S, q, d)`` (which were in closed form already) and those of the model without the batch."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import ClosedFormFallbackWarning, GroupKernel
from bma_gp.kernels import ChunkedInducingPointKernel

DTYPE = torch.float64
S, B, Q, N = 3, 2, 5, 60


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(N, 1, generator=generator), torch.randint(0, 4, (N, 1), generator=generator)], -1)
    ids = torch.randint(0, 6, (N, 1), generator=generator)
    return torch.cat([x, ids], -1).to(DTYPE), torch.randn(N, generator=generator, dtype=DTYPE)


def build(kind: str, batch: torch.Size, x, y) -> GP:
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch)
    if kind == "groups":
        kernel = gpytorch.kernels.ScaleKernel(
            GroupKernel(4, active_dims=[1]) + GroupKernel(6, active_dims=[2]), batch_shape=batch
        )
    else:
        smooth = ChunkedInducingPointKernel(
            gpytorch.kernels.RBFKernel(active_dims=[0]), x[:8, :1].clone(), likelihood, active_dims=[0]
        )
        kernel = gpytorch.kernels.ScaleKernel(smooth, batch_shape=batch) + GroupKernel(4, active_dims=[1])
    model = GP(x, y, likelihood, kernel).to(DTYPE)
    scales = torch.tensor([0.5, 1.3, 2.0], dtype=DTYPE)[: batch.numel() or 1].reshape(*batch, *([] if batch else [1]))
    noises = torch.tensor([0.1, 0.3, 0.2], dtype=DTYPE)[: batch.numel() or 1].reshape(*batch, 1)
    scale_kernel = model.covar_module if kind == "groups" else model.covar_module.kernels[0]
    scale_kernel.outputscale = scales if batch else scales.squeeze()
    model.likelihood.noise = noises if batch else noises.squeeze(-1)
    return model.eval()


@pytest.mark.parametrize("kind", ["groups", "inducing_plus_groups"])
def test_batch_of_output_scales_predicts_in_closed_form_at_broadcast_test_inputs(kind):
    x, y = data()
    model = build(kind, torch.Size([S]), x, y)
    xt = x[:Q]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        broadcast = model(xt.expand(B, 1, Q, 3))
        mean, variance, covariance = broadcast.mean, broadcast.variance, broadcast.covariance_matrix
        full = model(xt.expand(B, S, Q, 3))
    assert mean.shape == (B, S, Q) and covariance.shape == (B, S, Q, Q)
    torch.testing.assert_close(mean, full.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(variance, full.variance, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(covariance, full.covariance_matrix, rtol=1e-10, atol=1e-10)
    # each sample equals the model without a batch, built with that sample's values (to the conditioning of these
    # small group models: the unbatched and the batched closed forms differ by up to 3e-9 before this change too)
    for s in range(S):
        single = build(kind, torch.Size([]), x, y)
        scale_kernel = single.covar_module if kind == "groups" else single.covar_module.kernels[0]
        scale_kernel.outputscale = [0.5, 1.3, 2.0][s]
        single.likelihood.noise = [0.1, 0.3, 0.2][s]
        with torch.no_grad():
            reference = single(xt)
        for b in range(B):
            torch.testing.assert_close(mean[b, s], reference.mean, rtol=1e-7, atol=1e-7)
            torch.testing.assert_close(covariance[b, s], reference.covariance_matrix, rtol=1e-7, atol=1e-7)
