"""Regression tests for bugs found by using the ``bma-gp`` command as a new user would."""

import json
import math
import os

import pytest
import torch

from bma_gp.cli import main
from bma_gp.datasets import DatasetError, load_co2, load_csv, load_exam
from cli_subprocess import small_cli_run

FAST = ["--iters", "5", "--no-progress", "--no-plot", "--blocks", "2"]


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _small_csv(tmp_path):
    path = tmp_path / "small.csv"
    path.write_text("x,y\n1,2\n2,3\n3,5\n4,4\n5,6\n6,8\n7,7\n8,9\n9,10\n10,12\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("method", ["exact", "blockmean"])
def test_diverging_training_is_a_message_not_a_traceback(tmp_path, capsys, method):
    """A learning rate that sends the hyperparameters to NaN ended in a NanError / ValueError traceback."""
    data = _small_csv(tmp_path)
    out = tmp_path / "new" / "out"
    argv = ["--data", str(data), "--target", "y", "--lr", "1000", "--method", method, "--out", str(out), *FAST]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert f"training the {method} GP diverged" in err and "--lr" in err and "Traceback" not in err
    # the run created --out and its parent and wrote nothing there: neither is left behind (both were, then the
    # parent alone)
    assert not out.exists() and not (tmp_path / "new").exists()


def test_failed_run_keeps_an_existing_out_directory(tmp_path, capsys):
    """The clean-up of a failed run removes only the --out directory that run created."""
    data, out = _small_csv(tmp_path), tmp_path / "mine"
    out.mkdir()
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--target", "y", "--lr", "1000", "--out", str(out), *FAST])
    assert out.is_dir()


def test_run_without_plot_says_that_an_older_plot_is_stale(tmp_path, capsys):
    """A ``--no-plot`` run into an --out folder holding a ``fits.png`` of an earlier run left that plot beside the
    new ``results.json`` without a word, as if it showed the new results."""
    data, out = _small_csv(tmp_path), tmp_path / "out"
    assert main(["--data", str(data), "--target", "y", "--method", "exact", "--out", str(out), *FAST]) == 0
    assert "fits.png" not in capsys.readouterr().err  # nothing to say about a plot that does not exist
    (out / "fits.png").write_bytes(b"an earlier run's plot")
    assert main(["--data", str(data), "--target", "y", "--method", "exact", "--out", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    assert "fits.png is from an earlier run" in err and "--no-plot" in err


def test_target_listed_in_features_names_the_argument(tmp_path, capsys):
    """``--features y --target y`` said only "the target column 'y' cannot also be a feature"."""
    data = _small_csv(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["--data", str(data), "--target", "y", "--features", "x", "y", *FAST])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "argument --features" in err and "'y'" in err and "drop it from --features" in err


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_dataset_loaders_refuse_a_dtype_that_is_not_floating_point(tmp_path, dtype):
    """``load_csv(..., dtype=torch.int64)`` truncated 2.7 to 2 without a word (and the loaders documented a
    floating point dtype)."""
    path = tmp_path / "decimals.csv"
    path.write_text("x,y\n0.5,2.7\n1.5,3.2\n2.5,4.9\n", encoding="utf-8")
    for load in (
        lambda: load_csv(path, "y", dtype=dtype),
        lambda: load_co2(dtype=dtype),
        lambda: load_exam(dtype=dtype),
    ):
        with pytest.raises(TypeError, match=r"dtype must be a floating point torch\.dtype.*torch\.float64"):
            load()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dataset_loaders_refuse_half_precision(tmp_path, dtype):
    """``load_co2(dtype=torch.float16)`` rounded every decimal year of 1958 to 1958.0 (45 distinct times were left
    of 2,225 readings) and CO2 values to steps of 0.25, without a word."""
    assert load_co2(dtype=torch.float32)[0].unique().numel() == 2225  # what half precision loses
    path = tmp_path / "decimals.csv"
    path.write_text("x,y\n1958.238,316.1\n1958.257,317.3\n", encoding="utf-8")
    for load in (lambda: load_csv(path, "y", dtype=dtype), lambda: load_co2(dtype=dtype)):
        with pytest.raises(TypeError, match=r"too narrow.*torch\.float32 or torch\.float64.*x\.to\(torch\.float16\)"):
            load()


def test_load_csv_with_an_empty_feature_list_names_the_argument(tmp_path):
    """``load_csv(path, "y", features=[])`` said the file "has no feature columns besides the target", although it
    has some: the empty list was the caller's."""
    path = tmp_path / "three.csv"
    path.write_text("a,b,y\n1,2,3\n4,5,6\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"features is empty.*'a', 'b'.*features=None"):
        load_csv(path, "y", features=[])
    x, _ = load_csv(path, "y", features=None)
    assert x.shape == (2, 2)


@pytest.mark.parametrize("group", [False, True])
def test_unreadable_data_file_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch, group):
    """A CSV without read permission ended in a PermissionError traceback (the tests may run as root, where
    chmod 000 does not stop reads, so open() is made to refuse the file)."""
    import builtins

    data = _small_csv(tmp_path)
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if os.fspath(file) == str(data):
            raise PermissionError(13, "Permission denied", str(data))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    argv = ["--data", str(data), "--target", "y", *FAST, "--out", "out"]
    if group:
        argv += ["--group", "x"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "cannot be read (Permission denied)" in err and "small.csv" in err and "Traceback" not in err


def test_results_json_records_the_settings_that_change_the_results(tmp_path):
    """results.json ("the data, the settings and ...") left out --test-fraction, --max-rows, --blocks,
    --partition, --period and --max-cholesky, so a run could not be repeated from its record."""
    data = _small_csv(tmp_path)
    argv = ["--data", str(data), "--target", "y", "--method", "blockmean", "--partition", "kmeans"]
    argv += ["--test-fraction", "0.3", "--max-rows", "9", "--period", "2.5", "--max-cholesky", "7", "--out", "out"]
    assert main([*argv, *FAST]) == 0
    with open(os.path.join("out", "results.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    settings = {key: summary.get(key) for key in ("test_fraction", "max_rows", "blocks", "partition", "period")}
    assert settings == {"test_fraction": 0.3, "max_rows": 9, "blocks": 2, "partition": "kmeans", "period": 2.5}
    assert summary.get("max_cholesky") == 7 and summary["n_train"] + summary["n_test"] == 9


def test_a_last_step_that_leaves_nan_hyperparameters_is_reported(tmp_path, capsys, monkeypatch):
    """Training that ends with NaN hyperparameters would fail in prediction instead; it is reported as
    divergence of that method, with the fix."""
    real_step = torch.optim.Adam.step

    def nan_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(math.nan)
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", nan_step)
    data = _small_csv(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["--data", str(data), "--target", "y", "--method", "sgpr", *FAST, "--iters", "1", "--out", "out"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "training the sgpr GP diverged at Adam step 1 of 1" in err and "--lr" in err


@pytest.mark.slow
def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    """``bma-gp ... | head -1`` ended in a BrokenPipeError traceback; it now stops quietly with status 1."""
    import subprocess

    command, env = small_cli_run(tmp_path)
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, as `head -1` does
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert first.startswith(b"bma-gp:")
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert code == 1
