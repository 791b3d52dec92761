"""Audit: precision of ``GroupKernel(slope=True)`` and of the command's date columns, and the command's outputs."""

import json
import math
import os

import pytest
import torch

from bma_gp import GroupKernel
from bma_gp.cli import main, parse_config

FAST = ["--iters", "3", "--blocks", "8", "--no-progress", "--no-plot"]


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _slope_reference(S: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``[g = g'] [1, x] S [1, x']^T`` densely, in float64."""
    f1 = torch.stack([torch.ones_like(x1[:, 1]), x1[:, 1]], -1)
    f2 = torch.stack([torch.ones_like(x2[:, 1]), x2[:, 1]], -1)
    return (f1 @ S @ f2.T) * (x1[:, :1] == x2[:, 0]).to(S.dtype)


def test_group_slope_float64_covariate_with_float32_parameters_is_not_rounded():
    """A float64 covariate follows GPyTorch's promotion (LinearKernel / RBFKernel return float64 there): the
    covariance is float64 and equals the dense float64 reference; before, the covariate was rounded to float32, so
    covariates 1e-9 apart (one float32 number) gave equal variances."""
    kernel = GroupKernel(3, slope=True)  # float32 parameters
    kernel.var = torch.tensor([0.5, 2.0])
    kernel.corr = 0.3
    ids = torch.tensor([0.0, 0.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    cov = torch.tensor([1.0, 1.0 + 1e-9, 3.0, 1.0 / 3.0, 7.123456789], dtype=torch.float64) * 1000
    x = torch.stack([ids, cov], -1)
    xt = torch.tensor([[0.0, 1000.0 + 1e-6], [1.0, 2.5], [2.0, -4.0]], dtype=torch.float64)
    S = kernel.slope_covar.detach().double()  # float32 values, exactly in float64
    with torch.no_grad():
        train, cross, diag = kernel(x).to_dense(), kernel(xt, x).to_dense(), kernel(x, diag=True)
    for value in (train, cross, diag):
        assert value.dtype == torch.float64
    torch.testing.assert_close(train, _slope_reference(S, x, x), rtol=1e-12, atol=0)
    torch.testing.assert_close(cross, _slope_reference(S, xt, x), rtol=1e-12, atol=0)
    torch.testing.assert_close(diag, _slope_reference(S, x, x).diagonal(), rtol=1e-12, atol=0)
    assert train[0, 0] != train[1, 1]  # the two covariates 1e-9 apart stay apart
    # integer inputs and float32 covariates keep the parameters' dtype
    assert kernel(x.float()).to_dense().dtype == torch.float32
    assert kernel(torch.tensor([[0, 1], [1, 2]])).to_dense().dtype == torch.float32


def _half_hourly_csv(tmp_path, n=96, name="halfhourly.csv"):
    """``t``: half-hourly date-times from 2024-03-01 00:00 (float32's step near 2024 is about an hour), ``y``."""
    lines = ["t,y"]
    for i in range(n):
        day, minutes = divmod(30 * i, 24 * 60)
        lines.append(f"2024-03-{1 + day:02d} {minutes // 60:02d}:{minutes % 60:02d},{math.sin(i / 7):.6f}")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_cli_float32_standardises_date_times_in_float64(tmp_path, capsys):
    """``--dtype float32`` read the date-times in float32 before standardising: half-hourly readings became pairs
    of equal inputs. Standardised in float64 and then cast, they stay distinct and in order."""
    from bma_gp.cli.data import load_dataset, split

    path = _half_hourly_csv(tmp_path)
    config = parse_config(["--data", str(path), "--target", "y", "--dtype", "float32"])
    problem = split(load_dataset(config), 0.25, "random", torch.Generator().manual_seed(0))
    assert problem.x_train.dtype == problem.y_train.dtype == problem.x_test.dtype == torch.float32
    x = torch.cat([problem.x_train[:, 0], problem.x_test[:, 0]])
    y = torch.cat([problem.y_original(problem.y_train), problem.y_original(problem.y_test)])
    assert x.unique().numel() == 96
    # ordered as the times: sorting by x gives back the rows' order, whose targets are sin(i / 7)
    expected = torch.tensor([math.sin(i / 7) for i in range(96)])
    torch.testing.assert_close(y[x.argsort()].float(), expected, atol=1e-5, rtol=0)
    assert "cannot tell apart" not in capsys.readouterr().err
    # the whole run: no warning, and the dates still fit float32's range checks
    assert main(["--data", str(path), "--target", "y", "--dtype", "float32", *FAST, "--method", "exact"]) == 0
    assert "cannot tell apart" not in capsys.readouterr().err


def test_cli_float32_still_refuses_cells_beyond_its_range_and_warns_when_times_merge(tmp_path, capsys):
    from bma_gp.cli.data import load_dataset, split

    path = tmp_path / "big.csv"
    path.write_text("a,y\n1,2\n\n1e300,3\n4,5\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(path), "--target", "y", "--dtype", "float32", *FAST])
    assert exit_info.value.code == 2
    assert "column 'a' does not fit in torch.float32: data row 3 holds '1e300'" in capsys.readouterr().err
    # one second apart within a decade: closer than float32 resolves even after standardising
    times = ["2000-01-01 00:00:00", "2000-01-01 00:00:01", "2005-01-01 00:00:00", "2010-01-01 00:00:00"]
    path.write_text("t,y\n" + "".join(f"{t},{i}\n" for i, t in enumerate(times)), encoding="utf-8")
    config = parse_config(["--data", str(path), "--target", "y", "--dtype", "float32"])
    split(load_dataset(config), 0.25, "random", torch.Generator().manual_seed(0))
    assert "column 't' holds times that torch.float32 cannot tell apart" in capsys.readouterr().err
    config = parse_config(["--data", str(path), "--target", "y"])  # float64: no warning
    split(load_dataset(config), 0.25, "random", torch.Generator().manual_seed(0))
    assert "cannot tell apart" not in capsys.readouterr().err


def test_results_json_maps_group_ids_to_the_csv_labels(tmp_path):
    """``results.json`` gave per-grouping counts only: nothing said which label an id stood for. ``labels[i]`` is
    the label of id ``i``: text as text, whole numbers as exact JSON numbers (in numeric, not string, order)."""
    from bma_gp.cli.data import load_dataset, split

    n = 60
    schools = ["north", "East", "south", "west"]
    klasses = ["10", "9", "090071992547409921", "3.0"]  # 3.0 is the level 3; 9 sorts before 10
    lines = ["x,school,klass,y"]
    for i in range(n):
        school = "zz_new" if i >= n - 3 else schools[i % 4]  # a level only in the held-out rows (--split last)
        lines.append(f"{i / n},{school},{klasses[i % 4]},{math.sin(i) + (i % 4)}")
    path = tmp_path / "g.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["--data", str(path), "--target", "y", "--group", "school", "--group", "klass", "--split", "last"]
    assert main([*argv, *FAST, "--method", "exact", "--out", "o"]) == 0
    with open(os.path.join("o", "results.json"), encoding="utf-8") as handle:
        levels = json.load(handle)["group_levels"]
    assert levels["school"]["labels"] == ["East", "north", "south", "west"]
    assert levels["school"]["train_levels"] == 4 and levels["school"]["test_only_levels"] == 1
    assert levels["klass"]["labels"] == [3, 9, 10, 90071992547409921]
    # the ids the models saw: id i of each row is the position of the row's label in labels
    problem = split(load_dataset(parse_config(argv)), 0.2, "last", torch.Generator().manual_seed(0))
    x = problem.x_original(problem.x_train)[:, 0]
    for column, name, cells in ((1, "school", schools), (2, "klass", [10, 9, 90071992547409921, 3])):
        for value, ids in zip(x.tolist(), problem.x_train[:, column].long().tolist()):
            assert levels[name]["labels"][ids] == cells[round(value * n) % 4]


def test_cli_float32_undoes_the_standardisation_in_float64(tmp_path):
    """The plot's inputs and predictions are ``x_original`` / ``y_original`` of float32 values: multiplied back in
    float32, half-hourly date-times merged there again (and targets far from 0 lost digits)."""
    from bma_gp.cli.data import load_dataset, split
    from bma_gp.datasets import load_csv

    path = _half_hourly_csv(tmp_path)
    config = parse_config(["--data", str(path), "--target", "y", "--dtype", "float32"])
    problem = split(load_dataset(config), 0.25, "random", torch.Generator().manual_seed(0))
    years, _ = load_csv(path, "y")  # float64
    x = problem.x_original(problem.x_train)[:, 0]
    assert x.dtype == torch.float64 and x.unique().numel() == len(x)
    # each time within float32's relative step of its spread (a few seconds), not an hour
    assert float((x[:, None] - years[:, 0]).abs().min(-1).values.max()) < 5 / (365.25 * 24 * 3600)
    assert problem.y_original(problem.y_train).dtype == torch.float64


def test_help_says_the_default_features_leave_out_the_group_columns(capsys):
    """``--features``' help said the default was every column but the target, while a ``--group`` column is never
    an input (what docs/cli.md and the run do)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: every column except the target and the --group columns)" in help_text


def test_cli_warns_when_float32_predictive_variances_fall_below_the_noise(tmp_path, capsys):
    """GPyTorch's SGPR in float32 on smooth data gives predictive variances below the noise (the latent variance
    negative, clamped to 1e-6): the NLPD was in the thousands with no word of why."""
    path = tmp_path / "smooth.csv"
    path.write_text("x,y\n" + "".join(f"{i / 15},{math.sin(i / 15)}\n" for i in range(150)), encoding="utf-8")
    argv = ["--data", str(path), "--target", "y", "--no-plot", "--no-progress", "--blocks", "16", "--iters", "20"]
    assert main([*argv, "--method", "sgpr", "--dtype", "float32", "--out", "o"]) == 0
    err = capsys.readouterr().err
    assert "the sgpr GP's predictive variance is below its noise variance at" in err
    assert "use --dtype float64" in err
