"""The product of two block mean operators over different partitions of the same points, in closed form."""

from __future__ import annotations

import torch
from linear_operator.operators import DenseLinearOperator, DiagLinearOperator, LinearOperator
from linear_operator.operators.matmul_linear_operator import MatmulLinearOperator
from linear_operator.utils.broadcasting import _matmul_broadcast_shape
from linear_operator.utils.errors import CachingError
from linear_operator.utils.memoize import add_to_cache, clear_cache_hook, get_from_cache
from torch import Tensor

from bma_gp._broadcast import batch_constants, times_diagonal
from bma_gp._indexing import TorchIndexing
from bma_gp._low_rank_sum import LowRankInClosedForm
from bma_gp._pickling import PicklesWithoutCache
from bma_gp.block_mean_linear_operator import (
    BlockMeanLinearOperator,
    _is_number,
    batch_repeat,
    check_left,
    check_rhs,
    dense_svd,
    solution_batch,
)

__all__ = ["BlockMeanProductLinearOperator"]


def _is_noop(index) -> bool:
    return isinstance(index, slice) and index == slice(None, None, None)


class BlockMeanProductLinearOperator(TorchIndexing, PicklesWithoutCache, LowRankInClosedForm, MatmulLinearOperator):
    r"""The matrix product :math:`M N` of two :class:`~bma_gp.BlockMeanLinearOperator` over different partitions of the
    same :math:`n` points (what ``M @ N`` gives; over one partition the product is again a block mean operator).

    It is not a block mean matrix, and in general not symmetric, but every operation that does not need symmetry has a
    closed form through the two factors, with no :math:`n \times n` matrix, no CG and no dense factorisation:

    * ``matmul``: :math:`M (N x)`; ``solve``: :math:`N^{-1} (M^{-1} b)` (each factor's closed-form inverse, an
      ``O(n + k^3)`` block mean operator); :meth:`inverse` is the product :math:`N^{-1} M^{-1}`;
    * ``logdet``: :math:`\log\det M + \log\det N` with ``torch.logdet``'s semantics for the product: NaN when
      :math:`\det(MN) < 0`, ``-inf`` when it is zero (each factor's sign and log-modulus come from its core,
      :meth:`~bma_gp.BlockMeanLinearOperator.slogdet_parts`); ``inv_quad_logdet`` combines it with
      :math:`b^\top (MN)^{-1} b`;
    * ``diagonal`` and entries: :math:`(MN)_{ij} = \lambda_{c_i} \lambda'_{c'_i} \delta_{ij} + \lambda_{c_i}
      B'_{c'_i c'_j} + B_{c_i c_j} \lambda'_{c'_j} + (B\, K B')_{c_i c'_j}` with :math:`K` the ``k x k'`` table of
      counts of points in each pair of blocks: ``O(n + k k' (k + k'))`` (``O(n)`` when both factors are held in
      diagonal mode);
    * ``mT``: :math:`N^\top M^\top`, again such a product; a multiple :math:`c M N` is :math:`(c M) N`.

    A non-symmetric matrix has no root: ``root_decomposition``, ``root_inv_decomposition``, ``cholesky``,
    ``sqrt_inv_matmul`` and eigendecompositions raise a ``ValueError`` that says so. ``svd`` decomposes the dense
    matrix and warns (:class:`~bma_gp.ClosedFormFallbackWarning`); so do solves of sums with this operator (its sum
    over a batch dimension too) and of rows and columns of it other than its batch entries.

    Gradients with respect to ``lam`` and ``B`` of both factors flow through every closed form.

    Args:
        left: :math:`M`, a block mean operator. # shape: (*batch, n, n)
        right: :math:`N`, a block mean operator over a partition of the same ``n`` points. # shape: (*batch, n, n)
    """

    left_linear_op: BlockMeanLinearOperator
    right_linear_op: BlockMeanLinearOperator

    def __init__(self, left: BlockMeanLinearOperator, right: BlockMeanLinearOperator):
        if not isinstance(left, BlockMeanLinearOperator) or not isinstance(right, BlockMeanLinearOperator):
            raise TypeError(
                "BlockMeanProductLinearOperator multiplies two BlockMeanLinearOperators, got "
                f"{type(left).__name__} and {type(right).__name__}."
            )
        if left.shape[-1] != right.shape[-1]:
            raise ValueError(
                f"BlockMeanProductLinearOperator: the factors must be over the same points, got shapes "
                f"{tuple(left.shape)} and {tuple(right.shape)}."
            )
        if left.dtype != right.dtype:
            raise TypeError(f"the factors must share a dtype, got {left.dtype} and {right.dtype}.")
        try:
            torch.broadcast_shapes(left.batch_shape, right.batch_shape)
        except RuntimeError:
            raise ValueError(
                f"BlockMeanProductLinearOperator: the batch shapes of the factors, {tuple(left.batch_shape)} and "
                f"{tuple(right.batch_shape)}, do not broadcast."
            ) from None
        super().__init__(left, right)
        self._pairs: tuple[Tensor, Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ the two partitions
    def _pair_counts(self) -> tuple[Tensor, Tensor, Tensor]:
        """The occupied pairs of blocks as codes ``a k' + b`` (sorted), each point's pair and each pair's number of
        points: the sparse form of the ``k x k'`` contingency table :math:`K`. # shape: (p,), (n,), (p,)"""
        if self._pairs is None:
            first, second = self.left_linear_op.partition, self.right_linear_op.partition
            codes = first.labels * second.num_blocks + second.labels.to(first.labels.device)
            pairs, labels, counts = torch.unique(codes, return_inverse=True, return_counts=True)
            self._pairs = (pairs, labels, counts)
        return self._pairs

    def _cross(self) -> Tensor:
        r""":math:`B K B'` (``k x k'``): the contribution of the block parts of both factors to every entry.
        # shape: (*batch, k, k')"""
        M, N = self.left_linear_op, self.right_linear_op
        k1, k2 = M.partition.num_blocks, N.partition.num_blocks
        pairs, _, counts = self._pair_counts()
        first, second = pairs // k2, pairs % k2
        weight = counts.to(self.dtype)
        batch = self.batch_shape
        if N.is_diagonal_mode:  # K diag(b'): the counts scaled by b' of their column
            values = weight * N._b_vector().index_select(-1, second)
            X = torch.zeros(*batch, k1 * k2, dtype=self.dtype, device=self.device).index_add(-1, pairs, values)
            X = X.reshape(*batch, k1, k2)
        else:  # K B': row a sums the rows of B' of the pairs (a, b), weighted by their counts
            rows = N._b_sym().index_select(-2, second) * weight.unsqueeze(-1)
            X = torch.zeros(*batch, k1, k2, dtype=self.dtype, device=self.device).index_add(-2, first, rows)
        if M.is_diagonal_mode:
            return M._b_vector().unsqueeze(-1) * X
        return M._b_sym() @ X

    def _cross_at(self, rows: Tensor, cols: Tensor, *batch_indices: Tensor) -> Tensor:
        """Entries of :meth:`_cross` at block pairs ``(rows, cols)``; in diagonal mode of both factors from the
        counts alone, without the ``k x k'`` table."""
        M, N = self.left_linear_op, self.right_linear_op
        if M.is_diagonal_mode and N.is_diagonal_mode:  # b_a K_ab b'_b
            pairs, _, counts = self._pair_counts()
            codes = rows * N.partition.num_blocks + cols
            pos = torch.searchsorted(pairs, codes).clamp(max=pairs.numel() - 1)
            count = torch.where(pairs[pos] == codes, counts[pos], torch.zeros_like(pos)).to(self.dtype)
            return M._b_vector()[(*batch_indices, rows)] * count * N._b_vector()[(*batch_indices, cols)]
        return self._cross()[(*batch_indices, rows, cols)]

    @staticmethod
    def _b_at(op: BlockMeanLinearOperator, rows: Tensor, cols: Tensor, *batch_indices: Tensor) -> Tensor:
        """``B[rows, cols]`` of a factor (as its closed forms use it: symmetrised unless ``symmetric=False``)."""
        if op.is_diagonal_mode:
            b = op._b_vector()[(*batch_indices, rows)]
            return torch.where(rows == cols, b, torch.zeros_like(b))
        return op._b_sym()[(*batch_indices, rows, cols)]

    # ------------------------------------------------------------------ entries
    def _diagonal(self) -> Tensor:
        M, N = self.left_linear_op, self.right_linear_op
        _, point_pair, counts = self._pair_counts()
        lam1, lam2 = M.partition.expand(M.lam, dim=-1), N.partition.expand(N.lam, dim=-1)
        b1, b2 = M.partition.expand(M._b_vector(), dim=-1), N.partition.expand(N._b_vector(), dim=-1)
        if M.is_diagonal_mode and N.is_diagonal_mode:  # b_a K_ab b'_b at each point's own pair: O(n)
            cross = b1 * counts.index_select(0, point_pair).to(self.dtype) * b2
        else:
            cross = self._cross()[..., M.partition.labels, N.partition.labels]
        return lam1 * lam2 + lam1 * b2 + b1 * lam2 + cross

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        M, N = self.left_linear_op, self.right_linear_op
        r1, c1 = M.partition.labels[row_index], M.partition.labels[col_index]
        r2, c2 = N.partition.labels[row_index], N.partition.labels[col_index]
        lam1, lam2 = M.lam[(*batch_indices, r1)], N.lam[(*batch_indices, c2)]
        same = row_index == col_index
        res = lam1 * self._b_at(N, r2, c2, *batch_indices) + self._b_at(M, r1, c1, *batch_indices) * lam2
        res = res + self._cross_at(r1, c2, *batch_indices)
        return res + torch.where(same, lam1 * lam2, torch.zeros_like(res))

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        if _is_noop(row_index) and _is_noop(col_index):  # batch entries: the product of the factors' entries
            return BlockMeanProductLinearOperator(
                self.left_linear_op._getitem(row_index, col_index, *batch_indices),
                self.right_linear_op._getitem(row_index, col_index, *batch_indices),
            )
        from bma_gp._composition import indexed_fallback

        return indexed_fallback(self, row_index, col_index, *batch_indices)

    def _set_requires_grad(self, val: bool) -> None:
        """``requires_grad`` of both factors' tensors (each drops its stored results), and this product's dropped."""
        super()._set_requires_grad(val)
        clear_cache_hook(self)  # linear_operator's cache (results of @cached, add_to_cache)

    def to_dense(self) -> Tensor:
        """The dense ``n x n`` product, cached only when no ``lam`` or ``B`` of the factors requires gradients (as
        :class:`~bma_gp.BlockMeanLinearOperator` caches): MatmulLinearOperator's cache kept a result computed under
        ``no_grad`` and returned it, without a graph, to later calls that need gradients. One computed under
        ``torch.inference_mode()`` is kept apart and returned only under it (autograd refuses its inference tensor)."""
        names = ("to_dense", "to_dense (inference)") if torch.is_inference_mode_enabled() else ("to_dense",)
        for name in names:
            try:
                return get_from_cache(self, name)
            except CachingError:
                pass
        M, N = self.left_linear_op, self.right_linear_op
        res = M.to_dense() @ N.to_dense()
        if not any(op.lam.requires_grad or op._b_requires_grad() for op in (M, N)):
            add_to_cache(self, names[-1], res)
        return res

    # ------------------------------------------------------------------ products
    def matmul(self, other):
        M, N = self.left_linear_op, self.right_linear_op
        if torch.is_tensor(other):
            _matmul_broadcast_shape(self.shape, other.shape)
            if other.dim() == 1:  # a column: a batched factor turns N v into a batch of vectors, which M @ would
                # read as a matrix
                return M.matmul(N.matmul(other.unsqueeze(-1))).squeeze(-1)
            return M.matmul(N.matmul(other))  # each factor's own product (and gradients)
        if isinstance(other, BlockMeanLinearOperator) and N._same_partition(other):
            return BlockMeanProductLinearOperator(M, N.matmul(other))  # M (N O), N O again a block mean operator
        return super().matmul(other)

    def _transpose_nonbatch(self) -> BlockMeanProductLinearOperator:
        return BlockMeanProductLinearOperator(
            self.right_linear_op._transpose_nonbatch(), self.left_linear_op._transpose_nonbatch()
        )

    def repeat(self, *sizes) -> LinearOperator:
        """Batch copies (``sizes`` ending in ``1, 1``): the product of the repeated factors, closed form again
        (linear_operator's ``BatchRepeatLinearOperator`` asks for a Cholesky factor, which a product has not)."""
        rep = batch_repeat(self, sizes)
        if rep is None:
            return super().repeat(*sizes)
        batch = self.batch_shape
        M, N = (op if op.batch_shape == batch else op._expand_batch(batch) for op in self._args)
        return BlockMeanProductLinearOperator(M.repeat(*rep, 1, 1), N.repeat(*rep, 1, 1))

    def _sum_batch(self, dim: int) -> LinearOperator:
        """The sum over batch dimension ``dim``: a sum of products over two partitions has no closed form, so it is a
        :class:`~bma_gp.FallbackSumLinearOperator` of the batch entries, whose solves and log-determinants factorise
        the dense matrix with LU and warn (linear_operator's ``SumBatchLinearOperator`` solved the non-symmetric sum
        silently with Cholesky or CG, which assume symmetry, and got it wrong)."""
        from bma_gp._composition import FallbackSumLinearOperator

        batch = self.batch_shape
        M, N = (op if op.batch_shape == batch else op._expand_batch(batch) for op in self._args)
        prefix = (slice(None),) * dim
        terms = [BlockMeanProductLinearOperator(M[(*prefix, i)], N[(*prefix, i)]) for i in range(batch[dim])]
        return terms[0] if len(terms) == 1 else FallbackSumLinearOperator(*terms)

    def _mul_constant(self, other) -> BlockMeanProductLinearOperator:
        return BlockMeanProductLinearOperator(self.left_linear_op._mul_constant(other), self.right_linear_op)

    def _mul_matrix(self, other) -> LinearOperator:
        r"""Elementwise product: with a diagonal operator :math:`\mathrm{diag}(\mathrm{diag}(MN)\, d)` (closed form),
        with a batch of ``1 x 1`` matrices (one constant per batch entry) the multiple :math:`(c M) N` (closed form),
        with a dense matrix the dense product (as linear_operator gives it); with any other operator a ``ValueError``:
        linear_operator's generic elementwise product takes a root of each factor, which this matrix does not have."""
        if isinstance(other, DiagLinearOperator):
            return times_diagonal(self, other)
        constants = batch_constants(other)
        if constants is not None:  # one constant per batch entry, over other batch dimensions than this product's
            return self._mul_constant(constants)
        if isinstance(other, DenseLinearOperator):
            from bma_gp._composition import _dense_elementwise

            return _dense_elementwise(self, other)  # warns, and solves as the non-symmetric matrix it is
        raise ValueError(self._no_elementwise_product(f"with a {type(other).__name__}", "A.to_dense() * B.to_dense()"))

    def _prod_batch(self, dim: int) -> LinearOperator:
        """The elementwise product of the batch entries along batch dimension ``dim`` (``prod(dim)``): a
        ``ValueError`` worded as :meth:`_mul_matrix`'s, which it is entry by entry. linear_operator's ``_prod_batch``
        multiplies roots of the entries, so the error named ``root_decomposition``, a method the caller never used.
        A dimension of size one is the one entry, as in linear_operator."""
        if self.batch_shape[dim] == 1:
            return self.squeeze(dim)
        raise ValueError(
            self._no_elementwise_product(
                f"over batch dimension {dim} (prod({dim}), the elementwise product of its {self.batch_shape[dim]} "
                "batch entries)",
                f"P.to_dense().prod({dim})",
            )
        )

    def _no_elementwise_product(self, what: str, dense: str) -> str:
        """Why an elementwise product ``what`` of this operator has no closed form, with the dense ``dense`` to use
        instead (shared by ``*`` and ``prod``)."""
        return (
            f"elementwise product of a {type(self).__name__} (M @ N over two partitions, n = {self.shape[-1]}) "
            f"{what}: it has no closed form, and linear_operator's generic elementwise product needs a root of each "
            "factor, which a product of block mean matrices over two partitions (not symmetric) does not have. "
            f"Multiply the dense matrices, {dense}, where n is small."
        )

    # ------------------------------------------------------------------ inverse, solves, log-determinant
    def inverse(self) -> BlockMeanProductLinearOperator:
        r""":math:`(M N)^{-1} = N^{-1} M^{-1}`, again such a product (each inverse a block mean operator)."""
        return BlockMeanProductLinearOperator(self.right_linear_op.inverse(), self.left_linear_op.inverse())

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int = 0) -> Tensor:
        return self.right_linear_op.inverse()._matmul(self.left_linear_op.inverse()._matmul(rhs))

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        r"""Closed-form :math:`(MN)^{-1} R = N^{-1} (M^{-1} R)` (or :math:`L (MN)^{-1} R`): no CG, no dense
        factorisation. With :class:`bma_gp.settings.validate` on a singular factor raises a ``ValueError`` naming
        the cause (as :meth:`~bma_gp.BlockMeanLinearOperator.solve`)."""
        check_rhs(self.shape, right_tensor, "right_tensor")
        if left_tensor is not None:
            check_left(self.shape, left_tensor, solution_batch(self.shape, right_tensor), self.dtype)
        vector = right_tensor.dim() == 1  # solved as a column: a batch of vectors is no right-hand side
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        res = self.right_linear_op.solve(self.left_linear_op.solve(rhs))
        if left_tensor is not None:
            res = left_tensor @ res
        return res.squeeze(-1) if vector else res

    def _slogdet(self) -> tuple[Tensor, Tensor]:
        sign1, log1 = self.left_linear_op.slogdet_parts()
        sign2, log2 = self.right_linear_op.slogdet_parts()
        return sign1 * sign2, log1 + log2

    def logdet(self) -> Tensor:
        r""":math:`\log\det(MN) = \log\det M + \log\det N`, with ``torch.logdet``'s semantics for the product: NaN
        when :math:`\det(MN) < 0` (also when both factors have negative determinants the result is finite),
        ``-inf`` when it is zero."""
        sign, logabs = self._slogdet()
        logabs = torch.where(sign < 0, torch.full_like(logabs, float("nan")), logabs)
        return logabs.to(self.dtype)

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        check_rhs(self.shape, inv_quad_rhs, "inv_quad_rhs")
        rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
        res = (rhs * self.solve(rhs)).sum(-2)  # b^T (MN)^{-1} b per column
        return res.sum(-1) if reduce_inv_quad else res

    def inv_quad_logdet(
        self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True
    ) -> tuple[Tensor, Tensor]:
        r"""Closed-form :math:`R^\top (MN)^{-1} R` and :math:`\log\det(MN)` (see :meth:`solve`, :meth:`logdet`)."""
        if inv_quad_rhs is None and not logdet:
            raise RuntimeError("Either `inv_quad_rhs` or `logdet` must be specifed.")
        inv_quad_term = (
            self.inv_quad(inv_quad_rhs, reduce_inv_quad)
            if inv_quad_rhs is not None
            else torch.empty(0, dtype=self.dtype, device=self.device)
        )
        logdet_term = self.logdet() if logdet else torch.zeros([], dtype=self.dtype, device=self.device)
        return inv_quad_term, logdet_term

    # ------------------------------------------------------------------ what a non-symmetric matrix lacks
    def _no_root(self, what: str):
        raise ValueError(
            f"{what} of a BlockMeanProductLinearOperator (M @ N over two partitions, n = {self.shape[-1]}): the "
            "product of two block mean matrices over different partitions is not symmetric, so it has no root, "
            "Cholesky factor or real spectrum. solve, logdet, inv_quad_logdet, diagonal and matmul are closed "
            "form; for a covariance, use a symmetric operator (M @ N @ M.mT is not one of these products either)."
        )

    def root_decomposition(self, method: str | None = None):
        self._no_root("root_decomposition")

    def root_inv_decomposition(self, initial_vectors=None, test_vectors=None, method=None):
        self._no_root("root_inv_decomposition")

    def _root_decomposition(self):  # what linear_operator's wrappers (BlockDiagLinearOperator, ...) call
        self._no_root("root_decomposition")

    def _root_inv_decomposition(self, initial_vectors=None, test_vectors=None):
        self._no_root("root_inv_decomposition")

    def _cholesky(self, upper: bool | None = False):
        self._no_root("cholesky")

    def sqrt_inv_matmul(self, rhs: Tensor, lhs: Tensor | None = None):
        self._no_root("sqrt_inv_matmul")

    def _symeig(self, eigenvectors: bool = False, return_evals_as_lazy: bool | None = False):
        self._no_root("a symmetric eigendecomposition")

    def diagonalization(self, method: str | None = None):
        self._no_root("diagonalization")

    def _svd(self):
        return dense_svd(self, "(M @ N)", "singular values of a product over two partitions have no closed form")

    # ------------------------------------------------------------------ sums
    def __add__(self, other):
        from bma_gp._composition import fallback_sum

        res = fallback_sum(self, other)  # no closed form: a sum that warns when it is solved
        return res if res is not None else super().__add__(other)

    def __radd__(self, other):
        return self.__add__(other)

    def __sub__(self, other):
        # linear_operator's __sub__ is ``self + other.mul(-1)``, which a Python number has not (AttributeError)
        return self + (-other) if _is_number(other) else super().__sub__(other)

    def __neg__(self):
        return self.mul(-1)

    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        """``MN + diag(d)``: no closed form, a :class:`~bma_gp.FallbackSumLinearOperator` (its solves warn)."""
        from bma_gp._composition import _as_fallback

        return _as_fallback(super().add_diagonal(diag))

    def __repr__(self) -> str:
        M, N = self.left_linear_op, self.right_linear_op
        return (
            f"BlockMeanProductLinearOperator(shape={tuple(self.shape)}, num_blocks=({M.partition.num_blocks}, "
            f"{N.partition.num_blocks}), dtype={self.dtype}, device={self.device})"
        )
