"""Dense references shared by the Kronecker tests (tests/test_kronecker_block_mean.py,
tests/test_kronecker_task_noise.py): a multitask model's marginal log-likelihood, its gradients and its prediction,
formed from the dense covariance."""

from __future__ import annotations

import torch


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
        model.train()
        joint = model.covar_module(torch.cat([x, xt])).to_dense()
        nt = y.numel()
        n = x.shape[0]
        train = joint[:nt, :nt] + model.likelihood._shaped_noise_covar((n, n)).to_dense()
        cross = joint[nt:, :nt]
        residual = y.reshape(-1) - model.mean_module(x).reshape(-1)
        mean = model.mean_module(xt).reshape(-1) + cross @ torch.linalg.solve(train, residual)
        variance = (joint[nt:, nt:] - cross @ torch.linalg.solve(train, cross.T)).diagonal()
    return mean, variance
