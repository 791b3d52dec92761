"""Package-wide switches, used as context managers (like ``linear_operator.settings``)."""

from __future__ import annotations

__all__ = ["validate", "max_capacitance_size"]


class validate:
    """Validate the input, definiteness and singularity in the closed forms (default: on).

    With validation on, every closed form of a block mean operator beyond products (solves,
    log-determinants, roots, matrix functions, eigenvalues, the core factorisation) raises a
    ``ValueError`` that names the cause: NaN or inf in ``lam`` or ``B`` (entry and batch index),
    a non-positive block offset or core eigenvalue, a singular matrix.

    The checks read a few numbers back from the device (a host synchronisation). Code that
    must not synchronise, such as a training step on a GPU, can switch them off::

        with bma_gp.settings.validate(False):
            root = op.matrix_inv_sqrt()

    With validation off, non-finite input, an indefinite or a singular matrix gives
    ``nan``/``inf`` instead of a ``ValueError`` (``solve`` included); square roots clamp
    negative eigenvalues to zero.
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


class max_capacitance_size:
    """Largest capacitance matrix a sum of block mean operators may factorise (default: 10,000).

    :class:`~bma_gp.BlockMeanSumLinearOperator` solves through a dense matrix of size
    ``q = sum_j k_j + m`` (the levels of every partition plus the low-rank columns), less the levels
    of the largest diagonal grouping, at a cost of ``O(q^3)``. Past this limit it raises a
    ``ValueError`` that names ``q`` instead of starting a factorisation that may not fit::

        with bma_gp.settings.max_capacitance_size(20_000):
            model_loss.backward()
    """

    _value: int = 10_000

    def __init__(self, value: int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"max_capacitance_size must be a non-negative int, got {value!r}.")
        self.value_ = value
        self._previous: int | None = None

    @classmethod
    def value(cls) -> int:
        return cls._value

    def __enter__(self):
        self._previous = max_capacitance_size._value
        max_capacitance_size._value = self.value_
        return self

    def __exit__(self, *exc):
        max_capacitance_size._value = self._previous
        return False
