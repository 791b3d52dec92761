"""A clear error for ``active_dims`` that name columns the inputs lack (GPyTorch's selection raised torch's
"INDICES element is out of DATA bounds", naming neither the argument nor the fix)."""

from __future__ import annotations

import torch
from gpytorch.kernels import Kernel

__all__ = ["active_dims_error", "call_checking_active_dims"]


def call_checking_active_dims(kernel: Kernel, call, x1, args: tuple, kwargs: dict):
    """``call(x1, *args, **kwargs)`` (GPyTorch's ``Kernel.__call__``), its error for ``active_dims`` beyond the inputs'
    columns replaced by :func:`active_dims_error`'s. Nothing is checked before the call: the check reads
    ``active_dims`` back (a host synchronisation on an accelerator) only once the call has failed."""
    try:
        return call(x1, *args, **kwargs)
    except (RuntimeError, IndexError) as error:
        refusal = active_dims_error(kernel, x1, args[0] if args else kwargs.get("x2"))
        if refusal is None:
            raise
        raise refusal from error


def active_dims_error(kernel: Kernel, x1, x2) -> ValueError | None:
    """The ``ValueError`` for a kernel whose ``active_dims`` name columns that ``x1`` or ``x2`` lacks (GPyTorch's own
    selection raised torch's "INDICES element is out of DATA bounds", naming neither), or None where they fit."""
    dims = kernel.active_dims
    if dims is None:
        return None
    wanted = [int(d) for d in dims.tolist()]
    for name, x in (("x1", x1), ("x2", x2)):
        if not torch.is_tensor(x) or x.dim() == 0:
            continue
        columns = x.shape[-1]
        missing = [d for d in wanted if not -columns <= d < columns]
        if missing:
            return ValueError(
                f"{type(kernel).__name__}(active_dims={wanted}): {name} has {columns} column"
                f"{'s' if columns != 1 else ''} (0 to {columns - 1}), so active_dims {missing} select columns it does "
                "not have. Give active_dims the positions of this kernel's columns in the model's input (counted "
                "from 0), or add the missing column to the inputs."
            )
    return None
