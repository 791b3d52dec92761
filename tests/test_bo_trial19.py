"""Monte Carlo acquisition with two equal candidates in a q-batch (a batched optimiser of qEI moves candidates
together): the joint posterior covariance is singular, its Cholesky fails and the draw's root is the symmetric
square root of one eigendecomposition. Its square root had an infinite derivative at the zero eigenvalue, so the
gradient with respect to the candidates was NaN for the whole batch entry (and Adam then made the candidates NaN
for good); GPyTorch's dense path adds jitter and gives finite gradients. The root now treats eigenvalues that are 0
within rounding as 0 with derivative 0."""

from __future__ import annotations

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, GroupKernel, Partition
from gp_reference import GP

DTYPE = torch.float64


def model(kind: str) -> GP:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(40, 2, generator=generator, dtype=DTYPE)
    ids = (torch.arange(40) % 5).to(DTYPE).unsqueeze(-1)
    X = torch.cat([x, ids], -1)
    y = torch.sin(4 * x[:, 0]) + 0.3 * ids[:, 0] + 0.05 * torch.randn(40, generator=generator, dtype=DTYPE)
    cell = (x[:, 0] * 3).floor().clamp(max=2) * 3 + (x[:, 1] * 3).floor().clamp(max=2)
    labels = torch.unique(cell, return_inverse=True)[1]
    smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2, active_dims=[0, 1]))
    kernel = BlockMeanKernel(smooth, X, Partition.from_labels(labels))
    if kind == "plus groups":
        kernel = kernel + GroupKernel(6, active_dims=[2])
        likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=torch.full((40,), 0.02, dtype=DTYPE))
    else:
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
    out = GP(X, y, likelihood, kernel).to(DTYPE)
    return out.eval()


@pytest.mark.parametrize("kind", ["block mean", "plus groups"])
@pytest.mark.parametrize("gap", [0.0, 1e-9])
def test_draws_at_equal_candidates_have_finite_gradients(kind, gap):
    gp = model(kind)
    base = torch.randn(4, 1, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    X = torch.tensor([[[0.3, 0.6, 0.0], [0.3 + gap, 0.6, 0.0]]], dtype=DTYPE).requires_grad_(True)
    draws = gp(X).rsample(torch.Size([4]), base_samples=base)
    assert torch.isfinite(draws).all()
    draws.amax(-1).mean().backward()
    assert X.grad is not None and torch.isfinite(X.grad).all(), X.grad
    assert X.grad[..., :2].abs().sum() > 0  # the draws do depend on the candidates
