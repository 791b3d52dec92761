"""A base for operators known only through their products (roots applied without being formed)."""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

__all__ = ["ByProducts"]


class ByProducts(LinearOperator):
    """A :class:`~linear_operator.operators.LinearOperator` defined by ``_matmul`` and ``_transpose_nonbatch``:
    a product with a tensor calls ``_matmul`` directly (plain torch operations, so autograd reaches every tensor),
    a transposed product goes through the transpose, and entries and :meth:`to_dense` are products with the
    identity (no other representation exists). Subclasses set ``self.parent``, the operator they are a root (or
    factor) of, whose dtype and device they take: their own tensors may be held in a working precision."""

    parent: LinearOperator

    @property
    def dtype(self) -> torch.dtype:
        return self.parent.dtype

    @property
    def device(self) -> torch.device:
        return self.parent.device

    def matmul(self, other):
        if torch.is_tensor(other):
            return self._matmul(other)
        return super().matmul(other)

    def _fixed(self, what: str) -> ValueError:
        return ValueError(
            f"{what} of a {type(self).__name__}: it is a root (or factor) of a {type(self.parent).__name__} applied "
            "through that operator's products, and keeps its batch shape, dtype and device (linear_operator's "
            "default rebuilt it with the old shape: a repeated root held one copy). Change the operator first and "
            "take its root then (op.unsqueeze(0).root_decomposition(), op.to(torch.float32).root_decomposition()), "
            "or form this one: DenseLinearOperator(root.to_dense())."
        )

    def _unsqueeze_batch(self, dim: int):
        raise self._fixed("unsqueeze / repeat / a new batch dimension")

    def to(self, *args, **kwargs):
        """This operator when the dtype and device stay; ``ValueError`` otherwise (see :meth:`_fixed`)."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device).to(*args, **kwargs)
        if probe.dtype == self.dtype and probe.device == self.device:
            return self
        raise self._fixed(f".to({probe.dtype}, {probe.device})")

    def type(self, dtype: torch.dtype):
        if dtype == self.dtype:
            return self
        raise self._fixed(f".type({dtype})")

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._transpose_nonbatch()._matmul(rhs)

    def _getitem(self, row_index, col_index, *batch_indices):
        return self.to_dense()[(*batch_indices, row_index, col_index)]

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        """Entries at tensor indices, from products with the columns of the identity they name (linear_operator's
        default goes through :meth:`_getitem`, which returns a tensor here, and failed)."""
        shape = torch.broadcast_shapes(*(index.shape for index in batch_indices), row_index.shape, col_index.shape)
        cols, which = torch.unique(col_index.expand(shape).reshape(-1), return_inverse=True)
        unit = torch.zeros(self.shape[-1], cols.numel(), dtype=self.dtype, device=self.device)
        unit[cols, torch.arange(cols.numel(), device=self.device)] = 1
        block = self._matmul(unit.expand(*self.batch_shape, *unit.shape))  # (*batch, rows, len(cols))
        return block[(*batch_indices, row_index, which.view(shape))]

    def to_dense(self) -> Tensor:
        cols = self.shape[-1]
        eye = torch.eye(cols, dtype=self.dtype, device=self.device)
        return self._matmul(eye.expand(*self.batch_shape, cols, cols))
