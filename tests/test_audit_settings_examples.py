"""Audit of ``bma_gp.settings`` and the non-benchmark example scripts, as a GPyTorch user would use them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import gpytorch
import numpy as np
import pytest
import torch
from linear_operator.operators import DiagLinearOperator

from bma_gp import BlockMeanLinearOperator, Partition, settings


# ---------------------------------------------------------------------------- the settings themselves
@pytest.mark.parametrize("state", ["false", "no", None, 2, 0.5, 1.0, 0.0, torch.tensor(True), np.float64(1.0)])
def test_validate_rejects_non_bool_state(state):
    # 1.0, 0.0 and torch.tensor(True) compare equal to True / False and were taken (user trial)
    # bool("false") is True: such a state silently kept (or dropped) the checks
    with pytest.raises(TypeError, match=r"bma_gp\.settings\.validate takes True or False"):
        settings.validate(state)
    assert settings.validate.on()


@pytest.mark.parametrize("value", [1.5, 10.0, "10", None, True])
def test_max_capacitance_size_rejects_non_int_with_type_error(value):
    with pytest.raises(TypeError, match=r"bma_gp\.settings\.max_capacitance_size takes an int >= 0"):
        settings.max_capacitance_size(value)


def test_max_capacitance_size_negative_and_numpy_int():
    with pytest.raises(ValueError, match=r"max_capacitance_size takes an int >= 0, got -1"):
        settings.max_capacitance_size(-1)
    with settings.max_capacitance_size(np.int64(7)):  # e.g. from np.prod of a table's shape
        assert settings.max_capacitance_size.value() == 7
        assert type(settings.max_capacitance_size.value()) is int
    assert settings.max_capacitance_size.value() == 10_000


def test_same_instance_entered_twice_restores_the_default():
    off = settings.validate(False)
    with off:
        with off:
            assert settings.validate.off()
        assert settings.validate.off()
    assert settings.validate.on()  # was left off for good
    limit = settings.max_capacitance_size(5)
    with limit, settings.max_capacitance_size(7):
        with limit:
            assert settings.max_capacitance_size.value() == 5
        assert settings.max_capacitance_size.value() == 7
    assert settings.max_capacitance_size.value() == 10_000  # was left at 7


def test_settings_restore_on_exception():
    with pytest.raises(RuntimeError):
        with settings.validate(False), settings.max_capacitance_size(3):
            raise RuntimeError
    assert settings.validate.on() and settings.max_capacitance_size.value() == 10_000


# ---------------------------------------------------------------------------- validate and the operators' caches
def _partition() -> Partition:
    return Partition.from_labels(torch.tensor([0, 0, 1, 1, 1, 2]))


def _indefinite_block_mean() -> BlockMeanLinearOperator:
    B = torch.tensor([[1.0, 0.2, 0.0], [0.2, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return BlockMeanLinearOperator(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64), B, _partition())


@pytest.mark.parametrize("method", ["matrix_sqrt", "matrix_inv_sqrt", "root_inv_decomposition"])
def test_result_cached_with_validation_off_is_checked_when_on(method):
    M = _indefinite_block_mean()
    with settings.validate(False):
        getattr(M, method)()  # unchecked: clamped or NaN
    with pytest.raises(ValueError, match="needs a positive"):  # returned the unchecked result from the cache
        getattr(M, method)()


def test_block_mean_inverse_cached_with_validation_off_is_checked_when_on():
    M = BlockMeanLinearOperator(
        torch.tensor([float("nan"), 1.0, 1.0], dtype=torch.float64), torch.eye(3, dtype=torch.float64), _partition()
    )
    rhs = torch.ones(6, dtype=torch.float64)
    with settings.validate(False):
        assert torch.isnan(M.solve(rhs)).any()
    with pytest.raises(ValueError, match=r"not finite: lam\[0\] = nan"):
        M.solve(rhs)


def test_sum_capacitance_factorised_with_validation_off_is_checked_when_on():
    d = torch.float64
    crossed = Partition.from_labels(torch.tensor([0, 1, 0, 1, 0, 1]))
    S = (
        DiagLinearOperator(torch.full((6,), 0.1, dtype=d))
        + BlockMeanLinearOperator(torch.zeros(3, dtype=d), torch.ones(3, dtype=d), _partition(), diagonal=True)
        + BlockMeanLinearOperator(torch.zeros(2, dtype=d), torch.tensor([-5.0, 1.0], dtype=d), crossed, diagonal=True)
    )  # one negative eigenvalue: not positive definite
    with settings.validate(False):
        assert torch.isnan(S.logdet())
    with pytest.raises(ValueError, match="not positive definite"):  # was NaN from the cached capacitance
        S.logdet()
    with settings.validate(False):  # a checked factorisation serves validation off as well
        assert torch.isnan(S.logdet())


# ---------------------------------------------------------------------------- the example scripts
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"audit_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _usage_error(main, argv, capsys) -> str:
    """Run ``main(argv)``, expect argparse's exit status 2, return the error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--block-weeks", "0"], "--block-weeks must be at least 1, got 0"),  # was silently 1
        (["--iters", "-1"], "--iters must be at least 0"),
        (["--test-years", "0"], "--test-years must be positive"),  # was RMSE nan
        (["--smoke", "--test-years", "100"], "leaves 0 training observations"),  # was an IndexError
        (["--smoke", "--block-weeks", "10000"], "fewer than one block of --block-weeks 10000"),
    ],
)
def test_gp_regression_rejects_bad_options(argv, message, capsys):
    pytest.importorskip("statsmodels")
    assert message in _usage_error(_example("gp_regression").main, argv, capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rank", "-1"], "--rank must be between 0 and the 864 groups, got -1"),
        (["--test-fraction", "1"], "--test-fraction must be strictly between 0 and 1"),  # was a Partition error
        (["--test-fraction", "0"], "--test-fraction must be strictly between 0 and 1"),
        (["--iters", "-3"], "--iters must be at least 0"),
    ],
)
def test_grouped_gp_rejects_bad_options(argv, message, capsys):
    assert message in _usage_error(_example("grouped_gp").main, argv, capsys)


def test_grouped_gp_model_with_rank_zero():
    # --rank 0 (independent groups, GroupKernel's diag(v) alone) crashed on the missing covar_factor
    example = _example("grouped_gp")
    x = torch.tensor([[0.0], [1.0], [1.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([0.5, -1.0, -0.8, 0.2], dtype=torch.float64)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = example.GroupedGP(x, y, likelihood, 3, 0).double()
    loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),  # was torch's RuntimeError
        (["--seeds", "0"], "argument --seeds: expected an integer >= 1, got 0"),  # was an empty run, status 0
        (["--blocks", "8,0"], "argument --blocks: expected an integer >= 1, got 0"),  # was a failed fit per k
        (["--test-fraction", "1.5"], "strictly between 0 and 1, got 1.5"),  # was RMSE nan
    ],
)
def test_evaluate_gp_rejects_bad_options(argv, message, capsys):
    assert message in _usage_error(_example("evaluate_gp").main, argv, capsys)


@pytest.mark.parametrize("name", ["evaluate_gp", "evaluate_mixed"])
def test_evaluations_table_only_without_records(name, tmp_path, capsys):
    missing = tmp_path / "typo"
    error = _usage_error(_example(name).main, ["--table-only", "--no-plot", "--out", str(missing)], capsys)
    assert "--table-only needs" in error and str(missing) in error  # was a FileNotFoundError traceback
    assert not missing.exists()  # and the mistyped folder was created
    error = _usage_error(_example(name).main, ["--table-only", "--smoke"], capsys)
    assert "--table-only with --smoke needs --out" in error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n-train", "0"], "argument --n-train: expected an integer >= 1, got 0"),
        (["--seeds", "-1"], "argument --seeds: expected an integer >= 0, got -1"),
        (["--time-limit", "-1"], "--time-limit must be >= 0 seconds"),
    ],
)
def test_evaluate_mixed_rejects_bad_options(argv, message, capsys):
    assert message in _usage_error(_example("evaluate_mixed").main, argv, capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--datasets", "digits,foo"], "--datasets: unknown ['foo']; choose from digits,mnist5k,cifar10"),  # KeyError
        (["--optimizers", "adam,foo"], "--optimizers: unknown ['foo']"),  # was a KeyError
        (["--lr", "bad"], "--lr 'bad': expected name=value"),  # was 'not enough values to unpack'
        (["--lr", "adam=x"], "must be a number"),
        (["--lr", "adam=-1"], "must be positive"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_paper_cnn_rejects_bad_options(argv, message, capsys):
    assert message in _usage_error(_example("paper_cnn").main, ["--smoke", *argv], capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "flights", "--n", "3"], "--n must be at least 5"),  # was 'labels must not be empty'
        (["--inducing", "-1"], "--inducing must be at least 0"),
        (["--lr", "0"], "--lr must be positive"),
    ],
)
def test_mixed_effects_gp_rejects_bad_options(argv, message, capsys):
    assert message in _usage_error(_example("mixed_effects_gp").main, argv, capsys)


@pytest.mark.parametrize("state", [True, False, 1, 0, np.bool_(True), np.int64(0)])
def test_switches_take_bools_and_zero_one(state):
    with settings.validate(state):
        assert settings.validate.on() is bool(state)
    assert settings.validate.on()
