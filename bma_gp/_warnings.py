"""The package's warning categories, in a module of their own so that every module can import them."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator

__all__ = [
    "ClosedFormFallbackWarning",
    "quiet_elementwise",
    "warn_dense_cholesky",
    "warn_dense_eigh",
    "warn_elementwise",
]

#: how many :func:`quiet_elementwise` blocks are open in this thread
_quiet = threading.local()


def _package_dir(module: str) -> str | None:
    found = sys.modules.get(module)
    path = getattr(found, "__file__", None)
    return os.path.dirname(os.path.abspath(path)) + os.sep if path else None


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function that calls this one that names the first frame
    outside this package and the libraries it is called through (linear_operator's methods, GPyTorch's models and
    distributions, torch's wrappers): the user's line, whatever path led to the warning (``warnings.warn``'s
    ``skip_file_prefixes`` needs Python 3.12)."""
    dirs = tuple(d for d in (_package_dir(m) for m in ("bma_gp", "linear_operator", "gpytorch", "torch")) if d)
    frame = sys._getframe(1)  # the function that warns: stacklevel 1
    level = 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(dirs):
        frame = frame.f_back
        level += 1
    return level


class ClosedFormFallbackWarning(UserWarning):
    """An operation leaves the closed forms: a sum holds a block mean operator but also a summand without a closed
    form, a triangular factor is asked of a structured operator, or GPyTorch bypasses the closed-form prediction.
    linear_operator's or GPyTorch's generic path (dense factorisations, CG, Lanczos) is used instead, as the
    message says."""


def warn_dense_cholesky(op) -> None:
    """Say that a Cholesky factor of the structured operator ``op`` is a dense ``n x n`` factorisation (and, under
    ``fast_computations(log_prob=False)``, that the setting is what asks for it: GPyTorch's
    ``MultivariateNormal.log_prob``, the marginal likelihood, then uses torch's, which factorises the covariance)."""
    from linear_operator import settings

    cause = (
        " gpytorch.settings.fast_computations(log_prob=False) is on: GPyTorch then computes "
        "MultivariateNormal.log_prob (the marginal likelihood) with torch's distribution, which asks for this factor; "
        "leave log_prob on (the default) for the closed-form inv_quad_logdet."
        if settings.fast_computations.log_prob.off()
        else ""
    )
    warnings.warn(
        f"cholesky of a {type(op).__name__} (n = {op.shape[-1]}) factorises the dense n x n matrix: a triangular "
        "factor has no closed form. root_decomposition() gives a closed-form root R with R R^T = M (for sampling), "
        f"and logdet() the log-determinant (an entropy is n/2 (1 + log 2 pi) + logdet / 2).{cause}",
        ClosedFormFallbackWarning,
        stacklevel=caller_stacklevel(),
    )


def warn_dense_eigh(op) -> None:
    """Say that an eigendecomposition of ``op`` (no closed-form spectrum) is a dense ``n x n`` one."""
    warnings.warn(
        f"eigendecomposition of a {type(op).__name__} (n = {op.shape[-1]}): this operator has no closed-form "
        "spectrum (only a single BlockMeanLinearOperator has one), so the dense n x n matrix is decomposed "
        "(diagonalization() runs Lanczos instead above max_cholesky_size).",
        ClosedFormFallbackWarning,
        stacklevel=caller_stacklevel(),
    )


@contextlib.contextmanager
def quiet_elementwise() -> Iterator[None]:
    """No :func:`warn_elementwise` inside the block (this thread only): for a kernel product evaluated in eval mode,
    where the test-by-test covariance is never solved with and a training covariance that leaves the closed forms
    is announced by the solves against it."""
    depth = getattr(_quiet, "depth", 0)
    _quiet.depth = depth + 1
    try:
        yield
    finally:
        _quiet.depth = depth


def warn_elementwise(op, other) -> None:
    """Say that the elementwise product of the structured operator ``op`` with ``other`` leaves the closed forms
    (not inside :func:`quiet_elementwise`)."""
    if getattr(_quiet, "depth", 0):
        return
    n = op.shape[-1]
    warnings.warn(
        f"elementwise product of a {type(op).__name__} (n = {n}) with a {type(other).__name__}: it has no closed "
        "form (two block mean operators multiply into one, and a sum of them times one into a sum), so the product "
        f"is formed densely, {n} x {n} with exact entries, and its solves and log-determinants take the generic "
        "path (dense Cholesky up to max_cholesky_size, CG and Lanczos beyond; LU where the product is not "
        "symmetric).",
        ClosedFormFallbackWarning,
        stacklevel=caller_stacklevel(),
    )
