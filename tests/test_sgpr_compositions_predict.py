"""Sums and products of inducing-point kernels without a grouping (an additive SGPR, ``ChunkedInducingPointKernel(a)
+ ChunkedInducingPointKernel(b)``; a multitask SGPR, ``ChunkedInducingPointKernel * IndexKernel``) predicted through
GPyTorch's default strategy: under ``fast_pred_var`` it formed the closed-form training covariance's inverse root as
an ``n x n`` matrix (1.3 GB at n = 5,000; killed at 50,000), or took Lanczos of linear_operator's Woodbury operator
(silently), and a float32 multitask model factorised its capacitance in float32 (variances 45-500x off). They now take
the package's prediction strategy and closed forms, as with a grouping among the summands."""

from __future__ import annotations

import gpytorch
import pytest
import torch

from bma_gp import ChunkedInducingPointKernel
from bma_gp.kernels.sum_prediction_strategy import SumPredictionStrategy


def _model(kind: str, n: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.rand(n, 2, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n, 1), generator=gen).double()], -1
    )
    y = (
        torch.sin(6 * x[:, 0]) * (1 + x[:, 2])
        + torch.cos(4 * x[:, 1])
        + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    )
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    Z = torch.rand(20, 2, generator=gen, dtype=torch.float64)
    if kind == "additive":
        covar = ChunkedInducingPointKernel(
            gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), Z[:12, :1].clone(), likelihood, active_dims=[0]
        ) + ChunkedInducingPointKernel(
            gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), Z[:10, 1:].clone(), likelihood, active_dims=[1]
        )
    else:
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2))
        covar = ChunkedInducingPointKernel(
            base, Z.clone(), likelihood, active_dims=[0, 1]
        ) * gpytorch.kernels.IndexKernel(num_tasks=3, rank=1, active_dims=[2])

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x.to(dtype), y.to(dtype), likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = covar

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = GP().to(dtype)
    likelihood.noise = 0.01
    test = torch.cat(
        [torch.rand(50, 2, generator=gen, dtype=torch.float64), torch.randint(0, 3, (50, 1), generator=gen).double()],
        -1,
    )
    return model.eval(), x.to(dtype), y.to(dtype), test.to(dtype)


def _dense_prediction(model, x, y, test):
    covar, likelihood = model.covar_module, model.likelihood
    with torch.no_grad():
        K = covar(x).to_dense() + likelihood.noise * torch.eye(len(y), dtype=y.dtype)
        cross, kk = covar(test, x).to_dense(), covar(test).to_dense()
        mean = model.mean_module(test) + cross @ torch.linalg.solve(K, y - model.mean_module(x))
        var = (kk - cross @ torch.linalg.solve(K, cross.mT)).diagonal()
    return mean, var


@pytest.mark.parametrize("kind", ["additive", "multitask"])
@pytest.mark.parametrize("fast", [False, True])
def test_predictions_in_closed_form(kind, fast):
    from closed_form_guard import closed_forms_only

    model, x, y, test = _model(kind, 300)
    expected_mean, expected_var = _dense_prediction(model, x, y, test)
    with torch.no_grad(), gpytorch.settings.fast_pred_var(fast), gpytorch.settings.max_cholesky_size(0):
        with closed_forms_only(len(y)):
            pred = model(test)
            mean, var = pred.mean, pred.variance
    assert isinstance(model.prediction_strategy, SumPredictionStrategy)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(var, expected_var, rtol=1e-6, atol=1e-8)
