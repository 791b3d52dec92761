"""One training iteration of a mixed-effects GP at n = 10^6: SGPR smooth part plus two crossed groupings.

The model is the one of ``docs/mixed.md``: a 2-D smooth function through GPyTorch's
``InducingPointKernel`` (SGPR, ``m = 256`` inducing points on ``ScaleKernel(RBFKernel(ard_num_dims=2))``)
plus two ``GroupKernel`` random intercepts, crossed, with ``10^3`` and ``5 x 10^3`` levels, plus the
Gaussian noise, inside an ``ExactGP``. The data are synthetic (a smooth surface, group offsets and noise
drawn from the model's own prior structure), float32.

The SGPR kernel is ``bma_gp.ChunkedInducingPointKernel`` (GPyTorch's, with its root formed in checkpointed
row blocks) or, with ``--sgpr gpytorch``, GPyTorch's own ``InducingPointKernel``.

One iteration is ``-ExactMarginalLogLikelihood`` plus ``backward`` to every hyperparameter (the inducing
points, lengthscales, output scale, both group variances and the noise). The training covariance is
``U U^T + P_1 B_1 P_1^T + P_2 B_2 P_2^T + sigma^2 I``, solved in closed form through a capacitance matrix
of size ``256 + 1000`` after the 5000-level grouping is eliminated (docs/math.md section 4).

Prints one JSON line per measured iteration (the first one includes the one-off costs: building the
partitions from the id columns), then a readable summary with the process's peak resident memory.

    python examples/bench_mixed.py                 # n = 10^6, two iterations
    python examples/bench_mixed.py --threads 1
    python examples/bench_mixed.py --smoke         # n = 5000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import warnings

import gpytorch
import torch

from bma_gp import ChunkedInducingPointKernel, ClosedFormFallbackWarning, GroupKernel


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MixedGP(gpytorch.models.ExactGP):
    """Zero mean; SGPR on the first ``d`` columns; one ``GroupKernel`` per id column after them."""

    def __init__(self, x, y, likelihood, d: int, levels: list[int], inducing, sgpr=ChunkedInducingPointKernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=d))
        covar = sgpr(smooth, inducing, likelihood, active_dims=tuple(range(d)))
        for j, k in enumerate(levels):
            covar = covar + GroupKernel(k, active_dims=[d + j])
        self.covar_module = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def make_data(n: int, levels: list[int], seed: int = 0, dtype=torch.float32):
    """``x = [s_1, s_2, g_1, g_2]`` (smooth inputs in [0, 1]^2, scattered crossed ids); ``y`` = a smooth surface
    + group offsets (sd 0.5 and 0.3) + noise (sd 0.3)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(n, 2, generator=gen, dtype=dtype)
    ids = [torch.randint(k, (n,), generator=gen) for k in levels]
    f = torch.sin(6 * s[:, 0]) * torch.cos(4 * s[:, 1])
    for sd, k, g in zip((0.5, 0.3), levels, ids):
        f = f + sd * torch.randn(k, generator=gen, dtype=dtype)[g]
    y = f + 0.3 * torch.randn(n, generator=gen, dtype=dtype)
    x = torch.cat([s, *(g.to(dtype).unsqueeze(-1) for g in ids)], dim=-1)
    return x, y


SGPR = {"chunked": ChunkedInducingPointKernel, "gpytorch": gpytorch.kernels.InducingPointKernel}


def predict(model, levels: list[int], t: int) -> dict:
    """Mean and variance at ``t`` new points (new smooth inputs, random levels of each grouping), in eval mode:
    seconds and the peak RSS after it."""
    gen = torch.Generator().manual_seed(2)
    s = torch.rand(t, 2, generator=gen)
    ids = [torch.randint(k, (t,), generator=gen).float().unsqueeze(-1) for k in levels]
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        post = model.likelihood(model(torch.cat([s, *ids], dim=-1)))
        mean, variance = post.mean, post.variance
    seconds = time.perf_counter() - start
    assert bool(torch.isfinite(mean).all()) and bool((variance > 0).all())
    return {"bench": "mixed_prediction", "t": t, "seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def run(
    n: int, levels: list[int], m: int, iters: int, sgpr: str = "chunked", t: int = 0, weight: str = "auto"
) -> list[dict]:
    x, y = make_data(n, levels)
    gen = torch.Generator().manual_seed(1)
    inducing = x[torch.randperm(n, generator=gen)[:m], :2].clone()
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = MixedGP(x, y, likelihood, 2, levels, inducing, SGPR[sgpr])
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    records = []
    rss_data = _peak_rss_mb()
    for it in range(iters):
        model.zero_grad()
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = -mll(model(x), y)
        loss.backward()
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        ok = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        assert ok, "a gradient is missing or not finite"
        records.append(
            {
                "bench": "mixed_iteration",
                "n": n,
                "levels": levels,
                "m": m,
                "sgpr": sgpr,
                "dtype": "float32",
                "iteration": it,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "loss": float(loss.detach()),
                "peak_rss_mb": _peak_rss_mb(),
                "rss_after_data_mb": rss_data,
                "threads": torch.get_num_threads(),
                "load_avg": os.getloadavg()[0],
            }
        )
    if t:
        records.append({**predict(model, levels, t), "n": n, "levels": levels, "m": m, "sgpr": sgpr, "weight": weight})
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--levels", type=int, nargs=2, default=[1000, 5000])
    parser.add_argument("--inducing", type=int, default=256)
    parser.add_argument(
        "--sgpr",
        choices=tuple(SGPR),
        default="chunked",
        help="SGPR kernel: bma_gp.ChunkedInducingPointKernel or gpytorch.kernels.InducingPointKernel",
    )
    parser.add_argument("--iters", type=int, default=2, help="measured iterations (the first pays one-off costs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="n = 5000, 16 inducing points, levels 50 x 200")
    parser.add_argument("--predict", type=int, default=0, help="then predict mean and variance at this many new points")
    parser.add_argument(
        "--weight",
        choices=("auto", "formed"),
        default=None,
        help="with --predict: auto (default), the package's choice, or formed, always the formed q x q posterior "
        "weight (the path before products)",
    )
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults: an option given explicitly still wins
        parser.set_defaults(n=5000, levels=[50, 200], inducing=16)
        args = parser.parse_args(argv)
    for option, value in (
        ("--n", args.n),
        ("--inducing", args.inducing),
        ("--iters", args.iters),
        ("--threads", args.threads),
    ):
        if value is not None and value < 1:  # a usage error, not a traceback or inf / nan after the run
            parser.error(f"{option} must be at least 1, got {value}")
    if min(args.levels) < 1:  # was a traceback from torch.randint while the data were made
        parser.error(f"--levels must be two numbers of levels >= 1, got {' '.join(map(str, args.levels))}")
    if args.inducing > args.n:  # were drawn from the n rows: silently fewer
        parser.error(f"--inducing {args.inducing} is more than the --n {args.n} rows they are drawn from")
    if args.predict < 0:  # was a traceback after the training iterations
        parser.error(f"--predict must be at least 0 (0: no prediction), got {args.predict}")
    if args.weight is not None and not args.predict:  # it only changes the prediction: was ignored
        parser.error(f"--weight {args.weight}: only with --predict T (it picks how the prediction is computed)")
    args.weight = args.weight or "auto"
    if args.weight == "formed":
        from bma_gp.kernels import sum_prediction_strategy

        sum_prediction_strategy._DENSE_WEIGHT_MAX_ELIMINATED = 2**62
    if args.threads:
        torch.set_num_threads(args.threads)
    # closed forms only: a summand outside the family would warn (here: fail), and CG is never the dense path
    with warnings.catch_warnings(), gpytorch.settings.max_cholesky_size(0):
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        records = run(args.n, list(args.levels), args.inducing, args.iters, args.sgpr, args.predict, args.weight)
    for r in records:
        print(json.dumps(r), flush=True)
    prediction = [r for r in records if r["bench"] == "mixed_prediction"]
    records = [r for r in records if r["bench"] == "mixed_iteration"]
    best = min(records, key=lambda r: r["seconds"])
    print(
        f"# n = {args.n:,}, SGPR ({args.sgpr}) m = {args.inducing} + groups {args.levels[0]} x {args.levels[1]}, "
        f"float32: one training iteration {best['seconds']:.2f} s (CPU {best['cpu_seconds']:.2f} s, first "
        f"{records[0]['seconds']:.2f} s; {best['threads']} threads, load {best['load_avg']:.1f}), "
        f"peak RSS {records[-1]['peak_rss_mb'] / 1024:.2f} GB"
    )
    for r in prediction:
        print(
            f"# prediction at {r['t']:,} new points ({args.weight} weight): {r['seconds']:.2f} s, peak RSS "
            f"{r['peak_rss_mb'] / 1024:.2f} GB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
