"""The data of a ``bma-gp`` run: loading (bundled CO2 or a CSV), subsampling, the train/test split
and the standardisation the models see.

Grouping columns (``--group``) are read as labels, not numbers: a column whose every cell is a
number must hold whole numbers (``3`` and ``3.0`` are one level; read exactly, so long ids keep
every digit), any other column is text (each distinct string is a level). The split encodes the
levels that occur in the *training* rows as ids ``0 .. G-1`` (in sorted label order); a level seen
only in held-out rows gets the id ``G``, a level unknown to the model, whose predicted effect is 0
with the group's prior variance (what lme4's ``predict(..., allow.new.levels = TRUE)`` gives).
"""

from __future__ import annotations

import decimal
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from bma_gp.cli.config import PROG, RunConfig, UsageError
from bma_gp.datasets import (  # the CSV rules load_csv applies
    _MISSING,
    DatasetError,
    MissingValuesWarning,
    _column_list,
    _convert_column,
    _decimal_year,
    _did_you_mean,
    _header_hint,
    _not_a_file,
    _not_utf8,
    _parse_number,
    _read_table,
    _refuse_unnamed_inputs,
    _table_to_tensors,
    load_co2,
)

__all__ = ["Dataset", "Problem", "load_dataset", "split", "subsample"]

_Label = TypeVar("_Label", int, str)  # a group label: a whole number or a text


@dataclass
class Dataset:
    """The rows of a run before the split: inputs ``x`` (n, d), targets ``y`` (n,) and, with groupings,
    one level code per row and grouping in ``group_codes`` (n, J) (``group_labels[j][c]`` is the label of
    code ``c`` of grouping ``j``; the codes index all levels of the file, the split re-encodes them).

    ``x`` and ``y`` are float64 whatever ``--dtype``: :func:`split` standardises them in float64 and only then
    casts to ``dtype``, so float32 keeps the resolution of columns far from 0 (date-times as decimal years,
    whose float32 step near the year 2000 is about an hour). ``date_columns`` names the features read from dates."""

    name: str
    feature_names: list[str]
    target_name: str
    x: Tensor
    y: Tensor
    group_names: list[str] = field(default_factory=list)
    group_labels: list[list[int] | list[str]] = field(default_factory=list)
    group_codes: Tensor | None = None  # LongTensor (n, J); None without groupings
    dtype: torch.dtype = torch.float64  # the models' dtype (--dtype): what split casts to
    date_columns: list[str] = field(default_factory=list)


@dataclass
class Problem:
    """A standardised train/test split and what is needed to undo the scaling.

    The columns of ``x_train`` and ``x_test`` are the standardised features, then one column of
    group ids per grouping (whole numbers as floats: ``0 .. G_j - 1`` for the levels of the training
    rows, ``G_j`` for a level seen only in held-out rows).
    """

    name: str
    feature_names: list[str]
    target_name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_mean: Tensor  # the training statistics, in float64 whatever the models' dtype
    x_scale: Tensor
    y_mean: float
    y_scale: float
    group_names: list[str] = field(default_factory=list)
    group_levels: list[list[int] | list[str]] = field(default_factory=list)  # training levels, in id order
    test_only: list[tuple[int, int]] = field(default_factory=list)  # per grouping: (levels, held-out rows)

    @property
    def num_features(self) -> int:
        """The number of smooth input columns (the group id columns follow them)."""
        return len(self.feature_names)

    @property
    def num_levels(self) -> list[int]:
        """``G_j``: the levels of each grouping in the training rows."""
        return [len(levels) for levels in self.group_levels]

    def x_original(self, x: Tensor) -> Tensor:
        """The feature columns of ``x`` in their original units (group id columns dropped), in float64 whatever
        the dtype of ``x``: in float32 decimal years near 2000 would be rounded to about an hour."""
        return x[..., : self.num_features].double() * self.x_scale + self.x_mean

    def y_original(self, y: Tensor) -> Tensor:
        """``y`` in the target's original units, in float64 (as :meth:`x_original`)."""
        return y.double() * self.y_scale + self.y_mean

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
        if config.groups:
            raise UsageError("--group needs --data: the bundled CO2 series has no grouping columns")
        x, y = load_co2(dtype=torch.float64)
        return Dataset(
            "bundled Mauna Loa CO2 (weekly, 1958-2001)",
            ["date"],
            "co2",
            x,
            y,
            dtype=config.dtype,
            date_columns=["date"],
        )
    if config.target is None:
        raise UsageError("--data needs --target COL, the column to predict")
    features = None if config.features is None else list(config.features)
    table = _read_csv_table(config.data)
    description = f"CSV file {config.data!r}"
    if config.groups:
        features = _group_features(table[0], config, features)
        if config.features is None:  # the reader is given these features: it cannot check the default ones
            try:
                _refuse_unnamed_inputs(table[0], table[1], features, f"CSV file {config.data!r}")
            except DatasetError as err:
                raise UsageError(str(err)) from err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingValuesWarning)
        try:
            # read as load_csv reads, in float64 whatever --dtype (split casts after standardising)
            x, y, names = _table_to_tensors(*table, config.target, features, torch.float64, description, warn=True)
            if config.dtype != torch.float64 and not bool(
                torch.isfinite(torch.cat([x, y[:, None]], -1).to(config.dtype)).all()
            ):
                # a cell beyond the range of --dtype: the reader in that dtype names its column, row and cell
                _table_to_tensors(*table, config.target, features, config.dtype, description, warn=False)
                raise RuntimeError(f"a value of {description} overflows {config.dtype}")  # pragma: no cover
        except DatasetError as err:
            raise UsageError(str(err)) from err
    for warning in caught:
        if issubclass(warning.category, MissingValuesWarning):
            print(f"{PROG}: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    dataset = Dataset(
        os.path.basename(config.data),
        names,
        config.target,
        x,
        y,
        dtype=config.dtype,
        date_columns=_date_columns(table, names),
    )
    if config.groups:
        _add_groups(dataset, table, config.groups)
    return dataset


def _date_columns(table: tuple[list[str], list[list[str]], list[int]], names: list[str]) -> list[str]:
    """The columns of ``names`` that were read as dates: their first present cell is one (a column of dates
    holds nothing else)."""
    header, rows, _ = table
    position = {name: index for index, name in enumerate(header)}
    dates = []
    for name in names:
        cells = (row[position[name]].strip() for row in rows)
        first = next((cell for cell in cells if cell.lower() not in _MISSING), None)
        if first is not None and _decimal_year(first) is not None:
            dates.append(name)
    return dates


# ---------------------------------------------------------------------------- grouping columns
def _read_csv_table(path: str) -> tuple[list[str], list[list[str]], list[int]]:
    """The header, the data rows and their numbers in the CSV file, read as :func:`~bma_gp.datasets.load_csv`
    reads them."""
    description = f"CSV file {path!r}"
    if not os.path.isfile(path):
        raise UsageError(_not_a_file(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as source:
            return _read_table(source, description)
    except UnicodeDecodeError:
        raise UsageError(_not_utf8(path, description)) from None
    except DatasetError as err:
        raise UsageError(str(err)) from err
    except OSError as err:
        raise UsageError(_cannot_read(path, err)) from err


def _cannot_read(path: str, err: OSError) -> str:
    return f"data file {path!r} cannot be read ({err.strerror or err}); check its permissions or pass another --data"


def _group_features(header: list[str], config: RunConfig, features: list[str] | None) -> list[str]:
    """Check that the ``--group`` columns exist; the smooth features (default: every other column)."""
    missing = [name for name in config.groups if name not in header]
    if missing:
        raise UsageError(
            f"CSV file {config.data!r} has no column(s) {', '.join(map(repr, missing))} (given to --group); "
            f"available columns: {_column_list(header)}." + _did_you_mean(header, missing) + _header_hint(header)
        )
    if features is None:
        features = [name for name in header if name != config.target and name not in config.groups]
        if not features:
            raise UsageError(
                f"CSV file {config.data!r} has no input columns besides the target {config.target!r} and the "
                f"--group columns; the models need at least one smooth input"
            )
    return features


def _add_groups(dataset: Dataset, table: tuple[list[str], list[list[str]], list[int]], groups: tuple[str, ...]) -> None:
    """Read the ``groups`` columns of the rows ``load_csv`` kept into ``dataset`` (labels and codes)."""
    header, rows, numbers = table
    description = f"CSV file {dataset.name!r}"
    # the rows load_csv kept: those without a missing value in a feature or the target
    used = [*dataset.feature_names, dataset.target_name]
    complete = torch.ones(len(rows), dtype=torch.bool)
    position = {name: index for index, name in enumerate(header)}  # header.index per column: quadratic when wide
    for name in used:
        index = position[name]
        complete &= ~torch.tensor(_convert_column(name, [row[index] for row in rows], description, numbers)).isnan()
    kept = complete.nonzero().squeeze(-1).tolist()
    if len(kept) != len(dataset.y):  # pragma: no cover - load_csv and this module disagree on the rows
        raise RuntimeError(f"the CSV reader kept {len(dataset.y)} rows, the group reader {len(kept)}")
    codes, labels = [], []
    for name in groups:
        index = position[name]
        cells = [rows[r][index].strip() for r in kept]
        column_labels, column_codes = _encode_labels(name, cells, [numbers[r] for r in kept])
        labels.append(column_labels)
        codes.append(column_codes)
    dataset.group_names = list(groups)
    dataset.group_labels = labels
    dataset.group_codes = torch.stack(codes, dim=-1)


def _encode_labels(name: str, cells: list[str], rows: list[int]) -> tuple[list[int] | list[str], Tensor]:
    """The levels of one grouping column (sorted) and each cell's code; ``rows`` are the cells' data row numbers.

    Raises:
        UsageError: a missing cell, or a numeric column with a number that is not whole.
    """
    absent = [r for r, cell in zip(rows, cells) if cell.lower() in _MISSING]
    if absent:
        raise UsageError(
            f"--group column {name!r} has {len(absent)} missing value(s) (first in data row {absent[0]}); "
            "every row needs a group label: fill them in or remove those rows"
        )
    numbers: list[int | None] = []
    for cell in cells:
        try:
            numbers.append(_whole_number(cell))
        except ValueError:
            break
    if len(numbers) == len(cells):  # a numeric column: whole numbers are the labels
        whole: list[int] = []
        for r, cell, number in zip(rows, cells, numbers):
            if number is None:
                raise UsageError(
                    f"--group column {name!r} holds {cell!r} (data row {r}): group labels must be whole "
                    "numbers or text. A continuous column is an input: give it with --features instead"
                )
            whole.append(number)
        return _sorted_codes(whole)
    return _sorted_codes(cells)


def _whole_number(cell: str) -> int | None:
    """The exact whole number ``cell`` spells (``3``, ``03``, ``3.0``, ``3e2``), or None for a number that is
    not whole (or not finite).

    Read exactly: an integer is parsed with ``int`` (no rounding, however many digits, so distinct ids stay
    distinct), any other number's digits with :class:`~decimal.Decimal` (``float`` rounds above 2**53).

    Raises:
        ValueError: ``cell`` is not a number (the column is then text).
    """
    value = _parse_number(cell)  # raises ValueError for text, and for 1_11, which int and float read as 111
    try:
        return int(cell)
    except ValueError:
        pass
    if not math.isfinite(value):  # bounds the size of the int below
        return None
    try:
        number = decimal.Decimal(cell)
    except decimal.InvalidOperation:  # pragma: no cover - a spelling float reads and Decimal does not
        return None
    return int(number) if number == number.to_integral_value() else None


def _sorted_codes(labels: list[_Label]) -> tuple[list[_Label], Tensor]:
    """The distinct ``labels`` in sorted order, and the position of each label among them."""
    levels = sorted(set(labels))
    code = {level: i for i, level in enumerate(levels)}
    return levels, torch.tensor([code[label] for label in labels], dtype=torch.long)


def subsample(dataset: Dataset, max_rows: int | None, generator: torch.Generator) -> Dataset:
    """At most ``max_rows`` random rows, kept in their original order (all rows when None)."""
    if max_rows is None or len(dataset.y) <= max_rows:
        return dataset
    keep = torch.randperm(len(dataset.y), generator=generator)[:max_rows].sort().values
    codes = dataset.group_codes
    return Dataset(
        dataset.name,
        dataset.feature_names,
        dataset.target_name,
        dataset.x[keep],
        dataset.y[keep],
        dataset.group_names,
        dataset.group_labels,
        None if codes is None else codes[keep],
        dataset.dtype,
        dataset.date_columns,
    )


def split(
    dataset: Dataset, fraction: float, mode: str, generator: torch.Generator, *, available: int | None = None
) -> Problem:
    """Hold out ``fraction`` of the rows (random ones, or with ``mode="last"`` those with the largest
    first input) and standardise inputs and targets with the training statistics.

    ``available``: the usable rows before ``--max-rows`` subsampled them (default: those of ``dataset``); when it
    is larger, a message about too few rows says to raise ``--max-rows``.

    The statistics and the standardisation are computed in float64 and only the standardised values are cast
    to ``dataset.dtype``: cast first, float32 rounds date-times (decimal years near 2000) to about an hour and
    other columns far from 0 alike. A date column whose distinct times still merge in ``dataset.dtype`` after
    standardising is reported on standard error.

    Group levels are encoded from the training rows (see the module docstring); the id columns
    follow the features in ``x_train`` and ``x_test``.

    Raises:
        UsageError: too few rows, or an input column or target that is constant on the training rows (all its
            values equal), too wide to standardise (its mean or standard deviation overflows the dtype) or too
            narrow (distinct values whose standard deviation underflows to 0).
    """
    x, y, features, target = dataset.x.double(), dataset.y.double(), dataset.feature_names, dataset.target_name
    dtype = dataset.dtype
    n = len(y)
    n_test = int(round(fraction * n))
    if n - n_test < 2 or n_test < 1:
        raise UsageError(_too_few_rows(n, n_test, fraction, n if available is None else available))
    if mode == "random":
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.argsort(x[:, 0], stable=True)
        order = torch.cat([order[: n - n_test][torch.randperm(n - n_test, generator=generator)], order[n - n_test :]])
    train, test = order[: n - n_test], order[n - n_test :]
    x_mean, x_scale = x[train].mean(0), x[train].std(0)
    # the CSV loader keeps only finite cells, but their mean or spread can still overflow float64
    too_wide = [features[i] for i in range(x.shape[-1]) if not (x_mean[i].isfinite() and x_scale[i].isfinite())]
    if too_wide:
        raise UsageError(
            f"input column(s) {', '.join(map(repr, too_wide))} span too wide a range to standardise on the "
            f"training rows (their mean or standard deviation overflows {x.dtype}); rescale them, or leave "
            "them out with --features"
        )
    # constant: every training value equal (the standard deviation of equal values can round to 1e-17, and that of
    # distinct values around 1e-301 underflows to 0: neither says whether the column is constant)
    same = (x[train] == x[train][:1]).all(0)
    constant = [features[i] for i in range(x.shape[-1]) if same[i]]
    if constant:
        raise UsageError(
            f"input column(s) {', '.join(map(repr, constant))} are constant on the training rows; "
            "leave them out with --features"
        )
    too_narrow = [features[i] for i in range(x.shape[-1]) if not x_scale[i] > 0]
    if too_narrow:
        raise UsageError(
            f"input column(s) {', '.join(map(repr, too_narrow))} hold different values on the training rows, but "
            f"so close together that their standard deviation underflows {x.dtype} to 0 (values near "
            f"{_magnitude(x[train][:, features.index(too_narrow[0])])}); rescale them (multiply by a power of ten), "
            "or leave them out with --features"
        )
    y_mean, y_scale = float(y[train].mean()), float(y[train].std())
    if not (math.isfinite(y_mean) and math.isfinite(y_scale)):
        raise UsageError(
            f"the target column {target!r} spans too wide a range to standardise on the training rows (its mean "
            f"or standard deviation overflows {y.dtype}); rescale it"
        )
    if bool((y[train] == y[train][0]).all()):
        raise UsageError(f"the target column {target!r} is constant on the training rows: nothing to model")
    if not y_scale > 0:
        raise UsageError(
            f"the target column {target!r} holds different values on the training rows, but so close together that "
            f"their standard deviation underflows {y.dtype} to 0 (values near {_magnitude(y[train])}); rescale it "
            "(multiply by a power of ten)"
        )
    x_train, x_test = (x[train] - x_mean) / x_scale, (x[test] - x_mean) / x_scale
    _warn_if_times_merge(dataset, torch.cat([x_train, x_test]))
    x_train, x_test = x_train.to(dtype), x_test.to(dtype)
    levels: list[list[int] | list[str]] = []
    test_only: list[tuple[int, int]] = []
    if dataset.group_codes is not None:
        ids_train, ids_test = [], []
        for j, labels in enumerate(dataset.group_labels):
            seen, train_ids = torch.unique(dataset.group_codes[train, j], sorted=True, return_inverse=True)
            lookup = torch.full((len(labels),), len(seen), dtype=torch.long)  # unseen levels: id G
            lookup[seen] = torch.arange(len(seen))
            test_ids = lookup[dataset.group_codes[test, j]]
            new_rows = test_ids == len(seen)
            levels.append([labels[c] for c in seen.tolist()])
            test_only.append((int(dataset.group_codes[test, j][new_rows].unique().numel()), int(new_rows.sum())))
            ids_train.append(train_ids)
            ids_test.append(test_ids)
        x_train = torch.cat([x_train, torch.stack(ids_train, -1).to(dtype)], dim=-1)
        x_test = torch.cat([x_test, torch.stack(ids_test, -1).to(dtype)], dim=-1)
    return Problem(
        name=dataset.name,
        feature_names=features,
        target_name=target,
        x_train=x_train,
        y_train=((y[train] - y_mean) / y_scale).to(dtype),
        x_test=x_test,
        y_test=((y[test] - y_mean) / y_scale).to(dtype),
        x_mean=x_mean,  # float64: undoing the standardisation in the models' dtype would round as casting did
        x_scale=x_scale,
        y_mean=y_mean,
        y_scale=y_scale,
        group_names=list(dataset.group_names),
        group_levels=levels,
        test_only=test_only,
    )


def _magnitude(values: Tensor) -> str:
    """The order of magnitude of the largest of ``values``, for a message (``1e-301``)."""
    largest = float(values.abs().max())
    return f"1e{math.floor(math.log10(largest))}" if largest > 0 else "0"


def _too_few_rows(n: int, n_test: int, fraction: float, available: int) -> str:
    """The message for ``n`` rows that ``--test-fraction`` cannot split into ``n_test >= 1`` held-out rows and at
    least 2 training rows; ``available > n``: ``--max-rows`` left out the other usable rows."""
    subsampled = available > n
    if n < 3:
        if subsampled:
            return (
                f"argument --max-rows: {n} of the {available} usable rows are too few to train on 2 and hold out 1 "
                "for testing; raise --max-rows to at least 3"
            )
        return f"the data have {n} usable row(s): too few to train on 2 and hold out 1 for testing; add rows"
    rows = f"the {n} rows of --max-rows {n} (of {available} usable)" if subsampled else f"the {n} usable rows"
    more_rows = ", or raise --max-rows" if subsampled else ""
    if n_test < 1:
        return (
            f"argument --test-fraction: {fraction:g} of {rows} holds out none for testing; "
            f"raise it to at least {1 / n:.3g}{more_rows}"
        )
    return (
        f"argument --test-fraction: {fraction:g} of {rows} holds out {n_test} and leaves {n - n_test} to train on, "
        f"fewer than 2; lower it{more_rows}"
    )


def _warn_if_times_merge(dataset: Dataset, standardised: Tensor) -> None:
    """Say on standard error when a date column's distinct standardised times (float64) become fewer values in
    ``dataset.dtype``: times closer than about 1e-7 of the column's spread in float32."""
    if dataset.dtype == torch.float64:
        return
    for j, name in enumerate(dataset.feature_names):
        if name not in dataset.date_columns:
            continue
        column = standardised[:, j]
        distinct, rounded = column.unique().numel(), column.to(dataset.dtype).unique().numel()
        if rounded < distinct:
            print(
                f"{PROG}: warning: column {name!r} holds times that {dataset.dtype} cannot tell apart even after "
                f"standardising: {distinct} distinct times became {rounded} values; use --dtype float64",
                file=sys.stderr,
            )
