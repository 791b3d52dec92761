"""Audit of ``bma_gp.settings`` and the non-benchmark example scripts, as a GPyTorch user would use them."""

from __future__ import annotations

import numpy as np
import pytest

from bma_gp import settings


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
