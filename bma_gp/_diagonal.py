"""Whether a ``k x k`` block matrix is diagonal, by value or by construction.

A diagonal ``B`` makes the closed forms elementwise (a grouping's per-level variances: no ``k x k``
factorisation). With gradients only a matrix that is diagonal *by construction* qualifies: a leaf that
happens to be diagonal still needs the gradient of its off-diagonal entries.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["diagonal_by_construction", "is_diagonal", "structurally_diagonal"]


def is_diagonal(B: Tensor) -> bool:
    """Whether every off-diagonal entry of ``B`` is exactly zero (one host read; False for a meta tensor, which has
    no values: shape-only evaluation then takes the general, dense-core paths)."""
    if B.shape[-1] == 1:
        return True
    if B.is_meta:
        return False
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


def structurally_diagonal(fn, depth: int = 0, constants: bool = False) -> bool:
    """Whether the autograd node ``fn`` makes a matrix whose off-diagonal entries are zero by construction
    (``diag_embed``, or a product with a constant diagonal mask), so that no gradient can reach them.

    A sum or difference with a constant operand (one that does not require grad, so the graph does not show
    its value: ``diag_embed(b) + W``) is not diagonal by construction. With ``constants=True`` such operands
    are allowed where they are only added (through sums, differences and views, not products): the caller
    must then check that the matrix is diagonal by value (:func:`diagonal_by_construction`), which makes the
    constant part's off-diagonal entries zero."""
    if fn is None or depth > 32:
        return False
    name = type(fn).__name__
    inputs = [f for f, _ in fn.next_functions if f is not None]
    if name == "DiagEmbedBackward0":
        return True
    if name in _VIEWS:
        return bool(inputs) and structurally_diagonal(inputs[0], depth + 1, constants)
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
        # a factor with grad would scale a constant's off-diagonal entries: strict below a product
        return any(structurally_diagonal(f, depth + 1) for f in inputs)
    if name in ("AddBackward0", "SubBackward0"):
        if not inputs or (len(inputs) < len(fn.next_functions) and not constants):
            return False  # a constant operand: its off-diagonal entries are not visible in the graph
        return all(structurally_diagonal(f, depth + 1, constants) for f in inputs)
    return False


def diagonal_by_construction(B: Tensor, read_back: bool = True) -> bool:
    """Whether ``B`` (which requires grad) is diagonal and its off-diagonal entries get no gradient: diagonal by
    construction (:func:`structurally_diagonal`), or a sum of such terms and constants whose value is diagonal
    (``diag_embed(b) + c * I``). The value is read back only when ``read_back`` (then one host read)."""
    if structurally_diagonal(B.grad_fn):
        return True
    return read_back and structurally_diagonal(B.grad_fn, constants=True) and is_diagonal(B)
