"""The posterior covariance at the training inputs of a kernel sum in closed form (kernels.sum_prediction_strategy).

At the training inputs GPyTorch's default strategy forms ``K - K M^{-1} K`` densely and samples it through
Lanczos or an ``n x n`` Cholesky. With group kernels and an inducing-point kernel the prior is a
``BlockMeanSumLinearOperator`` and the posterior is ``diag(nu c / (c + nu)) + V V^T`` with an ``n x q`` ``V``.
Every check of the closed form runs inside ``closed_forms_only(n)`` (no CG, no Lanczos, no factorisation of an
``n x n`` matrix), at ``max_cholesky_size`` 0 and at a size above ``n``. The references are GPyTorch's own dense
computation (its default strategy with a dense Cholesky, outside the guard) and the covariances assembled entry by
entry in tests/test_mixed_compositions.py.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from unittest import mock

import gpytorch
import pytest
import torch
from gpytorch.kernels import AdditiveKernel, Kernel
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy

from bma_gp import GroupKernel
from bma_gp.kernels.sum_prediction_strategy import SumPredictionStrategy, TrainingPosteriorLinearOperator, install
from closed_form_guard import closed_forms_only
from test_mixed_compositions import DTYPE, GP, K1, K2, build, crossed_data, dense_posterior

pytestmark = pytest.mark.filterwarnings("ignore:The input matches the stored training data")

CASES = [
    "crossed",
    "crossed_per_group",
    "crossed_fixed_noise",
    "one_group_fixed_noise",
    "sgpr_crossed",
    "sgpr_crossed_fixed_noise",
]
CHOLESKY_SIZES = [0, 10**6]


def noise_of(model, case, noise_diag):
    return noise_diag if case.endswith("fixed_noise") else model.likelihood.noise.expand(noise_diag.shape[0])


@contextlib.contextmanager
def gpytorch_default(model):
    """GPyTorch's own strategy (dense Cholesky at this size) for the model's kernels, outside the guard."""
    model.prediction_strategy = None
    with (
        mock.patch.object(AdditiveKernel, "prediction_strategy", Kernel.prediction_strategy),
        mock.patch.object(GroupKernel, "prediction_strategy", Kernel.prediction_strategy),
        gpytorch.settings.max_cholesky_size(10**6),
    ):
        yield
    model.prediction_strategy = None


def reference(model, x):
    """Mean and covariance of GPyTorch's default strategy at x (float64, dense)."""
    with gpytorch_default(model), torch.no_grad():
        post = model(x)
        assert type(model.prediction_strategy) is DefaultPredictionStrategy
        return post.mean, post.covariance_matrix


def closed_form_posterior(model, x, cholesky_size=0):
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(cholesky_size), torch.no_grad():
        post = model(x)
        covar = post.lazy_covariance_matrix
        return post, covar, post.mean, covar.to_dense(), covar.diagonal(dim1=-2, dim2=-1)


# ---------------------------------------------------------------------------- against GPyTorch and dense references
@pytest.mark.parametrize("cholesky_size", CHOLESKY_SIZES)
@pytest.mark.parametrize("case", CASES)
def test_posterior_at_training_inputs_matches_gpytorch(case, cholesky_size):
    model, kernels, x, y, noise_diag = build(case)
    model.eval()
    _, covar, mean, dense, var = closed_form_posterior(model, x, cholesky_size)
    assert isinstance(covar, TrainingPosteriorLinearOperator)
    ref_mean, ref_cov = reference(model, x)
    # GPyTorch's K - K M^{-1} K cancels (entries ~1 against a posterior ~1e-3): it is the less accurate of the two
    torch.testing.assert_close(dense, ref_cov, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(var, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-12)  # the mean is unchanged
    with torch.no_grad():
        entry_mean, entry_cov = dense_posterior(
            model, kernels, x, y, noise_of(model, case, noise_diag), x, diag_correction=True
        )
    torch.testing.assert_close(dense, entry_cov, rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(var, torch.diagonal(entry_cov), rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(mean, entry_mean, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_posterior_variances_are_between_zero_and_the_one_point_bound(case):
    """0 <= Var(f_a | y) <= Var(f_a | y_a) = K_aa nu_a / (K_aa + nu_a), checked on the values the operator returns."""
    model, kernels, x, y, noise_diag = build(case)
    model.eval()
    post, covar, _, _, var = closed_form_posterior(model, x)
    nu = noise_of(model, case, noise_diag).detach()
    with closed_forms_only(x.shape[0]), torch.no_grad():
        prior = model.prediction_strategy.train_prior_dist.lazy_covariance_matrix.diagonal(dim1=-2, dim2=-1)
    assert bool((var >= 0).all())
    assert bool((var <= prior * nu / (prior + nu) * (1 + 1e-12)).all())


def test_variances_stay_non_negative_and_exact_when_the_noise_is_tiny():
    """One grouping, per-point noise 1e-10 against a group variance 1e4: the dense K - K M^{-1} K loses every digit
    (its entries are 1e4, the posterior 1e-12), the closed form keeps them. Exact: the posterior of a group effect
    has precision 1/v + sum_a 1/nu_a, and S_ab = [g_a = g_b] / (1/v + sum_{a in g} 1/nu_a)."""
    x, y, _ = crossed_data()
    n = x.shape[0]
    g = torch.Generator().manual_seed(3)
    nu = 1e-10 * (1 + torch.rand(n, generator=g, dtype=DTYPE))
    with gpytorch.settings.min_fixed_noise(double_value=1e-12):  # by default GPyTorch raises the noise to 1e-6
        likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=nu)
    kernel = GroupKernel(K1, active_dims=[1])
    kernel.var = 1e4
    model = GP(x, y, likelihood, kernel).to(DTYPE)
    model.eval()
    _, covar, _, dense, var = closed_form_posterior(model, x)
    assert isinstance(covar, TrainingPosteriorLinearOperator)
    ids = x[:, 1].long()
    precision = 1 / kernel.var.detach().reshape(()) + torch.zeros(K1, dtype=DTYPE).index_add(0, ids, 1 / nu)
    exact = (ids.unsqueeze(-1) == ids.unsqueeze(-2)).to(DTYPE) / precision[ids].unsqueeze(-1)
    assert bool((var > 0).all())
    torch.testing.assert_close(var, torch.diagonal(exact), rtol=1e-8, atol=0)
    torch.testing.assert_close(dense, exact, rtol=1e-8, atol=1e-20)


# ---------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("cholesky_size", CHOLESKY_SIZES)
@pytest.mark.parametrize("case", CASES)
def test_roots_reproduce_the_posterior_with_and_without_the_likelihood(case, cholesky_size):
    model, kernels, x, y, noise_diag = build(case)
    model.eval()
    n = x.shape[0]
    nu = noise_of(model, case, noise_diag).detach()
    with closed_forms_only(n), gpytorch.settings.max_cholesky_size(cholesky_size), torch.no_grad():
        post = model(x)
        noisy = model.likelihood(post)
        latent, observed = post.lazy_covariance_matrix, noisy.lazy_covariance_matrix
        assert isinstance(observed, TrainingPosteriorLinearOperator)
        for op in (latent, observed):
            root = op.root_decomposition().root
            torch.testing.assert_close(root.to_dense() @ root.to_dense().mT, op.to_dense(), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(observed.to_dense(), latent.to_dense() + torch.diag(nu), rtol=1e-12, atol=0)
        samples = noisy.rsample(torch.Size([3]))
        latent_samples = post.rsample(torch.Size([3]))
    assert samples.shape == latent_samples.shape == (3, n)
    assert bool(torch.isfinite(samples).all() and torch.isfinite(latent_samples).all())
    # n columns, also the latent one with SGPR's diagonal correction (rsample(base_samples=...) takes n per draw)
    assert observed.root_decomposition().root.shape == (n, n)
    assert latent.root_decomposition().root.shape == (n, n)


def test_block_mean_kernel_with_indefinite_B_keeps_closed_form_variances():
    # A block mean kernel's B averages the off-diagonal entries of each diagonal block, so B itself can be
    # indefinite while diag(lam) + P B P^T is not: then H has no root, but products and variances at the training
    # inputs stay closed form (they were GPyTorch's dense n x n path, silently); a root warns and is generic.
    from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning, Partition
    from bma_gp.kernels.sum_prediction_strategy import _root_of_block, as_sum
    from largest_tensor import LargestTensor

    g = torch.Generator().manual_seed(6)
    n = 400
    t = torch.rand(n, generator=g, dtype=DTYPE)
    ids = torch.randint(0, 30, (n,), generator=g)
    x = torch.stack([t, ids.to(DTYPE)], -1)
    y = (
        torch.sin(6 * t)
        + torch.randn(30, generator=g, dtype=DTYPE)[ids]
        + 0.1 * torch.randn(n, generator=g, dtype=DTYPE)
    )
    smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=(0,)))
    smooth.base_kernel.lengthscale = 1.0
    partition = Partition.from_labels((t * 20).long().clamp(max=19))
    kernel = BlockMeanKernel(smooth, x, partition, chunk_size=50) + GroupKernel(30, active_dims=[1])  # tiles 50 x n
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).to(DTYPE)
    model.likelihood.noise = 0.05
    model.eval()
    with torch.no_grad():
        prior = as_sum(model.covar_module(x).evaluate_kernel())
        assert _root_of_block(prior, 0, DTYPE) is None  # the precondition: B of the block mean kernel is indefinite
    mode = LargestTensor(square=n)
    with closed_forms_only(n), mode, torch.no_grad():
        post = model(x)
        covar = post.lazy_covariance_matrix
        assert isinstance(covar, TrainingPosteriorLinearOperator) and not covar.psd
        variance, mean = post.variance, post.mean
        probe = torch.randn(n, 2, generator=g, dtype=DTYPE)
        product = covar @ probe
    assert not mode.squares, f"n x n matrices from {mode.squares}"
    ref_mean, ref_cov = reference(model, x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(variance, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(product, ref_cov @ probe, rtol=1e-8, atol=1e-10)
    # the root (rsample with base_samples) through the Gram matrix: s > 0 here, so S = diag(sqrt s)(I + Y H Y^T)
    # diag(sqrt s) has the square root I + Y X Y^T whatever the sign of H's eigenvalues (before: a warning and
    # GPyTorch's dense Cholesky)
    for dist in (post, model.likelihood(post)):
        with closed_forms_only(n), mode, torch.no_grad(), gpytorch.settings.max_cholesky_size(0):
            with warnings.catch_warnings():
                warnings.simplefilter("error", ClosedFormFallbackWarning)
                root = dist.lazy_covariance_matrix.root_decomposition().root
                base = torch.randn(2, n, generator=g, dtype=DTYPE)
                draws = dist.rsample(torch.Size([2]), base_samples=base)
            assert root.shape[-2:] == (n, n)
        with torch.no_grad():
            dense_root = root.to_dense()
        expected = dist.lazy_covariance_matrix.to_dense()
        torch.testing.assert_close(dense_root @ dense_root.mT, expected, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(draws, dist.mean + base @ dense_root.mT, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        expected - model.likelihood.noise * torch.eye(n, dtype=DTYPE), ref_cov, rtol=1e-8, atol=1e-10
    )
    # draws without base samples stay closed form: Matheron's rule with draws of the function from the prior's root
    # (from its Gram matrix: B is indefinite), a linear map T of p + 2n standard normals with T T^T = S exactly
    for dist in (post, model.likelihood(post)):
        with closed_forms_only(n), mode, torch.no_grad(), gpytorch.settings.max_cholesky_size(0):
            covar = dist.lazy_covariance_matrix
            prior_root = covar._prior_root()
            p = prior_root.shape[-1]
            T = covar._function_space_pathwise(torch.eye(p + 2 * n, dtype=DTYPE), prior_root)
            with warnings.catch_warnings():
                warnings.simplefilter("error", ClosedFormFallbackWarning)
                torch.manual_seed(3)
                draws = dist.rsample(torch.Size([2]))
        torch.testing.assert_close(T @ T.mT, covar.to_dense(), rtol=1e-10, atol=1e-13)
        torch.manual_seed(3)
        noise = torch.randn(p + 2 * n, 2, dtype=DTYPE)
        torch.testing.assert_close(draws, dist.mean + (T @ noise).mT, rtol=1e-9, atol=1e-10)  # M's condition: ~1e3
    assert not mode.squares, f"n x n matrices from {mode.squares}"


def test_no_eigendecomposition_of_size_q():
    # 300 x 40 crossed random intercepts (q = 340): products and variances come from the capacitance (the
    # 300-level grouping eliminated), draws from conditioned prior draws, the root from a Cholesky factorisation;
    # no q x q eigendecomposition, which took 29 s at q = 5050 (the variances now 0.07 s, a draw 0.04 s).
    g = torch.Generator().manual_seed(4)
    n, k1, k2 = 1500, 300, 40
    a, b = torch.randint(0, k1, (n,), generator=g), torch.randint(0, k2, (n,), generator=g)
    x = torch.stack([a, b], -1).to(DTYPE)
    y = torch.randn(k1, generator=g, dtype=DTYPE)[a] + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    model = GP(
        x,
        y,
        gpytorch.likelihoods.GaussianLikelihood(),
        GroupKernel(k1, active_dims=[0]) + GroupKernel(k2, active_dims=[1]),
    )
    model = model.to(DTYPE)
    model.likelihood.noise = 0.2
    model.eval()
    real_eigh, real_eigvalsh = torch.linalg.eigh, torch.linalg.eigvalsh

    def small_only(real):
        def guarded(A, *args, **kwargs):
            assert A.shape[-1] <= 64, f"an eigendecomposition of size {A.shape[-1]}"
            return real(A, *args, **kwargs)

        return guarded

    with (
        mock.patch.object(torch.linalg, "eigh", small_only(real_eigh)),
        mock.patch.object(torch.linalg, "eigvalsh", small_only(real_eigvalsh)),
        closed_forms_only(n),
        torch.no_grad(),
    ):
        post = model(x)
        covar = post.lazy_covariance_matrix
        assert isinstance(covar, TrainingPosteriorLinearOperator)
        variance = post.variance
        root = covar.root_decomposition().root
        probe = torch.randn(n, 3, generator=g, dtype=DTYPE)
        via_root = root @ (root.mT @ probe)
        via_covar = covar @ probe
        draws = post.rsample(torch.Size([2]))
    _, ref_cov = reference(model, x)
    torch.testing.assert_close(variance, torch.diagonal(ref_cov), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(via_covar, ref_cov @ probe, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(via_root, via_covar, rtol=1e-9, atol=1e-11)
    assert draws.shape == (2, n) and bool(torch.isfinite(draws).all())


@pytest.mark.parametrize("case", CASES)
def test_draws_condition_prior_draws_exactly(case):
    """rsample at the training inputs draws ``diag(sqrt s) e + diag(beta) Z h`` with ``h`` a prior draw of the
    coefficients conditioned on simulated data (no q x q factorisation): a linear map ``T`` of ``q + 2n`` standard
    normals. ``T T^T`` must be the posterior covariance, with and without the likelihood's noise, and
    ``rsample`` must use that map (and no root)."""
    model, kernels, x, y, noise_diag = build(case)
    model.eval()
    n = x.shape[0]
    with closed_forms_only(n), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
        post = model(x)
        for dist in (post, model.likelihood(post)):
            covar = dist.lazy_covariance_matrix
            assert isinstance(covar, TrainingPosteriorLinearOperator)
            q = sum(covar.M._sizes())
            T = covar._pathwise(torch.eye(q + 2 * n, dtype=DTYPE))
            torch.testing.assert_close(T @ T.mT, covar.to_dense(), rtol=1e-10, atol=1e-13)
            with mock.patch.object(TrainingPosteriorLinearOperator, "root_decomposition", side_effect=AssertionError):
                torch.manual_seed(5)
                draws = dist.rsample(torch.Size([3]))
            torch.manual_seed(5)
            noise = torch.randn(q + 2 * n, 3, dtype=DTYPE)
            torch.testing.assert_close(draws, dist.mean + (T @ noise).mT, rtol=1e-12, atol=1e-12)


def test_draws_of_a_batch_condition_prior_draws_exactly():
    model, likelihood, x = batch_of_crossed_models(per_group_variance=True)
    n = x.shape[0]
    with closed_forms_only(n), torch.no_grad():
        covar = likelihood(model(x)).lazy_covariance_matrix
        q = sum(covar.M._sizes())
        T = covar._pathwise(torch.eye(q + 2 * n, dtype=DTYPE).expand(2, -1, -1))
    torch.testing.assert_close(T @ T.mT, covar.to_dense(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("case", ["crossed", "sgpr_crossed_fixed_noise"])
def test_likelihood_rsample_at_training_inputs_has_the_posterior_moments(case):
    model, kernels, x, y, noise_diag = build(case)
    model.eval()
    torch.manual_seed(2)
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
        draws = model.likelihood(model(x)).rsample(torch.Size([4000]))
    ref_mean, ref_cov = reference(model, x)
    sd = (torch.diagonal(ref_cov) + noise_of(model, case, noise_diag).detach()).sqrt()
    assert bool(((draws.mean(0) - ref_mean).abs() < 5 * sd / math.sqrt(4000)).all())
    # the sample variances, within 6 standard errors (sd^2 sqrt(2 / N) for a normal sample)
    assert bool(((draws.var(0) - sd**2).abs() < 6 * sd**2 * math.sqrt(2 / 4000)).all())


@pytest.mark.parametrize("case", ["crossed", "sgpr_crossed_fixed_noise"])
def test_base_samples_of_the_size_of_the_data(case):
    """GPyTorch's rsample(base_samples=...) takes n base samples per draw when the root is square: the latent
    posterior without SGPR's correction ([V, 0]) and every posterior with the likelihood's noise."""
    model, kernels, x, y, noise_diag = build(case)
    model.eval()
    base = torch.randn(5, x.shape[0], dtype=DTYPE)
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
        post = model(x)
        dists = [model.likelihood(post)] + ([post] if case == "crossed" else [])
        for dist in dists:
            draws = dist.rsample(base_samples=base)
            root = dist.lazy_covariance_matrix.root_decomposition().root.to_dense()
            torch.testing.assert_close(draws, dist.mean + base @ root.mT)


@pytest.mark.parametrize("case", ["crossed", "sgpr_crossed", "one_group_fixed_noise"])
def test_fast_pred_settings_change_nothing(case):
    model, kernels, x, y, noise_diag = build(case)
    model.eval()
    _, _, mean, dense, _ = closed_form_posterior(model, x)
    model.prediction_strategy = None
    with (
        closed_forms_only(x.shape[0]),
        gpytorch.settings.max_cholesky_size(0),
        gpytorch.settings.fast_pred_var(),
        gpytorch.settings.fast_pred_samples(),
        torch.no_grad(),
    ):
        post = model(x)
        assert isinstance(post.lazy_covariance_matrix, TrainingPosteriorLinearOperator)
        torch.testing.assert_close(post.mean, mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(post.covariance_matrix, dense, rtol=1e-12, atol=1e-16)
        draws = model.likelihood(model(x)).rsample(torch.Size([2]))
    assert bool(torch.isfinite(draws).all())


# ---------------------------------------------------------------------------- gradients, batches, precision
@pytest.mark.parametrize("case", ["crossed_per_group", "sgpr_crossed_fixed_noise"])
def test_gradients_of_the_posterior_variances_match_the_dense_reference(case):
    """Gradients of the exact posterior covariance (GPyTorch's detached test caches do not cut them here)."""
    model, kernels, x, y, noise_diag = build(case)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.randn(x.shape[0], dtype=DTYPE)
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
        covar = model(x).lazy_covariance_matrix
        probe = torch.randn(x.shape[0], 2, dtype=DTYPE)
        value = (covar.diagonal(dim1=-2, dim2=-1) * w).sum() + (probe * covar.matmul(probe)).sum()
        grads = torch.autograd.grad(value, params, allow_unused=True)
    _, cov = dense_posterior(model, kernels, x, y, noise_of(model, case, noise_diag), x, diag_correction=True)
    ref = (torch.diagonal(cov) * w).sum() + (probe * (cov @ probe)).sum()
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    for p, g, r in zip(params, grads, ref_grads):
        g = torch.zeros_like(p) if g is None else g
        r = torch.zeros_like(p) if r is None else r
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_repeated_calls_with_and_without_gradients():
    """A factor computed under no_grad is reused only by calls that need no gradient, and every call with gradients
    builds its own graph from the covariances GPyTorch evaluates afresh (two backward passes in a row work)."""
    model, kernels, x, y, noise_diag = build("crossed")
    model.eval()
    _, _, _, dense, _ = closed_form_posterior(model, x)  # fills the strategy's no-grad cache
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for _ in range(2):
        with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
            covar = model(x).lazy_covariance_matrix
            torch.testing.assert_close(covar.to_dense().detach(), dense, rtol=1e-12, atol=1e-15)
            grads.append(torch.autograd.grad(covar.diagonal(dim1=-2, dim2=-1).sum(), params, allow_unused=True))
    _, cov = dense_posterior(model, kernels, x, y, noise_of(model, "crossed", noise_diag), x, diag_correction=True)
    ref = torch.autograd.grad(torch.diagonal(cov).sum(), params, allow_unused=True)
    for g1, g2, r in zip(*grads, ref):
        if r is None:
            assert g1 is None and g2 is None
            continue
        torch.testing.assert_close(g1, r, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(g2, r, rtol=1e-8, atol=1e-10)


def batch_of_crossed_models(per_group_variance=False):
    """``(model, likelihood, x)``: two crossed models over the same data in one batch (batch-shaped variances and
    noise; with ``per_group_variance``, the second grouping's variances per group), float64, eval mode."""
    x, y, _ = crossed_data()
    batch = torch.Size([2])
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch)
    likelihood.noise = torch.tensor([[0.05], [0.1]])
    ka = GroupKernel(K1, active_dims=[1], batch_shape=batch)
    kb = GroupKernel(K2, active_dims=[2], batch_shape=batch, per_group_variance=per_group_variance)
    ka.var = torch.tensor([[0.8], [0.4]])
    if not per_group_variance:
        kb.var = torch.tensor([[0.3], [0.6]])
    model = GP(x, torch.stack([y, 2 * y]), likelihood, ka + kb, batch).to(DTYPE)
    return model.eval(), likelihood, x


def test_batch_of_crossed_models():
    """Two models over the same data in one batch (batch-shaped variances and noise)."""
    model, likelihood, x = batch_of_crossed_models()
    post, covar, mean, dense, var = closed_form_posterior(model, x)
    assert isinstance(covar, TrainingPosteriorLinearOperator) and covar.shape == (2, 90, 90)
    with closed_forms_only(x.shape[0]), torch.no_grad():
        draws = likelihood(post).rsample(torch.Size([3]))
    assert draws.shape == (3, 2, 90) and bool(torch.isfinite(draws).all())
    ref_mean, ref_cov = reference(model, x)
    torch.testing.assert_close(dense, ref_cov, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(var, torch.diagonal(ref_cov, dim1=-2, dim2=-1), rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-12)


def test_float32_models_sample_at_training_inputs():
    model, kernels, x, y, noise_diag = build("sgpr_crossed")
    _, _, _, ref64, _ = closed_form_posterior(model.eval(), x)
    model = build("sgpr_crossed")[0].float().eval()  # a fresh model: SGPR caches its inducing matrices in eval mode
    x = x.float()
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
        post = model(x)
        covar = post.lazy_covariance_matrix
        draws = model.likelihood(post).rsample(torch.Size([2]))
        var = covar.diagonal(dim1=-2, dim2=-1)
    assert covar.dtype == var.dtype == draws.dtype == torch.float32
    assert bool((var >= 0).all())
    torch.testing.assert_close(covar.to_dense().double(), ref64, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- where the closed form does not apply
def test_new_inputs_and_sums_outside_the_family_keep_gpytorchs_path():
    model, kernels, x, y, noise_diag = build("crossed")
    model.eval()
    with torch.no_grad():
        post = model(x[:20])  # a subset of the training inputs: not the training covariance
    assert isinstance(model.prediction_strategy, SumPredictionStrategy)
    assert not isinstance(post.lazy_covariance_matrix, TrainingPosteriorLinearOperator)

    exact = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0]))  # no closed form
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), exact + GroupKernel(K1, active_dims=[1])).to(DTYPE)
    model.eval()
    with torch.no_grad(), pytest.warns(UserWarning):  # ClosedFormFallbackWarning from the generic solve
        post = model(x)
        covar = post.covariance_matrix
    assert not isinstance(post.lazy_covariance_matrix, TrainingPosteriorLinearOperator)
    _, ref_cov = reference(model, x)
    torch.testing.assert_close(covar, ref_cov, rtol=1e-6, atol=1e-9)


def test_sums_without_our_kernels_keep_gpytorchs_strategy_and_install_is_idempotent():
    install()
    install()
    assert not hasattr(AdditiveKernel.prediction_strategy._bma_gp_original, "_bma_gp_original")
    x, y, _ = crossed_data()
    covar = gpytorch.kernels.RBFKernel(active_dims=[0]) + gpytorch.kernels.LinearKernel(active_dims=[0])
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), covar).to(DTYPE)
    model.eval()
    with torch.no_grad():
        model(x[:3])
    assert type(model.prediction_strategy) is DefaultPredictionStrategy


@pytest.mark.parametrize("likelihood", [False, True])
def test_a_root_made_under_no_grad_is_made_again_with_gradients(likelihood):
    """A posterior made with gradients whose root was first asked for under ``no_grad`` (the root factor, or the
    square root's core with the likelihood's noise, kept for later draws): a draw with gradients builds its own,
    and its gradients equal those of a fresh posterior."""
    model, kernels, x, y, noise_diag = build("crossed")
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    base = torch.randn(2, x.shape[0], dtype=DTYPE, generator=torch.Generator().manual_seed(5))

    def draws():
        post = model(x)
        return model.likelihood(post) if likelihood else post

    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
        dist = draws()
        with torch.no_grad():
            first = dist.rsample(base_samples=base)
        second = dist.rsample(base_samples=base)
        grads = torch.autograd.grad(second.square().sum(), params, allow_unused=True)
        want = torch.autograd.grad(draws().rsample(base_samples=base).square().sum(), params, allow_unused=True)
    torch.testing.assert_close(first, second.detach(), rtol=1e-10, atol=1e-12)
    for p, g, w in zip(params, grads, want):
        g = torch.zeros_like(p) if g is None else g
        w = torch.zeros_like(p) if w is None else w
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_roots_of_singular_blocks_for_draws_have_finite_gradients():
    # u = L eps with L = B^{1/2}: a rank-one B (or a group variance at 0) gave inf / NaN gradients through draws
    from bma_gp import BlockMeanSumLinearOperator, Partition
    from bma_gp.kernels.sum_prediction_strategy import _root_of_block

    g = torch.Generator().manual_seed(9)
    labels = torch.cat([torch.arange(5), torch.randint(0, 5, (25,), generator=g)])
    w = torch.randn(5, 1, generator=g, dtype=DTYPE)
    B = (w @ w.mT).requires_grad_(True)
    v = torch.tensor([0.5, 0.0, 1.0, 0.3, 0.2], dtype=DTYPE, requires_grad=True)
    p = Partition.from_labels(labels)
    for block, diagonal in ((B, False), (v, True)):
        M = BlockMeanSumLinearOperator(torch.ones(30, dtype=DTYPE), block, partitions=[p], diagonal=[diagonal])
        L = _root_of_block(M, 0, DTYPE)
        dense = torch.diag(block) if diagonal else block
        square = torch.diag(L * L) if diagonal else L @ L.mT
        torch.testing.assert_close(square, dense, rtol=0, atol=1e-12)
        (grad,) = torch.autograd.grad((L * torch.arange(1.0, L.numel() + 1, dtype=DTYPE).view_as(L)).sum(), block)
        assert bool(torch.isfinite(grad).all())
