"""GroupGaussianLikelihood: one learned noise variance per group, K + diag(sigma^2[g]).

The noisy training covariance is a per-point diagonal plus group terms, so an ExactGP trains and
predicts in closed form: the GP tests run inside ``closed_forms_only(n)`` at ``max_cholesky_size(0)``
and compare with a dense reference assembled entry by entry from the hyperparameters. The last
tests fit simulated data and check that the group noises come back.
"""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanSumLinearOperator, GroupGaussianLikelihood, GroupKernel
from closed_form_guard import closed_forms_only
from lbfgs_fit import lbfgs

DTYPE = torch.float64
K1, K2 = 6, 4  # levels of the two groupings; the last level of each never occurs in training
NOISE = torch.tensor([0.05, 0.4, 0.1, 0.8, 0.2, 0.3], dtype=DTYPE)  # per level of grouping 1


# ---------------------------------------------------------------------------- data, models, references
def grouped_data(n=80, seed=0):
    """Columns: a covariate t, the id of grouping 1 (the noise levels), the id of grouping 2."""
    g = torch.Generator().manual_seed(seed)
    t = 2.0 * torch.rand(n, generator=g, dtype=DTYPE) - 1.0
    a = torch.randint(0, K1 - 1, (n,), generator=g)
    b = torch.randint(0, K2 - 1, (n,), generator=g)
    y = torch.randn(K1, generator=g, dtype=DTYPE)[a] + 0.5 * torch.randn(K2, generator=g, dtype=DTYPE)[b]
    y = y + 0.4 * t + NOISE[a].sqrt() * torch.randn(n, generator=g, dtype=DTYPE)
    return torch.stack([t, a.to(DTYPE), b.to(DTYPE)], -1), y


def new_inputs():
    """Seen levels and the unseen level K1 - 1 of grouping 1."""
    return torch.tensor([[0.1, 0.0, 1.0], [0.5, K1 - 1.0, 2.0], [-0.4, 3.0, 3.0], [0.8, 3.0, 0.0]], dtype=DTYPE)


def kernels_for(case):
    if case == "intercept":  # (1 | g1)
        return [GroupKernel(K1, active_dims=[1])]
    if case == "slopes":  # (1 + t | g1)
        return [GroupKernel(K1, slope=True, active_dims=[1, 0])]
    if case == "crossed":  # (1 | g1) + (1 | g2)
        return [GroupKernel(K1, active_dims=[1]), GroupKernel(K2, active_dims=[2])]
    raise ValueError(case)


def reference_kernel(kernel, a, b):
    """One group kernel's covariance, entry by entry from its parameters."""
    dims = kernel.active_dims.tolist()
    same = (a[:, dims[0], None] == b[None, :, dims[0]]).to(DTYPE)
    if not kernel.slope:
        return kernel.var[0] * same
    v0, v1 = kernel.var[0], kernel.var[1]
    s01 = kernel.corr[0] * torch.sqrt(v0 * v1)
    xa, xb = a[:, dims[1], None], b[None, :, dims[1]]
    return (v0 + s01 * (xa + xb) + v1 * xa * xb) * same


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernels):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        covar = kernels[0]
        for kernel in kernels[1:]:
            covar = covar + kernel
        self.covar_module = covar
        self.kernels = kernels

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def build(case, store_train_inputs=True, seed=0):
    x, y = grouped_data(seed=seed)
    likelihood = GroupGaussianLikelihood(K1, group_dim=1, train_inputs=x if store_train_inputs else None)
    model = GP(x, y, likelihood, kernels_for(case)).to(DTYPE)
    likelihood.noise = torch.linspace(0.1, 0.6, K1, dtype=DTYPE)
    for j, kernel in enumerate(model.kernels):
        kernel.var = torch.linspace(0.7, 1.1, kernel.raw_var.shape[-1], dtype=DTYPE) + 0.2 * j
        if kernel.correlated:
            kernel.corr = 0.35
    model.mean_module.constant.data.fill_(0.25)
    return model, x, y


def dense_prior(model, a, b):
    return sum(reference_kernel(kernel, a, b) for kernel in model.kernels)


def dense_noise(model, x):
    return model.likelihood.noise[x[:, 1].long()]


def dense_mll(model, x, y):
    covar = dense_prior(model, x, x) + torch.diag(dense_noise(model, x))
    mean = model.mean_module.constant.expand(y.shape[0])
    return torch.distributions.MultivariateNormal(mean, covar).log_prob(y) / y.shape[0]


# ---------------------------------------------------------------------------- the likelihood on its own
def test_noise_per_point_from_inputs_groups_or_training_inputs():
    x, _ = grouped_data(n=10)
    likelihood = GroupGaussianLikelihood(K1, group_dim=1).to(DTYPE)
    likelihood.noise = NOISE
    f = gpytorch.distributions.MultivariateNormal(torch.zeros(10, dtype=DTYPE), torch.eye(10, dtype=DTYPE))
    expected = 1.0 + NOISE[x[:, 1].long()]
    with torch.no_grad():
        torch.testing.assert_close(likelihood(f, x).variance, expected)
        torch.testing.assert_close(likelihood(f, [x]).variance, expected)  # GPyTorch's train_inputs
        torch.testing.assert_close(likelihood(f, groups=x[:, 1].long()).variance, expected)
        torch.testing.assert_close(likelihood(f, x[:, 1]).variance, expected)  # a 1-D tensor of ids
        with pytest.raises(ValueError, match="train_inputs"):  # training mode, nothing stored
            likelihood(f)
        likelihood.set_train_inputs(x)
        torch.testing.assert_close(likelihood(f).variance, expected)
        with pytest.raises(ValueError, match="hold 5 points"):
            likelihood(f, x[:5])
        likelihood.eval()
        with pytest.raises(ValueError, match=r"likelihood\(model\(x\), x\)"):  # eval mode: inputs required
            likelihood(f)
        torch.testing.assert_close(likelihood(f, x).variance, expected)
        # GPyTorch's explicit noise keyword still wins
        torch.testing.assert_close(
            likelihood(f, x, noise=torch.full((10,), 0.5, dtype=DTYPE)).variance, 1.5 + 0 * expected
        )


def test_arguments_and_ids_are_checked():
    with pytest.raises(ValueError, match="num_groups"):
        GroupGaussianLikelihood(0)
    with pytest.raises(TypeError, match="group_dim"):
        GroupGaussianLikelihood(3, group_dim=1.0)
    with pytest.raises(ValueError, match="unseen"):
        GroupGaussianLikelihood(3, unseen="zero")
    likelihood = GroupGaussianLikelihood(3, group_dim=2)
    f = gpytorch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="group_dim=2"):
        likelihood(f, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="group id"):
        likelihood(f, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 3.0]]))
    with pytest.raises(ValueError, match="group id"):
        likelihood(f, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.5]]))
    with pytest.raises(ValueError, match="one value per group"):
        likelihood.noise = torch.ones(2)
    likelihood.raw_noise.data.fill_(-50.0)
    assert bool((likelihood.noise > 0).all())


def test_unseen_levels_mean_noise_or_error_and_state_dict():
    x, _ = grouped_data(n=30)  # levels 0 .. K1 - 2 of grouping 1
    likelihood = GroupGaussianLikelihood(K1, group_dim=1, train_inputs=x).to(DTYPE)
    likelihood.noise = NOISE
    seen = torch.unique(x[:, 1].long())
    assert likelihood.observed.tolist() == [i in seen.tolist() for i in range(K1)]
    likelihood.eval()
    xt = new_inputs()
    f = gpytorch.distributions.MultivariateNormal(torch.zeros(4, dtype=DTYPE), torch.eye(4, dtype=DTYPE))
    with torch.no_grad():
        variance = likelihood(f, xt).variance
    assert variance[1].item() == pytest.approx(1.0 + NOISE[seen].mean().item(), rel=1e-12)
    torch.testing.assert_close(variance[[0, 2, 3]], 1.0 + NOISE[[0, 3, 3]])
    strict = GroupGaussianLikelihood(K1, group_dim=1, unseen="error").to(DTYPE)
    strict.load_state_dict(likelihood.state_dict())  # the observed levels travel with the state dict
    assert torch.equal(strict.observed, likelihood.observed)
    strict.eval()
    with pytest.raises(ValueError, match=f"group {K1 - 1} was not in the training data"):
        strict(f, xt)
    f2 = gpytorch.distributions.MultivariateNormal(torch.zeros(2, dtype=DTYPE), torch.eye(2, dtype=DTYPE))
    torch.testing.assert_close(strict(f2, xt[[0, 2]]).variance.detach(), 1.0 + NOISE[[0, 3]])


def test_batched_noise():
    likelihood = GroupGaussianLikelihood(3, group_dim=0, batch_shape=torch.Size([2])).to(DTYPE)
    likelihood.noise = torch.tensor([[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]], dtype=DTYPE)
    x = torch.tensor([[2.0], [0.0], [2.0]], dtype=DTYPE)
    f = gpytorch.distributions.MultivariateNormal(torch.zeros(3, dtype=DTYPE), torch.eye(3, dtype=DTYPE))
    with torch.no_grad():
        variance = likelihood(f, x).variance
    torch.testing.assert_close(variance, 1.0 + torch.tensor([[0.3, 0.1, 0.3], [3.0, 1.0, 3.0]], dtype=DTYPE))


# ---------------------------------------------------------------------------- the GP, closed form only
@pytest.mark.parametrize("pass_inputs", [False, True], ids=["mll(output, y)", "mll(output, y, x)"])
@pytest.mark.parametrize("case", ["intercept", "slopes", "crossed"])
def test_marginal_likelihood_and_gradients_match_dense(case, pass_inputs):
    model, x, y = build(case, store_train_inputs=not pass_inputs)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    model.train()
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
        output = model(x)
        noisy = model.likelihood(output, x).lazy_covariance_matrix
        assert isinstance(noisy, BlockMeanSumLinearOperator)
        loss = mll(output, y, x) if pass_inputs else mll(output, y)
        grads = torch.autograd.grad(loss, params)
    ref = dense_mll(model, x, y)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    ref_grads = torch.autograd.grad(ref, params)
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-11, msg=f"gradient of {name}")
    # the training levels are recorded; the unseen one is not
    assert model.likelihood.observed.tolist() == [True] * (K1 - 1) + [False]


@pytest.mark.parametrize("fast_pred_var", [False, True])
@pytest.mark.parametrize("case", ["intercept", "slopes", "crossed"])
def test_prediction_matches_dense_posterior(case, fast_pred_var):
    model, x, y = build(case)
    model.train()
    model(x)  # a training-mode call, as in fitting
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
        predictive = model.likelihood(post, xt)
        pred_var = predictive.variance
    with torch.no_grad():
        covar = dense_prior(model, x, x) + torch.diag(dense_noise(model, x))
        cross = dense_prior(model, xt, x)
        c = model.mean_module.constant
        ref_mean = c + cross @ torch.linalg.solve(covar, y - c)
        ref_cov = dense_prior(model, xt, xt) - cross @ torch.linalg.solve(covar, cross.T)
        noise = model.likelihood.noise
        seen = model.likelihood.observed
        test_noise = torch.where(seen[xt[:, 1].long()], noise[xt[:, 1].long()], noise[seen].mean())
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(pred_var, torch.diagonal(ref_cov) + test_noise, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", ["intercept", "crossed"])
def test_rsample_at_training_inputs_is_closed_form(case):
    model, x, y = build(case)
    model.train()
    model(x)
    model.eval()
    torch.manual_seed(2)
    with (
        closed_forms_only(x.shape[0]),
        gpytorch.settings.max_cholesky_size(0),
        gpytorch.settings.debug(False),  # predicting at the training inputs on purpose
        torch.no_grad(),
    ):
        draws = model(x).rsample(torch.Size([3000]))
    with torch.no_grad():
        prior = dense_prior(model, x, x)
        covar = prior + torch.diag(dense_noise(model, x))
        c = model.mean_module.constant
        ref_mean = c + prior @ torch.linalg.solve(covar, y - c)
        ref_var = torch.diagonal(prior - prior @ torch.linalg.solve(covar, prior))
    assert bool(((draws.mean(0) - ref_mean).abs() <= 5 * ref_var.clamp_min(0).sqrt() / math.sqrt(3000) + 1e-9).all())
    assert draws.var(0).sub(ref_var).abs().max().item() < 0.2 * ref_var.max().item()


# ---------------------------------------------------------------------------- recovering the noises
def simulate(seed=5, per_group=300):
    """Four groups with noise variances 0.05 .. 1.0, a random intercept of variance 1 and a linear trend."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.tensor([0.05, 0.2, 0.5, 1.0], dtype=DTYPE)
    ids = torch.arange(4).repeat_interleave(per_group)
    t = torch.rand(ids.shape[0], generator=g, dtype=DTYPE)
    y = 1.0 + 2.0 * t + torch.randn(4, generator=g, dtype=DTYPE)[ids]
    y = y + noise[ids].sqrt() * torch.randn(ids.shape[0], generator=g, dtype=DTYPE)
    return torch.stack([t, ids.to(DTYPE)], -1), y, noise


class TrendGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.LinearMean(1)
        self.covar_module = GroupKernel(4, active_dims=[1])

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x[..., :1]), self.covar_module(x))


def fit(model, x, y):
    optimizer, closure = lbfgs(model, x, y, max_iter=300)
    model.train()
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
        optimizer.step(closure)
        return -closure().item() * y.shape[0]


def test_training_recovers_the_group_noises():
    x, y, truth = simulate()
    model = TrendGP(x, y, GroupGaussianLikelihood(4, group_dim=1, train_inputs=x)).to(DTYPE)
    loglik = fit(model, x, y)
    fitted = model.likelihood.noise.detach()
    # 300 points per group: the ML estimate of a variance has a relative sd of about sqrt(2 / 300) = 8%
    torch.testing.assert_close(fitted, truth, rtol=0.25, atol=0)
    assert torch.equal(torch.argsort(fitted), torch.arange(4))
    # a single noise for all groups fits these data much worse
    homoskedastic = TrendGP(x, y, gpytorch.likelihoods.GaussianLikelihood()).to(DTYPE)
    assert loglik > fit(homoskedastic, x, y) + 50.0
    # the per-group residual variances of the fitted model agree with the noises (a check independent of the mll)
    model.eval()
    with torch.no_grad(), gpytorch.settings.debug(False):  # predicting at the training inputs on purpose
        residual = y - model(x).mean
    for level in range(4):
        spread = residual[x[:, 1] == level].var().item()
        assert spread == pytest.approx(truth[level].item(), rel=0.3), level
    assert math.isfinite(loglik)
