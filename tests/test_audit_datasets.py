"""Audit of the data loaders as a user with their own CSV file would try them (bma_gp.datasets, bma_gp.cli.data)."""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

from bma_gp.datasets import DatasetError, MissingValuesWarning, load_csv


def _write(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def test_dates_of_the_year_9999_are_read(tmp_path):
    # the year's length came from 1 January of the next year, which datetime cannot form after 9999
    path = _write(tmp_path, "d,y\n9999-12-31,1\n9999-07-02 12:00,2\n2000-01-01,3\n")
    x, _ = load_csv(path, "y")
    assert float(x[0, 0]) == pytest.approx(9999 + 364 / 365, rel=1e-15)
    assert float(x[1, 0]) == pytest.approx(9999 + 182.5 / 365, rel=1e-15)
    assert float(x[2, 0]) == 2000.0


@pytest.mark.parametrize(
    "cell, reason",
    [
        ("2001-02-30", r"'2001-02-30' is not a day of the calendar"),
        ("2001/13/01", r"'2001/13/01' is not a day of the calendar"),
        ("2001-07-02T10:00:00Z", r"the time 'T10:00:00Z' after the date is not one of the accepted forms"),
        ("2001-07-02 10:00:00.5", r"the time ' 10:00:00.5' after the date is not one of the accepted forms"),
    ],
)
def test_a_date_that_cannot_be_read_is_named_as_a_date(tmp_path, cell, reason):
    path = _write(tmp_path, f"d,y\n2001-01-01,1\n{cell},2\n")
    message = rf"column 'd' holds a date that cannot be read: data row 2 holds .*{reason}"
    with pytest.raises(DatasetError, match=message):
        load_csv(path, "y")
    # text that only starts with digits is still "not numeric"
    path = _write(tmp_path, "d,y\n2001-01-01,1\n2020-12-345,2\n", "other.csv")
    with pytest.raises(DatasetError, match=r"column 'd' is not numeric: data row 2 holds '2020-12-345'"):
        load_csv(path, "y")


@pytest.mark.parametrize(
    "cell, dtype, message",
    [
        ("Paris", torch.float64, r"column 'a' is not numeric: data row 2 holds 'Paris'"),
        ("inf", torch.float64, r"column 'a' is not finite: data row 2 holds 'inf'"),
        ("2001-02-30", torch.float64, r"column 'a' holds a date that cannot be read: data row 2 holds '2001-02-30'"),
        ("1e300", torch.float32, r"column 'a' does not fit in torch.float32: data row 2 holds '1e300'"),
    ],
)
def test_cell_errors_name_the_file(tmp_path, cell, dtype, message):
    # a user loading several files could not tell from the message which one holds the cell
    path = _write(tmp_path, f"a,y\n1,2\n{cell},3\n", "measurements.csv")
    with pytest.raises(DatasetError, match=rf"^CSV file '[^']*measurements\.csv': {message}"):
        load_csv(path, "y", dtype=dtype)


def test_blank_lines_before_the_header_are_skipped(tmp_path):
    # the first (blank) line was taken as a header of no columns: "data row 1 has 2 fields but the header has 0 ()"
    path = _write(tmp_path, "\r\n\n  \na;y\n1;2\n\n3;4\n")
    x, y = load_csv(path, "y")
    assert x.tolist() == [[1.0], [3.0]] and y.tolist() == [2.0, 4.0]
    with pytest.raises(DatasetError, match=r"'[^']*only\.csv' has no header line: every line is blank"):
        load_csv(_write(tmp_path, "\n , \n,\n", "only.csv"), "y")


def test_a_line_of_spaces_does_not_hide_the_delimiter(tmp_path):
    # the sniffer saw no delimiter on the line of spaces, fell back to commas and read one column 'a;y'
    path = _write(tmp_path, "a;y\n1;2\n   \n3;4\n")
    x, y = load_csv(path, "y")
    assert x.tolist() == [[1.0], [3.0]] and y.tolist() == [2.0, 4.0]


def test_features_by_position_and_open_files_are_type_errors(tmp_path):
    path = _write(tmp_path, "a,b,y\n1,2,3\n4,5,6\n")
    # a position was looked up as a name: "has no column(s) 0 (requested as features)", a DatasetError
    with pytest.raises(TypeError, match=r"features must be column names \(str\), got 0 \(int\); the columns .* 'a'"):
        load_csv(path, "y", [0])
    with pytest.raises(TypeError, match=r"features must be column names \(str\), got 1 \(int\)"):
        load_csv(path, "y", ["a", 1])
    # an open file: os.fspath's "expected str, bytes or os.PathLike object" did not say which argument
    with open(path) as file, pytest.raises(TypeError, match=r"path must be the name of a CSV file.*file\.name"):
        load_csv(file, "y")
    with open(path) as file:
        x, y = load_csv(file.name, "y")
    assert x.tolist() == [[1.0, 2.0], [4.0, 5.0]] and y.tolist() == [3.0, 6.0]
    x, _ = load_csv(str(path).encode(), "y", ("b",))  # bytes paths and tuples of names work
    assert x.tolist() == [[2.0], [5.0]]


def test_a_quote_that_is_never_closed_is_named(tmp_path, capsys):
    from bma_gp.cli import main

    # past csv's field limit (128 KiB) the reader raised a bare _csv.Error: a traceback from bma-gp
    text = 'a,y\n1,"2\n' + "".join(f"{i},{i}\n" for i in range(20000))
    path = _write(tmp_path, text, "stray_quote.csv")
    message = r"stray_quote\.csv': the record that starts on line 2 cannot be read as CSV \(field larger"
    with pytest.raises(DatasetError, match=message + r".*never closed"):
        load_csv(path, "y")
    with pytest.raises(SystemExit) as info:
        main(["--data", str(path), "--target", "y", "--no-plot", "--out", str(tmp_path / "out")])
    assert info.value.code == 2 and "cannot be read as CSV" in capsys.readouterr().err
    # a short file with the same mistake: the messages say why the row is wrong
    path = _write(tmp_path, 'a,b,y\n1,2,3\n3,"4,5\n5,6,7\n', "short.csv")
    with pytest.raises(DatasetError, match=r"data row 2 has 2 fields .*'4,5\\n5,6,7\\n'\.\.\. spans several lines"):
        load_csv(path, "y")
    path = _write(tmp_path, 'a,y\n1,2\n3,"4\n5,6\n', "short2.csv")
    with pytest.raises(DatasetError, match=r"'y' is not numeric: data row 2 holds '4\\n5,6'\.\.\., which spans"):
        load_csv(path, "y")


def test_float32_warns_when_times_merge(tmp_path):
    # decimal years near 2013 have a step of about an hour in float32: half-hourly readings became equal inputs
    cells = [f"2013-01-01 {i // 2:02d}:{30 * (i % 2):02d}" for i in range(48)]
    path = _write(tmp_path, "t,y\n" + "".join(f"{cell},{i}\n" for i, cell in enumerate(cells)))
    with pytest.warns(UserWarning, match=r"column 't' holds times that torch.float32 cannot tell apart.*48 distinct"):
        x, _ = load_csv(path, "y", dtype=torch.float32)
    assert x.dtype == torch.float32 and x.unique().numel() < 48
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, _ = load_csv(path, "y")  # float64 keeps them apart
        assert x.unique().numel() == 48
        daily = _write(tmp_path, "t,y\n" + "".join(f"2013-01-{d:02d},{d}\n" for d in range(1, 29)), "daily.csv")
        x, _ = load_csv(daily, "y", dtype=torch.float32)  # days are far apart in float32: no warning
        assert x.unique().numel() == 28


def test_a_wide_file_loads_in_linear_time(tmp_path):
    # header.count / header.index / features.count per column: 17 s for 20,000 columns and 5 rows, 29 s with features
    d = 20000
    lines = [",".join(f"c{i}" for i in range(d)) + ",y"]
    lines += [",".join(str(j + i) for i in range(d + 1)) for j in range(5)]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    start = time.perf_counter()
    x, y = load_csv(path, "y", [f"c{i}" for i in reversed(range(d))])
    elapsed = time.perf_counter() - start
    assert x.shape == (5, d) and x[2, 0] == d - 1 + 2 and y.tolist() == [d + j for j in range(5)]
    assert elapsed < 5.0, f"{elapsed:.1f} s for a 5 x {d} file"


def test_a_file_without_a_header_line_is_named_as_such(tmp_path, capsys):
    from bma_gp.cli import main

    # the first row was taken for the names: "has no column 'y'; available columns: '1.5', '2', '3'" and nothing more
    path = _write(tmp_path, "1.5,2,3\n4,5,6\n", "no_header.csv")
    hint = r"The first line, which names the columns, holds values: does the file lack a header line\?"
    with pytest.raises(DatasetError, match=r"has no column 'y' \(the target\).*" + hint):
        load_csv(path, "y")
    with pytest.raises(DatasetError, match=r"has no column\(s\) 'x' \(requested as features\).*" + hint):
        load_csv(path, "3", ["x"])
    dates = _write(tmp_path, "2001-01-01,2\n2001-01-02,5\n", "dates.csv")
    with pytest.raises(DatasetError, match=hint):
        load_csv(dates, "y")
    with pytest.raises(SystemExit):
        main(["--data", str(path), "--target", "3", "--group", "g", "--no-plot", "--out", str(tmp_path / "out")])
    assert "does the file lack a header line?" in capsys.readouterr().err
    with pytest.raises(DatasetError, match=r"no column 'y' \(the target\); available columns: 'a', '2'\.$"):
        load_csv(_write(tmp_path, "a,2\n1,2\n", "named.csv"), "y")  # a header with a name: no hint


def test_several_unnamed_columns_are_named_by_position(tmp_path):
    # two trailing delimiters: "duplicated column name(s) ['']; rename them", though nothing had a name to rename
    path = _write(tmp_path, "a,y,,\n1,2,,\n3,4,,\n")
    with pytest.raises(DatasetError, match=r"columns 3, 4 have no name \(trailing delimiters\?\); name them"):
        load_csv(path, "y")


@pytest.mark.parametrize("text, cell", [("a;y\n1,5;2\n2,5;3\n", "1,5"), ('a,y\n"1,234.5",2\n7,3\n', "1,234.5")])
def test_decimal_commas_and_thousands_separators_are_named(tmp_path, text, cell):
    # a European export (semicolons, decimal commas) was told to "use numeric columns"
    message = rf"column 'a' is not numeric: data row 1 holds '{cell}', a number with a decimal comma or a thousands"
    with pytest.raises(DatasetError, match=message + r".*decimal point"):
        load_csv(_write(tmp_path, text), "y")


def test_a_pipe_is_not_reported_as_missing(tmp_path, capsys):
    from bma_gp.cli import main

    # bma-gp --data <(zcat data.csv.gz) passes /dev/fd/63, a pipe: "data file '/dev/fd/63' does not exist"
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(FileNotFoundError, match=r"'[^']*pipe\.csv' is not a regular file but a pipe.*write the data"):
        load_csv(fifo, "y")
    for extra in ([], ["--group", "g"]):
        with pytest.raises(SystemExit):
            main(["--data", str(fifo), "--target", "y", *extra, "--no-plot", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert "is not a regular file but a pipe" in err and "does not exist" not in err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_csv(tmp_path / "missing.csv", "y")


def test_codes_with_underscores_are_text_not_numbers(tmp_path):
    from bma_gp.cli.arguments import build_parser, parse_config
    from bma_gp.cli.data import load_dataset

    # Python's int and float read 1_11 and 11_1 (block 1 plot 11, block 11 plot 1) both as 111: one merged level
    plots = ["1_11", "11_1", "2_1", "1_11", "11_1", "2_1"]
    path = _write(tmp_path, "x,plot,y\n" + "".join(f"{i / 10},{p},{i}\n" for i, p in enumerate(plots)))
    config = parse_config(["--data", str(path), "--target", "y", "--group", "plot"], build_parser())
    dataset = load_dataset(config)
    assert dataset.group_labels == [["11_1", "1_11", "2_1"]]
    assert dataset.group_codes is not None and dataset.group_codes[:, 0].tolist() == [1, 0, 2, 1, 0, 2]
    with pytest.raises(DatasetError, match=r"column 'plot' is not numeric: data row 1 holds '1_11'"):
        load_csv(path, "y")  # as an input it was the number 111
    digits = _write(tmp_path, "a,y\n\u0661\u0662,1\n3,2\n", "digits.csv")  # Arabic-Indic 12
    with pytest.raises(DatasetError, match=r"column 'a' is not numeric"):
        load_csv(digits, "y")


def test_row_numbers_count_blank_lines(tmp_path):
    from bma_gp.cli.arguments import build_parser, parse_config
    from bma_gp.cli.data import UsageError, load_dataset

    # blank lines were skipped before numbering: the 'x' four rows below the header was "data row 2"
    path = _write(tmp_path, "a,g,y\n1,u,2\n\n\n3,,x\n")
    with pytest.raises(DatasetError, match=r"column 'y' is not numeric: data row 4 holds 'x'"):
        load_csv(path, "y", ["a"])
    with pytest.raises(DatasetError, match=r"data row 3 has 1 fields but the header has 3"):
        load_csv(_write(tmp_path, "a,g,y\n1,u,2\n\n7\n", "short.csv"), "y")
    with pytest.raises(DatasetError, match=r"column 'a' does not fit in torch.float32: data row 3 holds '1e300'"):
        load_csv(_write(tmp_path, "a,y\n1,2\n\n1e300,3\n", "big.csv"), "y", dtype=torch.float32)
    path = _write(tmp_path, "a,g,y\n1,u,2\n\n\n3,,4\n\n5,2.5,6\n", "groups.csv")
    config = parse_config(["--data", str(path), "--target", "y", "--group", "g"], build_parser())
    with pytest.raises(UsageError, match=r"--group column 'g' has 1 missing value\(s\) \(first in data row 4\)"):
        load_dataset(config)
    path = _write(tmp_path, "a,g,y\n1,1,2\n\n\n3,2.5,4\n", "whole.csv")
    config = parse_config(["--data", str(path), "--target", "y", "--group", "g"], build_parser())
    with pytest.raises(UsageError, match=r"--group column 'g' holds '2.5' \(data row 4\)"):
        load_dataset(config)


def test_missing_columns_suggest_close_names_and_wide_files_list_a_few(tmp_path):
    path = _write(tmp_path, "Price,area,rooms\n1,2,3\n4,5,6\n")
    with pytest.raises(DatasetError, match=r"no column 'price' \(the target\).*'rooms'\. Did you mean 'Price'\?$"):
        load_csv(path, "price")
    with pytest.raises(DatasetError, match=r"no column\(s\) 'aera' \(requested as features\).*Did you mean 'area'\?"):
        load_csv(path, "Price", ["aera"])
    # every name of a wide file was listed: a 200 KB message
    d = 5000
    wide = _write(tmp_path, ",".join(f"c{i}" for i in range(d)) + "\n" + ",".join("1" * d) + "\n", "wide.csv")
    with pytest.raises(DatasetError) as info:
        load_csv(wide, "y")
    assert "'c29', ... and 4970 more." in str(info.value) and len(str(info.value)) < 1000


def test_spreadsheet_and_pandas_missing_values(tmp_path):
    # Excel's #N/A and pandas' <NA> (str(pd.NA)) were "not numeric"; pandas reads both as missing
    path = _write(tmp_path, "a,y\n1,2\n#N/A,3\n4,<NA>\n5,#n/a n/a\n6,7\n")
    with pytest.warns(MissingValuesWarning, match=r"dropped 3 of 5 rows"):
        x, y = load_csv(path, "y")
    assert x.tolist() == [[1.0], [6.0]] and y.tolist() == [2.0, 7.0]


def test_encoding_errors_name_the_line_and_utf16(tmp_path, capsys):
    from bma_gp.cli import main

    # "is not UTF-8 text (invalid continuation byte)": no line, no byte, and UTF-16 got the same words
    path = _write(tmp_path, "name,x,y\nZoe,1,2\nRen\xe9e,3,4\n".encode("latin-1"), "latin.csv")
    with pytest.raises(DatasetError, match=r"'[^']*latin\.csv' is not UTF-8 text: line 3 holds the byte\(s\) b'\\xe9'"):
        load_csv(path, "y", ["x"])
    for extra in ([], ["--group", "name"]):
        with pytest.raises(SystemExit):
            main(["--data", str(path), "--target", "y", *extra, "--no-plot", "--out", str(tmp_path / "out")])
        assert "line 3 holds the byte(s)" in capsys.readouterr().err
    utf16 = _write(tmp_path, "x\ty\n1\t2\n".encode("utf-16"), "unicode.txt")
    with pytest.raises(DatasetError, match=r"'[^']*unicode\.txt' is UTF-16 text, not UTF-8; save it as UTF-8"):
        load_csv(utf16, "y")


def test_an_unnamed_column_with_values_is_not_silently_an_input(tmp_path, capsys):
    from bma_gp.cli import main

    # pandas' df.to_csv(path) writes the row index as an unnamed first column; it became the first input
    path = _write(tmp_path, ",a,g,y\n0,0.5,u,1\n1,0.1,v,2\n2,0.9,u,3\n3,0.3,v,4\n", "pandas.csv")
    message = r"column 1 has no name but holds values \(such as '0'\).*row index.*--features a g\)"
    with pytest.raises(DatasetError, match=message):
        load_csv(path, "y")
    x, _ = load_csv(path, "y", ["a"])  # naming the inputs works
    assert x[:, 0].tolist() == [0.5, 0.1, 0.9, 0.3]
    with pytest.raises(SystemExit):
        main(["--data", str(path), "--target", "y", "--group", "g", "--no-plot", "--out", str(tmp_path / "out")])
    assert "column 1 has no name but holds values" in capsys.readouterr().err
