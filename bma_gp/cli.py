"""The ``bma-gp`` command: exact vs block mean vs inducing-point GPs on one data set.

Run without arguments it fits three Gaussian processes to the Mauna Loa CO2 series
shipped with the package (no network), prints a table of training time, prediction
time, RMSE and negative log predictive density (NLPD) on held-out points, and writes
a plot of the fits with their :math:`\\pm 2` standard deviation bands::

    bma-gp                                   # the bundled CO2 demo
    bma-gp --data my.csv --target y          # your own CSV (all other columns are inputs)
    bma-gp --method exact,blockmean --blocks 128 --iters 100 --out results/

The three methods share the base kernel, mean, likelihood, optimiser and schedule:

* ``exact`` -- :class:`gpytorch.models.ExactGP` with the base kernel (Cholesky up to
  ``--max-cholesky`` training points, GPyTorch's CG/Lanczos beyond; on the CO2 demo
  Cholesky is both faster per step and far more accurate than CG);
* ``blockmean`` -- the same model with :class:`bma_gp.kernels.BlockMeanKernel` over a
  partition of the training inputs into ``--blocks`` blocks (sorted runs for one input
  column, k-means otherwise): closed-form :math:`O(n + k^3)` algebra after the kernel sums;
* ``sgpr`` -- :class:`gpytorch.kernels.InducingPointKernel` (Titsias' SGPR) with
  ``--blocks`` inducing points initialised at random training inputs.

Inputs and targets are standardised with the training statistics; RMSE and NLPD are
reported in the units of the target.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import gpytorch
import torch
from torch import Tensor

from bma_gp.datasets import DatasetError, MissingValuesWarning, load_co2, load_csv

__all__ = ["main", "build_parser"]

METHODS = ("exact", "blockmean", "sgpr")
_PROG = "bma-gp"
#: Exact predictions factorise the training covariance with Cholesky up to this many points.
_PREDICT_CHOLESKY = 10_000


# ---------------------------------------------------------------------------- arguments
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0.0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bma-gp`` (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Fit exact, block mean and inducing-point Gaussian processes to a data set and compare "
        "them on held-out points. Without --data it uses the Mauna Loa CO2 series bundled with the package.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="CSV", help="a CSV file with a header line (default: the bundled CO2 series)")
    data.add_argument("--target", metavar="COL", help="the column to predict (required with --data)")
    data.add_argument("--features", metavar="COL", nargs="+",
                      help="input columns (default: every column except the target); ISO dates become decimal years")
    data.add_argument("--max-rows", type=_positive_int, metavar="N",
                      help="use a random subset of at most N rows (default: all rows)")
    data.add_argument("--test-fraction", type=_fraction, default=0.2, help="share of rows held out for testing")
    data.add_argument("--split", choices=("random", "last"), default="random",
                      help="hold out a random subset, or the rows with the largest first input (extrapolation)")
    model = parser.add_argument_group("models")
    model.add_argument("--method", action="append", metavar="NAME",
                       help=f"methods to run: all or any of {', '.join(METHODS)}; repeat the option or give a "
                       "comma list (default: all)")
    model.add_argument("--blocks", type=_positive_int, default=256,
                       help="number of blocks (blockmean) and of inducing points (sgpr)")
    model.add_argument("--partition", choices=("auto", "sorted", "kmeans"), default="auto",
                       help="how blockmean groups the training inputs: sorted runs along the first input, "
                       "k-means clusters, or auto (sorted for one input column, k-means otherwise)")
    model.add_argument("--kernel", choices=("auto", "seasonal", "rbf", "matern"), default="auto",
                       help="base kernel: seasonal = long-term RBF + periodic x RBF + short-term Matern "
                       "(one input column), rbf / matern = ARD kernels; auto: seasonal for the CO2 demo, rbf otherwise")
    model.add_argument("--period", type=_positive_float, default=1.0,
                       help="initial period of the seasonal kernel, in units of the input (years for CO2)")
    train = parser.add_argument_group("training")
    train.add_argument("--iters", type=_non_negative_int, default=40, help="Adam steps on the marginal likelihood")
    train.add_argument("--lr", type=_positive_float, default=0.1, help="Adam learning rate")
    train.add_argument("--max-cholesky", type=_non_negative_int, default=5000,
                       help="largest training set the exact GP factorises with Cholesky while training (beyond: "
                       "GPyTorch's CG/Lanczos); predictions use Cholesky up to max(this, 10000) for accurate variances")
    train.add_argument("--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda, cuda:1")
    train.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="floating point precision")
    train.add_argument("--seed", type=int, default=0, help="random seed (split, inducing points, k-means)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", default="bma_gp_out",
                        help="directory for fits.png and results.json (created if missing)")
    output.add_argument("--no-plot", action="store_true", help="skip the plot (matplotlib is then not needed)")
    output.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _parse_methods(values: Sequence[str] | None, parser: argparse.ArgumentParser) -> list[str]:
    if not values:
        return list(METHODS)
    chosen: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name == "all":
                names = list(METHODS)
            elif name in METHODS:
                names = [name]
            else:
                parser.error(f"argument --method: unknown method {name!r}; choose all or any of {', '.join(METHODS)}")
            chosen += [n for n in names if n not in chosen]
    if not chosen:
        parser.error(f"argument --method: no method given; choose all or any of {', '.join(METHODS)}")
    return [name for name in METHODS if name in chosen]


def _resolve_device(text: str, parser: argparse.ArgumentParser) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"argument --device: {text!r} is not a torch device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("argument --device: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {text!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    elif device.type != "cpu":
        parser.error(f"argument --device: {text!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


# ---------------------------------------------------------------------------- data
@dataclass
class _Problem:
    """A standardised train/test split and what is needed to undo the scaling."""

    name: str
    feature_names: list[str]
    target_name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_mean: Tensor
    x_scale: Tensor
    y_mean: float
    y_scale: float

    def x_original(self, x: Tensor) -> Tensor:
        return x * self.x_scale + self.x_mean

    def y_original(self, y: Tensor) -> Tensor:
        return y * self.y_scale + self.y_mean


def _load_data(args, parser: argparse.ArgumentParser, dtype: torch.dtype) -> tuple[str, list[str], str, Tensor, Tensor]:
    if args.data is None:
        if args.target is not None or args.features is not None:
            parser.error("--target and --features need --data (the bundled CO2 series has fixed columns)")
        x, y = load_co2(dtype=dtype)
        return "bundled Mauna Loa CO2 (weekly, 1958-2001)", ["date"], "co2", x, y
    if args.target is None:
        parser.error("--data needs --target COL, the column to predict")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingValuesWarning)
        try:
            x, y, features = load_csv(args.data, args.target, args.features, dtype=dtype, return_features=True)
        except (FileNotFoundError, DatasetError) as err:
            parser.error(str(err))
    for warning in caught:
        if issubclass(warning.category, MissingValuesWarning):
            print(f"{_PROG}: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return os.path.basename(args.data), features, args.target, x, y


def _split(name, features, target, x, y, fraction, mode, generator, parser) -> _Problem:
    n = len(y)
    n_test = int(round(fraction * n))
    if n - n_test < 2 or n_test < 1:
        parser.error(f"the data have {n} usable rows: too few to hold out {fraction:.0%} for testing "
                     "and train on at least 2 (change --test-fraction or add rows)")
    if mode == "random":
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.argsort(x[:, 0], stable=True)
        order = torch.cat([order[: n - n_test][torch.randperm(n - n_test, generator=generator)], order[n - n_test:]])
    train, test = order[: n - n_test], order[n - n_test:]
    x_mean, x_scale = x[train].mean(0), x[train].std(0)
    constant = [features[i] for i in range(x.shape[-1]) if not x_scale[i] > 0]
    if constant:
        parser.error(f"input column(s) {', '.join(map(repr, constant))} are constant on the training rows; "
                     "leave them out with --features")
    y_mean, y_scale = float(y[train].mean()), float(y[train].std())
    if not y_scale > 0:
        parser.error(f"the target column {target!r} is constant on the training rows: nothing to model")
    return _Problem(
        name=name, feature_names=features, target_name=target,
        x_train=(x[train] - x_mean) / x_scale, y_train=(y[train] - y_mean) / y_scale,
        x_test=(x[test] - x_mean) / x_scale, y_test=(y[test] - y_mean) / y_scale,
        x_mean=x_mean, x_scale=x_scale, y_mean=y_mean, y_scale=y_scale,
    )


# ---------------------------------------------------------------------------- models
def _base_kernel(kind: str, num_dims: int, period: float) -> gpytorch.kernels.Kernel:
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


class _GP(gpytorch.models.ExactGP):
    """Constant mean, the given covariance module, Gaussian likelihood."""

    def __init__(self, train_x: Tensor, train_y: Tensor, likelihood, covar_module: gpytorch.kernels.Kernel):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar_module

    def forward(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _build_partition(kind: str, x: Tensor, num_blocks: int, seed: int):
    from bma_gp.partition_builders import kmeans_partition, sorted_partition

    if kind == "auto":
        kind = "sorted" if x.shape[-1] == 1 else "kmeans"
    if kind == "sorted":
        return sorted_partition(x, num_blocks)
    return kmeans_partition(x, num_blocks, seed=seed)


def _build_model(method: str, problem: _Problem, kernel_kind: str, period: float, args, generator) -> _GP:
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 1e-2
    base = _base_kernel(kernel_kind, problem.x_train.shape[-1], period)
    if method == "exact":
        covar = base
    elif method == "blockmean":
        from bma_gp.kernels import BlockMeanKernel

        partition = _build_partition(args.partition, problem.x_train, args.blocks, args.seed)
        covar = BlockMeanKernel(base, problem.x_train, partition)
    else:
        pick = torch.randperm(len(problem.y_train), generator=generator)[: args.blocks]
        covar = gpytorch.kernels.InducingPointKernel(base, problem.x_train[pick].clone(), likelihood)
    return _GP(problem.x_train, problem.y_train, likelihood, covar)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Fit:
    method: str
    k: int | None
    train_seconds: float
    predict_seconds: float
    rmse: float
    nlpd: float
    final_loss: float
    grid_mean: Tensor | None = field(default=None, repr=False)
    grid_std: Tensor | None = field(default=None, repr=False)
    test_mean: Tensor | None = field(default=None, repr=False)
    test_std: Tensor | None = field(default=None, repr=False)


def _train(model: _GP, iters: int, lr: float, progress: bool, label: str) -> float:
    from tqdm.auto import tqdm

    model.train()
    model.likelihood.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    loss = torch.tensor(math.nan)
    bar = tqdm(range(iters), desc=f"{label:>9s}", disable=not progress, leave=True, file=sys.stderr,
               dynamic_ncols=True)
    for _ in bar:
        optimizer.zero_grad(set_to_none=True)
        loss = -mll(model(*model.train_inputs), model.train_targets)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.detach().item():.3f}", refresh=False)
    bar.close()
    return float(loss.detach())


def _predict(model: _GP, x: Tensor) -> tuple[Tensor, Tensor]:
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


def _fit_one(method: str, problem: _Problem, kernel_kind: str, period: float, args, device, dtype,
             generator, grid: Tensor | None) -> _Fit:
    model = _build_model(method, problem, kernel_kind, period, args, generator).to(device=device, dtype=dtype)
    with gpytorch.settings.max_cholesky_size(args.max_cholesky):
        _synchronize(device)
        start = time.perf_counter()
        loss = _train(model, args.iters, args.lr, not args.no_progress, method)
        _synchronize(device)
        train_seconds = time.perf_counter() - start
    # CG's default evaluation tolerance gives predictive variances that are far off (an NLPD of
    # 10^5 on the CO2 demo); one Cholesky factorisation without a backward pass is cheap.
    with gpytorch.settings.max_cholesky_size(max(args.max_cholesky, _PREDICT_CHOLESKY)):
        start = time.perf_counter()
        mean, var = _predict(model, problem.x_test)
        _synchronize(device)
        predict_seconds = time.perf_counter() - start
        grid_mean = grid_var = None
        if grid is not None:
            grid_mean, grid_var = _predict(model, grid)
    y = problem.y_test
    scale = problem.y_scale
    rmse = float(((mean - y) ** 2).mean().sqrt()) * scale
    nlpd = float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (y - mean) ** 2 / var).mean()) + math.log(scale)
    k = None if method == "exact" else (
        model.covar_module.partition.num_blocks if method == "blockmean" else model.covar_module.inducing_points.shape[0])
    return _Fit(
        method=method, k=k, train_seconds=train_seconds, predict_seconds=predict_seconds, rmse=rmse, nlpd=nlpd,
        final_loss=loss,
        grid_mean=None if grid_mean is None else problem.y_original(grid_mean).cpu(),
        grid_std=None if grid_var is None else (grid_var.sqrt() * scale).cpu(),
        test_mean=problem.y_original(mean).cpu(), test_std=(var.sqrt() * scale).cpu(),
    )


# ---------------------------------------------------------------------------- output
def _format_table(fits: list[_Fit], target: str) -> str:
    header = ("method", "k", "train [s]", "predict [s]", "RMSE", "NLPD")
    rows = [
        (fit.method, "-" if fit.k is None else str(fit.k), f"{fit.train_seconds:.2f}", f"{fit.predict_seconds:.3f}",
         f"{fit.rmse:.4g}", f"{fit.nlpd:.4g}")
        for fit in fits
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)  # noqa: E731
                                 for i, (cell, w) in enumerate(zip(row, widths)))
    rule = "-" * len(line(header))
    notes = (f"k: blocks (blockmean) or inducing points (sgpr).  RMSE and NLPD on held-out rows, "
             f"in units of {target!r}.")
    return "\n".join([line(header), rule, *map(line, rows), rule, notes])


def _plot(problem: _Problem, fits: list[_Fit], grid: Tensor | None, path: str) -> None:
    from matplotlib.figure import Figure

    x_train = problem.x_original(problem.x_train).cpu()
    x_test = problem.x_original(problem.x_test).cpu()
    y_train = problem.y_original(problem.y_train).cpu()
    y_test = problem.y_original(problem.y_test).cpu()
    colours = {"exact": "tab:blue", "blockmean": "tab:orange", "sgpr": "tab:green"}
    titles = {"exact": "exact GP", "blockmean": "block mean GP", "sgpr": "inducing points (SGPR)"}
    xlabel, ylabel = problem.feature_names[0], problem.target_name
    if grid is not None:
        fig = Figure(figsize=(13, 2.9 * len(fits) + 0.6), layout="constrained")
        axes = fig.subplots(len(fits), 2, squeeze=False, width_ratios=(2.2, 1))
        g = problem.x_original(grid).cpu()[:, 0]
        lo, hi = float(g.min()), float(g.max())
        zoom = (hi - 0.08 * (hi - lo), hi) if len(x_test) and float(x_test.min()) > float(x_train.max()) \
            else (lo + 0.46 * (hi - lo), lo + 0.54 * (hi - lo))
        for row, fit in enumerate(fits):
            colour = colours[fit.method]
            for col, ax in enumerate(axes[row]):
                ax.plot(x_train[:, 0], y_train, ".", ms=2, color="0.55", label="train")
                ax.plot(x_test[:, 0], y_test, ".", ms=3, color="crimson", label="held out")
                ax.plot(g, fit.grid_mean, "-", lw=1, color=colour, label="mean")
                ax.fill_between(g, fit.grid_mean - 2 * fit.grid_std, fit.grid_mean + 2 * fit.grid_std,
                                color=colour, alpha=0.25, lw=0, label=r"$\pm 2$ sd")
                if col == 1:
                    ax.set_xlim(*zoom)
                    inside = (x_train[:, 0] >= zoom[0]) & (x_train[:, 0] <= zoom[1])
                    inside_test = (x_test[:, 0] >= zoom[0]) & (x_test[:, 0] <= zoom[1])
                    window = (g >= zoom[0]) & (g <= zoom[1])
                    values = torch.cat([y_train[inside], y_test[inside_test],
                                        (fit.grid_mean - 2 * fit.grid_std)[window],
                                        (fit.grid_mean + 2 * fit.grid_std)[window]])
                    if len(values):
                        pad = 0.05 * float(values.max() - values.min()) + 1e-9
                        ax.set_ylim(float(values.min()) - pad, float(values.max()) + pad)
                    ax.set_title("zoom", fontsize=9)
                else:
                    ax.set_title(f"{titles[fit.method]}: RMSE {fit.rmse:.3g}, NLPD {fit.nlpd:.3g}", fontsize=10)
                    ax.set_ylabel(ylabel)
                    if row == 0:
                        ax.legend(loc="upper left", fontsize=8, markerscale=3)
                if row == len(fits) - 1:
                    ax.set_xlabel(xlabel)
    else:
        fig = Figure(figsize=(4.2 * len(fits), 4.2), layout="constrained")
        axes = fig.subplots(1, len(fits), squeeze=False)[0]
        lo, hi = float(y_test.min()), float(y_test.max())
        for ax, fit in zip(axes, fits):
            ax.errorbar(y_test, fit.test_mean, yerr=2 * fit.test_std, fmt=".", ms=3, lw=0.6,
                        color=colours[fit.method], ecolor=colours[fit.method], alpha=0.6)
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_title(f"{titles[fit.method]}: RMSE {fit.rmse:.3g}, NLPD {fit.nlpd:.3g}", fontsize=10)
            ax.set_xlabel(f"observed {ylabel}")
            ax.set_ylabel(r"predicted (mean $\pm 2$ sd)")
    fig.suptitle(f"{problem.name}: {len(problem.y_train)} training, {len(problem.y_test)} held-out rows")
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bma-gp`` with the command-line arguments ``argv`` (default ``sys.argv[1:]``).

    Returns:
        0 on success. Bad arguments or unusable data end the program like argparse does:
        a message on standard error and ``SystemExit(2)``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    methods = _parse_methods(args.method, parser)
    device = _resolve_device(args.device, parser)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"argument --out: {args.out!r} is a file; give a directory (it is created if missing)")
    name, features, target, x, y = _load_data(args, parser, dtype)
    if args.max_rows is not None and len(y) > args.max_rows:
        keep = torch.randperm(len(y), generator=generator)[: args.max_rows].sort().values
        x, y = x[keep], y[keep]
    kernel_kind = args.kernel
    if kernel_kind == "auto":
        kernel_kind = "seasonal" if args.data is None else "rbf"
    if kernel_kind == "seasonal" and x.shape[-1] != 1:
        parser.error(f"--kernel seasonal needs exactly one input column, the data have {x.shape[-1]} "
                     f"({', '.join(features)}); choose them with --features or use --kernel rbf")
    problem = _split(name, features, target, x, y, args.test_fraction, args.split, generator, parser)
    n_train = len(problem.y_train)
    if args.blocks > n_train and any(m in methods for m in ("blockmean", "sgpr")):
        parser.error(f"argument --blocks: {args.blocks} exceeds the {n_train} training rows; choose --blocks <= {n_train}")
    period = args.period / float(problem.x_scale[0])
    problem.x_train, problem.y_train, problem.x_test, problem.y_test = (
        t.to(device) for t in (problem.x_train, problem.y_train, problem.x_test, problem.y_test))
    problem.x_mean, problem.x_scale = problem.x_mean.to(device), problem.x_scale.to(device)

    grid = None
    if x.shape[-1] == 1 and not args.no_plot:
        both = torch.cat([problem.x_train, problem.x_test])
        lo, hi = float(both.min()), float(both.max())
        grid = torch.linspace(lo, hi, 2000, dtype=dtype, device=device).unsqueeze(-1)

    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as err:
        parser.error(f"argument --out: cannot create directory {args.out!r} ({err.strerror})")

    print(f"{_PROG}: {name}: {len(y)} rows -> {n_train} train / {len(problem.y_test)} test ({args.split} split); "
          f"inputs {', '.join(features)} -> target {target}")
    print(f"{_PROG}: kernel {kernel_kind}, methods {', '.join(methods)}, k = {args.blocks}, {args.iters} Adam steps "
          f"(lr {args.lr}), {device.type} {args.dtype}")
    fits = [_fit_one(method, problem, kernel_kind, period, args, device, dtype, generator, grid) for method in methods]
    print()
    print(_format_table(fits, target))

    summary = {
        "data": name, "target": target, "features": features, "n_train": n_train, "n_test": len(problem.y_test),
        "split": args.split, "kernel": kernel_kind, "iters": args.iters, "lr": args.lr, "device": str(device),
        "dtype": args.dtype, "seed": args.seed,
        "results": [{"method": f.method, "k": f.k, "train_seconds": f.train_seconds,
                     "predict_seconds": f.predict_seconds, "rmse": f.rmse, "nlpd": f.nlpd,
                     "final_train_loss": f.final_loss} for f in fits],
    }
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    print(f"\n{_PROG}: wrote {json_path}")
    if not args.no_plot:
        try:
            png_path = os.path.join(args.out, "fits.png")
            _plot(problem, fits, grid, png_path)
            print(f"{_PROG}: wrote {png_path}")
        except ImportError:
            print(f"{_PROG}: warning: matplotlib is not installed, no plot written "
                  "(pip install matplotlib, or pass --no-plot)", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
