"""A context manager that makes every iterative or dense n x n path raise.

Used by the GP tests to prove that training and prediction with block mean kernels take the
closed forms only: linear_operator's CG and Lanczos raise unconditionally; Cholesky,
eigendecompositions, LU solves and inverses raise on matrices of size ``>= n`` (the
``k x k`` core problems of the block mean operator stay allowed).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch


class ForbiddenPath(AssertionError):
    pass


def _refuse(name):
    def fn(*args, **kwargs):
        raise ForbiddenPath(f"{name} was called")
    return fn


def _size_limited(name, original, limit):
    def fn(A, *args, **kwargs):
        if A.shape[-1] >= limit:
            raise ForbiddenPath(f"{name} on a {tuple(A.shape)} matrix (limit {limit})")
        return original(A, *args, **kwargs)
    return fn


@contextlib.contextmanager
def closed_forms_only(n: int):
    """Raise on CG, Lanczos, psd_safe_cholesky and any dense factorisation of size >= ``n``."""
    patches = [
        mock.patch("linear_operator.utils.linear_cg", new=_refuse("linear_cg")),
        mock.patch("linear_operator.utils.linear_cg.linear_cg", new=_refuse("linear_cg")),
        mock.patch("linear_operator.utils.lanczos.lanczos_tridiag", new=_refuse("lanczos_tridiag")),
        mock.patch("linear_operator.utils.stochastic_lq.lanczos_tridiag", new=_refuse("lanczos_tridiag")),
        mock.patch("linear_operator.utils.cholesky.psd_safe_cholesky", new=_refuse("psd_safe_cholesky")),
        mock.patch("linear_operator.operators._linear_operator.psd_safe_cholesky", new=_refuse("psd_safe_cholesky")),
        mock.patch("gpytorch.models.exact_prediction_strategies.psd_safe_cholesky",
                   new=_refuse("psd_safe_cholesky")),
    ]
    for mod, name in [(torch.linalg, "cholesky"), (torch.linalg, "cholesky_ex"), (torch, "cholesky"),
                      (torch.linalg, "eigh"), (torch.linalg, "eigvalsh"), (torch.linalg, "solve"),
                      (torch.linalg, "solve_ex"), (torch.linalg, "inv"), (torch.linalg, "lu_factor"),
                      (torch.linalg, "slogdet"), (torch, "cholesky_solve")]:
        patches.append(mock.patch.object(mod, name, new=_size_limited(name, getattr(mod, name), n)))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield
