"""``bma-gp``: regression tests for the defects of the second user trial of the command line (the seed range is
in test_cli.py)."""

import json
import os
import warnings

import pytest
import torch
from linear_operator.utils.warnings import NumericalWarning

from bma_gp.cli import main
from bma_gp.datasets import DatasetError, load_csv
from test_cli_group import _error as _cli_error

FAST = ["--no-progress", "--no-plot"]


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _write(path, header, rows):
    path.write_text("\n".join([header, *(",".join(map(str, row)) for row in rows)]) + "\n", encoding="utf-8")
    return path


def _error(capsys, argv):
    code, err = _cli_error(capsys, argv)
    return code, err.strip().splitlines()[-1]


def _results(out):
    with open(os.path.join(out, "results.json"), encoding="utf-8") as handle:
        return json.load(handle)


# ------------------------------------------------------------------------ GPyTorch's jitter warning
def _repeated_inputs_csv(tmp_path):
    """60 rows on 5 distinct inputs: SGPR's inducing points, drawn from the training inputs, coincide, and the
    Cholesky of their kernel matrix needs jitter."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (60,), generator=g).double()
    y = torch.sin(x) + 0.1 * torch.randn(60, generator=g, dtype=torch.float64)
    return _write(tmp_path / "repeated.csv", "x,y", [(f"{a:g}", f"{b:.6f}") for a, b in zip(x.tolist(), y.tolist())])


def test_gpytorch_jitter_is_one_bma_gp_warning_line_per_method(tmp_path, capsys):
    """linear_operator's ``NumericalWarning: A not p.d., added jitter of 1.0e-08 to the diagonal`` reached the user
    raw (a file path and a source line; on docs/cli.md's exam example): it is one line in the command's words."""
    argv = ["--data", str(_repeated_inputs_csv(tmp_path)), "--target", "y", "--method", "sgpr", "--blocks", "16"]
    argv += ["--iters", "3", *FAST]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "--out", "said"]) == 0
    raw = [w for w in caught if issubclass(w.category, NumericalWarning)]
    assert not raw, [str(w.message) for w in raw]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    jitter = [line for line in lines if "jitter" in line]
    assert len(jitter) == 1, lines
    assert jitter[0].startswith("bma-gp: warning: the sgpr GP's kernel matrix was not positive definite in float64")
    assert "added jitter of up to 1e-" in jitter[0] and "the sgpr results are reported with that jitter" in jitter[0]
    assert all(line.startswith("bma-gp: ") for line in lines), lines

    # the same numbers as a run that ignores the warning (which the filters still decide: nothing is said then)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        assert main([*argv, "--out", "ignored"]) == 0
    assert "jitter" not in capsys.readouterr().err
    said, ignored = _results("said")["results"], _results("ignored")["results"]
    assert [(r["rmse"], r["nlpd"], r["final_train_loss"]) for r in said] == [
        (r["rmse"], r["nlpd"], r["final_train_loss"]) for r in ignored
    ]


# ------------------------------------------------------------------------ --out clean-up
def _diverging_argv(tmp_path):
    data = _write(tmp_path / "small.csv", "x,y", [(i, v) for i, v in enumerate([2, 3, 5, 4, 6, 8, 7, 9, 10, 12], 1)])
    return ["--data", str(data), "--target", "y", "--lr", "1000", "--method", "exact", "--iters", "5", *FAST]


def test_failed_run_removes_every_directory_it_created(tmp_path, capsys):
    """``--out new/sub`` (neither existing) and a run that fails: ``sub`` was removed, the empty ``new`` left."""
    out = tmp_path / "new" / "deeper" / "out"
    code, line = _error(capsys, [*_diverging_argv(tmp_path), "--out", str(out)])
    assert code == 2 and "diverged" in line
    assert not (tmp_path / "new").exists()


def test_failed_run_keeps_the_directories_that_existed(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    code, _ = _error(capsys, [*_diverging_argv(tmp_path), "--out", str(tmp_path / "mine" / "new" / "out")])
    assert code == 2
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "mine" / "new").exists()
    # spelled with .. as makedirs walks it: both directories it created go, the existing one stays
    code, _ = _error(capsys, [*_diverging_argv(tmp_path), "--out", os.path.join("mine", "a", "..", "b")])
    assert code == 2
    assert (tmp_path / "mine").is_dir() and os.listdir(tmp_path / "mine") == []


# ------------------------------------------------------------------------ constant or underflowing columns
def test_distinct_tiny_values_are_not_called_constant(tmp_path, capsys):
    """Values around 1e-301 are distinct, but their standard deviation underflows to 0: the column was called
    constant and the user told to drop it; rescaling it is the fix."""
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(60, generator=g, dtype=torch.float64) * 1e-300).tolist()
    y = torch.rand(60, generator=g, dtype=torch.float64).tolist()
    data = _write(tmp_path / "tiny.csv", "a,y", [(repr(u), repr(v)) for u, v in zip(a, y)])
    code, line = _error(capsys, ["--data", str(data), "--target", "y", *FAST])
    assert code == 2 and "input column(s) 'a'" in line and "constant" not in line
    assert "underflows" in line and "rescale" in line

    data = _write(tmp_path / "tiny_target.csv", "a,y", [(repr(v), repr(u)) for u, v in zip(a, y)])
    code, line = _error(capsys, ["--data", str(data), "--target", "y", *FAST])
    assert code == 2 and "the target column 'y'" in line and "constant" not in line
    assert "underflows" in line and "rescale" in line


def test_a_column_of_equal_values_is_constant_whatever_its_standard_deviation(tmp_path, capsys):
    """0.1 in every row has a standard deviation of about 1e-17 in float64, not 0: such a column was standardised
    into rounding noise instead of being called constant."""
    assert float(torch.full((48,), 0.1, dtype=torch.float64).std()) > 0  # what made the old check miss it
    rows = [(0.1, i, (i * 7) % 5) for i in range(60)]
    data = _write(tmp_path / "equal.csv", "c,x,y", rows)
    code, line = _error(capsys, ["--data", str(data), "--target", "y", *FAST])
    assert code == 2 and "input column(s) 'c' are constant on the training rows" in line
    code, line = _error(capsys, ["--data", str(data), "--target", "c", *FAST])
    assert code == 2 and "the target column 'c' is constant on the training rows" in line


# ------------------------------------------------------------------------ a number among dates
@pytest.mark.parametrize(
    ("cells", "row", "date_row", "how"),
    [
        (["2001", "2001-07-02", "2001-07-09", "2001-07-16"], 1, 2, "'2001-01-01'"),
        (["2001-07-02", "2001-07-09", "2001.5", "2001-07-16"], 3, 1, "YYYY-MM-DD"),
    ],
)
def test_a_plain_number_among_iso_dates_is_named_as_such(tmp_path, capsys, cells, row, date_row, how):
    """A column of dates with the year 2001 in a row said '2001' was "not numeric" and to use numeric columns."""
    data = _write(tmp_path / "dates.csv", "d,y", [(cell, i % 3) for i, cell in enumerate(cells)])
    bad, date = cells[row - 1], cells[date_row - 1]
    code, line = _error(capsys, ["--data", str(data), "--target", "y", *FAST])
    assert code == 2 and "not numeric" not in line
    assert f"column 'd' mixes ISO dates with a plain number: data row {row} holds {bad!r}" in line
    assert f"data row {date_row} holds the date {date!r}" in line and f"Write the number as a date ({how}" in line
    with pytest.raises(DatasetError, match=f"mixes ISO dates with a plain number: data row {row} holds"):
        load_csv(data, "y")


def test_text_among_dates_is_still_not_numeric(tmp_path, capsys):
    data = _write(tmp_path / "dates.csv", "d,y", [("2001-07-02", 1), ("soon", 2), ("2001-07-16", 3)])
    code, line = _error(capsys, ["--data", str(data), "--target", "y", *FAST])
    assert code == 2 and "column 'd' is not numeric: data row 2 holds 'soon'" in line


def test_numerical_warnings_of_a_method_are_said_once_and_others_pass(capsys):
    """Each kind of GPyTorch numerical warning is one line per method; other warnings are shown as before, and a
    NumericalWarning the filters make an error still raises."""
    from bma_gp.cli.models import _numerical_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _numerical_warnings("exact", "float32"):
            for jitter in (1e-6, 1e-8, 1e-7):
                text = f"A not p.d., added jitter of {jitter:.1e} to the diagonal"
                warnings.warn(text, NumericalWarning, stacklevel=2)
            for residual in (0.5, 0.25):
                warnings.warn(f"CG terminated with average residual norm {residual}", NumericalWarning, stacklevel=2)
            warnings.warn("something else", UserWarning, stacklevel=2)
    assert [(w.category, str(w.message)) for w in caught] == [(UserWarning, "something else")]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("bma-gp: warning: the exact GP's kernel matrix was not positive definite in float32")
    assert "jitter of up to 1e-06 to its diagonal" in lines[0]
    assert lines[1] == (
        "bma-gp: warning: the exact GP: GPyTorch: CG terminated with average residual norm 0.5 (and 1 more "
        "numerical warning(s))"
    )
    with warnings.catch_warnings(), pytest.raises(NumericalWarning):
        warnings.simplefilter("error", NumericalWarning)
        with _numerical_warnings("exact", "float64"):
            warnings.warn("A not p.d., added jitter of 1.0e-08 to the diagonal", NumericalWarning, stacklevel=2)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------ session 25's trial of the command line
def _small_csv(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(80, generator=g, dtype=torch.float64)
    y = torch.sin(6 * x) + 0.1 * torch.randn(80, generator=g, dtype=torch.float64)
    return _write(tmp_path / "small.csv", "x,y", [(f"{a:.6f}", f"{b:.6f}") for a, b in zip(x.tolist(), y.tolist())])


def test_a_reader_gone_at_the_plot_line_is_a_quiet_exit_not_a_write_error(tmp_path, monkeypatch):
    """With unbuffered output, a reader that stops before the "wrote fits.png" line made that print's
    BrokenPipeError read as a failure to write the plot: exit status 2 and a usage block, though the plot was
    written. It is the quiet exit with status 1 the docs promise."""
    pytest.importorskip("matplotlib")
    import sys

    real = open(tmp_path / "stdout.txt", "w", encoding="utf-8")

    class GoneAtPlot:
        def write(self, text):
            if "fits.png" in text:
                raise BrokenPipeError(32, "Broken pipe")
            return real.write(text)

        def flush(self):
            real.flush()

        def fileno(self):
            return real.fileno()

    monkeypatch.setattr(sys, "stdout", GoneAtPlot())
    argv = ["--data", str(_small_csv(tmp_path)), "--target", "y", "--method", "exact", "--iters", "1"]
    assert main([*argv, "--no-progress", "--out", "piped"]) == 1
    assert (tmp_path / "piped" / "fits.png").exists() and (tmp_path / "piped" / "results.json").exists()


def test_ctrl_c_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    from bma_gp.cli import models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "train", interrupted)
    argv = ["--data", str(_small_csv(tmp_path)), "--target", "y", "--method", "exact", *FAST]
    assert main([*argv, "--out", "stopped"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "bma-gp: interrupted" and "Traceback" not in err
    assert not (tmp_path / "stopped").exists()  # the directory the run created is removed, as after any failure


def test_the_first_methods_train_time_excludes_one_time_imports(tmp_path, monkeypatch):
    """The first ``torch.optim.Adam`` of a process imports ``torch._dynamo`` (0.6-1.2 s), which was charged to the
    train time of whichever method ran first (exact GP 1.70 s against 0.01 s at n = 120). A first construction made
    slow on purpose stays out of every method's time."""
    import time

    from bma_gp.cli import models

    models._imports_for_training.cache_clear()
    original = torch.optim.Adam.__init__
    calls = []

    def slow_first(self, *args, **kwargs):
        if not calls:
            time.sleep(1.0)
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "__init__", slow_first)
    argv = ["--data", str(_small_csv(tmp_path)), "--target", "y", "--method", "exact,blockmean", "--blocks", "8"]
    assert main([*argv, "--iters", "2", *FAST, "--out", "timed"]) == 0
    times = [r["train_seconds"] for r in _results("timed")["results"]]
    assert len(times) == 2 and max(times) < 0.9, times
