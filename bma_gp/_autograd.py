"""A first-order-only marker for the backward passes of the package's ``torch.autograd.Function`` subclasses."""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["first_order_only"]


def first_order_only(what: str):
    """Mark the ``backward`` of a ``torch.autograd.Function`` as first order only: it runs without building a
    graph, and raises a ``RuntimeError`` naming ``what`` when asked for a graph (``create_graph=True``).

    Such a backward pass treats the tensors it saved as constants. :func:`torch.autograd.function.once_differentiable`
    marks its results only when an incoming gradient requires grad, and its marker is not on the path from the
    inputs, so ``torch.autograd.grad(loss, x, create_graph=True)`` followed by a second ``grad`` (a Hessian-vector
    product, a gradient penalty) dropped every term through the saved tensors and came back silently wrong. A
    second derivative is refused up front instead. Without ``create_graph`` nothing changes.
    """
    message = (
        f"second derivatives (create_graph=True: a Hessian-vector product, a gradient penalty, double backward) "
        f"are not implemented for {what}: its backward pass computes first derivatives only, and a second "
        f"derivative through it would be wrong. Differentiate the dense matrix (to_dense()) for second derivatives, "
        f"or call backward / torch.autograd.grad without create_graph=True."
    )

    def decorator(backward):
        @functools.wraps(backward)
        def wrapped(ctx, *grads: Any):
            if torch.is_grad_enabled():  # create_graph=True
                raise RuntimeError(message)
            return backward(ctx, *grads)

        return wrapped

    return decorator
