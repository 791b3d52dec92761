"""GroupKernel with a cross-group factor (``rank > 0``) over many groups: a diagonal block term plus a low-rank root.

Past ``FACTOR_DENSE_MAX_GROUPS`` groups the training covariance ``P (diag(v) + W W^T) P^T`` is returned as
``BlockMeanSumLinearOperator(0, v, root=P W, diagonal=[True])`` instead of a block mean operator with a dense
``k x k`` ``B``, and the cross covariance as ``A P^T + W_t (P W)^T``. The tests force that path at small sizes
(threshold 0) and compare it with the dense path and with dense linear algebra: values, losses, gradients,
predictions at seen and unseen groups (through the ``q x q`` posterior weight and through GPyTorch's solve), with
and without a ScaleKernel, and at a size where no ``k x k`` factorisation may run.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, settings
from bma_gp.kernels import GroupKernel, group_kernel, sum_prediction_strategy
from closed_form_guard import closed_forms_only
from test_gp_inference import GP, assert_mll_matches_dense, dense_posterior

DTYPE = torch.float64


def group_data(n=60, num_groups=14, used=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, used, (n,), generator=g)  # ids used .. num_groups - 1 never occur in training
    effect = torch.randn(num_groups, generator=g, dtype=DTYPE)
    y = effect[ids] + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    return ids.to(DTYPE).unsqueeze(-1), y


def make_kernel(num_groups, rank, per_group_variance, batch_shape=None, seed=1):
    batch_shape = torch.Size() if batch_shape is None else batch_shape
    torch.manual_seed(seed)
    kernel = GroupKernel(num_groups, rank=rank, per_group_variance=per_group_variance, batch_shape=batch_shape)
    kernel = kernel.to(DTYPE)
    with torch.no_grad():
        kernel.var = torch.rand(*batch_shape, num_groups if per_group_variance else 1, dtype=DTYPE) + 0.3
    return kernel


def _fit_and_predict(model, x, y, xt):
    """``(loss, gradients, mean, covariance)``: the exact marginal likelihood and its gradients at the training
    inputs, then the posterior at ``xt``, all under ``closed_forms_only``."""
    n = x.shape[-2]
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with closed_forms_only(n):
        loss = mll(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    model.eval()
    with torch.no_grad(), closed_forms_only(n):
        post = model(xt)
        return loss, grads, post.mean, post.covariance_matrix


def _assert_same_fit(factor, dense):
    """Two results of :func:`_fit_and_predict` agree: loss rtol 1e-10, gradients 1e-8, mean and covariance 1e-9."""
    torch.testing.assert_close(factor[0], dense[0], rtol=1e-10, atol=1e-10)
    for a, b in zip(factor[1], dense[1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(factor[2], dense[2], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(factor[3], dense[3], rtol=1e-9, atol=1e-9)


@pytest.fixture
def factor_path(monkeypatch):
    monkeypatch.setattr(group_kernel, "FACTOR_DENSE_MAX_GROUPS", 0)


@pytest.mark.parametrize("per_group_variance", [False, True])
@pytest.mark.parametrize("batch_shape", [torch.Size(), torch.Size([2])])
def test_training_covariance_is_diagonal_term_plus_root(factor_path, per_group_variance, batch_shape):
    kernel = make_kernel(14, 3, per_group_variance, batch_shape)
    x, _ = group_data()
    K = kernel(x).evaluate_kernel()
    assert isinstance(K, BlockMeanSumLinearOperator)
    assert K.diagonal_blocks == (True,) and K.root is not None and K.root.shape[-1] == 3
    ids = x[:, 0].long()
    C = torch.diag_embed(kernel.var.expand(*batch_shape, 14)) + kernel.covar_factor @ kernel.covar_factor.mT
    torch.testing.assert_close(K.to_dense(), C[..., ids, :][..., :, ids], rtol=1e-12, atol=1e-12)
    # the same matrix as the dense path's block mean operator
    with pytest.MonkeyPatch.context() as m:
        m.setattr(group_kernel, "FACTOR_DENSE_MAX_GROUPS", 10**9)
        dense = kernel(x).evaluate_kernel()
    assert isinstance(dense, BlockMeanLinearOperator)
    torch.testing.assert_close(K.to_dense(), dense.to_dense(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scaled", [False, True])
def test_gp_matches_dense_exact_gp(factor_path, monkeypatch, scaled):
    x, y = group_data()
    kernel = make_kernel(14, 2, per_group_variance=True)
    covar = gpytorch.kernels.ScaleKernel(kernel) if scaled else kernel
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = GP(x, y, likelihood, covar).to(DTYPE)
    if scaled:
        model.covar_module.outputscale = 1.7
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    params = list(model.parameters())
    with closed_forms_only(x.shape[0]):
        loss = mll(model(x), y)
        grads = torch.autograd.grad(loss, params)
    scale = model.covar_module.outputscale if scaled else 1.0
    C = scale * (torch.diag(kernel.var.expand(14)) + kernel.covar_factor @ kernel.covar_factor.T)
    ids = x[:, 0].long()
    K = C[ids][:, ids]
    assert_mll_matches_dense(loss, grads, K, likelihood, y, model.mean_module.constant, params)

    xt = torch.tensor([[0.0], [3.0], [12.0], [13.0], [3.0], [7.0]], dtype=DTYPE)  # 12, 13: unseen groups
    model.eval()
    calls, weights = [], []
    real = group_kernel.GroupKernel._factor_cross
    monkeypatch.setattr(group_kernel.GroupKernel, "_factor_cross", lambda s, *a: calls.append(1) or real(s, *a))
    real_weight = sum_prediction_strategy._posterior_weight
    monkeypatch.setattr(sum_prediction_strategy, "_posterior_weight", lambda M: weights.append(1) or real_weight(M))
    with closed_forms_only(x.shape[0]):
        post = model(xt)
        mean, cov = post.mean, post.covariance_matrix
    assert calls  # the cross covariance took the factor form
    assert weights  # and the closed form at new inputs recognised it (with a ScaleKernel too)
    tid = xt[:, 0].long()
    ref_mean, ref_cov = dense_posterior(
        K, likelihood.noise, y, model.mean_module.constant, C[tid][:, ids], C[tid][:, tid]
    )
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(post.variance, torch.diagonal(ref_cov), rtol=1e-9, atol=1e-9)

    # at the training inputs: the sum's closed-form posterior, which can be sampled
    with closed_forms_only(x.shape[0]):
        post_train = model(x)
        mean_train, var_train = post_train.mean, post_train.variance
        sample = post_train.rsample(torch.Size([3]))
    ref_mean, ref_cov = dense_posterior(K, likelihood.noise, y, model.mean_module.constant, K, K)
    torch.testing.assert_close(mean_train, ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(var_train, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-9)
    assert sample.shape == (3, x.shape[0]) and bool(torch.isfinite(sample).all())


def test_prediction_past_the_capacitance_limit_uses_products(factor_path):
    # q = k + 2 past max_capacitance_size: the posterior weight is not formed (that raises, naming q) but applied
    # as products, which factorise only the root's 2 x 2 capacitance; the same posterior as the formed weight.
    x, y = group_data()
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), make_kernel(14, 2, False)).to(DTYPE)
    model.eval()
    k = int(x[:, 0].unique().numel())
    xt = torch.tensor([[1.0], [13.0]], dtype=DTYPE)
    with torch.no_grad(), settings.max_capacitance_size(k + 1):
        post = model(xt)
        W = post.lazy_covariance_matrix.W
        assert isinstance(W, sum_prediction_strategy._ImplicitWeight)
        with pytest.raises(ValueError, match=f"needs a {k + 2} x {k + 2} matrix"):
            sum_prediction_strategy._formed_weight(W.M)
        mean, variance = post.mean, post.variance
    model.train()
    model.eval()
    with torch.no_grad(), settings.max_capacitance_size(k + 2):
        post = model(xt)
        W = post.lazy_covariance_matrix.W  # formed, or G - Sigma as products (every term stable)
        assert torch.is_tensor(W) or (isinstance(W, sum_prediction_strategy._ImplicitWeight) and W.stable)
        torch.testing.assert_close(post.mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(post.variance, variance, rtol=1e-10, atol=1e-12)
        assert bool((variance > 0).all())


def posteriors_in_both_precisions(seen_inputs: bool) -> dict:
    """``{dtype: (mean, variance, covariance operator)}`` (float64 copies of the first two) of ``GroupKernel(305,
    rank=2)`` fitted to 300 groups at n = 20,000, in float32 and float64: about 67 points per group, so the mean at a
    group is a sum over its points of ``M^{-1} r``, which cancels. Test inputs: with ``seen_inputs``, the first 500
    training inputs; else every 7th group and the 5 unseen ones."""
    n, num_groups = 20000, 300
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, num_groups, (n,), generator=g)
    y = torch.randn(num_groups, generator=g)[ids] + 0.5 * torch.randn(n, generator=g)
    test = ids[:500] if seen_inputs else torch.cat([torch.arange(0, num_groups, 7), torch.arange(300, 305)])
    out = {}
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        kernel = GroupKernel(num_groups + 5, rank=2)
        model = GP(ids.unsqueeze(-1).to(dtype), y.to(dtype), gpytorch.likelihoods.GaussianLikelihood(), kernel)
        model = model.to(dtype)
        model.eval()
        with torch.no_grad():
            post = model(test.unsqueeze(-1).to(dtype))
            out[dtype] = post.mean.double(), post.variance.double(), post.lazy_covariance_matrix
    return out


@pytest.mark.parametrize("where", ["new", "training"])
def test_float32_mean_keeps_its_digits(where):
    # the coefficients Z^T M^{-1} r are formed in double precision (GPyTorch's K_*x M^{-1} r in float32 lost 2-3
    # digits of these means)
    res = posteriors_in_both_precisions(seen_inputs=where == "training")
    mean32, mean64 = res[torch.float32][0], res[torch.float64][0]
    assert float((mean32 - mean64).abs().max()) < 1e-4 * float(mean64.abs().max())


def test_many_groups_factorise_nothing_of_the_number_of_groups():
    # the default threshold: 600 groups (> FACTOR_DENSE_MAX_GROUPS) take the factor form without patching
    num_groups, n, rank = 600, 3000, 2
    assert num_groups > group_kernel.FACTOR_DENSE_MAX_GROUPS
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, num_groups, (n,), generator=g)
    x = ids.to(DTYPE).unsqueeze(-1)
    y = torch.randn(num_groups, generator=g, dtype=DTYPE)[ids] + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), GroupKernel(num_groups, rank=rank)).to(DTYPE)
    k = int(ids.unique().numel())
    assert isinstance(model.covar_module(x).evaluate_kernel(), BlockMeanSumLinearOperator)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with closed_forms_only(k):  # no factorisation of a k x k (or larger) matrix, no CG or Lanczos
        loss = mll(model(x), y)
        loss.backward()
    grad = model.covar_module.covar_factor.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and bool((grad != 0).any())
    model.eval()
    xt = torch.tensor([[0.0], [5.0], [599.0]], dtype=DTYPE)
    with torch.no_grad(), closed_forms_only(k):
        variance = model(xt).variance
    assert bool((variance > 0).all())


def test_crossed_with_a_second_grouping_matches_the_dense_path(monkeypatch):
    # (factor | g1) + (1 | g2) in an AdditiveKernel: the two sums combine (their roots and block terms) and the
    # additive kernel's prediction strategy reads the factor's cross covariance
    g = torch.Generator().manual_seed(5)
    n = 80
    x = torch.stack([torch.randint(0, 12, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)], -1).to(DTYPE)
    y = torch.randn(n, generator=g, dtype=DTYPE)
    xt = torch.tensor([[0.0, 1.0], [11.0, 4.0], [13.0, 2.0], [3.0, 6.0]], dtype=DTYPE)  # unseen ids in both columns

    def fit(threshold):
        monkeypatch.setattr(group_kernel, "FACTOR_DENSE_MAX_GROUPS", threshold)
        torch.manual_seed(0)
        covar = GroupKernel(14, rank=2, active_dims=[0]) + GroupKernel(7, active_dims=[1])
        model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), covar).to(DTYPE)
        return _fit_and_predict(model, x, y, xt)

    factor, dense = fit(0), fit(10**9)
    _assert_same_fit(factor, dense)


@pytest.mark.parametrize("rank", [0, 1])
def test_per_point_noise_predicts_new_inputs_through_the_sum_closed_form(monkeypatch, rank):
    # one GroupKernel (dense or diagonal B, below the factor threshold) with per-point noise: the noisy training
    # covariance is a sum, so BlockMeanPredictionStrategy now takes the sums' closed form at new inputs
    g = torch.Generator().manual_seed(0)
    n = 50
    ids = torch.randint(0, 8, (n,), generator=g)
    x = ids.to(DTYPE).unsqueeze(-1)
    y = torch.randn(n, generator=g, dtype=DTYPE)
    noise = torch.rand(n, generator=g, dtype=DTYPE) * 0.2 + 0.05
    torch.manual_seed(0)
    kernel = GroupKernel(10, rank=rank).to(DTYPE)
    model = GP(x, y, gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise), kernel).to(DTYPE)
    model.eval()
    weights = []
    real = sum_prediction_strategy._posterior_weight
    monkeypatch.setattr(sum_prediction_strategy, "_posterior_weight", lambda M: weights.append(1) or real(M))
    xt = torch.tensor([[0.0], [9.0], [3.0], [8.0]], dtype=DTYPE)  # 8, 9: unseen groups
    with torch.no_grad(), closed_forms_only(n):
        post = model(xt)
        mean, cov = post.mean, post.covariance_matrix
    assert weights
    C = kernel.covar_matrix.detach()
    tid = xt[:, 0].long()
    noisy = C[ids][:, ids] + torch.diag(noise)  # the per-point noise in the training covariance, none added
    mean0 = model.mean_module.constant.detach()
    ref_mean, ref_cov = dense_posterior(noisy, 0.0, y, mean0, C[tid][:, ids], C[tid][:, tid])
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-10, atol=1e-10)


def test_sgpr_plus_factor_matches_the_dense_form(monkeypatch):
    # two low-rank roots in one sum (SGPR's and the factor's): prediction at new inputs matches each cross
    # covariance piece to its own columns of the combined root
    from bma_gp.kernels import ChunkedInducingPointKernel

    g = torch.Generator().manual_seed(0)
    n = 200
    t = torch.rand(n, generator=g, dtype=DTYPE)
    ids = torch.randint(0, 20, (n,), generator=g).to(DTYPE)
    x = torch.stack([t, ids], -1)
    y = torch.sin(6 * t) + torch.randn(20, generator=g, dtype=DTYPE)[ids.long()] + 0.1 * torch.randn(n, generator=g)
    xt = torch.tensor([[0.1, 0.0], [0.5, 19.0], [0.9, 21.0]], dtype=DTYPE)  # 21: an unseen group

    def fit(threshold):
        monkeypatch.setattr(group_kernel, "FACTOR_DENSE_MAX_GROUPS", threshold)
        torch.manual_seed(0)
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=(0,)))
        inducing = torch.linspace(0, 1, 8, dtype=DTYPE).unsqueeze(-1)
        covar = ChunkedInducingPointKernel(smooth, inducing, likelihood) + GroupKernel(22, rank=2, active_dims=[1])
        model = GP(x, y, likelihood, covar).to(DTYPE)
        return _fit_and_predict(model, x, y, xt)

    sizes = []
    real = sum_prediction_strategy._posterior_weight
    monkeypatch.setattr(sum_prediction_strategy, "_posterior_weight", lambda M: sizes.append(M._sizes()) or real(M))
    factor, dense = fit(0), fit(10**9)
    k = int(ids.unique().numel())
    assert sizes == [[k, 10], [k, 8]]  # one root: SGPR's 8 columns, then the factor's 2 (the dense form: SGPR's)
    _assert_same_fit(factor, dense)
