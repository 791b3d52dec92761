"""The leading rows of a block mean operator and the leading block of a posterior covariance, without the ``r x n``
matrix."""

from __future__ import annotations

import torch
from linear_operator.operators import DiagLinearOperator, LinearOperator, RootLinearOperator
from torch import Tensor

from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator

__all__ = ["LeadingBlockLinearOperator", "LeadingRowsLinearOperator"]


class LeadingRowsLinearOperator(LinearOperator):
    r"""The first :math:`r` rows of a symmetric block mean operator :math:`M` (:math:`n \times n`),
    :math:`[I_r, 0]\, M`, or (``transposed``) its first :math:`r` columns :math:`M [I_r, 0]^\top`.

    This is what :class:`~bma_gp.BlockMeanKernel` returns for its training points against the training points
    followed by :math:`m` new points (a fantasy model's training inputs), with :math:`M` the block mean operator of
    all of them (the training blocks, then one singleton block per new point): the prediction of such a model at the
    parent's training inputs reads :math:`M` from it
    (:class:`~bma_gp.kernels.BlockMeanPredictionStrategy`). Products and entries go through :math:`M`, in
    :math:`O(n + k^2)` per right-hand side; nothing :math:`r \times n` is formed but by :meth:`to_dense`.

    Args:
        base: :math:`M`. # shape: (*batch, n, n)
        rows: :math:`r`, the leading indices kept (the training points).
        transposed: represent the first ``rows`` columns instead (shape ``(*batch, n, r)``).
    """

    def __init__(self, base: BlockMeanLinearOperator, rows: int, transposed: bool = False):
        super().__init__(base, rows=rows, transposed=transposed)
        self.base, self.rows, self.transposed = base, int(rows), bool(transposed)

    def _size(self) -> torch.Size:
        n = self.base.shape[-1]
        shape = (n, self.rows) if self.transposed else (self.rows, n)
        return torch.Size((*self.base.batch_shape, *shape))

    def _pad(self, rhs: Tensor) -> Tensor:
        """``[rhs; 0]``: ``rhs`` on the leading indices, zero on the rest."""
        rest = self.base.shape[-1] - self.rows
        return torch.cat([rhs, rhs.new_zeros(*rhs.shape[:-2], rest, rhs.shape[-1])], dim=-2)

    def _matmul(self, rhs: Tensor) -> Tensor:
        if self.transposed:  # M [I; 0] x = M [x; 0]
            return self.base._matmul(self._pad(rhs))
        return self.base._matmul(rhs)[..., : self.rows, :]

    def _t_matmul(self, rhs: Tensor) -> Tensor:  # M symmetric: the transpose is the other view of M
        return self._transpose_nonbatch()._matmul(rhs)

    def _transpose_nonbatch(self) -> LinearOperator:
        return LeadingRowsLinearOperator(self.base, self.rows, not self.transposed)

    def _expand_batch(self, batch_shape) -> LinearOperator:
        return LeadingRowsLinearOperator(self.base._expand_batch(batch_shape), self.rows, self.transposed)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        return self.base._get_indices(row_index, col_index, *batch_indices)  # both index M itself

    def _mul_constant(self, other: Tensor) -> LinearOperator:  # a ScaleKernel's output scale
        return LeadingRowsLinearOperator(self.base._mul_constant(other), self.rows, self.transposed)

    def to_dense(self) -> Tensor:
        n = self.base.shape[-1]
        leading = torch.eye(n, self.rows, dtype=self.dtype, device=self.device)  # [I_r; 0]
        columns = self.base._matmul(leading.expand(*self.batch_shape, n, self.rows))  # M [I_r; 0], n x r
        return columns if self.transposed else columns.mT


class LeadingBlockLinearOperator(LinearOperator):
    r"""The leading :math:`r \times r` principal block :math:`[I_r, 0]\, S\, [I_r, 0]^\top` of a symmetric
    :math:`n \times n` operator :math:`S` (a posterior covariance at all the training points of a fantasy model,
    cut to the parent's): products pad with zeros, the diagonal, entries, draws and roots are :math:`S`'s cut to the
    first :math:`r` points, and an added diagonal goes into :math:`S` (padded with ones, which the block does not
    see), so nothing :math:`r \times n` is formed but by :meth:`to_dense`.

    Args:
        base: :math:`S`. # shape: (*batch, n, n)
        rows: :math:`r`.
    """

    def __init__(self, base: LinearOperator, rows: int):
        super().__init__(base, rows=rows)
        self.base, self.rows = base, int(rows)

    def _size(self) -> torch.Size:
        return torch.Size((*self.base.batch_shape, self.rows, self.rows))

    def _pad(self, rhs: Tensor, value: float = 0.0) -> Tensor:
        rest = self.base.shape[-1] - self.rows
        return torch.cat([rhs, rhs.new_full((*rhs.shape[:-2], rest, rhs.shape[-1]), value)], dim=-2)

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.base._matmul(self._pad(rhs))[..., : self.rows, :]

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._matmul(rhs)

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _expand_batch(self, batch_shape) -> LinearOperator:
        return LeadingBlockLinearOperator(self.base._expand_batch(batch_shape), self.rows)

    def _diagonal(self) -> Tensor:
        return self.base._diagonal()[..., : self.rows]

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        return self.base._get_indices(row_index, col_index, *batch_indices)

    def to_dense(self) -> Tensor:
        n = self.base.shape[-1]
        leading = torch.eye(n, self.rows, dtype=self.dtype, device=self.device)  # [I_r; 0]
        return self.base._matmul(leading.expand(*self.batch_shape, n, self.rows))[..., : self.rows, :]

    def add_diagonal(self, diag) -> LinearOperator:
        diag = diag if torch.is_tensor(diag) else torch.tensor(diag, dtype=self.dtype, device=self.device)
        diag = diag.to(self.dtype).expand(*self.shape[:-1])
        padded = self._pad(diag.unsqueeze(-1), 1.0).squeeze(-1)
        return LeadingBlockLinearOperator(self.base.add_diagonal(padded), self.rows)

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator):  # the likelihood's noise
            return self.add_diagonal(other.diagonal(dim1=-2, dim2=-1))
        return super().__add__(other)

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        root = self.base.root_decomposition(method=method).root
        return RootLinearOperator(root[..., : self.rows, :])

    def zero_mean_mvn_samples(self, num_samples: int) -> Tensor:
        return self.base.zero_mean_mvn_samples(num_samples)[..., : self.rows]
