"""Functions of small symmetric matrices with a backward pass that survives repeated eigenvalues.

``torch.linalg.eigh`` differentiates through the eigenvectors, whose derivative divides by
eigenvalue gaps; for a matrix function :math:`f(C)` the gaps cancel analytically
(Daleckii-Krein):

.. math::
    \\mathrm{d}f(C) = V \\left( \\Gamma \\circ (V^\\top \\mathrm{d}C\\, V) \\right) V^\\top, \\qquad
    \\Gamma_{ij} = \\frac{f(e_i) - f(e_j)}{e_i - e_j} \\ (e_i \\ne e_j), \\quad \\Gamma_{ii} = f'(e_i).

Using this formula, with :math:`f'` where two eigenvalues (nearly) coincide, gives finite,
accurate gradients for block mean matrices, whose core matrices often have clustered spectra.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bma_gp._autograd import first_order_only, reverse_mode_only

EigenvalueFunction = Callable[[Tensor], Tensor]


def _derivative(fn: EigenvalueFunction, e: Tensor) -> Tensor:
    """Elementwise derivative of ``fn`` at ``e`` through autograd (``fn`` maps elementwise)."""
    with torch.enable_grad():
        e_ = e.detach().requires_grad_(True)
        (d,) = torch.autograd.grad(fn(e_).sum(), e_, allow_unused=True)
    if d is None:  # fn ignores its input: a constant function
        d = torch.zeros_like(e)
    return d


def divided_differences(fn: EigenvalueFunction, e: Tensor, fe: Tensor) -> Tensor:
    """Matrix :math:`\\Gamma` of first divided differences of ``fn`` at the eigenvalues ``e``.

    Args:
        fn: the elementwise function.
        e: eigenvalues. # shape: (*batch, k)
        fe: ``fn(e)``. # shape: (*batch, k)

    Returns:
        # shape: (*batch, k, k)
    """
    de = e.unsqueeze(-1) - e.unsqueeze(-2)
    df = fe.unsqueeze(-1) - fe.unsqueeze(-2)
    scale = torch.maximum(e.abs().unsqueeze(-1), e.abs().unsqueeze(-2))
    tiny = torch.finfo(e.dtype).tiny
    close = de.abs() <= (torch.finfo(e.dtype).eps ** 0.5) * scale.clamp_min(tiny**0.5)
    deriv = _derivative(fn, e)
    mean_deriv = 0.5 * (deriv.unsqueeze(-1) + deriv.unsqueeze(-2))
    safe_de = torch.where(close, torch.ones_like(de), de)
    return torch.where(close, mean_deriv, df / safe_de)


def nan_safe_eigh(C: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh(C)``, with NaN eigenvalues and eigenvectors for a matrix of the batch that holds NaN or inf
    instead of LAPACK's ``LinAlgError`` (which it raises for some such matrices): with
    :class:`bma_gp.settings.validate` off, non-finite input gives NaN, not an exception. No host synchronisation.
    # shape: (*batch, k), (*batch, k, k)"""
    finite, safe = _finite_or_identity(C)
    e, V = torch.linalg.eigh(safe)
    nan = torch.full((), float("nan"), dtype=e.dtype, device=e.device)
    return torch.where(finite[..., None], e, nan), torch.where(finite[..., None, None], V, nan)


def nan_safe_eigvalsh(C: Tensor) -> Tensor:
    """``torch.linalg.eigvalsh(C)`` as :func:`nan_safe_eigh` gives them. # shape: (*batch, k)"""
    finite, safe = _finite_or_identity(C)
    e = torch.linalg.eigvalsh(safe)
    return torch.where(finite[..., None], e, torch.full((), float("nan"), dtype=e.dtype, device=e.device))


def _finite_or_identity(C: Tensor) -> tuple[Tensor, Tensor]:
    """Whether each matrix of the batch is finite, and ``C`` with the identity in place of those that are not."""
    finite = torch.isfinite(C).flatten(-2).all(-1)  # (*batch,)
    eye = torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
    return finite, torch.where(finite[..., None, None], C, eye)


@reverse_mode_only(
    "the closed-form matrix function of a dense B (roots, inverse roots, sqrt_inv_matmul, matrix_function)"
)
class SymmetricMatrixFunction(torch.autograd.Function):
    """:math:`f(C)` for a batch of symmetric matrices ``C`` via ``eigh``, differentiable in ``C``."""

    @staticmethod
    def forward(ctx, C: Tensor, fn: EigenvalueFunction, prepare: Callable[[Tensor], Tensor] | None):
        e, V = nan_safe_eigh(C)
        if prepare is not None:
            e = prepare(e)
        fe = fn(e)
        ctx.fn = fn
        ctx.save_for_backward(e, fe, V)
        return (V * fe.unsqueeze(-2)) @ V.mT

    @staticmethod
    @first_order_only("the closed-form matrix functions (roots, inverse roots, sqrt_inv_matmul, matrix_sqrt)")
    def backward(ctx, grad_out: Tensor):
        e, fe, V = ctx.saved_tensors
        grad_sym = 0.5 * (grad_out + grad_out.mT)
        gamma = divided_differences(ctx.fn, e, fe)
        inner = V.mT @ grad_sym @ V
        grad_C = V @ (gamma * inner) @ V.mT
        return grad_C, None, None


def symmetric_matrix_function(
    C: Tensor, fn: EigenvalueFunction, prepare: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Apply ``fn`` to the eigenvalues of the symmetric matrices ``C`` (``prepare`` may clamp them first)."""
    return SymmetricMatrixFunction.apply(C, fn, prepare)


@reverse_mode_only(
    "the closed-form matrix function of a dense B (roots, inverse roots, sqrt_inv_matmul, matrix_function)"
)
class _TwoMatrixFunctions(torch.autograd.Function):
    """:math:`(f(C), g(C))` from one ``eigh``, each differentiable in ``C`` as in :class:`SymmetricMatrixFunction`."""

    @staticmethod
    def forward(ctx, C: Tensor, fn: EigenvalueFunction, gn: EigenvalueFunction):
        e, V = nan_safe_eigh(C)
        fe, ge = fn(e), gn(e)
        ctx.fns = (fn, gn)
        ctx.save_for_backward(e, fe, ge, V)
        return (V * fe.unsqueeze(-2)) @ V.mT, (V * ge.unsqueeze(-2)) @ V.mT

    @staticmethod
    @first_order_only("the closed-form matrix functions (roots, inverse roots, sqrt_inv_matmul, matrix_sqrt)")
    def backward(ctx, grad_f: Tensor | None, grad_g: Tensor | None):
        e, fe, ge, V = ctx.saved_tensors
        inner = None
        for grad, fn, values in ((grad_f, ctx.fns[0], fe), (grad_g, ctx.fns[1], ge)):
            if grad is None:
                continue
            term = divided_differences(fn, e, values) * (V.mT @ (0.5 * (grad + grad.mT)) @ V)
            inner = term if inner is None else inner + term
        if inner is None:
            return None, None, None
        return V @ inner @ V.mT, None, None


def symmetric_matrix_functions(C: Tensor, fn: EigenvalueFunction, gn: EigenvalueFunction) -> tuple[Tensor, Tensor]:
    """:math:`(f(C), g(C))` for two functions of the same symmetric matrices, from one eigendecomposition."""
    return _TwoMatrixFunctions.apply(C, fn, gn)


def rounding_floor(e: Tensor) -> Tensor:
    """``4 k eps`` times the largest ``|e|`` along the last dimension (size ``k``): eigenvalues at or below it are
    zero within the rounding of the matrix they come from. Detached. # shape: (*batch, 1)"""
    eps = torch.finfo(e.dtype).eps
    return 4 * e.shape[-1] * eps * e.detach().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def floored_sqrt(e: Tensor) -> Tensor:
    """:math:`\\sqrt{e}` for eigenvalues above :func:`rounding_floor` and 0, with derivative 0, at or below it.

    The square root has an infinite derivative at 0, and an eigenvalue that is 0 up to rounding (a rank-deficient
    covariance, a smooth kernel's block mean posterior) made every gradient through a root NaN. Such an eigenvalue
    is treated as exactly 0: the root changes by at most the square root of the floor, its square by the floor."""
    kept = e > rounding_floor(e)
    return torch.where(kept, torch.where(kept, e, torch.ones_like(e)).sqrt(), torch.zeros_like(e))
