"""Audit: precision of ``GroupKernel(slope=True)`` and of the command's date columns, and the command's outputs."""

import pytest
import torch

from bma_gp import GroupKernel


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _slope_reference(S: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``[g = g'] [1, x] S [1, x']^T`` densely, in float64."""
    f1 = torch.stack([torch.ones_like(x1[:, 1]), x1[:, 1]], -1)
    f2 = torch.stack([torch.ones_like(x2[:, 1]), x2[:, 1]], -1)
    return (f1 @ S @ f2.T) * (x1[:, :1] == x2[:, 0]).to(S.dtype)


def test_group_slope_float64_covariate_with_float32_parameters_is_not_rounded():
    """A float64 covariate follows GPyTorch's promotion (LinearKernel / RBFKernel return float64 there): the
    covariance is float64 and equals the dense float64 reference; before, the covariate was rounded to float32, so
    covariates 1e-9 apart (one float32 number) gave equal variances."""
    kernel = GroupKernel(3, slope=True)  # float32 parameters
    kernel.var = torch.tensor([0.5, 2.0])
    kernel.corr = 0.3
    ids = torch.tensor([0.0, 0.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    cov = torch.tensor([1.0, 1.0 + 1e-9, 3.0, 1.0 / 3.0, 7.123456789], dtype=torch.float64) * 1000
    x = torch.stack([ids, cov], -1)
    xt = torch.tensor([[0.0, 1000.0 + 1e-6], [1.0, 2.5], [2.0, -4.0]], dtype=torch.float64)
    S = kernel.slope_covar.detach().double()  # float32 values, exactly in float64
    with torch.no_grad():
        train, cross, diag = kernel(x).to_dense(), kernel(xt, x).to_dense(), kernel(x, diag=True)
    for value in (train, cross, diag):
        assert value.dtype == torch.float64
    torch.testing.assert_close(train, _slope_reference(S, x, x), rtol=1e-12, atol=0)
    torch.testing.assert_close(cross, _slope_reference(S, xt, x), rtol=1e-12, atol=0)
    torch.testing.assert_close(diag, _slope_reference(S, x, x).diagonal(), rtol=1e-12, atol=0)
    assert train[0, 0] != train[1, 1]  # the two covariates 1e-9 apart stay apart
    # integer inputs and float32 covariates keep the parameters' dtype
    assert kernel(x.float()).to_dense().dtype == torch.float32
    assert kernel(torch.tensor([[0, 1], [1, 2]])).to_dense().dtype == torch.float32
