"""Pickling of the package's operators without linear_operator's result cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class PicklesWithoutCache:
    """Mixin: ``pickle``, ``torch.save`` and ``copy.deepcopy`` leave out linear_operator's memoized results.

    That cache holds what the operator computed (a ``RootLinearOperator`` from ``root_inv_decomposition``, which
    GPyTorch's prediction asks for; the dense matrix after ``to_dense``): saved with the operator, it made the file
    ``n x n`` large and kept ``torch.load(weights_only=True)`` from reading it with the classes
    :class:`~bma_gp.Partition` names for its allow-list. Results are recomputed on demand, as for a new operator."""

    #: the operator's own stores of computed results, saved empty (attribute name -> a factory of the empty store)
    _pickled_empty: dict[str, Callable[[], Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_memoize_cache", None)
        for name, empty in self._pickled_empty.items():
            if name in state:
                state[name] = empty()
        return state
