"""The Frobenius-nearest block mean matrix, from a dense matrix, an operator or block sums.

The mathematics: :doc:`docs/math.md, section 2 </math>`.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
from linear_operator.operators import DenseLinearOperator, LinearOperator, SumLinearOperator
from torch import Tensor

from bma_gp._precision import core_dtype
from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator, check_symmetric_flag
from bma_gp.partition import Partition

__all__ = ["block_mean", "block_mean_from_sums"]


def _symmetric_part(B: Tensor) -> Tensor:
    """``(B + B^T) / 2``, exactly symmetric, with the entries that already match kept as they are (no overflow of the
    sum, no rounding of halved subnormals)."""
    return torch.where(B == B.mT, B, 0.5 * B + 0.5 * B.mT)


def block_mean_from_sums(
    block_sums: Tensor, diag_sums: Tensor, partition: Partition, *, symmetric: bool = True
) -> BlockMeanLinearOperator:
    r"""The optimal block mean matrix from the block sums of :math:`A`.

    .. math::
        B_{ij} = \frac{T_{ij}}{s_i s_j}\ (i \ne j), \qquad
        B_{ii} = \frac{T_{ii} - d_i}{s_i (s_i - 1)}\ (0 \text{ if } s_i = 1), \qquad
        \lambda_i = \frac{d_i}{s_i} - B_{ii},

    with :math:`T = P^\top A P` and :math:`d = P^\top \operatorname{diag}(A)`. Differentiable.

    Integer sums (``block_mean``'s of an integer :math:`A` are int64) are divided in float64 and the means rounded
    to the default dtype: :math:`\lambda` is a difference of two means, which cancels in float32 (entries of
    :math:`2^{24} - 1` and :math:`2^{24} - 2` gave :math:`\lambda = 2` for 1). 16-bit sums are divided in float32.

    Args:
        block_sums: :math:`T`. # shape: (*batch, k, k)
        diag_sums: :math:`d`. # shape: (*batch, k)
        partition: the partition the sums were taken over.
        symmetric: whether :math:`A` is symmetric (then so is the result); pass ``False`` for a
            general :math:`A`. With ``True`` the result is that of :math:`(A + A^\top) / 2` (the
            operator symmetrises ``B``), the nearest symmetric block mean matrix to any :math:`A`.
    """
    if not isinstance(partition, Partition):
        raise TypeError(f"partition must be a bma_gp.Partition, got {type(partition).__name__}.")
    check_symmetric_flag(symmetric)
    for name, sums in (("block_sums", block_sums), ("diag_sums", diag_sums)):
        if not torch.is_tensor(sums):
            raise TypeError(
                f"{name} must be a tensor, got {type(sums).__name__}; convert it with torch.as_tensor({name})."
            )
        if sums.dtype.is_complex or sums.dtype == torch.bool:
            raise TypeError(
                f"{name} must hold real numbers, got dtype {sums.dtype}: a block mean operator is real (for a complex "
                "A, approximate A.real and A.imag separately)."
            )
    k = partition.num_blocks
    if block_sums.shape[-2:] != (k, k):
        raise ValueError(f"block_sums must have shape (*batch, {k}, {k}), got {tuple(block_sums.shape)}.")
    if diag_sums.shape[-1:] != (k,):
        raise ValueError(f"diag_sums must have shape (*batch, {k}), got {tuple(diag_sums.shape)}.")
    try:
        torch.broadcast_shapes(block_sums.shape[:-2], diag_sums.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"the batch shapes of block_sums {tuple(block_sums.shape[:-2])} and diag_sums "
            f"{tuple(diag_sums.shape[:-1])} do not broadcast."
        ) from None
    if block_sums.device != diag_sums.device:
        raise ValueError(
            f"block_sums is on {block_sums.device} but diag_sums is on {diag_sums.device}; move one with .to(device)."
        )
    dtype = torch.promote_types(block_sums.dtype, diag_sums.dtype)  # mixed precisions: as torch's arithmetic promotes
    # 16-bit sums are divided in float32: s_i s_j overflows float16 from blocks of 256 on (B was 0 there)
    wdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if not dtype.is_floating_point:
        # integer sums: torch's true division of int64 gives the default dtype (float32), in which lam = d / s - B_ii
        # cancels as it did for float32 sums; the means are formed in float64 and rounded to the default dtype, the
        # dtype that integer sums gave before
        wdt, dtype = torch.float64, torch.get_default_dtype()
    block_sums, diag_sums = block_sums.to(wdt), diag_sums.to(wdt)
    partition = partition.to(block_sums.device)  # a partition built on the CPU follows the sums, as in block_mean
    s = partition.sizes.to(wdt)
    pairs = s.unsqueeze(-1) * s.unsqueeze(-2)
    within = s * (s - 1)
    diag_T = torch.diagonal(block_sums, dim1=-2, dim2=-1)
    B_diag = torch.where(within > 0, (diag_T - diag_sums) / within.clamp_min(1), torch.zeros_like(diag_T))
    off = block_sums / pairs
    shape = torch.broadcast_shapes(off.shape[:-1], B_diag.shape)  # the sums' batch shapes may differ
    if shape != off.shape[:-1]:
        off = off.expand(*shape, k)
    # one k x k copy with the diagonal replaced (a mask, a diag_embed and a where cost three more passes)
    B = torch.diagonal_scatter(off, B_diag.expand(shape), dim1=-2, dim2=-1)
    lam = diag_sums / s - B_diag
    if symmetric:  # the block means of (A + A^T) / 2: stored so, B describes the operator (which symmetrises it)
        B = _symmetric_part(B)
    if wdt != dtype:
        lam, B = lam.to(dtype), B.to(dtype)
    return BlockMeanLinearOperator(lam, B, partition, symmetric=symmetric)


def _operator_block_sums(A: LinearOperator, partition: Partition, chunk_columns: int, dtype: torch.dtype) -> Tensor:
    """:math:`P^\\top A P` in ``dtype`` for an operator, multiplying by ``chunk_columns`` indicator columns at a
    time."""
    k = partition.num_blocks
    labels = partition.labels
    pieces = []
    for start in range(0, k, chunk_columns):
        stop = min(start + chunk_columns, k)
        ids = torch.arange(start, stop, device=labels.device)
        indicator = (labels.unsqueeze(-1) == ids).to(A.dtype)  # (n, c)
        product = A.matmul(indicator)
        if isinstance(product, LinearOperator):  # an operator whose products are operators (ZeroLinearOperator)
            product = product.to_dense()  # n x c, as the tensor a product gives otherwise
        pieces.append(partition.block_sum(product.to(dtype), dim=-2))
    return torch.cat(pieces, dim=-1)


def _holds_module(A: LinearOperator) -> bool:
    """Whether ``A`` or an operator inside it keeps a ``torch.nn.Module`` (a GPyTorch lazily evaluated kernel tensor
    keeps its kernel)."""
    return any(
        isinstance(arg, torch.nn.Module) or (isinstance(arg, LinearOperator) and _holds_module(arg))
        for arg in (*A._args, *A._kwargs.values())
    )


def _widened_summands(A: LinearOperator, dtype: torch.dtype, evaluated: bool = False) -> list[Tensor | LinearOperator]:
    """The summands of a 16-bit operator ``A`` to be block-summed in ``dtype`` (differentiably), none ``n x n`` in it.

    A sum is split into its summands (block sums are linear), and a dense summand is returned as its tensor, which
    :func:`_tensor_block_sums` widens a chunk of rows at a time: ``A.to(dtype)`` would copy it whole. Another
    operator is cast with ``.to(dtype)`` (a diagonal's or a root's factors are copied). linear_operator's ``.to``
    casts every argument with its own ``.to``, and ``torch.nn.Module.to`` works in place: a lazily evaluated kernel
    tensor's kernel would be left in ``dtype`` for its owner, so such an operator is evaluated first (as its
    products would evaluate it)."""
    if isinstance(A, DenseLinearOperator):
        return [A.tensor]
    if isinstance(A, SumLinearOperator):
        return [part for op in A.linear_ops for part in _widened_summands(op, dtype, evaluated)]
    if not evaluated and _holds_module(A):
        return _widened_summands(A.evaluate_kernel(), dtype, evaluated=True)
    return [A.to(dtype)]


#: Entries of a narrower ``A`` widened at a time by :func:`_tensor_block_sums` on the CPU (4 MB in float64). A widened
#: chunk that stays in cache costs about a third of one of 64 MB (float32 at n = 8000, one thread: 0.09 against 0.3 s).
_WIDEN_ENTRIES = 2**19
#: The same on an accelerator (128 MB in float64), where each chunk costs a few kernel launches.
_WIDEN_ENTRIES_DEVICE = 2**24


def _tensor_block_sums(A: Tensor, partition: Partition, dtype: torch.dtype) -> Tensor:
    """:math:`P^\\top A P` in ``dtype`` for a dense ``A``; a narrower ``A`` is widened a chunk of rows at a time
    (:data:`_WIDEN_ENTRIES` entries on the CPU, which stay in cache), never as a whole ``n x n`` copy."""
    if A.dtype == dtype:
        return partition.block_sum(partition.block_sum(A, dim=-1), dim=-2)
    n = A.shape[-1]
    entries = _WIDEN_ENTRIES if A.device.type == "cpu" else _WIDEN_ENTRIES_DEVICE
    rows = max(1, entries // max(1, n * A[..., 0, 0].numel()))
    pieces = [partition.block_sum(A[..., start : start + rows, :].to(dtype), dim=-1) for start in range(0, n, rows)]
    return partition.block_sum(torch.cat(pieces, dim=-2), dim=-2)


def positive_int_or_none(value: Any, requirement: str) -> int | None:
    """``value`` as a Python int (any integer: a NumPy one, a one-element integer tensor), or None; a bool, a float
    or a number below 1 raise ``ValueError(f"{requirement}, got {value!r}.")``."""
    if value is None:
        return None
    try:
        number = -1 if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = -1
    if number <= 0:
        raise ValueError(f"{requirement}, got {value!r}.")
    return number


def _lazy_kernel_matrix(A, symmetric: bool) -> Callable[[Partition], BlockMeanLinearOperator] | None:
    """For ``kernel(x, x)`` as GPyTorch returns it (a ``LazyEvaluatedKernelTensor``) of a kernel whose matrix is dense
    (an RBF, a sum of products of them, a custom kernel returning a tensor), whose products with the indicator
    columns would evaluate all ``n x n`` entries at once: :func:`~bma_gp.kernel_block_mean` of the kernel at ``x``
    (tiles, O(n * chunk) memory), as a function of the partition. None for any other ``A``, and for kernels that
    return a structured operator (a group kernel, SGPR's low-rank root: their products are cheap), found by
    evaluating the kernel at two of the inputs. A dense kernel with ``active_dims``, extra keyword arguments,
    ``last_dim_is_batch``, two different inputs or with ``symmetric=False`` warns that the whole matrix is evaluated
    and returns None: its lazy tensor holds the selected columns only, so the kernel cannot be called on them again
    (``chunk_columns``, the column chunks of ``block_mean``'s own products, does not apply to the tiles).
    Block mean and group kernels are left to their products: at two new inputs they are dense, at their own
    inputs structured."""
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    from bma_gp._composition import _involves_block_mean

    if not isinstance(A, LazyEvaluatedKernelTensor) or A.shape[-1] <= 2 or _involves_block_mean(A.kernel):
        return None  # a block mean or group kernel: structured at its own inputs, dense at two of them
    x1, x2, kernel = A.x1, A.x2, A.kernel
    probe = LazyEvaluatedKernelTensor(
        x1[..., :2, :], x2[..., :2, :], kernel=kernel, last_dim_is_batch=A.last_dim_is_batch, **A.params
    ).evaluate_kernel()
    if not (torch.is_tensor(probe) or isinstance(probe, DenseLinearOperator)):
        return None
    same = x1 is x2 or (x1.shape == x2.shape and bool(torch.equal(x1, x2)))
    if symmetric and kernel.active_dims is None and not A.params and not A.last_dim_is_batch and same:
        from bma_gp.kernel_block_mean import kernel_block_mean

        return lambda partition: kernel_block_mean(kernel, x1, partition)
    why = (
        "with symmetric=False (kernel_block_mean sums a symmetric kernel matrix)"
        if not symmetric
        else "(its products cannot be taken in column chunks)"
    )
    warnings.warn(
        f"block_mean of a lazily evaluated {type(kernel).__name__} matrix evaluates all n x n = "
        f"{A.shape[-1]} x {A.shape[-1]} kernel values at once {why}. "
        "bma_gp.kernel_block_mean(kernel, x, partition) sums them in tiles in O(n * chunk) memory.",
        stacklevel=3,
    )
    return None


def block_mean(
    A: Tensor | LinearOperator, partition: Partition, *, symmetric: bool = True, chunk_columns: int | None = None
) -> BlockMeanLinearOperator:
    r"""The Frobenius-nearest block mean matrix to ``A`` (:doc:`docs/math.md, section 2 </math>`).

    Equal to the average of :math:`Q A Q^\top` over all permutations :math:`Q` that shuffle indices
    only inside blocks, so a positive semidefinite ``A`` gives a positive semidefinite result. Costs
    one pass over the entries of a dense ``A`` (:math:`O(n^2)`, no Python loop over blocks); a
    :class:`~linear_operator.operators.LinearOperator` is multiplied by the block indicator columns,
    ``chunk_columns`` at a time (default: enough to keep about 64 MB per product). A float32, float16 or
    bfloat16 ``A`` is summed in float64 (a chunk of rows at a time) and only the means are rounded back to its
    dtype: :math:`\lambda` is a difference of two means, which float32 sums of nearly equal entries get wrong.
    A ``DenseLinearOperator`` is summed as its tensor. Another float32 or float64 operator's products with the
    indicator columns are formed in its own dtype (only their sums are widened), so a float32 operator keeps that
    rounding. A float16 or bfloat16 operator's products would overflow float16 (``inf`` past 65504) and keep 11
    or 8 bits, so it is summed in float64 instead, and only the means are rounded back to its dtype, as for a
    tensor: a sum summand by summand, a dense summand as a tensor (a chunk of rows at a time), another operator
    cast to float64 (its own tensors are copied: a diagonal, a root, a dense matrix that it scales or multiplies).
    An integer ``A`` is summed in int64, and its means are formed in float64 and rounded to the default dtype.

    Args:
        A: the matrix. # shape: (*batch, n, n)
        partition: partition of the ``n`` indices.
        symmetric: ``A`` is symmetric (default); pass ``False`` for a general square ``A``. With ``True`` the
            result is the block mean matrix of :math:`(A + A^\top) / 2`, the nearest *symmetric* block mean
            matrix to any ``A`` (``A`` is not checked).
        chunk_columns: indicator columns per product with a ``LinearOperator`` ``A`` (unused for a tensor), a
            positive int.
    """
    if not isinstance(partition, Partition):
        raise TypeError(f"partition must be a bma_gp.Partition, got {type(partition).__name__}.")
    if not (torch.is_tensor(A) or isinstance(A, LinearOperator)):
        raise TypeError(f"A must be a tensor or a LinearOperator, got {type(A).__name__}.")
    check_symmetric_flag(symmetric)
    if A.dtype.is_complex or A.dtype == torch.bool:
        raise TypeError(
            f"A must hold real numbers, got dtype {A.dtype}: a block mean operator is real (for a complex A, "
            "approximate A.real and A.imag separately)."
        )
    n = len(partition)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be square with shape (*batch, n, n), got {tuple(A.shape)}.")
    if A.shape[-1] != n:
        raise ValueError(f"A has size {A.shape[-1]} but the partition has {n} indices; they must match.")
    # range() fails on 0 and gives no columns for a negative number
    chunk_columns = positive_int_or_none(
        chunk_columns, "chunk_columns must be a positive int (or None for the default)"
    )
    partition = partition.to(A.device)
    if isinstance(A, BlockMeanLinearOperator) and A.partition.same_as(partition):
        if A.symmetric or not symmetric:
            return A  # already a block mean matrix on this partition: its own nearest approximation
        # its symmetric part, as for a tensor (B stored symmetrised, so that it describes the result)
        return BlockMeanLinearOperator(A.lam, _symmetric_part(A.B), partition, symmetric=True)
    lazy = _lazy_kernel_matrix(A, symmetric)
    if lazy is not None:
        return lazy(partition)
    # sums of up to n^2 entries overflow float16 from n = 256 on (ones: 65504 is its largest number) and lose bits in
    # float32 too: lam = d / s - B_ii cancels where a block's entries are nearly equal (a long lengthscale), so the
    # sums and the means are taken in float64 (core_dtype) and only the result is rounded back to A's dtype
    # integers are summed in int64, as torch.sum does (int8 to int32 sums overflowed silently)
    dtype = core_dtype(A.dtype) if A.dtype.is_floating_point else torch.int64
    if isinstance(A, DenseLinearOperator):  # its tensor is summed in dtype; its products would be in A's own
        A = A.tensor
    # a 16-bit operator's products with the indicator columns are sums of up to n entries in its dtype: 1000 entries
    # of 100 overflowed float16 (B = inf). Its summands are block-summed in float64 instead, as a 16-bit tensor is
    # (a sum's summands share its batch shape, so their sums add up without broadcasting)
    widen = not torch.is_tensor(A) and A.dtype in (torch.float16, torch.bfloat16)
    parts = _widened_summands(A, dtype) if widen else [A]
    if chunk_columns is None:
        chunk_columns = max(1, min(partition.num_blocks, (8 * 2**20) // max(n, 1)))
    diag_sums = block_sums = None
    for part in parts:
        diagonal = torch.diagonal(part, dim1=-2, dim2=-1) if torch.is_tensor(part) else part.diagonal()
        part_diag_sums = partition.block_sum(diagonal.to(dtype), dim=-1)
        if torch.is_tensor(part):
            part_block_sums = _tensor_block_sums(part, partition, dtype)
        else:
            part_block_sums = _operator_block_sums(part, partition, chunk_columns, dtype)
        diag_sums = part_diag_sums if diag_sums is None else diag_sums + part_diag_sums
        block_sums = part_block_sums if block_sums is None else block_sums + part_block_sums
    assert block_sums is not None and diag_sums is not None  # parts holds at least A itself
    result = block_mean_from_sums(block_sums, diag_sums, partition, symmetric=symmetric)
    if result.dtype != A.dtype and A.dtype.is_floating_point:  # 16-bit floats get their own type back
        return BlockMeanLinearOperator(result.lam.to(A.dtype), result.B.to(A.dtype), partition, symmetric=symmetric)
    return result
