"""The posterior covariance at new inputs of a kernel sum in closed form (kernels.sum_prediction_strategy).

GPyTorch's default strategy forms the test-by-training covariance densely (``t x n``) before it conditions; for a
sum of group kernels and an inducing-point kernel it is ``F Z^T`` with ``Z`` the training covariance's columns, so
the posterior covariance is ``K_** - F W F^T`` with a ``q x q`` ``W = Z^T M^{-1} Z``. Every check runs inside
``closed_forms_only(n)`` at ``max_cholesky_size(0)`` with ``fast_pred_var`` on and off; the references are
GPyTorch's own dense computation (its default strategy, outside the guard), in float64 at rtol 1e-8. The last test
predicts 20,000 points from 20,000 training points and fails if any tensor of ``t n / 2`` elements is created.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

import bma_gp
from bma_gp import ChunkedInducingPointKernel, GroupKernel
from bma_gp.kernels.sum_prediction_strategy import PredictiveCovarianceLinearOperator, SumPredictionStrategy
from bma_gp.likelihoods import GroupGaussianLikelihood
from closed_form_guard import closed_forms_only
from largest_tensor import LargestTensor
from test_mixed_posterior import gpytorch_default, reference

pytestmark = pytest.mark.filterwarnings("ignore:The input matches the stored training data")

DTYPE = torch.float64
K1, K2 = 7, 4  # levels of the two groupings; the last level of each never occurs in training


def data(n=90, seed=0):
    """Columns: t (smooth input and slope covariate), id of grouping 1, id of grouping 2."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=DTYPE)
    a = torch.randint(0, K1 - 1, (n,), generator=g)
    b = torch.randint(0, K2 - 1, (n,), generator=g)
    ea, eb = torch.randn(K1, generator=g, dtype=DTYPE), 0.5 * torch.randn(K2, generator=g, dtype=DTYPE)
    y = torch.sin(6 * t) + ea[a] + (1 + t) * eb[b] + 0.2 * torch.randn(n, generator=g, dtype=DTYPE)
    noise = 0.02 + 0.1 * torch.rand(n, generator=g, dtype=DTYPE)
    return torch.stack([t, a.to(DTYPE), b.to(DTYPE)], -1), y, noise


def new_inputs():
    """Seen levels and the unseen levels (K1 - 1 of grouping 1, K2 - 1 of grouping 2) at new smooth inputs."""
    return torch.tensor(
        [
            [0.1, 0.0, 1.0],
            [0.5, K1 - 1.0, 2.0],
            [0.9, 3.0, K2 - 1.0],
            [0.3, K1 - 1.0, K2 - 1.0],
            [0.7, 2.0, 0.0],
            [1.3, 5.0, 1.0],
        ],
        dtype=DTYPE,
    )


def random_new_inputs(t, seed=4):
    """``t`` random test points: smooth inputs past the training range too, every level of both groupings."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [
            1.2 * torch.rand(t, generator=g, dtype=DTYPE),
            torch.randint(0, K1, (t,), generator=g).to(DTYPE),
            torch.randint(0, K2, (t,), generator=g).to(DTYPE),
        ],
        -1,
    )


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernels):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        covar = kernels[0]
        for kernel in kernels[1:]:
            covar = covar + kernel
        self.covar_module = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def sgpr(cls, likelihood, m=6):
    smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    smooth.outputscale = 1.3
    smooth.base_kernel.lengthscale = 0.25
    inducing = torch.linspace(0.05, 0.95, m, dtype=DTYPE).unsqueeze(-1)
    return cls(smooth, inducing, likelihood, active_dims=(0,))


def groups(per_group_variance=False):
    ka = GroupKernel(K1, active_dims=[1], per_group_variance=per_group_variance)
    kb = GroupKernel(K2, active_dims=[2], per_group_variance=per_group_variance)
    ka.var = torch.linspace(0.5, 1.5, K1) if per_group_variance else 0.8
    kb.var = torch.linspace(0.2, 0.4, K2) if per_group_variance else 0.3
    return [ka, kb]


def slopes(**kwargs):
    """(1 | g1) + (1 + t | g2), correlated unless told otherwise."""
    ka = GroupKernel(K1, active_dims=[1])
    ka.var = 0.8
    kb = GroupKernel(K2, slope=True, active_dims=[2, 0], **kwargs)
    kb.var = torch.linspace(0.4, 0.9, kb.raw_var.shape[-1], dtype=DTYPE)
    if kb.correlated:
        kb.corr = -0.45
    return [ka, kb]


def build(case):
    x, y, noise = data()
    if "fixed_noise" in case:
        likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise)
    elif "group_noise" in case:
        likelihood = GroupGaussianLikelihood(K1, group_dim=1)
    else:
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
    if case.startswith("crossed"):
        kernels = groups(per_group_variance="per_group" in case)
    elif case.startswith("sgpr_gpytorch"):
        kernels = [sgpr(gpytorch.kernels.InducingPointKernel, likelihood), *groups()]
    elif case.startswith("sgpr_chunked"):
        kernels = [sgpr(ChunkedInducingPointKernel, likelihood), *groups()]
    elif case.startswith("slopes_uncorrelated"):
        kernels = slopes(correlated=False)
    elif case.startswith("slope_only"):
        kernels = slopes(intercept=False)
    else:
        kernels = slopes()
    model = GP(x, y, likelihood, kernels).to(DTYPE)
    if "group_noise" in case:
        likelihood.noise = torch.linspace(0.05, 0.3, K1, dtype=DTYPE)
    elif "fixed_noise" not in case:
        likelihood.noise = 0.05
    model.mean_module.constant.data.fill_(0.1)
    return model, x, y


CASES = [
    "crossed",
    "crossed_per_group",
    "crossed_fixed_noise",
    "crossed_group_noise",
    "sgpr_gpytorch",
    "sgpr_gpytorch_fixed_noise",
    "sgpr_chunked",
    "sgpr_chunked_group_noise",
    "slopes",
    "slopes_uncorrelated",
    "slope_only",
    "slopes_group_noise",
    "slopes_fixed_noise",
]


def closed_form(model, xt, fast_pred_var):
    n = model.train_targets.shape[-1]
    with (
        closed_forms_only(n),
        gpytorch.settings.max_cholesky_size(0),
        gpytorch.settings.fast_pred_var(fast_pred_var),
        torch.no_grad(),
    ):
        post = model(xt)
        covar = post.lazy_covariance_matrix
        res = post.mean, covar.to_dense(), covar.diagonal(dim1=-2, dim2=-1), post.variance
        noisy = None
        if not isinstance(model.likelihood, gpytorch.likelihoods.FixedNoiseGaussianLikelihood):
            noisy = model.likelihood(post, xt).variance
    return covar, res, noisy


@pytest.mark.parametrize("fast_pred_var", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_prediction_at_new_inputs_matches_gpytorch(case, fast_pred_var):
    model, x, y = build(case)
    model.eval()
    xt = new_inputs()
    covar, (mean, dense, diag, variance), noisy = closed_form(model, xt, fast_pred_var)
    assert isinstance(model.prediction_strategy, SumPredictionStrategy)
    assert isinstance(covar, PredictiveCovarianceLinearOperator)
    ref_mean, ref_cov = reference(model, xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dense, ref_cov, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(diag, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(variance, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)
    if noisy is not None:
        with torch.no_grad():
            ref_noisy = model.likelihood(gpytorch.distributions.MultivariateNormal(ref_mean, ref_cov), xt).variance
        torch.testing.assert_close(noisy, ref_noisy, rtol=1e-8, atol=1e-10)
    # a second call reuses the strategy's W; products and entries agree with the dense matrix
    covar2, (mean2, dense2, _, _), _ = closed_form(model, xt, fast_pred_var)
    torch.testing.assert_close(dense2, dense, rtol=1e-12, atol=1e-14)
    rhs = torch.randn(xt.shape[0], 3, dtype=DTYPE)
    torch.testing.assert_close(covar2 @ rhs, dense @ rhs, rtol=1e-10, atol=1e-12)
    rows, cols = torch.tensor([0, 2, 5]), torch.tensor([1, 2, 3])
    torch.testing.assert_close(covar2[..., rows, cols], dense[rows, cols], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["crossed", "sgpr_chunked", "slopes", "crossed_group_noise"])
def test_draws_at_new_inputs_take_an_exact_root(case):
    """rsample at new inputs: linear_operator's generic root would take a Lanczos root of rank
    max_root_decomposition_size past max_cholesky_size test points, silently. The root is exact instead (one
    t x t eigendecomposition), with and without the likelihood's noise, at every max_cholesky_size."""
    import warnings

    from bma_gp import ClosedFormFallbackWarning

    model, x, y = build(case)
    model.eval()
    xt = random_new_inputs(40)
    n = x.shape[0]
    for size in (0, 10**6):
        with closed_forms_only(n), gpytorch.settings.max_cholesky_size(size), torch.no_grad():
            with warnings.catch_warnings():
                warnings.simplefilter("error", ClosedFormFallbackWarning)
                post = model(xt)
                for dist in (post, model.likelihood(post, xt)):
                    covar = dist.lazy_covariance_matrix
                    root = covar.root_decomposition().root.to_dense()
                    torch.testing.assert_close(root @ root.mT, covar.to_dense(), rtol=1e-10, atol=1e-12)
                    draws = dist.rsample(torch.Size([3]))
                    assert draws.shape == (3, 40) and bool(torch.isfinite(draws).all())
                    base = torch.randn(2, 40, dtype=DTYPE)
                    torch.testing.assert_close(dist.rsample(base_samples=base), dist.mean + base @ root.mT)
    with bma_gp.settings.max_capacitance_size(39), torch.no_grad():
        with pytest.raises(ValueError, match="an exact draw at 40 new inputs"):
            model(xt).rsample()


@pytest.mark.parametrize("per_group_variance", [False, True])
def test_draws_at_new_inputs_of_one_group_kernel_take_an_exact_root(per_group_variance):
    """One GroupKernel (BlockMeanPredictionStrategy: K_** - (A W)(A W)^T): its draws at new inputs went through
    linear_operator's generic root with a ClosedFormFallbackWarning (Lanczos past max_cholesky_size)."""
    import warnings

    from bma_gp import ClosedFormFallbackWarning
    from bma_gp.kernels import BlockMeanPredictionStrategy

    x, y, _ = data()
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), [GroupKernel(K1, active_dims=[1])]).to(DTYPE)
    model.covar_module = GroupKernel(K1, active_dims=[1], per_group_variance=per_group_variance).to(DTYPE)
    model.eval()
    xt = random_new_inputs(30)
    for size in (0, 10**6):
        with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(size), torch.no_grad():
            with warnings.catch_warnings():
                warnings.simplefilter("error", ClosedFormFallbackWarning)
                post = model(xt)
                assert isinstance(model.prediction_strategy, BlockMeanPredictionStrategy)
                for dist in (post, model.likelihood(post, xt)):
                    covar = dist.lazy_covariance_matrix
                    root = covar.root_decomposition().root.to_dense()
                    torch.testing.assert_close(root @ root.mT, covar.to_dense(), rtol=1e-10, atol=1e-12)
                    assert dist.rsample(torch.Size([2])).shape == (2, 30)
    _, ref_cov = reference(model, xt)
    torch.testing.assert_close(post.covariance_matrix, ref_cov, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", ["crossed", "sgpr_chunked", "slopes"])
def test_many_new_inputs_and_the_chunked_diagonal(case, monkeypatch):
    """More test points than one row chunk, a grouping with more levels than the gather threshold."""
    import bma_gp.kernels.sum_prediction_strategy as sps

    monkeypatch.setattr(sps, "_DIAG_CHUNK", 64)
    monkeypatch.setattr(sps, "_SPARSE_COLUMNS", 2)
    model, x, y = build(case)
    model.eval()
    xt = random_new_inputs(300)
    covar, (mean, dense, diag, _), _ = closed_form(model, xt, False)
    assert isinstance(covar, PredictiveCovarianceLinearOperator)
    assert any(covar._sparse_blocks())
    ref_mean, ref_cov = reference(model, xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(diag, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dense, ref_cov, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("weight", ["formed", "products"])
def test_gradients_of_the_predictive_variance_match_gpytorch(weight, monkeypatch):
    """Against GPyTorch with ``detach_test_caches(False)`` (its default detaches the mean cache and, for the
    variances, the training covariance; ``W`` here keeps its graph, as the posterior at the training inputs does).
    ``products``: ``W`` applied through a copy of the sum that keeps its factorisation and graph (_ImplicitWeight)."""
    import bma_gp.kernels.sum_prediction_strategy as sps

    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 10**9 if weight == "formed" else 0)
    monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W itself past the threshold
    model, x, y = build("sgpr_gpytorch")
    model.eval()
    xt = new_inputs()
    params = [p for p in model.parameters() if p.requires_grad]
    with (
        closed_forms_only(x.shape[0]),
        gpytorch.settings.max_cholesky_size(0),
        gpytorch.settings.detach_test_caches(False),
    ):
        post = model(xt)
        covar = post.lazy_covariance_matrix
        assert isinstance(covar, PredictiveCovarianceLinearOperator)
        W = covar.W  # formed, or (every term in the stable form) G - Sigma as products
        assert (isinstance(W, sps._ImplicitWeight) and not W.stable) == (weight == "products")
        loss = post.variance.sum() + post.mean.square().sum() + post.covariance_matrix[0, 1]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    model.train()  # drops the inducing-point kernel's cached inverse root (its graph was used above)
    model.eval()
    with gpytorch_default(model), gpytorch.settings.detach_test_caches(False):
        post = model(xt)
        ref = post.variance.sum() + post.mean.square().sum() + post.covariance_matrix[0, 1]
        ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-8, atol=1e-10)
    for g, r, p in zip(grads, ref_grads, params):
        g = torch.zeros_like(p) if g is None else g
        r = torch.zeros_like(p) if r is None else r
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)


def test_exact_kernels_keep_gpytorchs_path():
    x, y, _ = data()
    exact = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0]))
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), [exact, *groups()]).to(DTYPE)
    model.eval()
    with torch.no_grad(), pytest.warns(UserWarning):  # ClosedFormFallbackWarning from the generic solve
        post = model(new_inputs())
        covar = post.covariance_matrix
    assert not isinstance(post.lazy_covariance_matrix, PredictiveCovarianceLinearOperator)
    _, ref_cov = reference(model, new_inputs())
    torch.testing.assert_close(covar, ref_cov, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------- memory: no t x n matrix
def test_no_test_by_training_matrix_at_twenty_thousand_points():
    n = t = 20_000
    g = torch.Generator().manual_seed(0)
    k1, k2 = 300, 40

    def inputs(size):
        return torch.stack(
            [
                torch.rand(size, generator=g),
                torch.randint(0, k1, (size,), generator=g).float(),
                torch.randint(0, k2, (size,), generator=g).float(),
            ],
            -1,
        )

    x, xt = inputs(n), inputs(t)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(n, generator=g)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    ipk = ChunkedInducingPointKernel(smooth, torch.linspace(0, 1, 16).unsqueeze(-1), likelihood, active_dims=(0,))
    ka, kb = GroupKernel(k1 + 1, active_dims=[1]), GroupKernel(k2 + 1, active_dims=[2])
    model = GP(x, y, likelihood, [ipk, ka, kb])
    model.eval()
    mode = LargestTensor()
    with closed_forms_only(n), torch.no_grad(), mode:
        pred = likelihood(model(xt))
        mean, variance = pred.mean, pred.variance
    assert mean.shape == variance.shape == (t,)
    assert bool((variance > 0).all())
    assert mode.largest < t * n // 2, f"{mode.where} returned a tensor of {mode.largest} elements"
