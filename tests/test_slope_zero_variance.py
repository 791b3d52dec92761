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


def test_a_refused_slope_at_a_huge_variance_to_noise_ratio_says_why():
    """Groups of one point, variances 1e8 and noise 1e-8: the per-level blocks of the joint elimination lose precision
    and the (well-conditioned) sum can be refused as not positive definite (a known limit; whether it is depends on
    the LU's rounding); the error names the ratio and what brings it down, where it said only "check the block
    matrices and the diagonal"."""
    from bma_gp.block_mean_sum_linear_operator import _level_ratio_hint

    assert "1e+16 times the smallest diagonal entry" in _level_ratio_hint(torch.tensor([1e8]), torch.tensor([1e-8]))
    assert _level_ratio_hint(torch.tensor([1.0]), torch.tensor([0.1])) == ""
    g = torch.Generator().manual_seed(1)
    n = 20
    x = torch.stack([torch.randn(n, generator=g, dtype=DT), torch.arange(n, dtype=DT)], -1)
    kernel = GroupKernel(n, slope=True, active_dims=[1, 0]).to(DT)
    with torch.no_grad():
        kernel.var = torch.tensor([1e8, 1e8], dtype=DT)
    op = kernel(x).add_diagonal(torch.tensor(1e-8, dtype=DT))
    try:
        op.inv_quad_logdet(torch.randn(n, generator=g, dtype=DT), logdet=True)
    except ValueError as err:
        assert "times the smallest diagonal entry (the noise)" in str(err)
