"""The package's exception classes, in a module of their own so that every module can import them."""

from __future__ import annotations

from linear_operator.utils.errors import NotPSDError

__all__ = ["NotPositiveDefiniteError"]


class NotPositiveDefiniteError(ValueError, NotPSDError):
    """A closed form that needs a positive definite (or semidefinite) matrix found that this one is not.

    A ``ValueError``, as the package's other refusals of bad input are, and linear_operator's ``NotPSDError``, which
    its dense Cholesky raises for the same matrix: code written for linear_operator and GPyTorch (a training loop
    that catches ``NotPSDError`` and retries with other hyperparameters) catches it unchanged.
    """
