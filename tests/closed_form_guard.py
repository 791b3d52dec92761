"""The one guard for "closed forms only" tests: iterative and dense n x n paths raise inside it.

Inside :func:`closed_forms_only`:

* linear_operator's iterative solvers raise whenever they are called: ``linear_cg``, ``minres``,
  ``lanczos_tridiag`` (also behind stochastic Lanczos quadrature) and ``contour_integral_quad``;
* linear_operator's ``psd_safe_cholesky`` (the dense Cholesky that ``solve``, ``inv_quad_logdet``
  and GPyTorch's prediction strategy fall back to) raises on a matrix of size ``>= n`` (SGPR's own
  ``m x m`` inducing-point Cholesky stays allowed);
* torch's dense factorisations (Cholesky, eigendecompositions, LU, solves, inverses,
  log-determinants) raise on a square matrix of size ``>= n``; smaller ones, such as the
  ``k x k`` core problem of a block mean operator, stay allowed.

A patch has to replace a function where it is *looked up*, not where it is defined: after
``from linear_operator.utils.cholesky import psd_safe_cholesky`` the importing module holds its
own reference, and patching ``linear_operator.utils.cholesky.psd_safe_cholesky`` does not reach
it. So the guard finds every module-level name bound to each function in the loaded modules of
linear_operator, GPyTorch, bma_gp and optim (and torch / torch.linalg for torch's functions)
and patches each of them.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from unittest import mock

import gpytorch  # noqa: F401  (loads the modules whose bindings are patched)
import linear_operator  # noqa: F401
import torch

__all__ = ["ForbiddenPath", "closed_forms_only"]


class ForbiddenPath(AssertionError):
    """Raised when code inside :func:`closed_forms_only` takes an iterative or dense n x n path."""


def _module(name: str) -> ModuleType:
    # import_module, not attribute access: linear_operator.utils.linear_cg is the function, which
    # linear_operator.utils re-exports under its module's name
    return importlib.import_module(name)


# (module, name) where each function is defined; the functions are read at patch time.
_ITERATIVE = [
    (_module("linear_operator.utils.linear_cg"), "linear_cg"),
    (_module("linear_operator.utils.minres"), "minres"),
    (_module("linear_operator.utils.lanczos"), "lanczos_tridiag"),
    (_module("linear_operator.utils.contour_integral_quad"), "contour_integral_quad"),
]
_LIBRARY_CHOLESKY = [(_module("linear_operator.utils.cholesky"), "psd_safe_cholesky")]
_DENSE = [
    (torch.linalg, name)
    for name in [
        "cholesky",
        "cholesky_ex",
        "eigh",
        "eigvalsh",
        "eig",
        "eigvals",
        "solve",
        "solve_ex",
        "inv",
        "inv_ex",
        "lu_factor",
        "lu_factor_ex",
        "slogdet",
        "det",
    ]
] + [(torch, name) for name in ["cholesky", "cholesky_solve", "cholesky_inverse", "logdet", "slogdet", "det"]]

_LIBRARIES = ("linear_operator", "gpytorch")
_ALL_PACKAGES = (*_LIBRARIES, "bma_gp", "optim")


def _loaded_modules(packages: tuple[str, ...]) -> list[ModuleType]:
    return [
        module
        for name, module in list(sys.modules.items())
        if isinstance(module, ModuleType) and any(name == p or name.startswith(p + ".") for p in packages)
    ]


def _bindings(fn: Callable, modules: list[ModuleType]) -> list[tuple[ModuleType, str]]:
    """Every ``(module, name)`` with ``module.name is fn``."""
    return [(module, name) for module in modules for name, value in list(vars(module).items()) if value is fn]


def _refuse(name: str) -> Callable:
    def refused(*args, **kwargs):
        raise ForbiddenPath(f"{name} was called")

    return refused


def _size_limited(name: str, original: Callable, limit: int) -> Callable:
    def limited(*args, **kwargs):
        for a in (*args, *kwargs.values()):
            if torch.is_tensor(a) and a.dim() >= 2 and a.shape[-1] == a.shape[-2] and a.shape[-1] >= limit:
                raise ForbiddenPath(f"{name} on a {tuple(a.shape)} matrix (allowed: smaller than {limit} x {limit})")
        return original(*args, **kwargs)

    return limited


@contextlib.contextmanager
def closed_forms_only(n: int) -> Iterator[None]:
    """Make CG, MINRES, Lanczos, contour quadrature and dense factorisations of size ``>= n`` raise.

    Args:
        n: the smallest matrix size a dense factorisation may not have. Pass the number of data
            points to allow every ``k x k`` problem with ``k < n``; pass ``k + 1`` to allow
            exactly the ``k x k`` core of a block mean operator and nothing larger.

    Raises:
        ForbiddenPath: inside the block, when a forbidden routine is called.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (the smallest forbidden matrix size), got {n!r}.")
    libraries = _loaded_modules(_LIBRARIES)
    everywhere = _loaded_modules(_ALL_PACKAGES)
    replacements: list[tuple[ModuleType, str, Callable]] = []
    for module, name in _ITERATIVE:
        fn = getattr(module, name)
        replacements += [(m, attr, _refuse(name)) for m, attr in _bindings(fn, [module, *libraries])]
    for module, name in _LIBRARY_CHOLESKY:  # small ones are fine: SGPR factorises its m x m inducing kernel
        fn = getattr(module, name)
        limited = _size_limited(f"{module.__name__}.{name}", fn, n)
        replacements += [(m, attr, limited) for m, attr in _bindings(fn, [module, *libraries])]
    for module, name in _DENSE:
        fn = getattr(module, name)
        limited = _size_limited(f"{module.__name__}.{name}", fn, n)
        replacements += [(m, attr, limited) for m, attr in _bindings(fn, [module, *everywhere])]
    with contextlib.ExitStack() as stack:
        seen = set()
        for module, attr, new in replacements:
            if (id(module), attr) not in seen:
                seen.add((id(module), attr))
                stack.enter_context(mock.patch.object(module, attr, new=new))
        yield
