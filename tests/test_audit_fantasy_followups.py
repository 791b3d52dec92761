"""Follow-ups of the fantasy model audits (``model.get_fantasy_model(x_new, y_new)`` of an ``ExactGP`` whose kernel
holds a ``BlockMeanKernel`` or a ``GroupKernel``): ``train()`` / ``eval()`` on a fantasy model (also with a
``GroupGaussianLikelihood``), its prediction at the parent's training inputs (values, gradients, nothing of the data's
size), the training block sums it reuses from the parent, and the fantasy noise it refuses."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

import test_audit_fantasy_models as fantasy_models
from bma_gp import ClosedFormFallbackWarning
from bma_gp.kernels import block_mean_kernel
from gp_reference import dense_copy
from largest_tensor import LargestTensor
from test_audit_fantasy_single import DTYPE, N, _dense_posterior, _fantasy_points, _model

pytestmark = [pytest.mark.usefixtures("one_thread")]


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kernel", ["group", "block_mean"])
@pytest.mark.parametrize("noise", [[-0.1, 0.1], [0.05, -1e-3]])
def test_negative_fantasy_noise_is_refused_and_leaves_the_model_unchanged(kernel, noise):
    # a FixedNoiseGaussianLikelihood appended a negative variance to its noise as it was: the fantasy model predicted
    # from a covariance that is not a covariance (here: variances that still looked plausible), without a word
    model, test_x = _model(kernel, "fixed")
    model.eval()
    (x1, y1), _ = _fantasy_points(model)
    with torch.no_grad():
        before = model(test_x)
        strategy = model.prediction_strategy
        with pytest.raises(ValueError, match=r"noise=.*negative.*>= 0"):
            model.get_fantasy_model(x1, y1, noise=torch.tensor(noise, dtype=DTYPE))
        with pytest.raises(ValueError, match=r"noise=.*negative"):  # also one entry of a batch of fantasy noises
            model.get_fantasy_model(x1, torch.stack([y1, y1]), noise=torch.tensor([[0.1, 0.1], noise], dtype=DTYPE))
        assert model.prediction_strategy is strategy and model.likelihood.noise.shape == (N,)
        assert model.train_inputs[0].shape == (N, 2) and model.train_targets.shape == (N,)
        after = model(test_x)
        torch.testing.assert_close(after.mean, before.mean, rtol=0, atol=0)
        assert model.get_fantasy_model(x1, y1, noise=torch.tensor([0.0, 0.1], dtype=DTYPE))(test_x).mean.shape == (4,)


@pytest.mark.parametrize("kernel", ["group", "block_mean"])
@pytest.mark.parametrize("noise", [float("nan"), -0.1, 0.1])
def test_a_number_as_fantasy_noise_is_refused_in_words(kernel, noise):
    # a number (0-d tensor) reached GPyTorch's FixedNoiseGaussianLikelihood.get_fantasy_likelihood first, whose
    # torch.cat raised "zero-dimensional tensor (at position 1) cannot be concatenated", for NaN and -0.1 as for 0.1
    model, test_x = _model(kernel, "fixed")
    model.eval()
    (x1, y1), _ = _fantasy_points(model)
    with torch.no_grad():
        model(test_x)
        strategy = model.prediction_strategy
        with pytest.raises(ValueError, match=r"noise=.*one noise variance per fantasy point.*got \(\)"):
            model.get_fantasy_model(x1, y1, noise=torch.tensor(noise, dtype=DTYPE))
        with pytest.raises(ValueError, match=r"noise=.*got float"):
            model.get_fantasy_model(x1, y1, noise=noise)
        assert model.prediction_strategy is strategy and model.likelihood.noise.shape == (N,)
        assert model.get_fantasy_model(x1, y1, noise=torch.full((2,), 0.1, dtype=DTYPE))(test_x).mean.shape == (4,)


# ---------------------------------------------------------------------------- train() / eval() on a fantasy model
@pytest.mark.parametrize("kernel", ["block_mean", "scale_block_mean", "block_mean+group"])
@pytest.mark.parametrize("likelihood, batch", [("gaussian", False), ("fixed", True)])
def test_fantasy_model_trains_and_predicts_again_after_train_and_eval(kernel, likelihood, batch):
    # fantasy.train() dropped the strategy, and GPyTorch's rebuild (and a training-mode call on the fantasy's training
    # inputs) refused the BlockMeanKernel, bound to the parent's training inputs only, with the set_train_data
    # ValueError; the kernel takes the fantasy points for new points, as get_fantasy_model made the model
    if kernel == "block_mean+group":
        model, test_x = fantasy_models._model(kernel)
        model = fantasy_models._with_likelihood(model, likelihood)
        x1, y1 = fantasy_models._fantasy_points(model)
    else:
        model, test_x = _model(kernel, likelihood)
        (x1, y1), _ = _fantasy_points(model)
    n = model.train_targets.shape[-1]
    model.eval()
    if batch:
        y1 = torch.stack([y1, y1 + 1.0])
    kwargs = {"noise": torch.full(y1.shape, 0.03, dtype=DTYPE)} if likelihood == "fixed" else {}
    with torch.no_grad():
        model(test_x)
        fantasy = model.get_fantasy_model(x1, y1, **kwargs)
        before = fantasy(test_x)
    fantasy.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(fantasy.likelihood, fantasy)
    loss = -mll(fantasy(*fantasy.train_inputs), fantasy.train_targets).sum()
    loss.backward()
    grads = [p.grad for p in fantasy.covar_module.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    fantasy.eval()
    with torch.no_grad():
        after = fantasy(test_x)
        x, y = (
            torch.cat([model.train_inputs[0], x1]),
            torch.cat([model.train_targets.expand(*y1.shape[:-1], n), y1], -1),
        )
        fantasy_noise = (
            model.likelihood.noise.expand(2) if likelihood == "gaussian" else torch.full((2,), 0.03, dtype=DTYPE)
        )
        noise = torch.cat([model.likelihood.noise.expand(n), fantasy_noise.to(DTYPE)])
        ref_mean, ref_covariance = _dense_posterior(model, x, y, test_x, noise)
    assert isinstance(fantasy.prediction_strategy, type(model.prediction_strategy))
    torch.testing.assert_close(after.mean, ref_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        after.covariance_matrix, ref_covariance.expand_as(after.covariance_matrix), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(after.mean, before.mean, rtol=1e-12, atol=1e-12)
    # the parent still refuses training inputs that only extend the kernel's (the user forgot kernel.set_train_data)
    model.set_train_data(x, y[0] if batch else y, strict=False)
    with pytest.raises(ValueError, match="kernel.set_train_data"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)  # the fixed noise has n entries
        model(test_x)


# ---------------------------------------------------------------------------- the training block sums
def _counting_block_means(monkeypatch) -> list:
    """Record the inputs of every training pass of a ``BlockMeanKernel`` (``kernel_block_mean`` over its points)."""
    calls: list = []
    original = block_mean_kernel._kernel_block_mean

    def counting(kernel, x, partition, chunk_size, *options):
        calls.append(x.shape[-2])
        return original(kernel, x, partition, chunk_size, *options)

    monkeypatch.setattr(block_mean_kernel, "_kernel_block_mean", counting)
    return calls


@pytest.mark.parametrize("kernel", ["block_mean", "scale_block_mean"])
def test_fantasy_reuses_the_parents_training_block_sums_while_the_hyperparameters_are_unchanged(kernel, monkeypatch):
    # the fantasy covariance (training blocks plus fantasy points) redid the pass over all n^2 training kernel entries
    # that the parent's strategy had just made
    model, test_x = _model(kernel)
    model.eval()
    (x1, y1), (x2, y2) = _fantasy_points(model)
    calls = _counting_block_means(monkeypatch)
    with torch.no_grad():
        model(test_x)
        assert calls == [N]
        fantasy = model.get_fantasy_model(x1, y1)
        pred = fantasy(test_x)
        second = fantasy.get_fantasy_model(x2, y2)(test_x)
        assert calls == [N]  # the fantasy and the fantasy of the fantasy reused them
        x, y = torch.cat([model.train_inputs[0], x1]), torch.cat([model.train_targets, y1])
        noise = model.likelihood.noise.expand(N + 2)
        ref_mean, ref_covariance = _dense_posterior(model, x, y, test_x, noise)
        torch.testing.assert_close(pred.mean, ref_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pred.covariance_matrix, ref_covariance, rtol=1e-10, atol=1e-12)
        x, y = torch.cat([x, x2]), torch.cat([y, y2])
        ref_mean, _ = _dense_posterior(model, x, y, test_x, model.likelihood.noise.expand(N + 4))
        torch.testing.assert_close(second.mean, ref_mean, rtol=1e-10, atol=1e-12)
        # a hyperparameter changed in place after the parent's strategy was built: the fantasy, conditioned on the
        # prior with the new value, redoes the pass
        rbf = model.covar_module.base_kernel.base_kernel  # inside the ScaleKernel, or inside the BlockMeanKernel
        rbf.lengthscale = rbf.lengthscale * 1.7
        calls.clear()
        fantasy = model.get_fantasy_model(x1, y1)
        pred = fantasy(test_x)
        assert calls == [N]
        x, y = torch.cat([model.train_inputs[0], x1]), torch.cat([model.train_targets, y1])
        ref_mean, ref_covariance = _dense_posterior(model, x, y, test_x, noise)
        torch.testing.assert_close(pred.mean, ref_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pred.covariance_matrix, ref_covariance, rtol=1e-10, atol=1e-12)
    # with gradients asked of the hyperparameters the pass is made afresh (a kept graph may have been freed)
    calls.clear()
    for _ in range(2):
        model.covar_module(model.train_inputs[0]).evaluate_kernel().diagonal().sum().backward()
    assert calls == [N, N]


# ---------------------------------------------------------------------------- the parent's training inputs
@pytest.mark.parametrize("kernel", ["block_mean", "scale_block_mean"])
@pytest.mark.parametrize(
    "likelihood, batch", [("gaussian", False), ("gaussian", True), ("fixed", False), ("fixed", True)]
)
def test_fantasy_at_the_parents_training_inputs_forms_nothing_of_the_data_size(kernel, likelihood, batch):
    # fantasy(train_x): the kernel's training points against its training points and the fantasy points was
    # assembled densely, n x (n + m), and the posterior went through it (per-point noise: the same, through
    # GPyTorch's default prediction)
    n = 300
    model, _ = _model(kernel, likelihood, n=n, chunk_size=8)
    model.eval()
    (x1, y1), _ = _fantasy_points(model)
    fantasy_noise = torch.tensor([0.03, 0.04], dtype=DTYPE)
    kwargs = {"noise": fantasy_noise} if likelihood == "fixed" else {}
    if batch:
        y1 = torch.stack([y1, -y1])
    train_x = model.train_inputs[0]
    x = torch.cat([train_x, x1])
    noise = (
        model.likelihood.noise.expand(n + 2)
        if likelihood == "gaussian"
        else torch.cat([model.likelihood.noise, fantasy_noise])
    )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)  # model(train_x) in eval mode
        model(train_x[:3])
        fantasy = model.get_fantasy_model(x1, y1, **kwargs)
        fantasy(train_x[:3])
        with LargestTensor(square=n) as largest:
            pred = fantasy(train_x)
            mean, variance = pred.mean, pred.variance
            # (per-point noise: the posterior at the training points of an indefinite block mean B has no closed-form
            # root, and draws warn and take a dense one, for the parent alike; docs/mixed.md)
            sample = pred.rsample(torch.Size([2])) if likelihood == "gaussian" else mean.expand(2, *mean.shape)
            noisy_variance = pred.lazy_covariance_matrix.add_diagonal(noise[:n]).diagonal(dim1=-2, dim2=-1)
        assert largest.squares == []
        assert largest.largest < n * n // 8, f"{largest.largest} entries from {largest.where}"
        assert sample.shape == (2, *y1.shape[:-1], n) and bool(torch.isfinite(sample).all())
        covariance = pred.covariance_matrix
        y = torch.cat([model.train_targets.expand(*y1.shape[:-1], n), y1], -1)
        with gpytorch.settings.lazily_evaluate_kernels(False):
            warnings.simplefilter("ignore", ClosedFormFallbackWarning)  # the dense reference's eager evaluation
            prior = model.covar_module(x).to_dense()
        prior_mean = model.mean_module(x)
    noisy = prior + torch.diag(noise)
    ref_mean = prior_mean + (prior @ torch.linalg.solve(noisy, (y - prior_mean).unsqueeze(-1))).squeeze(-1)
    ref_covariance = prior - prior @ torch.linalg.solve(noisy, prior)
    ref_variance = ref_covariance.diagonal()[:n].expand_as(variance)
    torch.testing.assert_close(mean, ref_mean[..., :n], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(variance, ref_variance, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(noisy_variance, ref_variance + noise[:n], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(covariance, ref_covariance[:n, :n].expand_as(covariance), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- a GroupGaussianLikelihood fantasy
@pytest.mark.parametrize("kernel", ["group", "block_mean"])
@pytest.mark.parametrize("batch", [False, True])
def test_group_likelihood_fantasy_trains_on_its_own_points(kernel, batch):
    # the fantasy model's likelihood is the parent's copy, whose stored training groups (for mll(model(x), y), which
    # passes it no inputs) were the parent's n points: in training mode the fantasy's n + 2 points raised "after
    # model.set_train_data also call likelihood.set_train_inputs"
    model, test_x = _model(kernel, "group")
    model.eval()
    (x1, y1), _ = _fantasy_points(model)
    if batch:
        y1 = torch.stack([y1, -y1])
    with torch.no_grad():
        model(test_x)
        fantasy = model.get_fantasy_model(x1, y1)
        before = fantasy(test_x).mean
    observed = model.likelihood.observed.clone()
    assert torch.equal(fantasy.likelihood.observed, observed)  # conditioning records no level (5 stays unseen)
    fantasy.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(fantasy.likelihood, fantasy)
    value = mll(fantasy(*fantasy.train_inputs), fantasy.train_targets)
    x = torch.cat([model.train_inputs[0], x1])
    y = torch.cat([model.train_targets.expand(*y1.shape[:-1], N), y1], -1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)  # the dense reference's eager evaluation
        with gpytorch.settings.lazily_evaluate_kernels(False):
            prior = model.covar_module(x).to_dense()
        residual = y - model.mean_module(x)
    covariance = prior + torch.diag(fantasy.likelihood.noise[x[:, 0].long()].detach())  # training mode: own noise
    dense = torch.distributions.MultivariateNormal(torch.zeros(N + 2, dtype=DTYPE), covariance)
    torch.testing.assert_close(value.detach(), dense.log_prob(residual) / (N + 2), rtol=1e-10, atol=1e-12)
    # a training-mode call records its levels (5 now has its own noise), and the rebuilt strategy predicts with them
    assert bool(fantasy.likelihood.observed[5]) and not bool(observed[5])
    fantasy.eval()
    with torch.no_grad():
        after = fantasy(test_x)
        noise = fantasy.likelihood.noise[x[:, 0].long()]
        ref_mean, ref_covariance = _dense_posterior(model, x, y, test_x, noise)
    assert after.mean.shape == before.shape
    torch.testing.assert_close(after.mean, ref_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        after.covariance_matrix, ref_covariance.expand_as(after.covariance_matrix), rtol=1e-10, atol=1e-12
    )
    assert model.likelihood.noise_covar.train_groups.shape == (N,)  # the parent's likelihood is left as it was
    assert torch.equal(model.likelihood.observed, observed)


@pytest.mark.parametrize("likelihood", ["gaussian", "fixed"])
def test_gradients_of_a_fantasy_at_the_parents_training_inputs_equal_gpytorchs_dense_ones(likelihood):
    """The leading rows and block paths keep the gradients with respect to the hyperparameters (the parent's, through
    the fantasy strategy, and the fantasy model's copies, through its test covariances; summed per name)."""

    def gradients(model):
        with gpytorch.settings.detach_test_caches(False), gpytorch.settings.max_cholesky_size(10**6):
            with torch.no_grad():
                model(test_x)
            fantasy = model.get_fantasy_model(x1, y1, **kwargs)
            pred = fantasy(model.train_inputs[0])
            (pred.mean.sum() + pred.variance.sum()).backward()
        res: dict = {}
        for module in (model, fantasy):
            for name, parameter in module.named_parameters():
                if parameter.grad is not None:
                    name = name.replace("covar_module.kernel.", "covar_module.")  # dense_copy's wrapper
                    res[name] = res.get(name, 0) + parameter.grad
        return res

    model, test_x = _model("block_mean", likelihood)
    model.eval()
    (x1, y1), _ = _fantasy_points(model)
    kwargs = {"noise": torch.tensor([0.03, 0.04], dtype=DTYPE)} if likelihood == "fixed" else {}
    reference = dense_copy(model)
    reference.eval()
    ours, dense = gradients(model), gradients(reference)
    assert sorted(ours) == sorted(dense) and len(dense) == 3
    for name, value in dense.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-9, atol=1e-11)
