"""Session 31, mixed-effects user trial: per-group noise with the groups given as 1-D ids, SGPR and groups added in
a model's forward."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import ChunkedInducingPointKernel, ClosedFormFallbackWarning, GroupGaussianLikelihood, GroupKernel
from closed_form_guard import closed_forms_only

DTYPE = torch.float64


class _SmoothGP(gpytorch.models.ExactGP):
    """A smooth GP on the inputs alone: the groups reach only the likelihood (heteroscedastic noise by group)."""

    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _days_data():
    """sleepstudy's layout: 18 subjects, days 0..9. The only input column (days) holds whole numbers below the
    number of subjects, so it reads as valid group ids."""
    generator = torch.Generator().manual_seed(0)
    k = 18
    groups = torch.arange(k).repeat_interleave(10)
    days = torch.arange(10, dtype=DTYPE).repeat(k)
    y = torch.sin(days / 3) + torch.randn(k * 10, generator=generator, dtype=DTYPE) * (0.1 + groups.to(DTYPE) / 10)
    return days.unsqueeze(-1), y, groups, k


def _dense_posterior(model, x, y, groups, x_test):
    """Mean and variance at ``x_test`` with each training point's own group noise, by dense linear algebra."""
    with torch.no_grad():
        noise = model.likelihood.noise[groups]
        K = model.covar_module(x).to_dense() + torch.diag(noise)
        cross = model.covar_module(x_test, x).to_dense()
        mean = model.mean_module(x_test) + cross @ torch.linalg.solve(K, y - model.mean_module(x))
        prior = model.covar_module(x_test, diag=True)
        variance = prior - (cross * torch.linalg.solve(K, cross.mT).mT).sum(-1)
    return mean, variance


@pytest.mark.parametrize("trained", [False, True])
def test_training_groups_given_as_ids_are_the_groups_of_the_training_points_in_prediction(trained):
    # GroupGaussianLikelihood(k, train_inputs=ids): "the inputs need not hold them" (docs/mixed.md). The
    # prediction strategy hands the likelihood the training inputs, whose last column was read as the groups:
    # here the days, so the posterior mean was 0.7467 / 0.6580 against 0.7361 / 0.6240, without a warning
    x, y, groups, k = _days_data()
    likelihood = GroupGaussianLikelihood(k, train_inputs=groups)
    model = _SmoothGP(x, y, likelihood).to(DTYPE)
    with torch.no_grad():
        likelihood.noise = torch.linspace(0.01, 3.0, k)
    if trained:
        model.train()
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
        loss.backward()
    model.eval()
    x_test = torch.tensor([[2.5], [7.0], [0.0]], dtype=DTYPE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        pred = model(x_test)
        noisy = likelihood(model(x_test), groups=torch.tensor([0, 17, 5]))
    mean, variance = _dense_posterior(model, x, y, groups, x_test)
    torch.testing.assert_close(pred.mean, mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(pred.variance, variance, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(noisy.variance - pred.variance, likelihood.noise[[0, 17, 5]].detach())


def test_ids_as_a_second_model_input_predict():
    # GPyTorch's Hadamard layout, (x, ids) as two inputs, with the noise per group given the ids: the strategy's
    # training inputs start with x (not whole numbers), and prediction raised "inputs[..., -1] holds 0.41..."
    x, y, groups, k = _days_data()
    x = x + 0.5  # not whole numbers

    class TwoInputs(gpytorch.models.ExactGP):
        def __init__(self, x, ids, y, likelihood):
            super().__init__((x, ids), y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

        def forward(self, x, ids):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    likelihood = GroupGaussianLikelihood(k, train_inputs=groups)
    model = TwoInputs(x, groups, y, likelihood).to(DTYPE)
    with torch.no_grad():
        likelihood.noise = torch.linspace(0.01, 3.0, k)
    model.eval()
    x_test = torch.tensor([[2.5], [7.25]], dtype=DTYPE)
    with torch.no_grad():
        pred = model(x_test, torch.tensor([1, 2]))
    mean, variance = _dense_posterior(model, x, y, groups, x_test)
    torch.testing.assert_close(pred.mean, mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(pred.variance, variance, rtol=1e-8, atol=1e-10)


def test_fantasy_of_a_model_whose_inputs_hold_no_groups_says_why():
    # the fantasy points' groups were read from their day column and the fantasy's training groups re-read from the
    # days: its posterior mean was 0.7611 / 0.6579 against 0.7614 / 0.6240 on all the points, without a warning
    x, y, groups, k = _days_data()
    likelihood = GroupGaussianLikelihood(k, train_inputs=groups)
    model = _SmoothGP(x, y, likelihood).to(DTYPE)
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"1-D ids .* group_dim=j"):
        model.get_fantasy_model(torch.tensor([[3.0], [4.0]], dtype=DTYPE), torch.tensor([1.0, 0.5], dtype=DTYPE))


def test_fantasy_with_ids_given_and_held_in_the_last_column():
    # 1-D training ids whose values the inputs' last column does hold: the fantasy reads the fantasy points' groups
    # there, and predicts as the model given all the points
    x, y, groups, k = _days_data()
    inputs = torch.cat([x, groups.unsqueeze(-1).to(DTYPE)], -1)

    class OnDays(_SmoothGP):
        def forward(self, x):
            days = x[..., :1]
            return gpytorch.distributions.MultivariateNormal(self.mean_module(days), self.covar_module(days))

    likelihood = GroupGaussianLikelihood(k, train_inputs=groups)
    model = OnDays(inputs, y, likelihood).to(DTYPE)
    with torch.no_grad():
        likelihood.noise = torch.linspace(0.01, 3.0, k)
    model.eval()
    x_test = torch.tensor([[2.5, 0.0], [7.0, 17.0]], dtype=DTYPE)
    with torch.no_grad():
        model(x_test)
    new = torch.tensor([[3.0, 0.0], [4.0, 17.0]], dtype=DTYPE)
    targets = torch.tensor([1.0, 0.5], dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the last column read as the ids, without group_dim
        fantasy = model.get_fantasy_model(new, targets)
        with torch.no_grad():
            pred = fantasy(x_test)
    all_inputs = torch.cat([inputs, new])
    mean, variance = _dense_posterior(
        model, all_inputs[:, :1], torch.cat([y, targets]), all_inputs[:, 1].long(), x_test[:, :1]
    )
    torch.testing.assert_close(pred.mean, mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(pred.variance, variance, rtol=1e-8, atol=1e-10)


class _ForwardSum(gpytorch.models.ExactGP):
    """SGPR on column 0 plus a random intercept on column 1, added in ``forward`` (the only way when the kernels take
    different inputs) instead of as ``covar_module = sgpr + group``."""

    def __init__(self, x, y, likelihood, inducing_kernel, num_groups):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        inducing = torch.linspace(0, 4, 8, dtype=x.dtype).unsqueeze(-1)
        self.sgpr = inducing_kernel(base, inducing, likelihood, active_dims=[0])
        self.group = GroupKernel(num_groups, active_dims=[1])

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.sgpr(x) + self.group(x))


def _forward_sum_data():
    generator = torch.Generator().manual_seed(1)
    n, k = 120, 6
    groups = torch.randint(0, k, (n,), generator=generator)
    x = 4 * torch.rand(n, generator=generator, dtype=DTYPE)
    y = torch.sin(x) + groups.to(DTYPE) / 5 + 0.2 * torch.randn(n, generator=generator, dtype=DTYPE)
    return torch.stack([x, groups.to(DTYPE)], -1), y, k


def _sgpr_parts(model, x):
    """The model's SGPR pieces by dense algebra: ``Q = K_xz K_zz^{-1} K_zx`` and the exact prior diagonal."""
    base = model.sgpr.base_kernel
    z = model.sgpr.inducing_points
    cross = base(x[:, :1], z).to_dense()
    return cross @ torch.linalg.solve(base(z).to_dense(), cross.mT), base(x[:, :1], diag=True)


@pytest.mark.parametrize("inducing_kernel", [gpytorch.kernels.InducingPointKernel, ChunkedInducingPointKernel])
def test_sgpr_and_groups_added_in_forward_train_and_predict_in_closed_form(inducing_kernel):
    # the same kernels as covar_module = sgpr + group are closed form; added as outputs in forward, GPyTorch's
    # InducingPointKernel trained by a dense Cholesky of the n x n sum (CG and Lanczos past max_cholesky_size) and
    # both kernels predicted so (linear_cg inside the guard), with a ClosedFormFallbackWarning
    x, y, k = _forward_sum_data()
    n = x.shape[0]
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = _ForwardSum(x, y, likelihood, inducing_kernel, k + 1).to(DTYPE)
    model.train()
    with warnings.catch_warnings(), closed_forms_only(n), gpytorch.settings.max_cholesky_size(0):
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
        loss.backward()
    params = dict(model.named_parameters())
    grads = {name: p.grad.clone() for name, p in params.items()}
    for p in params.values():
        p.grad = None
    # the reference: SGPR's collapsed bound by dense algebra, differentiated by autograd
    Q, prior = _sgpr_parts(model, x)
    noise = likelihood.noise
    groups = x[:, 1].long()
    C = Q + model.group.var * (groups.unsqueeze(-1) == groups).to(DTYPE) + noise * torch.eye(n, dtype=DTYPE)
    r = y - model.mean_module.constant
    fit = r @ torch.linalg.solve(C, r) + torch.logdet(C) + n * torch.log(torch.tensor(2 * torch.pi, dtype=DTYPE))
    reference = (0.5 * fit + 0.5 * (prior - Q.diagonal()).sum() / noise.squeeze()) / n
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-7, atol=1e-9 * float(p.grad.abs().max()) + 1e-12)

    model.eval()
    x_test = torch.tensor([[1.0, 0.0], [2.0, 4.0], [3.0, k], [0.3, 2.0]], dtype=DTYPE)
    with torch.no_grad(), warnings.catch_warnings(), closed_forms_only(n), gpytorch.settings.max_cholesky_size(0):
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        # GPyTorch's default strategy for an evaluated training covariance, as for any forward that adds outputs;
        # its solves are the closed-form ones (the guard)
        warnings.filterwarnings("ignore", "the training covariance is an evaluated", ClosedFormFallbackWarning)
        pred = model(x_test)
        mean, covariance = pred.mean, pred.covariance_matrix
    with torch.no_grad():
        # GPyTorch's prediction for this model: in eval mode the SGPR covariance carries its diagonal correction
        inputs = torch.cat([x, x_test])
        Q, prior = _sgpr_parts(model, inputs)
        ids = inputs[:, 1].long()
        K = Q + torch.diag(prior - Q.diagonal()) + model.group.var * (ids.unsqueeze(-1) == ids).to(DTYPE)
        train = K[:n, :n] + likelihood.noise * torch.eye(n, dtype=DTYPE)
        cross = K[n:, :n]
        expected_mean = model.mean_module.constant + cross @ torch.linalg.solve(train, y - model.mean_module.constant)
        expected_covariance = K[n:, n:] - cross @ torch.linalg.solve(train, cross.mT)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(covariance, expected_covariance, rtol=1e-8, atol=1e-11)


class _Added(gpytorch.models.ExactGP):
    """``first + GroupKernel`` on column 1, added as kernels or as outputs in ``forward``."""

    def __init__(self, x, y, likelihood, first, num_groups, in_forward):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.first, self.group = first, GroupKernel(num_groups, active_dims=[1])
        self.covar_module = first + self.group
        self.in_forward = in_forward

    def forward(self, x):
        covariance = self.first(x) + self.group(x) if self.in_forward else self.covar_module(x)
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), covariance)


@pytest.mark.parametrize(
    "first",
    [
        lambda: gpytorch.kernels.ConstantKernel(),
        lambda: gpytorch.kernels.ScaleKernel(gpytorch.kernels.LinearKernel(active_dims=[0])),
    ],
    ids=["constant", "linear"],
)
def test_constant_and_linear_kernels_added_in_forward_are_the_kernel_sum(first):
    # ConstantKernel() + GroupKernel and LinearKernel + GroupKernel are closed form as kernels; added in forward they
    # trained by a dense Cholesky of the n x n sum (CG and Lanczos past max_cholesky_size), with a warning
    x, y, k = _forward_sum_data()
    n = x.shape[0]
    results = []
    for in_forward in (True, False):
        torch.manual_seed(0)
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = _Added(x, y, likelihood, first(), k + 1, in_forward).to(DTYPE)
        model.train()
        with warnings.catch_warnings(), closed_forms_only(n), gpytorch.settings.max_cholesky_size(0):
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
            loss.backward()
        model.eval()
        with torch.no_grad(), warnings.catch_warnings(), closed_forms_only(n), gpytorch.settings.max_cholesky_size(0):
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            warnings.filterwarnings("ignore", "the training covariance is an evaluated", ClosedFormFallbackWarning)
            pred = model(torch.tensor([[1.0, 0.0], [2.5, k]], dtype=DTYPE))
            results.append((loss, {name: p.grad for name, p in model.named_parameters()}, pred.mean, pred.variance))
    (loss, grads, mean, variance), (loss_k, grads_k, mean_k, variance_k) = results
    torch.testing.assert_close(loss, loss_k, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_k[name], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mean, mean_k, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(variance, variance_k, rtol=1e-9, atol=1e-11)
