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

``--rank r`` times correlated group effects instead, ``GroupKernel(k, rank=r)`` (``C = diag(v) + W W^T``): the
factor form (a diagonal block term plus the low-rank root ``P W``, the default past
``bma_gp.kernels.group_kernel.FACTOR_DENSE_MAX_GROUPS`` groups) against the dense ``k x k`` ``B`` (forced by raising
that threshold), the iteration (with ``backward`` to ``W`` too) and the prediction of 1000 new points (500 of them
in groups unseen in training), as records ``group_factor_iteration``.

    python examples/bench_groups.py --rank 2             # n = 10^5, k = 1000 and 4000, both forms

``--slope`` times ``GroupKernel(k, slope=True)`` (a correlated random intercept and slope: three diagonal terms
over one grouping) with the three terms eliminated together, level by level (``factor`` in the output), against
one of them eliminated alone as before (``dense``: the other two in a ``2k x 2k`` capacitance), as records
``group_slope_iteration``.

    python examples/bench_groups.py --slope --n 20000 --ks 1000,5000

``--posterior`` times the posterior at the training inputs after fitting nothing (the initial hyperparameters):
``model(train_x).variance`` and one draw of ``likelihood(model(train_x)).rsample()``, for a random intercept, two
crossed groupings (``k`` and 50 levels), ``GroupKernel(k, rank=2)`` and a correlated random slope, float64. The
closed forms (``closed``: the intercept's elementwise Schur complement; for the sums the variances from the
capacitance factorisation's blocks and draws by conditioning prior draws) against what ran before, in the same
run (``before``: the intercept's Schur complement through ``k x k`` cores; for the sums the ``q x q`` weight
``H`` formed and a draw through the square root, its ``q x q`` eigendecomposition, timed only while
``q <= --max-draw-q``), as records ``group_posterior``; the variances of both, compared.

    python examples/bench_groups.py --posterior --n 20000 --ks 5000

``--predict`` times prediction at ``--t`` new inputs (half of them in groups unseen in training) after fitting
nothing, float32: the mean and variances, then the full covariance of the first ``--cov-points`` of them, for two
crossed groupings (``k`` and 100 levels), a correlated random slope and ``GroupKernel(k, rank=2)``. Past
``_DENSE_WEIGHT_MAX_ELIMINATED`` levels the posterior weight ``W`` is applied as products; the structured forms
(``closed``: the variances and products from the capacitance factorisation's blocks, no product with ``W``)
against those products (``before``, in the same run, the same one-value-per-row cross covariances; skipped with
``--no-before``), as records ``group_prediction``. The training factorisation (a first prediction at two points)
is timed apart (``setup_s``).

    python examples/bench_groups.py --predict --n 100000 --ks 5000 --t 2000
    python examples/bench_groups.py --predict --n 1000000 --ks 50000 --t 10000 --no-before
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
    def __init__(self, x, y, likelihood, k: int, rank: int = 0, slope: bool = False):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = GroupKernel(k, rank=rank, slope=slope)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def synthetic(n: int, k: int) -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    """``(generator, x, y)``: ``n`` points spread uniformly over ``k`` groups, a group effect plus noise."""
    gen = torch.Generator().manual_seed(k)
    ids = torch.randint(0, k, (n,), generator=gen)
    y = torch.randn(k, generator=gen)[ids] + 0.5 * torch.randn(n, generator=gen)
    return gen, ids.unsqueeze(-1).float(), y


def best_iteration(model: RandomIntercepts, x: torch.Tensor, y: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(best seconds of ``repeats`` iterations of the negative marginal likelihood and its backward, loss)."""
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    best, loss = float("inf"), float("nan")
    for _ in range(repeats):
        model.zero_grad()
        start = time.perf_counter()
        value = -mll(model(x), y)
        value.backward()
        best = min(best, time.perf_counter() - start)
        loss = float(value.detach())
    return best, loss


def iteration_seconds(n: int, k: int, general: bool, repeats: int) -> tuple[float, float]:
    """(best seconds of ``repeats`` iterations, loss)."""
    _, x, y = synthetic(n, k)
    model = RandomIntercepts(x, y, gpytorch.likelihoods.GaussianLikelihood(), k)
    patch = (
        mock.patch.object(BlockMeanLinearOperator, "_diagonal_core", lambda self, read_back=True: False)
        if general
        else contextlib.nullcontext()
    )
    with patch:
        return best_iteration(model, x, y, repeats)


def factor_seconds(n: int, k: int, rank: int, dense: bool, repeats: int) -> dict:
    """Best iteration seconds, loss, and the seconds and mean of one prediction of 1000 new points, for
    ``GroupKernel(k, rank=rank)`` in its factor form or (``dense``) with the ``k x k`` matrix ``B``; with
    ``rank=0``, ``GroupKernel(k, slope=True)`` on a covariate, its three terms eliminated together or (``dense``)
    one of them alone, as before the joint elimination (the other two in a dense ``2k x 2k`` capacitance)."""
    from bma_gp import BlockMeanSumLinearOperator
    from bma_gp.kernels import group_kernel

    gen, x, y = synthetic(n, k)
    test = torch.cat([torch.randint(0, k, (500,), generator=gen), torch.arange(k, k + 500)]).unsqueeze(-1).float()
    slope = rank == 0
    if slope:  # ids, then a covariate; the response gets a slope per group
        covariate = torch.rand(n, generator=gen) * 2 - 1
        y = y + torch.randn(k, generator=gen)[x[:, 0].long()] * covariate
        x = torch.cat([x, covariate.unsqueeze(-1)], -1)
        test = torch.cat([test, torch.rand(test.shape[0], 1, generator=gen) * 2 - 1], -1)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    torch.manual_seed(0)  # the same random W for both forms
    model = RandomIntercepts(x, y, likelihood, k + 500, rank, slope)  # ids k .. k + 499 never occur in training
    if slope:
        # the factorisation asks _elimination_decision (from 7276042, 5 December 2026, to 7 December this patched
        # _elimination_terms, which the factorisation no longer called: "dense" timed the joint elimination too)
        original = BlockMeanSumLinearOperator._elimination_decision

        def first_term_only(self):
            terms, refusal = original(self)
            return terms[:1], refusal

        one_term = mock.patch.object(BlockMeanSumLinearOperator, "_elimination_decision", first_term_only)
        patch = one_term if dense else contextlib.nullcontext()
    else:
        threshold = 10**12 if dense else group_kernel.FACTOR_DENSE_MAX_GROUPS
        patch = mock.patch.object(group_kernel, "FACTOR_DENSE_MAX_GROUPS", threshold)
    joint = _Calls(BlockMeanSumLinearOperator, "_factorise_joint")
    with patch, joint:
        best, loss = best_iteration(model, x, y, repeats)
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            pred = likelihood(model(test))
            mean, variance = pred.mean, pred.variance
        predict = time.perf_counter() - start
    if slope and bool(joint.calls) == dense:  # the comparison is only worth its name if the two forms differ
        raise RuntimeError(
            f"the {'dense' if dense else 'factor'} form of the slope model "
            f"{'eliminated its three terms jointly' if dense else 'never eliminated its three terms jointly'}: the "
            "patch that picks the form no longer reaches the factorisation"
        )
    return {"s": best, "loss": loss, "predict_s": predict, "mean": mean, "variance": variance}


class _Calls:
    """Counts the calls of ``cls.name`` while entered (a spy: the method runs as before)."""

    def __init__(self, cls, name: str) -> None:
        self.cls, self.name, self.calls = cls, name, 0

    def __enter__(self):
        original = getattr(self.cls, self.name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        self._patch = mock.patch.object(self.cls, self.name, counted)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        return self._patch.__exit__(*exc)


POSTERIOR_MODELS = ("intercept", "crossed", "rank2", "slope")


def _posterior_model(kind: str, n: int, k: int):
    """An eval-mode float64 model of ``kind`` on synthetic data (ids in column 0, a second grouping of 50 levels
    in column 1, a covariate in column 2) and its training inputs."""
    gen, x, y = synthetic(n, k)
    second = torch.randint(0, 50, (n, 1), generator=gen).float()
    covariate = torch.rand(n, 1, generator=gen) * 2 - 1
    x = torch.cat([x, second, covariate], -1).double()
    torch.manual_seed(0)  # the same random factor W in both runs of rank2
    if kind == "intercept":
        covar = GroupKernel(k, active_dims=[0])
    elif kind == "crossed":
        covar = GroupKernel(k, active_dims=[0]) + GroupKernel(50, active_dims=[1])
    elif kind == "rank2":
        covar = GroupKernel(k, rank=2, active_dims=[0])
    else:
        covar = GroupKernel(k, slope=True, active_dims=[0, 2])
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = RandomIntercepts(x, y.double(), likelihood, k)
    model.covar_module = covar
    return model.double().eval(), likelihood.double().eval(), x


def posterior_seconds(kind: str, n: int, k: int, before: bool, max_draw_q: int) -> dict:
    """Seconds of ``model(x).variance`` and of one ``likelihood(model(x)).rsample()``, and the variance."""
    from linear_operator.operators import LinearOperator

    from bma_gp.kernels import sum_prediction_strategy as sps

    model, likelihood, x = _posterior_model(kind, n, k)
    patches = []
    if before and kind == "intercept":  # the Schur complement through k x k cores, as before; the rest as it is
        schur = BlockMeanLinearOperator.schur_complement

        def general_schur(self, cross, other):
            with mock.patch.object(BlockMeanLinearOperator, "_diagonal_core", lambda self, read_back=True: False):
                return schur(self, cross, other)

        patches.append(mock.patch.object(BlockMeanLinearOperator, "schur_complement", general_schur))
    elif before:
        patches.append(mock.patch.object(sps, "_posterior_quadratic_diagonal", lambda M: None))
        generic = LinearOperator.zero_mean_mvn_samples
        patches.append(mock.patch.object(sps.TrainingPosteriorLinearOperator, "zero_mean_mvn_samples", generic))
    out: dict = {}
    with contextlib.ExitStack() as stack, torch.no_grad():
        for p in patches:
            stack.enter_context(p)
        try:
            start = time.perf_counter()
            post = model(x)
            out["variance"] = post.variance
            out["variance_s"] = time.perf_counter() - start
            covar = post.lazy_covariance_matrix
            q = covar.q if isinstance(covar, sps.TrainingPosteriorLinearOperator) else k
            out["q"] = q
            if before and kind != "intercept" and q > max_draw_q:
                out["draw_s"] = None  # a q x q eigendecomposition: not timed
            else:
                start = time.perf_counter()
                likelihood(post).rsample()
                out["draw_s"] = time.perf_counter() - start
        except ValueError as err:  # q past max_capacitance_size
            out.update(variance=None, variance_s=None, draw_s=None, error=str(err).split(";")[0])
    return out


def run_posterior(n: int, ks: list[int], max_draw_q: int) -> list[dict]:
    records = []
    posterior_seconds("crossed", 500, 20, False, max_draw_q)  # warm-up: first-call imports and caches
    for k in ks:
        for kind in POSTERIOR_MODELS:
            rec: dict = {"bench": "group_posterior", "model": kind, "n": n, "k": k, "dtype": "float64"}
            rec["threads"] = torch.get_num_threads()
            closed = posterior_seconds(kind, n, k, False, max_draw_q)
            old = posterior_seconds(kind, n, k, True, max_draw_q)
            rec["q"] = closed["q"]
            for name, res in (("closed", closed), ("before", old)):
                rec[f"{name}_variance_s"], rec[f"{name}_draw_s"] = res["variance_s"], res["draw_s"]
                if "error" in res:
                    rec[f"{name}_error"] = res["error"]
            if old["variance"] is not None:
                rec["max_variance_rel_diff"] = float(
                    ((closed["variance"] - old["variance"]) / old["variance"]).abs().max()
                )
            rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rec["load_avg"] = os.getloadavg()[0]
            records.append(rec)
            print(json.dumps(rec), flush=True)

    def fmt(value):
        return "-" if value is None else f"{value:.3f} s"

    for r in records:
        ratio = ""
        if r["before_variance_s"] is not None:
            ratio = f" ({r['before_variance_s'] / r['closed_variance_s']:.0f}x"
            if r["before_draw_s"] is not None:
                ratio += f", draw {r['before_draw_s'] / r['closed_draw_s']:.0f}x"
            ratio += ")"
        print(
            f"# {r['model']}, n = {r['n']:,}, k = {r['k']:,}, q = {r['q']:,}: "
            f"variance {fmt(r['closed_variance_s'])} (before {fmt(r['before_variance_s'])}), "
            f"draw {fmt(r['closed_draw_s'])} (before {fmt(r['before_draw_s'])})"
            + ratio
            + (f"; before: {r['before_error']}" if "before_error" in r else "")
        )
    return records


def run_factor(n: int, ks: list[int], rank: int, paths: list[str], repeats: int) -> list[dict]:
    records = []
    for k in ks:
        bench = "group_factor_iteration" if rank else "group_slope_iteration"
        rec = {"bench": bench, "n": n, "k": k, "rank": rank, "dtype": "float32"}
        rec["threads"] = torch.get_num_threads()
        results = {path: factor_seconds(n, k, rank, path == "dense", repeats) for path in paths}
        for path, res in results.items():
            rec.update({f"{path}_s": res["s"], f"{path}_loss": res["loss"], f"{path}_predict_s": res["predict_s"]})
        if len(results) == 2:
            a, b = results["factor"], results["dense"]
            rec["speedup"] = b["s"] / a["s"]
            rec["predict_speedup"] = b["predict_s"] / a["predict_s"]
            rec["max_mean_diff"] = float((a["mean"] - b["mean"]).abs().max())
            rec["max_variance_rel_diff"] = float(((a["variance"] - b["variance"]) / b["variance"]).abs().max())
        rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rec["load_avg"] = os.getloadavg()[0]
        records.append(rec)
        print(json.dumps(rec), flush=True)
    for r in records:
        parts = [
            f"{p} {r[p + '_s']:.3f} s (loss {r[p + '_loss']:.6f}), predict {r[p + '_predict_s']:.3f} s" for p in paths
        ]
        extra = f"; {r['speedup']:.0f}x, predict {r['predict_speedup']:.1f}x" if "speedup" in r else ""
        what = f"rank {r['rank']}" if r["rank"] else "correlated slope"
        print(f"# n = {r['n']:,}, k = {r['k']:,} groups, {what}: " + "; ".join(parts) + extra)
    return records


PREDICTION_MODELS = ("crossed", "slope", "rank2")


def _prediction_model(kind: str, n: int, k: int, t: int):
    """An eval-mode float32 model of ``kind`` (ids in column 0, a second grouping of 100 levels in column 1, a
    covariate in column 2; the last 20 of the ``k`` groups never occur in training) and ``t`` new inputs, half of
    them in those unseen groups."""
    gen = torch.Generator().manual_seed(k)
    ids = torch.randint(0, k - 20, (n,), generator=gen)
    second = torch.randint(0, 100, (n,), generator=gen)
    covariate = torch.rand(n, generator=gen) * 2 - 1
    y = torch.randn(k, generator=gen)[ids] * (1 + covariate) + 0.5 * torch.randn(n, generator=gen)
    x = torch.stack([ids.float(), second.float(), covariate], -1)
    torch.manual_seed(0)  # the rank-2 factor
    if kind == "crossed":
        covar = GroupKernel(k, active_dims=[0]) + GroupKernel(100, active_dims=[1])
    elif kind == "slope":
        covar = GroupKernel(k, slope=True, active_dims=[0, 2])
    else:
        covar = GroupKernel(k, rank=2, active_dims=[0])
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = RandomIntercepts(x, y, likelihood, k)
    model.covar_module = covar
    xt = x[torch.randint(0, n, (t,), generator=gen)].clone()
    xt[: t // 2, 0] = torch.randint(k - 20, k, (t // 2,), generator=gen).float()
    xt[:, 2] = torch.rand(t, generator=gen) * 2 - 1
    return model.eval(), likelihood.eval(), xt


def prediction_seconds(kind: str, n: int, k: int, t: int, cov_points: int, before: bool) -> dict:
    """Seconds of the training factorisation, of the mean and variances at ``t`` points and of the covariance of
    the first ``cov_points``; with ``before``, the structured forms switched off (products with ``W``)."""
    from bma_gp.kernels import sum_prediction_strategy as sps

    model, likelihood, xt = _prediction_model(kind, n, k, t)
    out: dict = {}
    with contextlib.ExitStack() as stack, torch.no_grad():
        if before:
            cls = sps.PredictiveCovarianceLinearOperator
            stack.enter_context(mock.patch.object(cls, "_structured_quadratic_diagonal", lambda self: None))
            stack.enter_context(mock.patch.object(cls, "_structured_product", lambda self, x: None))
        start = time.perf_counter()
        _ = model(xt[:2]).mean
        out["setup_s"] = time.perf_counter() - start
        start = time.perf_counter()
        post = model(xt)
        out["mean"], out["variance"] = post.mean, post.variance
        out["variance_s"] = time.perf_counter() - start
        out["implicit_weight"] = isinstance(getattr(post.lazy_covariance_matrix, "W", None), sps._ImplicitWeight)
        start = time.perf_counter()
        out["covariance"] = model(xt[:cov_points]).covariance_matrix
        out["cov_s"] = time.perf_counter() - start
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_prediction(n: int, ks: list[int], t: int, cov_points: int, before: bool) -> list[dict]:
    records = []
    prediction_seconds("crossed", 2000, 1100, 50, 20, False)  # warm-up: first-call imports and caches
    for k in ks:
        for kind in PREDICTION_MODELS:
            rec: dict = {"bench": "group_prediction", "model": kind, "n": n, "k": k, "t": t, "dtype": "float32"}
            rec.update(threads=torch.get_num_threads(), cov_points=min(t, cov_points))
            closed = prediction_seconds(kind, n, k, t, cov_points, False)
            rec["implicit_weight"] = closed["implicit_weight"]
            rec["setup_s"] = closed["setup_s"]
            rec["closed_variance_s"], rec["closed_cov_s"] = closed["variance_s"], closed["cov_s"]
            rec["closed_peak_rss_mb"] = closed["peak_rss_mb"]
            if before:
                old = prediction_seconds(kind, n, k, t, cov_points, True)
                rec["before_variance_s"], rec["before_cov_s"] = old["variance_s"], old["cov_s"]
                for name in ("mean", "variance", "covariance"):
                    ref = old[name].double()
                    rec[f"max_{name}_rel_diff"] = float((closed[name].double() - ref).abs().max() / ref.abs().max())
            rec["load_avg"] = os.getloadavg()[0]
            records.append(rec)
            print(json.dumps(rec), flush=True)
    for r in records:
        line = (
            f"# {r['model']}, n = {r['n']:,}, k = {r['k']:,}, t = {r['t']:,}: "
            f"variances {r['closed_variance_s']:.3f} s, "
            f"covariance of {r['cov_points']:,} points {r['closed_cov_s']:.3f} s"
        )
        if "before_variance_s" in r:
            line += (
                f" (products with W: {r['before_variance_s']:.3f} s, {r['before_cov_s']:.3f} s; "
                f"{r['before_variance_s'] / r['closed_variance_s']:.0f}x, {r['before_cov_s'] / r['closed_cov_s']:.0f}x)"
            )
        print(line + f"; training factorisation {r['setup_s']:.2f} s")
    return records


def _group_counts(text: str) -> list[int]:
    """``--ks``: comma-separated integers >= 1 (argparse names the option in front of the message)."""
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1000,4000, got {text!r}") from None
    if min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers of groups >= 1, got {text!r}")
    repeated = sorted({str(v) for v in ks if ks.count(v) > 1})
    if repeated:  # the same runs twice, in two rows
        raise argparse.ArgumentTypeError(f"{','.join(repeated)} given twice in {text!r}; name each once")
    return ks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--ks", type=_group_counts, default="1000,4000", help="comma-separated numbers of groups")
    parser.add_argument(
        "--only",
        choices=("elementwise", "general", "both"),
        default=None,
        help="both (default); with --rank / --slope: elementwise = the factor form, general = the dense form",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations, the fastest kept (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="n = 3000, k = 50 and 200 (300 with --rank)")
    parser.add_argument("--rank", type=int, default=0, help="correlated effects of this rank: factor vs dense form")
    parser.add_argument(
        "--slope",
        action="store_true",
        help="a correlated random slope: its three terms eliminated together ('factor') vs one ('dense')",
    )
    parser.add_argument(
        "--posterior", action="store_true", help="the posterior at the training inputs: closed form vs before"
    )
    parser.add_argument(
        "--max-draw-q",
        type=int,
        default=None,
        help="with --posterior: time the old square-root draw up to this q (default 6000)",
    )
    parser.add_argument("--predict", action="store_true", help="prediction at new inputs: structured vs products")
    parser.add_argument("--t", type=int, default=None, help="with --predict: new inputs (default 2000)")
    parser.add_argument(
        "--cov-points", type=int, default=None, help="with --predict: points of the full covariance (default 2000)"
    )
    parser.add_argument("--no-before", action="store_true", help="with --predict: skip the products with W")
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults, per benchmark: an option given explicitly still wins
        if args.predict:
            parser.set_defaults(n=4000, ks="1400", t=300)  # past _DENSE_WEIGHT_MAX_ELIMINATED
        elif args.posterior or args.rank or args.slope:
            parser.set_defaults(n=3000, ks="300")  # past the factor threshold
        else:
            parser.set_defaults(n=3000, ks="50,200")
        args = parser.parse_args(argv)
    for option, value in (
        ("--n", args.n),
        ("--repeats", args.repeats),
        ("--t", args.t),
        ("--cov-points", args.cov_points),
        ("--threads", args.threads),
    ):
        if value is not None and value < 1:  # a usage error, not a traceback or inf / nan after the run
            parser.error(f"{option} must be at least 1, got {value}")
    benchmarks = [
        option
        for option, on in (
            ("--predict", args.predict),
            ("--posterior", args.posterior),
            ("--rank", args.rank),
            ("--slope", args.slope),
        )
        if on
    ]
    if len(benchmarks) > 1:  # --predict ran alone, ignoring the others (and --posterior ignored --rank / --slope)
        parser.error(f"{' and '.join(benchmarks)} are different benchmarks; pass one")
    if not 0 <= args.rank <= min(args.ks):  # was GroupKernel's ValueError after the data were made
        parser.error(f"--rank must be between 0 and the smallest of --ks ({min(args.ks)}), got {args.rank}")
    benchmark = "--predict" if args.predict else "--posterior" if args.posterior else None
    for option, given, belongs in (  # an option of another benchmark was ignored without a word
        ("--only", args.only is not None, None),
        ("--repeats", args.repeats is not None, None),
        ("--max-draw-q", args.max_draw_q is not None, "--posterior"),
        ("--t", args.t is not None, "--predict"),
        ("--cov-points", args.cov_points is not None, "--predict"),
        ("--no-before", args.no_before, "--predict"),
    ):
        if given and belongs != benchmark:
            timed_by = belongs or "the iteration benchmarks (default, --rank, --slope)"
            parser.error(f"{option} is an option of {timed_by}; {benchmark or 'this run'} would ignore it")
    if args.predict and min(args.ks) <= 20:  # the last 20 groups are held out of training: was a torch traceback
        parser.error(f"--ks: with --predict every k must be above 20 (20 groups are never seen), got {min(args.ks)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    n, ks, only, repeats = args.n, args.ks, args.only or "both", args.repeats or 2
    if args.predict:
        records = run_prediction(n, ks, args.t or 2000, args.cov_points or 2000, not args.no_before)
        print(f"# peak RSS of the process {max(r['closed_peak_rss_mb'] for r in records) / 1024:.2f} GB")
        return 0
    if args.posterior:
        records = run_posterior(n, ks, 6000 if args.max_draw_q is None else args.max_draw_q)
        print(f"# peak RSS of the process {records[-1]['peak_rss_mb'] / 1024:.2f} GB")
        return 0
    if args.rank or args.slope:
        paths = {"both": ["factor", "dense"], "elementwise": ["factor"], "general": ["dense"]}[only]
        records = run_factor(n, ks, args.rank, paths, repeats)
        print(f"# peak RSS of the process {records[-1]['peak_rss_mb'] / 1024:.2f} GB")
        return 0
    paths = {"both": ["elementwise", "general"], "elementwise": ["elementwise"], "general": ["general"]}[only]
    records = []
    for k in ks:
        rec = {"bench": "group_iteration", "n": n, "k": k, "dtype": "float32", "threads": torch.get_num_threads()}
        for path in paths:
            seconds, loss = iteration_seconds(n, k, path == "general", repeats)
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
