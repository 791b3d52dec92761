"""The models of a ``bma-gp`` run: the base kernel, the three GPs (exact, block mean, SGPR), their
training and their predictions.

The three methods share the base kernel, mean, likelihood, optimiser and schedule:

* ``exact``: :class:`gpytorch.models.ExactGP` with the base kernel;
* ``blockmean``: the same model with :class:`bma_gp.kernels.BlockMeanKernel` over a partition of the
  training inputs into ``blocks`` blocks (sorted runs for one input column, k-means otherwise);
* ``sgpr``: :class:`gpytorch.kernels.InducingPointKernel` (Titsias' SGPR) with ``blocks`` inducing
  points initialised at random training inputs.

With groupings (``--group``) each model's covariance is that kernel, on the feature columns only,
plus one :class:`bma_gp.GroupKernel` (lme4's ``(1 | g)``: one shared variance) per grouping on its
id column. For ``blockmean`` and ``sgpr`` the sum keeps its closed forms (a
:class:`~bma_gp.BlockMeanSumLinearOperator`); ``exact`` adds a dense kernel matrix to it and takes
GPyTorch's generic path, as it does without groups.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import gpytorch
import torch
from torch import Tensor

from bma_gp import ClosedFormFallbackWarning
from bma_gp.cli.config import PROG, RunConfig, UsageError
from bma_gp.cli.data import Problem
from bma_gp.kernels import GroupKernel
from bma_gp.partition import Partition

__all__ = ["PREDICT_CHOLESKY", "Fit", "GP", "base_kernel", "build_model", "build_partition", "fit", "predict", "train"]

#: Exact predictions factorise the training covariance with Cholesky up to this many points.
PREDICT_CHOLESKY = 10_000


def base_kernel(
    kind: str, num_dims: int, period: float, active_dims: Sequence[int] | None = None
) -> gpytorch.kernels.Kernel:
    """The base kernel, initialised for standardised inputs; ``period`` is in standardised units.

    ``active_dims``: the input columns it reads (default: all; with groupings, the feature columns).
    """
    from gpytorch.kernels import MaternKernel, PeriodicKernel, RBFKernel, ScaleKernel

    dims = None if active_dims is None else tuple(active_dims)

    if kind == "seasonal":
        trend = ScaleKernel(RBFKernel(), active_dims=dims)
        trend.base_kernel.lengthscale = 1.0
        trend.outputscale = 1.0
        periodic = PeriodicKernel()
        periodic.period_length = period
        periodic.lengthscale = 1.0
        decay = RBFKernel()
        decay.lengthscale = 10.0 * period
        seasonal = ScaleKernel(periodic * decay, active_dims=dims)
        seasonal.outputscale = 0.03
        short = ScaleKernel(MaternKernel(nu=1.5), active_dims=dims)
        short.base_kernel.lengthscale = 0.5 * period
        short.outputscale = 0.003
        return trend + seasonal + short
    base = RBFKernel(ard_num_dims=num_dims) if kind == "rbf" else MaternKernel(nu=2.5, ard_num_dims=num_dims)
    base.lengthscale = 1.0
    kernel = ScaleKernel(base, active_dims=dims)
    kernel.outputscale = 1.0
    return kernel


class GP(gpytorch.models.ExactGP):
    """Constant mean, the given covariance module plus one kernel per grouping, Gaussian likelihood.

    Without ``group_kernels`` the covariance is ``covar_module``; with them it is
    ``AdditiveKernel(covar_module, *group_kernels)``, built directly so that ``covar_module`` stays the
    first summand (``+`` would flatten an additive ``covar_module`` into its parts).
    """

    def __init__(
        self,
        train_x: Tensor,
        train_y: Tensor,
        likelihood: gpytorch.likelihoods.GaussianLikelihood,
        covar_module: gpytorch.kernels.Kernel,
        group_kernels: Sequence[GroupKernel] = (),
    ):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.num_groupings = len(group_kernels)
        if group_kernels:
            covar_module = gpytorch.kernels.AdditiveKernel(covar_module, *group_kernels)
        self.covar_module = covar_module

    @property
    def smooth_kernel(self) -> gpytorch.kernels.Kernel:
        """The kernel on the feature columns (the whole covariance without groupings)."""
        return self.covar_module.kernels[0] if self.num_groupings else self.covar_module

    @property
    def group_kernels(self) -> list[GroupKernel]:
        """One :class:`~bma_gp.GroupKernel` per grouping, in ``--group`` order."""
        return list(self.covar_module.kernels[1:]) if self.num_groupings else []

    def forward(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def build_partition(kind: str, x: Tensor, num_blocks: int, seed: int) -> Partition:
    """Sorted runs along the first input or k-means clusters (``auto``: sorted for one input column)."""
    from bma_gp.partition_builders import kmeans_partition, sorted_partition

    if kind == "auto":
        kind = "sorted" if x.shape[-1] == 1 else "kmeans"
    if kind == "sorted":
        return sorted_partition(x, num_blocks)
    with warnings.catch_warnings():  # its warning speaks of k and shows this line: said below in the command's words
        warnings.filterwarnings("ignore", "kmeans_partition: x has fewer than", UserWarning)
        partition = kmeans_partition(x, num_blocks, seed=seed)
    distinct = int(torch.unique(x, dim=0).shape[0]) if num_blocks > 1 else 1
    if partition.num_blocks < num_blocks or distinct < num_blocks:
        # k-means may spread the copies of one point over several otherwise empty clusters: its number of blocks is
        # not the number of distinct points, which is what --blocks should not exceed
        spread = ", some of them copies of one point split apart" if partition.num_blocks > distinct else ""
        print(
            f"{PROG}: warning: --blocks {num_blocks}: the training inputs have only {distinct} distinct points, so "
            f"k-means gives the blockmean GP {partition.num_blocks} blocks{spread}; choose --blocks <= {distinct} "
            "(or --partition sorted) to silence this warning",
            file=sys.stderr,
        )
    return partition


def build_model(
    method: str, problem: Problem, kernel_kind: str, period: float, config: RunConfig, generator: torch.Generator
) -> GP:
    """The GP of ``method`` on the training rows of ``problem`` (``period`` in standardised units).

    With groupings the smooth kernel reads the feature columns only, and grouping ``j`` gets
    ``GroupKernel(G_j + 1)`` on its id column: ids ``0 .. G_j - 1`` are the training levels, id ``G_j``
    the held-out rows' new levels (covariance 0 with every training group).
    """
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 1e-2
    d = problem.num_features
    features = tuple(range(d)) if problem.group_names else None
    covar: gpytorch.kernels.Kernel
    if method == "exact":
        covar = base_kernel(kernel_kind, d, period, active_dims=features)
    elif method == "blockmean":
        from bma_gp.kernels import BlockMeanKernel

        partition = build_partition(config.partition, problem.x_train[:, :d], config.blocks, config.seed)
        covar = BlockMeanKernel(base_kernel(kernel_kind, d, period, active_dims=features), problem.x_train, partition)
    else:
        pick = torch.randperm(len(problem.y_train), generator=generator)[: config.blocks]
        inducing = problem.x_train[pick, :d].clone()
        covar = gpytorch.kernels.InducingPointKernel(
            base_kernel(kernel_kind, d, period), inducing, likelihood, active_dims=features
        )
    groups = []
    for j, num_levels in enumerate(problem.num_levels):
        group = GroupKernel(num_levels + 1, active_dims=[d + j])
        group.var = 0.1
        groups.append(group)
    return GP(problem.x_train, problem.y_train, likelihood, covar, groups)


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
    group_variances: dict[str, float] = field(default_factory=dict)  # in the target's units, squared


class TrainingDiverged(UsageError):
    """Training failed at hyperparameters Adam moved to (the message blames ``--lr``); ``reason`` says how it failed,
    so that a caller that knows a likelier cause (a ``--period`` the data cannot resolve) can name it instead."""

    def __init__(self, label: str, step: int, iters: int, lr: float, err: Exception | None):
        self.reason = "its hyperparameters are no longer finite" if err is None else f"{type(err).__name__}: {err}"
        self.where = f"training the {label} GP diverged at Adam step {step + 1} of {iters}"
        super().__init__(
            f"{self.where} ({self.reason}); the steps moved the hyperparameters where the covariance cannot be "
            f"computed: lower the learning rate --lr (now {lr:g})"
        )


def train(model: GP, iters: int, lr: float, progress: bool, label: str) -> float:
    """``iters`` Adam steps on the exact marginal log likelihood; returns the last loss."""
    from linear_operator.utils.errors import NanError, NotPSDError
    from tqdm.auto import tqdm

    model.train()
    model.likelihood.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    loss = torch.tensor(math.nan)
    bar = tqdm(range(iters), desc=f"{label:>9s}", disable=not progress, leave=True, file=sys.stderr, dynamic_ncols=True)
    step = 0
    try:
        for step in bar:  # noqa: B007 - the except clause reports the step that failed
            optimizer.zero_grad(set_to_none=True)
            loss = -mll(model(*model.train_inputs), model.train_targets)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.detach().item():.3f}", refresh=False)
    except (ValueError, RuntimeError) as err:
        # The first step runs on the start values: an error there is not the optimiser's doing. Later, Adam's
        # steps (too large for --lr) can take a lengthscale to 0 or a parameter to NaN, and the covariance
        # fails (NanError, NotPSDError, a non-finite block mean operator): say so, not a traceback.
        numerical = isinstance(err, (ValueError, NanError, NotPSDError, torch.linalg.LinAlgError))
        if not _finite_parameters(model) or (step > 0 and numerical):
            raise TrainingDiverged(label, step, iters, lr, err) from err
        raise
    finally:
        bar.close()
    if iters and not _finite_parameters(model):  # the last step diverged: prediction would fail
        raise TrainingDiverged(label, iters - 1, iters, lr, None)
    return float(loss.detach())


def _finite_parameters(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _warn_if_below_noise(model: GP, method: str, var: Tensor, dtype: torch.dtype) -> None:
    """Say on standard error when the predictive variance of noisy observations ``var`` falls below half the
    likelihood's noise at some held-out points: exact arithmetic rules that out (the latent variance is >= 0), so
    rounding made the latent variance negative (GPyTorch's SGPR in float32 does on smooth data) and the NLPD, which
    divides by ``var``, and the plot's band are not meaningful there."""
    noise = float(model.likelihood.noise.detach().min())
    below = int((var < 0.5 * noise).sum())
    if below:
        print(
            f"{PROG}: warning: the {method} GP's predictive variance is below its noise variance at {below} of "
            f"{len(var)} held-out points, which exact arithmetic rules out: rounding in {dtype} made its latent "
            "variance negative, so its NLPD and its +-2 sd band are not meaningful; use --dtype float64",
            file=sys.stderr,
        )


#: rows per prediction call: the exact and block mean GPs form covariances among the new rows (``t x t``), while
#: GPyTorch's InducingPointKernel repeats its O(n m) training-side work on every call and forms nothing ``t x t``
#: for the variances (a user trial: 40,000 rows in chunks of 1,000 took 24 s at n = 160,000, 0.25 s a call, at
#: 156 MB whether a call had 1,000 or 8,000 rows)
PREDICT_CHUNK = {"exact": 1000, "blockmean": 1000, "sgpr": 8192}


def predict(model: GP, x: Tensor, chunk: int = 1000) -> tuple[Tensor, Tensor]:
    """Predictive mean and variance of noisy observations at ``x``, in chunks of ``chunk`` points."""
    model.eval()
    model.likelihood.eval()
    means, variances = [], []
    with torch.no_grad():
        for rows in x.split(chunk):
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
    with warnings.catch_warnings(), _numerical_warnings(method, config.dtype_name):
        if method == "exact":  # the exact GP is the dense path by design: the fallback warning says nothing new
            warnings.simplefilter("ignore", ClosedFormFallbackWarning)
        return _fit(model, method, problem, config, grid)


_JITTER = re.compile(r"added jitter of (\S+) to the diagonal")


@contextlib.contextmanager
def _numerical_warnings(method: str, dtype_name: str) -> Iterator[None]:
    """Say the NumericalWarnings of linear_operator and GPyTorch raised while ``method`` trains and predicts as
    ``bma-gp: warning:`` lines, once the method has its results: one for the jitter their Cholesky adds to a kernel
    matrix that is not positive definite in floating point (a raw Python warning with a file path and a source line
    before, once per size of jitter), one for the others. The filters still decide: an ignored NumericalWarning is
    not said, one made an error raises. Other warnings are shown as before."""
    from linear_operator.utils.warnings import NumericalWarning

    jitters: list[float] = []
    others: list[str] = []
    with warnings.catch_warnings():  # restores showwarning; entering it also resets the once-per-place registries
        show = warnings.showwarning

        def intercept(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if not issubclass(category, NumericalWarning):
                show(message, category, filename, lineno, file, line)
                return
            text = str(message)
            match = _JITTER.search(text)
            if match is not None:
                try:
                    jitters.append(float(match.group(1)))
                    return
                except ValueError:  # pragma: no cover - another spelling of the jitter: said as it is
                    pass
            if text not in others:
                others.append(text)

        warnings.showwarning = intercept
        yield
    if jitters:
        print(
            f"{PROG}: warning: the {method} GP's kernel matrix was not positive definite in {dtype_name} arithmetic "
            f"(nearly singular), so GPyTorch added jitter of up to {max(jitters):.0e} to its diagonal to factorise "
            f"it; the {method} results are reported with that jitter",
            file=sys.stderr,
        )
    if others:  # CG's warning, for one, gives its residual in the text: many texts, one line
        more = f" (and {len(others) - 1} more numerical warning(s))" if len(others) > 1 else ""
        print(f"{PROG}: warning: the {method} GP: GPyTorch: {others[0]}{more}", file=sys.stderr)


@functools.cache
def _imports_for_training() -> None:
    """Import what the first ``torch.optim.Adam`` imports (``torch._dynamo``, 0.6-1.2 s), once, outside the timers: the
    first method of a run was charged for it (a user trial: exact GP 1.70 s against 0.01 s at n = 120)."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def _fit(model: GP, method: str, problem: Problem, config: RunConfig, grid: Tensor | None) -> Fit:
    device = config.device
    _imports_for_training()
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
        mean, var = predict(model, problem.x_test, PREDICT_CHUNK.get(method, 1000))
        _synchronize(device)
        predict_seconds = time.perf_counter() - start
        grid_mean = grid_var = None
        if grid is not None:
            grid_mean, grid_var = predict(model, grid, PREDICT_CHUNK.get(method, 1000))
    _warn_if_below_noise(model, method, var, config.dtype)
    y = problem.y_test
    scale = problem.y_scale
    rmse = float(((mean - y) ** 2).mean().sqrt()) * scale
    nlpd = float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (y - mean) ** 2 / var).mean()) + math.log(scale)
    k: int | None = None
    if method == "blockmean":
        k = model.smooth_kernel.partition.num_blocks
    elif method == "sgpr":
        k = model.smooth_kernel.inducing_points.shape[0]
    variances = {
        name: float(kernel.var.detach().squeeze()) * scale**2
        for name, kernel in zip(problem.group_names, model.group_kernels)
    }
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
        group_variances=variances,
    )
