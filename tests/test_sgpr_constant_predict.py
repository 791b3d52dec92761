"""An inducing-point kernel plus GPyTorch's ``ConstantKernel`` (``ChunkedInducingPointKernel + ConstantKernel()``, also
inside a ``ScaleKernel``) predicted through GPyTorch's default strategy: under ``fast_pred_var`` it formed the
closed-form training covariance's inverse root as an ``n x n`` matrix (+1.0 GiB at n = 5,000), and without it the
``t x n`` cross covariance and its solves (+3.1 GiB at n = 50,000). The package's strategy had been turned off for it
because it warned on the scaled sum: the constant's test-by-training matrix came inside a ``ConstantMulLinearOperator``
(the ``ScaleKernel`` around the sum), which the reading of the cross covariance did not take. It is now read as the
scaled cross covariance of the training sum's one-block term, and the model predicts in closed form."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy

from bma_gp import ChunkedInducingPointKernel
from bma_gp._warnings import ClosedFormFallbackWarning
from bma_gp.kernels.sum_prediction_strategy import SumPredictionStrategy

DT = torch.float64
KINDS = ["constant", "reversed", "scaled", "nested_scales", "two_constants", "gpytorch_inducing_scaled"]


def _model(kind: str, n: int = 120, m: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=gen, dtype=DT)
    y = torch.sin(6 * x[:, 0]) + torch.cos(3 * x[:, 1]) + 0.1 * torch.randn(n, generator=gen, dtype=DT)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 0.05
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    base.outputscale = 1.7
    base.base_kernel.lengthscale = 0.3
    Z = torch.rand(m, 2, generator=gen, dtype=DT)
    if kind == "gpytorch_inducing_scaled":
        sgpr = gpytorch.kernels.InducingPointKernel(base, Z, likelihood).double()
    else:
        sgpr = ChunkedInducingPointKernel(base, Z, likelihood).double()
    const = gpytorch.kernels.ConstantKernel().double()
    const.constant = torch.tensor(0.7, dtype=DT)

    def scaled(kernel, value):
        out = gpytorch.kernels.ScaleKernel(kernel).double()
        out.outputscale = value
        return out

    if kind == "constant":
        covar = sgpr + const
    elif kind == "reversed":
        covar = const + sgpr
    elif kind in ("scaled", "gpytorch_inducing_scaled"):
        covar = scaled(sgpr + const, 2.3)
    elif kind == "nested_scales":
        covar = scaled(scaled(sgpr + const, 1.9), 0.6)
    else:
        other = gpytorch.kernels.ConstantKernel().double()
        other.constant = torch.tensor(0.2, dtype=DT)
        covar = scaled(sgpr + const + other, 1.4)

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = covar

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = GP().double()
    model.mean_module.constant.data.fill_(0.3)
    return model.eval(), likelihood.eval(), x, y


def _dense(model, x, y, test):
    """Mean and covariance by dense float64 linear algebra on the eval-mode kernel matrices."""
    covar, likelihood = model.covar_module, model.likelihood
    K = covar(x).to_dense() + likelihood.noise * torch.eye(len(y), dtype=DT)
    cross, kk = covar(test, x).to_dense(), covar(test).to_dense()
    mean = model.mean_module(test) + (cross @ torch.linalg.solve(K, (y - model.mean_module(x)).unsqueeze(-1))).squeeze(
        -1
    )
    return mean, kk - cross @ torch.linalg.solve(K, cross.mT)


def _close(actual, expected, rtol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.detach().abs().max()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fast", [False, True])
def test_predictions_in_closed_form_without_a_warning(kind, fast):
    from closed_form_guard import closed_forms_only

    model, likelihood, x, y = _model(kind)
    gen = torch.Generator().manual_seed(5)
    tests = {
        "points": torch.rand(6, 2, generator=gen, dtype=DT),
        "one point": torch.rand(1, 2, generator=gen, dtype=DT),
        "batch of test sets": torch.rand(3, 4, 2, generator=gen, dtype=DT),
        "training subset": x[:5],
        "training inputs": x,
    }
    for what, test in tests.items():
        with torch.no_grad():
            expected_mean, expected_covar = _dense(model, x, y, test)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            with torch.no_grad(), gpytorch.settings.fast_pred_var(fast), closed_forms_only(len(y)):
                pred = model(test)
                mean, var = pred.mean, pred.variance
                noisy_var = likelihood(model(test)).variance
                covar = pred.covariance_matrix if test.shape[-2] < len(y) else None
        assert isinstance(model.prediction_strategy, SumPredictionStrategy), what
        _close(mean, expected_mean)
        _close(var, expected_covar.diagonal(dim1=-2, dim2=-1))
        _close(noisy_var, expected_covar.diagonal(dim1=-2, dim2=-1) + likelihood.noise)
        if covar is not None:
            _close(covar, expected_covar)


@pytest.mark.parametrize("fast", [False, True])
def test_gradients_match_the_dense_prediction(fast):
    # the test inputs' and every hyperparameter's gradient, with the training side differentiated too
    model, likelihood, x, y = _model("scaled", n=60, m=8)
    test = torch.rand(4, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    params = list(model.parameters())

    def loss(mean, covar):
        return mean.square().sum() + covar.sum() + covar.diagonal().log().sum()

    t1 = test.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with gpytorch.settings.fast_pred_var(fast), gpytorch.settings.detach_test_caches(False):
            pred = model(t1)
            value = loss(pred.mean, pred.covariance_matrix)
    grads = torch.autograd.grad(value, [t1, *params])
    assert isinstance(model.prediction_strategy, SumPredictionStrategy)
    t2 = test.clone().requires_grad_()
    expected = loss(*_dense(model, x, y, t2))
    expected_grads = torch.autograd.grad(expected, [t2, *params])
    _close(value.detach(), expected.detach())
    for g, e in zip(grads, expected_grads):
        _close(g, e, rtol=1e-9)


def test_fast_pred_var_forms_no_n_by_n_matrix():
    # GPyTorch's default strategy formed the n x n inverse root of the training covariance here (and its Lanczos or
    # dense eigendecomposition); the closed form holds the n x m root, t x q factors and q x q matrices. Measured by
    # storage: the constant's n x n is an expanded view of one value
    from largest_tensor import LargestTensor

    n, m, t = 1500, 10, 40
    model, _, _, _ = _model("scaled", n=n, m=m)
    test = torch.rand(t, 2, generator=torch.Generator().manual_seed(4), dtype=DT)
    with torch.no_grad(), gpytorch.settings.fast_pred_var(), LargestTensor(storage=True) as seen:
        pred = model(test)
        mean, var = pred.mean, pred.variance
    assert mean.shape == var.shape == (t,)
    assert seen.largest <= 4 * n * (m + 1), (seen.largest, seen.where)


def test_an_exact_summand_keeps_gpytorchs_strategy():
    # ChunkedInducingPointKernel + RBFKernel has no closed form (its fallback sum warns when solved): the package's
    # strategy is for sums of roots and constants only
    model, _, x, y = _model("constant", n=40, m=6)
    model.covar_module = model.covar_module.kernels[0] + gpytorch.kernels.RBFKernel().double()
    with pytest.warns(ClosedFormFallbackWarning), torch.no_grad():
        model(torch.rand(3, 2, dtype=DT))
    assert type(model.prediction_strategy) is DefaultPredictionStrategy


@pytest.mark.parametrize("fast", [False, True])
def test_a_batch_of_models_with_one_scale_each(fast):
    # ScaleKernel(sgpr + ConstantKernel(), batch_shape=(2,)): one scale per model multiplies the constant's cross
    # covariance as a (2, 1, 1) constant, with its own noise per model
    from closed_form_guard import closed_forms_only

    gen = torch.Generator().manual_seed(1)
    n = 90
    x = torch.rand(n, 2, generator=gen, dtype=DT)
    y = torch.randn(2, n, generator=gen, dtype=DT)
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size([2])).double()
    likelihood.noise = torch.tensor([[0.05], [0.2]], dtype=DT)
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    sgpr = ChunkedInducingPointKernel(base, torch.rand(10, 2, generator=gen, dtype=DT), likelihood)
    const = gpytorch.kernels.ConstantKernel().double()
    const.constant = torch.tensor(0.7, dtype=DT)
    covar = gpytorch.kernels.ScaleKernel(sgpr + const, batch_shape=torch.Size([2])).double()
    covar.outputscale = torch.tensor([0.5, 2.0], dtype=DT)

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean(batch_shape=torch.Size([2]))
            self.covar_module = covar

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = GP().double().eval()
    test = torch.rand(5, 2, generator=gen, dtype=DT)
    with torch.no_grad():
        K = covar(x).to_dense() + likelihood.noise.unsqueeze(-1) * torch.eye(n, dtype=DT)
        cross, kk = covar(test, x).to_dense(), covar(test).to_dense()
        r = (y - model.mean_module(x)).unsqueeze(-1)
        expected_mean = model.mean_module(test) + (cross @ torch.linalg.solve(K, r)).squeeze(-1)
        expected_covar = kk - cross @ torch.linalg.solve(K, cross.mT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with torch.no_grad(), gpytorch.settings.fast_pred_var(fast), closed_forms_only(n):
            pred = model(test)
            mean, covariance = pred.mean, pred.covariance_matrix
    assert isinstance(model.prediction_strategy, SumPredictionStrategy)
    _close(mean, expected_mean)
    _close(covariance, expected_covar)


def test_fantasy_model_predicts_in_closed_form():
    # the fantasy strategy of the package's sums (GPyTorch's default one took linear_operator's cat_rows: a warned
    # dense bordered matrix)
    from closed_form_guard import closed_forms_only

    model, _, x, y = _model("scaled", n=80, m=8)
    gen = torch.Generator().manual_seed(9)
    test = torch.rand(5, 2, generator=gen, dtype=DT)
    new_x, new_y = torch.rand(3, 2, generator=gen, dtype=DT), torch.randn(3, generator=gen, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with torch.no_grad(), closed_forms_only(len(y)):
            model(test)
            fantasy = model.get_fantasy_model(new_x, new_y)
            pred = fantasy(test)
            mean, covariance = pred.mean, pred.covariance_matrix
    with torch.no_grad():
        expected_mean, expected_covar = _dense(model, torch.cat([x, new_x]), torch.cat([y, new_y]), test)
    _close(mean, expected_mean)
    _close(covariance, expected_covar)
