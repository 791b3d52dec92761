"""Package-wide switches, used as context managers (like ``linear_operator.settings``)."""

from __future__ import annotations

__all__ = ["validate"]


class validate:
    """Validate definiteness and singularity in the closed forms (default: on).

    The checks read a few numbers back from the device (a host synchronisation). Code that
    must not synchronise, such as a training step on a GPU, can switch them off::

        with bma_gp.settings.validate(False):
            root = op.matrix_inv_sqrt()

    With validation off, an indefinite or singular matrix gives ``nan``/``inf`` instead of a
    ``ValueError``; square roots clamp negative eigenvalues to zero.
    """

    _state: bool = True

    def __init__(self, state: bool = True):
        self.state = bool(state)
        self._previous = None

    @classmethod
    def on(cls) -> bool:
        return cls._state

    @classmethod
    def off(cls) -> bool:
        return not cls._state

    def __enter__(self):
        self._previous = validate._state
        validate._state = self.state
        return self

    def __exit__(self, *exc):
        validate._state = self._previous
        return False
