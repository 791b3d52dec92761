"""Audit of ``bma_gp.settings`` and the non-benchmark example scripts, as a GPyTorch user would use them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linear_operator.operators import DiagLinearOperator

from bma_gp import BlockMeanLinearOperator, Partition, settings


# ---------------------------------------------------------------------------- the settings themselves
@pytest.mark.parametrize("state", ["false", "no", None, 2, 0.5])
def test_validate_rejects_non_bool_state(state):
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
