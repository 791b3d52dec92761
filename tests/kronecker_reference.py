"""Dense references shared by the Kronecker tests (tests/test_kronecker_block_mean.py,
tests/test_kronecker_task_noise.py): a multitask model's marginal log-likelihood, its gradients and its prediction,
formed from the dense covariance."""

from __future__ import annotations

import contextlib
import warnings

import gpytorch
import torch
from linear_operator import settings as lo_settings

from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning, GroupKernel, Partition
from closed_form_guard import closed_forms_only


def rhs(op, columns: int = 2, seed: int = 1) -> torch.Tensor:
    """A random right-hand side for ``op``: ``(*batch, n, columns)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*op.batch_shape, op.shape[-1], columns, generator=gen, dtype=op.dtype)


def dense_mll(model, x, y, params):
    """The model's exact marginal log-likelihood per value from its dense training covariance, and its gradients
    with respect to ``params``."""
    out = model.likelihood(model(x))
    dense = torch.distributions.MultivariateNormal(out.mean.reshape(-1), out.lazy_covariance_matrix.to_dense())
    value = dense.log_prob(y.reshape(-1)) / y.numel()
    return value, torch.autograd.grad(value, params)


def dense_prediction(model, x, y, xt):
    """The posterior mean and variance at ``xt`` (flattened over the tasks) from the dense joint covariance."""
    with torch.no_grad():
        mean, covariance = dense_posterior(model, x, y, xt)
    return mean, covariance.diagonal()


def dense_posterior(model, x, y, xt):
    """The posterior mean and covariance at ``xt`` (flattened over the tasks, task index the fastest) from the dense
    joint covariance, with the graph of the model's parameters and of ``xt`` where gradients are enabled; the model is
    left in training mode."""
    model.train()
    joint = model.covar_module(torch.cat([x, xt])).to_dense()
    nt = y.numel()
    n = x.shape[0]
    train = joint[:nt, :nt] + model.likelihood._shaped_noise_covar((n, n)).to_dense()
    cross = joint[nt:, :nt]
    residual = y.reshape(-1) - model.mean_module(x).reshape(-1)
    mean = model.mean_module(xt).reshape(-1) + cross @ torch.linalg.solve(train, residual)
    covariance = joint[nt:, nt:] - cross @ torch.linalg.solve(train, cross.T)
    return mean, covariance


#: source of a ``MultitaskKernel(BlockMeanKernel)`` model over one input in [0, 1] (40 blocks, 2 tasks), for the
#: memory tests' child processes (tests/peak_memory.py)
MULTITASK_MODEL_SOURCE = """
import torch, gpytorch
torch.set_num_threads(1)
from bma_gp import BlockMeanKernel, Partition

class MT(gpytorch.models.ExactGP):
    def __init__(self, x, y, lik):
        super().__init__(x, y, lik)
        self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=2)
        part = Partition.from_labels((x[:, 0] * 40).long().clamp(max=39))
        base = BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, part)
        self.covar_module = gpytorch.kernels.MultitaskKernel(base, num_tasks=2, rank=1)

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))
"""


def assert_training_matches_dense(model, x, y, operator_class, max_cholesky: int | None = None) -> None:
    """The exact marginal log-likelihood and the gradient of every parameter equal the dense twin's to 1e-10, with
    the training covariance an ``operator_class``, in closed form (no dense ``n x n`` factorisation, CG or Lanczos)
    and without a warning (under ``max_cholesky_size(max_cholesky)`` where given)."""
    n = x.shape[0]
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    names, params = zip(*model.named_parameters())
    model.train()
    size = lo_settings.max_cholesky_size(max_cholesky) if max_cholesky is not None else contextlib.nullcontext()
    with size, closed_forms_only(n), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        out = model.likelihood(model(x))
        assert isinstance(out.lazy_covariance_matrix, operator_class)
        value = mll(model(x), y)
        got = torch.autograd.grad(value, params)
    ref, want = dense_mll(model, x, y, params)
    assert torch.allclose(value, ref, rtol=1e-10)
    for name, a, b in zip(names, got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10 * b.abs().max()), name


class MultitaskGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel, tasks):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=tasks)
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))


def multitask_model(kind: str, tasks: int, likelihood, seed: int, n: int = 50, num_groups: int = 8):
    """``(model, x, y)``: a ``MultitaskKernel`` around a ``BlockMeanKernel`` (``kind="block_mean"``, an RBF over
    column 0 and the groups of column 1) or a ``GroupKernel`` (``"group"``, of ``num_groups`` groups: ids past 7 are
    groups the training data lack), with ``likelihood``; 8 groups in the data, one of them a singleton; float64, the
    parameters moved away from their defaults."""
    gen = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, 7, (n,), generator=gen)
    groups[:7] = torch.tensor([6, 0, 5, 1, 4, 2, 3])
    groups[-1] = 7  # a singleton group
    x = torch.cat([torch.rand(n, 1, generator=gen, dtype=torch.float64), groups.unsqueeze(-1).double()], -1)
    y = torch.randn(n, tasks, generator=gen, dtype=torch.float64)
    if kind == "block_mean":
        base = BlockMeanKernel(gpytorch.kernels.RBFKernel(active_dims=[0]), x, Partition.from_labels(groups))
        kernel = gpytorch.kernels.MultitaskKernel(base, num_tasks=tasks, rank=1)
    else:
        kernel = gpytorch.kernels.MultitaskKernel(GroupKernel(num_groups), num_tasks=tasks, rank=1, active_dims=[1])
    model = MultitaskGP(x, y, likelihood, kernel, tasks).double()
    with torch.no_grad():
        for p in model.parameters():  # away from the defaults
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, x, y


def assert_prediction_matches_dense(model, x, y, max_cholesky: int | None = None) -> None:
    """The predictive means and variances at 9 points near the first training inputs equal the dense ones (1e-10 and
    1e-9 relative), in closed form and without a warning (under ``max_cholesky_size(max_cholesky)`` where given)."""
    xt = x[:9] + torch.tensor([0.05, 0.0], dtype=x.dtype)
    model.eval()
    size = lo_settings.max_cholesky_size(max_cholesky) if max_cholesky is not None else contextlib.nullcontext()
    with torch.no_grad(), size, closed_forms_only(x.shape[0]), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        pred = model(xt)
        mean, variance = pred.mean.reshape(-1), pred.variance.reshape(-1)
    want_mean, want_variance = dense_prediction(model, x, y, xt)
    assert torch.allclose(mean, want_mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(variance, want_variance, rtol=1e-9, atol=1e-12)


def block_values(gen, batch, dtype, diagonal: bool, k: int):
    """``(lam, B)`` of a positive definite block mean factor over ``k`` blocks (``B`` its diagonal where
    ``diagonal``)."""
    lam = torch.rand(*batch, k, generator=gen, dtype=dtype) + 0.3
    if diagonal:
        return lam, torch.rand(*batch, k, generator=gen, dtype=dtype) + 0.1
    W = torch.randn(*batch, k, k, generator=gen, dtype=dtype)
    return lam, W @ W.mT / k
