"""The cross-covariance between new points and block-exchangeable training points.

Under a block mean covariance over training points (:doc:`docs/math.md, section 2 </math>`), the
covariance between a new point and training point :math:`m` depends on :math:`m`
only through its block. The :math:`t \\times n` cross-covariance is therefore
:math:`A P^\\top` with :math:`A` of shape :math:`t \\times k`: it costs
:math:`O(tk)` memory, never :math:`O(tn)`.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from linear_operator.utils.getitem import _is_noop_index
from torch import Tensor

from bma_gp.partition import Partition

__all__ = ["BlockCrossLinearOperator"]


class BlockCrossLinearOperator(LinearOperator):
    r"""The matrix :math:`A P^\top` (or its transpose :math:`P A^\top`).

    .. math::

        (A P^\top)_{i m} = A_{i, c_m},

    where :math:`c_m` is the block of column :math:`m` and :math:`P` the
    :math:`n \times k` indicator matrix of ``partition``. Products cost
    :math:`O(n + tk)` per right-hand side: a block sum and a :math:`t \times k` product.

    This is what :class:`~bma_gp.BlockMeanKernel` and :class:`~bma_gp.GroupKernel`
    return for the covariance between new inputs (rows) and training inputs (columns),
    and what :class:`~bma_gp.kernels.BlockMeanPredictionStrategy` reads ``A`` from.

    Args:
        values: :math:`A`, one value per (row, column block). # shape: (*batch, t, k)
        partition: the partition of the :math:`n` columns into :math:`k` blocks.
        transposed: represent :math:`P A^\top` (shape ``(*batch, n, t)``) instead.
    """

    def __init__(self, values: Tensor, partition: Partition, transposed: bool = False):
        if not torch.is_tensor(values) or values.dim() < 2:
            raise ValueError(
                "values must be a tensor of shape (*batch, t, k); got "
                f"{type(values).__name__}{'' if not torch.is_tensor(values) else tuple(values.shape)}."
            )
        if not isinstance(partition, Partition):
            raise TypeError(f"partition must be a bma_gp.Partition, got {type(partition).__name__}.")
        if values.shape[-1] != partition.num_blocks:
            raise ValueError(
                f"values has {values.shape[-1]} columns but the partition has {partition.num_blocks} blocks; "
                "there must be one column per block."
            )
        super().__init__(values, partition=partition, transposed=bool(transposed))
        self.values = values
        self.partition = partition
        self.transposed = bool(transposed)

    # ------------------------------------------------------------------ required hooks
    def _size(self) -> torch.Size:
        t = self.values.shape[-2]
        n = len(self.partition)
        shape = (n, t) if self.transposed else (t, n)
        return torch.Size((*self.values.shape[:-2], *shape))

    def _matmul(self, rhs: Tensor) -> Tensor:
        is_vec = rhs.dim() == 1
        if is_vec:
            rhs = rhs.unsqueeze(-1)
        if self.transposed:
            # P (A^T rhs): a (k x c) product, then one value per block broadcast to its members
            res = self.partition.expand(self.values.mT @ rhs, dim=-2)
        else:
            # A (P^T rhs): block sums of the right-hand side, then a (t x k) product
            res = self.values @ self.partition.block_sum(rhs, dim=-2)
        return res.squeeze(-1) if is_vec else res

    def _transpose_nonbatch(self) -> LinearOperator:
        return self.__class__(self.values, self.partition, transposed=not self.transposed)

    # ------------------------------------------------------------------ structure-preserving overrides
    def _expand_batch(self, batch_shape) -> LinearOperator:
        values = self.values.expand(*batch_shape, *self.values.shape[-2:])
        return self.__class__(values, self.partition, transposed=self.transposed)

    def _mul_constant(self, other: Tensor) -> LinearOperator:
        return self.__class__(self.values * other.unsqueeze(-1).unsqueeze(-1), self.partition, self.transposed)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        # Indexing the new points keeps the structure; indexing training points generally breaks blocks.
        new_index, train_index = (col_index, row_index) if self.transposed else (row_index, col_index)
        if _is_noop_index(train_index):
            values = self.values[(*batch_indices, new_index, slice(None))]
            return self.__class__(values, self.partition, transposed=self.transposed)
        return super()._getitem(row_index, col_index, *batch_indices)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        new_index, train_index = (col_index, row_index) if self.transposed else (row_index, col_index)
        labels = self.partition.to(self.values.device).labels
        return self.values[(*batch_indices, new_index, labels[train_index])]

    def to_dense(self) -> Tensor:
        dense = self.partition.to(self.values.device).expand(self.values, dim=-1)
        return dense.mT.contiguous() if self.transposed else dense

    def block_values(self) -> Tensor:
        """:math:`A` for the untransposed orientation (new points x training blocks)."""
        return self.values
