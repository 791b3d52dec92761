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

from bma_gp._broadcast import batch_constants
from bma_gp._indexing import TorchIndexing, check_floating
from bma_gp.partition import Partition, intersection

__all__ = ["BlockCrossLinearOperator"]


class BlockCrossLinearOperator(TorchIndexing, LinearOperator):
    r"""The matrix :math:`A P^\top` (or its transpose :math:`P A^\top`).

    .. math::

        (A P^\top)_{i m} = A_{i, c_m},

    where :math:`c_m` is the block of column :math:`m` and :math:`P` the
    :math:`n \times k` indicator matrix of ``partition``. Products cost
    :math:`O(n + tk)` per right-hand side: a block sum and a :math:`t \times k` product.

    This is what :class:`~bma_gp.BlockMeanKernel` and :class:`~bma_gp.GroupKernel`
    return for the covariance between new inputs (rows) and training inputs (columns),
    and what :class:`~bma_gp.kernels.BlockMeanPredictionStrategy` reads ``A`` from.

    With ``columns`` (:meth:`one_hot`), :math:`A` has at most one nonzero per row, :math:`A_{i, c_i} = a_i`
    (a random intercept: a new point's covariance with the training points of its own group), held as the
    ``t`` values and their columns: products cost :math:`O(n + t)` and nothing ``t x k`` is formed unless
    :attr:`values` (the dense :math:`A`) is asked for.

    Args:
        values: :math:`A`, one value per (row, column block) (# shape: (*batch, t, k)); with ``columns``, the one
            value per row (# shape: (*batch, t)).
        partition: the partition of the :math:`n` columns into :math:`k` blocks.
        transposed: represent :math:`P A^\top` (shape ``(*batch, n, t)``) instead.
        columns: the block of each row's nonzero, ``-1`` for a row without one. # shape: (t,)
    """

    def __init__(self, values: Tensor, partition: Partition, transposed: bool = False, columns: Tensor | None = None):
        if columns is not None:
            self._init_one_hot(values, partition, bool(transposed), columns)
            return
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
        self._values: Tensor | None = values
        self.row_values: Tensor | None = None
        self.columns: Tensor | None = None
        self.partition = partition
        self.transposed = bool(transposed)

    def _init_one_hot(self, values: Tensor, partition: Partition, transposed: bool, columns: Tensor) -> None:
        if not isinstance(partition, Partition):
            raise TypeError(f"partition must be a bma_gp.Partition, got {type(partition).__name__}.")
        if not torch.is_tensor(values) or values.dim() < 1:
            raise ValueError("with columns, values must be a tensor of shape (*batch, t): one value per row.")
        if not torch.is_tensor(columns) or columns.dim() != 1 or columns.shape[0] != values.shape[-1]:
            raise ValueError(f"columns must be a 1-D tensor with one block per row ({values.shape[-1]} rows).")
        if columns.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"columns must be an integer tensor, got {columns.dtype}.")
        super().__init__(values, partition=partition, transposed=transposed, columns=columns)
        self._values = None
        self.row_values, self.columns = values, columns
        self.partition = partition
        self.transposed = transposed

    @classmethod
    def one_hot(
        cls, values: Tensor, columns: Tensor, partition: Partition, transposed: bool = False
    ) -> BlockCrossLinearOperator:
        """:math:`A P^\top` with :math:`A_{i, c_i} = a_i` (``values``) and no other nonzero (``columns[i] = -1``:
        a zero row)."""
        return cls(values, partition, transposed=transposed, columns=columns)

    @property
    def is_one_hot(self) -> bool:
        """Whether :math:`A` is held as one value and column per row."""
        return self.columns is not None

    @property
    def values(self) -> Tensor:
        """:math:`A` as a dense tensor (formed from the values and columns of a one-hot operator on first use).
        # shape: (*batch, t, k)"""
        if self._values is None:
            assert self.row_values is not None and self.columns is not None
            k = self.partition.num_blocks
            hit = self.columns >= 0
            onehot = (self.columns.clamp_min(0).unsqueeze(-1) == torch.arange(k, device=self.columns.device)) & (
                hit.unsqueeze(-1)
            )
            self._values = self.row_values.unsqueeze(-1) * onehot.to(self.row_values.dtype)
        return self._values

    def _gather_blocks(self, sums: Tensor) -> Tensor:
        """Row ``i`` of the result is ``a_i sums[c_i]`` (0 without a block). ``sums`` # shape: (*batch, k, c)"""
        assert self.row_values is not None and self.columns is not None
        hit = self.columns >= 0
        picked = sums.index_select(-2, self.columns.clamp_min(0))
        weight = torch.where(hit, self.row_values, torch.zeros_like(self.row_values))
        return weight.unsqueeze(-1) * picked

    def _scatter_rows(self, rhs: Tensor) -> Tensor:
        """:math:`A^\top` ``rhs`` for a one-hot :math:`A`. ``rhs`` # shape: (*batch, t, c) -> (*batch, k, c)"""
        assert self.row_values is not None and self.columns is not None
        hit = self.columns >= 0
        weight = torch.where(hit, self.row_values, torch.zeros_like(self.row_values))
        scaled = weight.unsqueeze(-1) * rhs
        out = scaled.new_zeros(*scaled.shape[:-2], self.partition.num_blocks, scaled.shape[-1])
        return out.index_add(-2, self.columns.clamp_min(0), scaled)

    # ------------------------------------------------------------------ required hooks
    def _size(self) -> torch.Size:
        n = len(self.partition)
        if self.row_values is not None:
            batch, t = self.row_values.shape[:-1], self.row_values.shape[-1]
        else:
            assert self._values is not None
            batch, t = self._values.shape[:-2], self._values.shape[-2]
        shape = (n, t) if self.transposed else (t, n)
        return torch.Size((*batch, *shape))

    def _matmul(self, rhs: Tensor) -> Tensor:
        check_floating(rhs, "rhs")
        is_vec = rhs.dim() == 1
        if is_vec:
            rhs = rhs.unsqueeze(-1)
        if self.is_one_hot:  # gathers and an index_add: O(n + t) per column
            if self.transposed:
                res = self.partition.expand(self._scatter_rows(rhs), dim=-2)
            else:
                res = self._gather_blocks(self.partition.block_sum(rhs, dim=-2))
        elif self.transposed:
            # P (A^T rhs): a (k x c) product, then one value per block broadcast to its members
            res = self.partition.expand(self.values.mT @ rhs, dim=-2)
        else:
            # A (P^T rhs): block sums of the right-hand side, then a (t x k) product
            res = self.values @ self.partition.block_sum(rhs, dim=-2)
        return res.squeeze(-1) if is_vec else res

    def _with(self, values: Tensor, columns: Tensor | None, transposed: bool) -> BlockCrossLinearOperator:
        return self.__class__(values, self.partition, transposed=transposed, columns=columns)

    # ------------------------------------------------------------------ conversions
    def _converted(self, dtype: torch.dtype | None, device: torch.device | None) -> BlockCrossLinearOperator:
        """The same operator with its values cast to ``dtype`` and everything moved to ``device`` (``None``: keep).
        The block of each row (``columns``) and the partition's labels stay integer: linear_operator's generic
        ``to`` casts every tensor argument, which would make ``columns`` floating point."""
        values = self.row_values if self.is_one_hot else self._values
        assert values is not None
        if dtype is not None and not dtype.is_floating_point:  # (it truncated the values without a word)
            raise TypeError(
                f"a BlockCrossLinearOperator's values stay real floating point; cannot cast them to {dtype}."
            )
        values = values.to(device=device, dtype=dtype)
        columns = None if self.columns is None else self.columns.to(device=device)
        partition = self.partition if device is None else self.partition.to(device=device)
        return self.__class__(values, partition, transposed=self.transposed, columns=columns)

    def to(self, *args, **kwargs) -> BlockCrossLinearOperator:
        """Move to a device and/or cast the values to a dtype, as :meth:`torch.Tensor.to` takes them (a dtype, a
        device, a string or index naming one, a tensor, or ``device=``/``dtype=``); index tensors stay integer."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        return self._converted(dtype, device)

    def type(self, dtype: torch.dtype) -> BlockCrossLinearOperator:  # also .double(), .float(), .half()
        """Cast floating-point values to ``dtype``; index tensors stay integer."""
        values = self.row_values if self.is_one_hot else self._values
        assert values is not None
        return self._converted(dtype if values.is_floating_point() else None, None)

    def _transpose_nonbatch(self) -> LinearOperator:
        if self.is_one_hot:
            assert self.row_values is not None
            return self._with(self.row_values, self.columns, not self.transposed)
        return self.__class__(self.values, self.partition, transposed=not self.transposed)

    # ------------------------------------------------------------------ structure-preserving overrides
    def _expand_batch(self, batch_shape) -> LinearOperator:
        if self.is_one_hot:
            assert self.row_values is not None
            return self._with(
                self.row_values.expand(*batch_shape, self.row_values.shape[-1]), self.columns, self.transposed
            )
        values = self.values.expand(*batch_shape, *self.values.shape[-2:])
        return self.__class__(values, self.partition, transposed=self.transposed)

    def _mul_constant(self, other: Tensor) -> LinearOperator:
        if self.is_one_hot:
            assert self.row_values is not None
            return self._with(self.row_values * other.unsqueeze(-1), self.columns, self.transposed)
        return self.__class__(self.values * other.unsqueeze(-1).unsqueeze(-1), self.partition, self.transposed)

    def _mul_matrix(self, other) -> LinearOperator:
        constants = batch_constants(other)
        if constants is not None:  # one constant per batch entry (a batch ScaleKernel around an unbatched kernel)
            return self._mul_constant(constants)
        return super()._mul_matrix(other)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        # Indexing the new points keeps the structure; indexing training points generally breaks blocks.
        new_index, train_index = (col_index, row_index) if self.transposed else (row_index, col_index)
        if _is_noop_index(train_index) and self.is_one_hot and all(_is_noop_index(b) for b in batch_indices):
            assert self.row_values is not None and self.columns is not None
            return self._with(self.row_values[..., new_index], self.columns[new_index], self.transposed)
        if _is_noop_index(train_index):
            values = self.values[(*batch_indices, new_index, slice(None))]
            return self.__class__(values, self.partition, transposed=self.transposed)
        return super()._getitem(row_index, col_index, *batch_indices)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        new_index, train_index = (col_index, row_index) if self.transposed else (row_index, col_index)
        labels = self.partition.to(self.device).labels
        if self.is_one_hot:
            assert self.row_values is not None and self.columns is not None
            rows = self.row_values.expand(*self.batch_shape, self.row_values.shape[-1])
            value = rows[(*batch_indices, new_index)]
            return torch.where(self.columns[new_index] == labels[train_index], value, torch.zeros_like(value))
        return self.values[(*batch_indices, new_index, labels[train_index])]

    def to_dense(self) -> Tensor:
        dense = self.partition.to(self.values.device).expand(self.values, dim=-1)
        return dense.mT.contiguous() if self.transposed else dense

    def hadamard(self, other: LinearOperator) -> BlockCrossLinearOperator | None:
        r"""The elementwise product with another cross covariance between the same new and training points: again
        one, over the intersection of the two partitions of the training points (one block per occupied pair of
        blocks :math:`(i, i')`, numbered as :meth:`bma_gp.BlockMeanLinearOperator.__mul__` numbers the blocks of
        the training covariance's product), with :math:`A_{t,(i,i')} = A_{t,i} A'_{t,i'}`: ``t x k`` values, or one
        value and column per row when both factors are one-hot. Over the same partition the values multiply. ``None``
        when ``other`` is not a :class:`BlockCrossLinearOperator` of the same shape and orientation."""
        if (
            not isinstance(other, BlockCrossLinearOperator)
            or other.transposed != self.transposed
            or other.shape[-2:] != self.shape[-2:]
        ):
            return None
        both_one_hot = self.is_one_hot and other.is_one_hot
        if self.partition.same_as(other.partition):
            if both_one_hot:
                assert self.row_values is not None and other.row_values is not None
                assert self.columns is not None and other.columns is not None
                same = self.columns == other.columns
                columns = torch.where(same, self.columns, torch.full_like(self.columns, -1))
                return self.one_hot(self.row_values * other.row_values, columns, self.partition, self.transposed)
            return self.__class__(self.values * other.values, self.partition, transposed=self.transposed)
        k2 = other.partition.num_blocks
        partition, pairs = intersection(self.partition, other.partition)
        if both_one_hot:
            assert self.row_values is not None and other.row_values is not None
            assert self.columns is not None and other.columns is not None
            c1, c2 = self.columns, other.columns.to(self.columns.device)
            key = c1 * k2 + c2
            pairs = pairs.to(key.device)
            at = torch.searchsorted(pairs, key).clamp_max(pairs.numel() - 1)
            hit = (c1 >= 0) & (c2 >= 0) & (pairs[at] == key)  # an unseen pair of levels: a zero row
            columns = torch.where(hit, at, torch.full_like(at, -1))
            return self.one_hot(self.row_values * other.row_values, columns, partition, self.transposed)
        first, second = (x.to(self.values.device) for x in (pairs // k2, pairs % k2))
        values = self.values.index_select(-1, first) * other.values.index_select(-1, second)
        return self.__class__(values, partition, transposed=self.transposed)

    def block_values(self) -> Tensor:
        """:math:`A` for the untransposed orientation (new points x training blocks)."""
        return self.values
