"""The block mean linear operator: ``diag(lam[labels]) + P B P^T`` with closed-form algebra."""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable

import torch
from linear_operator.operators import ConstantMulLinearOperator, LinearOperator
from linear_operator.operators.diag_linear_operator import ConstantDiagLinearOperator, DiagLinearOperator
from linear_operator.operators.root_linear_operator import RootLinearOperator
from linear_operator.utils.broadcasting import _matmul_broadcast_shape
from linear_operator.utils.errors import CachingError
from linear_operator.utils.memoize import add_to_cache, clear_cache_hook, get_from_cache
from torch import Tensor

from bma_gp import settings
from bma_gp._autograd import (
    carries_tangent,
    diagonal_tangent,
    functorch_active,
    functorch_wrapped,
    has_forward_tangent,
    tracks_derivatives,
)
from bma_gp._broadcast import batch_constants, sum_to_shape, times_diagonal
from bma_gp._closed_roots import ClosedFormRoots, check_root_method
from bma_gp._core_backward import CoreCholeskySolve, CoreLogdet
from bma_gp._diagonal import diagonal_by_construction, is_diagonal
from bma_gp._errors import NotPositiveDefiniteError
from bma_gp._indexing import TorchIndexing
from bma_gp._low_rank_sum import LowRankInClosedForm
from bma_gp._pickling import PicklesWithoutCache
from bma_gp._precision import core_dtype
from bma_gp._samples import ClosedFormSamples
from bma_gp._symmetric_function import floored_sqrt, symmetric_matrix_function
from bma_gp._warnings import ClosedFormFallbackWarning, caller_stacklevel, warn_dense_cholesky
from bma_gp.partition import Partition, intersection

__all__ = ["BlockMeanLinearOperator"]


# ---------------------------------------------------------------------------- math helpers
def _is_noop(index) -> bool:
    return isinstance(index, slice) and index == slice(None, None, None)


def _fold_singletons(lam: Tensor, B: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
    """Give singleton blocks a placeholder ``lam_i`` that every ``f`` accepts, keeping ``lam_i + B_ii``.

    For a block of size one only ``v_i = lam_i + B_ii`` is visible; ``lam_i`` is not an eigenvalue.
    The placeholder is ``v_i`` itself when positive (then ``B_ii`` becomes 0 and ``C_ii = v_i``
    exactly, at any scale), else 1. Every ``f(lam_i)`` is then defined and cancels in the
    matrix-function formula.
    """
    folded, new_diag = _folded_diagonal(lam, torch.diagonal(B, dim1=-2, dim2=-1), sizes)
    batch = torch.broadcast_shapes(B.shape[:-2], new_diag.shape[:-1])
    return folded, torch.diagonal_scatter(B.expand(*batch, *B.shape[-2:]), new_diag.expand(*batch, -1), 0, -2, -1)


def _folded_diagonal(lam: Tensor, diag: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_fold_singletons`'s ``lam`` and the new diagonal of ``B``, from ``B``'s diagonal alone."""
    single = sizes == 1
    value = lam + diag
    placeholder = torch.where(value > 0, value, torch.ones_like(value))
    folded = torch.where(single, placeholder, lam)
    # a singleton's B_ii is set to v_i - placeholder, not B_ii + (lam_i - placeholder): past 2^53 (float64) the
    # difference lam_i - 1 rounds (lam = 2^60, B_ii = -(2^60 + 256): C_ii = -255 instead of -256)
    return folded, torch.where(single, value - folded, diag)


def _core(lam: Tensor, B: Tensor, root_sizes: Tensor) -> Tensor:
    """The k x k matrix ``C = diag(lam) + S^{1/2} B S^{1/2}`` that carries the spectrum on span(P)."""
    if tracks_derivatives(lam) or tracks_derivatives(B) or functorch_active():
        return torch.diag_embed(lam) + root_sizes.unsqueeze(-1) * B * root_sizes.unsqueeze(-2)
    # without derivatives in place: one k x k buffer where four were allocated (128 MB each at k = 4000, float64)
    C = (root_sizes.unsqueeze(-1) * B).mul_(root_sizes.unsqueeze(-2))
    C = (
        C.expand(*torch.broadcast_shapes(C.shape[:-2], lam.shape[:-1]), *C.shape[-2:]).clone()
        if (lam.shape[:-1] != C.shape[:-2])
        else C
    )
    C.diagonal(dim1=-2, dim2=-1).add_(lam)
    return C


def _rounding_hint(value: float, largest: float, dtype: torch.dtype) -> str:
    """A sentence for an eigenvalue ``value`` that is negative or zero only by the rounding of ``dtype`` (relative to
    the ``largest`` eigenvalue's magnitude, within 1000 of its ulps): a float32 kernel matrix plus a noise below its
    resolution is not positive definite once rounded; "" otherwise."""
    if not dtype.is_floating_point or largest <= 0:
        return ""
    if abs(value) > 1000 * torch.finfo(dtype).eps * largest:
        return ""
    if dtype == torch.float64:
        return (
            f" Its size is within float64's rounding of the largest eigenvalue ({largest:.6g}): the entries (a "
            "kernel's values, say) were computed to that resolution, and a noise or diagonal below it is lost in "
            "them. Use a larger noise (a GreaterThan constraint on it), or rescale the outputs so that the kernel's "
            "scale is nearer the noise's."
        )
    return (
        f" Its size is within {dtype}'s rounding of the largest eigenvalue ({largest:.6g}): the entries (a kernel's "
        f"values, say) were rounded to {dtype}, and a noise or diagonal below that resolution is lost in them. Use "
        "float64 (model.double(), or .double() on the inputs) or a larger noise (a GreaterThan constraint on it)."
    )


def _singular_hint(dtype: torch.dtype) -> str:
    """For a singular core: where a noise was added, why it may not show (the entries' rounding)."""
    low = dtype in (torch.float32, torch.float16, torch.bfloat16)
    return (
        " If a noise or diagonal is in it already, it is below the rounding of the entries (about "
        f"{torch.finfo(dtype).eps:.1e} times the largest): "
        + ("use float64 (model.double()) or a larger noise." if low else "use a larger noise or rescale the outputs.")
    )


def _singular_core_error(dtype: torch.dtype) -> ValueError:
    """The error of a solve with a singular core matrix."""
    return ValueError(
        "the block mean matrix is singular: its k x k core matrix C = diag(lam) + S^1/2 B S^1/2 cannot be inverted. "
        "Add a diagonal (add_diagonal / noise) before solving." + _singular_hint(dtype)
    )


def _first_bad(mask: Tensor) -> tuple[tuple[int, ...], int] | None:
    """(batch index, position) of the first True entry of ``mask`` (*batch, k), or None."""
    if not bool(mask.any()):
        return None
    flat = mask.reshape(-1, mask.shape[-1])
    row = int(flat.any(-1).nonzero()[0])
    col = int(flat[row].nonzero()[0])
    batch = tuple(int(i) for i in torch.unravel_index(torch.tensor(row), mask.shape[:-1])) if mask.dim() > 1 else ()
    return batch, col


def check_rhs(shape: torch.Size, rhs: Tensor, name: str, dtype: torch.dtype | None = None) -> None:
    """A right-hand side for an operator of ``shape`` (and ``dtype``): a tensor with ``n`` rows (or ``n`` entries),
    of the operator's dtype where it is floating point (as for torch's matrix products)."""
    if not torch.is_tensor(rhs):
        raise TypeError(f"{name} must be a tensor, got {type(rhs).__name__}.")
    if dtype is not None:
        check_rhs_dtype(rhs, name, dtype)
    if rhs.dim() == 0:  # rhs.shape[-2] below would raise a bare IndexError
        raise ValueError(
            f"{name} is a 0-d tensor; pass a vector of shape ({shape[-1]},) or a matrix of shape (*batch, "
            f"{shape[-1]}, t) (e.g. {name}.expand({shape[-1]}) for the same value at every index)."
        )
    size = rhs.shape[-1] if rhs.dim() == 1 else rhs.shape[-2]
    if size != shape[-1]:
        raise ValueError(
            f"{name} of shape {tuple(rhs.shape)} does not match the operator of shape {tuple(shape)}: "
            f"expected size {shape[-1]} in dimension {-1 if rhs.dim() == 1 else -2}."
        )


def _check_factor_size(op: LinearOperator, other, what: str) -> None:
    """``ValueError`` for a right factor whose rows do not match the operator's ``n`` columns (linear_operator's
    generic "Incompatible dimensions for matmul" RuntimeError otherwise), or a tensor of another floating dtype."""
    if torch.is_tensor(other):
        check_rhs(op.shape, other, "other", op.dtype)
    elif isinstance(other, LinearOperator) and other.shape[-2] != op.shape[-1]:
        raise ValueError(
            f"{what}: the operator of shape {tuple(op.shape)} has {op.shape[-1]} columns but other has shape "
            f"{tuple(other.shape)}, {other.shape[-2]} rows; they must match."
        )
    if torch.is_tensor(other) and other.dim() > 2:  # (operators: the products check their factors' batches)
        try:
            torch.broadcast_shapes(op.shape[:-2], other.shape[:-2])
        except RuntimeError:
            raise ValueError(
                f"{what}: the batch shapes of the operator {tuple(op.shape[:-2])} and of other "
                f"{tuple(other.shape[:-2])} do not broadcast."
            ) from None


def check_left(shape: torch.Size, left: Tensor, result_batch: torch.Size, dtype: torch.dtype) -> None:
    """A ``left_tensor`` of ``solve(rhs, left_tensor)``, which multiplies the solution ``L (M^{-1} R)``: a real tensor
    of the operator's dtype (where floating point) with ``n`` columns whose batch dimensions broadcast with the
    solution's ``result_batch``. Checked before the solve, as the right-hand side is: the bad ``left_tensor`` gave
    torch's raw matmul error ('mat1 and mat2 shapes cannot be multiplied', 'expected m1 and m2 to have the same
    dtype') from inside the package, after the solve had run."""
    name = "left_tensor"
    if not torch.is_tensor(left):
        raise TypeError(f"{name} must be a tensor, got {type(left).__name__}.")
    check_rhs_dtype(left, name, dtype)
    n = shape[-1]
    if left.dim() == 0:
        raise ValueError(f"{name} is a 0-d tensor; pass a matrix of shape (*batch, m, {n}) (it multiplies M^{{-1}} R).")
    if left.shape[-1] != n:
        raise ValueError(
            f"{name} of shape {tuple(left.shape)} does not match the operator of shape {tuple(shape)}: expected size "
            f"{n} in dimension -1 (it multiplies the {n}-row solution M^{{-1}} R from the left)."
        )
    try:
        torch.broadcast_shapes(left.shape[:-2], result_batch)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(left.shape)}: its batch dimensions {tuple(left.shape[:-2])} do not broadcast "
            f"with those of the solution, {tuple(result_batch)} (the operator's batch shape {tuple(shape[:-2])} and "
            "the right-hand side's)."
        ) from None


def solution_batch(shape: torch.Size, rhs: Tensor) -> torch.Size:
    """The batch shape of ``M^{-1} R`` for an operator of ``shape`` and a (checked) right-hand side ``R``, a vector
    being one column."""
    return torch.broadcast_shapes(shape[:-2], rhs.shape[:-2] if rhs.dim() > 1 else torch.Size())


def warn_cat_rows(op: LinearOperator, cross_mat: Tensor, roots: bool = False) -> None:
    """Say that ``op.cat_rows(cross_mat, new_mat)`` left the closed forms: the bordered matrix
    ``[[M, B^T], [B, D]]`` with a general ``B`` and ``D`` is no block mean matrix or sum of them (its rows and columns
    need not share the blocks' structure), so linear_operator's ``CatLinearOperator`` of the pieces is returned, and
    its solves and log-determinants take the generic path, a dense Cholesky of the whole matrix."""
    from linear_operator import settings as lo_settings

    n, m = op.shape[-1], cross_mat.shape[-2]
    warnings.warn(
        f"cat_rows of a {type(op).__name__} (n = {n}) with {m} new rows and columns: the bordered matrix "
        "[[M, B^T], [B, D]] has no closed form (a general appended block is not in the block mean family), so the "
        "result is linear_operator's CatLinearOperator and leaves the closed forms; its solves and log-determinants "
        f"factorise the dense (n + m) x (n + m) = {n + m} x {n + m} matrix (a Cholesky up to "
        f"max_cholesky_size = {lo_settings.max_cholesky_size.value()}, CG and Lanczos beyond). Where the new points "
        "belong to the family, build the operator over all n + m points instead (the kernel evaluated at them, as "
        "a fantasy model of a block mean or group kernel does)."
        + (
            f" With generate_roots / generate_inv_roots (the default) linear_operator forms dense {n} x {n} roots "
            "first (O(n^2) memory, O(n^3) time); pass generate_roots=False, generate_inv_roots=False to skip them."
            if roots
            else ""
        ),
        ClosedFormFallbackWarning,
        stacklevel=caller_stacklevel(),
    )


#: linear_operator's ``_solve(rhs, preconditioner, num_tridiag)`` asks for Lanczos tridiagonal matrices alongside the
#: solves (stochastic Lanczos quadrature of a log-determinant) only on its generic path, which these operators replace
_NO_LANCZOS_QUADRATURE = (
    "{} was asked for linear_operator's stochastic Lanczos quadrature (_solve with num_tridiag > 0): its "
    "log-determinant is a closed form. Call logdet() or inv_quad_logdet() on it (or on the sum that holds it) instead "
    "of through a generic operator built around it."
)


class WarnsOnCatRows:
    """``cat_rows`` as linear_operator's, with :func:`warn_cat_rows`'s warning (block mean operators and sums)."""

    def cat_rows(
        self,
        cross_mat: Tensor,
        new_mat: Tensor,
        generate_roots: bool = True,
        generate_inv_roots: bool = True,
        **root_decomp_kwargs,
    ) -> LinearOperator:
        r"""linear_operator's bordered matrix :math:`\begin{bmatrix} M & B^\top \\ B & D \end{bmatrix}` (a
        ``CatLinearOperator``, with its roots updated from this operator's closed-form roots), and a
        :class:`~bma_gp.ClosedFormFallbackWarning`: appended rows and columns ``B``, ``D`` of any values have no
        closed form, and the result's solves and log-determinants factorise the dense :math:`(n + m) \times (n + m)`
        matrix, which they did without a word."""
        n = self.shape[-1]  # type: ignore[attr-defined]
        m = cross_mat.shape[-2] if cross_mat.dim() >= 2 else -1
        if m < 0 or cross_mat.shape[-1] != n or new_mat.dim() < 2 or tuple(new_mat.shape[-2:]) != (m, m):
            # blocks of the wrong shapes: linear_operator's error, with no warning about a result that never comes
            return super().cat_rows(  # type: ignore[misc]
                cross_mat, new_mat, generate_roots, generate_inv_roots, **root_decomp_kwargs
            )
        # before the work: with generate_roots linear_operator forms dense n x n roots here (a user trial: 15 s at
        # n = 4,000, and an 80 GB allocation refused at n = 1e5, with the warning never reached)
        warn_cat_rows(self, cross_mat, generate_roots or generate_inv_roots)
        return super().cat_rows(  # type: ignore[misc]
            cross_mat, new_mat, generate_roots, generate_inv_roots, **root_decomp_kwargs
        )


def check_rhs_dtype(rhs: Tensor, name: str, dtype: torch.dtype) -> None:
    """``TypeError`` for an integer or boolean right-hand side, and for a floating-point one of another dtype than
    the operator's: torch's matrix products refuse them, and the closed forms took one path or the other by the
    values of ``B`` (a diagonal ``B`` promoted, a dense one raised torch's 'expected m1 and m2 to have the same
    dtype'; a sum's solve promoted and its product raised). A complex right-hand side is a ``TypeError`` too
    (:func:`check_real`): cast to the operator's dtype it lost its imaginary part, with at most one warning per
    process from torch."""
    check_real(rhs, name)
    if not rhs.dtype.is_floating_point:  # solves promoted it silently and products raised torch's dtype error
        raise TypeError(
            f"{name} has dtype {rhs.dtype}, not a floating-point dtype: cast it to the operator's, "
            f"{name}.to({dtype}), as torch's matrix products and solves ask."
        )
    if rhs.dtype == dtype:
        return
    raise TypeError(
        f"{name} has dtype {rhs.dtype} but the operator has dtype {dtype}: cast one of them with .to() (e.g. "
        f"{name}.to({dtype}) or op.to({rhs.dtype})), as for torch's matrix products."
    )


def _is_number(value) -> bool:
    """Whether ``value`` is a real Python (or NumPy) number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real(value: Tensor, name: str) -> None:
    """``TypeError`` for a complex ``value`` added to a (real) operator: the cast to the operator's dtype would drop
    its imaginary part, with at most one warning per process from torch."""
    if value.dtype.is_complex:
        raise TypeError(
            f"{name} has dtype {value.dtype}, but block mean operators are real: casting it to the operator's dtype "
            f"would drop the imaginary part. Pass a real tensor ({name}.real, if only that part is meant)."
        )


#: The end of the refusal of a non-finite ``lam`` or ``B`` (:meth:`BlockMeanLinearOperator._check_finite`).
_NOT_FINITE_HINT = (
    "check the kernel hyperparameters or the data that produced them. In a GP model lam holds the likelihood's noise "
    "(plus a BlockMeanKernel's within-block variance) and B the kernels' block values: a NaN or inf there usually "
    "means training diverged (a learning rate or an L-BFGS line search that sent a raw hyperparameter far out); lower "
    "the learning rate, bound the noise (a GreaterThan constraint), or centre and scale the targets."
)


def _where(batch: tuple[int, ...]) -> str:
    return f" (batch index {batch})" if batch else ""


def _cached_unless_grad(name: str):
    """linear_operator's ``@cached``, except that results are stored only when neither ``lam`` nor ``B``
    requires gradients: a stored graph breaks a second backward pass, and a result stored under
    ``no_grad`` would silently drop the gradients of later calls. Entries put in the cache by
    others (GPyTorch's ``add_to_cache``) are still returned. A result computed with
    :class:`bma_gp.settings.validate` off skipped its checks, so it is kept apart and returned only
    while validation stays off (a checked result serves both). So is one computed under
    ``torch.inference_mode()``, returned only under it: it holds inference tensors, which autograd refuses to save
    (an operator used under inference mode, then with gradients of other tensors, raised "Inference tensors cannot
    be saved for backward": a ``BlockMeanKernel``'s kept training block means, say, whose dense matrix or solve a
    validation step made under inference mode before the next training step)."""

    def decorator(method):
        @functools.wraps(method)
        def wrapped(self, *args, **kwargs):
            self._drop_stale_caches()
            names = (name,) if settings.validate.on() else (name, f"{name} (unvalidated)")
            if torch.is_inference_mode_enabled():
                names = (*names, *(f"{key} (inference)" for key in names))
            for key in names:
                try:
                    return get_from_cache(self, key, *args, **kwargs)
                except CachingError:
                    pass
            res = method(self, *args, **kwargs)
            if not (self.lam.requires_grad or self._b_requires_grad()):
                add_to_cache(self, names[-1], res, *args, **kwargs)
            return res

        return wrapped

    return decorator


# ---------------------------------------------------------------------------- the operator


def dense_svd(op: LinearOperator, what: str, why: str) -> tuple[LinearOperator, Tensor, LinearOperator]:
    """linear_operator's SVD of ``op``'s dense ``n x n`` matrix, with a :class:`ClosedFormFallbackWarning` that names
    the operator (``what`` after its class) and ``why`` there is no closed form (called from an ``_svd`` method)."""
    from linear_operator.operators.dense_linear_operator import DenseLinearOperator

    warnings.warn(
        f"svd of a {type(op).__name__} {what} (n = {op.shape[-1]}): {why}, so the dense n x n matrix is decomposed "
        "(torch.linalg.svd).",
        ClosedFormFallbackWarning,
        stacklevel=5,
    )
    U, S, Vh = torch.linalg.svd(op.to_dense())
    return DenseLinearOperator(U), S, DenseLinearOperator(Vh.mT)


def batch_repeat(op: LinearOperator, sizes) -> tuple[int, ...] | None:
    """The batch repeats of ``op.repeat(*sizes)`` (``sizes`` covers every dimension of ``op`` and ends in ``1, 1``),
    or ``None`` for any other ``sizes`` (then linear_operator's ``repeat`` decides)."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = tuple(sizes[0])
    if len(sizes) < max(op.dim(), 3) or tuple(sizes[-2:]) != (1, 1) or not all(isinstance(s, int) for s in sizes):
        return None
    return tuple(sizes[:-2])


def check_symmetric_flag(symmetric) -> None:
    """``TypeError`` unless ``symmetric`` is ``True`` or ``False`` (or 1 / 0): ``bool("False")`` is ``True``, so a
    string from a configuration file would silently pick the symmetric part."""
    if symmetric not in (True, False):
        raise TypeError(f"symmetric must be True or False, got {symmetric!r}.")


def _elementwise(fn: Callable[[Tensor], Tensor], finite: bool = False) -> Callable[[Tensor], Tensor]:
    """``fn`` with its result checked: a tensor of the shape of its input (of eigenvalues), or an error that says so
    (a reduction or a constant reached the closed form as a shape error about ``lam``, or an ``AttributeError``);
    with ``finite``, a ``ValueError`` where ``fn`` gives NaN or inf at a finite eigenvalue (one host
    synchronisation: ``fn`` undefined somewhere on the spectrum gave an operator of NaNs, silently)."""

    def apply(e: Tensor) -> Tensor:
        out = fn(e)
        if not torch.is_tensor(out):
            raise TypeError(
                "matrix_function(fn): fn must map a tensor of eigenvalues elementwise to a tensor of the same shape "
                f"(as torch.exp does), got a {type(out).__name__}; for a constant c use "
                "lambda e: torch.full_like(e, c)."
            )
        if out.shape != e.shape:
            raise ValueError(
                "matrix_function(fn): fn must map a tensor of eigenvalues elementwise to a tensor of the same shape "
                f"(as torch.exp does): it gave shape {tuple(out.shape)} for eigenvalues of shape {tuple(e.shape)}."
            )
        if not out.dtype.is_floating_point or out.dtype.is_complex:
            raise TypeError(
                "matrix_function(fn): fn must map the (real) eigenvalues to real floating-point values, got dtype "
                f"{out.dtype} for eigenvalues of dtype {e.dtype}; the result is a real symmetric matrix (for an "
                "integer result convert it, e.g. lambda e: torch.round(e), which keeps the dtype)."
            )
        if finite:
            bad = torch.isfinite(e) & ~torch.isfinite(out)
            if bool(bad.any()):
                at = float(e.detach()[bad][0])
                value = float(out.detach()[bad][0])
                raise ValueError(
                    f"matrix_function(fn): fn gave {value} at the eigenvalue {at:.6g}: fn must be defined (finite) on "
                    "the whole spectrum of the operator (its lam and the eigenvalues of its core; see eigvalsh()). "
                    "check=False or bma_gp.settings.validate(False) skips this check."
                )
        return out.to(e.dtype)

    return apply


def _prepared(lam: Tensor, clamp: bool) -> Tensor:
    """``lam`` clamped at 0 for a function on the nonnegative numbers (the square root), else as it is."""
    return lam.clamp_min(0) if clamp else lam


class BlockMeanLinearOperator(
    WarnsOnCatRows,
    TorchIndexing,
    PicklesWithoutCache,
    ClosedFormSamples,
    LowRankInClosedForm,
    ClosedFormRoots,
    LinearOperator,
):
    r"""A block mean matrix over a partition of :math:`n` indices into :math:`k` blocks.

    .. math::
        M = \operatorname{diag}(\lambda_{c}) + P B P^\top, \qquad
        M_{mn} = B_{c_m c_n} + \delta_{mn} \lambda_{c_m},

    where :math:`c_m` is the block of index :math:`m` and :math:`P` the :math:`n \times k`
    indicator matrix. With :math:`S = \operatorname{diag}(s)` the block sizes and
    :math:`C = \operatorname{diag}(\lambda) + S^{1/2} B S^{1/2}` (:math:`k \times k`), every
    matrix function keeps the structure:

    .. math::
        f(M) = \operatorname{diag}(f(\lambda)_{c}) + P D P^\top, \qquad
        D = S^{-1/2} \left[ f(C) - \operatorname{diag} f(\lambda) \right] S^{-1/2},

    so solves, roots, inverse roots, log-determinants and eigenvalues cost
    :math:`O(n + k^3)` and never form an :math:`n \times n` matrix. ``lam`` of a singleton
    block is folded into ``B`` first (only :math:`\lambda_i + B_{ii}` is visible there).

    Args:
        lam: per-block diagonal offset :math:`\lambda`. # shape: (*batch, k)
        B: symmetric per-block-pair value :math:`B`. # shape: (*batch, k, k)
        partition: the :class:`~bma_gp.Partition` of the ``n`` indices into ``k`` blocks.
        symmetric: ``True`` (default) treats ``B`` as symmetric in every path (it is
            symmetrised as :math:`(B + B^\top)/2`, so gradients with respect to ``B`` are
            symmetric). Products of two block mean operators are generally not symmetric and
            carry ``symmetric=False``: they multiply, solve and take log-determinants (through
            a general ``k x k`` solve) but have no square roots, Cholesky factor or eigenvalues
            (``svd`` decomposes the dense matrix, with a ``ClosedFormFallbackWarning``).
        diagonal: ``True`` passes ``B`` as its diagonal, shape ``(*batch, k)`` (independent per-block
            effects, as :class:`~bma_gp.kernels.GroupKernel` builds them): every closed form is then
            elementwise, ``O(n + k)`` time and memory, and the ``k x k`` matrix :attr:`B` is formed only if
            asked for. A dense ``B`` that is diagonal by construction (``diag_embed``) or, without gradients,
            by value gets the same elementwise closed forms, with ``O(k^2)`` memory for ``B`` itself.

    Example:
        >>> p = Partition.from_sizes([3, 2])
        >>> M = BlockMeanLinearOperator(torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 0.5], [0.5, 2.0]]), p)
        >>> x = torch.randn(5)
        >>> torch.allclose(M.solve(M @ x), x, atol=1e-5)
        True
    """

    def __init__(self, lam: Tensor, B: Tensor, partition: Partition, *, symmetric: bool = True, diagonal: bool = False):
        if not isinstance(partition, Partition):
            raise TypeError(
                f"partition must be a bma_gp.Partition, got {type(partition).__name__}; build one with "
                "Partition.from_labels(labels) or Partition.from_sizes(sizes)."
            )
        if not torch.is_tensor(lam) or not torch.is_tensor(B):
            raise TypeError("lam and B must be torch tensors (lam: (*batch, k), B: (*batch, k, k)).")
        if not (lam.dtype.is_floating_point and B.dtype.is_floating_point):
            raise TypeError(f"lam and B must be floating point, got {lam.dtype} and {B.dtype}.")
        if lam.dtype != B.dtype:
            raise TypeError(f"lam and B must share a dtype, got {lam.dtype} and {B.dtype}; cast one with .to().")
        if lam.device != B.device:
            raise ValueError(f"lam and B must be on one device, got {lam.device} and {B.device}.")
        k = partition.num_blocks
        if lam.dim() < 1 or lam.shape[-1] != k:
            raise ValueError(
                f"lam must have shape (*batch, k) with k = partition.num_blocks = {k}, got {tuple(lam.shape)}."
            )
        if not isinstance(diagonal, bool):
            raise TypeError(f"diagonal must be True or False, got {diagonal!r}.")
        check_symmetric_flag(symmetric)
        if diagonal:  # B given by its diagonal: (*batch, k); the k x k matrix is formed only where asked for
            if B.dim() < 1 or B.shape[-1] != k:
                raise ValueError(
                    f"with diagonal=True, B is the diagonal of the block matrix, shape (*batch, k) with k = "
                    f"partition.num_blocks = {k}; got {tuple(B.shape)}."
                )
            B_batch = B.shape[:-1]
            if B.dim() == 2 and B.shape[0] == k and lam.dim() == 1 and k > 1:
                # a k x k block matrix passed whole by mistake reads as a batch of k diagonals: say so
                warnings.warn(
                    f"with diagonal=True, B of shape ({k}, {k}) is read as a batch of {k} diagonals (k = "
                    f"partition.num_blocks = {k}), so this is a batch of {k} operators. For one operator with a "
                    "diagonal block matrix pass its diagonal, torch.diagonal(B); for a dense B leave diagonal "
                    "False. Give lam the batch shape (k, k) to silence this warning.",
                    UserWarning,
                    stacklevel=caller_stacklevel(),
                )
        elif B.dim() < 2 or B.shape[-1] != B.shape[-2]:
            raise ValueError(f"B must be square with shape (*batch, k, k), got {tuple(B.shape)}.")
        elif B.shape[-1] != k:
            raise ValueError(
                f"B must have shape (*batch, k, k) with k = partition.num_blocks = {k}, got {tuple(B.shape)}."
            )
        else:
            B_batch = B.shape[:-2]
        try:  # (equal batch shapes, the common case, skip the comparatively slow broadcast_shapes)
            batch = lam.shape[:-1] if lam.shape[:-1] == B_batch else torch.broadcast_shapes(lam.shape[:-1], B_batch)
        except RuntimeError:
            raise ValueError(
                f"batch shapes of lam {tuple(lam.shape[:-1])} and B {tuple(B_batch)} do not broadcast."
            ) from None
        if lam.shape[:-1] != batch:
            lam = lam.expand(*batch, k)
        if B_batch != batch:
            B = B.expand(*batch, k) if diagonal else B.expand(*batch, k, k)
        partition = partition.to(lam.device)
        if diagonal:
            super().__init__(lam, B, partition=partition, symmetric=bool(symmetric), diagonal=True)
        else:
            super().__init__(lam, B, partition=partition, symmetric=bool(symmetric))
        self.lam = lam
        self._b_diag: Tensor | None = B if diagonal else None
        self._B: Tensor | None = None if diagonal else B
        self.partition = partition
        self.symmetric = bool(symmetric)
        self._b_sym_cache: Tensor | None = None
        self._core_cache: tuple[Tensor, Tensor] | None = None
        self._checked_finite = False
        self._rounding: Tensor | None = None  # set by schur_complement: absolute rounding of C's spectrum
        self._shared_factor: tuple[Tensor | None, Tensor, Tensor] | None = None  # inside inv_quad_logdet
        self._diagonal_flag: bool | None = None  # whether B (so C) is diagonal: see _diagonal_core
        self._cache_stamp: tuple[int, int] | None = None  # lam's and B's versions when the caches were filled
        self._drop_stale_caches()  # stamped at construction: an edit before the first stored result is seen too

    # ------------------------------------------------------------------ cheap views
    @property
    def B(self) -> Tensor:
        """The ``k x k`` block matrix. # shape: (*batch, k, k)

        An operator built with ``diagonal=True`` holds only its diagonal and forms this matrix on first use
        (kept unless it requires gradients); its closed forms work on the diagonal and never ask for it."""
        if self._B is not None:
            return self._B
        assert self._b_diag is not None
        B = torch.diag_embed(self._b_diag)
        if not self._b_diag.requires_grad:
            self._B = B
        return B

    @property
    def is_diagonal_mode(self) -> bool:
        """Whether the operator was built with ``diagonal=True`` (``B`` held as its diagonal)."""
        return self._b_diag is not None

    def _b_vector(self) -> Tensor:
        """The diagonal of ``B`` (without forming ``B`` in diagonal mode). # shape: (*batch, k)"""
        if self._b_diag is not None:
            return self._b_diag
        return torch.diagonal(self.B, dim1=-2, dim2=-1)

    def _b_requires_grad(self) -> bool:
        return (self._b_diag if self._b_diag is not None else self.B).requires_grad

    def _new_diagonal(self, lam: Tensor, b: Tensor) -> BlockMeanLinearOperator:
        """A symmetric operator of this partition with ``B = diag(b)``, in diagonal mode."""
        return BlockMeanLinearOperator(lam, b, self.partition, diagonal=True)

    def _set_requires_grad(self, val: bool) -> None:
        """``requires_grad`` of ``lam`` and ``B`` (``requires_grad_``), and every stored result dropped: one computed
        without gradients has no graph, and the cached paths would hand it to calls that now need one."""
        super()._set_requires_grad(val)
        clear_cache_hook(self)  # linear_operator's cache (results of @cached, add_to_cache)
        self._core_cache = None
        self._b_sym_cache = None
        self._diagonal_flag = None  # with gradients only a B diagonal by construction counts (_diagonal_core)

    def _drop_stale_caches(self) -> None:
        """Drop every stored result (linear_operator's cache, the core, the symmetrised ``B``, the finiteness and
        diagonality checks) where ``lam`` or ``B`` changed in place since they were stored (their version counters):
        an edit such as ``op.lam.mul_(2)`` after a solve reached the products and ``to_dense()`` but not the cached
        solves, log-determinants and roots. Inference tensors have no version counter (nothing to compare)."""
        b = self._b_diag if self._b_diag is not None else self._B
        try:
            stamp = (self.lam._version, -1 if b is None else b._version)
        except RuntimeError:  # an inference tensor
            return
        previous = getattr(self, "_cache_stamp", None)  # (an operator pickled before the stamp has none)
        if stamp == previous:
            return
        if previous is not None:
            clear_cache_hook(self)
            self._core_cache = None
            self._b_sym_cache = None
            self._diagonal_flag = None
            self._checked_finite = False
            if self._b_diag is not None:
                self._B = None  # the matrix formed from the diagonal
        self._cache_stamp = stamp

    def _b_sym(self) -> Tensor:
        """``B`` as used by every path: symmetrised unless ``symmetric=False``."""
        self._drop_stale_caches()
        if not self.symmetric:
            return self.B
        if self.B.requires_grad:  # keep a fresh graph per call: cached graphs break repeated backward
            return 0.5 * (self.B + self.B.mT)
        if self._b_sym_cache is None:
            self._b_sym_cache = (self.B + self.B.mT).mul_(0.5)  # (no graph here: one k x k buffer, not two)
        return self._b_sym_cache

    def _diagonal_core(self, read_back: bool = True) -> bool:
        """Whether ``B``, and so the core matrix ``C``, is diagonal (a grouping's per-level variances, as
        :class:`~bma_gp.kernels.GroupKernel` builds them). Then the Cholesky factor, the inverse, every matrix
        function and the eigenvalues of ``C`` are elementwise: ``O(k)`` work in place of ``O(k^3)``.

        With gradients only a ``B`` that is diagonal by construction (``diag_embed``, a diagonal mask) qualifies:
        a leaf that happens to be diagonal needs the gradient of its off-diagonal entries, which the
        elementwise forms do not give. A ``B`` that carries a forward-mode tangent (a dual tensor of
        ``torch.autograd.forward_ad``; :func:`~bma_gp._autograd.tracks_derivatives`) reports ``requires_grad=False``
        and its graph does not show where the tangent is: it qualifies when its value and its tangent are diagonal
        (read back as below); a ``torch.func.jacfwd`` input never does (its tangents are a batch of directions).
        Without derivatives the value is checked (one host read), on CPU or with
        :class:`bma_gp.settings.validate` on; on an accelerator with validation off nothing is read back
        and the general path runs."""
        if self._diagonal_flag is None:
            if self._b_diag is not None:
                self._diagonal_flag = True
                return True
            B = self.B
            if B.shape[-1] == 1:
                self._diagonal_flag = True
            elif tracks_derivatives(B):  # constant terms (diag_embed(b) + W) checked by value where one may read back
                read_back = B.device.type == "cpu" or settings.validate.on()
                flag = not (B.requires_grad or functorch_wrapped(B)) or diagonal_by_construction(B, read_back)
                if flag and has_forward_tangent(B):  # the graph does not show where a forward-mode tangent is
                    flag = read_back and is_diagonal(B) and diagonal_tangent(B)
                self._diagonal_flag = flag
            elif B.device.type == "cpu" or settings.validate.on():
                if not read_back and B.device.type != "cpu":
                    return False  # a product alone does not read back (the next closed form decides)
                self._diagonal_flag = is_diagonal(B)
            else:
                self._diagonal_flag = False
        return self._diagonal_flag

    def _diagonal_parts(self) -> tuple[Tensor, Tensor, Tensor]:
        """For a diagonal ``B`` (:meth:`_diagonal_core`): ``(lam, b, c)`` in :attr:`core_dtype`, the block offsets
        and ``b = diag(B)`` with singleton blocks folded as :meth:`_folded` folds them, and the core matrix's
        diagonal ``c = lam + s b``: vectors only, so no ``k x k`` temporary is formed (nor differentiated)."""
        dtype = self.core_dtype
        lam = self.lam.to(dtype)
        b = self._b_vector().to(dtype)
        single = self.partition.sizes == 1
        value = lam + b
        folded = torch.where(single, torch.where(value > 0, value, torch.ones_like(value)), lam)
        b = torch.where(single, value - folded, b)
        return folded, b, folded + self._core_sizes * b

    @property
    def _sizes(self) -> Tensor:
        return self.partition.sizes.to(self.lam.dtype)

    @property
    def core_dtype(self) -> torch.dtype:
        """The dtype of every ``k x k`` problem: ``float64`` for ``float32`` and lower operators,
        the operator's dtype otherwise (:func:`bma_gp._precision.core_dtype`). The core matrix mixes
        ``lam`` with ``s_i B_ij``, and at large blocks its condition number outruns single precision."""
        return core_dtype(self.lam.dtype)

    @property
    def _core_sizes(self) -> Tensor:
        return self.partition.sizes.to(self.core_dtype)

    def _folded(self, check: bool = True) -> tuple[Tensor, Tensor]:
        """``lam`` and symmetrised ``B`` with singleton blocks folded, in the core dtype.

        Every closed form beyond products starts here, so this is where non-finite input is caught
        (``check`` and validation on; one host synchronisation)."""
        if check and self._validating():
            self._check_finite()
        dtype = self.core_dtype
        return _fold_singletons(self.lam.to(dtype), self._b_sym().to(dtype), self.partition.sizes)

    def core(self) -> tuple[Tensor, Tensor]:
        r"""The block offsets and the :math:`k \times k` core matrix, ``(lam, C)``, in :attr:`core_dtype`.

        .. math::
            C = \operatorname{diag}(\lambda) + S^{1/2} B S^{1/2}, \qquad
            M = \operatorname{diag}(\lambda_c) + P S^{-1/2} (C - \operatorname{diag}\lambda) S^{-1/2} P^\top.

        :math:`C` holds the spectrum of :math:`M` on the block-constant vectors and ``lam`` (of
        blocks with more than one index) the rest; singleton blocks are folded first (``lam_i``
        becomes a positive placeholder there and :math:`C_{ii}` keeps :math:`\lambda_i + B_{ii}`).
        :meth:`from_core` inverts this map. Cached unless ``lam`` or ``B`` requires gradients.

        Raises:
            ValueError: ``lam`` or ``B`` holds NaN or inf (with :class:`bma_gp.settings.validate` on).

        Returns:
            ``lam``, shape ``(*batch, k)``, and ``C``, shape ``(*batch, k, k)``.
        """
        if self._validating():
            self._check_finite()
        return self._unchecked_core()

    def _unchecked_core(self) -> tuple[Tensor, Tensor]:
        self._drop_stale_caches()
        cached_core = self._core_cache
        if cached_core is not None:
            return cached_core
        if tracks_derivatives(self.lam) or self._b_requires_grad() or functorch_active() or self._b_diag is not None:
            lam, B = self._folded(check=False)
            res = (lam, _core(lam, B, self._core_sizes.sqrt()))
        else:
            # no derivatives: C in one k x k buffer (the symmetrised B scaled in place, its diagonal set to the folded
            # one), where the symmetrised B, the folded B and C took one each (and _core four): at k = 4000 in float64
            # a one-column solve peaked at +0.79 GB, now +0.38 GB. The same operations in the same order as the path
            # with derivatives, so the same rounding.
            dtype = self.core_dtype
            cached = self._b_sym_cache
            if cached is not None or not self.symmetric:
                C = self._b_sym().to(dtype, copy=True)
            else:
                C = (self.B + self.B.mT).mul_(0.5).to(dtype)
            lam, new_diag = _folded_diagonal(
                self.lam.to(dtype), C.diagonal(dim1=-2, dim2=-1).clone(), self.partition.sizes
            )
            root_sizes = self._core_sizes.sqrt()
            C.mul_(root_sizes.unsqueeze(-1)).mul_(root_sizes.unsqueeze(-2))
            batch = torch.broadcast_shapes(C.shape[:-2], lam.shape[:-1])
            if batch != C.shape[:-2]:
                C = C.expand(*batch, *C.shape[-2:]).clone()
            C.diagonal(dim1=-2, dim2=-1).copy_(lam + root_sizes * new_diag * root_sizes)  # as _core rounds it
            res = (lam, C)
        if not (self.lam.requires_grad or self._b_requires_grad()):
            # with gradients, a cached graph would break a second backward pass (and a core cached
            # under no_grad would silently drop them later)
            self._core_cache = res
        return res

    def core_matrix(self) -> Tensor:
        r"""The :math:`k \times k` core matrix :math:`C = \operatorname{diag}(\lambda) + S^{1/2} B S^{1/2}`
        (singleton blocks folded) in :attr:`core_dtype`; its eigenvalues are those of :math:`M` on the
        span of :math:`P`. See :meth:`core`. # shape: (*batch, k, k)"""
        return self.core()[1]

    @classmethod
    def from_core(
        cls, lam: Tensor, C: Tensor, partition: Partition, *, dtype: torch.dtype | None = None
    ) -> BlockMeanLinearOperator:
        r"""The symmetric block mean operator with block offsets ``lam`` and core matrix ``C``.

        The inverse of :meth:`core`: :math:`B = S^{-1/2} (C - \operatorname{diag}\lambda) S^{-1/2}`,
        symmetrised. For a singleton block only :math:`C_{ii}` matters: the result stores it in
        ``lam_i`` (and :math:`B_{ii} = 0`), whatever ``lam_i`` was passed.
        Algebra done on cores (products, inverses, Schur complements of operators on one partition
        act on ``lam`` elementwise and on ``C`` as matrices) comes back as an operator this way.

        Args:
            lam: block offsets. # shape: (*batch, k)
            C: symmetric core matrix. # shape: (*batch, k, k)
            partition: the partition of the operator.
            dtype: dtype of the operator (default: that of ``C``); the conversion to ``B`` runs in
                the dtype of ``C``, so pass float64 cores for float32 operators.
        """
        if not torch.is_tensor(C) or C.dim() < 2 or C.shape[-1] != C.shape[-2]:
            raise ValueError(
                f"C must be a square tensor of shape (*batch, k, k), got "
                f"{tuple(C.shape) if torch.is_tensor(C) else type(C).__name__}."
            )
        if not torch.is_tensor(lam) or lam.shape[-1:] != C.shape[-1:]:
            raise ValueError(
                f"lam must be a tensor of shape (*batch, k) with k = {C.shape[-1]} (the size of C), "
                f"got {tuple(lam.shape) if torch.is_tensor(lam) else type(lam).__name__}."
            )
        if not isinstance(partition, Partition) or partition.num_blocks != C.shape[-1]:
            raise ValueError(f"partition must be a bma_gp.Partition with num_blocks = {C.shape[-1]} (the size of C).")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float64) or None, got {dtype!r}.")
        for name, t in (("lam", lam), ("C", C)):
            if t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(
                    f"{name} must hold real numbers, got dtype {t.dtype}: a block mean operator is real (the cast "
                    f"would drop the imaginary part); pass {name}.real where the imaginary part is 0."
                )
        if lam.device != C.device:
            raise ValueError(
                f"lam and C must be on one device, got {lam.device} and {C.device}; move one with .to(other.device)."
            )
        try:
            torch.broadcast_shapes(lam.shape[:-1], C.shape[:-2])
        except RuntimeError:
            raise ValueError(
                f"batch shapes of lam {tuple(lam.shape[:-1])} and C {tuple(C.shape[:-2])} do not broadcast; give "
                "them equal batch shapes (or size 1 where one is shared)."
            ) from None
        partition = partition.to(C.device)
        # a singleton block stores its one entry in lam (B_ii = 0), the convention of block_mean: a
        # placeholder lam_i would leave B_ii = C_ii - lam_i to cancel in a float32 operator
        lam = torch.where(partition.sizes == 1, torch.diagonal(C, dim1=-2, dim2=-1), lam.to(C.dtype))
        inv_root = partition.sizes.to(C.dtype).rsqrt()
        D = (C - torch.diag_embed(lam)) * inv_root.unsqueeze(-1) * inv_root.unsqueeze(-2)
        D = 0.5 * (D + D.mT)
        dtype = C.dtype if dtype is None else dtype
        return cls(lam.to(dtype), D.to(dtype), partition)

    def schur_complement(
        self, cross: BlockMeanLinearOperator, other: BlockMeanLinearOperator
    ) -> BlockMeanLinearOperator:
        r"""The symmetric block mean operator :math:`M - A N^{-1} A^\top` for ``cross`` :math:`A` and
        ``other`` :math:`N` (positive definite) on the partition of ``self`` :math:`M`.

        Operators on one partition act on the block-constant vectors through their cores and on
        the rest through their block offsets, so the result has

        .. math::
            \lambda = \lambda_M - \lambda_A^2 / \lambda_N, \qquad
            C = C_M - W^\top W, \quad W = L^{-1} C_A^\top, \quad L L^\top = C_N,

        computed from :meth:`core` and :meth:`core_cholesky` in :attr:`core_dtype`: :math:`O(k^3)`,
        no :math:`n \times n` matrix. This is the conditional covariance of a Gaussian vector
        (a GP posterior at its training inputs), positive semidefinite when the joint covariance is.
        Its computed core can then have eigenvalues of order :math:`\epsilon (\lVert C_M \rVert +
        \lVert W \rVert^2)` below zero, which may be large against its own scale (the noise): the
        result remembers that rounding level, and :meth:`matrix_sqrt` (sampling) clamps eigenvalues
        above it to zero. With :class:`bma_gp.settings.validate` on, one below it raises there.

        Args:
            cross: :math:`A`, a block mean operator on the same partition (any symmetry).
            other: :math:`N`, a symmetric positive definite block mean operator on the same partition.

        Raises:
            ValueError: the partitions differ, the batch shapes do not broadcast, ``self`` or ``other`` is not
                symmetric, or ``other`` is not positive definite (validation on; see :meth:`core_cholesky`).
        """
        for name, op in (("cross", cross), ("other", other)):
            if not self._same_partition(op):
                raise ValueError(
                    f"schur_complement: {name} must be a BlockMeanLinearOperator on the same partition "
                    f"as self (k = {self.partition.num_blocks}), got {type(op).__name__}."
                )
        try:
            torch.broadcast_shapes(self.batch_shape, cross.batch_shape, other.batch_shape)
        except RuntimeError:
            raise ValueError(
                f"schur_complement: the batch shapes of self {tuple(self.batch_shape)}, cross "
                f"{tuple(cross.batch_shape)} and other {tuple(other.batch_shape)} do not broadcast; give the three "
                "operators broadcastable batch shapes (e.g. unsqueeze one with op.unsqueeze(0))."
            ) from None
        self._check_symmetric("schur_complement")
        other._check_symmetric("schur_complement's other (N, which it inverts)")
        if self._diagonal_core() and cross._diagonal_core() and other._diagonal_core():
            return self._diagonal_schur_complement(cross, other)
        lam_M, C_M = self.core()
        lam_A, C_A = cross.core()
        lam_N, _ = other.core()
        L = other.core_cholesky()
        work = L.dtype
        lam_M, C_M, lam_A, C_A, lam_N = (t.to(work) for t in (lam_M, C_M, lam_A, C_A, lam_N))
        batch = torch.broadcast_shapes(L.shape[:-2], C_A.shape[:-2])
        k = L.shape[-1]
        W = torch.linalg.solve_triangular(L.expand(*batch, k, k), C_A.mT.expand(*batch, k, k), upper=False)
        gram = W.mT @ W
        C = C_M - gram
        correction = lam_A * lam_A / lam_N
        lam = lam_M - correction
        # block offsets within rounding of zero are zero (the core's spectrum is handled by matrix_sqrt)
        rounding = max(10, k) * torch.finfo(self.dtype).eps
        lam = torch.where((lam < 0) & (lam >= -rounding * (lam_M.abs() + correction.abs())), 0.0, lam)
        res = BlockMeanLinearOperator.from_core(lam, 0.5 * (C + C.mT), self.partition, dtype=self.dtype)
        norm = C_M.abs().sum(-1).amax(-1) + gram.abs().sum(-1).amax(-1)  # bounds the spectral norms
        res._rounding = (rounding * norm).detach()
        return res

    def _diagonal_schur_complement(
        self, cross: BlockMeanLinearOperator, other: BlockMeanLinearOperator
    ) -> BlockMeanLinearOperator:
        r""":meth:`schur_complement` when all three cores are diagonal (a grouping's per-level variances, as a
        random-intercept model's prior, cross and noisy covariances are): :math:`W = C_N^{-1/2} C_A^\top` is
        diagonal, so :math:`C = \operatorname{diag}(c_M - c_A^2 / c_N)`. ``O(k)``: no ``k x k`` matrix, and the
        result is held in diagonal mode."""
        if self._validating():  # as core() and core_cholesky() check, without a k x k matrix
            for op in (self, cross, other):
                op._check_finite()
            if bool((other._core_cholesky_diagonal()[1] > 0).any()):
                other._raise_not_positive_definite("schur_complement")
        lam_M, _, c_M = self._diagonal_parts()
        lam_A, _, c_A = cross._diagonal_parts()
        lam_N, _, c_N = other._diagonal_parts()
        gram = c_A * c_A / c_N
        c = c_M - gram
        correction = lam_A * lam_A / lam_N
        lam = lam_M - correction
        k = c.shape[-1]
        rounding = max(10, k) * torch.finfo(self.dtype).eps
        lam = torch.where((lam < 0) & (lam >= -rounding * (lam_M.abs() + correction.abs())), 0.0, lam)
        single = self.partition.sizes == 1
        lam = torch.where(single, c, lam)  # a singleton block keeps its one entry in lam (as from_core does)
        b = torch.where(single, 0.0, (c - lam) / self._core_sizes)
        lam, b = torch.broadcast_tensors(lam, b)
        res = BlockMeanLinearOperator(lam.to(self.dtype), b.to(self.dtype), self.partition, diagonal=True)
        res._rounding = (rounding * (c_M.abs().amax(-1) + gram.abs().amax(-1))).detach()
        return res

    def _new(self, lam: Tensor, B: Tensor, symmetric: bool | None = None) -> BlockMeanLinearOperator:
        return BlockMeanLinearOperator(
            lam, B, self.partition, symmetric=self.symmetric if symmetric is None else symmetric
        )

    # ------------------------------------------------------------------ required hooks
    def _size(self) -> torch.Size:
        n = len(self.partition)
        return torch.Size((*self.lam.shape[:-1], n, n))

    def _transpose_nonbatch(self) -> BlockMeanLinearOperator:
        if self.symmetric:
            return self
        return self._new(self.lam, self.B.mT)

    def _matmul(self, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 1
        if vector:
            rhs = rhs.unsqueeze(-1)
        res = self._matmul_with_sums(rhs, self.partition.block_sum(rhs, dim=-2))
        return res.squeeze(-1) if vector else res

    def _matmul_with_sums(self, rhs: Tensor, sums: Tensor) -> Tensor:
        r""":math:`M x = \lambda \odot x + P B (P^\top x)` given the block sums ``sums`` of ``rhs`` (computed another
        way where summing ``rhs`` cancels: a posterior mean's :math:`P^\top M^{-1} r`). # shape: (*batch, n, t)"""
        part = self.partition
        if self._diagonal_core(read_back=False):  # B P^T x = diag(B) * P^T x: no k x k product
            coef = self._b_vector().unsqueeze(-1) * sums
        elif self.symmetric and self._b_sym_cache is None and sums.shape[-1] <= 16:
            # two k x k products instead of symmetrising B: forming (B + B^T) / 2 reads B transposed,
            # which costs far more than a few matrix-vector products (operators rebuilt per call, as in
            # linear_operator's Matmul, never see the cache)
            coef = 0.5 * (self.B @ sums + self.B.mT @ sums)
        else:
            coef = self._b_sym() @ sums  # B P^T x: (*, k, t)
        # lam * x + P (B P^T x), fused: no n-sized temporaries besides the result
        return part.expand_addcmul(coef, self.lam.unsqueeze(-1), rhs, dim=-2)

    def matmul(self, other):
        _check_factor_size(self, other, "M @ other")
        if self._same_partition(other):
            if other.dtype != self.dtype:  # as for a product over two partitions and torch's matrix products
                raise TypeError(
                    f"M @ N: the factors must share a dtype, got {self.dtype} and {other.dtype}; cast one with .to() "
                    f"(e.g. N.to({self.dtype}))."
                )
            sizes = self._sizes
            if self._b_diag is not None and other._b_diag is not None:  # diagonal times diagonal: vectors only
                lam1, b1, lam2, b2 = self.lam, self._b_diag, other.lam, other._b_diag
                return self._new_diagonal(lam1 * lam2, lam1 * b2 + b1 * lam2 + b1 * sizes * b2)
            lam1, B1, lam2, B2 = self.lam, self._b_sym(), other.lam, other._b_sym()
            B = lam1.unsqueeze(-1) * B2 + B1 * lam2.unsqueeze(-2) + (B1 * sizes.unsqueeze(-2)) @ B2
            return self._new(lam1 * lam2, B, symmetric=other is self and self.symmetric)
        if isinstance(other, LinearOperator) and not isinstance(other, BlockMeanLinearOperator):
            from bma_gp.block_mean_product_linear_operator import BlockMeanProductLinearOperator

            if isinstance(other, BlockMeanProductLinearOperator) and self._same_partition(other.left_linear_op):
                # M (M' N) with M M' again a block mean operator
                return BlockMeanProductLinearOperator(self.matmul(other.left_linear_op), other.right_linear_op)
        if isinstance(other, BlockMeanLinearOperator) and other.shape[-1] == self.shape[-1]:
            # over another partition: closed-form solves and log-determinants through the two factors (linear_operator's
            # MatmulLinearOperator would factorise the dense n x n product)
            from bma_gp.block_mean_product_linear_operator import BlockMeanProductLinearOperator

            return BlockMeanProductLinearOperator(self, other)
        if torch.is_tensor(other):
            check_rhs_dtype(other, "other", self.dtype)
        if torch.is_tensor(other) and (
            functorch_active()
            or not (
                torch.is_grad_enabled() and (other.requires_grad or self.lam.requires_grad or self._b_requires_grad())
            )
        ):
            # the product in plain torch operations: with nothing to differentiate (linear_operator's Matmul function
            # rebuilds the operator, losing its cached symmetrised B, on every call), and under a torch.func transform
            # (grad, jacrev, vmap), which differentiates these operations where Matmul (an autograd.Function without
            # setup_context) raised torch's "must override the setup_context" error
            _matmul_broadcast_shape(self.shape, other.shape)
            return self._matmul(other)
        return super().matmul(other)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._transpose_nonbatch()._matmul(rhs)

    def _diagonal(self) -> Tensor:
        if self._diagonal_core(read_back=False):  # the same diagonal, no k x k sum
            return self.partition.expand(self.lam + self._b_vector(), dim=-1)
        # B's own diagonal: symmetrising changes nothing there (0.5 (b + b) is b exactly), and the symmetrised k x k
        # copy cost 0.7 s and 0.4 GB at k = 5000 for a first diagonal()
        return self.partition.expand(self.lam + torch.diagonal(self.B, dim1=-2, dim2=-1), dim=-1)

    @_cached_unless_grad("to_dense")
    def to_dense(self) -> Tensor:
        labels = self.partition.labels
        B = self._b_sym()
        dense = B.index_select(-2, labels).index_select(-1, labels)
        offsets = self.partition.expand(self.lam, dim=-1)
        batch = torch.broadcast_shapes(dense.shape[:-2], offsets.shape[:-1])
        dtype = torch.promote_types(dense.dtype, offsets.dtype)
        if batch != dense.shape[:-2] or dtype != dense.dtype:
            return dense + torch.diag_embed(offsets)
        # the offsets added on the diagonal in place: dense + diag_embed(...) formed two more n x n matrices
        dense.diagonal(dim1=-2, dim2=-1).add_(offsets)
        return dense

    # ------------------------------------------------------------------ batching and indexing
    def _expand_batch(self, batch_shape) -> BlockMeanLinearOperator:
        k = self.partition.num_blocks
        if self._b_diag is not None:
            return self._new_diagonal(self.lam.expand(*batch_shape, k), self._b_diag.expand(*batch_shape, k))
        return self._new(self.lam.expand(*batch_shape, k), self.B.expand(*batch_shape, k, k))

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        labels = self.partition.labels
        rows, cols = labels[row_index], labels[col_index]
        if self._b_diag is not None:  # B = diag(b): b on entries of one block, else zero (no k x k matrix)
            b = self._b_diag[(*batch_indices, rows)]
            values = torch.where(rows == cols, b, torch.zeros_like(b))
        else:
            values = self._b_sym()[(*batch_indices, rows, cols)]
        lam = self.lam[(*batch_indices, rows)]
        return values + torch.where(row_index == col_index, lam, torch.zeros_like(lam))

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        # A principal submatrix over a slice keeps the structure: relabel the blocks it touches.
        if (
            isinstance(row_index, slice)
            and isinstance(col_index, slice)
            and row_index == col_index
            and not (row_index == slice(None, None, None))
        ):
            if self.partition.labels[row_index].numel() > 0:
                return self._principal(row_index, *batch_indices)
            from bma_gp._composition import empty_principal  # no points: the 0 x 0 matrix

            return empty_principal(self, self.lam[(*batch_indices, slice(None))].shape[:-1])
        if _is_noop(row_index) and _is_noop(col_index):
            return super()._getitem(row_index, col_index, *batch_indices)
        from bma_gp._composition import indexed_fallback

        return indexed_fallback(self, row_index, col_index, *batch_indices)

    def _principal(self, index, *batch_indices) -> BlockMeanLinearOperator:
        """The principal submatrix over the points ``index`` (a slice, a boolean mask or positions, at least one
        point): the labels restricted and relabelled, ``lam`` and ``B`` to the blocks those points touch."""
        kept, new_labels = torch.unique(self.partition.labels[index], return_inverse=True)
        lam = self.lam[(*batch_indices, slice(None))] if batch_indices else self.lam
        sub = Partition(new_labels, num_blocks=kept.numel())
        if self._b_diag is not None:  # the kept blocks' variances: no k x k matrix
            b = self._b_diag[(*batch_indices, slice(None))] if batch_indices else self._b_diag
            return BlockMeanLinearOperator(lam.index_select(-1, kept), b.index_select(-1, kept), sub, diagonal=True)
        B = self.B[(*batch_indices, slice(None), slice(None))] if batch_indices else self.B
        return BlockMeanLinearOperator(
            lam.index_select(-1, kept),
            B.index_select(-2, kept).index_select(-1, kept),
            sub,
            symmetric=self.symmetric,
        )

    def repeat(self, *sizes) -> LinearOperator:
        """Batch copies (``sizes`` ending in ``1, 1``): the operator of the repeated ``lam`` and ``B``, closed form
        again (linear_operator's ``BatchRepeatLinearOperator`` solves through a dense Cholesky factor)."""
        rep = batch_repeat(self, sizes)
        if rep is None:
            return super().repeat(*sizes)
        if self._b_diag is not None:
            return self._new_diagonal(self.lam.repeat(*rep, 1), self._b_diag.repeat(*rep, 1))
        return self._new(self.lam.repeat(*rep, 1), self.B.repeat(*rep, 1, 1))

    def _sum_batch(self, dim: int) -> BlockMeanLinearOperator:
        if self._b_diag is not None:
            return self._new_diagonal(self.lam.sum(dim), self._b_diag.sum(dim))
        return self._new(self.lam.sum(dim), self.B.sum(dim))

    def _prod_batch(self, dim: int) -> BlockMeanLinearOperator:
        lam = self.lam.unbind(dim)
        if self._b_diag is not None:
            factors = [self._new_diagonal(lam_i, b_i) for lam_i, b_i in zip(lam, self._b_diag.unbind(dim))]
        else:
            factors = [self._new(lam_i, B_i) for lam_i, B_i in zip(lam, self.B.unbind(dim))]
        res = factors[0]
        for factor in factors[1:]:
            res = res._hadamard(factor)
        return res

    # ------------------------------------------------------------------ derivatives
    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        # Both gradients are always returned: inside autograd.Function backward passes the operator is
        # rebuilt under no_grad, where requires_grad flags of its tensors are not meaningful.
        if left_vecs.dim() == 1:
            left_vecs, right_vecs = left_vecs.unsqueeze(-1), right_vecs.unsqueeze(-1)
        part = self.partition
        grad_lam = part.block_sum((left_vecs * right_vecs).sum(-1), dim=-1)
        grad_lam = sum_to_shape(grad_lam, self.lam.shape)
        if self._b_diag is not None:  # the gradient of the diagonal: (P^T l)_i . (P^T r)_i
            grad_b = (part.block_sum(left_vecs, dim=-2) * part.block_sum(right_vecs, dim=-2)).sum(-1)
            return (grad_lam, sum_to_shape(grad_b, self._b_diag.shape))
        grad_B = part.block_sum(left_vecs, dim=-2) @ part.block_sum(right_vecs, dim=-2).mT
        if self.symmetric:
            grad_B = 0.5 * (grad_B + grad_B.mT)
        grad_B = sum_to_shape(grad_B, self.B.shape)
        return (grad_lam, grad_B)

    # ------------------------------------------------------------------ algebra that keeps the type
    def _mul_constant(self, other) -> BlockMeanLinearOperator:
        if self._b_diag is not None:
            factor = other.unsqueeze(-1) if torch.is_tensor(other) and other.dim() > 0 else other
            return self._new_diagonal(self.lam * factor, self._b_diag * factor)
        if torch.is_tensor(other) and other.dim() > 0:
            return self._new(self.lam * other.unsqueeze(-1), self.B * other.unsqueeze(-1).unsqueeze(-1))
        return self._new(self.lam * other, self.B * other)

    def _hadamard(self, other: BlockMeanLinearOperator) -> BlockMeanLinearOperator:
        dB1, dB2 = self._b_vector(), other._b_vector()  # the diagonal of B equals that of its symmetric part
        lam = self.lam * other.lam + self.lam * dB2 + other.lam * dB1
        if self._b_diag is not None or other._b_diag is not None:  # diag(b) * B2 = diag(b * diag(B2)): vectors
            return self._new_diagonal(lam, dB1 * dB2)
        return self._new(lam, self._b_sym() * other._b_sym(), symmetric=self.symmetric and other.symmetric)

    def _hadamard_across(self, other: BlockMeanLinearOperator) -> BlockMeanLinearOperator:
        r"""The elementwise product with a block mean operator over another partition of the same points: a block mean
        operator over their intersection (one block per occupied pair of blocks :math:`(i, i')`), with
        :math:`B_{(i,i'),(j,j')} = B_{ij} B'_{i'j'}` and the rest of the diagonal in ``lam``. Its ``k`` is the number of
        occupied pairs, at most ``min(n, k k')``; linear_operator's generic product would multiply through ``n x n``
        roots instead."""
        k2 = other.partition.num_blocks
        partition, pairs = intersection(self.partition, other.partition)
        first, second = pairs // k2, pairs % k2  # each joint block's block in self and in other
        lam1, lam2 = self.lam.index_select(-1, first), other.lam.index_select(-1, second)
        b1, b2 = self._b_vector().index_select(-1, first), other._b_vector().index_select(-1, second)
        lam = lam1 * lam2 + lam1 * b2 + b1 * lam2
        if self._b_diag is not None and other._b_diag is not None:  # diag(b) x diag(b'): diagonal again
            return BlockMeanLinearOperator(lam, b1 * b2, partition, diagonal=True)
        limit = settings.max_capacitance_size.value()
        if pairs.numel() > limit:  # its B is k x k (up to n x n) and its solves factorise it
            raise ValueError(
                f"the elementwise product of block mean operators over partitions of {self.partition.num_blocks} and "
                f"{k2} blocks is a block mean operator over their {pairs.numel()} occupied pairs of blocks, whose "
                f"{pairs.numel()} x {pairs.numel()} core exceeds bma_gp.settings.max_capacitance_size = {limit}. "
                f"Raise the limit with `with bma_gp.settings.max_capacitance_size({pairs.numel()}):` if it fits "
                "your machine."
            )
        B1 = self._b_sym().index_select(-2, first).index_select(-1, first)
        B2 = other._b_sym().index_select(-2, second).index_select(-1, second)
        return BlockMeanLinearOperator(lam, B1 * B2, partition, symmetric=self.symmetric and other.symmetric)

    def _mul_matrix(self, other) -> LinearOperator:
        if isinstance(other, BlockMeanLinearOperator) and other.partition.same_as(self.partition):
            return self._hadamard(other)
        if isinstance(other, BlockMeanLinearOperator) and other.shape[-1] == self.shape[-1]:
            return self._hadamard_across(other)
        if isinstance(other, DiagLinearOperator):  # M o diag(d) = diag(diag(M) d), as linear_operator's diag o M
            return times_diagonal(self, other)
        if type(other) is ConstantMulLinearOperator:  # M o (c A) = c (M o A): a ScaleKernel's output, unwrapped
            # (linear_operator's product would take a root of c A, by Lanczos past max_cholesky_size, where the
            # product with A itself is closed form or, for a dense A, exact and dense)
            return self._mul_matrix(other.base_linear_op)._mul_constant(other._constant)
        constants = batch_constants(other)
        if constants is not None:  # one constant per batch entry (a batch ScaleKernel around an unbatched kernel)
            return self._mul_constant(constants)
        indexed = _one_hot_block_mean(other)
        if indexed is not None and indexed.shape[-1] == self.shape[-1]:  # IndexKernel(i): C[i_a, i_b], block mean
            return self._hadamard_across(indexed)
        from bma_gp.block_mean_product_linear_operator import BlockMeanProductLinearOperator
        from bma_gp.block_mean_sum_linear_operator import BlockMeanSumLinearOperator

        if isinstance(other, BlockMeanProductLinearOperator):  # its refusal (no root), without the warning first
            return other._mul_matrix(self)
        if isinstance(other, BlockMeanSumLinearOperator) and self.symmetric:  # distributed over the sum's terms
            return other._mul_matrix(self)
        from bma_gp._composition import FallbackSumLinearOperator, _dense_elementwise, root_times_block_mean

        if isinstance(other, FallbackSumLinearOperator):  # n x n anyway: exact entries, as in the other order
            return _dense_elementwise(other, self)
        from linear_operator.operators import LowRankRootAddedDiagLinearOperator, LowRankRootLinearOperator

        from bma_gp.kernels._rbf_gram import LazyRootOperator

        if isinstance(other, LazyRootOperator) or (
            isinstance(other, (LowRankRootLinearOperator, LowRankRootAddedDiagLinearOperator)) and _in_product()
        ):  # an inducing-point kernel's root times a group kernel (a task factor): a root of rank m k_X
            res = root_times_block_mean(other, self)
            if res is not None:
                return res
        # linear_operator's MulLinearOperator multiplied through a root of each factor (a jittered Cholesky where one
        # is singular, Lanczos past max_cholesky_size: entries off by the jitter or more) and formed one factor
        # densely anyway; the dense product itself is exact and no larger
        return _dense_elementwise(self, other)

    def _same_partition(self, other) -> bool:
        return isinstance(other, BlockMeanLinearOperator) and other.partition.same_as(self.partition)

    def _add_constant(self, c) -> BlockMeanLinearOperator | None:
        """``M + c`` for a number or a tensor of shape ``()``, ``(1,)`` or ``(*batch, 1, 1)``: ``c`` is added to every
        entry (as for a dense tensor), which is again block mean, ``B + c`` (``P (B + c 11^T) P^T``, the same
        ``lam``). ``None`` for any other ``other``. ``c`` is cast to the operator's dtype and device (a complex
        ``c`` raises ``TypeError``: the cast would drop its imaginary part)."""
        if _is_number(c):
            c = torch.tensor(float(c), dtype=self.dtype, device=self.device)
        elif not torch.is_tensor(c):
            return None
        elif any(size != 1 for size in c.shape[-2:]):
            return None
        else:
            check_real(c, "the added constant")
            c = c.to(dtype=self.dtype, device=self.device)
        if c.dim() < 2:
            c = c.reshape(())
        k = self.partition.num_blocks
        if self._b_diag is not None and k == 1:  # a single block's B stays a 1 x 1 diagonal
            return self._new_diagonal(self.lam, self._b_diag + c.squeeze(-1))
        return self._new(self.lam, self.B + c)  # B + c is not diagonal: the k x k matrix is the result

    def __add__(self, other):
        from bma_gp._composition import adds_exactly

        if adds_exactly(other):  # a predictive covariance: its exact sum (the sum commutes)
            return other.__add__(self)
        shifted = self._add_constant(other)
        if shifted is not None:
            return shifted
        if isinstance(other, LinearOperator) or (torch.is_tensor(other) and other.dim() >= 2):
            try:  # (a row (1, n) or a column (n, 1) broadcasts: a fallback sum that warns when solved)
                torch.broadcast_shapes(self.shape, other.shape)
            except RuntimeError:  # linear_operator's SumLinearOperator accepted it and failed on first use
                raise ValueError(
                    f"M + other: the operators have shapes {tuple(self.shape)} and {tuple(other.shape)}, which do not "
                    "broadcast; a sum needs the same n x n matrix size (the batch dimensions may broadcast)."
                ) from None
        if self._same_partition(other):
            if self._b_diag is not None and other._b_diag is not None:  # both diagonal: vectors only
                return self._new_diagonal(self.lam + other.lam, self._b_diag + other._b_diag)
            if self.symmetric == other.symmetric:
                B = self.B + other.B
            else:  # the symmetric one's B as every path of it reads B: symmetrised (its gradient stays symmetric)
                B = self._b_sym() + other._b_sym()
            return self._new(self.lam + other.lam, B, symmetric=self.symmetric and other.symmetric)
        if isinstance(other, ConstantDiagLinearOperator) and other.shape[-1] == self.shape[-1]:
            # in torch's promoted dtype, as c + M and a dense sum give (add_diagonal keeps the operator's dtype: a
            # float64 jitter of 1e-9 on a float32 operator was dropped in M + c and kept in c + M)
            dtype = torch.promote_types(self.dtype, other.dtype)
            return (self if dtype == self.dtype else self.to(dtype)).add_diagonal(other.diag_values)
        from bma_gp._composition import add_structured, fallback_sum

        res = add_structured(self, other) if isinstance(other, LinearOperator) else None
        if res is None:  # no closed form: a sum that warns when it is solved
            res = fallback_sum(self, other)
        return res if res is not None else super().__add__(other)

    def __radd__(self, other):
        return self.__add__(other)

    def __sub__(self, other):
        # linear_operator's __sub__ is ``self + other.mul(-1)``, which a Python number has not (AttributeError)
        return self + (-other) if _is_number(other) else super().__sub__(other)

    def __neg__(self):
        return self.mul(-1)

    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        """Add ``diag`` to the diagonal. A scalar (or one value per batch entry, shape ``(*batch, 1)``)
        keeps the block mean type; a full diagonal ``(*batch, n)`` gives a
        :class:`~bma_gp.BlockMeanSumLinearOperator` (or again a block mean operator when ``diag`` is
        constant inside every block and needs no gradient), with closed forms either way. ``diag`` is cast
        to the operator's dtype and device, as linear_operator's ``add_diagonal`` keeps the operator's dtype (a complex
        ``diag`` raises ``TypeError``: the cast would drop its imaginary part)."""
        if not torch.is_tensor(diag):
            diag = torch.tensor(diag, dtype=self.dtype, device=self.device)
        check_real(diag, "diag")
        diag = diag.to(dtype=self.dtype, device=self.device)
        if diag.dim() == 0 or diag.shape[-1] == 1:
            value = diag if diag.dim() > 0 else diag.unsqueeze(-1)
            try:
                lam = self.lam + value
            except RuntimeError:
                raise ValueError(
                    f"add_diagonal: diagonal of shape {tuple(diag.shape)} does not broadcast against the batch "
                    f"shape {tuple(self.batch_shape)}."
                ) from None
            k = self.partition.num_blocks
            if self._b_diag is not None:
                return self._new_diagonal(lam, self._b_diag.expand(*lam.shape[:-1], k))
            return self._new(lam, self.B.expand(*lam.shape[:-1], k, k))
        from linear_operator.operators import DiagLinearOperator

        from bma_gp._composition import add_structured, fallback_sum

        n = self.shape[-1]
        shape_ok = diag.shape[-1] == n
        if shape_ok:
            try:
                torch.broadcast_shapes(diag.shape[:-1], self.batch_shape)
            except RuntimeError:
                shape_ok = False
        res = None
        if shape_ok:  # only the shape is checked here: another error inside the sum is raised as it is
            diag = diag.expand(*self.batch_shape, n) if diag.dim() == 1 else diag
            res = add_structured(self, DiagLinearOperator(diag))
            if res is None and not self.symmetric:  # no closed form: the sum that `self + DiagLinearOperator` gives
                res = fallback_sum(self, DiagLinearOperator(diag))
        if res is None:
            raise ValueError(
                f"add_diagonal: expected a scalar, shape (*batch, 1) or (*batch, {self.shape[-1]}), got "
                f"{tuple(diag.shape)}."
            )
        return res

    # ------------------------------------------------------------------ checks
    def _check_symmetric(self, what: str) -> None:
        if not self.symmetric:
            raise ValueError(
                f"{what} needs a symmetric block mean operator, but this one was built with symmetric=False "
                "(e.g. as the product of two operators that do not commute)."
            )

    def _validating(self) -> bool:
        """:class:`bma_gp.settings.validate`, except for a meta operator (shape-only evaluation: no values to read
        back, where the checks raised torch's "Tensor.item() cannot be called on meta tensors")."""
        return settings.validate.on() and not self.lam.is_meta

    def _check_finite(self) -> None:
        """NaN or inf in ``lam`` or ``B`` would surface as a misleading definiteness error, or as a
        silent NaN result: name the input instead (one host synchronisation, once per operator). A meta operator
        (shape-only evaluation) has no values to check."""
        self._drop_stale_caches()
        if self._checked_finite or self.lam.is_meta:
            return
        lam_bad = ~torch.isfinite(self.lam)
        if self._b_diag is not None:  # no k x k check (nor matrix)
            b_bad = ~torch.isfinite(self._b_diag)
            if not bool(lam_bad.any() | b_bad.any()):
                self._checked_finite = True
                return
            found = _first_bad(lam_bad)
            which, bad = ("lam", lam_bad) if found is not None else ("B", b_bad)
            found = found or _first_bad(b_bad)
            assert found is not None
            batch, i = found
            value = float((self.lam if which == "lam" else self._b_diag).detach()[batch][i])
            raise ValueError(
                f"the block mean operator's input is not finite: {which}[{i}{', ' + str(i) if which == 'B' else ''}] = "
                f"{value}{_where(batch)}. lam and B must be finite; {_NOT_FINITE_HINT}"
            )
        # the sum of B is finite exactly when every entry is, but for an overflow: one pass over B and no k x k
        # temporaries (isfinite of a k x k matrix allocates several, 0.5 GB at k = 4000 in float64); the elementwise
        # test runs only where the sum is not finite
        if not bool(lam_bad.any() | ~torch.isfinite(self.B.detach().sum())):
            self._checked_finite = True  # operators are immutable
            return
        B_bad = ~torch.isfinite(self.B)
        if not bool(lam_bad.any() | B_bad.any()):  # a sum that overflowed: the entries are finite
            self._checked_finite = True
            return
        found = _first_bad(lam_bad)
        if found is not None:
            batch, i = found
            value, where = float(self.lam.detach()[batch][i]), f"lam[{i}]"
        else:
            k = self.partition.num_blocks
            found_B = _first_bad(B_bad.reshape(*B_bad.shape[:-2], k * k))
            assert found_B is not None  # some entry of lam or B is not finite
            batch, flat = found_B
            i, j = divmod(flat, k)
            value, where = float(self.B.detach()[batch][i, j]), f"B[{i}, {j}]"
        raise ValueError(
            f"the block mean operator's input is not finite: {where} = {value}{_where(batch)}. lam and B must be "
            f"finite; {_NOT_FINITE_HINT}"
        )

    def _check_block_offsets(self, lam: Tensor, what: str, strict: bool) -> None:
        """``lam_i`` of blocks with ``s_i > 1`` are eigenvalues: they must be positive (>= 0 if not strict)."""
        multi = self.partition.sizes > 1
        tol = _tolerance(self.dtype)
        bad = multi & ((lam <= 0) if strict else (lam < -tol * lam.abs().amax(-1, keepdim=True)))
        found = _first_bad(bad)
        if found is not None:
            batch, i = found
            value = float(lam.detach()[batch][i])
            size = int(self.partition.sizes[i])
            kind = "positive definite" if strict else "positive semidefinite"
            raise NotPositiveDefiniteError(
                f"{what} needs a {kind} matrix, but lam[{i}] = {value:.6g}{_where(batch)} is an eigenvalue "
                f"(of multiplicity {size - 1}, block {i} has {size} indices) and is "
                f"{'<= 0' if strict else '< 0'}. Add a diagonal (add_diagonal / noise) to make it {kind}."
            )

    def _check_core_eigenvalues(self, evals: Tensor, what: str, strict: bool) -> None:
        """``strict`` (a function undefined at 0: inverse square root, log): an eigenvalue within rounding of zero
        *in the precision C was factorised in* is an error. A float32 operator whose C is merely ill-conditioned
        for float32 (a smallest eigenvalue of 1 beside a largest of 10^6, as a block mean of 10^4 points per
        block gives) is positive definite, and its core is factorised in float64; solves accept it, and so
        does its inverse square root. Not ``strict``: negative eigenvalues within rounding of the operator's
        own precision (``lam`` and ``B`` were rounded to it) are allowed and clamped, with a tolerance of
        ``max(10, k) eps`` relative to the largest."""
        scale = evals.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(evals.dtype).tiny)
        if strict:
            bad = evals <= _tolerance(evals.dtype) * scale
        else:  # the rounding of an eigendecomposition grows with k (numpy's matrix_rank tolerance)
            tol = max(1, evals.shape[-1] // 10) * _tolerance(self.dtype) * scale
            if self._rounding is not None:  # a difference of larger matrices: rounding of its terms
                tol = torch.maximum(tol, self._rounding.to(evals).unsqueeze(-1))
            bad = evals < -tol
        found = _first_bad(bad)
        if found is not None:
            batch, i = found
            value = float(evals.detach()[batch][i])
            raise NotPositiveDefiniteError(
                f"{what} needs a positive {'definite' if strict else 'semidefinite'} matrix, but the k x k core "
                f"matrix C = diag(lam) + S^1/2 B S^1/2 has eigenvalue {value:.6g}{_where(batch)}. "
                "Add a diagonal (add_diagonal / noise) or check B."
                + _rounding_hint(value, float(scale[batch].squeeze(-1)), self.dtype)
            )

    # ------------------------------------------------------------------ matrix functions
    def matrix_function(self, fn: Callable[[Tensor], Tensor], *, check: bool = True) -> BlockMeanLinearOperator:
        r"""Apply ``fn`` to :math:`M` through its eigenvalues: :math:`f(M) = V f(\Lambda) V^\top`.

        Returns the block mean operator
        :math:`\operatorname{diag}(f(\lambda)_c) + P\, S^{-1/2}[f(C) - \operatorname{diag} f(\lambda)] S^{-1/2} P^\top`.
        Gradients with respect to ``lam`` and ``B`` are exact, also for repeated eigenvalues.
        ``fn`` must be defined on the whole spectrum; :meth:`matrix_sqrt`, :meth:`matrix_inv_sqrt`
        and :meth:`matrix_log` check their domains first.

        Args:
            fn: maps a tensor of eigenvalues elementwise (e.g. ``torch.exp``); must be differentiable
                through autograd if gradients are needed.
            check: with :class:`bma_gp.settings.validate` on, raise a ``ValueError`` for NaN or inf
                in ``lam`` or ``B``, or in ``fn``'s values at the (finite) eigenvalues. ``False`` skips those host
                synchronisations.

        Raises:
            ValueError: the operator was built with ``symmetric=False``, or (``check``) its input is
                not finite or ``fn`` is not finite somewhere on its spectrum.
        """
        if not callable(fn):
            raise TypeError(f"matrix_function(fn): fn must be a function of a tensor of eigenvalues, got {fn!r}.")
        check = check and self._validating()
        return self._spectral(_elementwise(fn, finite=check), domain=None, what="matrix_function", check=check)

    def _spectral(
        self, fn: Callable[[Tensor], Tensor], *, domain: str | None, what: str, check: bool
    ) -> BlockMeanLinearOperator:
        """:meth:`matrix_function` for ``fn`` defined on ``domain`` (None: everywhere; "positive";
        "nonnegative": tiny negative eigenvalues are clamped to 0). ``check`` validates the input and,
        for a restricted domain, the spectrum, naming ``what`` in the error."""
        self._check_symmetric(what)
        diagonal = self._diagonal_core()
        if diagonal:  # C = diag(c): its eigenvalues, no k x k matrix
            if check:
                self._check_finite()
            lam, b, C = self._diagonal_parts()
        else:
            lam, C = self.core() if check else self._unchecked_core()
        prepare = None
        clamp = domain == "nonnegative"
        if domain is not None:
            strict = domain == "positive"
            if check:
                self._check_block_offsets(lam, what, strict=strict)

            def prepare(e: Tensor) -> Tensor:  # runs on the eigenvalues of the one eigh of C
                if check:
                    self._check_core_eigenvalues(e, what, strict=strict)
                return e.clamp_min(0) if clamp else e

        # lam_i of a singleton block is no eigenvalue (its one entry is C_ii): fn is not evaluated there (it need not
        # be defined off the spectrum), its f(lam)_i is f(C)_ii, with B_ii = 0, the convention of from_core
        single = self.partition.sizes == 1
        if diagonal:  # f acts on the eigenvalues c elementwise: D = diag((f(c) - f(lam)) / s)
            f_c = fn(C if prepare is None else prepare(C))
            f_lam = torch.where(single, f_c, fn(_prepared(torch.where(single, C, lam), clamp)))
            return self._new_diagonal(f_lam.to(self.dtype), ((f_c - f_lam) / self._core_sizes).to(self.dtype))
        top: list[Tensor] = []

        def keep_top(e: Tensor) -> Tensor:  # the largest eigenvalue of C, a value in fn's domain
            e = e if prepare is None else prepare(e)
            top.append(e.detach()[..., -1:])
            return e

        fC = symmetric_matrix_function(C, fn, keep_top)
        spare = top[0].expand(lam.shape) if top else lam
        f_lam = fn(_prepared(torch.where(single, spare, lam), clamp))
        f_lam = torch.where(single, torch.diagonal(fC, dim1=-2, dim2=-1), f_lam)
        inv_root = self._core_sizes.rsqrt()
        D = (fC - torch.diag_embed(f_lam)) * inv_root.unsqueeze(-1) * inv_root.unsqueeze(-2)
        return self._new(f_lam.to(self.dtype), (0.5 * (D + D.mT)).to(self.dtype))

    @_cached_unless_grad("matrix_sqrt")
    def matrix_sqrt(self, *, check: bool = True) -> BlockMeanLinearOperator:
        r"""The symmetric square root :math:`M^{1/2}` (positive semidefinite :math:`M`), a block mean operator.

        With ``check`` and validation on, a ``ValueError`` names a non-finite input or a negative
        eigenvalue beyond rounding; otherwise (and always for eigenvalues within rounding of zero)
        negative eigenvalues are clamped to zero."""
        # eigenvalues within rounding of 0 get root 0 with derivative 0: the square root's derivative is infinite at
        # 0, and a smooth kernel's block mean posterior has such eigenvalues (its draws' gradients were NaN)
        return self._sqrt("matrix_sqrt", check)

    def _sqrt(self, what: str, check: bool = True) -> BlockMeanLinearOperator:
        """:meth:`matrix_sqrt`, its errors naming ``what`` (the method the user called)."""
        return self._spectral(floored_sqrt, domain="nonnegative", what=what, check=check and self._validating())

    @_cached_unless_grad("matrix_inv_sqrt")
    def matrix_inv_sqrt(self, *, check: bool = True) -> BlockMeanLinearOperator:
        r"""The inverse square root :math:`M^{-1/2}` (positive definite :math:`M`), a block mean operator.

        With ``check`` and validation on, a ``ValueError`` names a non-finite input or a non-positive
        eigenvalue; otherwise those give NaN or inf."""
        return self._inv_sqrt("matrix_inv_sqrt", check)

    def _inv_sqrt(self, what: str, check: bool = True) -> BlockMeanLinearOperator:
        """:meth:`matrix_inv_sqrt`, its errors naming ``what`` (the method the user called)."""
        return self._spectral(torch.rsqrt, domain="positive", what=what, check=check and self._validating())

    def matrix_log(self, *, check: bool = True) -> BlockMeanLinearOperator:
        r"""The matrix logarithm (positive definite :math:`M`), a block mean operator (checks as
        :meth:`matrix_inv_sqrt`)."""
        return self._spectral(torch.log, domain="positive", what="matrix_log", check=check and self._validating())

    def matrix_exp(self) -> BlockMeanLinearOperator:
        r"""The matrix exponential, a block mean operator."""
        return self._spectral(torch.exp, domain=None, what="matrix_exp", check=self._validating())

    # ------------------------------------------------------------------ factorisation of the core
    @_cached_unless_grad("core_cholesky_ex")
    def _core_cholesky_ex(self) -> tuple[Tensor, Tensor]:
        """``torch.linalg.cholesky_ex`` of C, factors of failed batch entries set to NaN (no host sync)."""
        if self._diagonal_core():
            d, info = self._core_cholesky_diagonal()
            L = torch.diag_embed(d)
        else:
            L, info = torch.linalg.cholesky_ex(self._unchecked_core()[1])
        failed = (info > 0).unsqueeze(-1).unsqueeze(-1)
        if tracks_derivatives(L) or functorch_active():
            return L.masked_fill(failed, float("nan")), info
        return L.masked_fill_(failed, float("nan")), info  # in place: no second k x k buffer

    def _core_factor(self) -> tuple[Tensor | None, Tensor, Tensor]:
        """``(C, L, info)`` for the solves and the log-determinant of the core (:meth:`_core_solve`, :meth:`_logdet`).

        Where ``C`` requires gradients in plain reverse mode (no forward-mode tangent, no :mod:`torch.func`
        transform running, ``vmap`` included), ``L`` is factorised without a graph and ``C`` is returned beside it:
        the callers differentiate in closed form (:mod:`bma_gp._core_backward`), not through the factorisation.
        Otherwise ``C`` is ``None`` and ``L`` is :meth:`_core_cholesky_ex`'s (differentiable, cached without
        gradients). Inside :meth:`inv_quad_logdet` one factorisation serves both terms."""
        if self._shared_factor is not None:
            return self._shared_factor
        if not self._diagonal_core() and torch.is_grad_enabled():
            C = self._unchecked_core()[1]
            if C.requires_grad and not carries_tangent(C) and not functorch_active():
                with torch.no_grad():
                    L, info = torch.linalg.cholesky_ex(C)
                    L.masked_fill_((info > 0).unsqueeze(-1).unsqueeze(-1), float("nan"))
                return C, L, info
        return (None, *self._core_cholesky_ex())

    def _core_cholesky_diagonal(self) -> tuple[Tensor, Tensor]:
        """For a diagonal core (:meth:`_diagonal_core`) ``C = diag(c)``: the diagonal ``sqrt(c)`` of its Cholesky
        factor (NaN for failed batch entries) and ``info`` as ``cholesky_ex`` gives it (the first ``c_i <= 0``,
        counted from 1), without a ``k x k`` matrix. # shape: (*batch, k), (*batch,)"""
        c = self._diagonal_parts()[2]
        ok = c > 0
        info = torch.where(ok.all(-1), 0, (~ok).to(torch.int32).argmax(-1) + 1).to(torch.int32)
        d = torch.where(ok, c, torch.ones_like(c)).sqrt()
        return torch.where((info > 0).unsqueeze(-1), torch.full_like(d, float("nan")), d), info

    def core_cholesky(self) -> Tensor:
        r"""The lower Cholesky factor :math:`L` of the core matrix, :math:`L L^\top = C`, in :attr:`core_dtype`.

        Computed once per operator and shared by :meth:`inverse`, :meth:`solve`, :meth:`logdet` and
        GP prediction. :math:`C` is positive definite whenever :math:`M` is; an indefinite
        :math:`M` can still be inverted (:meth:`inverse` falls back to an LU solve of the core).

        Raises:
            ValueError: the operator was built with ``symmetric=False``; with
                :class:`bma_gp.settings.validate` on, also when ``lam`` or ``B`` is not finite, or
                when :math:`C` is not numerically positive definite (naming an eigenvalue). With
                validation off nothing is checked (no host synchronisation): the factor of every
                batch entry whose factorisation failed is NaN, and so is everything computed from it.

        Returns:
            # shape: (*batch, k, k)
        """
        self._check_symmetric("core_cholesky")
        if self._validating():
            self._check_finite()
        L, info = self._core_cholesky_ex()
        if self._validating() and bool((info > 0).any()):
            self._raise_not_positive_definite("core_cholesky")
        return L

    def _unchecked_on_accelerator(self) -> bool:
        """Validation off on an accelerator: nothing is read back, so whether the Cholesky factorisation of
        :math:`C` failed is not known on the host. Solves and log-determinants then take the LU of :math:`C`, which
        serves every invertible :math:`C`, definite or not (a Cholesky factor would be NaN for an indefinite one)."""
        return not self._validating() and self.lam.device.type != "cpu"

    def _raise_not_positive_definite(self, what: str) -> None:
        if self._diagonal_core():  # the eigenvalues of C = diag(c) are c
            self._check_core_eigenvalues(self._diagonal_parts()[2].detach(), what, strict=True)
        else:
            self._check_core_eigenvalues(torch.linalg.eigvalsh(self.core()[1].detach()), what, strict=True)
        raise NotPositiveDefiniteError(
            f"{what}: the k x k core matrix C = diag(lam) + S^1/2 B S^1/2 is not numerically positive "
            "definite (its Cholesky factorisation failed). Add a diagonal (add_diagonal / noise)."
        )

    # ------------------------------------------------------------------ inverse, solves, log-det
    @_cached_unless_grad("inverse_parts")
    def _inverse_parts(self) -> tuple[Tensor, Tensor]:
        if self._diagonal_core():
            lam, b, c = self._invertible_diagonal_parts()
            # C^{-1} - diag(1/lam) = -diag(s b / (c lam)), in B's scaling -diag(b / (c lam)): O(k)
            inv_lam = lam.reciprocal()
            return inv_lam.to(self.dtype), (-b * inv_lam / c).to(self.dtype)  # the diagonal of D
        lam, B = self._folded()
        self._check_invertible_offsets(lam)
        root = self._core_sizes.sqrt()
        G = root.unsqueeze(-1) * B * root.unsqueeze(-2)
        X = self._core_solve(G)  # C^{-1} G
        # C^{-1} - diag(1/lam) = -C^{-1} G diag(1/lam): no cancellation between the two terms
        inv_lam = lam.reciprocal()
        D = -X * inv_lam.unsqueeze(-2) / (root.unsqueeze(-1) * root.unsqueeze(-2))
        if self.symmetric:
            D = 0.5 * (D + D.mT)
        return inv_lam.to(self.dtype), D.to(self.dtype)

    def _invertible_diagonal_parts(self) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_diagonal_parts` of an operator to be solved with, checked (with validation on) for non-finite
        values and for a singular core or block offsets."""
        if self._validating():
            self._check_finite()
        lam, b, c = self._diagonal_parts()
        self._check_invertible_offsets(lam)
        if self._validating() and bool((c == 0).any()):
            raise _singular_core_error(self.dtype)
        return lam, b, c

    def _core_solve(self, rhs: Tensor) -> Tensor:
        """:math:`C^{-1}` ``rhs`` for the (folded) core matrix, in :attr:`core_dtype`: through the shared Cholesky
        factor where there is one, else (not symmetric, indefinite, or unchecked on an accelerator) through the LU
        of :math:`C`, a singular one an error with validation on. # shape: (*batch, k, t)"""
        L = None
        if self.symmetric and not self._unchecked_on_accelerator():
            C, L, info = self._core_factor()
            if bool((info > 0).any()):  # with validation on, or on CPU (nothing to synchronise)
                L = None  # symmetric but indefinite: still invertible, through LU below
            elif C is not None and carries_tangent(rhs):  # the closed-form backward is reverse mode only
                C, (L, info) = None, self._core_cholesky_ex()
        if L is not None:
            return torch.cholesky_solve(rhs, L) if C is None else CoreCholeskySolve.apply(C, L, rhs)
        X, info = torch.linalg.solve_ex(self._unchecked_core()[1], rhs)
        if self._validating() and bool((info > 0).any()):
            raise _singular_core_error(self.dtype)
        return X

    def _check_invertible_offsets(self, lam: Tensor) -> None:
        if self._validating() and bool(((lam == 0) & (self.partition.sizes > 1)).any()):
            found = _first_bad((lam == 0) & (self.partition.sizes > 1))
            assert found is not None
            batch, i = found
            raise ValueError(
                f"the block mean matrix is singular: lam[{i}] = 0{_where(batch)} for block {i} of size "
                f"{int(self.partition.sizes[i])}. Add a diagonal (add_diagonal / noise) before solving."
            )

    @_cached_unless_grad("inverse")
    def inverse(self) -> BlockMeanLinearOperator:
        r""":math:`M^{-1}`, a block mean operator (any invertible :math:`M`)."""
        inv_lam, D = self._inverse_parts()
        if self._diagonal_core():
            return self._new_diagonal(inv_lam, D)
        return self._new(inv_lam, D)

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int = 0) -> Tensor:
        if num_tridiag:
            raise NotImplementedError(_NO_LANCZOS_QUADRATURE.format(type(self).__name__))
        return self.inverse()._matmul(rhs)

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        r"""Closed-form :math:`M^{-1} R` (or :math:`L M^{-1} R`): no CG, no dense Cholesky, at any size.

        With :class:`bma_gp.settings.validate` on, a singular :math:`M` or NaN/inf in ``lam`` or ``B``
        raises a ``ValueError`` naming the cause; with it off the result is NaN/inf instead (no host
        synchronisation)."""
        self._check_rhs(right_tensor, "right_tensor")
        if left_tensor is not None:
            check_left(self.shape, left_tensor, solution_batch(self.shape, right_tensor), self.dtype)
        vector = right_tensor.dim() == 1  # as a column, so that a batched M^{-1} v still meets left_tensor's rows
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        if self._solves_directly(rhs.shape[-1]):
            res = self._direct_solve(rhs)
        else:
            res = self.inverse().matmul(rhs)
        if left_tensor is not None:
            res = left_tensor @ res
        return res.squeeze(-1) if vector else res

    def _check_rhs(self, rhs: Tensor, name: str) -> None:
        check_rhs(self.shape, rhs, name, self.dtype)

    def _solves_directly(self, columns: int) -> bool:
        """Whether :meth:`solve` applies :math:`C^{-1}` to the right-hand side's block sums (:meth:`_direct_solve`)
        rather than forming :math:`M^{-1}`: for a dense core and fewer columns than a quarter of ``k``, unless the
        inverse is cached already. The inverse costs a ``k``-column solve with the core's Cholesky factor (three times
        the factorisation's flops and ``k x k`` buffers: 11.3 s and 1.1 GB against 2.1 s and 0.24 GB for one column at
        ``k = 4000`` in a user trial); the direct form ``t`` columns."""
        if self._diagonal_core() or 4 * columns >= self.partition.num_blocks:
            return False
        names = ("inverse",) if self._validating() else ("inverse", "inverse (unvalidated)")
        for key in names:
            try:
                get_from_cache(self, key)
                return False
            except CachingError:
                pass
        return True

    def _direct_solve(self, rhs: Tensor) -> Tensor:
        r""":math:`M^{-1} R = (R - P \bar R) / \lambda + P S^{-1/2} C^{-1} S^{1/2} \bar R` (:math:`\bar R` the block
        means): ``M`` is :math:`\lambda_c` on the deviations from the block means and the core :math:`C` on the block
        means, in :attr:`core_dtype`. # shape: (*batch, n, t)"""
        part, dtype = self.partition, self.core_dtype
        if self._validating():
            self._check_finite()
        # the folded offsets from B's diagonal alone (the core's own, bitwise: B's symmetrised diagonal is B's): no
        # folded k x k B, and no second core with derivatives, where the core is not cached
        lam = _folded_diagonal(self.lam.to(dtype), self._b_vector().to(dtype), part.sizes)[0]
        self._check_invertible_offsets(lam)
        y = rhs.to(dtype)
        sizes = self._core_sizes.unsqueeze(-1)
        means = part.block_sum(y, dim=-2) / sizes  # (*, k, t)
        w = self._core_solve(means * sizes.sqrt()) / sizes.sqrt()
        safe_lam = torch.where(part.sizes > 1, lam, torch.ones_like(lam)).unsqueeze(-1)
        deviation = y - part.expand(means, dim=-2)  # 0 in singleton blocks
        return part.expand_addcmul(w, safe_lam.reciprocal(), deviation, dim=-2).to(self.dtype)

    def _solve_block_sums(self, rhs: Tensor) -> Tensor:
        r""":math:`P^\top M^{-1} R` for a symmetric ``M``, the block sums of :math:`M^{-1} R`, without forming
        :math:`M^{-1} R`: :math:`M P = P (\Lambda + B S)`, so :math:`P^\top M^{-1} = S^{1/2} C^{-1} S^{-1/2} P^\top`
        (:math:`\Lambda = \mathrm{diag}(\lambda)`, :math:`S` the block sizes, :math:`C` the core). Summing the entries
        of :math:`M^{-1} R` instead adds terms of size :math:`R / \lambda` whose block sums are far smaller (a random
        intercept's posterior mean at noise :math:`\ll` its variance): that lost about
        :math:`\epsilon\, s\, B / \lambda` relative, 1.5e-5 in float64 at noise 1e-10 in a user trial, where a dense
        Cholesky lost 6e-9. In :attr:`core_dtype`. # shape: (*batch, k, t)"""
        part, dtype = self.partition, self.core_dtype
        sums = part.block_sum(rhs.to(dtype), dim=-2)  # (*, k, t)
        if self._diagonal_core():  # C = diag(c), c = lam + s b: P^T M^{-1} R = (P^T R) / c
            c = self._invertible_diagonal_parts()[2]
            return sums / c.unsqueeze(-1)
        if self._validating():
            self._check_finite()
        lam = _folded_diagonal(self.lam.to(dtype), self._b_vector().to(dtype), part.sizes)[0]
        self._check_invertible_offsets(lam)
        root = self._core_sizes.sqrt().unsqueeze(-1)
        return root * self._core_solve(sums / root)

    def _signed_logdet(self) -> Tensor:
        """``torch.logdet``'s semantics from :meth:`slogdet_parts`: NaN below zero, ``-inf`` at zero. # (*batch,)"""
        sign, logabs = self.slogdet_parts()
        return torch.where(sign < 0, torch.full_like(logabs, float("nan")), logabs)

    def _logdet(self, what: str) -> Tensor:
        multiplicity = (self.partition.sizes - 1).to(self.core_dtype)
        if not self.symmetric:  # of any sign: torch.logdet semantics (nan below zero)
            return self._signed_logdet().to(self.dtype)
        if not self._validating() and self._diagonal_core():  # unchecked: torch.logdet of the dense M, O(k)
            return self._signed_logdet().to(self.dtype)
        if self._diagonal_core():  # log det C = sum log c: O(k)
            if self._validating():
                self._check_finite()
            lam, _, c = self._diagonal_parts()
            if self._validating():
                self._check_block_offsets(lam, what, strict=True)
                if bool((c <= 0).any()):
                    self._raise_not_positive_definite(what)
            logdet_core = torch.where(c > 0, c, torch.full_like(c, math.nan)).log().sum(-1)
        else:
            # unchecked, M need not be positive definite (C without a Cholesky factor, or some lam_i <= 0), and
            # its log-determinant follows torch.logdet of the dense matrix, as a product's and a sum's do: the
            # sign and size from the LU of C (slogdet_parts) where the Cholesky factor fails or on an accelerator
            if self._unchecked_on_accelerator():
                return self._signed_logdet().to(self.dtype)
            lam, _ = self.core()
            C, L, info = self._core_factor()
            if self._validating():
                self._check_block_offsets(lam, what, strict=True)
                if bool((info > 0).any()):
                    self._raise_not_positive_definite(what)
            elif bool(((info > 0) | ((lam <= 0) & (self.partition.sizes > 1)).any(-1)).any()):  # CPU: free
                return self._signed_logdet().to(self.dtype)
            if C is None:
                logdet_core = 2 * torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1)
            else:
                logdet_core = CoreLogdet.apply(C, L)
        safe_lam = torch.where(self.partition.sizes > 1, lam, torch.ones_like(lam))
        return (logdet_core + (multiplicity * safe_lam.log()).sum(-1)).to(self.dtype)

    def slogdet_parts(self) -> tuple[Tensor, Tensor]:
        r"""The sign and :math:`\log\lvert\det M\rvert` of any block mean operator (symmetric or not, definite or
        not), in :attr:`core_dtype`: :math:`\det M = \det C \prod_i \lambda_i^{s_i - 1}` (``torch.linalg.slogdet``
        of the ``k x k`` core, or its diagonal in diagonal mode). A product of operators multiplies the signs and
        adds the logarithms. With :class:`bma_gp.settings.validate` on, NaN or inf in ``lam`` or ``B`` raises a
        ``ValueError``. # shape: (*batch,), (*batch,)"""
        if self._diagonal_core():  # det C = prod c: O(k)
            if self._validating():
                self._check_finite()
            lam, _, c = self._diagonal_parts()
            sign, logabs = torch.sign(c).prod(-1), c.abs().log().sum(-1)
        else:
            lam, C = self.core()
            sign, logabs = torch.linalg.slogdet(C)
        multiplicity = (self.partition.sizes - 1).to(self.core_dtype)
        odd = (self.partition.sizes - 1) % 2 == 1
        sign = sign * torch.where(odd, torch.sign(lam), torch.ones_like(lam)).prod(-1)
        multi = self.partition.sizes > 1
        logabs = logabs + (multiplicity * torch.where(multi, lam, torch.ones_like(lam)).abs().log()).sum(-1)
        return sign, logabs

    def logdet(self) -> Tensor:
        r""":math:`\log\det M = \sum_i (s_i - 1)\log\lambda_i + \log\det C`.

        A symmetric operator must be positive definite: with :class:`bma_gp.settings.validate` on a
        ``ValueError`` names the offending ``lam_i`` or core eigenvalue (or a non-finite input).
        With validation off, and for a non-symmetric operator (a product of two), the result follows
        ``torch.logdet`` of the dense matrix: NaN for a negative determinant, ``-inf`` for a zero one, and
        the logarithm of a positive one also where :math:`M` is indefinite (an even number of negative
        eigenvalues; the sign comes from the LU of :math:`C`, formed where the Cholesky factor fails, and on an
        accelerator, where nothing is read back, always).
        """
        return self._logdet("logdet")

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        r""":math:`R^\top M^{-1} R` as :math:`\sum_a (r_a - \bar r_{c_a})^2 / \lambda_{c_a} + z^\top C^{-1} z` with
        :math:`\bar r` the block means and :math:`z = S^{1/2} \bar r`, in :attr:`core_dtype`: two terms without
        cancellation. (``r^T (M^{-1} r)`` cancels between entries of size :math:`r / \lambda` within each block, and
        with a small noise :math:`\lambda` it was off by a multiple of itself in float32.)"""
        self._check_rhs(inv_quad_rhs, "inv_quad_rhs")
        rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
        part, dtype = self.partition, self.core_dtype
        if self._diagonal_core():
            if self._validating():
                self._check_finite()
            lam, _, c = self._diagonal_parts()
        else:
            lam, _ = self._folded()
        self._check_invertible_offsets(lam)
        y = rhs.to(dtype)
        sizes = self._core_sizes.unsqueeze(-1)
        sums = part.block_sum(y, dim=-2)  # (*, k, t)
        within = part.block_sum((y - part.expand(sums / sizes, dim=-2)).square(), dim=-2)  # 0 in singleton blocks
        safe_lam = torch.where(part.sizes > 1, lam, torch.ones_like(lam)).unsqueeze(-1)
        z = sums / sizes.sqrt()
        if self._diagonal_core():
            if self._validating() and bool((c == 0).any()):
                raise _singular_core_error(self.dtype)
            core_term = z.square() / c.unsqueeze(-1)
        else:
            core_term = z * self._core_solve(z)
        res = ((within / safe_lam).sum(-2) + core_term.sum(-2)).to(self.dtype)
        return res.sum(-1) if reduce_inv_quad else res

    def inv_quad_logdet(
        self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True
    ) -> tuple[Tensor, Tensor]:
        r"""Closed-form :math:`R^\top M^{-1} R` and :math:`\log\det M` (never CG or a dense Cholesky)."""
        if inv_quad_rhs is None and not logdet:
            raise RuntimeError("Either `inv_quad_rhs` or `logdet` must be specifed.")
        if (
            inv_quad_rhs is not None
            and logdet
            and self.symmetric
            and self._shared_factor is None
            and not self._diagonal_core()
            and not self._unchecked_on_accelerator()
        ):
            if self._validating():
                self._check_finite()
            self._shared_factor = self._core_factor()  # one factorisation for both terms
            try:
                return self.inv_quad_logdet(inv_quad_rhs, logdet, reduce_inv_quad)
            finally:
                self._shared_factor = None
        inv_quad_term = (
            self.inv_quad(inv_quad_rhs, reduce_inv_quad)
            if inv_quad_rhs is not None
            else torch.empty(0, dtype=self.dtype, device=self.device)
        )
        logdet_term = (
            self._logdet("inv_quad_logdet") if logdet else torch.zeros([], dtype=self.dtype, device=self.device)
        )
        return inv_quad_term, logdet_term

    # ------------------------------------------------------------------ roots
    @_cached_unless_grad("cholesky")
    def _cholesky(self, upper: bool | None = False) -> LinearOperator:
        """linear_operator's dense Cholesky factor, with a :class:`~bma_gp.ClosedFormFallbackWarning`: a
        triangular factor has no closed form here (``MultivariateNormal.entropy`` and ``scale_tril`` ask for one).
        An operator built with ``symmetric=False`` has none: torch's Cholesky would read its lower triangle only."""
        self._check_symmetric("cholesky")
        warn_dense_cholesky(self)
        return super()._cholesky(upper=upper)

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        r""":math:`M = R R^\top` with :math:`R = M^{1/2}`, itself a block mean operator (``method`` is ignored);
        checked as :meth:`matrix_sqrt`, the errors naming ``root_decomposition``."""
        check_root_method("root_decomposition", method)
        return RootLinearOperator(self._root_decomposition_root())

    @_cached_unless_grad("root_decomposition_root")
    def _root_decomposition_root(self) -> BlockMeanLinearOperator:
        """:math:`M^{1/2}` for :meth:`root_decomposition` (kept: repeated calls reuse it), its errors naming it."""
        return self._sqrt("root_decomposition")

    @_cached_unless_grad("root_inv_decomposition")
    def root_inv_decomposition(
        self, initial_vectors: Tensor | None = None, test_vectors: Tensor | None = None, method: str | None = None
    ) -> LinearOperator:
        r""":math:`M^{-1} = R R^\top` with :math:`R = M^{-1/2}`, a block mean operator (arguments are ignored);
        checked as :meth:`matrix_inv_sqrt`, the errors naming ``root_inv_decomposition``."""
        check_root_method("root_inv_decomposition", method)
        return RootLinearOperator(self._inv_sqrt("root_inv_decomposition"))

    def sqrt_inv_matmul(self, rhs: Tensor, lhs: Tensor | None = None):
        r""":math:`M^{-1/2} R`, or (:math:`L M^{-1/2} R`, :math:`\operatorname{diag}(L M^{-1} L^\top)`)."""
        self._check_rhs(rhs, "rhs")
        inv_root = self._sqrt_inv_matmul_root()
        res = inv_root.matmul(rhs)
        if lhs is None:
            return res
        lhs_root = inv_root.matmul(lhs.mT).mT  # L M^{-1/2} (M^{-1/2} symmetric)
        # a vector rhs gives a vector L M^{-1/2} r, as linear_operator's sqrt_inv_matmul returns it
        return lhs_root @ rhs, lhs_root.pow(2).sum(-1)

    @_cached_unless_grad("sqrt_inv_matmul_root")
    def _sqrt_inv_matmul_root(self) -> BlockMeanLinearOperator:
        """:math:`M^{-1/2}` for :meth:`sqrt_inv_matmul` (kept: repeated calls reuse it), its errors naming it."""
        return self._inv_sqrt("sqrt_inv_matmul")

    # ------------------------------------------------------------------ spectrum
    def eigvalsh(self) -> Tensor:
        r"""All :math:`n` eigenvalues in ascending order: those of :math:`C`, and :math:`\lambda_i` with
        multiplicity :math:`s_i - 1`. # shape: (*batch, n)"""
        return self._eigen(eigenvectors=False)[0]

    def _eigen(self, eigenvectors: bool) -> tuple[Tensor, Tensor | None]:
        self._check_symmetric("an eigendecomposition (eigh, diagonalization)" if eigenvectors else "eigvalsh")
        diagonal = self._diagonal_core()
        if diagonal:  # C = diag(c): its eigenvalues are c, no k x k matrix
            if self._validating():
                self._check_finite()
            lam, _, c = self._diagonal_parts()
        else:
            lam, C = self.core()
        part = self.partition
        n, k = len(part), part.num_blocks
        repeats = part.sizes - 1
        lam_rep = torch.repeat_interleave(lam, repeats, dim=-1, output_size=n - k)
        if not eigenvectors:
            core_evals = c if diagonal else torch.linalg.eigvalsh(C)
            evals = torch.cat([core_evals, lam_rep], dim=-1)
            return evals.sort(dim=-1).values.to(self.dtype), None
        if diagonal:  # V = I (the final sort orders the pairs)
            e, V = c, torch.eye(k, dtype=c.dtype, device=c.device).expand(*c.shape, k)
        else:
            e, V = torch.linalg.eigh(C)
        evals = torch.cat([e, lam_rep], dim=-1).to(self.dtype)
        span = part.expand((V * self._core_sizes.rsqrt().unsqueeze(-1)).to(self.dtype), dim=-2)  # P S^-1/2 V
        complement = _helmert_basis(part, self.dtype).expand(*span.shape[:-2], n, n - k)
        evecs = torch.cat([span, complement], dim=-1)
        evals, order = evals.sort(dim=-1)
        evecs = torch.gather(evecs, -1, order.unsqueeze(-2).expand(evecs.shape))
        return evals, evecs

    def _symeig(self, eigenvectors: bool = False, return_evals_as_lazy: bool | None = False):
        from linear_operator.operators.dense_linear_operator import DenseLinearOperator

        evals, evecs = self._eigen(eigenvectors)
        return evals, (DenseLinearOperator(evecs) if eigenvectors else None)

    @_cached_unless_grad("svd")
    def _svd(self) -> tuple[LinearOperator, Tensor, LinearOperator]:
        """linear_operator's SVD from the closed-form eigendecomposition (an ``n x n`` matrix of eigenvectors, as
        :meth:`diagonalization`); cached only without gradients, as every closed form here."""
        from linear_operator.operators.dense_linear_operator import DenseLinearOperator

        if not self.symmetric:  # no eigendecomposition to take it from: the dense SVD, as for a product of two
            return dense_svd(self, "built with symmetric=False", "its singular values have no closed form")
        evals, evecs = self._eigen(eigenvectors=True)
        assert evecs is not None
        return DenseLinearOperator(evecs * torch.sign(evals).unsqueeze(-2)), evals.abs(), DenseLinearOperator(evecs)

    @_cached_unless_grad("diagonalization")
    def diagonalization(self, method: str | None = None):
        """Closed-form eigendecomposition. The eigenvalues cost O(n + k^3); the eigenvectors are an
        explicit ``n x n`` matrix (a Helmert basis inside each block plus :math:`P S^{-1/2} V`), so only
        ask for them at sizes where that fits. ``method`` is one linear_operator knows (``"symeig"``,
        ``"lanczos"`` or ``None``), ignored: the decomposition is the closed form."""
        check_root_method("diagonalization", method)
        return self._symeig(eigenvectors=True)

    def __repr__(self) -> str:
        return (
            f"BlockMeanLinearOperator(shape={tuple(self.shape)}, num_blocks={self.partition.num_blocks}, "
            f"dtype={self.dtype}, device={self.device}{'' if self.symmetric else ', symmetric=False'})"
        )


# ---------------------------------------------------------------------------- private helpers
def _in_product() -> bool:
    """Whether a product kernel with a block mean, group or inducing-point factor is being evaluated."""
    from bma_gp._composition import _IN_BLOCK_MEAN_PRODUCT

    return _IN_BLOCK_MEAN_PRODUCT.get()


def _one_hot_block_mean(other) -> BlockMeanLinearOperator | None:
    """``other`` as a block mean operator when it is a ``k x k`` matrix read at the same ids on both sides (GPyTorch's
    ``IndexKernel`` between the same task ids: a ``LazyEvaluatedKernelTensor``'s ``InterpolatedLinearOperator`` with one
    interpolation weight 1 per row), ``C[i_a, i_b]``: ``lam = 0`` and ``B = C`` over the ids present, as
    ``GroupKernel(k, rank=r)`` gives it. None for anything else (ids that differ across a batch included)."""
    found = _task_lookup(other)
    if found is None:
        return None
    rows, ids, C = found
    if rows.shape[-1] != ids.shape[-1] or not bool((rows == ids).all()):
        return None
    present, labels = torch.unique(ids, sorted=True, return_inverse=True)
    single = batch_expanded(C)
    if single is not None:
        # one task matrix copied across a batch (GPyTorch's IndexKernel at batched ids, as a fantasy model's inputs
        # copied across its fantasy batch): B stays a copy of one matrix, which an elementwise product with a sum
        # reads as unbatched (hadamard_plan), as the prediction's cross covariance does
        k = present.numel()
        B = single.index_select(-2, present).index_select(-1, present).expand(*C.shape[:-2], k, k)
    else:
        B = C.index_select(-2, present).index_select(-1, present)
    lam = B.new_zeros(B.shape[:-1])
    return BlockMeanLinearOperator(lam, B, Partition.from_labels(labels, num_blocks=present.numel()))


def batch_expanded(t: Tensor, core_dims: int = 2) -> Tensor | None:
    """The one matrix (``core_dims=1``: vector) that a batched ``t`` repeats across its batch (``t`` an ``expand`` of
    it: stride 0 in every batch dimension of size above 1), or ``None`` (``t`` unbatched or holding its own batch
    entries)."""
    batch = t.dim() - core_dims
    if batch <= 0 or not all(size == 1 or stride == 0 for size, stride in zip(t.shape[:batch], t.stride()[:batch])):
        return None
    return t[(0,) * batch]


def _task_lookup(op) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(rows, columns, C)`` when ``op`` is a ``k x k`` matrix ``C`` read at ids, ``C[rows_a, columns_b]`` (GPyTorch's
    ``IndexKernel``: an ``InterpolatedLinearOperator`` with one interpolation weight 1 per row on both sides) whose
    column ids are the same across its batch, ``C`` symmetric (made exactly so); ``rows`` keeps its batch
    ``(*batch, t)``, ``columns`` is one ``(n,)`` vector. None for anything else."""
    from linear_operator.operators import InterpolatedLinearOperator

    if type(op) is not InterpolatedLinearOperator:
        return None
    left, right = op.left_interp_indices, op.right_interp_indices
    if left.shape[-1] != 1 or right.shape[-1] != 1:
        return None
    if not (bool((op.left_interp_values == 1).all()) and bool((op.right_interp_values == 1).all())):
        return None
    columns = right[..., 0].reshape(-1, right.shape[-2])
    if not bool((columns == columns[0]).all()):
        return None
    base = op.base_linear_op.to_dense()  # (*batch, k, k): the task covariance, small
    single = batch_expanded(base)  # GPyTorch expands one task matrix across batched ids: keep it one
    C = _symmetric_task_covariance(base if single is None else single)
    if C is None:
        return None
    return left[..., 0], columns[0], C if single is None else C.expand(*base.shape)


def _symmetric_task_covariance(C: Tensor) -> Tensor | None:
    """An ``IndexKernel``'s task covariance ``C`` (``W W^T + diag(v)``, symmetric up to rounding) made exactly
    symmetric, or ``None`` where it is not square or not symmetric (no block mean matrix)."""
    if C.shape[-1] != C.shape[-2]:
        return None
    scale = C.detach().abs().amax().clamp(min=torch.finfo(C.dtype).tiny)
    if bool(((C - C.mT).detach().abs() > _tolerance(C.dtype) * scale).any()):
        return None
    return (C + C.mT) / 2


def _tolerance(dtype: torch.dtype) -> float:
    """Relative size below which an eigenvalue is indistinguishable from rounding error of the largest,
    for an operator whose ``lam`` and ``B`` are stored in ``dtype``."""
    return 10 * torch.finfo(dtype).eps


def _helmert_basis(partition: Partition, dtype: torch.dtype) -> Tensor:
    r"""Orthonormal basis (n x (n-k)) of the vectors that sum to zero inside every block.

    Within a block with members :math:`m_0 < \dots < m_{s-1}`, column :math:`j = 1..s-1` has
    :math:`1/\sqrt{j(j+1)}` on :math:`m_0..m_{j-1}` and :math:`-j/\sqrt{j(j+1)}` on :math:`m_j`.
    """
    labels = partition.labels
    n, k = len(partition), partition.num_blocks
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(partition.sizes, 0) - partition.sizes
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(n, device=labels.device) - starts[labels[order]]
    # column c <-> (block, j) with j = 1..s-1, blocks in order
    col_block = torch.repeat_interleave(torch.arange(k, device=labels.device), partition.sizes - 1, output_size=n - k)
    col_starts = torch.cumsum(partition.sizes - 1, 0) - (partition.sizes - 1)
    col_j = torch.arange(n - k, device=labels.device) - col_starts[col_block] + 1
    same = labels.unsqueeze(-1) == col_block.unsqueeze(0)
    j = col_j.unsqueeze(0).to(dtype)
    r = rank.unsqueeze(-1)
    norm = (j * (j + 1)).rsqrt()
    values = torch.where(
        r < col_j.unsqueeze(0), norm, torch.where(r == col_j.unsqueeze(0), -j * norm, torch.zeros_like(norm))
    )
    return torch.where(same, values, torch.zeros_like(values))
