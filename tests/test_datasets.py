"""The bundled CO2 series and the CSV loader: values, conversions and every error message."""

import math
import warnings

import pytest
import torch

from bma_gp.datasets import DatasetError, MissingValuesWarning, load_co2, load_csv


def _write(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_co2_matches_the_statsmodels_copy():
    t, co2 = load_co2()
    assert t.shape == (2225, 1) and co2.shape == (2225,)
    assert t.dtype == co2.dtype == torch.float64
    assert not torch.isnan(t).any() and not torch.isnan(co2).any()
    # first and last readings of the weekly record (1958-03-29 and 2001-12-29)
    assert float(co2[0]) == pytest.approx(316.1) and float(co2[-1]) == pytest.approx(371.5)
    assert float(t[0, 0]) == pytest.approx(1958 + 87 / 365)
    assert float(t[-1, 0]) == pytest.approx(2001 + 362 / 365)
    assert bool((t[1:, 0] > t[:-1, 0]).all())  # strictly increasing time
    assert 310 < float(co2.min()) and float(co2.max()) < 380
    statsmodels = pytest.importorskip("statsmodels.datasets.co2")
    reference = statsmodels.load_pandas().data["co2"].dropna().to_numpy()
    assert torch.allclose(co2, torch.tensor(reference.copy()))


def test_load_co2_dtype():
    t, co2 = load_co2(dtype=torch.float32)
    assert t.dtype == co2.dtype == torch.float32


def test_load_csv_reads_features_in_the_order_given(tmp_path):
    path = _write(tmp_path, "a,b,y\n1,10,0.5\n2,20,1.5\n3,30,2.5\n")
    x, y, names = load_csv(path, "y", ["b", "a"], return_features=True)
    assert names == ["b", "a"]
    assert torch.equal(x, torch.tensor([[10.0, 1], [20, 2], [30, 3]], dtype=torch.float64))
    assert torch.equal(y, torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64))
    x_all, _ = load_csv(path, "y")  # default: every other column, in file order
    assert torch.equal(x_all, x.flip(-1))


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_load_csv_detects_the_delimiter(tmp_path, delimiter):
    path = _write(tmp_path, f"x{delimiter}y\n1{delimiter}2\n3{delimiter}4\n")
    x, y = load_csv(path, "y")
    assert x.tolist() == [[1.0], [3.0]] and y.tolist() == [2.0, 4.0]


def test_load_csv_reads_iso_dates_as_decimal_years(tmp_path):
    path = _write(tmp_path, "when,y\n2001-01-01,1\n2001-07-02T12:00:00,2\n2004-12-31,3\n")
    x, _ = load_csv(path, "y")
    assert x[0, 0] == 2001.0
    assert float(x[1, 0]) == pytest.approx(2001 + (182 + 0.5) / 365)
    assert float(x[2, 0]) == pytest.approx(2004 + 365 / 366)  # leap year


def test_iso_date_times_with_a_space_or_a_t_and_with_or_without_seconds(tmp_path):
    cells = ["2000-01-01T10:30", "2000-01-01 10:30", "2000-01-01T10:30:00", "2000-01-01 10:30:00"]
    path = _write(tmp_path, "when,y\n" + "".join(f"{cell},{i}\n" for i, cell in enumerate(cells)))
    x, _ = load_csv(path, "y")
    assert x[:, 0].tolist() == [float(x[0, 0])] * 4
    assert float(x[0, 0]) == pytest.approx(2000 + 10.5 / 24 / 366, rel=1e-15)  # 2000 is a leap year


def test_load_csv_drops_missing_rows_with_a_warning_that_counts_them(tmp_path):
    path = _write(tmp_path, "x,y,unused\n1,2,\n,3,1\n4,NA,1\n5,6,1\n7,nan,1\n")
    with pytest.warns(MissingValuesWarning, match=r"dropped 3 of 5 rows"):
        x, y = load_csv(path, "y", ["x"])
    assert x.tolist() == [[1.0], [5.0]] and y.tolist() == [2.0, 6.0]


def test_load_csv_without_missing_values_does_not_warn(tmp_path):
    path = _write(tmp_path, "x,y\n1,2\n3,4\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_csv(path, "y")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_csv(tmp_path / "nope.csv", "y")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_csv(tmp_path, "y")


def test_missing_target_lists_the_available_columns(tmp_path):
    path = _write(tmp_path, "alpha,beta\n1,2\n")
    with pytest.raises(DatasetError, match=r"no column 'gamma'.*available columns: 'alpha', 'beta'"):
        load_csv(path, "gamma")


def test_missing_feature_lists_the_available_columns(tmp_path):
    path = _write(tmp_path, "alpha,beta\n1,2\n")
    with pytest.raises(DatasetError, match=r"no column\(s\) 'delta'.*available columns: 'alpha', 'beta'"):
        load_csv(path, "beta", ["alpha", "delta"])


def test_non_numeric_column_is_named_with_the_first_bad_cell(tmp_path):
    path = _write(tmp_path, "x,city,y\n1,Paris,2\n2,Rome,3\n")
    with pytest.raises(DatasetError, match=r"column 'city' is not numeric: data row 1 holds 'Paris'"):
        load_csv(path, "y")
    x, _ = load_csv(path, "y", ["x"])  # leaving it out works
    assert x.shape == (2, 1)


def test_non_numeric_target(tmp_path):
    path = _write(tmp_path, "x,y\n1,2\n2,high\n")
    with pytest.raises(DatasetError, match=r"column 'y' is not numeric: data row 2 holds 'high'"):
        load_csv(path, "y")


def test_mixed_dates_and_text_is_an_error(tmp_path):
    path = _write(tmp_path, "d,y\n2001-01-01,1\nyesterday,2\n")
    with pytest.raises(DatasetError, match=r"column 'd' is not numeric: data row 2 holds 'yesterday'"):
        load_csv(path, "y")


@pytest.mark.parametrize("cell", ["inf", "-Infinity", "1e999"])
@pytest.mark.parametrize("column", ["a", "y"])
def test_non_finite_cells_are_named(tmp_path, cell, column):
    rows = [["1", "2", "3"], ["2", "4", "5"], ["3", "6", "7"]]
    rows[1]["ay".index(column) * 2] = cell
    path = _write(tmp_path, "a,b,y\n" + "".join(",".join(row) + "\n" for row in rows))
    with pytest.raises(DatasetError, match=rf"column '{column}' is not finite: data row 2 holds '{cell}'"):
        load_csv(path, "y")


def test_values_beyond_the_dtype_are_named(tmp_path):
    path = _write(tmp_path, "a,y\n1,2\n1e300,3\n")
    x, _ = load_csv(path, "y")
    assert x[1, 0] == 1e300
    with pytest.raises(DatasetError, match=r"column 'a' does not fit in torch.float32: data row 2 holds '1e300'"):
        load_csv(path, "y", dtype=torch.float32)


def test_all_rows_missing(tmp_path):
    path = _write(tmp_path, "x,y\n1,\n2,NA\n")
    with pytest.raises(DatasetError, match="every row has a missing value"):
        load_csv(path, "y")


def test_columns_empty_in_every_row_are_named(tmp_path):
    # a trailing delimiter on every line (spreadsheet exports) adds an unnamed, empty column
    path = _write(tmp_path, "a,b,y,\n1,2,3,\n2,3,5,\n4,1,2,\n")
    message = (
        r"column\(s\) '' \(column 4, unnamed: a trailing delimiter\?\) are empty in every row.*"
        r"Leave them out of the features \(in bma-gp: --features a b\) or remove them from the file"
    )
    with pytest.raises(DatasetError, match=message):
        load_csv(path, "y")
    x, _ = load_csv(path, "y", ["a", "b"])
    assert x.shape == (3, 2)
    path = _write(tmp_path, "a,notes,my y\n1,,3\n2,NA,5\n", "notes.csv")
    with pytest.raises(DatasetError, match=r"column\(s\) 'notes' \(column 2\) are empty.*--features a\)"):
        load_csv(path, "my y")
    with pytest.raises(DatasetError, match=r"the target column 'notes' is empty in every row"):
        load_csv(path, "notes")
    with pytest.raises(DatasetError, match=r"column\(s\) 'notes' \(column 2\) are empty.*--features 'my y'\)"):
        load_csv(path, "a", ["notes", "my y"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("x,y\n", "no data rows"),
        ("x,y\n1,2,3\n", "data row 1 has 3 fields but the header has 2"),
        ("x,x,y\n1,2,3\n", r"duplicated column name\(s\) \['x'\]"),
    ],
)
def test_malformed_files(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(DatasetError, match=message):
        load_csv(path, "y")


def test_target_cannot_be_a_feature_and_features_cannot_be_empty(tmp_path):
    path = _write(tmp_path, "x,y\n1,2\n")
    with pytest.raises(DatasetError, match="cannot also be a feature"):
        load_csv(path, "y", ["x", "y"])
    with pytest.raises(DatasetError, match="no feature columns"):
        load_csv(_write(tmp_path, "y\n1\n2\n", "only.csv"), "y")
    with pytest.raises(TypeError, match="target must be a column name"):
        load_csv(path, 1)
    with pytest.raises(DatasetError, match=r"feature column\(s\) 'x' requested twice"):
        load_csv(path, "y", ["x", "x"])


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("x,y\n1,\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_csv(path, "y")


def test_decimal_year_is_monotone_over_a_year_boundary(tmp_path):
    path = _write(tmp_path, "d,y\n1999-12-31 23:00,1\n2000-01-01,2\n")
    x, _ = load_csv(path, "y")
    assert x[0, 0] < x[1, 0] == 2000.0
    assert not math.isnan(float(x[0, 0]))
