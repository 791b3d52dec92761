"""A dispatch mode that records the largest tensor any torch operation returns (memory tests that must not see a
``k x k`` or ``t x n`` matrix)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation returns, and the operation that returned it."""

    def __init__(self, square: int | None = None, storage: bool = False):
        """``square``: also record, in :attr:`squares`, every operation that returns a ``square x square`` matrix
        (its last two dimensions). ``storage``: measure each result by the entries of the memory it holds (its
        storage), so that an expanded view of a few values (a constant kernel's ``n x n``) counts as those values."""
        super().__init__()
        self.storage = storage
        self.largest = 0
        self.where = ""
        self.square = square
        self.squares: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if not torch.is_tensor(value):
                continue
            if not self.storage:
                size = value.numel()
            elif value.layout != torch.strided:  # a sparse result holds its nonzeros
                size = value._nnz()
            else:
                size = value.untyped_storage().nbytes() // value.element_size()
            if size > self.largest:
                self.largest, self.where = size, str(func)
            if self.square is not None and tuple(value.shape[-2:]) == (self.square, self.square):
                self.squares.append(str(func))
        return out
