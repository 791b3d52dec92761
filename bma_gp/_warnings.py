"""The package's warning categories, in a module of their own so that every module can import them."""

from __future__ import annotations

__all__ = ["ClosedFormFallbackWarning"]


class ClosedFormFallbackWarning(UserWarning):
    """An operation leaves the closed forms: a sum holds a block mean operator but also a summand without a closed
    form, a triangular factor is asked of a structured operator, or GPyTorch bypasses the closed-form prediction.
    linear_operator's or GPyTorch's generic path (dense factorisations, CG, Lanczos) is used instead, as the
    message says."""
