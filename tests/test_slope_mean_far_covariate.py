"""Posterior means and the training solve of a random slope with its covariate far from 0.

``GroupKernel(k, slope=True)`` writes a correlated slope as three diagonal terms over one partition with weights
``1``, ``x`` and ``1 + c x``, eliminated jointly by the capacitance: per level a 3 x 3 block
``I + diag(g) A_c`` whose columns are collinear and, with the covariate in calendar years, nearly parallel within a
level (condition numbers near 1e9 at 2010, 5e10 near 1e4). ``M^{-1} r`` came out accurate entry by entry, but with an
error smooth over each level that its weighted level sums ``Z^T M^{-1} r`` (the posterior mean's coefficients, taken
times ``x_* x``) do not cancel: the mean was 300x (2010) and 150x (1e4) less accurate than a dense Cholesky, the
training solve's residual 650x larger. ``solve`` and the mean's coefficients now take a step of iterative
refinement there (``BlockMeanSumLinearOperator._refines``).

References: the per-level 2 x 2 mixed-model posterior in 50-digit mpmath (means), a dense float64 solve (residuals)
and GPyTorch's dense path on a copy (gradients). Bound: 10x the dense float64 solve's own error.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import ClosedFormFallbackWarning
from closed_form_guard import closed_forms_only
from gp_reference import assert_gradients_like_dense, dense_copy, slope_model

mpmath = pytest.importorskip("mpmath")


@pytest.fixture(autouse=True)
def _no_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        yield


def _data(offset: float, k: int = 8, per: int = 12, seed: int = 1):
    """Training rows (covariate, id) with the covariate ``offset`` plus N(0, 25), responses with a level slope; new
    rows at seen levels, one past the data, and an unseen level."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(k).repeat_interleave(per).to(torch.float64)
    cov = offset + 5.0 * torch.randn(k * per, generator=g, dtype=torch.float64)
    y = 0.3 * ids + 0.01 * (cov - offset) * (ids - k / 2) + 0.1 * torch.randn(k * per, generator=g, dtype=torch.float64)
    x = torch.stack([cov, ids], -1)
    t = 12
    xs = torch.stack(
        [
            offset + 5.0 * torch.randn(t, generator=g, dtype=torch.float64),
            torch.randint(0, k + 1, (t,), generator=g).to(torch.float64),
        ],
        -1,
    )
    xs = torch.cat([xs, torch.tensor([[offset + 30.0, 0.0]], dtype=torch.float64)])
    return x, y, xs


def _model(x, y, corr: float, noise: float = 0.05):
    return slope_model(x, y, corr, noise, var=(0.7, 0.5), constant=0.2)


def _mp_means(model, x, y, rows):
    """The posterior mean at ``rows`` in 50-digit arithmetic: per level
    ``b = (S^{-1} + Z^T Z / s^2)^{-1} Z^T r / s^2``."""
    with mpmath.workdps(50):
        S = mpmath.matrix(model.covar_module.slope_covar.detach().tolist())
        s2 = mpmath.mpf(float(model.likelihood.noise.detach()))
        const = mpmath.mpf(float(model.mean_module.constant.detach()))
        post = {}
        for level in x[:, 1].unique().tolist():
            P, u = S**-1, mpmath.matrix(2, 1)
            for i in (x[:, 1] == level).nonzero().flatten().tolist():
                z = mpmath.matrix([[1], [mpmath.mpf(float(x[i, 0]))]])
                P += z * z.T / s2
                u += z * (mpmath.mpf(float(y[i])) - const) / s2
            post[level] = P**-1 * u
        out = []
        for row in rows.tolist():
            b = post.get(row[1])
            out.append(float(const if b is None else const + b[0] + mpmath.mpf(row[0]) * b[1]))
        return torch.tensor(out, dtype=torch.float64)


def _dense_means(model, rows):
    reference = dense_copy(model)
    reference.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reference(rows).mean


def _error(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("corr", [-0.6, 0.3])
@pytest.mark.parametrize("offset", [0.0, 2010.0, 1e4])
def test_means_match_a_dense_solve(offset, corr):
    """Means at new inputs and at the training inputs against 50-digit arithmetic: within 10x of the dense float64
    solve's error (plus 1e-12). Before: 4e-6 against 2e-8 at 2010, 1e-4 against 6e-7 near 1e4."""
    x, y, xs = _data(offset)
    model = _model(x, y, corr)
    model.eval()
    for rows in (xs, x):
        want = _mp_means(model, x, y, rows)
        with torch.no_grad(), closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
                mean = model(rows).mean
        dense = _dense_means(model, rows)
        err, dense_err = _error(mean, want), _error(dense, want)
        assert err <= 10 * dense_err + 1e-12, (offset, corr, rows.shape[0], err, dense_err)


@pytest.mark.parametrize("corr", [-0.6, 0.3])
@pytest.mark.parametrize("offset", [0.0, 2010.0, 1e4])
def test_training_solve_matches_a_dense_solve(offset, corr):
    """The training solve ``M^{-1} (y - mu)`` that the mean cache takes: its residual within 10x of a dense float64
    solve's (650x before at 2010), and its weighted level sums ``Z^T M^{-1} r`` (what the mean reads) close to the
    dense solve's."""
    x, y, _ = _data(offset)
    model = _model(x, y, corr)
    model.train()
    with torch.no_grad():
        M = model.likelihood(model(x)).lazy_covariance_matrix.evaluate_kernel()
        r = (y - model.mean_module.constant.detach()).unsqueeze(-1)
        with closed_forms_only(x.shape[0]):
            alpha = M.solve(r)
        dense = M.to_dense()
        want = torch.linalg.solve(dense, r)
        residual = float((dense @ alpha - r).abs().max())
        dense_residual = float((dense @ want - r).abs().max())
        assert residual <= 10 * dense_residual + 1e-12, (residual, dense_residual)
        for w in (torch.ones_like(x[:, 0]), x[:, 0]):
            sums = torch.zeros(int(x[:, 1].max()) + 1, dtype=torch.float64).index_add_(
                0, x[:, 1].long(), w * alpha[:, 0]
            )
            dense_sums = torch.zeros_like(sums).index_add_(0, x[:, 1].long(), w * want[:, 0])
            scale = float(w.abs().max() * want.abs().sum())  # the sums' own rounding: eps |w| |alpha|
            assert float((sums - dense_sums).abs().max()) <= 1e-12 * scale + 1e3 * dense_residual


@pytest.mark.parametrize("corr", [-0.6, 0.3])
@pytest.mark.parametrize("offset", [0.0, 2010.0])
def test_mll_gradients_match_dense_autograd(offset, corr):
    """The marginal log likelihood and its gradients with respect to ``var``, ``corr``, the noise and the mean,
    against GPyTorch's dense path (a small case)."""
    x, y, _ = _data(offset, k=4, per=6)
    model = _model(x, y, corr, noise=0.3)
    reference = dense_copy(model)
    for m in (model, reference):
        m.train()
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
        loss.backward()
    with gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = -gpytorch.mlls.ExactMarginalLogLikelihood(reference.likelihood, reference)(reference(x), y)
        want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-9)
    assert_gradients_like_dense(model, reference, rtol=1e-5, minimum=4)


@pytest.mark.parametrize("corr", [-0.6, 0.3])
@pytest.mark.parametrize("offset", [0.0, 2010.0])
def test_mean_gradients_match_dense_autograd(offset, corr):
    """Gradients of the posterior mean at new inputs (``detach_test_caches`` off: through the refined solve) with
    respect to ``var``, ``corr``, the noise and the mean, against GPyTorch's dense path."""
    x, y, xs = _data(offset, k=4, per=6)
    model = _model(x, y, corr, noise=0.3)
    reference = dense_copy(model)
    model.eval()
    reference.eval()
    with gpytorch.settings.detach_test_caches(False):
        with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
            model(xs).mean.sum().backward()
        with gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference(xs).mean.sum().backward()
    # the dense reference's own rounding at calendar years is about 1e-8 of the largest gradient (the slope
    # variance's): each gradient is compared to 1e-5 relative plus 1e-7 of that
    twins = dict(reference.named_parameters())
    pairs = [
        (p.grad, twins[name.replace("covar_module.", "covar_module.kernel.", 1)].grad)
        for name, p in model.named_parameters()
    ]
    pairs = [(g, w) for g, w in pairs if w is not None]
    assert len(pairs) >= 4 and all(g is not None for g, _ in pairs)
    largest = max(float(w.abs().max()) for _, w in pairs)
    for g, w in pairs:
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7 * largest)
