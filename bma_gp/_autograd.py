"""How derivatives pass through the package: a first-order-only marker for the backward passes of its
``torch.autograd.Function`` subclasses, a reverse-mode-only marker for those Functions, and
:func:`tracks_derivatives` (whether a tensor carries derivatives in any of torch's modes: ``requires_grad``,
forward-mode dual tensors, :mod:`torch.func` transforms), which the value-based shortcuts ask before they run."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from bma_gp._diagonal import is_diagonal

__all__ = [
    "carries_tangent",
    "diagonal_tangent",
    "first_order_only",
    "functorch_active",
    "functorch_wrapped",
    "has_forward_tangent",
    "refuse_tangents",
    "reverse_mode_only",
    "tracks_derivatives",
    "unbatched_backward",
]

_functorch = getattr(torch._C, "_functorch", None)
_is_wrapped = getattr(_functorch, "is_functorch_wrapped_tensor", None)
_unwrapped = getattr(_functorch, "get_unwrapped", None)
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_is_legacy_batched = getattr(_functorch, "is_legacy_batchedtensor", None)


def functorch_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a wrapper of a running :mod:`torch.func` transform (``grad``, ``jacrev``, ``jvp``,
    ``jacfwd``, ``hessian``, ``vmap``): every tensor made inside one is, whether or not it carries a derivative. Such
    a tensor has no storage of its own (``data_ptr()`` raises); so has a batched tensor of torch's legacy ``vmap``.
    Two flag reads outside a transform."""
    if _transforms_active is None or not _transforms_active():
        # a wrapper kept from a transform that has returned is dead: a plain constant, as torch treats it. torch's
        # legacy vmap (torch.autograd.functional.jacobian with vectorize=True, gradcheck's batched gradients) sets no
        # transform flag: its batched tensors (no storage either, no batching rule for out= forms) are read apart
        return _is_legacy_batched is not None and bool(_is_legacy_batched(t))
    return _is_wrapped is None or bool(_is_wrapped(t))


def functorch_active() -> bool:
    """Whether a :mod:`torch.func` transform is running (``vmap``, ``grad``, ``jacrev``, ...): torch then refuses
    every ``torch.autograd.Function`` without a ``setup_context``, whatever its inputs. One flag read."""
    return _transforms_active is not None and bool(_transforms_active())


def has_forward_tangent(t: Tensor) -> bool:
    """Whether ``t`` carries a forward-mode tangent at the current dual level (a dual tensor of
    :mod:`torch.autograd.forward_ad`, a tensor that depends on an input of ``torch.func.jvp`` or ``jacfwd``). The
    autograd graph (``grad_fn``) shows where reverse-mode gradients go, not where such a tangent is: a structural
    test of the graph (:func:`bma_gp._diagonal.diagonal_by_construction`) says nothing about it. Outside a dual
    level one flag read."""
    if getattr(_forward_ad, "_current_level", 0) < 0:
        return False
    return _forward_ad.unpack_dual(t).tangent is not None


def diagonal_tangent(B: Tensor) -> bool:
    """Whether the forward-mode tangent of the ``k x k`` matrix ``B`` is diagonal by value (one host read; True
    without a tangent). False where it cannot be read: a ``torch.func.jacfwd`` tangent is a batch of directions,
    which a value test cannot look at (and which holds off-diagonal directions anyway)."""
    tangent = _forward_ad.unpack_dual(B).tangent if getattr(_forward_ad, "_current_level", 0) >= 0 else None
    if tangent is None:
        return True
    try:
        return is_diagonal(tangent)
    except RuntimeError:  # vmap: data-dependent control flow on a batched tangent
        return False


def carries_tangent(t: Tensor) -> bool:
    """Whether derivatives are tracked through ``t`` in a way that its ``requires_grad`` does not show, or that
    ``torch.no_grad`` does not switch off: a forward-mode tangent (a dual tensor of :mod:`torch.autograd.forward_ad`,
    ``torch.func.jvp``, ``jacfwd``, ``hessian``), or a :mod:`torch.func` wrapper that tracks a derivative at any of
    its levels (``grad``, ``jacrev``; under ``vmap`` the batched value is looked into, a batch alone is no
    derivative).

    Such a tensor may report ``requires_grad=False`` (a dual tensor, an input of ``jacfwd``), so a shortcut meant
    for "no derivatives wanted" (a value-based test, a ``no_grad`` evaluation, a cached result) would drop or alter
    its tangent and give a silently wrong derivative. A few C calls, no host synchronisation: outside a dual level
    and a transform (the usual case) two flag reads."""
    if functorch_wrapped(t):
        return _wrapper_tracks(t)
    return has_forward_tangent(t)


def _wrapper_tracks(t: Tensor) -> bool:
    """Whether a level of the :mod:`torch.func` wrapper ``t`` tracks a derivative (requires grad, or carries a
    tangent); a wrapper that cannot be looked into counts as one that does (the general paths are always right)."""
    is_wrapped, unwrapped = _is_wrapped, _unwrapped
    if is_wrapped is None or unwrapped is None:
        return True
    try:
        for _ in range(64):
            if t.requires_grad or has_forward_tangent(t):
                return True
            if not is_wrapped(t):
                return False
            t = unwrapped(t)
    except Exception:  # noqa: BLE001 (an internal API of torch's: when in doubt, derivatives are tracked)
        pass
    return True


def tracks_derivatives(t: Tensor) -> bool:
    """Whether derivatives with respect to ``t``, or through it, may be asked for: ``t.requires_grad``, or a tangent
    that ``requires_grad`` does not show (:func:`carries_tangent`: forward mode, :mod:`torch.func`). Where this is
    true, only the general (derivative-carrying) paths may run, not shortcuts that test values or drop the graph."""
    return t.requires_grad or carries_tangent(t)


def _reverse_mode_message(what: str) -> str:
    return (
        f"{what} is differentiated in reverse mode only (a torch.autograd.Function with a backward pass and no jvp), "
        "so forward-mode AD (dual tensors of torch.autograd.forward_ad, torch.func.jvp, jacfwd, hessian) and the "
        "torch.func transforms (grad, jacrev) cannot pass through it: a tensor given to it carries a forward-mode "
        "tangent or a torch.func transform's derivative. Use ordinary reverse-mode autograd instead (requires_grad "
        "on the inputs, then backward(), torch.autograd.grad or torch.autograd.functional.jacobian)."
    )


def refuse_tangents(what: str, *tensors: Any) -> None:
    """``NotImplementedError`` naming ``what`` when one of ``tensors`` carries a tangent that ordinary autograd does
    not see (:func:`carries_tangent`), for a computation that is reverse mode only: in words, in place of a silently
    dropped tangent or torch's generic message. Tuples and lists are looked into (one level: torch does not see
    the tensors in them, so their tangents would be dropped without a word); other arguments are skipped."""
    for t in tensors:
        if isinstance(t, (tuple, list)):
            refuse_tangents(what, *(u for u in t if torch.is_tensor(u)))
        elif torch.is_tensor(t) and carries_tangent(t):
            raise NotImplementedError(_reverse_mode_message(what))


def reverse_mode_only(what: str):
    """Mark a ``torch.autograd.Function`` subclass as reverse mode only: its ``apply`` raises a
    ``NotImplementedError`` naming ``what`` when a tensor argument carries a forward-mode tangent or a
    :mod:`torch.func` transform's derivative (:func:`refuse_tangents`), where torch would stop with "You must
    implement the jvp function" or "it must override the setup_context staticmethod". Nothing changes otherwise."""

    def decorator(cls):
        base_apply = cls.apply

        @functools.wraps(base_apply)
        def apply(*args: Any, **kwargs: Any):
            refuse_tangents(what, *args, *kwargs.values())
            return base_apply(*args, **kwargs)

        cls.apply = staticmethod(apply)
        return cls

    return decorator


def unbatched_backward(what: str):
    """Mark the ``backward`` of a ``torch.autograd.Function`` as having no batched form: where its incoming gradients
    are batched (torch's legacy ``vmap``, under ``torch.autograd.functional.jacobian(..., vectorize=True)``,
    ``torch.autograd.grad(..., is_grads_batched=True)`` and gradcheck's batched-gradient check), it raises a
    ``NotImplementedError`` naming ``what`` and the fix, where torch raised an internal error from inside the pass (a
    missing batching rule, or ``autograd.grad`` called under ``vmap``). Two flag reads per gradient otherwise."""
    message = (
        f"batched gradients are not implemented for {what}: its backward pass has no batched form, so "
        "torch.autograd.functional.jacobian(..., vectorize=True), torch.autograd.grad(..., is_grads_batched=True) "
        "and gradcheck's batched-gradient check cannot run through it. Use vectorize=False (one backward pass per "
        "output row), or check_batched_grad=False."
    )

    def decorator(backward):
        @functools.wraps(backward)
        def wrapped(ctx, *grads: Any):
            if any(g is not None and functorch_wrapped(g) for g in grads):
                raise NotImplementedError(message)
            return backward(ctx, *grads)

        return wrapped

    return decorator


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
