"""Audit of GPyTorch fantasy models (``model.get_fantasy_model(x_new, y_new)``) on models whose kernel holds a
block mean kernel, as a GPyTorch / BoTorch user makes them: fantasy predictions against the dense posterior on the
training and fantasy points together, and what a fantasy model keeps from its parent's prediction caches."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel

from bma_gp import (
    BlockMeanKernel,
    ChunkedInducingPointKernel,
    ClosedFormFallbackWarning,
    GroupGaussianLikelihood,
    GroupKernel,
    Partition,
    settings,
)
from closed_form_guard import closed_forms_only
from gp_reference import GP
from largest_tensor import LargestTensor

pytestmark = [pytest.mark.usefixtures("one_thread")]

DTYPE = torch.float64
N = 40


def _model(kind: str, n: int = N):
    """A float64 model of ``kind`` on inputs ``(group id, second id or x)`` and its test inputs (a new level, 5)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (n, 1), generator=generator).to(DTYPE)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 0.05
    if kind == "group+group":  # two groupings: a BlockMeanSumLinearOperator
        x = torch.cat([ids, torch.randint(0, 3, (n, 1), generator=generator).to(DTYPE)], dim=-1)
        kernel = GroupKernel(6, active_dims=[0]) + GroupKernel(3, active_dims=[1])
    else:
        x = torch.cat([ids, torch.randn(n, 1, generator=generator, dtype=DTYPE)], dim=-1)
        smooth = ScaleKernel(RBFKernel(active_dims=[1]))
        if kind == "inducing+group":
            inducing = torch.linspace(-2, 2, 5, dtype=DTYPE).unsqueeze(-1).expand(5, 2).clone()
            smooth = ChunkedInducingPointKernel(smooth, inducing, likelihood)
        elif kind == "block_mean+group":  # the fantasy points are new points for the BlockMeanKernel
            smooth = BlockMeanKernel(smooth, x, Partition.from_labels((x[:, 1] > 0).long() + (x[:, 1] > 1).long()))
        kernel = smooth + GroupKernel(6, active_dims=[0])  # "rbf+group": an exact kernel, GPyTorch's path
    y = ids.squeeze(-1) * 0.3 + 0.2 * torch.randn(n, generator=generator, dtype=DTYPE)
    model = GP(x, y, likelihood, kernel).to(DTYPE)
    test_x = x[:4].clone()
    test_x[:, 0] = torch.tensor([0.0, 2.0, 5.0, 4.0], dtype=DTYPE)
    return model, test_x


def _fantasy_points(model):
    """Two fantasy points, one in a level the training data do not have (5)."""
    x = model.train_inputs[0][:2].clone()
    x[:, 0] = torch.tensor([1.0, 5.0], dtype=DTYPE)
    return x, torch.tensor([0.4, -0.7], dtype=DTYPE)


def _dense_posterior(model, x, y, test_x, noise):
    """Mean and covariance at ``test_x`` of the model's prior conditioned densely on ``(x, y)`` (noise ``noise``)."""
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


# ---------------------------------------------------------------------------- validate(False) and fantasies
@pytest.mark.parametrize("kind", ["group+group", "rbf+group", "block_mean+group"])
@pytest.mark.parametrize("when", ["before", "during"])
def test_fantasy_of_an_unvalidated_strategy_is_rebuilt_with_validation_on(kind, when):
    # a strategy used under validate(False) is rebuilt before a prediction with validation on, but a fantasy model
    # made from it (or made under validate(False)) kept GPyTorch's fantasy caches, updated from the unchecked ones,
    # and its predictions with validation on trusted them
    model, test_x = _model(kind)
    model.eval()
    new_x, new_y = _fantasy_points(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rbf+group: GPyTorch's path, which says so
        with settings.validate(False):
            model(test_x)
            if when == "during":
                fantasy = model.get_fantasy_model(new_x, new_y)
        if when == "before":
            fantasy = model.get_fantasy_model(new_x, new_y)
        parent, strategy = model.prediction_strategy, fantasy.prediction_strategy
        pred = fantasy(test_x)
        assert fantasy.prediction_strategy is not strategy  # rebuilt with the checks (a BlockMeanKernel's too)
        model(test_x)
        assert model.prediction_strategy is not parent
        mean, covariance = pred.mean, pred.covariance_matrix
    x, y = torch.cat([model.train_inputs[0], new_x]), torch.cat([model.train_targets, new_y])
    ref_mean, ref_covariance = _dense_posterior(model, x, y, test_x, model.likelihood.noise)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(covariance, ref_covariance, rtol=1e-8, atol=1e-10)


def test_fantasy_of_a_block_mean_sum_is_rebuilt_after_a_dtype_move():
    # the strategy dropped after model.float() was rebuilt by GPyTorch from the fantasy model's data, which the
    # BlockMeanKernel is not bound to: a ValueError telling the user to call kernel.set_train_data
    model, test_x = _model("block_mean+group")
    model.eval()
    new_x, new_y = _fantasy_points(model)
    with torch.no_grad():
        model(test_x)
        fantasy = model.get_fantasy_model(new_x, new_y)
        before = fantasy(test_x).mean
        fantasy.float()
        after = fantasy(test_x.float()).mean
    assert after.dtype == torch.float32
    torch.testing.assert_close(after.double(), before, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- closed-form fantasy updates
def _with_likelihood(model, kind: str):
    """``model`` with a ``kind`` likelihood (a ChunkedInducingPointKernel in it reads the same one)."""
    n = model.train_targets.shape[-1]
    if kind == "fixed":
        noise = 0.02 + 0.05 * torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
        model.likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise)
    elif kind == "group":  # level 5 unseen in training: a fantasy point there has the mean noise of the seen ones
        model.likelihood = GroupGaussianLikelihood(6, group_dim=0, train_inputs=model.train_inputs[0]).to(DTYPE)
        model.likelihood.noise = torch.linspace(0.02, 0.1, 6, dtype=DTYPE)
    for module in model.modules():
        if isinstance(module, ChunkedInducingPointKernel):
            module.likelihood = model.likelihood
    return model


def _noise_of(model, x, kind: str, fantasy_noise):
    if kind == "gaussian":
        return model.likelihood.noise.expand(x.shape[-2])
    if kind == "fixed":
        return torch.cat([model.likelihood.noise, *fantasy_noise])
    noise, seen = model.likelihood.noise, model.likelihood.observed
    ids = x[:, 0].long()
    return torch.where(seen[ids], noise[ids], noise[seen].mean())


@pytest.mark.parametrize(
    "kind, likelihood, batch",
    [
        ("group+group", "gaussian", False),
        ("group+group", "group", True),
        ("inducing+group", "fixed", True),
        ("inducing+group", "gaussian", False),
        ("block_mean+group", "fixed", False),
        ("block_mean+group", "group", True),
        ("rbf+group", "gaussian", True),  # outside the family: GPyTorch's update
    ],
)
def test_fantasies_of_fantasies_equal_the_dense_posterior_on_all_points(kind, likelihood, batch):
    """A fantasy (with a level the training data lack, 5; with a leading batch of fantasy targets), then a fantasy of
    it: the posterior on all the points, dense, in float64, without CG, Lanczos or a factorisation of their size."""
    model, test_x = _model(kind)
    model = _with_likelihood(model, likelihood)
    model.eval()
    x1, y1 = _fantasy_points(model)
    x2 = x1.clone()
    x2[:, 0], x2[:, 1] = torch.tensor([5.0, 3.0], dtype=DTYPE), x1[:, 1].flip(0)
    y2 = torch.tensor([1.0, 0.5], dtype=DTYPE)
    if batch:
        y1, y2 = torch.stack([y1, y1 + 1.0, -y1]), y2.expand(3, 2)
    noises = [torch.tensor([0.03, 0.04], dtype=DTYPE), torch.tensor([0.05, 0.01], dtype=DTYPE)]
    kwargs = [{"noise": noise} if likelihood == "fixed" else {} for noise in noises]
    guard = closed_forms_only(N) if kind != "rbf+group" else warnings.catch_warnings()
    with torch.no_grad(), guard:
        warnings.simplefilter("ignore")  # rbf+group: GPyTorch's path, which says so
        model(test_x)
        fantasy = model.get_fantasy_model(x1, y1, **kwargs[0])
        first = fantasy(test_x)
        second = fantasy.get_fantasy_model(x2, y2, **kwargs[1])(test_x)
        results = [(first.mean, first.covariance_matrix), (second.mean, second.covariance_matrix)]
    y = model.train_targets.expand(*y1.shape[:-1], N)
    for count, (mean, covariance) in enumerate(results, start=1):
        x = torch.cat([model.train_inputs[0], x1, x2][: count + 1])
        targets = torch.cat([y, y1, y2][: count + 1], dim=-1)
        noise = _noise_of(model, x, likelihood, noises[:count])
        ref_mean, ref_covariance = _dense_posterior(model, x, targets, test_x, noise)
        assert mean.shape == ref_mean.shape == (*y1.shape[:-1], 4)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(covariance, ref_covariance.expand_as(covariance), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["group+group", "inducing+group"])
def test_fantasy_update_of_a_closed_form_sum_forms_nothing_of_the_data_size(kind):
    # GPyTorch's update appended the fantasy rows to an n x n root of the old training covariance and took the
    # pseudo-inverse of the (n + m) x (n + m) result (QR, which the closed-form guard does not watch): 9 million
    # entries and 11 s at n = 3000, for caches the closed-form predictions never read. (A BlockMeanKernel's block
    # sums over the training inputs, evaluated again for the fantasy model, take row chunks of its own size.)
    n = 300
    model, test_x = _model(kind, n)
    model.eval()
    new_x, new_y = _fantasy_points(model)
    with torch.no_grad():
        model(test_x)
        with LargestTensor() as largest:
            fantasy = model.get_fantasy_model(new_x, new_y)
            pred = fantasy(test_x)
            assert pred.mean.shape == pred.variance.shape == (4,)
    assert largest.largest < 20 * n, f"{largest.largest} entries from {largest.where}"


@pytest.mark.parametrize("likelihood", ["gaussian", "group"])
def test_fantasy_noise_a_likelihood_cannot_hold_is_refused(likelihood):
    # the fantasy likelihood of a GaussianLikelihood / GroupGaussianLikelihood is a copy without the given noise, and
    # the closed-form predictions, which start from it, used the likelihood's noise at the fantasy points (means off
    # by 0.7 with noise=[1, 2] against 0.05)
    model, test_x = _model("inducing+group")
    model = _with_likelihood(model, likelihood)
    model.eval()
    new_x, new_y = _fantasy_points(model)
    with torch.no_grad():
        model(test_x)
        strategy = model.prediction_strategy
        with pytest.raises(ValueError, match="noise=.*FixedNoiseGaussianLikelihood"):
            model.get_fantasy_model(new_x, new_y, noise=torch.tensor([1.0, 2.0], dtype=DTYPE))
        assert model.prediction_strategy is strategy and model.train_targets.shape == (N,)  # nothing changed
        fantasy = model.get_fantasy_model(new_x, new_y)  # without noise=: the likelihood's noise
        assert fantasy.train_targets.shape == (N + 2,)


def test_a_batch_of_fantasy_targets_on_an_inducing_point_sum_stays_closed_form():
    """A user trial's qKG pattern: ``ChunkedInducingPointKernel + GroupKernel`` (16 inducing points on [0, 1], an
    ill-conditioned ``K_ZZ``) and ``get_fantasy_model`` with a batch of 8 fantasy targets. The fantasy model's
    training root came from the batched inputs and the cross covariance's from the inputs alone; they differed by
    2.3e-12 (a batched product rounds differently, magnified by ``K_ZZ``), the prediction did not recognise the
    training root and formed the ``t x n`` cross covariance per fantasy, with a warning (0.80 s against 0.04 s at
    n = 20,000). Equal inputs across the batch are now rooted once. Each fantasy equals the fantasy of its own
    targets."""
    generator = torch.Generator().manual_seed(0)
    n = 300
    x = torch.cat([torch.rand(n, 1, generator=generator, dtype=DTYPE),
                   torch.randint(0, 20, (n, 1), generator=generator).to(DTYPE)], -1)  # fmt: skip
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(n, generator=generator, dtype=DTYPE)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    inducing = torch.linspace(0, 1, 16, dtype=DTYPE).unsqueeze(-1)
    smooth = ChunkedInducingPointKernel(ScaleKernel(RBFKernel()), inducing, likelihood, active_dims=[0])
    model = GP(x, y, likelihood, smooth + GroupKernel(20, active_dims=[1])).to(DTYPE)
    model.eval()
    xq = torch.tensor([[0.3, 1.0], [0.7, 5.0]], dtype=DTYPE)
    test_x = torch.cat([torch.rand(6, 1, generator=generator, dtype=DTYPE),
                        torch.randint(0, 20, (6, 1), generator=generator).to(DTYPE)], -1)  # fmt: skip
    targets = torch.randn(8, 2, generator=generator, dtype=DTYPE)
    with torch.no_grad():
        model(test_x[:2])
        with warnings.catch_warnings():
            warnings.filterwarnings("error", category=ClosedFormFallbackWarning)
            batch = model.get_fantasy_model(xq, targets)(test_x)
            mean, variance = batch.mean, batch.variance
        for i in (0, 5):
            single = model.get_fantasy_model(xq, targets[i])(test_x)
            torch.testing.assert_close(mean[i], single.mean, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(variance[i], single.variance, rtol=1e-9, atol=1e-10)
