"""Posterior draws at the training inputs of an inducing-point (SGPR) kernel plus ``GroupKernel``s, with base samples.

GPyTorch's ``rsample(base_samples=...)`` takes ``n`` base samples per draw and multiplies them by the covariance's
root, so that root needs ``n`` columns. With SGPR's diagonal correction on (the default in eval mode), the latent
posterior ``model(train_x)`` is ``diag(s) + V V^T`` with ``s`` 0 at the inducing points; its root used to be
``[diag(sqrt s), V]`` (``n + q`` columns) and ``rsample`` failed in a ``view``. The root is now ``n x n`` in closed
form (docs/math.md, "An n x n root"). The references are GPyTorch's dense computation (``gp_reference.dense_copy``).
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

import bma_gp
from bma_gp import ChunkedInducingPointKernel, ClosedFormFallbackWarning, GroupKernel
from bma_gp.kernels.sum_prediction_strategy import TrainingPosteriorLinearOperator
from closed_form_guard import closed_forms_only
from gp_reference import GP, dense_copy

pytestmark = pytest.mark.filterwarnings("ignore:The input matches the stored training data")

DTYPE = torch.float64
N = 60


def sgpr_plus_groups(kernel_class, inducing_at_data: bool, dtype=DTYPE):
    """``(model, likelihood, x)``: SGPR on column 0 plus two crossed ``GroupKernel``s, in eval mode. With
    ``inducing_at_data`` the inducing points are training inputs (a common initialisation), where SGPR's diagonal
    correction, hence ``s``, is 0 or rounding."""
    torch.manual_seed(0)
    x = torch.cat([3 * torch.rand(N, 1), torch.randint(0, 5, (N, 1)), torch.randint(0, 4, (N, 1))], -1).to(dtype)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(dtype)
    likelihood.noise = 0.05
    smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).to(dtype)
    smooth.base_kernel.lengthscale = 0.4
    inducing = x[:7, :1].clone() if inducing_at_data else torch.linspace(0, 3, 7, dtype=dtype).unsqueeze(-1)
    covar = kernel_class(smooth, inducing, likelihood, active_dims=[0])
    covar = covar + GroupKernel(5, active_dims=[1]) + GroupKernel(4, active_dims=[2])
    model = GP(x, torch.randn(N, dtype=dtype), likelihood, covar).to(dtype)
    return model.eval(), likelihood, x


def dense_posteriors(model, likelihood, x):
    reference = dense_copy(model).eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6):
        post = reference(x)
        return post.mean, post.covariance_matrix, likelihood(post).covariance_matrix


@pytest.mark.parametrize("inducing_at_data", [True, False])
@pytest.mark.parametrize("kernel_class", [ChunkedInducingPointKernel, gpytorch.kernels.InducingPointKernel])
def test_base_samples_of_size_n_with_the_diagonal_correction(kernel_class, inducing_at_data):
    model, likelihood, x = sgpr_plus_groups(kernel_class, inducing_at_data)
    mean, latent_ref, noisy_ref = dense_posteriors(model, likelihood, x)
    base = torch.randn(4, 2, N, dtype=DTYPE)
    with closed_forms_only(N), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
        post = model(x)
        covar = post.lazy_covariance_matrix
        assert isinstance(covar, TrainingPosteriorLinearOperator) and covar.diag_kind == "nonnegative"
        if inducing_at_data:
            assert bool((covar.s == 0).any())  # the case that has no Gram-matrix square root
        draws = post.rsample(torch.Size([4, 2]), base_samples=base)
        again = post.rsample(torch.Size([4, 2]), base_samples=base)
        root = covar.root_decomposition().root.to_dense()
        noisy = likelihood(post)
        noisy_draws = noisy.rsample(torch.Size([4, 2]), base_samples=base)
        noisy_root = noisy.lazy_covariance_matrix.root_decomposition().root.to_dense()
    assert root.shape == (N, N) and draws.shape == noisy_draws.shape == (4, 2, N)
    scale = latent_ref.abs().max()
    torch.testing.assert_close(root @ root.mT, latent_ref, rtol=0, atol=1e-11 * scale)
    torch.testing.assert_close(noisy_root @ noisy_root.mT, noisy_ref, rtol=0, atol=1e-11 * scale)
    torch.testing.assert_close(post.mean, mean, rtol=1e-9, atol=1e-12)
    assert torch.equal(draws, again)  # fixed base samples: deterministic
    torch.testing.assert_close(draws, post.mean + base @ root.mT, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(noisy_draws, post.mean + base @ noisy_root.mT, rtol=1e-12, atol=1e-12)


def test_groups_with_more_levels_than_points_take_n_base_samples():
    """Without SGPR (``s = 0``) the root ``[V, 0]`` had ``q`` columns when ``q > n``: now ``n``."""
    torch.manual_seed(1)
    n = 10
    x = torch.stack([torch.randint(0, 30, (n,)), torch.randint(0, 30, (n,))], -1).to(DTYPE)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    covar = GroupKernel(30, active_dims=[0]) + GroupKernel(30, active_dims=[1])
    model = GP(x, torch.randn(n, dtype=DTYPE), likelihood, covar).to(DTYPE).eval()
    _, latent_ref, _ = dense_posteriors(model, likelihood, x)
    base = torch.randn(3, n, dtype=DTYPE)
    # q x q factorisations are larger than n x n here, so closed_forms_only(n) does not apply; no fallback may warn
    with warnings.catch_warnings(), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        post = model(x)
        assert post.lazy_covariance_matrix.q > n
        draws = post.rsample(torch.Size([3]), base_samples=base)
        root = post.lazy_covariance_matrix.root_decomposition().root.to_dense()
    assert root.shape == (n, n) and draws.shape == (3, n)
    torch.testing.assert_close(root @ root.mT, latent_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(draws, post.mean + base @ root.mT, rtol=1e-12, atol=1e-12)


def test_a_batch_with_different_small_diagonals():
    """Rows where ``s`` is tiny in one batch entry only are split off in every entry, exactly."""
    model, _, x = sgpr_plus_groups(ChunkedInducingPointKernel, inducing_at_data=True)
    with torch.no_grad():
        covar = model(x).lazy_covariance_matrix
        s = torch.stack([covar.s, covar.s.clone().index_fill(-1, torch.tensor([20, 30]), 0.0)])
        s[0, :5] = s[0, :5] + 1e-3  # the first entry's inducing points no longer tiny there
        batch = TrainingPosteriorLinearOperator(s, covar.beta, covar.M, diag_kind="nonnegative")
        root = batch.root_decomposition().root.to_dense()
        dense = batch.to_dense()
    assert root.shape == (2, N, N)
    torch.testing.assert_close(root @ root.mT, dense, rtol=0, atol=1e-11 * dense.abs().max())


def test_a_batch_of_models_takes_base_samples_of_size_n():
    torch.manual_seed(0)
    n, batch = 50, torch.Size([2])
    x = torch.cat([3 * torch.rand(n, 1), torch.randint(0, 4, (n, 1))], -1).to(DTYPE)
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch).to(DTYPE)
    likelihood.noise = torch.tensor([[0.05], [0.1]])
    smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(batch_shape=batch), batch_shape=batch)
    group = GroupKernel(4, active_dims=[1], batch_shape=batch)
    group.var = torch.tensor([[0.8], [0.4]])
    covar = ChunkedInducingPointKernel(smooth, x[:6, :1].clone(), likelihood, active_dims=[0]) + group
    model = GP(x, torch.randn(2, n, dtype=DTYPE), likelihood, covar, batch).to(DTYPE).eval()
    _, latent_ref, _ = dense_posteriors(model, likelihood, x)
    base = torch.randn(3, 2, n, dtype=DTYPE)
    with closed_forms_only(n), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
        post = model(x)
        draws = post.rsample(torch.Size([3]), base_samples=base)
        root = post.lazy_covariance_matrix.root_decomposition().root.to_dense()
        noisy = likelihood(post).rsample(torch.Size([3]), base_samples=base)
    assert root.shape == (2, n, n) and draws.shape == noisy.shape == (3, 2, n)
    torch.testing.assert_close(root @ root.mT, latent_ref, rtol=0, atol=1e-11 * latent_ref.abs().max())
    torch.testing.assert_close(draws, post.mean + (root @ base.unsqueeze(-1)).squeeze(-1), rtol=1e-12, atol=1e-12)


def test_gradients_through_the_root_match_the_dense_posterior():
    model, likelihood, x = sgpr_plus_groups(ChunkedInducingPointKernel, inducing_at_data=True)
    weight = torch.randn(N, N, dtype=DTYPE)
    params = [p for p in model.parameters() if p.requires_grad]

    with closed_forms_only(N), gpytorch.settings.max_cholesky_size(0):
        root = model(x).lazy_covariance_matrix.root_decomposition().root.to_dense()
        got = torch.autograd.grad((weight * (root @ root.mT)).sum(), params, allow_unused=True)
    reference = dense_copy(model).eval()
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    with gpytorch.settings.max_cholesky_size(10**6):
        exact = reference(x).covariance_matrix
        want = torch.autograd.grad((weight * exact).sum(), ref_params, allow_unused=True)
    compared = 0
    for g, w in zip(got, want):
        if w is None or not bool(w.abs().gt(1e-9).any()):
            continue
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)
        compared += 1
    assert compared >= 3  # the RBF's lengthscale and scale, the group variances


def test_float32_model_takes_float32_base_samples():
    model, _, x = sgpr_plus_groups(ChunkedInducingPointKernel, inducing_at_data=True, dtype=torch.float32)
    base = torch.randn(3, N)
    with closed_forms_only(N), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
        post = model(x)
        draws = post.rsample(torch.Size([3]), base_samples=base)
        root = post.lazy_covariance_matrix.root_decomposition().root
        dense = post.lazy_covariance_matrix.to_dense()
    assert draws.dtype == root.dtype == torch.float32 and draws.shape == (3, N)
    r = root.to_dense().double()
    torch.testing.assert_close(r @ r.mT, dense.double(), rtol=0, atol=1e-5 * dense.abs().max().item())


def test_past_the_capacitance_limit_the_root_warns_and_takes_n_plus_q_base_samples():
    model, _, x = sgpr_plus_groups(ChunkedInducingPointKernel, inducing_at_data=True)
    with torch.no_grad():
        post = model(x)
        covar = post.lazy_covariance_matrix
        q = covar.q
        with bma_gp.settings.max_capacitance_size(q + 1), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            root = covar.root_decomposition().root
            base = torch.randn(3, N + q, dtype=DTYPE)
            draws = post.rsample(torch.Size([3]), base_samples=base)
    messages = [str(w.message) for w in caught if issubclass(w.category, ClosedFormFallbackWarning)]
    assert root.shape == (N, N + q) and draws.shape == (3, N)
    assert messages and "base_samples" in messages[0] and "max_capacitance_size" in messages[0]
    torch.testing.assert_close(draws, post.mean + base @ root.to_dense().mT, rtol=1e-12, atol=1e-12)


def repeated_inducing_inputs(offset: float):
    """SGPR plus a grouping, with four more training points at (or ``offset`` apart next to) an inducing point, in
    its group: ``s`` is 0 or tiny at five points whose rows of ``V`` (nearly) repeat."""
    torch.manual_seed(0)
    n = 40
    x = torch.cat([3 * torch.rand(n, 1), torch.randint(0, 3, (n, 1))], -1).to(DTYPE)
    x[10:14, 0] = x[0, 0] + offset * torch.arange(1, 5, dtype=DTYPE)
    x[10:14, 1] = x[0, 1]
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    likelihood.noise = 0.05
    smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).to(DTYPE)
    covar = ChunkedInducingPointKernel(smooth, x[:5, :1].clone(), likelihood, active_dims=[0])
    covar = covar + GroupKernel(3, active_dims=[1])
    return GP(x, torch.randn(n, dtype=DTYPE), likelihood, covar).to(DTYPE).eval(), x


@pytest.mark.parametrize("offset", [0.0, 1e-4, 1e-5, 1e-6])
def test_repeated_and_nearly_repeated_inducing_inputs(offset):
    """Tiny ``s`` next to ordinary ones. Splitting off the points with ``s`` below 1e-8 of their variance (instead
    of by the spread of ``s / d``) lost 1.5e-9 of the covariance at offset 1e-5."""
    model, x = repeated_inducing_inputs(offset)
    with torch.no_grad():
        covar = model(x).lazy_covariance_matrix
        root = covar.root_decomposition().root.to_dense()
        dense = covar.to_dense()
    assert root.shape == dense.shape
    torch.testing.assert_close(root @ root.mT, dense, rtol=0, atol=1e-10 * dense.abs().max())


def test_draws_with_base_samples_have_finite_gradients_at_repeated_inputs():
    model, x = repeated_inducing_inputs(0.0)
    draws = model(x).rsample(torch.Size([2]), base_samples=torch.randn(2, x.shape[0], dtype=DTYPE))
    draws.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) >= 4 and all(bool(torch.isfinite(g).all()) for g in grads)


def test_a_root_past_the_limit_of_its_q_x_q_factor_raises_in_words():
    """``q`` past ``max_capacitance_size`` (the capacitance itself still within it): a ``ValueError`` that names the
    limit and the draws that need no such matrix, not a ``view`` error inside GPyTorch's ``rsample``."""
    model, _, x = sgpr_plus_groups(ChunkedInducingPointKernel, inducing_at_data=True)
    with torch.no_grad():
        post = model(x)
        q = post.lazy_covariance_matrix.q
        with bma_gp.settings.max_capacitance_size(q - 1):
            with pytest.raises(ValueError, match="max_capacitance_size.*rsample without base_samples"):
                post.rsample(torch.Size([3]), base_samples=torch.randn(3, N, dtype=DTYPE))
            assert post.rsample(torch.Size([3])).shape == (3, N)  # draws without base samples need no q x q matrix


def test_a_distribution_built_on_the_root_has_the_posterior_variances():
    """``MultivariateNormal(mean, covar.root_decomposition())`` (a root kept for reuse): its variances used to fail
    with ``AttributeError: 'Tensor' object has no attribute '_expand_batch'`` (linear_operator read the root's entries
    through ``_getitem``, which returns a tensor for roots known by products); they are the posterior's, in closed
    form, with no ``n x n`` matrix."""
    from largest_tensor import LargestTensor

    model, likelihood, x = sgpr_plus_groups(ChunkedInducingPointKernel, inducing_at_data=True)
    _, latent_ref, noisy_ref = dense_posteriors(model, likelihood, x)
    rows, cols = torch.tensor([0, 3, 17, 59]), torch.tensor([5, 3, 40, 0])
    with closed_forms_only(N), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
        post = model(x)
        for dist, ref in ((post, latent_ref), (likelihood(post), noisy_ref)):
            product = dist.lazy_covariance_matrix.root_decomposition()
            mode = LargestTensor(square=N)
            with mode:
                variance = gpytorch.distributions.MultivariateNormal(dist.mean, product).variance
            assert not mode.squares, f"n x n matrices from {mode.squares}"
            torch.testing.assert_close(variance, ref.diagonal(), rtol=1e-10, atol=1e-13)
            root = product.root
            torch.testing.assert_close(root[rows, cols], root.to_dense()[rows, cols], rtol=0, atol=1e-15)
            torch.testing.assert_close(product[rows, cols], ref[rows, cols], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("zero_diagonal", [False, True])
def test_draws_with_base_samples_form_no_n_x_n_matrix(zero_diagonal):
    """With SGPR's correction the split root's QR is ``(q + z) x z``; with ``s = 0`` everywhere (the correction off
    and a zero diagonal added) ``[V, 0]`` is square already, where splitting every point would factorise ``n x n``."""
    from largest_tensor import LargestTensor

    model, _, x = sgpr_plus_groups(ChunkedInducingPointKernel, inducing_at_data=True)
    base = torch.randn(3, N, dtype=DTYPE)
    with torch.no_grad(), gpytorch.settings.sgpr_diagonal_correction(not zero_diagonal):
        post = model(x)
        covar = post.lazy_covariance_matrix
        if zero_diagonal:
            covar = covar.add_diagonal(torch.zeros(N, dtype=DTYPE))
            assert covar.diag_kind == "nonnegative"
        dist = gpytorch.distributions.MultivariateNormal(post.mean, covar)
        mode = LargestTensor(square=N)
        with mode:
            draws = dist.rsample(torch.Size([3]), base_samples=base)
        dense = covar.to_dense()
        root = covar.root_decomposition().root.to_dense()
    assert not mode.squares, f"n x n matrices from {mode.squares}"
    assert draws.shape == (3, N) and root.shape == (N, N)
    torch.testing.assert_close(root @ root.mT, dense, rtol=0, atol=1e-12 * dense.abs().max())
