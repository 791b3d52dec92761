"""Audit of GP prediction caches against ``bma_gp.settings``: what a model in eval mode keeps between predictions
made under different settings, as a GPyTorch user switches them."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from gpytorch.constraints import Interval

from bma_gp import BlockMeanKernel, ChunkedInducingPointKernel, GroupKernel, Partition, settings
from gp_reference import GP

pytestmark = pytest.mark.usefixtures("one_thread")

N = 40


def _model(kind: str):
    """A small float64 model of ``kind`` and test inputs at new points (seen and unseen groups)."""
    ids = torch.randint(0, 5, (N, 1)).double()
    y = torch.randn(N, dtype=torch.float64)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    x = ids
    if kind == "group":
        kernel = GroupKernel(5, var_constraint=Interval(-5.0, 5.0))
    elif kind == "block_mean":
        kernel = BlockMeanKernel(gpytorch.kernels.RBFKernel(), ids, Partition.from_labels(ids.squeeze(-1).long()))
    elif kind == "inducing+group":
        x = torch.cat([ids, torch.randn(N, 1, dtype=torch.float64)], dim=-1)
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[1]))
        kernel = ChunkedInducingPointKernel(base, torch.randn(4, 2, dtype=torch.float64), likelihood) + GroupKernel(
            5, active_dims=[0], var_constraint=Interval(-5.0, 5.0)
        )
    else:  # two groupings with per-point noise: a BlockMeanSumLinearOperator
        x = torch.cat([ids, torch.randint(0, 3, (N, 1)).double()], dim=-1)
        likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(torch.rand(N, dtype=torch.float64) * 0.1 + 0.01)
        kernel = GroupKernel(5, active_dims=[0], var_constraint=Interval(-5.0, 5.0)) + GroupKernel(3, active_dims=[1])
    model = GP(x, y, likelihood, kernel).double()
    test_x = x[:3].clone()
    test_x[:, 0] = torch.tensor([0.0, 1.0, 4.0])
    return model, likelihood, test_x


def _spoil(model) -> None:
    """A negative group variance (an indefinite training covariance) or a NaN lengthscale."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GroupKernel) and module.raw_var_constraint.lower_bound < 0:
                module.var = torch.tensor([-3.0], dtype=torch.float64)
            if isinstance(module, BlockMeanKernel):
                module.base_kernel.raw_lengthscale.fill_(float("nan"))


# ---------------------------------------------------------------------------- validation off, then on
@pytest.mark.parametrize("kind", ["group", "block_mean", "inducing+group", "group+group"])
@pytest.mark.parametrize("fast", [False, True])
def test_unvalidated_prediction_cache_is_not_reused_with_validation_on(kind, fast):
    # the strategy (GPyTorch's mean cache, the block mean factors) built under validate(False) held NaN, and the next
    # prediction with validation on returned it instead of raising the documented ValueError
    model, likelihood, test_x = _model(kind)
    _spoil(model)
    model.eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(fast):
        with settings.validate(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert likelihood(model(test_x)).variance.shape == (3,)  # nan or a number, no error
        with pytest.raises(ValueError, match="positive definite|not finite"):
            model(test_x)
        with pytest.raises(ValueError, match="positive definite|not finite"):  # and again: nothing half-changed
            model(test_x)


def test_valid_model_keeps_its_strategy_while_the_setting_stays():
    model, likelihood, test_x = _model("group")
    model.covar_module.var = torch.tensor([1.0], dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        first = model(test_x)
        strategy = model.prediction_strategy
        second = model(test_x)
        assert model.prediction_strategy is strategy  # no rebuild: the switch costs nothing when unchanged
        with settings.validate(False):
            third = model(test_x)
            assert model.prediction_strategy is strategy  # checked caches serve validation off too
            model(test_x)
            assert model.prediction_strategy is strategy
        fourth = model(test_x)  # rebuilt (it was used unchecked), with the same numbers
        assert model.prediction_strategy is not strategy
    for pred in (second, third, fourth):
        torch.testing.assert_close(pred.mean, first.mean)
        torch.testing.assert_close(pred.variance, first.variance)


# ---------------------------------------------------------------------------- model.double() / model.float()
@pytest.mark.parametrize("kind", ["group", "group+group"])
def test_strategy_rebuilt_after_dtype_change_with_integer_group_ids(kind):
    # integer group ids keep their dtype through model.float() / model.double(), and only the inputs were compared:
    # the float32 strategy (float32 training covariance and targets) predicted for the float64 model, with float32
    # accuracy (0.6 % off in the posterior variances at noise 1e-4)
    n = 400
    x = torch.cat([torch.randint(0, 6, (n, 1)), torch.randint(0, 4, (n, 1))], dim=-1)
    y = torch.randn(n, dtype=torch.float64) + 1000.0
    kernel = GroupKernel(6, active_dims=[0])
    if kind == "group+group":
        kernel = kernel + GroupKernel(4, active_dims=[1])
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = GP(x, y, likelihood, kernel).double()
    likelihood.noise = 1e-4
    model.eval()
    test_x = torch.tensor([[0, 1], [3, 2], [5, 0]])
    with torch.no_grad():
        model.float()
        assert model(test_x).mean.dtype == torch.float32
        model.double()
        pred = model(test_x)
        assert model.prediction_strategy.train_labels.dtype == torch.float64
        model.train()
        model.eval()
        fresh = model(test_x)
    torch.testing.assert_close(pred.mean, fresh.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(pred.variance, fresh.variance, rtol=1e-10, atol=0)
