"""Posterior variances of closed-form sums at new inputs keep the accuracy of a dense Cholesky (trial 19).

A random slope (``GroupKernel(k, slope=True)``, a sum of terms) with its covariate in raw units, crossed random
intercepts with a tiny noise, and two intercepts with a huge variance: the closed form subtracted
:math:`F W F^\\top` with :math:`W = A - A C^{-1} G A`, whose cancellation (size :math:`|G A G|`) lost every digit of
the variances (-70 % at calendar years, 500x at a covariate near 1e4, 0 against 1.4e-9). The stable form subtracts
:math:`Z_* (G - \\Sigma) Z_*^\\top` with :math:`\\Sigma = C^{-1} G`, which rounds at the size of the prior.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import ClosedFormFallbackWarning, GroupKernel
from closed_form_guard import closed_forms_only
from gp_reference import GP, assert_gradients_like_dense, dense_copy

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _no_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        yield


def _closed(model, xs, n):
    with closed_forms_only(n), gpytorch.settings.max_cholesky_size(0):
        return model(xs)


def _dense(ref, xs):
    with gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref(xs)


def _slope_model(scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    k, per = 10, 20
    ids = torch.arange(k).repeat_interleave(per)
    year = (2000 + torch.randint(0, 20, (k * per,), generator=g)).to(DTYPE) * scale
    y = torch.randn(k * per, generator=g, dtype=DTYPE)
    x = torch.stack([year, ids.to(DTYPE)], -1)
    torch.manual_seed(0)
    kernel = GroupKernel(k + 1, slope=True, active_dims=[1, 0])
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).to(DTYPE)
    # three training rows, a seen level at a new covariate, an unseen level
    xs = torch.cat([x[:3], torch.tensor([[2019.0 * scale, 3.0], [2010.0 * scale, 10.0]], dtype=DTYPE)])
    return model, x, xs


def crossed_data():
    """``(x, y, xs)``: 60 points over 6 x 4 crossed levels (columns: a feature, the two ids); test points at seen
    and unseen levels of both."""
    g = torch.Generator().manual_seed(1)
    n = 60
    a, b = torch.arange(n) % 6, (torch.arange(n) // 6) % 4
    x = torch.stack([torch.randn(n, generator=g, dtype=DTYPE), a.to(DTYPE), b.to(DTYPE)], -1)
    y = torch.randn(6, generator=g, dtype=DTYPE)[a] + torch.randn(4, generator=g, dtype=DTYPE)[b]
    y = y + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    xs = torch.cat([x[:4], torch.tensor([[0.0, 5.0, 3.0], [0.0, 7.0, 1.0], [0.0, 2.0, 5.0]], dtype=DTYPE)])
    return x, y, xs


def _crossed_model(noise: float, var: float = 1.0):
    x, y, xs = crossed_data()
    kernel = GroupKernel(8, active_dims=[1]) + GroupKernel(6, active_dims=[2])
    kernel.kernels[0].var = var
    likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-12))
    likelihood.noise = noise
    model = GP(x, y, likelihood, kernel).to(DTYPE)
    return model, x, xs


def _check(model, x, xs, rtol):
    ref = dense_copy(model)
    model.eval()
    ref.eval()
    with torch.no_grad():
        post = _closed(model, xs, x.shape[0])
        var, cov = post.variance, post.covariance_matrix
        entry = post.lazy_covariance_matrix[..., 0, 1]
        probe = torch.linspace(-1, 1, xs.shape[0], dtype=DTYPE).unsqueeze(-1)
        product = post.lazy_covariance_matrix @ probe
        want = _dense(ref, xs)
        ref_var, ref_cov = want.variance, want.covariance_matrix
    torch.testing.assert_close(post.mean, want.mean, rtol=1e-5, atol=1e-5)  # the means agreed before too
    torch.testing.assert_close(var, ref_var, rtol=rtol, atol=0)
    scale = ref_var.sqrt()
    torch.testing.assert_close(
        cov / scale / scale.unsqueeze(-1), ref_cov / scale / scale.unsqueeze(-1), rtol=0, atol=rtol
    )
    torch.testing.assert_close(entry, ref_cov[0, 1], rtol=rtol, atol=rtol * float(ref_var[:2].max()))
    torch.testing.assert_close(product, ref_cov @ probe, rtol=0, atol=rtol * float((ref_cov.abs() @ probe.abs()).max()))


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_random_slope_with_a_raw_covariate(scale):
    """Years 2000-2019 (-70 % before) and a covariate near 1e4 (500x before)."""
    model, x, xs = _slope_model(scale)
    _check(model, x, xs, rtol=1e-5)


@pytest.mark.parametrize("noise", [1e-6, 1e-8])
def test_crossed_intercepts_with_a_tiny_noise(noise):
    """0.6 % off at noise 1e-6, 0 against 1.4e-9 at 1e-8 before."""
    model, x, xs = _crossed_model(noise)
    _check(model, x, xs, rtol=1e-5)


def test_two_intercepts_with_a_huge_variance():
    """Variance 1e8 and noise 0.69: 8.8 against 0.069 before."""
    model, x, xs = _crossed_model(0.69, var=1e8)
    _check(model, x, xs, rtol=1e-5)


def test_variances_are_nonnegative_and_draws_have_the_dense_covariance():
    model, x, xs = _slope_model(5.0)
    ref = dense_copy(model)
    model.eval()
    ref.eval()
    with torch.no_grad():
        post = _closed(model, xs, x.shape[0])
        want = _dense(ref, xs)
        assert bool((post.variance > 0).all())
        torch.testing.assert_close(
            post.lazy_covariance_matrix.to_dense(),
            want.covariance_matrix,
            rtol=0,
            atol=1e-5 * float(want.variance.max()),
        )
        torch.manual_seed(0)
        samples = post.rsample(torch.Size([4000])) - post.mean
    # the draws' covariance: the posterior's own, within sampling error (relative to each variance)
    emp = samples.mT @ samples / 4000
    sd = want.variance.sqrt()
    corr_err = (emp - want.covariance_matrix) / sd / sd.unsqueeze(-1)
    assert float(corr_err.abs().max()) < 0.15


@pytest.mark.parametrize("case", ["slope", "crossed"])
def test_variance_gradients_match_the_dense_reference(case):
    """Gradients of variance.sum() with respect to the hyperparameters, float64, at the ill-conditioned settings."""
    model, x, xs = _slope_model(1.0) if case == "slope" else _crossed_model(1e-6)
    check_variance_gradients(model, x, xs)


def check_variance_gradients(model, x, xs) -> None:
    """Gradients of ``variance.sum()`` at ``xs`` in closed form against a dense copy's."""
    ref = dense_copy(model)
    model.eval()
    ref.eval()
    with gpytorch.settings.detach_test_caches(False):
        _closed(model, xs, x.shape[0]).variance.sum().backward()
        with gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref(xs).variance.sum().backward()
    assert_gradients_like_dense(model, ref)
