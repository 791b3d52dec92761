"""The report of a ``bma-gp`` run: the table on standard output, ``results.json`` and ``fits.png``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from bma_gp.cli.config import RunConfig
from bma_gp.cli.data import Problem
from bma_gp.cli.models import Fit

__all__ = ["format_table", "group_terms", "plot", "summary", "write_summary"]


def format_table(fits: list[Fit], target: str, groups: Sequence[str] = ()) -> str:
    """The results as a text table: method, k, timings, RMSE and NLPD, with groupings one fitted
    variance column ``var(g)`` per grouping ``g``; then notes on the units and the groupings."""
    header = ("method", "k", "train [s]", "predict [s]", "RMSE", "NLPD", *(f"var({g})" for g in groups))
    rows = [
        (
            fit.method,
            "-" if fit.k is None else str(fit.k),
            f"{fit.train_seconds:.2f}",
            f"{fit.predict_seconds:.3f}",
            f"{fit.rmse:.4g}",
            f"{fit.nlpd:.4g}",
            *(f"{fit.group_variances[g]:.4g}" for g in groups),
        )
        for fit in fits
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    rule = "-" * len(line(header))
    notes = [
        f"k: blocks (blockmean) or inducing points (sgpr).  RMSE and NLPD on held-out rows, in units of {target!r}."
    ]
    if groups:
        notes.append(
            f"Every model adds {group_terms(groups)}: one random intercept per level; var(g) is its fitted "
            f"variance, in units of {target!r} squared."
        )
    return "\n".join([line(header), rule, *map(line, rows), rule, *notes])


def group_terms(groups: Sequence[str]) -> str:
    """The groupings as lme4 writes them: ``(1 | school) + (1 | class)``."""
    return " + ".join(f"(1 | {g})" for g in groups)


def summary(config: RunConfig, problem: Problem, kernel_kind: str, fits: list[Fit]) -> dict:
    """What ``results.json`` holds: the data, the settings and each method's results."""
    return {
        "data": problem.name,
        "target": problem.target_name,
        "features": problem.feature_names,
        "groups": problem.group_names,
        "group_levels": {  # labels[i]: the CSV's label of id i (ints stay ints, text stays text)
            name: {
                "train_levels": len(labels),
                "test_only_levels": new_levels,
                "test_only_rows": new_rows,
                "labels": list(labels),
            }
            for name, labels, (new_levels, new_rows) in zip(
                problem.group_names, problem.group_levels, problem.test_only
            )
        },
        "n_train": len(problem.y_train),
        "n_test": len(problem.y_test),
        "split": config.split,
        "test_fraction": config.test_fraction,
        "max_rows": config.max_rows,
        "kernel": kernel_kind,
        "period": config.period,
        "blocks": config.blocks,
        "partition": config.partition,
        "iters": config.iters,
        "lr": config.lr,
        "max_cholesky": config.max_cholesky,
        "device": str(config.device),
        "dtype": config.dtype_name,
        "seed": config.seed,
        "results": [
            {
                "method": f.method,
                "k": f.k,
                "train_seconds": f.train_seconds,
                "predict_seconds": f.predict_seconds,
                "rmse": f.rmse,
                "nlpd": f.nlpd,
                "final_train_loss": f.final_loss,
                "group_variances": f.group_variances,
            }
            for f in fits
        ],
    }


def write_summary(data: dict, out: str) -> str:
    """Write ``data`` to ``out/results.json`` as strict JSON; returns the path.

    JSON has no NaN or infinity: a float that is not finite (the training loss of ``--iters 0``)
    is written as ``null``.
    """
    path = os.path.join(out, "results.json")
    text = json.dumps(_finite_or_none(data), indent=2, allow_nan=False)  # whole, before the file is opened
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    return path


def _finite_or_none(value: object) -> object:
    """``value`` with every float that is not finite, in nested dicts, lists and tuples, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def plot(problem: Problem, fits: list[Fit], grid: Tensor | None, path: str) -> None:
    """Write the figure to ``path``: each fit with its +-2 sd band over ``grid`` and a zoom (one input
    column), or predicted against observed held-out values (several input columns)."""
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
        zoom = (
            (hi - 0.08 * (hi - lo), hi)
            if len(x_test) and float(x_test.min()) > float(x_train.max())
            else (lo + 0.46 * (hi - lo), lo + 0.54 * (hi - lo))
        )
        for row, fit in enumerate(fits):
            colour = colours[fit.method]
            if fit.grid_mean is None or fit.grid_std is None:
                raise ValueError(f"the {fit.method} fit has no predictions on the grid; pass the grid to fit()")
            lower, upper = fit.grid_mean - 2 * fit.grid_std, fit.grid_mean + 2 * fit.grid_std
            for col, ax in enumerate(axes[row]):
                ax.plot(x_train[:, 0], y_train, ".", ms=2, color="0.55", label="train")
                ax.plot(x_test[:, 0], y_test, ".", ms=3, color="crimson", label="held out")
                ax.plot(g, fit.grid_mean, "-", lw=1, color=colour, label="mean")
                ax.fill_between(
                    g,
                    lower,
                    upper,
                    color=colour,
                    alpha=0.25,
                    lw=0,
                    label=r"$\pm 2$ sd",
                )
                if col == 1:
                    ax.set_xlim(*zoom)
                    inside = (x_train[:, 0] >= zoom[0]) & (x_train[:, 0] <= zoom[1])
                    inside_test = (x_test[:, 0] >= zoom[0]) & (x_test[:, 0] <= zoom[1])
                    window = (g >= zoom[0]) & (g <= zoom[1])
                    values = torch.cat(
                        [
                            y_train[inside],
                            y_test[inside_test],
                            lower[window],
                            upper[window],
                        ]
                    )
                    if len(values):
                        pad = 0.05 * float(values.max() - values.min()) + 1e-9
                        ax.set_ylim(float(values.min()) - pad, float(values.max()) + pad)
                    ax.set_title("zoom", fontsize=9)
                    # a narrow window of decimal years (2000.52 .. 2000.58) read as 0.02 .. 0.08 + 2.0005e3 otherwise
                    formatter = ax.xaxis.get_major_formatter()
                    if hasattr(formatter, "set_useOffset"):  # a ScalarFormatter (not a date axis)
                        formatter.set_useOffset(False)
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
            ax.errorbar(
                y_test,
                fit.test_mean,
                yerr=2 * fit.test_std,
                fmt=".",
                ms=3,
                lw=0.6,
                color=colours[fit.method],
                ecolor=colours[fit.method],
                alpha=0.6,
            )
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_title(f"{titles[fit.method]}: RMSE {fit.rmse:.3g}, NLPD {fit.nlpd:.3g}", fontsize=10)
            ax.set_xlabel(f"observed {ylabel}")
            ax.set_ylabel(r"predicted (mean $\pm 2$ sd)")
    title = f"{problem.name}: {len(problem.y_train)} training, {len(problem.y_test)} held-out rows"
    if problem.group_names:
        title += f"; every model + {group_terms(problem.group_names)}"
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
