"""Whether a ``k x k`` block matrix is diagonal, by value or by construction.

A diagonal ``B`` makes the closed forms elementwise (a grouping's per-level variances: no ``k x k``
factorisation). With gradients only a matrix that is diagonal *by construction* qualifies: a leaf that
happens to be diagonal still needs the gradient of its off-diagonal entries.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["is_diagonal", "structurally_diagonal"]


def is_diagonal(B: Tensor) -> bool:
    """Whether every off-diagonal entry of ``B`` is exactly zero (one host read)."""
    if B.shape[-1] == 1:
        return True
    B = B.detach()  # counts, no k x k temporary: the nonzeros are all on the diagonal
    return bool(B.count_nonzero() == torch.diagonal(B, dim1=-2, dim2=-1).count_nonzero())


_VIEWS = {
    "ExpandBackward0",
    "ViewBackward0",
    "UnsqueezeBackward0",
    "CloneBackward0",
    "ToCopyBackward0",
    "AliasBackward0",
    "ReshapeAliasBackward0",
    "UnsafeViewBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
}


def structurally_diagonal(fn, depth: int = 0) -> bool:
    """Whether the autograd node ``fn`` makes a matrix whose off-diagonal entries are zero by construction
    (``diag_embed``, or a product with a constant diagonal mask), so that no gradient can reach them."""
    if fn is None or depth > 32:
        return False
    name = type(fn).__name__
    inputs = [f for f, _ in fn.next_functions if f is not None]
    if name == "DiagEmbedBackward0":
        return True
    if name in _VIEWS:
        return bool(inputs) and structurally_diagonal(inputs[0], depth + 1)
    if name == "MulBackward0":
        for attr in ("_saved_self", "_saved_other"):
            try:
                saved = getattr(fn, attr)
            except (AttributeError, RuntimeError):
                continue
            if (
                torch.is_tensor(saved)
                and not saved.requires_grad
                and saved.dim() >= 2
                and saved.shape[-1] == saved.shape[-2]
                and saved.shape[-1] > 1
                and is_diagonal(saved)
            ):
                return True
        return any(structurally_diagonal(f, depth + 1) for f in inputs)
    if name in ("AddBackward0", "SubBackward0"):
        return bool(inputs) and all(structurally_diagonal(f, depth + 1) for f in inputs)
    return False
