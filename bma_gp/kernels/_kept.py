"""Values a kernel keeps between calls, keyed by a copy of the inputs they were computed from."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch
from torch import Tensor

_V = TypeVar("_V")


def version_key(t: Tensor) -> tuple[int, int | None]:
    """``(id, version)`` of a tensor, for a key that an in-place change invalidates. An inference tensor (made under
    ``torch.inference_mode()``, e.g. a cache GPyTorch filled there) tracks no version, and reading ``_version``
    raised "Inference tensors do not track version counter": its version is None (outside inference mode it cannot
    be changed in place at all)."""
    return id(t), (None if t.is_inference() else t._version)


class KeptByInput(Generic[_V]):
    """The last ``size`` values of a function of a tensor ``x`` (and of a hashable ``key`` for whatever else it
    depends on), each with a copy of its ``x``: a call whose ``x`` equals a kept one by value (one pass) and whose
    ``key`` is equal returns the kept value. The copy makes it safe against ``x`` changed in place afterwards.
    Not part of a module's state: kept in its ``__dict__`` and dropped when the module is pickled or saved whole
    (``torch.save(model)``, which would otherwise write an ``n x m`` training root into every file) or deep-copied; the
    copy computes its values afresh on first use.

    A value computed under ``torch.inference_mode()`` holds inference tensors, which autograd refuses to save
    ("Inference tensors cannot be saved for backward"): it is served only to calls under inference mode, and the first
    call outside inference mode drops it, so that a model evaluated under inference mode (a baseline metric, a
    validation sanity check) still trains and predicts with gradients afterwards. A value computed outside inference
    mode serves both."""

    def __init__(self, size: int):
        self.size = size
        # (copy of x, key, value, whether it was computed under inference mode)
        self._entries: list[tuple[Tensor, Hashable, _V, bool]] = []

    def __getstate__(self) -> dict:
        return {"size": self.size, "_entries": []}

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, x: Tensor, compute: Callable[[], _V], key: Hashable = None) -> _V:
        inference = torch.is_inference_mode_enabled()
        if not inference and any(entry[3] for entry in self._entries):
            self._entries = [entry for entry in self._entries if not entry[3]]
        for i, (kept, kept_key, value, _) in enumerate(self._entries):
            if kept_key == key and kept.shape == x.shape and kept.dtype == x.dtype and kept.device == x.device:
                if torch.equal(kept, x):
                    if i:
                        self._entries.insert(0, self._entries.pop(i))
                    return value
        value = compute()
        self._entries = [(x.detach().clone(), key, value, inference), *self._entries[: self.size - 1]]
        return value
