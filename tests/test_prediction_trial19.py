"""Gradients of predictions of an inducing-point kernel summed with group kernels under ``detach_test_caches``.

GPyTorch's default ``detach_test_caches(True)`` holds the mean cache :math:`\\alpha = M^{-1}(y - m)` fixed and, with
eagerly evaluated kernels, the noisy training covariance of the predictive covariance (docs/gp.md, "Gradients of
predictions"), but differentiates the whole test-by-training covariance. For ``ChunkedInducingPointKernel +
GroupKernel`` that is :math:`U_* U_x^\\top`, whose training side :math:`U_x` depends on the inducing points, the base
kernel's hyperparameters and the training inputs (a fantasy model's fantasy inputs). The sum's closed forms read the
training side from the detached training covariance, so those dependences were cut: gradients of the mean with
respect to the inducing points were 14.7 against GPyTorch's 4.3, and with respect to a fantasy model's fantasy inputs
exactly 0. The references are the same models with the kernel evaluated densely (``tests/gp_reference.py``).
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import GroupKernel
from bma_gp.kernels import ChunkedInducingPointKernel
from bma_gp.kernels.sum_prediction_strategy import PredictiveCovarianceLinearOperator
from bma_gp.likelihoods import GroupGaussianLikelihood
from closed_form_guard import closed_forms_only
from gp_reference import GP, dense_copy

DTYPE = torch.float64
N, GROUPS = 40, 6


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, 2, generator=g, dtype=DTYPE)
    ids = (torch.arange(N) % (GROUPS - 1)).to(DTYPE).unsqueeze(-1)
    X = torch.cat([x, ids], -1)
    y = (
        torch.sin(4 * x[:, 0])
        + torch.cos(3 * x[:, 1])
        + 0.3 * ids[:, 0]
        + 0.05 * torch.randn(N, generator=g, dtype=DTYPE)
    )
    return X, y


def new_inputs(batch=()):
    xs = torch.tensor([[0.5, 0.5, 3.0], [0.1, 0.9, 3.0], [0.3, 0.3, 1.0], [0.8, 0.6, 5.0]], dtype=DTYPE)
    return xs.expand(*batch, *xs.shape).clone()


def build(likelihood="gauss", scaled=False):
    X, y = data()
    if likelihood == "gauss":
        lik = gpytorch.likelihoods.GaussianLikelihood()
    elif likelihood == "fixed":
        noise = 0.01 + 0.02 * torch.rand(N, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
        lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise)
    else:
        lik = GroupGaussianLikelihood(GROUPS, group_dim=2, train_inputs=X)
    Z = torch.rand(8, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    if scaled:  # the outputscale outside the inducing-point kernel: its root is sqrt(c) U on both sides
        smooth = gpytorch.kernels.ScaleKernel(
            ChunkedInducingPointKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2), Z, lik, active_dims=[0, 1])
        )
    else:
        smooth = ChunkedInducingPointKernel(
            gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2)), Z, lik, active_dims=[0, 1]
        )
    model = GP(X, y, lik, smooth + GroupKernel(GROUPS, active_dims=[2])).to(DTYPE)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "raw" in name:
                p.copy_(-1.0 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.eval()
    return model, X


def objective(post, base):
    """Mean, variances, one covariance entry and draws: every way the predictive covariance is read."""
    cov = post.lazy_covariance_matrix
    draws = post.rsample(torch.Size([2]), base_samples=base)
    return (
        post.mean.square().sum()
        + post.variance.sum()
        + cov[..., 0, 1].sum()
        + cov.to_dense()[..., 1, 2].sum()
        + (draws * torch.linspace(0.5, 1.5, draws.shape[-1], dtype=DTYPE)).sum()
    )


def gradients(model, params, xt, base, eager):
    """Gradients of :func:`objective` at ``xt``; ``eager``: GPyTorch with eagerly evaluated kernels (the reference
    whose ``detach_test_caches`` holds the training covariance fixed, as docs/gp.md says the package does)."""
    with warnings.catch_warnings(), gpytorch.settings.lazily_evaluate_kernels(not eager):
        warnings.simplefilter("ignore")
        with gpytorch.settings.max_cholesky_size(10**6):
            post = model(xt)
            value = objective(post, base)
        grads = torch.autograd.grad(value, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    return post, value, grads


def reference_params(model, reference):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = dict(reference.named_parameters())
    return (
        [dict(model.named_parameters())[n] for n in names],
        [ref[n.replace("covar_module.", "covar_module.kernel.", 1)] for n in names],
        names,
    )


@pytest.mark.parametrize("likelihood", ["gauss", "fixed", "group"])
@pytest.mark.parametrize("scaled", [False, True])
def test_gradients_at_new_inputs_match_gpytorch(likelihood, scaled):
    model, X = build(likelihood, scaled)
    reference = dense_copy(model)
    params, ref_params, names = reference_params(model, reference)
    assert any("inducing_points" in n for n in names)
    xt = new_inputs()
    base = torch.randn(2, xt.shape[-2], generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    with closed_forms_only(N):
        post, value, grads = gradients(model, params, xt, base, eager=False)
    assert isinstance(post.lazy_covariance_matrix, PredictiveCovarianceLinearOperator)
    _, ref_value, ref_grads = gradients(reference, ref_params, xt, base, eager=True)
    torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-10)
    for name, g, r in zip(names, grads, ref_grads):
        assert float(r.abs().max()) > 0 or "raw_noise" in name  # the reference has a gradient to compare with
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_gradients_at_new_inputs_match_gpytorch_with_the_weight_as_products(monkeypatch):
    """The weight applied as products (:class:`_ImplicitWeight`) and a batch of test sets."""
    import bma_gp.kernels.sum_prediction_strategy as sps

    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)

    monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W past it, not G - Sigma
    model, X = build("gauss")
    reference = dense_copy(model)
    params, ref_params, names = reference_params(model, reference)
    xt = new_inputs(batch=(2,))
    xt[1, :, :2] = xt[1, :, :2].flip(-1)
    base = torch.randn(2, 2, xt.shape[-2], generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    with closed_forms_only(N):
        post, value, grads = gradients(model, params, xt, base, eager=False)
    assert isinstance(post.lazy_covariance_matrix.W, sps._ImplicitWeight)
    _, ref_value, ref_grads = gradients(reference, ref_params, xt, base, eager=True)
    torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-10)
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_values_are_unchanged_and_nothing_is_added_without_gradients():
    """The term that carries the training side's graph is zero: the numbers are those of a prediction without
    gradients, bit for bit; without gradients (or with no parameter that needs them) it is not built."""
    model, X = build("gauss")
    xt = new_inputs()
    with torch.no_grad():
        post0 = model(xt)
        mean0, var0, cov0 = post0.mean, post0.variance, post0.covariance_matrix
    assert post0.lazy_covariance_matrix.graph is None
    post = model(xt)
    graph = post.lazy_covariance_matrix.graph
    assert graph is not None
    assert not bool(graph[1].any())  # the term that carries the graph is zero, exactly
    assert torch.equal(post.mean.detach(), mean0)
    # the weight applied as products (every term in the stable form: G - Sigma) is formed once q columns have been
    # asked for, counted over the predictions that share it: the strategy's weight without gradients, a fresh one
    # with them, so the two may round differently
    torch.testing.assert_close(post.variance.detach(), var0, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(post.covariance_matrix.detach(), cov0, rtol=1e-13, atol=1e-15)
    for p in model.parameters():
        p.requires_grad_(False)
    assert model(xt).lazy_covariance_matrix.graph is None


@pytest.mark.parametrize("what", ["mean", "variance"])
@pytest.mark.parametrize("likelihood", ["gauss", "fixed"])
def test_fantasy_input_gradients_match_gpytorch(what, likelihood):
    """The knowledge-gradient pattern: a fantasy model at candidate inputs, its posterior at other inputs,
    differentiated with respect to the candidates (0 before: the fantasy inputs enter through the training root)."""
    model, X = build(likelihood)
    reference = dense_copy(model)
    xf0 = torch.tensor([[[0.2, 0.4, 3.0], [0.7, 0.1, 3.0]]], dtype=DTYPE)
    yf = torch.tensor([[[1.5, -0.5]]], dtype=DTYPE)
    xt = new_inputs(batch=(1,))
    out = []
    for m in (model, reference):
        xf = xf0.clone().requires_grad_(True)
        with warnings.catch_warnings(), gpytorch.settings.max_cholesky_size(10**6):
            warnings.simplefilter("ignore")
            with torch.no_grad():
                m(xt)
            kwargs = {"noise": torch.full(xf.shape[:-1], 0.02, dtype=DTYPE)} if likelihood == "fixed" else {}
            fantasy = m.get_fantasy_model(xf, yf, **kwargs)
            with gpytorch.settings.lazily_evaluate_kernels(m is model):
                value = getattr(fantasy(xt), what).sum()
        out.append((value, torch.autograd.grad(value, xf)[0]))
    (value, grad), (ref_value, ref_grad) = out
    torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-10)
    assert float(ref_grad.abs().max()) > 1e-3
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("likelihood", ["gauss", "fixed"])
def test_mean_gradients_at_the_training_inputs_match_gpytorch(likelihood):
    """At the training inputs the prior :math:`K = c_0 + U U^\\top + \\ldots` enters :math:`K \\alpha` through both
    roots; GPyTorch (lazily evaluated kernels: the posterior at the training points) differentiates both."""
    model, X = build(likelihood)
    reference = dense_copy(model)
    params, ref_params, names = reference_params(model, reference)
    grads = []
    for m, ps in ((model, params), (reference, ref_params)):
        with warnings.catch_warnings(), gpytorch.settings.max_cholesky_size(10**6):
            warnings.simplefilter("ignore")
            value = m(X).mean.square().sum()
        grads.append(torch.autograd.grad(value, ps, allow_unused=True))
    for name, g, r, p in zip(names, *grads, params):
        g = torch.zeros_like(p) if g is None else g
        r = torch.zeros_like(p) if r is None else r
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def _block_mean_model(likelihood, with_groups):
    from bma_gp import BlockMeanKernel, Partition

    X, y = data()
    cell = (X[:, 0] * 3).floor().clamp(max=2) * 3 + (X[:, 1] * 3).floor().clamp(max=2)
    labels = torch.unique(cell, return_inverse=True)[1]
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2, active_dims=[0, 1]))
    kernel = BlockMeanKernel(base, X, Partition.from_labels(labels))
    if with_groups:
        kernel = kernel + GroupKernel(GROUPS, active_dims=[2])
    if likelihood == "fixed":
        lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(
            noise=0.01 + 0.02 * torch.rand(N, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
        )
    else:
        lik = gpytorch.likelihoods.GaussianLikelihood()
    model = GP(X, y, lik, kernel).to(DTYPE)
    model.eval()
    return model, X


def _assert_joint_like_dense(model, x, mean, covar) -> None:
    """``mean`` and ``covar`` of ``model(x)`` against the dense model's (GPyTorch's Cholesky on the kernel matrix)."""
    reference = dense_copy(model)
    with torch.no_grad(), warnings.catch_warnings(), gpytorch.settings.max_cholesky_size(10**6):
        warnings.simplefilter("ignore")
        ref = reference(x)
        torch.testing.assert_close(mean, ref.mean, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(covar, ref.covariance_matrix, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(("likelihood", "with_groups"), [("fixed", False), ("gauss", True), ("fixed", True)])
def test_joint_posterior_with_the_training_inputs_names_its_cause(likelihood, with_groups):
    """BoTorch's qNEI pattern, model(cat(train_x, new_x)), with a BlockMeanKernel in a sum (or per-point noise): the
    warning says that the test inputs start with the training inputs, not that group ids or partitions differ."""
    from bma_gp import ClosedFormFallbackWarning

    model, X = _block_mean_model(likelihood, with_groups)
    xc = torch.tensor([[0.3, 0.6, 1.0], [0.8, 0.2, 4.0]], dtype=DTYPE)
    with torch.no_grad(), pytest.warns(ClosedFormFallbackWarning) as record:
        post = model(torch.cat([X, xc]))
        covar = post.covariance_matrix
    messages = [str(w.message) for w in record if issubclass(w.category, ClosedFormFallbackWarning)]
    assert any("start with the training inputs" in m for m in messages), messages
    assert not any("Group ids, partitions" in m for m in messages), messages
    _assert_joint_like_dense(model, torch.cat([X, xc]), post.mean, covar)


def test_joint_posterior_with_the_training_inputs_samples_exactly():
    """BoTorch's qNEI pattern on a BlockMeanKernel with a GaussianLikelihood (no warning, as documented): its
    covariance was GPyTorch's K_** - K_*x (K + D)^{-1} K_x*, which linear_operator rooted by Lanczos past
    max_cholesky_size (a user trial at n = 1000: a rank-96 root 100% off at the training rows, and base samples of
    shape (S, n + q) did not fit it). Its roots and draws now take one exact factorisation of the joint matrix, and
    no CG or Lanczos runs (max_cholesky_size lowered so that the old path took Lanczos at this size, and
    max_eager_kernel_size so that GPyTorch keeps the covariances lazy, as it does past 512 joint points)."""
    model, X = _block_mean_model("gauss", False)
    xc = torch.tensor([[0.3, 0.6, 1.0], [0.8, 0.2, 4.0]], dtype=DTYPE)
    t = N + xc.shape[0]
    small = gpytorch.settings.max_cholesky_size(10), gpytorch.settings.max_eager_kernel_size(0)
    with torch.no_grad(), warnings.catch_warnings(), small[0], small[1]:
        warnings.simplefilter("error")
        with closed_forms_only(10**6):  # no CG or Lanczos; the exact (n + q) x (n + q) factorisation is allowed
            post = model(torch.cat([X, xc]))
            covar = post.covariance_matrix
            root = post.lazy_covariance_matrix.root_decomposition().root.to_dense()
            draws = post.rsample(torch.Size([t]), base_samples=torch.eye(t, dtype=DTYPE))
    torch.testing.assert_close(root @ root.mT, covar, rtol=1e-10, atol=1e-12)
    centred = draws - post.mean
    torch.testing.assert_close(centred.mT @ centred, covar, rtol=1e-10, atol=1e-12)
    _assert_joint_like_dense(model, torch.cat([X, xc]), post.mean, covar)


def test_joint_posterior_with_the_training_inputs_above_the_capacitance_limit_says_so():
    """Past bma_gp.settings.max_capacitance_size joint points the exact factorisation is not formed: GPyTorch's path
    follows (its roots Lanczos past max_cholesky_size), with a warning that names the limit; the values match."""
    from bma_gp import ClosedFormFallbackWarning, settings

    model, X = _block_mean_model("gauss", False)
    xc = torch.tensor([[0.3, 0.6, 1.0], [0.8, 0.2, 4.0]], dtype=DTYPE)
    with torch.no_grad(), gpytorch.settings.max_eager_kernel_size(0), settings.max_capacitance_size(N):
        with pytest.warns(ClosedFormFallbackWarning, match="max_capacitance_size = 40"):
            post = model(torch.cat([X, xc]))
            covar = post.covariance_matrix
    _assert_joint_like_dense(model, torch.cat([X, xc]), post.mean, covar)
