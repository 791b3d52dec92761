"""Posterior variances at new inputs of a correlated random slope with its covariate far from 0.

``GroupKernel(k, slope=True)`` holds a correlated slope as three diagonal terms with weights ``1``, ``x`` and
``1 + c x``. Its cross covariance against new inputs was ``(s00 + s01 x_t) P^T + (s01 + s11 x_t) P^T diag(x)``: exact,
but with ``Z_* = F G^+`` not the new points' own columns ``(1, x_t, 1 + c x_t)``, so the stable form
``K_** - Z_* (G - Sigma) Z_*^T`` subtracted ``Z_* G Z_*^T`` (1.5 ``K_**``) and added ``Z_* Sigma Z_*^T`` (half of
``K_**``) from the ill-conditioned per-level 3 x 3 blocks: with the covariate in calendar years the variances were
3.7x too large, with the covariate near 1e4 negative (clamped to 0), while ``model(train_x).variance`` was right.

The reference is a dense float64 solve. Both it and the closed form subtract the explained variance from ``K_**``
(about ``x^2 v_1``), so both round at about ``eps K_**``: the tolerance is ``1e-6`` relative plus
``64 eps K_**`` (2e-7 relative at calendar years, 6e-7 near 1e4 in these cases).
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import ClosedFormFallbackWarning
from closed_form_guard import closed_forms_only
from gp_reference import assert_gradients_like_dense, dense_copy, slope_model


@pytest.fixture(autouse=True)
def _no_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        yield


def _data(offset: float, dtype: torch.dtype, k: int = 6, per: int = 8, seed: int = 0):
    """``(x, y, xs)``: ``k`` levels of ``per`` rows (columns: covariate, id), the covariate ``offset`` plus integers
    0 .. 19; test rows: two training rows, seen levels at new covariates (inside and past the data) and an unseen
    level."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(k).repeat_interleave(per)
    cov = offset + torch.randint(0, 20, (k * per,), generator=g).to(torch.float64)
    y = torch.randn(k * per, generator=g, dtype=torch.float64)
    x = torch.stack([cov, ids.to(torch.float64)], -1)
    new = torch.tensor([[offset + 7.5, 1.0], [offset + 25.0, k - 1.0], [offset - 3.0, k - 2.0], [offset + 10.0, k]])
    xs = torch.cat([x[:2], new.to(torch.float64)])
    return x.to(dtype), y.to(dtype), xs.to(dtype)


def _model(x, y, corr: float, noise: float = 0.1):
    return slope_model(x, y, corr, noise)


def _dense(model, x, y, xs):
    """Mean, variance and prior variance at ``xs`` by a dense float64 solve, from the kernel's own ``S``."""
    S = model.covar_module.slope_covar.detach().to(torch.float64)
    noise = float(model.likelihood.noise.detach())
    x, y, xs = x.to(torch.float64), y.to(torch.float64), xs.to(torch.float64)

    def K(a, b):
        za = torch.stack([torch.ones_like(a[:, 0]), a[:, 0]], -1)
        zb = torch.stack([torch.ones_like(b[:, 0]), b[:, 0]], -1)
        return (za @ S @ zb.T) * (a[:, 1:2] == b[:, 1][None]).to(torch.float64)

    M = K(x, x) + noise * torch.eye(x.shape[0], dtype=torch.float64)
    Kxs = K(x, xs)
    prior = K(xs, xs).diagonal()
    return Kxs.T @ torch.linalg.solve(M, y), prior - (Kxs * torch.linalg.solve(M, Kxs)).sum(0), prior


def _closed(model, x, xs):
    model.eval()
    with torch.no_grad(), closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
        post = model(xs)
        return post.mean, post.variance


@pytest.mark.parametrize("corr", [-0.3, 0.3, 0.9])
@pytest.mark.parametrize("offset", [0.0, 2000.0, 1e4])
def test_variances_at_new_inputs_match_a_dense_solve(offset, corr):
    x, y, xs = _data(offset, torch.float64)
    model = _model(x, y, corr)
    mean, var = _closed(model, x, xs)
    want_mean, want_var, prior = _dense(model, x, y, xs)
    assert bool((var > 0).all())
    eps = torch.finfo(torch.float64).eps
    err = (var - want_var).abs()
    tol = 1e-6 * want_var + 64 * eps * prior
    assert bool((err <= tol).all()), (offset, corr, (err / want_var).tolist())
    # the unseen level: its prior variance
    torch.testing.assert_close(var[-1], prior[-1], rtol=1e-12, atol=0)
    # the means: the dense solve's own error grows with the same ratio K_** / variance (2.7e-5 of the largest mean
    # near 1e4, as before the change)
    ratio = float((eps * prior / want_var).max())
    torch.testing.assert_close(mean, want_mean, rtol=0, atol=(1e-8 + 200 * ratio) * float(want_mean.abs().max()))


def test_training_rows_as_new_inputs_agree_with_the_training_path():
    """The training rows predicted as new inputs (with one extra point) and through ``model(train_x)``."""
    x, y, _ = _data(2000.0, torch.float64)
    model = _model(x, y, 0.3)
    model.eval()
    xs = torch.cat([x, torch.tensor([[2010.0, 0.0]], dtype=x.dtype)])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
        at_train = model(x).variance
        at_new = model(xs).variance[:-1]
    _, want, prior = _dense(model, x, y, x)
    tol = 1e-6 * want + 64 * torch.finfo(torch.float64).eps * prior
    assert bool(((at_new - want).abs() <= tol).all())
    assert bool(((at_new - at_train).abs() <= tol).all())


def test_float32_covariate_offset_20():
    """float32 inputs, covariate offset 20 (K_** about 200): the prior variance, returned by the kernel in float32,
    rounds at ``eps_32 K_**`` (1e-3 of the variances, 2e-2 there), which bounds any float32 result; asked to
    ``1e-5`` relative plus ``2 eps_32 K_**`` (0.6 of that after the change, 1.3 before)."""
    x, y, xs = _data(20.0, torch.float32)
    model = _model(x, y, 0.3)
    _, var = _closed(model, x, xs)
    _, want, prior = _dense(model, x, y, xs)
    assert var.dtype == torch.float32
    assert bool((var > 0).all())
    tol = 1e-5 * want + 2 * torch.finfo(torch.float32).eps * prior
    assert bool(((var.to(torch.float64) - want).abs() <= tol).all()), ((var - want).abs() / want).tolist()


@pytest.mark.parametrize("corr", [0.3, 0.0])
def test_variance_gradients_match_dense_autograd(corr):
    """Gradients of ``variance.sum()`` at new inputs (seen and unseen levels) with respect to ``var``, ``corr`` and the
    noise, against GPyTorch's dense path on a copy; corr exactly 0 (the initial value) too."""
    x, y, xs = _data(2000.0, torch.float64, k=4, per=6)
    model = _model(x, y, corr, noise=0.3)
    ref = dense_copy(model)
    model.eval()
    ref.eval()
    with gpytorch.settings.detach_test_caches(False):
        with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
            model(xs).variance.sum().backward()
        with gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref(xs).variance.sum().backward()
    assert_gradients_like_dense(model, ref, rtol=1e-4, minimum=3)
    kernel = model.covar_module
    assert kernel.raw_var.grad is not None and kernel.raw_corr.grad is not None
    assert model.likelihood.noise_covar.raw_noise.grad is not None
