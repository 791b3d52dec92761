"""``bma-gp --group COL``: random intercepts in the command's models, and the errors for bad group columns."""

import json
import os
import warnings

import pytest
import torch
from linear_operator.utils.warnings import NumericalWarning

from bma_gp import ClosedFormFallbackWarning
from bma_gp.cli import UsageError, main, parse_config
from closed_form_guard import closed_forms_only

FAST = ["--iters", "12", "--blocks", "16", "--no-progress", "--no-plot"]


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _results(out):
    with open(os.path.join(out, "results.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _grouped_csv(tmp_path, n=240, seed=0, school=None, klass=None, name="grouped.csv"):
    """A smooth input ``x``, a text grouping ``school`` (10 levels) and an integer one ``klass`` (5
    levels) whose intercepts (sd 2 and 1) dwarf the smooth part (sd about 0.7) and the noise (0.1).

    ``school`` / ``klass``: replace that column's cells (a list of n strings)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=torch.float64) * 4
    s = torch.randint(0, 10, (n,), generator=g)
    k = torch.randint(0, 5, (n,), generator=g)
    a = 2.0 * torch.randn(10, generator=g, dtype=torch.float64)
    b = 1.0 * torch.randn(5, generator=g, dtype=torch.float64)
    y = torch.sin(2 * x) + a[s] + b[k] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    school = school or [f"s{int(v)}" for v in s]
    klass = klass or [str(int(v)) for v in k]
    lines = ["x,school,klass,y"] + [f"{float(x[i]):.6f},{school[i]},{klass[i]},{float(y[i]):.6f}" for i in range(n)]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # an option's error with argparse's usage block; one about the data in one line
    assert err.startswith("usage: bma-gp") or (err.startswith("bma-gp: error: ") and err.count("\n") == 1)
    return info.value.code, err


# ------------------------------------------------------------------------ runs
def test_group_intercepts_beat_the_same_models_without_them(tmp_path, capsys):
    data = _grouped_csv(tmp_path)
    with_groups, without = tmp_path / "with", tmp_path / "without"
    base = [*FAST, "--data", str(data), "--target", "y", "--max-rows", "200"]
    assert main([*base, "--group", "school", "--group", "klass", "--out", str(with_groups)]) == 0
    stdout = capsys.readouterr().out
    assert "(1 | school) + (1 | klass)" in stdout and "var(school)" in stdout and "var(klass)" in stdout
    assert main([*base, "--features", "x", "--out", str(without)]) == 0

    grouped, plain = _results(with_groups), _results(without)
    assert grouped["groups"] == ["school", "klass"] and plain["groups"] == []
    assert grouped["features"] == ["x"]  # the group columns are not smooth inputs
    assert grouped["n_train"] + grouped["n_test"] == 200  # --max-rows subsamples the group labels too
    assert grouped["group_levels"]["school"]["train_levels"] == 10
    assert grouped["group_levels"]["klass"]["train_levels"] == 5
    methods = [row["method"] for row in grouped["results"]]
    assert methods == [row["method"] for row in plain["results"]] == ["exact", "blockmean", "sgpr"]
    for row, reference in zip(grouped["results"], plain["results"]):
        # y has sd about 2.3, almost all of it the intercepts: without them the RMSE stays near 2.2
        assert row["rmse"] < 0.5 * reference["rmse"], (row, reference)
        assert row["nlpd"] < reference["nlpd"]
        assert set(row["group_variances"]) == {"school", "klass"}
        assert all(v > 0 for v in row["group_variances"].values())


@pytest.mark.parametrize("method", ["blockmean", "sgpr"])
def test_blockmean_and_sgpr_with_groups_stay_in_closed_form(tmp_path, method):
    # the block mean / SGPR kernel plus two GroupKernels: training and prediction without CG, Lanczos
    # or an n x n factorisation, even at --max-cholesky 0 (the exact GP is the dense path by design)
    data = _grouped_csv(tmp_path, n=150)
    argv = [*FAST, "--data", str(data), "--target", "y", "--group", "school", "--group", "klass"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        warnings.simplefilter("ignore", NumericalWarning)  # jitter on SGPR's 16 x 16 inducing matrix
        with closed_forms_only(120):  # 120 training rows
            code = main([*argv, "--method", method, "--max-cholesky", "0", "--out", str(tmp_path / "o")])
    assert code == 0
    assert _results(tmp_path / "o")["n_train"] == 120


def test_seasonal_kernel_reads_only_the_feature_column(tmp_path):
    data = _grouped_csv(tmp_path, n=100)
    out = tmp_path / "o"
    argv = ["--iters", "3", "--blocks", "8", "--no-progress", "--no-plot", "--data", str(data), "--target", "y"]
    assert (
        main(
            [*argv, "--group", "school", "--group", "klass", "--kernel", "seasonal", "--period", "3", "--out", str(out)]
        )
        == 0
    )
    assert all(torch.isfinite(torch.tensor(row["rmse"])) for row in _results(out)["results"])


def test_levels_only_in_the_test_rows_are_predicted_as_new_levels(tmp_path, capsys):
    # school s_new occurs in 30 rows: with a 40 % test split some are held out, and with
    # --split last all of them are (they have the largest x)
    n = 120
    data = _grouped_csv(tmp_path, n=n)
    lines = data.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    rows.sort(key=lambda row: float(row.split(",")[0]))
    rows = [
        ",".join([cells[0], "s_new" if i >= n - 30 else cells[1], *cells[2:]])
        for i, cells in enumerate(row.split(",") for row in rows)
    ]
    data.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    argv = [*FAST, "--data", str(data), "--target", "y", "--group", "school", "--split", "last"]
    assert main([*argv, "--test-fraction", "0.25", "--method", "sgpr", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "1 level(s) of 'school' occur only in held-out rows (30 rows)" in stdout
    assert "allow.new.levels" in stdout
    levels = _results(out)["group_levels"]["school"]
    assert levels == {
        "train_levels": 10,
        "test_only_levels": 1,
        "test_only_rows": 30,
        "labels": [f"s{i}" for i in range(10)],
    }
    row = _results(out)["results"][0]
    assert torch.isfinite(torch.tensor([row["rmse"], row["nlpd"]])).all()


def test_group_ids_are_encoded_from_the_training_rows(tmp_path):
    from bma_gp.cli.data import load_dataset, split

    # klass: whole numbers (3.0 and 3 are one level); school: text. The last row (largest x) is the
    # one held-out row of --split last, with levels (11, c) that no training row has.
    rows = [
        ("0.1", "a", "7"),
        ("0.2", "b", "3.0"),
        ("0.3", "a", "3"),
        ("0.4", "b", "7"),
        ("0.5", "a", "3"),
        ("0.6", "b", "7"),
        ("0.7", "b", "3"),
        ("0.8", "c", "11"),
    ]
    path = tmp_path / "ids.csv"
    lines = ["x,school,klass,y"] + [f"{x},{s},{k},{i * i % 5}" for i, (x, s, k) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = parse_config(["--data", str(path), "--target", "y", "--group", "klass", "--group", "school"])
    dataset = load_dataset(config)
    assert dataset.feature_names == ["x"]
    assert dataset.group_labels == [[3, 7, 11], ["a", "b", "c"]]

    problem = split(dataset, 0.125, "last", torch.Generator().manual_seed(0))
    assert problem.group_names == ["klass", "school"] and problem.num_features == 1
    assert problem.group_levels == [[3, 7], ["a", "b"]] and problem.num_levels == [2, 2]
    assert problem.test_only == [(1, 1), (1, 1)]
    assert problem.x_train.shape == (7, 3) and problem.x_original(problem.x_train).shape == (7, 1)
    # the training rows are shuffled: match them by x
    x = problem.x_original(problem.x_train)[:, 0]
    by_x = {round(float(v), 1): tuple(int(i) for i in ids) for v, ids in zip(x, problem.x_train[:, 1:])}
    expected = {0.1: (1, 0), 0.2: (0, 1), 0.3: (0, 0), 0.4: (1, 1), 0.5: (0, 0), 0.6: (1, 1), 0.7: (0, 1)}
    assert by_x == expected
    assert problem.x_test[0, 1:].tolist() == [2.0, 2.0]  # id G: a level the model has not seen


def test_long_numeric_group_ids_are_read_exactly(tmp_path):
    from bma_gp.cli.data import load_dataset

    # 17-digit ids (account numbers) differ in the last digit: above 2**53 a float would merge them
    ids = ["90071992547409921", "90071992547409922", "90071992547409923", "90071992547409924"]
    cells = [*ids, "90071992547409921.0", "90071992547409922.5e0"]  # the same level, and one that is not whole
    path = tmp_path / "ids.csv"
    path.write_text("x,id,y\n" + "".join(f"{i},{c},{i % 3}\n" for i, c in enumerate(cells[:5])), encoding="utf-8")
    dataset = load_dataset(parse_config(["--data", str(path), "--target", "y", "--group", "id"]))
    assert dataset.group_labels == [[int(i) for i in ids]]
    assert dataset.group_codes is not None and dataset.group_codes[:, 0].tolist() == [0, 1, 2, 3, 0]

    path.write_text("x,id,y\n" + "".join(f"{i},{c},{i % 3}\n" for i, c in enumerate(cells)), encoding="utf-8")
    with pytest.raises(UsageError, match=r"--group column 'id' holds '90071992547409922.5e0' \(data row 6\)"):
        load_dataset(parse_config(["--data", str(path), "--target", "y", "--group", "id"]))


def test_group_option_in_config_and_help(capsys):
    config = parse_config(["--data", "d.csv", "--target", "y", "--group", "school", "--group", "klass"])
    assert config.groups == ("school", "klass") and config.features is None
    assert parse_config(["--device", "cpu"]).groups == ()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--group COL" in capsys.readouterr().out


# ------------------------------------------------------------------------ errors: exit 2, the column named
def test_missing_group_column_lists_the_available_ones(tmp_path, capsys):
    data = _grouped_csv(tmp_path, n=20)
    code, err = _error(capsys, ["--data", str(data), "--target", "y", "--group", "room"])
    assert code == 2 and "no column(s) 'room' (given to --group)" in err and "'x', 'school', 'klass', 'y'" in err


def test_missing_values_in_a_group_column(tmp_path, capsys):
    klass = ["1"] * 20
    klass[6] = "NA"
    data = _grouped_csv(tmp_path, n=20, klass=klass)
    code, err = _error(capsys, ["--data", str(data), "--target", "y", "--features", "x", "--group", "klass"])
    assert code == 2 and "--group column 'klass' has 1 missing value(s) (first in data row 7)" in err
    assert "fill them in or remove those rows" in err


def test_non_integer_numbers_in_a_group_column(tmp_path, capsys):
    klass = [str(i % 3) for i in range(20)]
    klass[4] = "2.5"
    data = _grouped_csv(tmp_path, n=20, klass=klass)
    code, err = _error(capsys, ["--data", str(data), "--target", "y", "--group", "klass", "--group", "school"])
    assert code == 2 and "--group column 'klass' holds '2.5' (data row 5)" in err and "--features" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--group", "y"], "column 'y' is the --target"),
        (["--group", "school", "--features", "x", "school"], "column 'school' is also in --features"),
        (["--group", "school", "--group", "school"], "column 'school' is given twice"),
    ],
)
def test_group_column_that_is_also_target_feature_or_repeated(tmp_path, capsys, extra, message):
    data = _grouped_csv(tmp_path, n=20)
    code, err = _error(capsys, ["--data", str(data), "--target", "y", *extra])
    assert code == 2 and message in err


def test_group_without_data_is_an_error(capsys):
    code, err = _error(capsys, ["--group", "site"])
    assert code == 2 and "argument --group: the bundled CO2 series has no grouping columns" in err


def test_group_leaves_no_smooth_input(tmp_path, capsys):
    data = _grouped_csv(tmp_path, n=20)
    path = tmp_path / "only_groups.csv"
    path.write_text(
        "\n".join(",".join(line.split(",")[1:]) for line in data.read_text().splitlines()) + "\n", encoding="utf-8"
    )
    code, err = _error(capsys, ["--data", str(path), "--target", "y", "--group", "school", "--group", "klass"])
    assert code == 2 and "no input columns besides the target 'y' and the --group columns" in err
