"""Package-wide switches, used as context managers (like ``linear_operator.settings``)."""

from __future__ import annotations

import operator

import numpy as np

__all__ = ["fast_root_products", "max_capacitance_size", "validate"]


class _Switch:
    """A process-wide on/off setting, used as a context manager; each subclass keeps its own ``_state``."""

    _state: bool

    def __init__(self, state: bool = True):
        # bool("false") is True: a string or None would silently pick a state; 1.0 == True and a one-element tensor
        # compare equal too, so the type is checked (a bool, or an int 0 / 1, numpy's included)
        exact = isinstance(state, (bool, np.bool_)) or (isinstance(state, (int, np.integer)) and state in (0, 1))
        if not exact:
            raise TypeError(f"bma_gp.settings.{type(self).__name__} takes True or False, got {state!r}.")
        self.state = bool(state)
        self._previous: list[bool] = []  # a stack: the same instance may be entered again inside itself

    @classmethod
    def on(cls) -> bool:
        return cls._state

    @classmethod
    def off(cls) -> bool:
        return not cls._state

    def __enter__(self):
        self._previous.append(type(self)._state)
        type(self)._state = self.state
        return self

    def __exit__(self, *exc):
        type(self)._state = self._previous.pop()
        return False


class validate(_Switch):
    """Validate the input, definiteness and singularity in the closed forms (default: on).

    With validation on, every closed form of a block mean operator beyond products (solves,
    log-determinants, roots, matrix functions, eigenvalues, the core factorisation) raises a
    ``ValueError`` that names the cause: NaN or inf in ``lam`` or ``B`` (entry and batch index), a
    singular matrix, and, where the form needs a positive (semi)definite matrix (log-determinants,
    ``inv_quad_logdet``, square roots and inverse roots), a non-positive block offset or core
    eigenvalue. Solves, eigenvalues and matrix functions need no definiteness: an invertible
    indefinite matrix is solved exactly.

    The checks read a few numbers back from the device (a host synchronisation). Code that
    must not synchronise, such as a training step on a GPU, can switch them off::

        with bma_gp.settings.validate(False):
            root = op.matrix_inv_sqrt()

    With validation off, non-finite input or a singular matrix gives ``nan``/``inf`` instead of a
    ``ValueError`` (``solve`` included), and an indefinite matrix a ``nan`` log-determinant; square roots
    (``matrix_sqrt``, ``root_decomposition``, draws) clamp negative eigenvalues to zero and inverse roots
    are NaN where one is negative. A block mean operator clamps those of :math:`M`; a
    :class:`~bma_gp.BlockMeanSumLinearOperator` those of :math:`D^{-1/2} M D^{-1/2}` (its root is
    :math:`D^{1/2}` times that matrix's), the same as :math:`M`'s when its diagonal :math:`d` is one
    constant or 0. Log-determinants follow ``torch.logdet`` of the dense matrix
    (NaN for a negative determinant, ``-inf`` for a zero one, finite for a positive one). An
    operator keeps what it computed with validation off apart from its checked results, so a later
    call with validation on checks again. So does an :class:`~gpytorch.models.ExactGP` in eval mode:
    a prediction strategy (with GPyTorch's mean and covariance caches) that a prediction used with
    validation off is rebuilt by the next prediction with validation on.

    The switch is process-wide (not per thread), as GPyTorch's settings are. ``state`` must be a
    bool (``True``/``False``, or 1/0); anything else raises a ``TypeError``.
    """

    _state: bool = True


class max_capacitance_size:
    """Largest capacitance matrix a sum of block mean operators may factorise (default: 10,000).

    :class:`~bma_gp.BlockMeanSumLinearOperator` solves through a dense matrix of size
    ``q = sum_j k_j + m`` (the levels of every partition plus the low-rank columns), less the levels
    of the largest diagonal grouping, at a cost of ``O(q^3)``. Past this limit it raises a
    ``ValueError`` that names ``q`` instead of starting a factorisation that may not fit::

        with bma_gp.settings.max_capacitance_size(20_000):
            model_loss.backward()

    The same limit bounds the other dense matrices whose size grows with the levels: the
    ``q x q`` eigendecomposition behind a sum's roots, the core of an elementwise product of two
    block mean operators over different partitions (one level per occupied pair of blocks), and
    the posterior weight and joint draws of GP prediction with a sum. Each error names the size and
    the ``with`` statement that raises the limit.

    ``value`` is an integer (a Python or NumPy int) of at least 0: a ``TypeError`` names any other
    type, a ``ValueError`` a negative number.
    """

    _value: int = 10_000

    def __init__(self, value: int):
        try:
            if isinstance(value, bool):
                raise TypeError
            value = operator.index(value)  # ints and NumPy / 0-d torch integers, not floats or strings
        except TypeError:
            raise TypeError(
                f"bma_gp.settings.max_capacitance_size takes an int >= 0 (the largest capacitance size to "
                f"factorise), got {value!r} of type {type(value).__name__}."
            ) from None
        if value < 0:
            raise ValueError(f"bma_gp.settings.max_capacitance_size takes an int >= 0, got {value}.")
        self.value_ = value
        self._previous: list[int] = []  # a stack: the same instance may be entered again inside itself

    @classmethod
    def value(cls) -> int:
        return cls._value

    def __enter__(self):
        self._previous.append(max_capacitance_size._value)
        max_capacitance_size._value = self.value_
        return self

    def __exit__(self, *exc):
        max_capacitance_size._value = self._previous.pop()
        return False


class fast_root_products(_Switch):
    r"""Form a float32 low-rank root's products in its own precision (default: off, in float64).

    :class:`~bma_gp.BlockMeanSumLinearOperator` needs three products with its root :math:`U`
    (``n x m``): the Gram matrix :math:`U^\top D^{-1} U`, the block sums
    :math:`P_j^\top D^{-1} U` and :math:`U^\top b`. For a float32 (or lower) :math:`U` they are
    formed in float64 by default, one row chunk of :math:`U` cast at a time: the log-determinant
    and solves are then those of :math:`U`'s own entries even when the sum is ill-conditioned. With
    this switch on, the Gram matrix and the block sums are formed in float32 and only accumulated
    in float64, which takes about 2.4 times less time for the Gram matrix at ``m = 256`` (and the
    whole ``n = 10^6`` training step of docs/benchmarks.md about 1.4 times less: 4.5 s against 6.4 s), but at
    condition numbers from about 10^6 (a small noise against nearly collinear root columns, as
    close inducing points give) the log-determinant can be off by more than 1, with no error::

        with bma_gp.settings.fast_root_products(True):
            loss = -mll(model(train_x), train_y)

    An operator keeps the products it formed first (solves, log-determinants and roots of the same
    operator reuse them); the setting applies to operators whose products are formed inside the
    ``with`` block, as a new training step's are. Float64 roots are not affected. The RBF
    inducing-point root that :class:`~bma_gp.kernels.ChunkedInducingPointKernel` keeps as its inputs in
    training computes its kernel blocks, :math:`U`'s blocks, their products and its backward pass in
    float64 from the float32 inputs by default (about 1.9 times the float32 step at ``n = 20,000``,
    ``m = 400``; its float32 gradients were up to 1650 times further off than GPyTorch's float32 SGPR);
    with this switch on, in float32 as before. The switch is process-wide, as :class:`validate`
    is; ``state`` must be a bool.
    """

    _state: bool = False
