"""Batches of hyperparameter samples on one unbatched data set (fully Bayesian GPs), found by a user trial (t19).

* The posterior at the training inputs (``model(train_x)`` in eval mode) raised ``RuntimeError: expand(...{[3, 30]},
  size=[30])`` when only the noise or the mean carried the batch of ``S`` samples and the prior covariance did not
  (an unbatched ``GroupKernel`` with per-point fixed noise and ``ConstantMean(batch_shape=(S,))``, sums of group
  kernels with ``GroupGaussianLikelihood(batch_shape=(S,))``, block mean and inducing-point sums): the sums' factor
  expanded the ``(S, n)`` noise to the ``(n,)`` prior diagonal.
* ``model.pyro_load_from_samples(samples)`` (what NUTS through GPyTorch calls) refused samples ``(S, *param_shape)``
  for ``GroupKernel(var_prior=...)`` and ``GroupGaussianLikelihood(noise_prior=...)`` with a ``ValueError``, and left
  the kernel half-changed (batch shape ``(S,)``, variance unbatched).

Every result is compared with the same model run per sample, unbatched.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from gpytorch.priors import GammaPrior

from bma_gp import (
    BlockMeanKernel,
    ChunkedInducingPointKernel,
    ClosedFormFallbackWarning,
    GroupGaussianLikelihood,
    GroupKernel,
    Partition,
)
from closed_form_guard import closed_forms_only

DTYPE = torch.float64
S, N, K1, K2 = 3, 40, 6, 4


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel, mean):
        super().__init__(x, y, likelihood)
        self.mean_module = mean
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    xc = torch.rand(N, 2, generator=generator, dtype=DTYPE)
    g1 = torch.randint(0, K1, (N,), generator=generator)
    g2 = torch.randint(0, K2, (N,), generator=generator)
    X = torch.cat([xc, g1[:, None].to(DTYPE), g2[:, None].to(DTYPE)], -1)
    y = torch.sin(4 * xc[:, 0]) + 0.3 * g1.to(DTYPE) + 0.1 * torch.randn(N, generator=generator, dtype=DTYPE)
    return X, y, generator


def rbf():
    return gpytorch.kernels.RBFKernel(active_dims=[0, 1]).to(DTYPE)


# ---------------------------------------------------------------------------- defect 1: training posterior
def _kernel(name, X, likelihood):
    if name == "group":
        return GroupKernel(K1, active_dims=[2])
    if name == "slope":
        return GroupKernel(K1, slope=True, active_dims=[2, 0])
    if name == "rank":
        return GroupKernel(K1, rank=2, per_group_variance=True, active_dims=[2])
    if name == "group+group":
        return GroupKernel(K1, active_dims=[2]) + GroupKernel(K2, active_dims=[3])
    if name == "block_mean":
        return BlockMeanKernel(rbf(), X, Partition.from_labels(torch.arange(N) % 5))
    if name == "block_mean+group":
        return BlockMeanKernel(rbf(), X, Partition.from_labels(torch.arange(N) % 5)) + GroupKernel(K1, active_dims=[2])
    if name == "inducing+group":
        inducing = torch.linspace(0, 1, 10, dtype=DTYPE)[:, None].expand(10, 2).clone()
        return ChunkedInducingPointKernel(rbf(), inducing, likelihood, active_dims=(0, 1)) + GroupKernel(
            K1, active_dims=[2]
        )
    raise AssertionError(name)


def _likelihood(kind, X, noise):
    """``noise``: the per-point noise (fixed) or the per-group noise, ``(S, K2)`` for the batched likelihood, ``(K2,)``
    for one sample."""
    if kind == "fixed":
        return gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise).to(DTYPE)
    batch = noise.shape[:-1]
    if kind == "gaussian":
        likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch).to(DTYPE)
        likelihood.noise = noise
        return likelihood
    likelihood = GroupGaussianLikelihood(K2, group_dim=3, train_inputs=X, batch_shape=batch).to(DTYPE)
    likelihood.noise = noise
    return likelihood


def _training_models(kernel_name, lik_kind, seed=0):
    """The model with a batch of ``S`` means (and noises, for the group likelihood) around an unbatched kernel, and
    the ``S`` unbatched models of the samples."""
    X, y, generator = data(seed)
    constants = torch.randn(S, generator=generator, dtype=DTYPE)
    if lik_kind == "fixed":
        noise = 0.02 + 0.1 * torch.rand(N, generator=generator, dtype=DTYPE)
        noises = [noise] * S
    else:
        noise = 0.02 + 0.2 * torch.rand(S, K2 if lik_kind == "group" else 1, generator=generator, dtype=DTYPE)
        noises = list(noise)

    def build(noise_value, constant):
        likelihood = _likelihood(lik_kind, X, noise_value)
        kernel = _kernel(kernel_name, X, likelihood).to(DTYPE)
        mean = gpytorch.means.ConstantMean(batch_shape=constant.shape).to(DTYPE)
        model = GP(X, y, likelihood, kernel, mean)
        torch.manual_seed(1)  # the same kernel hyperparameters in every model
        with torch.no_grad():
            for _name, p in sorted(kernel.named_parameters()):
                p.copy_(torch.rand(p.shape, dtype=DTYPE) - 0.5)
            mean.constant.copy_(constant)
        return model.eval()

    batched = build(noise, constants)
    singles = [build(noises[s], constants[s]) for s in range(S)]
    return X, batched, singles


TRAINING_CASES = [
    ("group", "fixed"),
    ("group", "group"),
    ("group", "gaussian"),
    ("slope", "fixed"),
    ("slope", "gaussian"),
    ("rank", "fixed"),
    ("rank", "group"),
    ("block_mean", "group"),
    ("block_mean", "gaussian"),
    ("group+group", "gaussian"),
    ("group+group", "group"),
    ("group+group", "fixed"),
    ("block_mean", "fixed"),
    ("block_mean+group", "fixed"),
    ("inducing+group", "fixed"),
]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("kernel_name,lik_kind", TRAINING_CASES)
def test_training_posterior_with_batched_mean_or_noise_equals_per_sample_models(kernel_name, lik_kind, fast):
    X, batched, singles = _training_models(kernel_name, lik_kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        warnings.filterwarnings("ignore", message="The input matches the stored training data")
        with torch.no_grad(), gpytorch.settings.fast_pred_var(fast), closed_forms_only(N):
            post = batched(X)
            mean, variance, covar = post.mean, post.variance, post.covariance_matrix
            refs = [model(X) for model in singles]
            ref_mean = torch.stack([r.mean for r in refs])
            ref_variance = torch.stack([r.variance for r in refs])
            ref_covar = torch.stack([r.covariance_matrix for r in refs])
    assert mean.shape == variance.shape == (S, N)
    assert covar.shape == (S, N, N)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(variance, ref_variance, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(covar, ref_covar, rtol=1e-9, atol=1e-10)
    # the samples differ (the comparison is not between copies of one model)
    assert (ref_mean[0] - ref_mean[1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------- defect 2: pyro_load_from_samples
class BatchLKJCovariancePrior(gpytorch.priors.LKJCovariancePrior):
    """GPyTorch's ``LKJCovariancePrior`` with its standard deviations' log densities summed per matrix: GPyTorch's
    adds the ``(*batch, 2)`` terms to the ``(*batch,)`` correlation term, which raises for a batch of matrices."""

    def log_prob(self, X):
        sd = torch.diagonal(X, dim1=-2, dim2=-1).sqrt()
        correlations = X / (sd.unsqueeze(-1) * sd.unsqueeze(-2))
        return self.correlation_prior.log_prob(correlations) + self.sd_prior.log_prob(sd).sum(-1)


def _pyro_model(case, X, y):
    """The model of ``case`` (priors on the package's parameters) and a function setting one sample by hand."""
    ids = [2]
    if case == "group_var":
        likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_prior=GammaPrior(2.0, 20.0))
        kernel = GroupKernel(K1, active_dims=ids, var_prior=GammaPrior(2.0, 2.0))
    elif case == "per_group_var":
        likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_prior=GammaPrior(2.0, 20.0))
        kernel = GroupKernel(K1, per_group_variance=True, active_dims=ids, var_prior=GammaPrior(2.0, 2.0))
    elif case == "rank_var":
        likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_prior=GammaPrior(2.0, 20.0))
        kernel = GroupKernel(K1, rank=2, per_group_variance=True, active_dims=ids, var_prior=GammaPrior(2.0, 2.0))
        with torch.no_grad():
            kernel.covar_factor.copy_(0.3 * torch.arange(2 * K1, dtype=torch.float32).reshape(K1, 2).sin())
    elif case == "group_noise":
        likelihood = GroupGaussianLikelihood(K2, group_dim=3, train_inputs=X, noise_prior=GammaPrior(2.0, 20.0))
        kernel = gpytorch.kernels.ScaleKernel(GroupKernel(K1, active_dims=ids), outputscale_prior=GammaPrior(2.0, 2.0))
    elif case == "sum":
        likelihood = GroupGaussianLikelihood(K2, group_dim=3, train_inputs=X, noise_prior=GammaPrior(2.0, 20.0))
        kernel = GroupKernel(K1, active_dims=ids, var_prior=GammaPrior(2.0, 2.0)) + GroupKernel(
            K2, active_dims=[3], var_prior=GammaPrior(3.0, 2.0)
        )
    elif case == "slope":
        likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_prior=GammaPrior(2.0, 20.0))
        prior = BatchLKJCovariancePrior(2, 1.0, GammaPrior(2.0, 2.0))
        kernel = GroupKernel(K1, slope=True, active_dims=[2, 0], prior=prior)
    else:
        raise AssertionError(case)
    model = GP(X, y, likelihood.to(DTYPE), kernel.to(DTYPE), gpytorch.means.ConstantMean().to(DTYPE))
    with torch.no_grad():
        model.mean_module.constant.fill_(0.3)
    return model


def _samples(case, model, generator):
    """``S`` samples of every prior of the model, shaped as pyro's NUTS returns them: ``(S, *param_shape)``."""
    out = {}
    for name, module, _prior, closure, _ in model.named_priors():
        shape = closure(module).shape
        if name.endswith("GroupKernelPrior"):  # a 2 x 2 covariance: variances and a correlation
            v = 0.3 + torch.rand(S, 2, generator=generator, dtype=DTYPE)
            r = 1.6 * torch.rand(S, generator=generator, dtype=DTYPE) - 0.8
            off = r * (v[:, 0] * v[:, 1]).sqrt()
            out[name] = torch.stack([torch.stack([v[:, 0], off], -1), torch.stack([off, v[:, 1]], -1)], -2)
        else:
            out[name] = 0.02 + torch.rand(S, *shape, generator=generator, dtype=DTYPE)
    return out


def _set_sample(model, samples, s):
    for name, module, _prior, _closure, setting in model.named_priors():
        setting(module, samples[name][s])


PYRO_CASES = ["group_var", "per_group_var", "rank_var", "group_noise", "sum", "slope"]


@pytest.mark.parametrize("case", PYRO_CASES)
def test_pyro_load_from_samples_predicts_as_the_per_sample_models(case):
    X, y, generator = data(1)
    model = _pyro_model(case, X, y)
    samples = _samples(case, model, generator)
    model.pyro_load_from_samples(samples)
    singles = []
    for s in range(S):
        single = _pyro_model(case, X, y)
        _set_sample(single, samples, s)
        singles.append(single)
    test_x = X[:7].clone()
    test_x[:, :2] += 0.05
    test_x[0, 2] = K1 - 1  # (ids stay valid)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with closed_forms_only(N):
            # the marginal log likelihood: one per sample
            model.train()
            mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
            # GPyTorch's load repeats the training data for every sample: inputs (S, n, d), targets (S, n)
            assert model.train_inputs[0].shape == (S, N, X.shape[-1])
            value = mll(model(*model.train_inputs), model.train_targets)
            refs = []
            for single in singles:
                single.train()
                refs.append(gpytorch.mlls.ExactMarginalLogLikelihood(single.likelihood, single)(single(X), y))
            assert value.shape == (S,)
            torch.testing.assert_close(value.detach(), torch.stack(refs).detach(), rtol=1e-9, atol=1e-10)
            # predictions at new inputs, unbatched and as a batch of one test set per sample
            model.eval()
            for single in singles:
                single.eval()
            with torch.no_grad():
                ref = [single(test_x) for single in singles]
                ref_mean = torch.stack([r.mean for r in ref])
                ref_covar = torch.stack([r.covariance_matrix for r in ref])
                for xx in (test_x, test_x.expand(S, *test_x.shape)):
                    post = model(xx)
                    torch.testing.assert_close(post.mean, ref_mean, rtol=1e-9, atol=1e-10)
                    torch.testing.assert_close(post.covariance_matrix, ref_covar, rtol=1e-9, atol=1e-10)
    assert (ref_mean[0] - ref_mean[1]).abs().max() > 1e-4


def test_pyro_load_sets_the_observed_levels_of_the_group_noise():
    X, y, generator = data(2)
    model = _pyro_model("group_noise", X, y)
    observed = model.likelihood.observed.clone()
    assert observed.shape == (K2,) and bool(observed.any())
    model.pyro_load_from_samples(_samples("group_noise", model, generator))
    assert model.likelihood.noise.shape == (S, K2)
    assert model.likelihood.observed.shape == (S, K2)
    assert torch.equal(model.likelihood.observed, observed.expand(S, K2))
    assert model.likelihood.noise_covar._strict_init  # strict again after the load


def test_setters_stay_strict_outside_sample_loading():
    kernel = GroupKernel(K1, var_prior=GammaPrior(2.0, 2.0))
    with pytest.raises(ValueError, match=r"var of shape \(4, 1\) does not fit the kernel's variance of shape \(1,\)"):
        kernel.var = torch.ones(4, 1)
    assert kernel.raw_var.shape == (1,)
    slope = GroupKernel(K1, slope=True, active_dims=[0, 1])
    with pytest.raises(ValueError, match=r"corr of shape \(4, 1\) does not fit"):
        slope.corr = torch.zeros(4, 1)
    assert slope.raw_corr.shape == (1,)
    likelihood = GroupGaussianLikelihood(K2)
    with pytest.raises(ValueError, match=r"noise of shape \(4, 4\) does not fit the likelihood's noise"):
        likelihood.noise = torch.full((4, K2), 0.1)
    assert likelihood.raw_noise.shape == (K2,) and likelihood.observed.shape == (K2,)
    # not strict, a batch of samples is taken, but never one of another parameter shape
    kernel._strict(False)
    with pytest.raises(ValueError, match=r"var of shape \(4, 3\) does not fit"):
        kernel.var = torch.ones(4, 3)
    assert kernel.raw_var.shape == (1,)


@pytest.mark.parametrize("case", ["group_var", "group_noise"])
def test_a_failing_load_leaves_the_module_as_it_was(case):
    X, y, generator = data(3)
    model = _pyro_model(case, X, y)
    samples = _samples(case, model, generator)
    if case == "group_var":
        module = model.covar_module
        samples["covar_module.var_prior"] = torch.ones(S, 3, dtype=DTYPE)  # var has one entry, not 3
        before = (module.batch_shape, module.raw_var.detach().clone())
    else:
        module = model.likelihood.noise_covar
        samples["likelihood.noise_covar.noise_prior"] = torch.ones(S, K2 + 1, dtype=DTYPE)
        before = (module.raw_noise.shape, module.raw_noise.detach().clone())
    with pytest.raises(ValueError, match="does not fit"):
        model.pyro_load_from_samples(samples)
    if case == "group_var":
        assert module.batch_shape == before[0]
        assert torch.equal(module.raw_var, before[1])
    else:
        assert module.raw_noise.shape == before[0] and torch.equal(module.raw_noise, before[1])
        assert module.observed.shape == (K2,)
    assert module._strict_init  # strict again: later setters refuse batches
