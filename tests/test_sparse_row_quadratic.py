"""The predictive variance's quadratic form over sparse rows (kernels.sum_prediction_strategy._row_quadratic).

The diagonal of ``F W F^T`` at new inputs is ``diag(U C U^T)`` over row chunks ``U = [V, F_r]``; with crossed
groupings most of ``U`` is zero (a test row's one-hot group columns and its grouping's sparse table row), and on CPU
such a chunk enters as a CSR matrix. These tests compare it with the GEMM, check which path each case takes, and
check the predictive variances of the crossed-grouping and slope models whose diagonal takes the row chunks against
GPyTorch's dense computation with the CSR path forced.
"""

from __future__ import annotations

import pytest
import torch

import bma_gp.kernels.sum_prediction_strategy as sps
from test_mixed_posterior import reference
from test_mixed_prediction import build, closed_form, random_new_inputs

pytestmark = pytest.mark.filterwarnings("ignore:The input matches the stored training data")


def _spy(monkeypatch):
    """Count the CSR conversions the quadratic form makes."""
    calls = []
    original = torch.Tensor.to_sparse_csr

    def counted(self, *args, **kwargs):
        calls.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to_sparse_csr", counted)
    return calls


def _sparse_rows(c: int, width: int, per_row: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.zeros(c, width, dtype=dtype)
    cols = torch.stack([torch.randperm(width, generator=g)[:per_row] for _ in range(c)])
    U.scatter_(1, cols, torch.randn(c, per_row, generator=g, dtype=torch.float64).to(dtype))
    return U


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_sparse_rows_equal_the_gemm_and_dense_rows_keep_it(monkeypatch, dtype):
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(1)
    width = 200
    A = torch.randn(width, width, generator=g, dtype=torch.float64).to(dtype)
    core = A + A.mT
    sparse = _sparse_rows(50, width, 4, dtype)  # 2 % nonzero
    got = sps._row_quadratic(sparse, core)
    expected = ((sparse.double() @ core.double()) * sparse.double()).sum(-1)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got.double(), expected, **tol)
    assert len(calls) == 1
    dense = _sparse_rows(50, width, 40, dtype)  # 20 % nonzero: the GEMM
    torch.testing.assert_close(
        sps._row_quadratic(dense, core).double(), ((dense.double() @ core.double()) * dense.double()).sum(-1), **tol
    )
    assert len(calls) == 1


def test_gradients_and_batches_take_the_gemm(monkeypatch):
    """A chunk that needs a gradient, or has a batch dimension, goes through the GEMM (the CSR product is 2-D and
    keeps no graph here); the gradient is the dense one."""
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(2)
    U = _sparse_rows(30, 120, 2, torch.float64).requires_grad_(True)
    A = torch.randn(120, 120, generator=g, dtype=torch.float64)
    core = (A + A.mT).requires_grad_(True)
    sps._row_quadratic(U, core).sum().backward()
    assert calls == []
    torch.testing.assert_close(U.grad, (U @ (core + core.mT)).detach())
    batched = torch.stack([U.detach(), 2 * U.detach()])
    with torch.no_grad():
        out = sps._row_quadratic(batched, core)
    assert calls == []
    torch.testing.assert_close(out[1], 4 * out[0])


@pytest.mark.parametrize(
    "case", ["crossed", "crossed_per_group", "crossed_fixed_noise", "crossed_group_noise", "slope_only"]
)
def test_predictive_variance_with_csr_rows_matches_gpytorch(case, monkeypatch):
    """Every row chunk as CSR (density threshold 1), chunks of a few rows: the predictive variances equal
    GPyTorch's dense ones. (The level-by-level form takes these models first: tests/test_level_quadratic.py; here
    the row chunks it falls back to.)"""
    monkeypatch.setattr(sps._Structured, "_one_hot_rest_quadratic", lambda self: None)
    monkeypatch.setattr(sps, "SPARSE_ROWS_DENSITY", 1.0)
    monkeypatch.setattr(sps, "_DIAG_CHUNK", 64)
    calls = _spy(monkeypatch)
    model, x, y = build(case)
    model.eval()
    xt = random_new_inputs(120)
    _, (mean, _, diag, variance), _ = closed_form(model, xt, False)
    assert len(calls) > 1
    ref_mean, ref_cov = reference(model, xt)
    torch.testing.assert_close(diag, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(variance, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)
