"""torch's indexing semantics for the block mean operators' ``__getitem__``.

linear_operator's ``__getitem__`` reads an int ``i`` as ``slice(i, i + 1)`` (so ``M[-1]`` is empty), takes a boolean
mask for an index tensor of the mask's length (its debug check then raises), leaves numpy arrays alone and does not
check bounds. :func:`torch_index` rewrites an index the way torch reads it before linear_operator sees it: masks
become the positions they select (``mask.nonzero()``, as torch does), lists and numpy arrays tensors, negative ints
and index entries positive, and out-of-range ones an ``IndexError``. ``None`` (a new axis) is applied afterwards as a
new batch dimension (:func:`getitem`); one that would fall between the two matrix dimensions is refused in words.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch


def _as_index(item, device):
    """Lists, numpy arrays and numpy scalars as torch reads them; 0-d tensors as Python ints."""
    if isinstance(item, list) and not item:  # torch reads [] as no positions
        item = torch.zeros(0, dtype=torch.long, device=device)
    elif isinstance(item, (list, np.ndarray)):
        item = torch.as_tensor(np.asarray(item) if isinstance(item, list) else item, device=device)
    elif isinstance(item, np.generic):
        item = item.item()
    if isinstance(item, bool) or (torch.is_tensor(item) and item.dtype == torch.bool and item.dim() == 0):
        raise IndexError(
            "a single boolean index (True, False) adds a dimension of size 1 or 0 in torch; block mean operators do "
            "not support it: index with a mask over the rows or columns, or with positions"
        )
    if isinstance(item, numbers.Integral):
        return int(item)
    if torch.is_tensor(item):
        if item.dtype == torch.uint8:
            item = item.bool()
        if item.dtype != torch.bool and (item.is_floating_point() or item.is_complex()):
            raise IndexError("tensors used as indices must be long, int, byte or bool tensors")
        if item.dim() == 0 and item.dtype != torch.bool:
            return int(item.item())
    return item


def _wrap(item, size: int, dim: int):
    """A negative int or tensor entry counted from the end; out of range: an ``IndexError`` (torch's words)."""
    if isinstance(item, int):
        if not -size <= item < size:
            raise IndexError(f"index {item} is out of bounds for dimension {dim} with size {size}")
        return item + size if item < 0 else item
    if torch.is_tensor(item):
        item = item.long()
        if item.numel():
            low, high = int(item.min()), int(item.max())
            if low < -size or high >= size:
                bad = low if low < -size else high
                raise IndexError(f"index {bad} is out of bounds for dimension {dim} with size {size}")
            if low < 0:
                item = torch.where(item < 0, item + size, item)
    return item


def torch_index(shape: torch.Size, index, device: torch.device | None = None) -> tuple[tuple, list[int]]:
    """``index`` rewritten for linear_operator's ``__getitem__`` of an operator of ``shape`` (see the module's
    docstring; lists and numpy arrays become tensors on ``device``), and the dimensions of the result at which torch
    inserts a new axis for each ``None``."""
    items = list(index) if isinstance(index, tuple) else [index]
    items = [item if item is None or item is Ellipsis else _as_index(item, device) for item in items]
    if sum(item is Ellipsis for item in items) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")

    def consumed(item) -> int:
        if item is None or item is Ellipsis:
            return 0
        return item.dim() if torch.is_tensor(item) and item.dtype == torch.bool else 1

    used = sum(consumed(item) for item in items)
    if used > len(shape):
        raise IndexError(f"too many indices for an operator of shape {tuple(shape)}: {used} dimensions indexed")
    if Ellipsis in items:
        at = next(i for i, item in enumerate(items) if item is Ellipsis)
        items[at : at + 1] = [slice(None)] * (len(shape) - used)

    res: list = []
    new_axes: list[int] = []
    out_dim, dim, seen_tensor = 0, 0, False
    for item in items:
        if item is None:
            new_axes.append(out_dim)
            out_dim += 1
            continue
        if torch.is_tensor(item) and item.dtype == torch.bool:  # a mask: the positions it selects (torch's reading)
            mask_shape = tuple(shape[dim : dim + item.dim()])
            if tuple(item.shape) != mask_shape:
                raise IndexError(
                    f"the shape of the mask {list(item.shape)} at index {dim} does not match the shape of the indexed "
                    f"operator {list(mask_shape)} at index {dim}"
                )
            res.extend(item.nonzero(as_tuple=True))
            dim += item.dim()
            out_dim += 0 if seen_tensor else 1
            seen_tensor = True
            continue
        if isinstance(item, slice):
            res.append(item)
            out_dim += 1
        elif isinstance(item, int):
            res.append(_wrap(item, shape[dim], dim))
        elif torch.is_tensor(item):
            res.append(_wrap(item, shape[dim], dim))
            out_dim += 0 if seen_tensor else 1
            seen_tensor = True
        else:
            raise IndexError(f"unsupported index {item!r} for a block mean operator")
        dim += 1
    return tuple(res), new_axes


def getitem(op, index, base_getitem):
    """``op[index]`` with torch's semantics; ``base_getitem`` is linear_operator's ``__getitem__`` of ``op``."""
    rewritten, new_axes = torch_index(op.shape, index, op.device)
    tensors = [item for item in rewritten if torch.is_tensor(item)]
    matrix = rewritten[len(op.batch_shape) :]
    if len(tensors) == 1 and tensors[0].dim() > 1 and any(item is tensors[0] for item in matrix):
        raise IndexError(
            "an index tensor with more than one dimension on the rows or the columns alone would move matrix "
            f"entries into batch dimensions, which {type(op).__name__} does not support: index with a flat tensor "
            "and reshape, or index rows and columns together (op[rows, cols])"
        )
    if new_axes and tensors:
        raise IndexError(
            f"None (a new axis) together with index tensors is not supported by {type(op).__name__}: index first, "
            "then add the axis with unsqueeze"
        )
    res = base_getitem(rewritten)
    for at in new_axes:  # None: a new axis of size 1 at torch's position
        if torch.is_tensor(res):
            res = res.unsqueeze(at)
        elif at <= len(res.batch_shape):
            res = res.unsqueeze(at)
        else:
            raise IndexError(
                f"None (a new axis) at dimension {at} of a {type(op).__name__} result would fall between its two "
                "matrix dimensions, which a linear operator cannot hold: put the new axes in front (op[None]), or "
                "index to a tensor first"
            )
    return res


def check_floating(value, name: str) -> None:
    """``TypeError`` for an integer, boolean or complex tensor ``value`` given as an operand of a product or solve:
    torch's matrix products and solves refuse them, and the operators' paths promoted some silently and raised torch's
    dtype error from others (a user trial). Anything else (``None``, an operator, a floating tensor) passes."""
    if torch.is_tensor(value) and not value.dtype.is_floating_point:
        raise TypeError(
            f"{name} has dtype {value.dtype}, not a real floating-point dtype: cast it to the operator's dtype first "
            f"({name}.to(op.dtype)), as torch's matrix products and solves ask."
        )


class TorchIndexing:
    """Mixin (before ``LinearOperator`` in the bases): ``__getitem__`` and ``to`` with torch's semantics
    (:func:`getitem`), and tensor operands of products and solves that torch would take (:func:`check_floating`;
    a class that defines these methods itself checks there)."""

    def matmul(self, other):
        check_floating(other, "other")
        return super().matmul(other)

    def solve(self, right_tensor, left_tensor=None):
        check_floating(right_tensor, "right_tensor")
        check_floating(left_tensor, "left_tensor")
        return super().solve(right_tensor, left_tensor)

    def inv_quad_logdet(self, inv_quad_rhs=None, logdet=False, reduce_inv_quad=True):
        check_floating(inv_quad_rhs, "inv_quad_rhs")
        return super().inv_quad_logdet(inv_quad_rhs, logdet=logdet, reduce_inv_quad=reduce_inv_quad)

    def sqrt_inv_matmul(self, rhs, lhs=None):
        check_floating(rhs, "rhs")
        check_floating(lhs, "lhs")
        return super().sqrt_inv_matmul(rhs, lhs)

    def __getitem__(self, index):
        return getitem(self, index, super().__getitem__)

    def to(self, *args, **kwargs):
        """Move to a device and/or cast to a dtype, as :meth:`torch.Tensor.to` takes them: a device named by a string
        or an index too (``M.to("cuda")``, ``M.to("meta", torch.float64)``), which linear_operator's ``to`` ignored
        (a user trial: the operator stayed where it was, without a word)."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        target = {"device": device} if device is not None else {}
        if dtype is not None:
            target["dtype"] = dtype
        return super().to(**target)
