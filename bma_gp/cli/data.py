"""The data of a ``bma-gp`` run: loading (bundled CO2 or a CSV), subsampling, the train/test split
and the standardisation the models see."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from bma_gp.cli.config import PROG, RunConfig, UsageError
from bma_gp.datasets import DatasetError, MissingValuesWarning, load_co2, load_csv

__all__ = ["Dataset", "Problem", "load_dataset", "split", "subsample"]


@dataclass
class Dataset:
    """The rows of a run before the split: inputs ``x`` (n, d) and targets ``y`` (n,)."""

    name: str
    feature_names: list[str]
    target_name: str
    x: Tensor
    y: Tensor


@dataclass
class Problem:
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

    def to(self, device: torch.device) -> None:
        """Move the tensors the models use to ``device`` (in place)."""
        self.x_train, self.y_train = self.x_train.to(device), self.y_train.to(device)
        self.x_test, self.y_test = self.x_test.to(device), self.y_test.to(device)
        self.x_mean, self.x_scale = self.x_mean.to(device), self.x_scale.to(device)


def load_dataset(config: RunConfig) -> Dataset:
    """The bundled CO2 series, or the CSV of ``config.data`` (missing values dropped with a warning).

    Raises:
        UsageError: the file is missing or unusable (the message says why).
    """
    if config.data is None:
        x, y = load_co2(dtype=config.dtype)
        return Dataset("bundled Mauna Loa CO2 (weekly, 1958-2001)", ["date"], "co2", x, y)
    if config.target is None:
        raise UsageError("--data needs --target COL, the column to predict")
    features = None if config.features is None else list(config.features)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingValuesWarning)
        try:
            # load_csv's annotation covers both return_features values; True gives the 3-tuple
            loaded = load_csv(config.data, config.target, features, dtype=config.dtype, return_features=True)
            x, y, names = cast(tuple[Tensor, Tensor, list[str]], loaded)
        except (FileNotFoundError, DatasetError) as err:
            raise UsageError(str(err)) from err
    for warning in caught:
        if issubclass(warning.category, MissingValuesWarning):
            print(f"{PROG}: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return Dataset(os.path.basename(config.data), names, config.target, x, y)


def subsample(dataset: Dataset, max_rows: int | None, generator: torch.Generator) -> Dataset:
    """At most ``max_rows`` random rows, kept in their original order (all rows when None)."""
    if max_rows is None or len(dataset.y) <= max_rows:
        return dataset
    keep = torch.randperm(len(dataset.y), generator=generator)[:max_rows].sort().values
    return Dataset(dataset.name, dataset.feature_names, dataset.target_name, dataset.x[keep], dataset.y[keep])


def split(dataset: Dataset, fraction: float, mode: str, generator: torch.Generator) -> Problem:
    """Hold out ``fraction`` of the rows (random ones, or with ``mode="last"`` those with the largest
    first input) and standardise inputs and targets with the training statistics.

    Raises:
        UsageError: too few rows, or a constant input column or target on the training rows.
    """
    x, y, features, target = dataset.x, dataset.y, dataset.feature_names, dataset.target_name
    n = len(y)
    n_test = int(round(fraction * n))
    if n - n_test < 2 or n_test < 1:
        raise UsageError(
            f"the data have {n} usable rows: too few to hold out {fraction:.0%} for testing "
            "and train on at least 2 (change --test-fraction or add rows)"
        )
    if mode == "random":
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.argsort(x[:, 0], stable=True)
        order = torch.cat([order[: n - n_test][torch.randperm(n - n_test, generator=generator)], order[n - n_test :]])
    train, test = order[: n - n_test], order[n - n_test :]
    x_mean, x_scale = x[train].mean(0), x[train].std(0)
    constant = [features[i] for i in range(x.shape[-1]) if not x_scale[i] > 0]
    if constant:
        raise UsageError(
            f"input column(s) {', '.join(map(repr, constant))} are constant on the training rows; "
            "leave them out with --features"
        )
    y_mean, y_scale = float(y[train].mean()), float(y[train].std())
    if not y_scale > 0:
        raise UsageError(f"the target column {target!r} is constant on the training rows: nothing to model")
    return Problem(
        name=dataset.name,
        feature_names=features,
        target_name=target,
        x_train=(x[train] - x_mean) / x_scale,
        y_train=(y[train] - y_mean) / y_scale,
        x_test=(x[test] - x_mean) / x_scale,
        y_test=(y[test] - y_mean) / y_scale,
        x_mean=x_mean,
        x_scale=x_scale,
        y_mean=y_mean,
        y_scale=y_scale,
    )
