"""A dispatch mode that records the largest tensor any torch operation returns (memory tests that must not see a
``k x k`` or ``t x n`` matrix)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation returns, and the operation that returned it."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.where = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(value) and value.numel() > self.largest:
                self.largest, self.where = value.numel(), str(func)
        return out
