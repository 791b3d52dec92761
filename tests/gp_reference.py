"""A plain ExactGP and its dense reference, shared by the GPyTorch model tests.

:class:`DenseKernel` evaluates a kernel and hands GPyTorch a plain tensor, so a model that uses it is conditioned
by GPyTorch's dense path (Cholesky, with ``max_cholesky_size`` raised past ``n`` in :func:`dense_prediction`). It
evaluates eagerly, so a BlockMeanKernel inside it warns about ``lazily_evaluate_kernels(False)``, rightly.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import gpytorch
import torch


def grouped_data(seed: int = 0, n: int = 60, dtype: torch.dtype = torch.float64):
    """Inputs ``(x0, x1, group id)`` (ids ``0 .. 4``), targets, test inputs with seen ids and a new one (6), and the
    generator, for the draws a test adds after these: the data of the composition, product and settings audits."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=generator, dtype=dtype)
    ids = (torch.arange(n) % 5).to(dtype).unsqueeze(-1)
    inputs = torch.cat([x, ids], -1)
    y = torch.sin(x[:, 0]) + 0.3 * ids[:, 0] + 0.1 * torch.randn(n, generator=generator, dtype=dtype)
    test_ids = torch.tensor([[0.0], [1.0], [4.0], [2.0], [6.0]], dtype=dtype)
    xt = torch.cat([torch.randn(5, 2, generator=generator, dtype=dtype), test_ids], -1)
    return inputs, y, xt, generator


class DenseKernel(gpytorch.kernels.Kernel):
    """``kernel`` evaluated and returned as a dense tensor: the reference for any model type."""

    def __init__(self, kernel: gpytorch.kernels.Kernel):
        super().__init__()
        self.kernel = kernel

    def forward(self, x1, x2, diag=False, **params):
        with gpytorch.settings.lazily_evaluate_kernels(False):
            out = self.kernel(x1, x2, diag=diag, **params)
        return out if torch.is_tensor(out) else out.to_dense()

    def num_outputs_per_input(self, x1, x2):
        return self.kernel.num_outputs_per_input(x1, x2)


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel, batch_shape=()):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=torch.Size(batch_shape))
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def dense_copy(model: GP) -> GP:
    """A deep copy of ``model`` whose kernel is evaluated densely (no prediction cache)."""
    reference = copy.deepcopy(model)
    reference.covar_module = DenseKernel(reference.covar_module)
    reference.prediction_strategy = None
    return reference


def dense_prediction(model: GP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``model`` at ``x`` in eval mode, through GPyTorch's dense Cholesky."""
    model.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6):
        pred = model(x)
        return pred.mean, pred.variance


def assert_gradients_like_dense(model: GP, reference: GP, rtol: float = 1e-4, minimum: int = 2) -> None:
    """Every parameter gradient of ``model`` against its twin in ``reference`` (a :func:`dense_copy`, whose kernel
    sits one level deeper): close where the twin has one, and at least ``minimum`` of them compared."""
    names = dict(reference.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        twin = names[name.replace("covar_module.", "covar_module.kernel.", 1)]
        if twin.grad is None:
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, twin.grad, rtol=rtol, atol=1e-6 * float(twin.grad.abs().max()) + 1e-12)
        checked += 1
    assert checked >= minimum


def objective_like_dense(model: GP, objective, x, y, guard=contextlib.nullcontext) -> tuple[GP, torch.Tensor]:
    """``objective`` (a GPyTorch marginal log likelihood class) of ``model`` at ``(x, y)`` under ``guard()``, and of its
    :func:`dense_copy` (dense Cholesky, warnings ignored), both backpropagated and compared to 1e-10; returns the
    reference and the model's loss."""
    reference = dense_copy(model)
    for m in (model, reference):
        m.train()
    with guard():
        loss = -objective(model.likelihood, model)(model(x), y)
        loss.sum().backward()
    with warnings.catch_warnings(), gpytorch.settings.max_cholesky_size(10**6):
        warnings.simplefilter("ignore")
        ref = -objective(reference.likelihood, reference)(reference(x), y)
        ref.sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    return reference, loss


def slope_model(x, y, corr: float, noise: float, var=(1.0, 0.5), constant: float = 0.0) -> GP:
    """A random-slope GP on ``x = (covariate, id)`` (``GroupKernel(slope=True)`` with one more level than the ids
    seen, for unseen levels) with the given variances, correlation, noise and constant mean, in ``x``'s dtype."""
    from bma_gp import GroupKernel

    kernel = GroupKernel(int(x[:, 1].max()) + 2, slope=True, active_dims=[1, 0])
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).to(x.dtype)
    kernel.var = torch.tensor(var, dtype=x.dtype)
    kernel.corr = corr
    model.likelihood.noise = noise
    model.mean_module.constant.data.fill_(constant)
    return model
