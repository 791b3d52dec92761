"""Audit of the example scripts' options, second round: options that parsed but were ignored or cut, list options
whose bad values were tracebacks, devices and methods that failed case by case after the start.

The scripts' ``main(argv)`` runs in this process, stopped at its first expensive call (patched to raise
``_Stop``): a usage error must come before it, a valid invocation must reach it with the values it asked for.
"""

from __future__ import annotations

import subprocess

import gpytorch
import linear_operator
import pytest
import torch

import bma_gp
from example_scripts import Stop, load_example, stop


def _example(name: str):
    return load_example(name, "audit_options2")


_Stop, _stop = Stop, stop


def _usage_error(main, argv, capsys) -> str:
    """Run ``main(argv)``, expect argparse's exit status 2, return the error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def _stopped_at(main, argv, calls: list) -> tuple:
    """Run ``main(argv)`` up to the patched call that appends its arguments to ``calls``; return them."""
    with pytest.raises(_Stop):
        main(argv)
    return calls[-1]


def _recorder(calls: list):
    def record(*args, **kwargs):
        calls.append(args)
        raise _Stop

    return record


# ---------------------------------------------------------------------------- mixed_effects_gp.py
def _mixed_effects_model(monkeypatch, argv: list[str]):
    """The model ``mixed_effects_gp.py ARGV`` trains (its marginal likelihood is where the run stops)."""
    calls: list = []
    monkeypatch.setattr(gpytorch.mlls, "ExactMarginalLogLikelihood", _recorder(calls))
    _likelihood, model = _stopped_at(_example("mixed_effects_gp").main, argv, calls)
    return model


def test_mixed_effects_n_applies_to_exam(monkeypatch):
    # --n was read for flights (and under --smoke) only: --data exam --n 100 trained on all 3,248 training rows
    model = _mixed_effects_model(monkeypatch, ["--data", "exam", "--n", "100"])
    assert model.train_inputs[0].shape[0] == 80  # a fifth held out
    model = _mixed_effects_model(monkeypatch, ["--data", "exam"])  # default: all 4,059 pupils, as before
    assert model.train_inputs[0].shape[0] == 4059 - 4059 // 5


def test_mixed_effects_refuses_more_rows_or_inducing_points_than_there_are(monkeypatch, capsys):
    # --inducing 481 of 480 training rows trained with 480 inducing points, without a word; --n above the data's rows
    # was cut to them the same way
    main = _example("mixed_effects_gp").main
    monkeypatch.setattr(gpytorch.mlls, "ExactMarginalLogLikelihood", _stop)
    error = _usage_error(main, ["--smoke", "--inducing", "481"], capsys)
    assert "--inducing 481 is more than the 480 training rows" in error and "use at most 480" in error
    error = _usage_error(main, ["--data", "exam", "--n", "5000"], capsys)
    assert "--n 5000 is more than the 4,059 rows of --data exam" in error
    model = _mixed_effects_model(monkeypatch, ["--smoke", "--inducing", "480"])  # all of them: accepted
    assert model.covar_module.kernels[0].inducing_points.shape == (480, 1)


# ---------------------------------------------------------------------------- bench_gp_iteration.py
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # argparse's "invalid <lambda> value: 'abc'"
        (["--n", "abc"], "argument --n: expected comma-separated integers such as 1000,5000, got 'abc'"),
        (["--ks", "10,x"], "argument --ks: expected comma-separated integers such as 1000,5000, got '10,x'"),
        (["--ks", "0"], "argument --ks: expected integers >= 1, got '0'"),  # failed cases
        # each case was recorded as failed (a subprocess per case), or a RuntimeError traceback in process
        (["--device", "foo"], "--device: 'foo' is not cpu, cuda or cuda:N"),
        (["--methods", "blockmean,foo"], "--methods: unknown ['foo']; choose from exact,blockmean,sgpr"),
        (["--methods", ","], "--methods: none given; choose from exact,blockmean,sgpr"),  # ran nothing
        (["--timeout", "0"], "--timeout must be a positive number of seconds, got 0"),  # every case abandoned
        (["--exact-max-n", "0"], "--exact-max-n must be at least 1, got 0"),  # 0 meant the default, 20,000
    ],
)
def test_bench_gp_iteration_refuses_bad_options(argv, message, monkeypatch, capsys):
    bench = _example("bench_gp_iteration")
    monkeypatch.setattr(bench, "plan", _stop)  # the run started: the option was not refused
    assert message in _usage_error(bench.main, ["--smoke", *argv], capsys)


def test_bench_gp_iteration_says_when_k_is_not_below_n(monkeypatch):
    # a k >= n was left out of the plan without a word (--n 30 --ks 5,40 timed k = 5 only)
    bench = _example("bench_gp_iteration")
    plan, calls = bench.plan, []
    monkeypatch.setattr(bench, "plan", _recorder(calls))
    ns, ks, methods, exact_max_n, device = _stopped_at(bench.main, ["--smoke", "--n", "30", "--ks", "5,40"], calls)
    assert (ns, ks, methods, exact_max_n, device) == ([30], [5, 40], ["exact", "blockmean", "sgpr"], 20_000, "cpu")
    cases = plan(ns, ks, ["blockmean"], exact_max_n, device)
    assert cases == [("blockmean", 30, 5, None), ("blockmean", 30, 40, "k = 40 is not below n = 30")]
    assert "k = 40 is not below n = 30" in bench.table([bench._skip("blockmean", 30, 40, cases[1][3], "cpu")])


# ---------------------------------------------------------------------------- list options of the other benchmarks
@pytest.mark.parametrize(
    ("name", "target", "argv", "message"),
    [
        # each was a ValueError (int('abc')) or AttributeError (getattr(torch, 'foo')) traceback
        ("bench_groups", "iteration_seconds", ["--ks", "abc"], "argument --ks: expected comma-separated integers"),
        ("bench_groups", "iteration_seconds", ["--ks", "0,50"], "argument --ks: expected numbers of groups >= 1"),
        ("bench_operator", "dense_comparison", ["--ks", "abc"], "argument --ks: expected comma-separated integers"),
        ("bench_operator", "run_sweep", ["--part", "sweep", "--ns", "1e4"], "argument --ns: expected comma-separated"),
        ("bench_operator", "run_sweep", ["--part", "sweep", "--ks", "-5"], "argument --ks: expected integers >= 1"),
        ("bench_elecdemand_step", "run", ["--dtypes", "foo"], "--dtypes: unknown ['foo']; choose from float32,float64"),
        (
            "bench_elecdemand_step",
            "run",
            ["--dtypes", "float32,"],
            "--dtypes: unknown ['']; choose from float32,float64",
        ),
        # tracebacks from torch / GroupKernel after the data were made
        (
            "bench_groups",
            "run_prediction",
            ["--predict", "--ks", "10"],
            "--ks: with --predict every k must be above 20",
        ),
        ("bench_groups", "run_factor", ["--rank", "-1"], "--rank must be between 0 and the smallest of --ks (300)"),
        ("bench_groups", "run_factor", ["--rank", "400"], "--rank must be between 0 and the smallest of --ks (300)"),
        # ignored: the other parts have fixed sizes, --part matvec timed the first n only
        ("bench_operator", "dense_comparison", ["--ns", "100"], "--ns: only with --part sweep or matvec (--part all"),
        (
            "bench_operator",
            "matvec_compare",
            ["--part", "matvec", "--ns", "100,200"],
            "--part matvec times one n, got 2",
        ),
        (
            "bench_operator",
            "run_sweep",
            ["--part", "sweep", "--baseline", "HEAD"],
            "--baseline: only with --part matvec",
        ),
    ],
)
def test_benchmark_list_options_are_usage_errors(name, target, argv, message, monkeypatch, capsys):
    module = _example(name)
    monkeypatch.setattr(module, target, _stop)  # the benchmark started: the option was not refused
    assert message in _usage_error(module.main, ["--smoke", *argv], capsys)


@pytest.mark.parametrize(
    ("name", "target", "argv", "read", "expected"),
    [
        ("bench_groups", "run_factor", ["--rank", "2", "--ks", "40,60"], lambda call: call[:3], (3000, [40, 60], 2)),
        ("bench_groups", "run_prediction", ["--predict"], lambda call: call[:3], (4000, [1400], 300)),
        (
            "bench_operator",
            "run_sweep",
            ["--part", "sweep"],
            lambda call: call,
            ((10_000, 100_000), 2, (10, 100), None),
        ),
        (
            "bench_operator",
            "run_sweep",
            ["--part", "sweep", "--ns", "5000", "--ks", "10,40"],
            lambda call: call,
            ((5000,), 2, (10, 40), None),
        ),
        (
            "bench_operator",
            "matvec_compare",
            ["--part", "matvec", "--ns", "300"],
            lambda call: call[:2],
            (300, (10, 100)),
        ),
        ("bench_elecdemand_step", "run", ["--dtypes", "float64"], lambda call: call[0], torch.float64),
    ],
)
def test_benchmark_list_options_still_reach_the_run(name, target, argv, read, expected, monkeypatch):
    module = _example(name)
    calls: list = []
    monkeypatch.setattr(module, target, _recorder(calls))
    assert read(_stopped_at(module.main, ["--smoke", *argv], calls)) == expected


# ---------------------------------------------------------------------------- paper_cnn.py
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # the learning rate was never used: adagrad ran alone, tuned over its grid
        (
            ["--optimizers", "adagrad", "--lr", "adam=0.01"],
            "--lr gives a learning rate for adam, which is not run (--optimizers adagrad)",
        ),
        # full_matrix is left out with --model large (said on stdout); its --lr was then unused
        (
            ["--model", "large", "--optimizers", "adagrad,full_matrix", "--lr", "full_matrix=0.1,adagrad=0.1"],
            "--lr gives a learning rate for full_matrix, which is not run (--optimizers adagrad)",
        ),
        # the second one won silently
        (["--lr", "adagrad=0.1,adagrad=0.2"], "--lr 'adagrad=0.2': a second learning rate for adagrad"),
        # trained twice, the second run's results replacing the first's in the table and the JSON
        (["--optimizers", "adam,adagrad,adam"], "--optimizers: adam given twice; name each once"),
        (["--datasets", "digits,digits"], "--datasets: digits given twice; name each once"),
    ],
)
def test_paper_cnn_refuses_options_it_would_not_use(argv, message, monkeypatch, capsys):
    paper_cnn = _example("paper_cnn")
    monkeypatch.setattr(paper_cnn, "load_digits32", _stop)  # training started: the option was not refused
    assert message in _usage_error(paper_cnn.main, ["--smoke", "--datasets", "digits", *argv], capsys)


def test_paper_cnn_fixed_learning_rates_still_reach_the_run(monkeypatch):
    paper_cnn = _example("paper_cnn")
    images, labels = torch.zeros(10, 1, 32, 32), torch.zeros(10, dtype=torch.long)
    monkeypatch.setattr(paper_cnn, "load_digits32", lambda: (images, labels, images, labels))
    calls: list = []
    monkeypatch.setattr(paper_cnn, "run_dataset", _recorder(calls))
    argv = ["--smoke", "--datasets", "digits", "--optimizers", "adagrad,adam", "--lr", "adam=0.01"]
    call = _stopped_at(paper_cnn.main, argv, calls)
    assert call[3] == ["adagrad", "adam"] and call[8] == {"adam": 0.01}  # run_dataset(..., optimizers, ..., fixed_lr)


# ---------------------------------------------------------------------------- benchmarks.py
@pytest.mark.parametrize("device", ["foo", "gpu", "mps"])
def test_benchmarks_suite_refuses_a_device_that_is_not_cpu_or_cuda(device, monkeypatch, capsys, tmp_path):
    # --device foo was passed to every script (each failed) or to the GPU-size children (torch's RuntimeError), and
    # the failures replaced results.jsonl and summary.md in --out-dir
    benchmarks = _example("benchmarks")
    monkeypatch.setattr(benchmarks, "run_suite", _stop)
    monkeypatch.setattr(benchmarks, "machine_record", lambda argv, device: {"suite": "machine"})
    argv = ["--smoke", "--out-dir", str(tmp_path / "bench"), "--device", device]
    assert f"--device: {device!r} is not cpu, cuda or cuda:N" in _usage_error(benchmarks.main, argv, capsys)
    assert not (tmp_path / "bench").exists()


def test_benchmarks_suite_keeps_its_clean_skip_without_cuda(monkeypatch, tmp_path):
    benchmarks = _example("benchmarks")
    monkeypatch.setattr(benchmarks, "run_suite", _stop)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA
    assert benchmarks.main(["--smoke", "--no-plots", "--out-dir", str(tmp_path), "--device", "cuda:1"]) == 0
    assert "CUDA is not available" in (tmp_path / "results.jsonl").read_text()


# ---------------------------------------------------------------------- bench_kernel_block_mean.py, bench_mixed.py
@pytest.mark.parametrize(
    ("name", "target", "argv", "message"),
    [
        # every case's subprocess failed ("unknown kernel" / kmeans_partition's k > n), each recorded as an error
        ("bench_kernel_block_mean", "run_case", ["--cases", "rbf,foo"], "argument --cases: unknown ['foo']; choose"),
        ("bench_kernel_block_mean", "run_case", ["--k", "5000"], "--k: at most --n 2000 blocks"),
        # int('abc') traceback; k = 0 a traceback in the sweep
        (
            "bench_kernel_block_mean",
            "run_k_sweep",
            ["--k-sweep", "abc"],
            "argument --k-sweep: expected comma-separated",
        ),
        ("bench_kernel_block_mean", "run_k_sweep", ["--k-sweep", "0,10"], "argument --k-sweep: expected numbers of"),
        # torch.randint traceback while the data were made; a traceback after the training iterations
        ("bench_mixed", "run", ["--levels", "0", "200"], "--levels must be two numbers of levels >= 1, got 0 200"),
        ("bench_mixed", "run", ["--predict", "-5"], "--predict must be at least 0 (0: no prediction), got -5"),
        # the inducing points are drawn from the n rows: silently 5,000 of them
        ("bench_mixed", "run", ["--inducing", "6000"], "--inducing 6000 is more than the --n 5000 rows"),
    ],
)
def test_benchmark_sizes_that_cannot_run_are_usage_errors(name, target, argv, message, monkeypatch, capsys):
    module = _example(name)
    monkeypatch.setattr(module, target, _stop)
    monkeypatch.setattr(subprocess, "run", _stop)  # bench_kernel_block_mean runs its cases in subprocesses
    assert message in _usage_error(module.main, ["--smoke", *argv], capsys)


def test_bench_kernel_block_mean_sweep_k_above_n(monkeypatch, capsys):
    # a k above n failed in kmeans_partition after the smaller k were timed
    module = _example("bench_kernel_block_mean")
    calls: list = []
    monkeypatch.setattr(module, "run_k_sweep", _recorder(calls))
    error = _usage_error(module.main, ["--n", "1000", "--k-sweep", "10,3000"], capsys)
    assert "--k-sweep: at most --n 1000 blocks (a block holds at least one point), got 3000" in error
    # benchmarks.py --smoke runs the sweep's k up to 5,000 at n = 2,000: --smoke keeps those up to n / 4, as before
    assert _stopped_at(module.main, ["--smoke", "--k-sweep", "10,100,1000,5000"], calls)[:3] == (2000, 4, [10, 100])


# ---------------------------------------------------------------------------- evaluate_gp.py, evaluate_mixed.py
@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        # the same fits ran twice and went into one row of the table: the mean counted them twice, and repeated
        # seeds (the same split) shrank the reported spread
        ("evaluate_gp", ["--blocks", "8,8"], "argument --blocks: 8 given twice in '8,8'; name each once"),
        ("evaluate_gp", ["--methods", "exact,blockmean,exact"], "argument --methods: exact given twice"),
        ("evaluate_gp", ["--datasets", "diabetes,diabetes"], "argument --datasets: diabetes given twice"),
        ("evaluate_mixed", ["--seeds", "0", "1", "0"], "--seeds: 0 given twice; name each once"),
        ("evaluate_mixed", ["--models", "groups", "groups"], "--models: groups given twice; name each once"),
        ("evaluate_mixed", ["--datasets", "exam", "exam"], "--datasets: exam given twice; name each once"),
    ],
)
def test_evaluations_refuse_a_list_item_given_twice(name, argv, message, capsys, tmp_path):
    module = _example(name)
    assert message in _usage_error(module.main, ["--smoke", "--out", str(tmp_path / "out"), *argv], capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # --predict ran alone and ignored the others; --posterior ignored --rank and --slope
        (["--predict", "--rank", "2"], "--predict and --rank are different benchmarks; pass one"),
        (["--posterior", "--slope"], "--posterior and --slope are different benchmarks; pass one"),
        (["--predict", "--posterior"], "--predict and --posterior are different benchmarks; pass one"),
        (["--rank", "2", "--slope"], "--rank and --slope are different benchmarks; pass one"),  # as before
    ],
)
def test_bench_groups_refuses_two_benchmarks_at_once(argv, message, monkeypatch, capsys):
    bench_groups = _example("bench_groups")
    for target in ("run_prediction", "run_posterior", "run_factor", "iteration_seconds"):
        monkeypatch.setattr(bench_groups, target, _stop)
    assert message in _usage_error(bench_groups.main, ["--smoke", *argv], capsys)


@pytest.mark.parametrize("noise", ["0", "-1", "nan"])
def test_bench_compositions_refuses_a_noise_scale_that_is_not_positive(noise, monkeypatch, capsys):
    # a diagonal d <= 0: the closed form's ValueError ("needs a positive per-point diagonal d") as a traceback, after
    # the other parts had run
    bench = _example("bench_compositions")
    for target in ("part_exact", "part_cg", "part_large"):
        monkeypatch.setattr(bench, target, _stop)
    error = _usage_error(bench.main, ["--smoke", "--noise", noise], capsys)
    assert f"--noise must be positive (it scales the noise diagonal d), got {noise}" in error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # each was read by one benchmark only and ignored by the others without a word
        (
            ["--predict", "--only", "general"],
            "--only is an option of the iteration benchmarks (default, --rank, --slope)",
        ),
        (["--posterior", "--repeats", "3"], "--repeats is an option of the iteration benchmarks"),
        (["--t", "50"], "--t is an option of --predict; this run would ignore it"),
        (["--rank", "2", "--no-before"], "--no-before is an option of --predict; this run would ignore it"),
        (["--posterior", "--cov-points", "10"], "--cov-points is an option of --predict; --posterior would ignore it"),
        (["--predict", "--max-draw-q", "10"], "--max-draw-q is an option of --posterior; --predict would ignore it"),
    ],
)
def test_bench_groups_refuses_an_option_of_another_benchmark(argv, message, monkeypatch, capsys):
    bench_groups = _example("bench_groups")
    for target in ("run_prediction", "run_posterior", "run_factor", "iteration_seconds"):
        monkeypatch.setattr(bench_groups, target, _stop)
    assert message in _usage_error(bench_groups.main, ["--smoke", *argv], capsys)


@pytest.mark.parametrize(
    ("target", "argv", "read", "expected"),
    [
        ("iteration_seconds", [], lambda call: call, (3000, 50, False, 2)),  # defaults: both paths, 2 repeats
        ("iteration_seconds", ["--only", "general", "--repeats", "3"], lambda call: call, (3000, 50, True, 3)),
        ("run_factor", ["--slope", "--only", "elementwise"], lambda call: call, (3000, [300], 0, ["factor"], 2)),
        ("run_posterior", ["--posterior"], lambda call: call, (3000, [300], 6000)),
        ("run_posterior", ["--posterior", "--max-draw-q", "0"], lambda call: call, (3000, [300], 0)),
        ("run_prediction", ["--predict"], lambda call: call, (4000, [1400], 300, 2000, True)),
        (
            "run_prediction",
            ["--predict", "--t", "40", "--cov-points", "30", "--no-before"],
            lambda call: call,
            (4000, [1400], 40, 30, False),
        ),
    ],
)
def test_bench_groups_options_still_reach_their_benchmark(target, argv, read, expected, monkeypatch):
    bench_groups = _example("bench_groups")
    calls: list = []
    monkeypatch.setattr(bench_groups, target, _recorder(calls))
    assert read(_stopped_at(bench_groups.main, ["--smoke", *argv], calls)) == expected


@pytest.mark.parametrize(
    ("name", "target", "argv", "message"),
    [
        # the sweep times RBF-ARD of this version: --cases and --baseline were ignored
        (
            "bench_kernel_block_mean",
            "run_k_sweep",
            ["--k-sweep", "10", "--cases", "rbf"],
            "--cases: an option of the per-case runs, not of --k-sweep",
        ),
        (
            "bench_kernel_block_mean",
            "run_k_sweep",
            ["--k-sweep", "10", "--baseline", "old.py"],
            "--baseline: an option of the per-case runs",
        ),
        ("bench_kernel_block_mean", "run_k_sweep", ["--k-sweep", "10", "--k", "20"], "--k: an option of the per-case"),
        # --weight picks how the prediction is computed: without --predict it was ignored
        ("bench_mixed", "run", ["--weight", "formed"], "--weight formed: only with --predict T"),
    ],
)
def test_benchmarks_refuse_options_of_the_mode_not_run(name, target, argv, message, monkeypatch, capsys):
    module = _example(name)
    monkeypatch.setattr(module, target, _stop)
    assert message in _usage_error(module.main, ["--smoke", *argv], capsys)


def test_bench_mixed_weight_still_reaches_the_prediction(monkeypatch):
    from bma_gp.kernels import sum_prediction_strategy

    bench_mixed = _example("bench_mixed")
    calls: list = []
    monkeypatch.setattr(bench_mixed, "run", _recorder(calls))
    # --weight formed raises the package's threshold for the rest of the process (a script's choice): restored after
    threshold = sum_prediction_strategy._DENSE_WEIGHT_MAX_ELIMINATED
    monkeypatch.setattr(sum_prediction_strategy, "_DENSE_WEIGHT_MAX_ELIMINATED", threshold)
    assert _stopped_at(bench_mixed.main, ["--smoke", "--predict", "10"], calls)[5:] == (10, "auto")
    assert _stopped_at(bench_mixed.main, ["--smoke", "--predict", "10", "--weight", "formed"], calls)[5:] == (
        10,
        "formed",
    )


def test_evaluate_gp_says_which_k_it_leaves_out_and_stops_when_nothing_is_left(monkeypatch, capsys, tmp_path):
    # a k above a data set's training rows was dropped without a word; when that left nothing to fit, the run replaced
    # results.jsonl, results.md and summary.json in --out (by default the documented results) with empty ones and
    # then ended in matplotlib's "Number of columns must be a positive integer, not 0"
    evaluate_gp = _example("evaluate_gp")
    monkeypatch.setattr(evaluate_gp, "warm_up", lambda *args: None)
    calls: list = []
    monkeypatch.setattr(evaluate_gp, "run_fit", _recorder(calls))
    argv = ["--smoke", "--datasets", "diabetes", "--methods", "sgpr", "--out", str(tmp_path / "a")]
    fit = _stopped_at(evaluate_gp.main, [*argv, "--blocks", "8,500"], calls)[0]
    assert (fit.method, fit.k) == ("sgpr", 8)
    assert "diabetes: k = 500 left out, above its 96 training rows" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        evaluate_gp.main([*argv[:-1], str(tmp_path / "b"), "--blocks", "200,500"])
    assert "evaluate_gp: nothing to fit: every k is above the training rows" in str(exit_info.value.code)
    assert not (tmp_path / "b").exists()


def test_bench_compositions_noise_comparison_follows_smoke(monkeypatch):
    # --smoke --noise 0.1 ran the n = 2x10^4 comparison, three repeats of the generic CG path, not the smoke size
    bench = _example("bench_compositions")
    calls: list = []
    monkeypatch.setattr(bench, "part_cg", lambda *args, **kwargs: calls.append((args, kwargs)) or _stop())
    with pytest.raises(_Stop):
        bench.main(["--smoke", "--part", "cg", "--noise", "0.1"])
    assert calls[-1] == ((600, 10, 30, 4), {"dtype": torch.float64, "repeats": 1, "noise": 0.1})
    with pytest.raises(_Stop):
        bench.main(["--part", "cg", "--noise", "0.1"])  # the full run: as before
    assert calls[-1] == ((20_000, 100, 500, 64), {"dtype": torch.float64, "repeats": 3, "noise": 0.1})


@pytest.mark.parametrize(
    ("name", "target", "argv", "message"),
    [
        # the same cases ran twice, in two rows of the output (benchmarks.py: the whole suite twice)
        (
            "bench_gp_iteration",
            "plan",
            ["--n", "100,100"],
            "argument --n: 100 given twice in '100,100'; name each once",
        ),
        ("bench_gp_iteration", "plan", ["--methods", "sgpr,sgpr"], "--methods: sgpr given twice; name each once"),
        ("bench_groups", "iteration_seconds", ["--ks", "50,50"], "argument --ks: 50 given twice in '50,50'"),
        ("bench_operator", "run_sweep", ["--part", "sweep", "--ks", "10,10"], "argument --ks: 10 given twice"),
        ("bench_elecdemand_step", "run", ["--dtypes", "float32,float32"], "argument --dtypes: float32 given twice"),
        ("bench_kernel_block_mean", "run_case", ["--cases", "rbf,rbf"], "argument --cases: rbf given twice"),
        ("bench_kernel_block_mean", "run_k_sweep", ["--k-sweep", "10,10"], "argument --k-sweep: 10 given twice"),
        ("benchmarks", "run_suite", ["--only", "gp,gp"], "--only: gp given twice; name each once"),
    ],
)
def test_benchmark_lists_refuse_an_item_given_twice(name, target, argv, message, monkeypatch, capsys, tmp_path):
    module = _example(name)
    monkeypatch.setattr(module, target, _stop)
    monkeypatch.setattr(subprocess, "run", _stop)  # bench_kernel_block_mean runs its cases in subprocesses
    out = ["--out-dir", str(tmp_path / "bench")] if name == "benchmarks" else []
    assert message in _usage_error(module.main, ["--smoke", *out, *argv], capsys)
    assert not (tmp_path / "bench").exists()


def test_bench_compositions_generic_side_is_linear_operators_cg():
    # from e582a24 on, a SumLinearOperator built directly around block mean operators is routed to the closed form,
    # and the suite's "generic CG path" was the closed form itself (0 products, "1x" against it)
    from linear_operator.operators import SumLinearOperator

    bench = _example("bench_compositions")
    inputs = bench.make_inputs(300, 6, 20, 3, torch.float64, seed=1)
    x = bench.leaves(inputs)
    op = bench.generic(inputs, x)
    assert isinstance(op, SumLinearOperator) and not isinstance(op, bma_gp.BlockMeanSumLinearOperator)
    with bench._CountProducts() as products, linear_operator.settings.max_cholesky_size(0):
        quad, logdet = op.inv_quad_logdet(inputs["y"], logdet=True)
    assert products.calls > 0
    exact = bench.closed_form(inputs, x).to_dense()
    y = inputs["y"]
    assert float(quad) == pytest.approx(float(y @ torch.linalg.solve(exact, y)), rel=1e-3)
