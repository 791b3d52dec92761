"""Session 31, an attack on the mixed-effects fixes: fantasies of inducing-point kernels added in ``forward`` (now
closed form), and 1-D training ids that went stale after ``model.set_train_data``."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import ClosedFormFallbackWarning, GroupGaussianLikelihood, GroupKernel
from closed_form_guard import closed_forms_only
from test_session31_mixed import _days_data, _dense_posterior, _SmoothGP
from test_session31_mixed import _forward_sum_data as _data  # x (day, id), y, k: the forward-sum tests' data

DTYPE = torch.float64


class _InducingPlusGroups(gpytorch.models.ExactGP):
    """GPyTorch's InducingPointKernel on column 0 plus a random intercept on column 1, added in ``forward`` or as
    kernels."""

    def __init__(self, x, y, likelihood, num_groups, in_forward):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        inducing = torch.linspace(0, 4, 8, dtype=x.dtype).unsqueeze(-1)
        self.sgpr = gpytorch.kernels.InducingPointKernel(base, inducing, likelihood, active_dims=[0])
        self.group = GroupKernel(num_groups, active_dims=[1])
        self.covar_module = self.sgpr + self.group
        self.in_forward = in_forward

    def forward(self, x):
        covariance = self.sgpr(x) + self.group(x) if self.in_forward else self.covar_module(x)
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), covariance)


@pytest.mark.parametrize("in_forward", [True, False], ids=["forward", "kernel_sum"])
def test_fantasy_of_an_inducing_point_kernel_plus_groups_predicts_as_all_the_points(in_forward):
    # GPyTorch's InducingPointKernel deep-copies itself as a new instance in training mode: the fantasy model (eval
    # mode) evaluated it without its diagonal correction, so the fantasy's variances were 4.6e-4 (0.8%) off those of
    # the model given all the points, silently (self.sgpr(x) + self.group(x), closed form since this session), or it
    # raised "x1 should equal x2 in training mode" (covar_module = sgpr + group)
    x, y, k = _data()
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = _InducingPlusGroups(x, y, likelihood, k + 1, in_forward).to(DTYPE)
    model.eval()
    x_test = torch.tensor([[1.0, 0.0], [2.0, 4.0], [3.0, k]], dtype=DTYPE)
    new, targets = x_test[:2], torch.tensor([0.3, 0.1], dtype=DTYPE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPyTorch's default strategy and its cat_rows, as for any forward sum
        model(x_test)
        fantasy = model.get_fantasy_model(new, targets)
        pred = fantasy(x_test)
    with torch.no_grad():
        inputs = torch.cat([x, new, x_test])
        base, z = model.sgpr.base_kernel, model.sgpr.inducing_points
        cross = base(inputs[:, :1], z).to_dense()
        Q = cross @ torch.linalg.solve(base(z).to_dense(), cross.mT)
        ids = inputs[:, 1].long()
        K = Q + torch.diag(base(inputs[:, :1], diag=True) - Q.diagonal())
        K = K + model.group.var * (ids.unsqueeze(-1) == ids).to(DTYPE)
        n = x.shape[0] + 2
        train = K[:n, :n] + likelihood.noise * torch.eye(n, dtype=DTYPE)
        mu = model.mean_module.constant
        mean = mu + K[n:, :n] @ torch.linalg.solve(train, torch.cat([y, targets]) - mu)
        variance = K[n:, n:].diagonal() - (K[n:, :n] * torch.linalg.solve(train, K[:n, n:]).mT).sum(-1)
    torch.testing.assert_close(pred.mean, mean, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(pred.variance, variance, rtol=1e-9, atol=1e-11)
    assert not any(module.training for module in fantasy.modules())


def _days_model():
    x, y, groups, k = _days_data()
    likelihood = GroupGaussianLikelihood(k, train_inputs=groups)
    model = _SmoothGP(x, y, likelihood).to(DTYPE)
    with torch.no_grad():
        likelihood.noise = torch.linspace(0.01, 3.0, k)
    model.eval()
    return model, likelihood, x, y, groups


@pytest.mark.parametrize("points", ["same", "fewer"])
def test_training_ids_left_stale_by_set_train_data_raise(points):
    # 1-D training ids that the inputs do not hold, and model.set_train_data(x, y) without
    # likelihood.set_train_inputs(ids): the new training points took the old points' groups (the posterior mean 0.41
    # off, the same number of points) or the values of the inputs' last column (0.012 off, 150 points), silently
    model, likelihood, x, y, groups = _days_model()
    x_test = torch.tensor([[2.5], [7.0]], dtype=DTYPE)
    with torch.no_grad():
        model(x_test)
    if points == "same":
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    else:
        keep = torch.arange(150)
    model.set_train_data(x[keep], y[keep], strict=False)
    with torch.no_grad(), pytest.raises(ValueError, match=r"set_train_data.*set_train_inputs\(ids\)"):
        model(x_test)
    likelihood.set_train_inputs(groups[keep])
    with torch.no_grad():
        pred = model(x_test)
    mean, variance = _dense_posterior(model, x[keep], y[keep], groups[keep], x_test)
    torch.testing.assert_close(pred.mean, mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(pred.variance, variance, rtol=1e-8, atol=1e-10)


def test_training_ids_with_the_same_inputs_moved_or_shared_still_predict():
    # the inputs the ids were used with, cast (model.float()/double()) or held by a second model: not stale
    model, likelihood, x, y, groups = _days_model()
    x_test = torch.tensor([[2.5], [7.0]], dtype=DTYPE)
    with torch.no_grad():
        first = model(x_test).mean
    twin = _SmoothGP(x.clone(), 2 * y, likelihood).to(DTYPE)
    twin.load_state_dict(model.state_dict())
    twin.eval()
    with torch.no_grad():
        doubled = twin(x_test).mean
    mean, _ = _dense_posterior(twin, x, 2 * y, groups, x_test)
    torch.testing.assert_close(doubled, mean, rtol=1e-8, atol=1e-10)
    model.float().double()  # the training inputs are new tensors of the same values
    with torch.no_grad():
        again = model(x_test).mean
    torch.testing.assert_close(again, first, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [torch.Size(), torch.Size([2])], ids=["single", "batch"])
def test_a_scaled_constant_kernel_added_in_forward_joins_the_closed_form(batch):
    # ScaleKernel(ConstantKernel()) + GroupKernel added in forward: ScaleKernel multiplied the constant's expanded
    # matrix by its outputscale, a dense n x n summand (O(n^2) memory), so the sum trained by a dense Cholesky with a
    # ClosedFormFallbackWarning, where ConstantKernel() alone joined the closed form
    x, y, k = _data()
    n = x.shape[0]
    y = y.expand(*batch, n)
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch)
    model = _InducingPlusGroups(x, y, likelihood, k + 1, True).to(DTYPE)
    model.mean_module = gpytorch.means.ZeroMean()
    model.first = gpytorch.kernels.ScaleKernel(gpytorch.kernels.ConstantKernel(batch_shape=batch), batch_shape=batch)
    model.group = GroupKernel(k + 1, active_dims=[1], batch_shape=batch)
    model.to(DTYPE)
    with torch.no_grad():
        model.first.outputscale = torch.linspace(0.7, 1.3, batch.numel() or 1).reshape(batch)
        model.first.base_kernel.constant = torch.full((*batch, 1), 0.4, dtype=DTYPE)

    def forward(inputs):
        covariance = model.first(inputs) + model.group(inputs)
        return gpytorch.distributions.MultivariateNormal(model.mean_module(inputs), covariance)

    model.forward = forward
    with warnings.catch_warnings(), closed_forms_only(n), gpytorch.settings.max_cholesky_size(0):
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y).sum()
        loss.backward()
    params = {name: p for name, p in model.named_parameters() if name.startswith(("first", "group", "likelihood"))}
    grads = {name: p.grad.clone() for name, p in params.items()}
    for p in params.values():
        p.grad = None
    ids = x[:, 1].long()
    same = (ids.unsqueeze(-1) == ids).to(DTYPE)
    scale = (model.first.outputscale * model.first.base_kernel.constant.squeeze(-1)).reshape(*batch, 1, 1)
    noise = likelihood.noise.unsqueeze(-1) * torch.eye(n, dtype=DTYPE)
    C = scale + model.group.var.reshape(*batch, 1, 1) * same + noise
    fit = (y.unsqueeze(-2) @ torch.linalg.solve(C, y.unsqueeze(-1))).reshape(batch) + torch.logdet(C)
    reference = ((0.5 * fit + 0.5 * n * torch.log(torch.tensor(2 * torch.pi, dtype=DTYPE))) / n).sum()
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-8, atol=1e-12)

    model.eval()
    x_test = torch.tensor([[1.0, 0.0], [2.0, k]], dtype=DTYPE)
    with torch.no_grad(), warnings.catch_warnings(), closed_forms_only(n), gpytorch.settings.max_cholesky_size(0):
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        warnings.filterwarnings("ignore", "the training covariance is an evaluated", ClosedFormFallbackWarning)
        pred = model(x_test)
    with torch.no_grad():
        test_ids = x_test[:, 1].long()
        cross = scale + model.group.var.reshape(*batch, 1, 1) * (test_ids.unsqueeze(-1) == ids).to(DTYPE)
        prior = scale.squeeze(-1) + model.group.var.reshape(*batch, 1)
        solved = torch.linalg.solve(C, cross.mT)
        mean = (cross @ torch.linalg.solve(C, y.unsqueeze(-1))).squeeze(-1)
        variance = prior - (cross * solved.mT).sum(-1)
    torch.testing.assert_close(pred.mean, mean, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(pred.variance, variance, rtol=1e-9, atol=1e-11)
