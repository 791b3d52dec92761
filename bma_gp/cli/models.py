"""The models of a ``bma-gp`` run: the base kernel, the three GPs (exact, block mean, SGPR), their
training and their predictions.

The three methods share the base kernel, mean, likelihood, optimiser and schedule:

* ``exact``: :class:`gpytorch.models.ExactGP` with the base kernel;
* ``blockmean``: the same model with :class:`bma_gp.kernels.BlockMeanKernel` over a partition of the
  training inputs into ``blocks`` blocks (sorted runs for one input column, k-means otherwise);
* ``sgpr``: :class:`gpytorch.kernels.InducingPointKernel` (Titsias' SGPR) with ``blocks`` inducing
  points initialised at random training inputs.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import gpytorch
import torch
from torch import Tensor

from bma_gp.cli.config import RunConfig
from bma_gp.cli.data import Problem
from bma_gp.partition import Partition

__all__ = ["PREDICT_CHOLESKY", "Fit", "GP", "base_kernel", "build_model", "build_partition", "fit", "predict", "train"]

#: Exact predictions factorise the training covariance with Cholesky up to this many points.
PREDICT_CHOLESKY = 10_000


def base_kernel(kind: str, num_dims: int, period: float) -> gpytorch.kernels.Kernel:
    """The base kernel, initialised for standardised inputs; ``period`` is in standardised units."""
    from gpytorch.kernels import MaternKernel, PeriodicKernel, RBFKernel, ScaleKernel

    if kind == "seasonal":
        trend = ScaleKernel(RBFKernel())
        trend.base_kernel.lengthscale = 1.0
        trend.outputscale = 1.0
        periodic = PeriodicKernel()
        periodic.period_length = period
        periodic.lengthscale = 1.0
        decay = RBFKernel()
        decay.lengthscale = 10.0 * period
        seasonal = ScaleKernel(periodic * decay)
        seasonal.outputscale = 0.03
        short = ScaleKernel(MaternKernel(nu=1.5))
        short.base_kernel.lengthscale = 0.5 * period
        short.outputscale = 0.003
        return trend + seasonal + short
    base = RBFKernel(ard_num_dims=num_dims) if kind == "rbf" else MaternKernel(nu=2.5, ard_num_dims=num_dims)
    base.lengthscale = 1.0
    kernel = ScaleKernel(base)
    kernel.outputscale = 1.0
    return kernel


class GP(gpytorch.models.ExactGP):
    """Constant mean, the given covariance module, Gaussian likelihood."""

    def __init__(
        self,
        train_x: Tensor,
        train_y: Tensor,
        likelihood: gpytorch.likelihoods.GaussianLikelihood,
        covar_module: gpytorch.kernels.Kernel,
    ):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar_module

    def forward(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def build_partition(kind: str, x: Tensor, num_blocks: int, seed: int) -> Partition:
    """Sorted runs along the first input or k-means clusters (``auto``: sorted for one input column)."""
    from bma_gp.partition_builders import kmeans_partition, sorted_partition

    if kind == "auto":
        kind = "sorted" if x.shape[-1] == 1 else "kmeans"
    if kind == "sorted":
        return sorted_partition(x, num_blocks)
    return kmeans_partition(x, num_blocks, seed=seed)


def build_model(
    method: str, problem: Problem, kernel_kind: str, period: float, config: RunConfig, generator: torch.Generator
) -> GP:
    """The GP of ``method`` on the training rows of ``problem`` (``period`` in standardised units)."""
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 1e-2
    base = base_kernel(kernel_kind, problem.x_train.shape[-1], period)
    covar: gpytorch.kernels.Kernel
    if method == "exact":
        covar = base
    elif method == "blockmean":
        from bma_gp.kernels import BlockMeanKernel

        partition = build_partition(config.partition, problem.x_train, config.blocks, config.seed)
        covar = BlockMeanKernel(base, problem.x_train, partition)
    else:
        pick = torch.randperm(len(problem.y_train), generator=generator)[: config.blocks]
        covar = gpytorch.kernels.InducingPointKernel(base, problem.x_train[pick].clone(), likelihood)
    return GP(problem.x_train, problem.y_train, likelihood, covar)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Fit:
    """What one method achieved: timings and held-out accuracy (in the target's units), and the
    predictions the plot needs (in the target's units, on the CPU)."""

    method: str
    k: int | None
    train_seconds: float
    predict_seconds: float
    rmse: float
    nlpd: float
    final_loss: float
    test_mean: Tensor = field(repr=False)
    test_std: Tensor = field(repr=False)
    grid_mean: Tensor | None = field(default=None, repr=False)
    grid_std: Tensor | None = field(default=None, repr=False)


def train(model: GP, iters: int, lr: float, progress: bool, label: str) -> float:
    """``iters`` Adam steps on the exact marginal log likelihood; returns the last loss."""
    from tqdm.auto import tqdm

    model.train()
    model.likelihood.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    loss = torch.tensor(math.nan)
    bar = tqdm(range(iters), desc=f"{label:>9s}", disable=not progress, leave=True, file=sys.stderr, dynamic_ncols=True)
    for _ in bar:
        optimizer.zero_grad(set_to_none=True)
        loss = -mll(model(*model.train_inputs), model.train_targets)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.detach().item():.3f}", refresh=False)
    bar.close()
    return float(loss.detach())


def predict(model: GP, x: Tensor) -> tuple[Tensor, Tensor]:
    """Predictive mean and variance of noisy observations at ``x``, in chunks of 1,000 points."""
    model.eval()
    model.likelihood.eval()
    means, variances = [], []
    with torch.no_grad():
        for rows in x.split(1000):
            predictive = model.likelihood(model(rows))
            means.append(predictive.mean)
            variances.append(predictive.variance.clamp_min(1e-12))
    return torch.cat(means), torch.cat(variances)


def fit(
    method: str,
    problem: Problem,
    kernel_kind: str,
    period: float,
    config: RunConfig,
    generator: torch.Generator,
    grid: Tensor | None,
) -> Fit:
    """Build, train and evaluate one method; predictions on ``grid`` too when it is given (for the plot)."""
    device = config.device
    model = build_model(method, problem, kernel_kind, period, config, generator).to(device=device, dtype=config.dtype)
    with gpytorch.settings.max_cholesky_size(config.max_cholesky):
        _synchronize(device)
        start = time.perf_counter()
        loss = train(model, config.iters, config.lr, config.progress, method)
        _synchronize(device)
        train_seconds = time.perf_counter() - start
    # CG's default evaluation tolerance gives predictive variances that are far off (an NLPD of
    # 10^5 on the CO2 demo); one Cholesky factorisation without a backward pass is cheap.
    with gpytorch.settings.max_cholesky_size(max(config.max_cholesky, PREDICT_CHOLESKY)):
        start = time.perf_counter()
        mean, var = predict(model, problem.x_test)
        _synchronize(device)
        predict_seconds = time.perf_counter() - start
        grid_mean = grid_var = None
        if grid is not None:
            grid_mean, grid_var = predict(model, grid)
    y = problem.y_test
    scale = problem.y_scale
    rmse = float(((mean - y) ** 2).mean().sqrt()) * scale
    nlpd = float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (y - mean) ** 2 / var).mean()) + math.log(scale)
    k: int | None = None
    if method == "blockmean":
        k = model.covar_module.partition.num_blocks
    elif method == "sgpr":
        k = model.covar_module.inducing_points.shape[0]
    return Fit(
        method=method,
        k=k,
        train_seconds=train_seconds,
        predict_seconds=predict_seconds,
        rmse=rmse,
        nlpd=nlpd,
        final_loss=loss,
        grid_mean=None if grid_mean is None else problem.y_original(grid_mean).cpu(),
        grid_std=None if grid_var is None else (grid_var.sqrt() * scale).cpu(),
        test_mean=problem.y_original(mean).cpu(),
        test_std=(var.sqrt() * scale).cpu(),
    )
