"""Reducing gradients of broadcast operands back to the operand's shape."""

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
