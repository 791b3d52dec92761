"""Audit of the example scripts' command-line options, as a user of the scripts would run them.

The scripts' ``main(argv)`` runs in this process, stopped at its first expensive call: the options it got that far
are what the run would have used.
"""

from __future__ import annotations

import argparse
import json

import gpytorch
import pytest
import torch

from example_scripts import Stop, load_example, stop


def _example(name: str):
    return load_example(name, "audit_options")


_Stop, _stop = Stop, stop


def _run_until(monkeypatch, name: str, target: str, argv: list[str]):
    """``main(argv)`` of ``examples/NAME.py`` up to its first call of ``target`` (a module attribute, or
    ``mll`` for GPyTorch's ``ExactMarginalLogLikelihood``); returns the options (the last namespace parsed, as the
    script left it) and the positional arguments of that call."""
    module = _example(name)
    parsed: list[argparse.Namespace] = []
    parse_args = argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        parsed.append(parse_args(self, *args, **kwargs))
        return parsed[-1]

    calls: list[tuple] = []

    def stop(*args, **kwargs):
        calls.append(args)
        raise _Stop

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    if target == "mll":
        monkeypatch.setattr(gpytorch.mlls, "ExactMarginalLogLikelihood", stop)
    else:
        monkeypatch.setattr(module, target, stop)
    with pytest.raises(_Stop):
        module.main(argv)
    return parsed[-1], calls[0]


# (script, patched call, --smoke alone, its values, --smoke with explicit options, their values, what is read off)
SMOKE_DEFAULTS = [
    (
        "bench_optimizer",
        "build_model",
        [],
        (64, 2, 2, 3),
        ["--width", "32", "--rounds", "5"],
        (32, 2, 5, 3),
        lambda ns, call: (ns.width, ns.depth, ns.rounds, ns.steps),
    ),
    (
        "bench_elecdemand_step",
        "run",
        [],
        (40, 2, 1500),
        ["--k", "7", "--repeats", "1"],
        (7, 1, 1500),
        lambda ns, call: call[1:4],  # run(dtype, k, repeats, rows, profile)
    ),
    (
        "bench_mixed",
        "run",
        [],
        (5000, [50, 200], 16),
        ["--n", "800", "--inducing", "4"],
        (800, [50, 200], 4),
        lambda ns, call: tuple(call[:3]),  # run(n, levels, inducing, ...)
    ),
    (
        "bench_kernel_block_mean",
        "run_case",
        ["--case", "rbf"],
        (2000, 50, 1),
        ["--case", "rbf", "--n", "3000", "--repeat", "4"],
        (3000, 50, 4),
        lambda ns, call: (call[1], call[3], call[4]),  # run_case(case, n, d, k, repeat, ...)
    ),
    (
        "bench_gp_iteration",
        "plan",
        [],
        ([1000], [20], 1, True),
        ["--n", "500", "--ks", "5,10", "--warm", "3"],
        ([500], [5, 10], 3, True),
        lambda ns, call: (list(call[0]), list(call[1]), ns.warm, ns.in_process),
    ),
    (
        "bench_groups",
        "iteration_seconds",
        [],
        (3000, 50),
        ["--n", "700"],
        (700, 50),
        lambda ns, call: call[:2],  # iteration_seconds(n, k, ...)
    ),
    (
        "bench_groups",
        "run_prediction",
        ["--predict"],
        (4000, [1400], 300),
        ["--predict", "--t", "20", "--ks", "30"],
        (4000, [30], 20),
        lambda ns, call: call[:3],  # run_prediction(n, ks, t, ...)
    ),
    (
        "bench_groups",
        "run_factor",
        ["--rank", "2"],
        (3000, [300]),
        ["--rank", "2", "--ks", "40"],
        (3000, [40]),
        lambda ns, call: call[:2],  # run_factor(n, ks, ...)
    ),
    (
        "evaluate_gp",
        "warm_up",
        [],
        (2, 2, (8,), 120, 80),
        ["--seeds", "3", "--exact-max-train", "100"],  # were cut to 2 and 80
        (3, 2, (8,), 120, 100),
        lambda ns, call: (ns.seeds, ns.iters, ns.blocks, ns.max_rows, ns.exact_max_train),
    ),
    (
        "evaluate_mixed",
        "warm_up",
        [],
        ([0], 300, 100, 2, 16, 200, "none"),
        ["--seeds", "1", "2", "--n-train", "500", "--gpboost-gp-approx", "vecchia"],
        ([1, 2], 500, 100, 2, 16, 200, "vecchia"),
        lambda ns, call: (
            ns.seeds,
            ns.n_train,
            ns.n_test,
            ns.iters,
            ns.inducing,
            ns.exact_max_train,
            ns.gpboost_gp_approx,
        ),
    ),
    ("gp_regression", "mll", [], (3,), ["--iters", "1"], (1,), lambda ns, call: (ns.iters,)),
    ("grouped_gp", "mll", [], (5,), ["--iters", "2"], (2,), lambda ns, call: (ns.iters,)),
    (
        "mixed_effects_gp",
        "mll",
        [],
        (600, 8, 3),
        ["--n", "100", "--iters", "1"],
        (100, 8, 1),
        lambda ns, call: (ns.n, ns.inducing, ns.iters),
    ),
    (
        "paper_cnn",
        "run_dataset",
        ["--datasets", "digits"],
        (2, 1, 1),
        ["--datasets", "digits", "--epochs", "3"],
        (3, 1, 1),
        lambda ns, call: (ns.epochs, ns.tune_epochs, ns.seeds),
    ),
]


@pytest.mark.parametrize(
    ("name", "target", "base", "smoke_values", "explicit", "explicit_values", "read"),
    SMOKE_DEFAULTS,
    ids=[f"{case[0]}-{case[1]}" for case in SMOKE_DEFAULTS],
)
def test_smoke_changes_defaults_only(
    name, target, base, smoke_values, explicit, explicit_values, read, monkeypatch, tmp_path
):
    # --smoke overwrote the options given with it (bench_optimizer --smoke --width 32 ran at width 64)
    out = ["--out", str(tmp_path)] if name.startswith("evaluate") else []
    ns, call = _run_until(monkeypatch, name, target, ["--smoke", *base, *out])
    assert tuple(read(ns, call)) == smoke_values  # --smoke alone: as before
    ns, call = _run_until(monkeypatch, name, target, ["--smoke", *base, *explicit, *out])
    assert tuple(read(ns, call)) == explicit_values


def _saved_figures(monkeypatch) -> list:
    """The figures the scripts save, in order (``Figure.savefig`` still writes the file)."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.use("Agg")
    saved: list[Figure] = []
    savefig = Figure.savefig

    def spy(self, *args, **kwargs):
        saved.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def test_grouped_gp_smoke_plots_the_airport_and_months_it_trained_on(monkeypatch, tmp_path):
    # --smoke trains on the first airport (EWR), January to March, but plotted JFK from January to November: the
    # title named an airport without a single reading and no line had a raw group mean behind it
    saved = _saved_figures(monkeypatch)
    result = _example("grouped_gp").main(["--smoke", "--iters", "0", "--out", str(tmp_path)])
    assert result["png"].is_file()
    (ax,) = saved[0].axes
    assert ax.get_title().startswith("EWR:")  # origins are sorted: EWR, JFK, LGA
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["Jan", "Feb", "Mar"]
    dots = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(dots) == 3 and all(len(line.get_xdata()) > 0 for line in dots)  # raw means behind every line
    import matplotlib.pyplot as plt

    plt.close(saved[0])


def test_paper_cnn_smoke_writes_where_out_says(monkeypatch, tmp_path, capsys):
    # --smoke --out docs/results/optim (the default folder, named explicitly) wrote nothing and said nothing: the
    # script compared --out with its default value to tell whether it was given
    monkeypatch.chdir(tmp_path)
    paper_cnn = _example("paper_cnn")
    tiny = ["--smoke", "--datasets", "digits", "--optimizers", "adagrad", "--lr", "adagrad=0.1"]
    paper_cnn.main([*tiny, "--out", "docs/results/optim"])
    out = tmp_path / "docs" / "results" / "optim"
    assert sorted(p.name for p in out.iterdir()) == ["paper_cnn.json", "paper_cnn.md", "paper_cnn_digits_small.png"]
    results = json.loads((out / "paper_cnn.json").read_text())["results"]
    assert list(results) == ["digits/small"] and results["digits/small"]["adagrad"]["lr"] == 0.1
    monkeypatch.chdir(tmp_path / "docs")
    capsys.readouterr()
    monkeypatch.setattr(paper_cnn, "run_dataset", lambda *args: results["digits/small"])  # the same, without training
    paper_cnn.main(tiny)
    assert list((tmp_path / "docs").iterdir()) == [tmp_path / "docs" / "results"]  # --smoke alone: no files
    assert "--smoke: no files written (pass --out DIR to keep them)" in capsys.readouterr().out


def test_paper_cnn_without_any_data_set_stops_before_writing(tmp_path, capsys):
    # every data set skipped (no torchvision or no CIFAR-10 files): the run exited 0 and replaced paper_cnn.json and
    # paper_cnn.md in --out (by default the documented results) with an empty table
    out = tmp_path / "optim"
    out.mkdir()
    (out / "paper_cnn.json").write_text("{}")
    argv = ["--datasets", "cifar10", "--cifar-root", str(tmp_path / "missing"), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        _example("paper_cnn").main(argv)
    assert "none of --datasets cifar10 could be loaded" in str(exit_info.value.code)
    assert "skipping cifar10" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["paper_cnn.json"] and (out / "paper_cnn.json").read_text() == "{}"


def _usage_error(main, argv, capsys) -> str:
    """Run ``main(argv)``, expect argparse's exit status 2, return the error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("scale", ["0", "-1", "nan"])
def test_paper_cnn_rejects_a_grid_scale_that_is_not_positive(scale, capsys):
    # 0 trained every optimizer at learning rate 0 without a word; -1 was torch's "Invalid learning rate" traceback
    error = _usage_error(_example("paper_cnn").main, ["--smoke", "--grid-scale", scale], capsys)
    assert f"--grid-scale must be positive (it multiplies the learning-rate grids), got {scale}" in error


def test_benchmarks_resummarize_of_a_folder_without_results(tmp_path, capsys):
    # was a FileNotFoundError traceback
    error = _usage_error(_example("benchmarks").main, ["--resummarize", str(tmp_path / "typo")], capsys)
    assert f"--resummarize: {tmp_path / 'typo' / 'results.jsonl'} does not exist" in error
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        # each was a whole run of failed fits ("Invalid learning rate") or of fits that never moved (lr 0)
        ("evaluate_gp", ["--lr", "0"], "argument --lr: expected a positive number, got 0"),
        ("evaluate_gp", ["--lr", "-0.1"], "argument --lr: expected a positive number, got -0.1"),
        ("evaluate_gp", ["--exact-max-train", "0"], "argument --exact-max-train: expected an integer >= 1, got 0"),
        ("evaluate_gp", ["--max-cholesky", "-1"], "argument --max-cholesky: expected an integer >= 0, got -1"),
        ("evaluate_mixed", ["--lr", "0"], "argument --lr: expected a positive number, got 0"),
        # negative sizes cut rows off the end of a random order: -5 silently trained on all but 5 rows
        ("evaluate_mixed", ["--gpboost-gp-max-train", "-5"], "--gpboost-gp-max-train: expected an integer >= 1"),
        ("evaluate_mixed", ["--exact-max-train", "-5"], "argument --exact-max-train: expected an integer >= 1"),
        ("evaluate_mixed", ["--mixedlm-max-train", "0"], "argument --mixedlm-max-train: expected an integer >= 1"),
    ],
)
def test_evaluations_reject_bad_sizes_and_rates(name, argv, message, capsys, tmp_path):
    assert message in _usage_error(_example(name).main, ["--smoke", "--out", str(tmp_path), *argv], capsys)
    assert list(tmp_path.iterdir()) == []


def test_gp_regression_smoke_title_gives_the_weeks_a_block_spans(monkeypatch, tmp_path):
    # --smoke keeps every 8th week: a block of --block-weeks 3 observations spans 24 weeks, the title said 3
    saved = _saved_figures(monkeypatch)
    _example("gp_regression").main(["--smoke", "--iters", "0", "--out", str(tmp_path)])
    assert "blocks of 24 weeks)" in saved[0].axes[0].get_title()
    import matplotlib.pyplot as plt

    plt.close(saved[0])


@pytest.mark.parametrize(
    ("name", "target", "argv", "message"),
    [
        ("bench_optimizer", "build_model", ["--rounds", "0"], "--rounds must be at least 1, got 0"),  # StatisticsError
        ("bench_optimizer", "build_model", ["--threads", "0"], "--threads must be at least 1, got 0"),  # was ignored
        ("bench_mixed", "run", ["--iters", "0"], "--iters must be at least 1, got 0"),  # min() of an empty sequence
        ("bench_groups", "iteration_seconds", ["--repeats", "0"], "--repeats must be at least 1, got 0"),  # inf s, nan
        ("bench_elecdemand_step", "run", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
        ("bench_kernel_block_mean", "run_case", ["--case", "rbf", "--repeat", "0"], "--repeat must be at least 1"),
        ("bench_gp_iteration", "plan", ["--warm", "0"], "--warm must be at least 1, got 0"),  # min() in every case
        ("bench_compositions", "part_exact", ["--part", "exact", "--threads", "-1"], "--threads must be at least 1"),
        ("bench_operator", "dense_comparison", ["--part", "dense", "--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_benchmarks_reject_counts_below_one(name, target, argv, message, monkeypatch, capsys):
    module = _example(name)
    monkeypatch.setattr(module, target, _stop)  # the benchmark started: the option was not refused
    assert message in _usage_error(module.main, ["--smoke", *argv], capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--only", ","], "--only: no suite given; choose from operator, compositions"),
        (["--timeout", "0"], "--timeout must be a positive number of seconds, got 0"),
        (["--budget", "-5"], "--budget must be a positive number of seconds, got -5"),
    ],
)
def test_benchmarks_suite_refuses_a_run_of_nothing(argv, message, monkeypatch, capsys, tmp_path):
    # each ran no script (or killed / skipped every one) and then replaced results.jsonl and summary.md in --out-dir
    benchmarks = _example("benchmarks")
    monkeypatch.setattr(benchmarks, "run_suite", _stop)
    monkeypatch.setattr(benchmarks, "machine_record", lambda argv, device: {"suite": "machine"})
    assert message in _usage_error(benchmarks.main, ["--smoke", "--out-dir", str(tmp_path / "bench"), *argv], capsys)
    assert not (tmp_path / "bench").exists()


def test_paper_cnn_says_when_it_leaves_full_matrix_out(monkeypatch, capsys):
    # --model large dropped full_matrix without a word; asked for alone, it ran no optimizer and wrote an empty table
    paper_cnn = _example("paper_cnn")
    argv = ["--smoke", "--model", "large", "--datasets", "digits"]
    error = _usage_error(paper_cnn.main, [*argv, "--optimizers", "full_matrix"], capsys)
    assert "--optimizers: full_matrix does not run with --model large" in error
    monkeypatch.setattr(paper_cnn, "load_digits32", _stop)
    with pytest.raises(_Stop):
        paper_cnn.main([*argv, "--optimizers", "adagrad,full_matrix"])
    assert "full_matrix left out: with --model large" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "--device: 'gpu' is not a torch device; use cpu, cuda or cuda:N"),  # was torch's RuntimeError
        ("cuda", "--device: CUDA is not available on this machine; use --device cpu"),  # was an error in model.to
    ],
)
def test_bench_optimizer_device_errors_name_the_option(device, message, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA
    bench_optimizer = _example("bench_optimizer")
    monkeypatch.setattr(bench_optimizer, "build_model", _stop)
    assert message in _usage_error(bench_optimizer.main, ["--smoke", "--device", device], capsys)
