"""Regression tests for the ``bma-gp`` options, found by checking each one against the help, docs/cli.md and what
the run does with it."""

import os

import pytest

from bma_gp.cli import main

FAST = ["--iters", "2", "--no-progress", "--no-plot"]


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _csv(tmp_path, n=10):
    path = tmp_path / "small.csv"
    path.write_text("x,y\n" + "".join(f"{i},{(i * i) % 7 + i}\n" for i in range(1, n + 1)), encoding="utf-8")
    return str(path)


def _usage_error(capsys, argv):
    """The exit status and the one error line of a run that must stop before writing anything to ``out``."""
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", "out"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("bma-gp: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not os.path.exists("out")
    return info.value.code, lines[0]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # --max-rows kept too few rows: raising it is the fix ("change --test-fraction or add rows" before)
        (["--max-rows", "2"], ["argument --max-rows", "raise --max-rows to at least 3"]),
        # a fraction that holds out no row: said "too few to hold out 0% for testing"
        (["--test-fraction", "0.01"], ["argument --test-fraction", "holds out none", "raise it to at least 0.1"]),
        (["--max-rows", "5", "--test-fraction", "0.9"], ["leaves 1 to train on", "lower it, or raise --max-rows"]),
    ],
)
def test_too_few_rows_names_the_option_to_change(tmp_path, capsys, extra, expected):
    code, line = _usage_error(capsys, ["--data", _csv(tmp_path), "--target", "y", "--method", "exact", *FAST, *extra])
    assert code == 2
    assert all(text in line for text in expected), line
