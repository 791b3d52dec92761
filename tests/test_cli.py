"""The ``bma-gp`` command, run in-process: the bundled demo, a user CSV, and every error path."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bma_gp.cli import RunConfig, build_parser, main, parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--iters", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """The default --out is relative: keep whatever a run creates out of the checkout."""
    monkeypatch.chdir(tmp_path)


def _results(out):
    with open(os.path.join(out, "results.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _csv(tmp_path, n=120, seed=0, name="data.csv", nan_rows=()):
    """Two inputs, a smooth target, an unused text column; ``nan_rows`` get an empty target."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64) * 4
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    lines = ["u,v,label,y"]
    for i in range(n):
        target = "" if i in nan_rows else f"{float(y[i]):.6f}"
        lines.append(f"{float(x[i, 0]):.6f},{float(x[i, 1]):.6f},row{i},{target}")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _exit_code_and_message(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.err


# ------------------------------------------------------------------------ successful runs
@pytest.mark.slow
def test_bundled_co2_demo_all_methods(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*FAST, "--max-rows", "300", "--blocks", "24", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    for word in ("method", "train [s]", "predict [s]", "RMSE", "NLPD", "exact", "blockmean", "sgpr"):
        assert word in stdout
    summary = _results(out)
    assert [r["method"] for r in summary["results"]] == ["exact", "blockmean", "sgpr"]
    assert summary["n_train"] == 240 and summary["n_test"] == 60 and summary["kernel"] == "seasonal"
    for row in summary["results"]:
        assert row["train_seconds"] > 0 and row["predict_seconds"] > 0
        # co2 spans about 60 ppm; even two steps of a seasonal GP predict within a few ppm
        assert 0 < row["rmse"] < 10 and torch.isfinite(torch.tensor(row["nlpd"]))
    assert summary["results"][1]["k"] == 24 and summary["results"][2]["k"] == 24
    png = (out / "fits.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_user_csv_with_missing_values_comma_methods_and_kmeans(tmp_path, capsys):
    data = _csv(tmp_path, nan_rows=(3, 50, 51))
    out = tmp_path / "res"
    code = main(
        [
            *FAST,
            "--data",
            str(data),
            "--target",
            "y",
            "--features",
            "u",
            "v",
            "--method",
            "exact,blockmean",
            "--blocks",
            "10",
            "--out",
            str(out),
            "--seed",
            "3",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "warning: " in captured.err and "dropped 3 of 120 rows" in captured.err
    summary = _results(out)
    assert summary["features"] == ["u", "v"] and summary["kernel"] == "rbf"
    assert summary["n_train"] + summary["n_test"] == 117
    assert [r["method"] for r in summary["results"]] == ["exact", "blockmean"]
    assert summary["results"][1]["k"] == 10
    # the target has standard deviation about 0.9: a fitted GP must beat predicting the mean
    for row in summary["results"]:
        assert row["rmse"] < 0.6
    assert (out / "fits.png").read_bytes().startswith(b"\x89PNG")


def test_repeated_method_option_last_split_and_no_plot(tmp_path, capsys):
    data = _csv(tmp_path, n=60)
    out = tmp_path / "o"
    code = main(
        [
            *FAST,
            "--data",
            str(data),
            "--target",
            "y",
            "--features",
            "u",
            "--method",
            "sgpr",
            "--method",
            "exact",
            "--split",
            "last",
            "--blocks",
            "8",
            "--kernel",
            "matern",
            "--no-plot",
            "--out",
            str(out),
            "--dtype",
            "float32",
        ]
    )
    assert code == 0
    summary = _results(out)
    assert [r["method"] for r in summary["results"]] == ["exact", "sgpr"]  # canonical order
    assert summary["split"] == "last" and summary["dtype"] == "float32" and summary["n_test"] == 12
    assert not (out / "fits.png").exists()


def test_iters_zero_still_predicts(tmp_path):
    data = _csv(tmp_path, n=40)
    out = tmp_path / "o"
    assert (
        main(
            [
                "--iters",
                "0",
                "--no-progress",
                "--no-plot",
                "--data",
                str(data),
                "--target",
                "y",
                "--features",
                "u",
                "v",
                "--method",
                "blockmean",
                "--blocks",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert _results(out)["results"][0]["rmse"] > 0
    # no step, no training loss: null, not NaN (which strict JSON parsers reject)
    text = (out / "results.json").read_text(encoding="utf-8")
    assert json.loads(text, parse_constant=_reject)["results"][0]["final_train_loss"] is None


def _reject(name):
    raise ValueError(f"results.json holds {name}, which is not JSON")


def test_results_json_is_strict_json(tmp_path):
    from bma_gp.cli.report import write_summary

    data = {"a": math.nan, "b": [1.0, -math.inf, {"c": math.inf}], "d": (2, "x", None, True), "e": 0.5}
    path = write_summary(data, str(tmp_path))
    with open(path, encoding="utf-8") as handle:
        loaded = json.load(handle, parse_constant=_reject)
    assert loaded == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, "x", None, True], "e": 0.5}


@pytest.mark.slow
def test_python_dash_m_entry_point_reports_errors_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "bma_gp", "--data", str(tmp_path / "missing.csv"), "--target", "y"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "bma-gp: error:" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_command_line_becomes_a_typed_config():
    config = parse_config(
        [
            "--data",
            "d.csv",
            "--target",
            "y",
            "--features",
            "u",
            "v",
            "--method",
            "sgpr,exact",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--no-plot",
            "--blocks",
            "7",
        ]
    )
    assert isinstance(config, RunConfig)
    assert config.methods == ("exact", "sgpr") and config.features == ("u", "v") and config.blocks == 7
    assert config.dtype == torch.float32 and config.dtype_name == "float32" and config.device == torch.device("cpu")
    assert not config.plot and config.progress and config.kernel_kind() == "rbf"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.blocks = 3


def test_seed_range_is_the_32_bits_torch_keeps(capsys):
    """torch's CPU generator keeps the low 32 bits of a seed: --seed 0 and --seed 2**32 (or -2**63) gave the same
    split, inducing points and k-means, so only 0 .. 2**32 - 1 is accepted, and each of those is its own run."""
    for seed in (0, 1, 2**31, 2**32 - 1):
        assert parse_config(["--seed", str(seed), "--device", "cpu"]).seed == seed
    draws = {tuple(torch.randperm(50, generator=torch.Generator().manual_seed(s)).tolist()) for s in (0, 2**32 - 1)}
    assert len(draws) == 2
    for seed in (2**32, -1, -(2**63), 2**64 - 1):
        code, err = _exit_code_and_message(capsys, ["--seed", str(seed)])
        assert code == 2 and "argument --seed: expected an integer from 0 to 4294967295 (2**32 - 1" in err
        assert f"got {seed}" in err
    assert "from 0 to 2**32 - 1" in " ".join(build_parser().format_help().split())


def test_repeated_features_add_up_and_a_repeated_name_is_an_error(capsys):
    base = ["--data", "d.csv", "--target", "y"]
    assert parse_config([*base, "--features", "a", "--features", "b", "c"]).features == ("a", "b", "c")
    for features in (["--features", "a", "a"], ["--features", "a", "b", "--features", "a"]):
        code, err = _exit_code_and_message(capsys, [*base, *features])
        assert code == 2 and "argument --features: column 'a' is given twice; name each input column once" in err


def test_config_defaults_are_the_command_line_defaults():
    assert parse_config(["--device", "cpu"]) == RunConfig()
    assert RunConfig().kernel_kind() == "seasonal"


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--data",
        "--target",
        "--features",
        "--blocks",
        "--method",
        "--iters",
        "--device",
        "--out",
        "--seed",
        "--split",
        "--kernel",
        "--version",
    ):
        assert option in text
    assert build_parser().prog == "bma-gp"


def test_version_option_prints_the_package_version(capsys):
    import bma_gp

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"bma-gp {bma_gp.__version__}"


# ------------------------------------------------------------------------ errors: exit 2, a message, no traceback
def test_missing_file(tmp_path, capsys):
    code, err = _exit_code_and_message(capsys, ["--data", str(tmp_path / "nope.csv"), "--target", "y"])
    assert code == 2 and "does not exist" in err and "nope.csv" in err and "Traceback" not in err


def test_missing_column_lists_available_ones(tmp_path, capsys):
    data = _csv(tmp_path)
    code, err = _exit_code_and_message(capsys, ["--data", str(data), "--target", "price"])
    assert code == 2 and "no column 'price'" in err and "'u', 'v', 'label', 'y'" in err
    code, err = _exit_code_and_message(capsys, ["--data", str(data), "--target", "y", "--features", "u", "w"])
    assert code == 2 and "'w'" in err and "available columns" in err


def test_non_numeric_column_is_named(tmp_path, capsys):
    data = _csv(tmp_path)  # without --features every other column is an input, 'label' included
    code, err = _exit_code_and_message(capsys, ["--data", str(data), "--target", "y"])
    assert code == 2 and "column 'label' is not numeric" in err and "'row0'" in err


def test_all_targets_missing(tmp_path, capsys):
    data = _csv(tmp_path, n=5, nan_rows=range(5))
    code, err = _exit_code_and_message(capsys, ["--data", str(data), "--target", "y", "--features", "u"])
    assert code == 2 and "every row has a missing value" in err


def test_empty_column_is_named_with_the_fix(tmp_path, capsys):
    path = tmp_path / "trailing.csv"  # a trailing delimiter on every line: an unnamed, empty last column
    path.write_text("a,b,y,\n" + "".join(f"{i},{i * i % 7},{i % 3},\n" for i in range(10)), encoding="utf-8")
    code, err = _exit_code_and_message(capsys, ["--data", str(path), "--target", "y"])
    assert code == 2 and "column(s) '' (column 4, unnamed: a trailing delimiter?) are empty in every row" in err
    assert "(in bma-gp: --features a b) or remove them from the file" in err


def test_too_few_rows(tmp_path, capsys):
    data = _csv(tmp_path, n=2)
    code, err = _exit_code_and_message(capsys, ["--data", str(data), "--target", "y", "--features", "u"])
    assert code == 2 and "too few" in err


def test_constant_input_column(tmp_path, capsys):
    path = tmp_path / "c.csv"
    path.write_text("a,b,y\n" + "".join(f"{i},1,{i * i}\n" for i in range(10)), encoding="utf-8")
    code, err = _exit_code_and_message(capsys, ["--data", str(path), "--target", "y"])
    assert code == 2 and "'b' are constant" in err


@pytest.mark.parametrize("cell", ["inf", "1e999"])
def test_non_finite_cell_is_an_error(tmp_path, capsys, cell):
    path = tmp_path / "inf.csv"
    path.write_text("a,y\n" + "".join(f"{cell if i == 8 else i},{i % 3}\n" for i in range(10)), encoding="utf-8")
    # with the plot on: the run stops at the data, before any NaN reaches the metrics or matplotlib
    code, err = _exit_code_and_message(capsys, [*FAST, "--data", str(path), "--target", "y", "--split", "last"])
    assert code == 2 and f"column 'a' is not finite: data row 9 holds '{cell}'" in err and "Traceback" not in err
    assert not os.path.exists("bma_gp_out")


def test_input_too_wide_to_standardise(tmp_path, capsys):
    path = tmp_path / "wide.csv"
    path.write_text("a,y\n" + "".join(f"{(-1) ** i * 1e308},{i}\n" for i in range(10)), encoding="utf-8")
    code, err = _exit_code_and_message(capsys, ["--data", str(path), "--target", "y"])
    assert code == 2 and "input column(s) 'a' span too wide a range to standardise" in err
    assert "constant" not in err
    code, err = _exit_code_and_message(capsys, ["--data", str(path), "--target", "a", "--features", "y"])
    assert code == 2 and "the target column 'a' spans too wide a range" in err and "constant" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "exact,magic"], "unknown method 'magic'"),
        (["--method", ","], "no method given"),
        (["--blocks", "0"], "expected a positive integer"),
        (["--blocks", "many"], "expected a positive integer"),
        (["--iters", "-1"], "expected a non-negative integer"),
        (["--test-fraction", "1.5"], "strictly between 0 and 1"),
        (["--lr", "0"], "expected a positive number"),
        (["--device", "tpu"], "--device"),
        (["--device", "not a device"], "is not a torch device"),
        (["--target", "co2"], "need --data"),
        (["--features", "date"], "need --data"),
        (["--blocks", "5000"], "exceeds the 1780 training rows"),
        (["--kernel", "fancy"], "invalid choice"),
        (["--seed", "99999999999999999999"], "argument --seed: expected an integer from 0 to 4294967295"),
        (["--seed", str(2**64)], "4294967295 (2**32 - 1; torch's random generator keeps 32 bits"),
        (["--seed", str(-(2**63) - 1)], "argument --seed: expected an integer from 0 to"),
        (["--seed", "1.5"], "argument --seed: expected an integer"),
    ],
)
def test_bad_arguments(capsys, argv, message):
    code, err = _exit_code_and_message(capsys, argv)
    assert code == 2 and message in err and err.startswith("usage: bma-gp")


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("", encoding="utf-8")
    code, err = _exit_code_and_message(capsys, ["--out", str(target)])
    assert code == 2 and "is a file" in err


def _no_training(*args, **kwargs):
    raise AssertionError("the run trained a model although --out cannot be written")


@pytest.mark.parametrize("taken", ["results.json", "fits.png"])
def test_out_file_taken_by_a_directory_is_found_before_training(tmp_path, capsys, monkeypatch, taken):
    import bma_gp.cli.run

    fit = bma_gp.cli.run.fit
    monkeypatch.setattr(bma_gp.cli.run, "fit", _no_training)
    (tmp_path / "o" / taken).mkdir(parents=True)
    argv = [*FAST, "--data", str(_csv(tmp_path, n=20)), "--target", "y", "--features", "u", "--blocks", "4"]
    argv += ["--out", "o"]
    code, err = _exit_code_and_message(capsys, argv)
    assert code == 2 and f"argument --out: 'o/{taken}' is a directory" in err and "Traceback" not in err
    if taken == "fits.png":  # only a problem when the plot is written
        monkeypatch.setattr(bma_gp.cli.run, "fit", fit)
        assert main([*argv, "--no-plot", "--method", "sgpr"]) == 0
        assert (tmp_path / "o" / "results.json").is_file()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no file can be created")
def test_out_directory_that_cannot_be_written_is_found_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("bma_gp.cli.run.fit", _no_training)
    argv = [*FAST, "--data", str(_csv(tmp_path, n=20)), "--target", "y", "--features", "u", "--blocks", "4"]
    code, err = _exit_code_and_message(capsys, [*argv, "--out", "/proc"])
    assert code == 2 and "argument --out: cannot write to '/proc'" in err and "Traceback" not in err


@pytest.mark.parametrize("step", ["write_summary", "plot"])
def test_write_failure_after_training_is_one_line(tmp_path, capsys, monkeypatch, step):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(f"bma_gp.cli.report.{step}", disk_full)
    argv = [*FAST, "--data", str(_csv(tmp_path, n=20)), "--target", "y", "--features", "u"]
    code, err = _exit_code_and_message(capsys, [*argv, "--method", "sgpr", "--blocks", "4", "--out", "o"])
    name = "results.json" if step == "write_summary" else "fits.png"
    assert code == 2 and f"argument --out: cannot write 'o/{name}' (No space left on device)" in err
    assert "Traceback" not in err


def test_data_without_target(tmp_path, capsys):
    code, err = _exit_code_and_message(capsys, ["--data", str(_csv(tmp_path))])
    assert code == 2 and "--data needs --target" in err


def test_seasonal_kernel_needs_one_input(tmp_path, capsys):
    code, err = _exit_code_and_message(
        capsys, ["--data", str(_csv(tmp_path)), "--target", "y", "--features", "u", "v", "--kernel", "seasonal"]
    )
    assert code == 2 and "needs exactly one input column" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_requested_without_cuda(capsys):
    code, err = _exit_code_and_message(capsys, ["--device", "cuda"])
    assert code == 2 and "CUDA is not available" in err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_demo_on_cuda(tmp_path):
    out = tmp_path / "out"
    assert main([*FAST, "--device", "cuda", "--max-rows", "400", "--blocks", "32", "--out", str(out)]) == 0
    summary = _results(out)
    assert summary["device"].startswith("cuda")
    assert all(0 < row["rmse"] < 10 for row in summary["results"])


def test_help_states_each_default_once():
    # before: options with a default in words and no argparse default printed "(default: all) (default: None)"
    text = build_parser().format_help()
    assert "(default: None)" not in text
    for action in build_parser()._actions:
        assert (action.help or "").count("(default") <= 1
    for block in text.split("\n  -")[1:]:  # one option's help per block
        assert block.count("(default") <= 1, block
    assert "(default: 40)" in text  # argparse's own defaults are still shown
