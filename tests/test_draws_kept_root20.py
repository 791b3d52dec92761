"""Draws from a singular posterior at new inputs (more test points than groups, no noise) keep their root (trial
20): each ``rsample`` repeated the ``t x t`` eigendecomposition (1.4 s per draw at ``t = 2000``), where GPyTorch
keeps its root; now one per posterior, made without a graph."""

from __future__ import annotations

import gpytorch
import torch

from bma_gp import GroupKernel
from bma_gp.kernels import sum_prediction_strategy as sps
from gp_reference import GP

DTYPE = torch.float64


def _posterior(t=60):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 8, (200, 1), generator=g).to(DTYPE)
    y = torch.randn(8, generator=g, dtype=DTYPE)[x[:, 0].long()] + 0.2 * torch.randn(200, generator=g, dtype=DTYPE)
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), GroupKernel(9)).to(DTYPE).eval()
    xt = torch.randint(0, 9, (t, 1), generator=g).to(DTYPE)  # t > 9 levels: the covariance is singular
    return model, xt


def test_repeated_draws_decompose_once(monkeypatch):
    model, xt = _posterior()
    calls = []
    real = sps.symmetric_matrix_function
    monkeypatch.setattr(sps, "symmetric_matrix_function", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        post = model(xt)
        torch.manual_seed(0)
        first = post.rsample(torch.Size([2000]))
        more = [post.rsample(torch.Size([5])) for _ in range(3)]
    assert len(calls) == 1
    assert all(m.shape == (5, xt.shape[0]) for m in more)
    # the draws have the posterior's covariance, within sampling error
    centred = first - post.mean
    emp = centred.mT @ centred / first.shape[0]
    cov = post.covariance_matrix
    scale = cov.diagonal().sqrt()
    assert float(((emp - cov) / scale / scale.unsqueeze(-1)).abs().max()) < 0.2


def test_draws_with_gradients_decompose_each_time(monkeypatch):
    """A root with a graph is not kept (its graph is freed by the first backward pass)."""
    model, xt = _posterior(30)
    xt = xt.clone()
    calls = []
    real = sps.symmetric_matrix_function
    monkeypatch.setattr(sps, "symmetric_matrix_function", lambda *a, **k: calls.append(1) or real(*a, **k))
    with gpytorch.settings.detach_test_caches(False):
        post = model(xt)
        (post.rsample(torch.Size([3])).sum() + post.rsample(torch.Size([3])).sum()).backward()
    assert len(calls) == 2
    assert model.covar_module.raw_var.grad is not None
