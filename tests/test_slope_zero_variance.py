"""A correlated random slope (``GroupKernel(k, slope=True)``) whose intercept or slope variance reaches exactly 0 (the
softplus of a raw value below about -745, where L-BFGS drives an unneeded slope on a poorly scaled covariate, as
sleepstudy's days in calendar years) gave NaN in the kernel: the third term's constant ``c = sqrt(s11 / s00)`` was 0
or inf and its coefficient ``s01 / c`` 0 / 0. Any ``c != 0`` is exact, and ``s01 = 0`` there."""

from __future__ import annotations

import gpytorch
import pytest
import torch

from bma_gp import GroupKernel

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
N, K = 60, 6


@pytest.mark.parametrize("which", [0, 1], ids=["intercept_variance_0", "slope_variance_0"])
def test_a_correlated_slope_with_a_zero_variance_matches_dense(which):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, K, (N,), generator=g)
    x = torch.randn(N, generator=g, dtype=DT)
    y = torch.randn(N, generator=g, dtype=DT)
    kernel = GroupKernel(K, slope=True, active_dims=[1, 0]).to(DT)
    with torch.no_grad():
        kernel.raw_var[which] = -2000.0  # softplus: exactly 0
        kernel.raw_corr.fill_(-1.0)
    assert kernel.var[which].item() == 0.0
    loss = gpytorch.distributions.MultivariateNormal(
        torch.zeros(N, dtype=DT), kernel(torch.stack([x, ids.to(DT)], -1)).add_diagonal(torch.tensor(0.5, dtype=DT))
    ).log_prob(y)
    S = kernel.slope_covar.detach()
    Z = torch.nn.functional.one_hot(ids, K).to(DT)
    Z = torch.cat([Z, Z * x[:, None]], -1)
    dense = Z @ torch.kron(S, torch.eye(K, dtype=DT)) @ Z.T + 0.5 * torch.eye(N, dtype=DT)
    torch.testing.assert_close(
        loss.detach(), torch.distributions.MultivariateNormal(torch.zeros(N, dtype=DT), dense).log_prob(y)
    )
    loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in kernel.parameters() if p.grad is not None)
