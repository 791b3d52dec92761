"""Broadcast operands: gradients reduced back to their shape, constants and diagonals in elementwise products."""

from __future__ import annotations

import torch
from torch import Tensor


def sum_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum the dimensions of ``grad`` that broadcasting added or expanded, so it matches ``shape``."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, size in enumerate(shape):
        if size == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


def batch_constants(other) -> Tensor | None:
    """The constants of ``other`` when it is a dense batch of ``1 x 1`` matrices, shape ``(*batch)``, else None.

    linear_operator's ``mul`` takes a tensor of shape ``(*batch, 1, 1)`` for a constant only when it has the operator's
    batch shape; otherwise (a ``ScaleKernel`` with ``batch_shape=(t,)`` around an unbatched kernel) it hands
    ``_mul_matrix`` a ``DenseLinearOperator`` of that shape, which is still one constant per batch entry."""
    from linear_operator.operators import DenseLinearOperator

    if type(other) is DenseLinearOperator and other.shape[-2:] == (1, 1):
        return other.tensor.reshape(other.shape[:-2])
    return None


def times_diagonal(op, diag):
    """The elementwise product of ``op`` with a diagonal operator ``diag``: ``diag(diag(op) d)``, batch shapes
    broadcast. (``diag._mul_matrix(op)`` would say the same, except for an ``IdentityLinearOperator``, whose
    ``_mul_matrix`` returns ``op`` itself.)"""
    from linear_operator.operators import DiagLinearOperator

    return DiagLinearOperator(diag._diagonal() * op._diagonal())


def shared_batch_entry(x: Tensor, core_dims: int) -> Tensor | None:
    """``x`` of shape ``(*batch, *core)`` (``core_dims`` trailing dimensions) as one ``core`` tensor when every batch
    entry holds the same values (``x`` itself without a batch), else None; also None for an empty batch."""
    if x.dim() == core_dims:
        return x
    flat = x.reshape(-1, *x.shape[x.dim() - core_dims :])
    if flat.shape[0] == 0:
        return None
    first = flat[0]
    return first if bool((flat == first).all()) else None
