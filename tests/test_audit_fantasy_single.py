"""Audit of GPyTorch fantasy models (``model.get_fantasy_model(x_new, y_new)``) of an ``ExactGP`` whose covariance is a
single block mean kernel (``GroupKernel``, ``BlockMeanKernel``, either in a ``ScaleKernel``), with a
``GaussianLikelihood``, ``FixedNoiseGaussianLikelihood`` or ``GroupGaussianLikelihood``: the fantasy model against the
dense float64 posterior on the training and fantasy points together and against ``set_train_data`` on all of them."""

from __future__ import annotations

import copy
import warnings

import gpytorch
import pytest
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel

from bma_gp import (
    BlockMeanKernel,
    ClosedFormFallbackWarning,
    GroupGaussianLikelihood,
    GroupKernel,
    Partition,
    settings,
)
from bma_gp.kernels import BlockCrossLinearOperator
from closed_form_guard import closed_forms_only
from gp_reference import GP
from largest_tensor import LargestTensor

pytestmark = [pytest.mark.usefixtures("one_thread")]

DTYPE = torch.float64
N = 30
KERNELS = ["group", "scale_group", "block_mean", "scale_block_mean"]


def _model(kernel: str, likelihood: str = "gaussian", n: int = N, chunk_size: int | None = None):
    """A float64 model on inputs ``(group id in 0..3, x)`` and its test inputs (one of group 5, unseen in training)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (n, 1), generator=generator).to(DTYPE)
    x = torch.cat([ids, torch.randn(n, 1, generator=generator, dtype=DTYPE)], dim=-1)
    y = ids.squeeze(-1) * 0.3 + 0.2 * torch.randn(n, generator=generator, dtype=DTYPE)
    partition = Partition.from_labels(ids[:, 0].long())
    if kernel == "group":
        covar = GroupKernel(6, active_dims=[0])
    elif kernel == "scale_group":  # a cross-group factor: a dense k x k B
        covar = ScaleKernel(GroupKernel(6, rank=1, active_dims=[0]))
        with torch.no_grad():
            covar.base_kernel.covar_factor.copy_(torch.linspace(-0.5, 0.7, 6).unsqueeze(-1))
    elif kernel == "block_mean":
        covar = BlockMeanKernel(ScaleKernel(RBFKernel(active_dims=[1])), x, partition, chunk_size=chunk_size)
    else:
        covar = ScaleKernel(BlockMeanKernel(RBFKernel(active_dims=[1]), x, partition, chunk_size=chunk_size))
    if likelihood == "gaussian":
        lik = gpytorch.likelihoods.GaussianLikelihood()
        lik.noise = 0.05
    elif likelihood == "fixed":
        lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(0.02 + 0.05 * torch.rand(n, generator=generator))
    else:  # group 5 unseen in training: a fantasy point there has the mean noise of the seen groups
        lik = GroupGaussianLikelihood(6, group_dim=0, train_inputs=x)
        lik.noise = torch.linspace(0.02, 0.1, 6)
    model = GP(x, y, lik, covar).to(DTYPE)
    test_x = x[:4].clone()
    test_x[:, 0] = torch.tensor([0.0, 2.0, 5.0, 4.0], dtype=DTYPE)
    test_x[:, 1] += 0.3
    return model, test_x


def _fantasy_points(model):
    """Two pairs of fantasy points, each with one in group 5 (not in the training data)."""
    x1 = model.train_inputs[0][:2].clone()
    x1[:, 0] = torch.tensor([1.0, 5.0], dtype=DTYPE)
    x1[:, 1] += 0.1
    x2 = x1.clone()
    x2[:, 0], x2[:, 1] = torch.tensor([5.0, 3.0], dtype=DTYPE), x1[:, 1].flip(0) - 0.2
    return (x1, torch.tensor([0.4, -0.7], dtype=DTYPE)), (x2, torch.tensor([1.0, 0.5], dtype=DTYPE))


def _noise_of(model, x, likelihood: str, fantasy_noise):
    if likelihood == "gaussian":
        return model.likelihood.noise.expand(x.shape[-2])
    if likelihood == "fixed":
        return torch.cat([model.likelihood.noise, *fantasy_noise])
    noise, seen = model.likelihood.noise, model.likelihood.observed
    ids = x[:, 0].long()
    return torch.where(seen[ids], noise[ids], noise[seen].mean())


def _dense_posterior(model, x, y, test_x, noise):
    """Mean and covariance at new inputs ``test_x`` of the model's prior conditioned densely on ``(x, y)``; the kernel
    evaluated on ``cat(x, test_x)`` at once (a ``BlockMeanKernel``: its training points, then new points)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        joint = torch.cat([x, test_x], dim=-2)
        with gpytorch.settings.lazily_evaluate_kernels(False):
            prior = model.covar_module(joint)
        prior = prior if torch.is_tensor(prior) else prior.to_dense()
        mean = model.mean_module(joint)
    n = x.shape[-2]
    train = prior[..., :n, :n] + torch.diag_embed(noise.expand(*prior.shape[:-2], n))
    cross = prior[..., n:, :n]
    alpha = torch.linalg.solve(train, (y - mean[..., :n]).unsqueeze(-1))
    return mean[..., n:] + (cross @ alpha).squeeze(-1), prior[..., n:, n:] - cross @ torch.linalg.solve(train, cross.mT)


# ---------------------------------------------------------------------------- the fantasy posterior
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("likelihood, batch", [("gaussian", False), ("fixed", True), ("group", True)])
def test_fantasies_of_fantasies_equal_the_dense_posterior_on_all_points(kernel, likelihood, batch):
    """get_fantasy_model raised NotImplementedError for a single block mean kernel. A fantasy (a group the training
    data lack; a leading batch of fantasy targets), then a fantasy of it: the dense posterior on all the points, in
    closed form (no CG, Lanczos or factorisation of the data's size, no fallback warning), the parent unchanged."""
    model, test_x = _model(kernel, likelihood)
    model.eval()
    (x1, y1), (x2, y2) = _fantasy_points(model)
    if batch:
        y1, y2 = torch.stack([y1, y1 + 1.0, -y1]), y2.expand(3, 2)
    noises = [torch.tensor([0.03, 0.04], dtype=DTYPE), torch.tensor([0.05, 0.01], dtype=DTYPE)]
    kwargs = [{"noise": noise} if likelihood == "fixed" else {} for noise in noises]
    with torch.no_grad(), closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        before = model(test_x)
        fantasy = model.get_fantasy_model(x1, y1, **kwargs[0])
        first = fantasy(test_x)
        second = fantasy.get_fantasy_model(x2, y2, **kwargs[1])(test_x)
        results = [(first.mean, first.covariance_matrix), (second.mean, second.covariance_matrix)]
        after = model(test_x)
    assert model.train_inputs[0].shape == (N, 2) and model.train_targets.shape == (N,)
    torch.testing.assert_close(after.mean, before.mean, rtol=0, atol=0)
    torch.testing.assert_close(after.covariance_matrix, before.covariance_matrix, rtol=0, atol=0)
    y = model.train_targets.expand(*y1.shape[:-1], N)
    for count, (mean, covariance) in enumerate(results, start=1):
        x = torch.cat([model.train_inputs[0], x1, x2][: count + 1])
        targets = torch.cat([y, y1, y2][: count + 1], dim=-1)
        ref_mean, ref_covariance = _dense_posterior(
            model, x, targets, test_x, _noise_of(model, x, likelihood, noises[:count])
        )
        assert mean.shape == ref_mean.shape == (*y1.shape[:-1], 4)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(covariance, ref_covariance.expand_as(covariance), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fantasy_model_equals_the_model_given_all_points(kernel):
    """A GroupKernel model given all the points by set_train_data; a BlockMeanKernel model also bound to them, each
    fantasy point a block of its own (the block mean approximation of the same prior): the same posterior."""
    model, test_x = _model(kernel)
    model.eval()
    (x1, y1), _ = _fantasy_points(model)
    with torch.no_grad():
        model(test_x)
        pred = model.get_fantasy_model(x1, y1)(test_x)
        reference = copy.deepcopy(model)
        x, y = torch.cat([model.train_inputs[0], x1]), torch.cat([model.train_targets, y1])
        reference.set_train_data(x, y, strict=False)
        for module in reference.modules():
            if isinstance(module, BlockMeanKernel):
                k = module.partition.num_blocks
                labels = torch.cat([module.partition.labels, torch.arange(k, k + 2)])
                module.set_train_data(x, Partition.from_labels(labels))
        ref = reference(test_x)
    torch.testing.assert_close(pred.mean, ref.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred.covariance_matrix, ref.covariance_matrix, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", ["group", "block_mean"])
def test_fantasy_model_at_its_training_points_is_the_posterior_there(kernel):
    """model(x) at all the training and fantasy points: the exact posterior of the latent values there."""
    model, _ = _model(kernel)
    model.eval()
    (x1, y1), _ = _fantasy_points(model)
    x, y = torch.cat([model.train_inputs[0], x1]), torch.cat([model.train_targets, y1])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        model(x1)
        pred = model.get_fantasy_model(x1, y1)(x)
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)  # the dense reference's eager evaluation
        with gpytorch.settings.lazily_evaluate_kernels(False):
            prior = model.covar_module(x).to_dense()
        mean = model.mean_module(x)
    noisy = prior + model.likelihood.noise * torch.eye(N + 2, dtype=DTYPE)
    torch.testing.assert_close(pred.mean, mean + prior @ torch.linalg.solve(noisy, y - mean), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        pred.covariance_matrix, prior - prior @ torch.linalg.solve(noisy, prior), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("kernel", ["group", "block_mean"])
def test_fantasy_update_forms_nothing_of_the_data_size(kernel):
    # a fantasy model of n + 2 points and its prediction at 4 new points: nothing n x n (a BlockMeanKernel's block
    # sums take row chunks of chunk_size); the cross covariance of a BlockMeanKernel with the training and fantasy
    # points was the dense t x (n + m) matrix
    n = 300
    model, test_x = _model(kernel, n=n, chunk_size=8)
    model.eval()
    (x1, y1), _ = _fantasy_points(model)
    with torch.no_grad():
        model(test_x)
        with LargestTensor(square=n) as largest:
            fantasy = model.get_fantasy_model(x1, y1)
            pred = fantasy(test_x)
            assert pred.mean.shape == pred.variance.shape == (4,)
    assert largest.squares == []
    assert largest.largest < n * n // 8, f"{largest.largest} entries from {largest.where}"


def test_block_mean_kernel_against_its_training_and_new_points_is_a_block_cross_operator():
    """kernel(new, cat(train_x, fantasy)): A P^T over the training blocks plus one singleton block per fantasy point,
    equal to the dense evaluation of the joint kernel; its transpose the other way round."""
    model, test_x = _model("block_mean")
    kernel = model.covar_module
    (x1, _), _ = _fantasy_points(model)
    x = torch.cat([model.train_inputs[0], x1])
    with torch.no_grad():
        cross = kernel(test_x, x).evaluate_kernel()
        transposed = kernel(x, test_x).evaluate_kernel()
        with gpytorch.settings.lazily_evaluate_kernels(False), warnings.catch_warnings():
            warnings.simplefilter("ignore", ClosedFormFallbackWarning)
            joint = kernel(torch.cat([x, test_x])).to_dense()
    assert isinstance(cross, BlockCrossLinearOperator) and cross.values.shape == (4, 4 + 2)
    torch.testing.assert_close(cross.to_dense(), joint[N + 2 :, : N + 2], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(transposed.to_dense(), joint[: N + 2, N + 2 :], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kernel", ["group", "block_mean"])
@pytest.mark.parametrize("likelihood", ["gaussian", "group"])
def test_fantasy_noise_a_likelihood_cannot_hold_is_refused(kernel, likelihood):
    model, test_x = _model(kernel, likelihood)
    model.eval()
    (x1, y1), _ = _fantasy_points(model)
    with torch.no_grad():
        model(test_x)
        strategy = model.prediction_strategy
        with pytest.raises(ValueError, match="noise=.*FixedNoiseGaussianLikelihood"):
            model.get_fantasy_model(x1, y1, noise=torch.tensor([1.0, 2.0], dtype=DTYPE))
        assert model.prediction_strategy is strategy and model.train_targets.shape == (N,)  # nothing changed
        assert model.get_fantasy_model(x1, y1).train_targets.shape == (N + 2,)


@pytest.mark.parametrize("kernel", ["group", "block_mean", "group+group"])
def test_fantasy_noise_of_the_wrong_length_or_nan_is_refused_in_words(kernel):
    # a FixedNoiseGaussianLikelihood appends noise= to its training noise as it is: a wrong length or a NaN left the
    # fantasy covariance outside the family, so a single kernel said its covariance was "not a block mean operator"
    # (NotImplementedError) and a sum took GPyTorch's update (a broadcast RuntimeError, a NanError from its Cholesky)
    model, test_x = _model("group" if kernel == "group+group" else kernel, "fixed")
    if kernel == "group+group":  # a second grouping in column 1
        x = model.train_inputs[0].clone()
        x[:, 1] = torch.arange(N, dtype=DTYPE) % 3
        model = GP(
            x, model.train_targets, model.likelihood, GroupKernel(6, active_dims=[0]) + GroupKernel(3, active_dims=[1])
        )
        model, test_x = model.to(DTYPE), x[:4].clone()
    model.eval()
    (x1, y1), _ = _fantasy_points(model)
    with torch.no_grad():
        x1[:, 1] = x1[:, 1].round().abs().clamp_max(2)  # a group id for the sum's second grouping
        model(test_x)
        strategy = model.prediction_strategy
        with pytest.raises(ValueError, match=r"noise=.*shape \(\.\.\., 2\).*got \(3,\)"):
            model.get_fantasy_model(x1, y1, noise=torch.ones(3, dtype=DTYPE))
        with pytest.raises(ValueError, match="noise=.*NaN"):
            model.get_fantasy_model(x1, y1, noise=torch.tensor([float("nan"), 0.1], dtype=DTYPE))
        assert model.prediction_strategy is strategy and model.likelihood.noise.shape == (N,)
        batched = model.get_fantasy_model(x1, torch.stack([y1, -y1]), noise=torch.full((2, 2), 0.1, dtype=DTYPE))
        assert batched(test_x).mean.shape == (2, 4)


def test_fantasy_outside_the_family_says_why_and_what_to_do():
    # group ids that differ across the batch entries share no partition: the covariance of all the points is dense,
    # and GPyTorch's fantasy update would factorise it; refused with the reason and the way out
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (2, 20, 1), generator=generator).to(DTYPE)
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size([2]))
    kernel = GroupKernel(6, batch_shape=torch.Size([2]))
    model = GP(ids, torch.randn(2, 20, generator=generator, dtype=DTYPE), likelihood, kernel, batch_shape=(2,))
    model = model.to(DTYPE)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)
        model(torch.zeros(2, 3, 1, dtype=DTYPE))
        with pytest.raises(NotImplementedError, match="not a block mean operator.*model.set_train_data"):
            model.get_fantasy_model(torch.ones(2, 2, 1, dtype=DTYPE), torch.zeros(2, 2, dtype=DTYPE))


@pytest.mark.parametrize("kernel", ["group", "block_mean"])
def test_fantasy_strategy_is_rebuilt_after_validate_false_and_a_dtype_move(kernel):
    """A fantasy made under validate(False) is rebuilt (a new strategy of its class on its own points) before a
    prediction with validation on, and after model.float(); a batch of fantasy targets throughout."""
    model, test_x = _model(kernel, "group")
    model.eval()
    (x1, y1), _ = _fantasy_points(model)
    y1 = torch.stack([y1, y1 + 1.0])
    with torch.no_grad():
        with settings.validate(False):
            model(test_x)
            fantasy = model.get_fantasy_model(x1, y1)
        strategy = fantasy.prediction_strategy
        pred = fantasy(test_x)
        assert fantasy.prediction_strategy is not strategy
        x = torch.cat([model.train_inputs[0], x1])
        targets = torch.cat([model.train_targets.expand(2, N), y1], dim=-1)
        ref_mean, ref_covariance = _dense_posterior(model, x, targets, test_x, _noise_of(model, x, "group", []))
        torch.testing.assert_close(pred.mean, ref_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pred.covariance_matrix, ref_covariance.expand(2, 4, 4), rtol=1e-10, atol=1e-12)
        fantasy.float()
        mean = fantasy(test_x.float()).mean
    assert mean.dtype == torch.float32 and mean.shape == (2, 4)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-5)
