"""One training iteration of a random-intercept GP: one ``GroupKernel`` plus Gaussian noise, many groups.

The training covariance ``sigma^2 I + P diag(v) P^T`` is one block mean matrix whose ``B = diag(v)`` is
diagonal, so its core matrix ``C = diag(lam + s v)`` is diagonal too and the closed forms are elementwise
(``BlockMeanLinearOperator._diagonal_core``). The baseline, in the same run, is the same operator through
the general ``k x k`` path (Cholesky of the core and its backward), forced by switching the diagonal
detection off: what every iteration cost before the elementwise path.

One iteration is ``-ExactMarginalLogLikelihood`` plus ``backward`` to the group variance, the noise and the
constant mean, float32 (the ``k x k`` work in float64, as always). Synthetic data: ``n`` points spread
uniformly over ``k`` groups. Prints one JSON line per (path, k), then a readable summary.

    python examples/bench_groups.py                      # n = 10^5, k = 1000 and 4000, both paths
    python examples/bench_groups.py --ks 20000 --only elementwise --n 1000000
    python examples/bench_groups.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time
from unittest import mock

import gpytorch
import torch

from bma_gp import BlockMeanLinearOperator, GroupKernel


class RandomIntercepts(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, k: int):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = GroupKernel(k)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def iteration_seconds(n: int, k: int, general: bool, repeats: int) -> tuple[float, float]:
    """(best seconds of ``repeats`` iterations, loss)."""
    gen = torch.Generator().manual_seed(k)
    ids = torch.randint(0, k, (n,), generator=gen)
    y = torch.randn(k, generator=gen)[ids] + 0.5 * torch.randn(n, generator=gen)
    x = ids.unsqueeze(-1).float()
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = RandomIntercepts(x, y, likelihood, k)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    patch = (
        mock.patch.object(BlockMeanLinearOperator, "_diagonal_core", lambda self, read_back=True: False)
        if general
        else contextlib.nullcontext()
    )
    best, loss = float("inf"), float("nan")
    with patch:
        for _ in range(repeats):
            model.zero_grad()
            start = time.perf_counter()
            value = -mll(model(x), y)
            value.backward()
            best = min(best, time.perf_counter() - start)
            loss = float(value.detach())
    return best, loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--ks", default="1000,4000", help="comma-separated numbers of groups")
    parser.add_argument("--only", choices=("elementwise", "general", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="n = 3000, k = 50 and 200")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, ks = (3000, [50, 200]) if args.smoke else (args.n, [int(k) for k in args.ks.split(",")])
    paths = {"both": ["elementwise", "general"], "elementwise": ["elementwise"], "general": ["general"]}[args.only]
    records = []
    for k in ks:
        rec = {"bench": "group_iteration", "n": n, "k": k, "dtype": "float32", "threads": torch.get_num_threads()}
        for path in paths:
            seconds, loss = iteration_seconds(n, k, path == "general", args.repeats)
            rec[f"{path}_s"], rec[f"{path}_loss"] = seconds, loss
        if len(paths) == 2:
            rec["speedup"] = rec["general_s"] / rec["elementwise_s"]
        rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rec["load_avg"] = os.getloadavg()[0]
        records.append(rec)
        print(json.dumps(rec), flush=True)
    for r in records:
        parts = [f"{p} {r[p + '_s']:.3f} s (loss {r[p + '_loss']:.6f})" for p in paths]
        extra = f", {r['speedup']:.0f}x" if "speedup" in r else ""
        print(f"# n = {r['n']:,}, k = {r['k']:,} groups: " + "; ".join(parts) + extra)
    print(f"# peak RSS of the process {records[-1]['peak_rss_mb'] / 1024:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
