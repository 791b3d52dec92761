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


def _header(out):
    return next(line for line in out.splitlines() if line.startswith("bma-gp: kernel "))


def test_options_the_run_does_not_use_are_warned_about(tmp_path, capsys):
    """``--blocks``, ``--partition`` and ``--period`` were ignored without a word when no chosen method or kernel
    uses them, and the header said ``k = 256`` for an exact-only run."""
    argv = ["--data", _csv(tmp_path), "--target", "y", "--method", "exact", *FAST, "--out", "out"]
    assert main([*argv, "--blocks", "3", "--partition", "kmeans", "--period", "2"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("bma-gp: warning:")]
    assert len(warnings) == 3, captured.err
    assert "--blocks has no effect" in warnings[0] and "methods: exact" in warnings[0]
    assert "--partition has no effect" in warnings[1] and "blockmean" in warnings[1]
    assert "--period has no effect" in warnings[2] and "kernel: rbf" in warnings[2]
    assert "--kernel seasonal" in warnings[2]
    assert "k = " not in _header(captured.out)
    # without those options: no warning, and still no k
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "k = " not in _header(captured.out)


def test_options_the_run_uses_are_not_warned_about(tmp_path, capsys):
    argv = ["--data", _csv(tmp_path), "--target", "y", "--method", "blockmean", "--kernel", "seasonal", *FAST]
    assert main([*argv, "--blocks", "2", "--partition", "sorted", "--period", "2", "--out", "out"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "k = 2," in _header(captured.out)
    # sgpr uses --blocks but not --partition
    assert main([*argv[:5], "sgpr", *argv[6:], "--blocks", "2", "--partition", "sorted", "--out", "out"]) == 0
    captured = capsys.readouterr()
    assert "--blocks" not in captured.err and "--partition has no effect" in captured.err


def test_iters_beyond_a_ssize_t_is_a_usage_error(tmp_path, capsys):
    """``--iters 99999999999999999999999`` passed the parser and ended in an OverflowError traceback."""
    argv = ["--data", _csv(tmp_path), "--target", "y", "--method", "exact", *FAST]
    code, line = _usage_error(capsys, [*argv, "--iters", "9" * 23])
    assert code == 2 and "argument --iters" in line and "up to 9223372036854775807" in line


@pytest.mark.parametrize(
    ("period", "dtype", "word"),
    [("1e-320", "float64", "small"), ("1e300", "float64", "large"), ("1e-40", "float32", "small")],
)
def test_a_period_the_seasonal_kernel_cannot_represent_names_period(tmp_path, capsys, period, dtype, word):
    """A ``--period`` that underflows or overflows the seasonal kernel's start values ended in a NanError traceback
    (1e-40 in float32) or in "diverged ...: lower the learning rate --lr", which cannot help."""
    argv = ["--data", _csv(tmp_path), "--target", "y", "--method", "exact", "--kernel", "seasonal", *FAST]
    code, line = _usage_error(capsys, [*argv, "--period", period, "--dtype", dtype])
    assert code == 2 and f"argument --period: {float(period):g} is too {word}" in line
    assert "'x', whose values span 1 to 10" in line and "--lr" not in line


def test_kmeans_with_fewer_distinct_inputs_than_blocks_warns_in_the_commands_words(tmp_path, capsys, recwarn):
    """``--blocks 6`` on two input columns with 3 distinct points ran with 3 blocks after a Python ``UserWarning``
    from ``kmeans_partition`` (with a source line, "Choose k <= ...") instead of a ``bma-gp: warning:`` naming
    ``--blocks``."""
    path = tmp_path / "ties.csv"
    path.write_text("a,b,y\n" + "".join(f"{i % 3},{2 * (i % 3)},{i % 3 + 0.1 * (i % 4)}\n" for i in range(20)))
    argv = ["--data", str(path), "--target", "y", "--method", "blockmean", "--blocks", "6", *FAST, "--out", "out"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "bma-gp: warning: --blocks 6: the training inputs have only 3 distinct points" in err
    assert "choose --blocks <= 3" in err
    assert not [w for w in recwarn if "kmeans_partition" in str(w.message)]


def test_blocks_above_the_training_rows_names_max_rows_and_the_default(tmp_path, capsys):
    """With ``--max-rows`` the cause, "--blocks 20 exceeds the 8 training rows; choose --blocks <= 8" left out the
    other fix, raising ``--max-rows``; and without ``--blocks`` it did not say that 256 is the default."""
    argv = ["--data", _csv(tmp_path, n=40), "--target", "y", "--method", "sgpr", *FAST]
    code, line = _usage_error(capsys, [*argv, "--max-rows", "10", "--blocks", "20"])
    assert code == 2 and line.endswith(
        "argument --blocks: 20 exceeds the 8 training rows; choose --blocks <= 8, or raise --max-rows "
        "(now 10 of the 40 usable rows)"
    )
    code, line = _usage_error(capsys, argv)
    assert code == 2 and line.endswith(
        "argument --blocks: 256 (the default) exceeds the 32 training rows; choose --blocks <= 32"
    )


def test_lr_without_a_step_is_warned_about(tmp_path, capsys):
    """``--iters 0 --lr 0.5`` took the learning rate without a word and the header said "0 Adam steps (lr 0.5)"."""
    argv = ["--data", _csv(tmp_path), "--target", "y", "--method", "exact", *FAST, "--iters", "0", "--out", "out"]
    assert main([*argv, "--lr", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "bma-gp: warning: --lr has no effect: --iters 0 takes no Adam step" in captured.err
    assert "0 Adam steps, cpu" in _header(captured.out)
    assert main([*argv[:-4], "--iters", "1", "--lr", "0.5", "--out", "out"]) == 0  # a step: the rate applies
    captured = capsys.readouterr()
    assert "--lr" not in captured.err and "1 Adam steps (lr 0.5)" in _header(captured.out)


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--lr", "-1e-3", "argument --lr: expected a positive number, got -0.001"),
        ("--period", "-inf", "argument --period: expected a positive number, got -inf"),
        ("--max-rows", "-nan", "argument --max-rows: expected a positive integer, got '-nan'"),
        ("--seed", "-1e3", "argument --seed: expected an integer from"),
    ],
)
def test_negative_numbers_in_any_spelling_reach_the_options_check(capsys, option, value, expected):
    """argparse takes only ``-1`` and ``-1.5`` for negative numbers: ``--lr -1e-3`` or ``--period -inf`` said
    "argument --lr: expected one argument", though one was given, instead of what the option accepts."""
    code, line = _usage_error(capsys, [option, value])
    assert code == 2 and expected in line and "expected one argument" not in line


def test_kmeans_warning_counts_distinct_points_not_blocks(tmp_path, capsys):
    """300 distinct rows, each three times: k-means spreads copies of a point over otherwise empty clusters, and the
    warning gave its number of blocks (336, 338) as the number of distinct points, and stayed silent for --blocks
    between 301 and 336."""
    rows = [(i % 20, i // 20, 0.1 * i) for i in range(300)]
    path = tmp_path / "dup.csv"
    path.write_text("a,b,y\n" + "".join(f"{a},{b},{y}\n" for a, b, y in rows * 3))
    for blocks in ("320", "400"):
        options = f"--target y --method blockmean --partition kmeans --blocks {blocks} --test-fraction 0.01"
        argv = ["--data", str(path), *options.split(), *FAST, "--out", str(tmp_path / f"out{blocks}")]
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert f"--blocks {blocks}: the training inputs have only 300 distinct points" in err
        assert "choose --blocks <= 300" in err


def test_data_errors_are_one_line_without_the_usage_block(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--data", str(tmp_path / "nope.csv"), "--target", "y"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("bma-gp: error: ") and "does not exist" in err
    assert "usage:" not in err
    with pytest.raises(SystemExit) as info:  # a bad option still shows the usage, as argparse does
        main(["--blocks", "zero"])
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err


def test_missing_values_warning_names_the_columns_that_had_them(tmp_path, capsys):
    path = tmp_path / "gaps.csv"
    lines = [f"{i},{2 * i},{'' if i % 10 == 0 else i / 3},{i % 7}" for i in range(60)]
    path.write_text("complete_a,complete_b,has_gaps,y\n" + "\n".join(lines) + "\n")
    options = "--target y --method blockmean --blocks 8"
    argv = ["--data", str(path), *options.split(), *FAST, "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "dropped 6 of 60 rows with missing values (missing cells per column: 'has_gaps': 6)" in err
    assert "'complete_a'" not in err
