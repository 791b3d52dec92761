"""Mixed-effects models as a statsmodels / lme4 user builds them: GroupKernel, GroupGaussianLikelihood, their
arguments and inputs, against dense references."""

from __future__ import annotations

import io
import warnings

import gpytorch
import numpy as np
import pytest
import torch

from bma_gp import ClosedFormFallbackWarning, GroupGaussianLikelihood, GroupKernel
from bma_gp.partition_builders import group_partition
from closed_form_guard import closed_forms_only
from gp_reference import GP, dense_copy, dense_prediction

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64


@pytest.mark.parametrize(
    "count",
    [np.int64(5), np.int32(5), torch.tensor(5), torch.tensor([3, 4]).max() + 1],
    ids=["numpy-int64", "numpy-int32", "tensor", "ids.max()+1"],
)
def test_integer_counts_of_any_integer_type(count):
    """``GroupKernel(ids.max() + 1)`` with NumPy or torch ids: an integer is an integer (as for Partition)."""
    kernel = GroupKernel(count, rank=np.int64(2), per_group_variance=True)
    assert kernel.num_groups == 5 and type(kernel.num_groups) is int and kernel.rank == 2
    assert kernel.var.shape == (5,) and kernel.covar_factor.shape == (5, 2)
    likelihood = GroupGaussianLikelihood(count)
    assert likelihood.num_groups == 5 and likelihood.noise.shape == (5,)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: GroupKernel(5.0), "num_groups must be a positive int"),
        (lambda: GroupKernel(True), "num_groups must be a positive int"),
        (lambda: GroupKernel(torch.tensor(5.0)), "num_groups must be a positive int"),
        (lambda: GroupKernel(np.int64(0)), "num_groups must be a positive int"),
        (lambda: GroupKernel(4, rank=1.0), r"rank must be an int in \[0, num_groups=4\]"),
        (lambda: GroupKernel(4, rank=np.int64(5)), r"rank must be an int in \[0, num_groups=4\]"),
        (lambda: GroupGaussianLikelihood(2.5), "num_groups must be a positive int"),
    ],
)
def test_counts_that_are_not_integers_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_float_ids_past_the_exact_integers_raise_instead_of_merging_groups():
    """In float32, ids 2^24 and 2^24 + 1 are one number: two groups would silently become one."""
    ids = torch.tensor([2**24 + 1, 2**24, 5])
    kernel = GroupKernel(2**25)
    with pytest.raises(ValueError, match=r"group ids of 16777216 or more in torch.float32.*float64"):
        kernel(ids.float().unsqueeze(-1)).to_dense()
    likelihood = GroupGaussianLikelihood(2**25)
    with pytest.raises(ValueError, match="group ids of 16777216 or more"):
        likelihood.set_train_inputs(ids.float())
    with pytest.raises(ValueError, match="not exact integers"):
        group_partition(ids.float())
    with pytest.raises(ValueError, match="not exact integers"):
        group_partition(torch.tensor([2048.0, 3.0], dtype=torch.float16))
    # the same ids in float64 are exact: three groups, and the kernel tells the first two apart
    covar = kernel(ids.double().unsqueeze(-1)).to_dense()
    torch.testing.assert_close(covar, kernel.var * torch.eye(3))
    assert group_partition(ids.double()).num_blocks == 3
    # below the limit float32 ids keep working
    small = GroupKernel(2**24)(torch.tensor([[2.0**24 - 1], [3.0], [2.0**24 - 1]]))
    assert small.to_dense()[0, 2] > 0 and small.to_dense()[0, 1] == 0


class SlopesGP(gpytorch.models.ExactGP):
    """``y ~ x + (1 + x | g)``: column 0 the covariate, column 1 the group id."""

    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.LinearMean(1)
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x[..., :1]), self.covar_module(x))


def grouped_data(n=40, k=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    g = torch.randint(0, k, (n,), generator=generator)
    x = torch.randn(n, generator=generator, dtype=DTYPE)
    y = 1 + 0.5 * x + torch.randn(k, generator=generator, dtype=DTYPE)[g] + 0.3 * torch.randn(n, dtype=DTYPE)
    return torch.stack([x, g.to(DTYPE)], -1), y


@pytest.mark.parametrize("slope", [True, False])
def test_models_with_priors_pickle(slope):
    """``torch.save(model)`` with priors on the group covariance and the per-group noise, as with GPyTorch's own
    ``GaussianLikelihood(noise_prior=...)``: the loaded model has the same marginal likelihood, prior terms included."""
    x, y = grouped_data()
    size = 2 if slope else 6
    prior = gpytorch.priors.LKJCovariancePrior(size, 2.0, gpytorch.priors.GammaPrior(2.0, 2.0))
    kernel = GroupKernel(6, slope=slope, prior=prior, active_dims=[1, 0] if slope else [1])
    likelihood = GroupGaussianLikelihood(
        6, group_dim=1, train_inputs=x, noise_prior=gpytorch.priors.GammaPrior(2.0, 4.0)
    )
    model = SlopesGP(x, y, likelihood, kernel).to(DTYPE)
    names = {name for name, *_ in model.named_priors()}
    assert names == {"covar_module.GroupKernelPrior", "likelihood.noise_covar.noise_prior"}
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)

    def mll(m):
        return gpytorch.mlls.ExactMarginalLogLikelihood(m.likelihood, m)(m(x), y)

    torch.testing.assert_close(mll(loaded), mll(model), rtol=1e-12, atol=0)
    loaded.likelihood.noise_covar.noise_prior.rate.fill_(1.0)
    assert not torch.allclose(mll(loaded), mll(model))  # the loaded prior is used, and it is its own copy


@pytest.mark.parametrize("missing", [None, float("nan"), np.nan], ids=["None", "nan", "numpy-nan"])
def test_string_labels_with_a_missing_value_say_so(missing):
    """Names with a gap (a pandas column of strings reads the same): the error names the missing label and its row,
    not 'mixed kinds of id'."""
    labels = np.array(["b", "a", missing, "b"], dtype=object)
    with pytest.raises(ValueError, match="missing label .* at position 2.*fill .* or drop"):
        group_partition(labels)
    with pytest.raises(ValueError, match="missing label"):
        group_partition(list(labels))
    assert group_partition(["b", "a", "unknown", "b"]).labels.tolist() == [1, 0, 2, 1]
    with pytest.raises(ValueError, match="mix strings with other objects"):  # a number among names stays that error
        group_partition(["b", "a", 3, "b"])


def InterceptGP(x, y, kernel) -> GP:
    return GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel)


@pytest.mark.parametrize("num_groups", [20, 300])  # the dense B and (past 256 groups) the factor form
def test_unseen_levels_of_a_rank_kernel_keep_their_initial_rows(num_groups):
    """docs/gp.md: an unseen id's row of W gets no gradient (so it stays random and its effect is arbitrary); with
    its row zeroed the prediction there is the mean with the prior variance v, as with rank 0."""
    generator = torch.Generator().manual_seed(1)
    g = torch.randint(0, 10, (200,), generator=generator)
    y = torch.randn(10, generator=generator, dtype=DTYPE)[g] + 0.1 * torch.randn(200, generator=generator, dtype=DTYPE)
    x = g.to(DTYPE).unsqueeze(-1)
    model = InterceptGP(x, y, GroupKernel(num_groups, rank=2, per_group_variance=True)).to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    (-mll(model(x), y)).backward()
    kernel = model.covar_module
    assert kernel.covar_factor.grad[:10].abs().sum() > 0 and kernel.raw_var.grad[:10].abs().sum() > 0
    assert not kernel.covar_factor.grad[10:].any() and not kernel.raw_var.grad[10:].any()
    unseen = torch.arange(10, 15)
    model.eval()
    with torch.no_grad():
        arbitrary = model(unseen.to(DTYPE).unsqueeze(-1)).mean
        assert (arbitrary - model.mean_module.constant).abs().max() > 1e-3  # the random rows move it
        kernel.covar_factor.data[unseen] = 0
        model.prediction_strategy = None  # the cached solve holds the old W
        pred = model(unseen.to(DTYPE).unsqueeze(-1))
        torch.testing.assert_close(pred.mean, model.mean_module.constant.expand(5), rtol=0, atol=1e-12)
        torch.testing.assert_close(pred.covariance_matrix, torch.diag(kernel.var[unseen]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nested", [False, True], ids=["ScaleKernel", "ScaleKernel(ScaleKernel)"])
@pytest.mark.parametrize("batch", [torch.Size(), torch.Size([2])])
def test_scaled_random_slope_predicts_in_closed_form(batch, nested):
    """``ScaleKernel(GroupKernel(k, slope=True)) + GroupKernel(...)``: the scaled slope's cross covariance
    ``c (A P^T diag(x))`` was not recognised at new inputs, so prediction left the closed form (GPyTorch's
    ``t x n`` path, with a ClosedFormFallbackWarning); an intercept or a factor in a ScaleKernel was."""
    generator = torch.Generator().manual_seed(2)
    n = 160
    g1, g2 = torch.randint(0, 30, (n,), generator=generator), torch.randint(0, 4, (n,), generator=generator)
    x = torch.stack([torch.randn(n, generator=generator, dtype=DTYPE), g1.to(DTYPE), g2.to(DTYPE)], -1)
    y = torch.randn(n, generator=generator, dtype=DTYPE)
    slopes = GroupKernel(31, slope=True, active_dims=[1, 0], batch_shape=batch)
    inner = gpytorch.kernels.ScaleKernel(slopes, batch_shape=batch) if nested else slopes
    kernel = gpytorch.kernels.ScaleKernel(inner, batch_shape=batch) + GroupKernel(5, active_dims=[2])
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch), kernel).to(DTYPE)
    with torch.no_grad():
        kernel.kernels[0].outputscale = torch.tensor([0.7, 1.9][: max(1, batch.numel())], dtype=DTYPE).reshape(batch)
        if nested:
            inner.outputscale = torch.tensor([1.3, 0.4][: max(1, batch.numel())], dtype=DTYPE).reshape(batch)
        slopes.var = torch.tensor([0.8, 0.3], dtype=DTYPE)
        slopes.corr = -0.4
    model.likelihood.noise = 0.2
    model.eval()
    xt = torch.stack(
        [torch.randn(6, dtype=DTYPE), torch.tensor([0.0, 3, 30, 7, 30, 1]), torch.tensor([1.0, 4, 0, 2, 3, 4])], -1
    )
    with warnings.catch_warnings(), closed_forms_only(n), torch.no_grad(), gpytorch.settings.max_cholesky_size(0):
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        pred = model(xt)
        mean, variance = pred.mean, pred.variance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)  # the reference is dense on purpose
        ref_mean, ref_variance = dense_prediction(dense_copy(model), xt)
    assert mean.shape == batch + (6,)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(variance, ref_variance, rtol=1e-9, atol=1e-10)


def test_group_noise_names_bad_groups_keyword():
    """``likelihood(f, groups=["a", "b"])``: torch's 'too many dimensions 'str'' named neither the argument nor the
    fix; integer ids in any container keep working."""
    likelihood = GroupGaussianLikelihood(3)
    likelihood.noise = torch.tensor([0.1, 0.2, 0.3])
    f = gpytorch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    for bad in (["a", "b"], [[0], [1, 2]]):
        with pytest.raises(ValueError, match=r"groups must hold integer group ids 0 \.\. 2.*group_partition"):
            likelihood(f, groups=bad)
    for good in ([2, 0], (2, 0), np.array([2, 0]), torch.tensor([2, 0])):
        torch.testing.assert_close(likelihood(f, groups=good).variance.detach(), torch.tensor([1.3, 1.1]))


def test_interaction_as_its_own_id_column():
    """docs/mixed.md, "Interactions": ``(1 | g1:g2)`` as a GroupKernel on ``g1 * k2 + g2`` is the product
    ``GroupKernel(k1) * GroupKernel(k2)``, and both predict in closed form (the product's cross covariance is one
    over the occupied pairs of levels; it was GPyTorch's dense ``t x n`` matrix, with a warning)."""
    generator = torch.Generator().manual_seed(4)
    n, k1, k2 = 150, 6, 4
    g1, g2 = torch.randint(0, k1, (n,), generator=generator), torch.randint(0, k2, (n,), generator=generator)
    x = torch.stack([g1, g2, g1 * k2 + g2], -1).to(DTYPE)
    y = torch.randn(n, generator=generator, dtype=DTYPE)
    product = GroupKernel(k1, active_dims=[0]) * GroupKernel(k2, active_dims=[1])
    pair = GroupKernel(k1 * k2, active_dims=[2])
    models = [GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).to(DTYPE) for kernel in (product, pair)]
    product.kernels[0].var, product.kernels[1].var, pair.var = 0.6, 1.5, 0.9
    losses = [gpytorch.mlls.ExactMarginalLogLikelihood(m.likelihood, m)(m(x), y) for m in models]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    xt = torch.tensor([[0, 0], [5, 3], [2, 1]], dtype=DTYPE)
    xt = torch.cat([xt, (xt[:, :1] * k2 + xt[:, 1:])], -1)
    for m in models:
        m.eval()
    with warnings.catch_warnings(), closed_forms_only(n), torch.no_grad(), gpytorch.settings.max_cholesky_size(0):
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        expected = models[0](xt)
        expected_mean, expected_variance = expected.mean, expected.variance
        pred = models[1](xt)
        torch.testing.assert_close(pred.mean, expected_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pred.variance, expected_variance, rtol=1e-10, atol=1e-12)


class SVGP(gpytorch.models.ApproximateGP):
    def __init__(self, inducing):
        distribution = gpytorch.variational.CholeskyVariationalDistribution(inducing.shape[0])
        super().__init__(gpytorch.variational.VariationalStrategy(self, inducing, distribution))
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = gpytorch.kernels.RBFKernel(active_dims=[0])

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def test_per_group_noise_in_a_minibatch_elbo():
    """A variational ELBO passes the likelihood no inputs, so a minibatch needs ``groups=``; the errors for the
    missing or mismatched ids now say so, and with it the expected log likelihood uses each point's noise."""
    x, y = grouped_data(n=60)
    model = SVGP(x[:8].clone()).to(DTYPE)
    likelihood = GroupGaussianLikelihood(6, group_dim=1, train_inputs=x).to(DTYPE)
    likelihood.noise = torch.linspace(0.1, 0.6, 6, dtype=DTYPE)
    elbo = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=60)
    batch = slice(10, 30)
    output = model(x[batch])
    with pytest.raises(ValueError, match=r"hold 60 points but the distribution has 20.*groups=ids_batch"):
        elbo(output, y[batch])
    bare = gpytorch.mlls.VariationalELBO(GroupGaussianLikelihood(6, group_dim=1).to(DTYPE), model, num_data=60)
    with pytest.raises(ValueError, match=r"elbo\(output, y, groups=ids\)"):
        bare(output, y[batch])
    ids = x[batch, 1].long()
    value = elbo(output, y[batch], groups=ids)
    noise = likelihood.noise.detach()[ids]
    expected_log_lik = -0.5 * (
        torch.log(2 * torch.pi * noise) + ((y[batch] - output.mean) ** 2 + output.variance) / noise
    )
    kl = model.variational_strategy.kl_divergence().div(60)
    torch.testing.assert_close(value, expected_log_lik.mean() - kl, rtol=1e-10, atol=1e-12)


def test_slope_kernel_with_swapped_columns_says_which_comes_first():
    """``active_dims=[x_col, id_col]`` (the covariate first) is the likeliest mistake with ``slope=True``; the error
    names the order. The intercept-only message stays as it was."""
    x = torch.tensor([[0.37, 1.0], [1.2, 2.0]])
    with pytest.raises(ValueError, match=r"holds 0\.37.*active_dims=\[id_column, covariate_column\], in that order"):
        GroupKernel(5, slope=True, active_dims=[0, 1])(x).to_dense()
    assert GroupKernel(5, slope=True, active_dims=[1, 0])(x).to_dense().shape == (2, 2)
    with pytest.raises(ValueError, match=r"holds 0\.37.*num_groups - 1 = 4\.$"):
        GroupKernel(5, active_dims=[0])(x).to_dense()
