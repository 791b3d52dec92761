"""Block mean GP regression on the Mauna Loa CO2 record (statsmodels, offline).

A GPyTorch ExactGP whose covariance is the block-exchangeable version of a trend + seasonal
kernel, with blocks of consecutive weeks (a time-series partition). Training (marginal
likelihood and gradients) and prediction use the closed forms of the block mean operator:
no CG, no Lanczos, no n x n Cholesky.

    python examples/gp_regression.py                # full run, writes docs/results/gp_examples/co2_fit.png
    python examples/gp_regression.py --smoke        # a few seconds, writes to a temporary directory

The last ``--test-years`` years are held out: the plot and the printed RMSE / NLPD are for
extrapolation in time, in ppm.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import gpytorch
import torch

from bma_gp import Partition
from bma_gp.kernels import BlockMeanKernel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/: the shared _common module
from _common import check_out_dir, require  # noqa: E402


def load_co2() -> tuple[torch.Tensor, torch.Tensor]:
    """Decimal years and CO2 (ppm) of the weekly record, missing weeks dropped."""
    co2 = require("statsmodels.datasets.co2")

    frame = co2.load_pandas().data.dropna()
    index = frame.index
    years = index.year + (index.day_of_year - 1) / 365.25
    return (
        torch.tensor(years.to_numpy(), dtype=torch.float64),
        torch.tensor(frame["co2"].to_numpy(), dtype=torch.float64),
    )


class BlockMeanGP(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, likelihood, partition):
        super().__init__(train_x, train_y, likelihood)
        trend = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        seasonal = gpytorch.kernels.ScaleKernel(gpytorch.kernels.PeriodicKernel() * gpytorch.kernels.RBFKernel())
        base = trend + seasonal
        self.mean_module = gpytorch.means.LinearMean(1)
        self.covar_module = BlockMeanKernel(base, train_x, partition)
        # sensible starting values on the standardised time axis (1 unit ~ 12 years)
        trend.base_kernel.lengthscale = 1.0
        seasonal.base_kernel.kernels[0].period_length = 1.0 / 12.4
        seasonal.base_kernel.kernels[1].lengthscale = 2.0

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-weeks", type=int, default=3, help="consecutive observations per block (>= 1)")
    parser.add_argument("--iters", type=int, default=60, help="Adam steps (>= 0)")
    parser.add_argument("--test-years", type=float, default=5.0, help="years held out at the end (> 0)")
    parser.add_argument("--smoke", action="store_true", help="tiny subset and few iterations")
    parser.add_argument("--out", type=Path, default=None, help="output directory for the PNG")
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults: an option given explicitly still wins
        parser.set_defaults(iters=3)
        args = parser.parse_args(argv)
    if args.block_weeks < 1:
        parser.error(f"--block-weeks must be at least 1, got {args.block_weeks}")
    if args.iters < 0:
        parser.error(f"--iters must be at least 0, got {args.iters}")
    if not args.test_years > 0:
        parser.error(f"--test-years must be positive (the held-out span), got {args.test_years:g}")
    check_out_dir(parser, args.out)  # before training: the figure is written last

    torch.manual_seed(0)
    years, co2 = load_co2()
    stride = 8 if args.smoke else 1  # --smoke: every 8th week; a block of --block-weeks rows spans 8x as long
    years, co2 = years[::stride], co2[::stride]
    split = float(years.max()) - args.test_years
    train, test = years <= split, years > split
    if int(train.sum()) < args.block_weeks:
        parser.error(
            f"--test-years {args.test_years:g} leaves {int(train.sum())} training observations, fewer than one block "
            f"of --block-weeks {args.block_weeks}; the record spans {float(years.max() - years.min()):.1f} years"
        )
    t_mean, t_std = years[train].mean(), years[train].std()
    y_mean, y_std = co2[train].mean(), co2[train].std()
    x = ((years - t_mean) / t_std).unsqueeze(-1)
    y = (co2 - y_mean) / y_std
    train_x, train_y, test_x, test_y = x[train], y[train], x[test], y[test]

    n = train_x.shape[0]
    block = args.block_weeks
    sizes = torch.full((n // block,), block)
    sizes[-1] += n - int(sizes.sum())
    partition = Partition.from_sizes(sizes)  # data are sorted in time: blocks of consecutive weeks

    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = BlockMeanGP(train_x, train_y, likelihood, partition).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    start = time.perf_counter()
    for i in range(args.iters):
        optimizer.zero_grad()
        loss = -mll(model(train_x), train_y)
        loss.backward()
        optimizer.step()
        if i % 10 == 0 or i == args.iters - 1:
            print(f"iter {i:3d}  -mll/n {loss.item():.4f}  noise {likelihood.noise.item():.4f}")
    train_time = time.perf_counter() - start

    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        pred = likelihood(model(test_x))
        mean, var = pred.mean, pred.variance
    predict_time = time.perf_counter() - start
    rmse = float(((mean - test_y) ** 2).mean().sqrt() * y_std)
    nlpd = float(
        (0.5 * torch.log(2 * math.pi * var) + 0.5 * (mean - test_y) ** 2 / var).mean() + math.log(float(y_std))
    )
    print(f"n_train={n} k={partition.num_blocks} train {train_time:.1f}s predict {predict_time:.2f}s")
    print(f"held-out last {args.test_years:g} years: RMSE {rmse:.3f} ppm, NLPD {nlpd:.3f} (ppm scale)")

    out = args.out or (
        Path(tempfile.mkdtemp())
        if args.smoke
        else Path(__file__).resolve().parents[1] / "docs" / "results" / "gp_examples"
    )
    out.mkdir(parents=True, exist_ok=True)
    grid = torch.linspace(float(x.min()), float(x.max()) + 0.1, 600, dtype=torch.float64).unsqueeze(-1)
    with torch.no_grad():
        grid_pred = likelihood(model(grid))
        lo, hi = grid_pred.confidence_region()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    to_years = lambda v: (v.squeeze(-1) * t_std + t_mean).numpy()  # noqa: E731
    to_ppm = lambda v: (v * y_std + y_mean).numpy()  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 1]})
    for ax, window in zip(axes, [None, (split - 3, float(years.max()) + 1)]):
        ax.plot(to_years(train_x), to_ppm(train_y), ".", ms=2, color="0.4", label="train")
        ax.plot(to_years(test_x), to_ppm(test_y), ".", ms=2, color="tab:red", label="held out")
        ax.plot(to_years(grid), to_ppm(grid_pred.mean), color="tab:blue", lw=1, label="block mean GP")
        ax.fill_between(to_years(grid), to_ppm(lo), to_ppm(hi), color="tab:blue", alpha=0.25, label="95%")
        if window:
            ax.set_xlim(*window)
            lo_y = float(co2[years > window[0]].min()) - 2
            ax.set_ylim(lo_y, float(co2.max()) + 3)
        ax.set_xlabel("year")
    axes[0].set_ylabel("CO2 (ppm)")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[0].set_title(f"Mauna Loa CO2, block mean GP (k={partition.num_blocks} blocks of {block * stride} weeks)")
    axes[1].set_title(f"held out: RMSE {rmse:.2f} ppm")
    fig.tight_layout()
    path = out / "co2_fit.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return {"rmse": rmse, "nlpd": nlpd, "train_time": train_time, "predict_time": predict_time, "png": path}


if __name__ == "__main__":
    main()
