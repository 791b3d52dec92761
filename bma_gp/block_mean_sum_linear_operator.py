"""Sums of block mean matrices over several partitions, a per-point diagonal and a low-rank root.

The family closed under the sums users write (a noise vector, a second grouping, an inducing-point
kernel): :math:`M = D + \\sum_j P_j B_j P_j^\\top + U U^\\top`, solved through one capacitance
matrix whose size is the number of blocks plus the rank, never ``n``.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import linear_operator
import numpy as np
import torch
from linear_operator.operators import LinearOperator
from linear_operator.operators.linear_operator_representation_tree import LinearOperatorRepresentationTree
from linear_operator.operators.root_linear_operator import RootLinearOperator
from linear_operator.utils.broadcasting import _matmul_broadcast_shape
from linear_operator.utils.memoize import clear_cache_hook
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from bma_gp import settings
from bma_gp._autograd import (
    carries_tangent,
    diagonal_tangent,
    first_order_only,
    functorch_wrapped,
    has_forward_tangent,
    reverse_mode_only,
    tracks_derivatives,
    unbatched_backward,
)
from bma_gp._broadcast import batch_constants, times_diagonal
from bma_gp._by_products import ByProducts
from bma_gp._closed_roots import ClosedFormRoots, check_root_method
from bma_gp._diagonal import is_diagonal as _is_diagonal
from bma_gp._diagonal import structurally_diagonal as _structurally_diagonal
from bma_gp._errors import NotPositiveDefiniteError
from bma_gp._indexing import TorchIndexing, check_floating
from bma_gp._lazy_root import LazyRoot
from bma_gp._low_rank_sum import LowRankInClosedForm
from bma_gp._pickling import PicklesWithoutCache
from bma_gp._precision import core_dtype
from bma_gp._samples import ClosedFormSamples
from bma_gp._symmetric_function import (
    floored_sqrt,
    nan_safe_eigvalsh,
    rounding_floor,
    symmetric_matrix_function,
    symmetric_matrix_functions,
)
from bma_gp._warnings import warn_dense_cholesky, warn_dense_eigh
from bma_gp.block_mean_linear_operator import (
    _NO_LANCZOS_QUADRATURE,
    BlockMeanLinearOperator,
    WarnsOnCatRows,
    _first_bad,
    _is_number,
    _one_hot_block_mean,
    _where,
    batch_expanded,
    batch_repeat,
    check_left,
    check_real,
    check_rhs,
    check_rhs_dtype,
    solution_batch,
)
from bma_gp.partition import Partition

__all__ = ["BlockMeanSumLinearOperator"]

#: Bytes of one row chunk of the low-rank root processed at a time (in the working precision).
_CHUNK_BYTES = 2**24


# ---------------------------------------------------------------------------- math helpers
def _chunk_rows(m: int, itemsize: int = 8) -> int:
    return max(1024, _CHUNK_BYTES // max(1, m * itemsize))


def _is_full(index) -> bool:
    return isinstance(index, slice) and index == slice(None, None, None)


def _contingency(part_a: Partition, part_b: Partition, values: Tensor) -> Tensor:
    r""":math:`P_a^\top \operatorname{diag}(v) P_b`: one scatter-add over the ``n`` indices.
    ``values`` # shape: (*batch, n) -> # shape: (*batch, k_a, k_b)"""
    ka, kb = part_a.num_blocks, part_b.num_blocks
    index = part_a.labels * kb + part_b.labels
    out = values.new_zeros(*values.shape[:-1], ka * kb)
    return out.index_add(-1, index, values).unflatten(-1, (ka, kb))


#: A grouping's contingency table with the eliminated grouping enters the Schur complement through its nonzero
#: cells (:class:`_Cells`) when at most this fraction of its cells can be nonzero (``n <= density * k_t * k_e``:
#: decided without looking at the labels); denser tables take the GEMM.
SPARSE_CELLS_DENSITY = 0.05
#: Pairs of cells (sharing an eliminated level) one block of the Schur product may join; past it (a few eliminated
#: levels with very many indices each) that block takes the GEMM, so the index vectors and what autograd keeps of
#: them stay bounded, unless the block can be one CSR product (:class:`_CellsProduct`, which joins no pairs then)
#: costing less than the GEMM by :data:`CELL_PAIRS_GEMM_RATIO`.
MAX_CELL_PAIRS = 2**25
#: Past :data:`MAX_CELL_PAIRS`, a block of the Schur product is one CSR product while its joined pairs number at
#: most ``k_a k_b k_e`` (the GEMM's multiply-adds over the dense table) divided by this. Measured at ``n = 10^6``
#: (20,000 x 2,000 crossed levels, 5 x 10^7 pairs, ratio 1,600): one training evaluation 0.85 s and 1.1 GB against
#: 4.9 s and 2.5 GB with the GEMM, so the two cost about the same near 280.
CELL_PAIRS_GEMM_RATIO = 256


@dataclass(frozen=True)
class _Cells:
    r"""The cells :math:`(i, l)` of partition ``a`` against partition ``e`` that hold at least one index, in order of
    :math:`l` (then :math:`i`): the nonzero pattern of :math:`P_a^\top \operatorname{diag}(v) P_e`.

    Attributes:
        row: each cell's block of ``a``. # shape: (c,)
        col: each cell's block of ``e``. # shape: (c,)
        of_index: each of the ``n`` indices' cell. # shape: (n,)
        starts: the cells of block ``l`` of ``e`` are ``starts[l]:starts[l + 1]``. # shape: (k_e + 1,)
    """

    row: Tensor
    col: Tensor
    of_index: Tensor
    starts: Tensor

    @staticmethod
    def build(part_a: Partition, part_e: Partition) -> _Cells:
        ka, ke = part_a.num_blocks, part_e.num_blocks
        cells, of_index = torch.unique(part_e.labels * ka + part_a.labels, return_inverse=True)  # sorted: by l, then i
        col = cells // ka
        counts = torch.bincount(col, minlength=ke)
        starts = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        return _Cells(cells % ka, col, of_index, starts)

    @property
    def count(self) -> int:
        return self.row.shape[0]

    def csr(self, values: Tensor, transpose: bool, rows: int, cols: int) -> Tensor:
        """The table (``transpose``: its transpose, ``k_e x k_a``) as a sparse CSR tensor of ``values`` (one per
        cell). The cells are in order of ``e``'s blocks, so the transpose is CSR as it is; the table itself
        needs them by ``a``'s blocks (that order is computed once)."""
        with warnings.catch_warnings():  # torch's note that CSR support is in beta, once per process, is not ours
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            return self._csr(values, transpose, rows, cols)

    def _csr(self, values: Tensor, transpose: bool, rows: int, cols: int) -> Tensor:
        if transpose:  # rows of N^T: the blocks of e
            return torch.sparse_csr_tensor(self.starts, self.row, values, (rows, cols), check_invariants=False)
        perm, crow = self.by_row(rows)
        return torch.sparse_csr_tensor(crow, self.col[perm], values[perm], (rows, cols), check_invariants=False)

    def by_row(self, rows: int) -> tuple[Tensor, Tensor]:
        """The cells in order of their block of ``a`` (then of ``e``), and where each of the ``rows`` blocks of ``a``
        starts in that order (CSR row pointers); computed once per table."""
        order = getattr(self, "_by_row", None)
        if order is None:
            perm = torch.argsort(self.row, stable=True)  # by i, then l
            counts = torch.bincount(self.row, minlength=rows)
            order = (perm, torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]))
            object.__setattr__(self, "_by_row", order)  # a cache on the frozen dataclass
        return order

    def pairs(self, other: _Cells) -> int:
        """How many pairs :meth:`join` would list."""
        return int(((self.starts[1:] - self.starts[:-1]) * (other.starts[1:] - other.starts[:-1])).sum())

    def values(self, point_values: Tensor) -> Tensor:
        """The table's entries at the cells: ``point_values`` summed per cell. # shape: (*b, n) -> (*b, c)"""
        out = point_values.new_zeros(*point_values.shape[:-1], self.count)
        return out.index_add(-1, self.of_index, point_values)

    def join(self, other: _Cells) -> tuple[Tensor, Tensor]:
        r"""Every pair of a cell of ``self`` and a cell of ``other`` in the same block ``l`` of ``e``: two index
        vectors of length :math:`\sum_l c_l c'_l`."""
        reps = (other.starts[1:] - other.starts[:-1])[self.col]
        total = int(reps.sum())
        mine = torch.repeat_interleave(torch.arange(self.count, device=reps.device), reps, output_size=total)
        first = torch.cumsum(reps, 0) - reps
        theirs = other.starts[self.col[mine]] + (torch.arange(total, device=reps.device) - first[mine])
        return mine, theirs


class _SumRepresentationTree:
    """Rebuilds a :class:`BlockMeanSumLinearOperator` from its :meth:`~BlockMeanSumLinearOperator.representation`:
    linear_operator's tree for the arguments and the tensor keyword arguments, then the row weights (the
    representation's last tensors) in their partitions' places."""

    def __init__(self, op: BlockMeanSumLinearOperator):
        self._tree = LinearOperatorRepresentationTree(op)
        self._size = len(LinearOperator.representation(op))
        self._template = tuple(w is not None for w in op.weights)

    def __call__(self, *flat: Tensor) -> BlockMeanSumLinearOperator:
        rest = iter(flat[self._size :])
        weights = tuple(next(rest) if held else None for held in self._template)
        tree = copy.copy(self._tree)
        tree._nondifferentiable_kwargs = {**self._tree._nondifferentiable_kwargs, "weights": weights}
        return tree(*flat[: self._size])


class _Contingencies(dict):
    r"""The blocks ``A[i, j]`` of :math:`Z^\top D^{-1} Z`; a table of two partitions, :math:`P_i^\top W_i D^{-1} W_j
    P_j` (``k_i x k_j``, dense), is formed on first access, so that one the capacitance only needs as its nonzero
    cells (:class:`_CrossBlocks`) never is."""

    def __init__(self, partitions: Sequence[Partition], dinv: Tensor, weights: Sequence[Tensor | None]):
        super().__init__()
        self.partitions, self.dinv, self.weights = partitions, dinv, weights

    def point_values(self, i: int, j: int) -> Tensor:
        values = self.dinv
        for wt in (self.weights[i], self.weights[j]):
            if wt is not None:
                values = values * wt
        return values

    def __missing__(self, key: tuple[int, int]) -> Tensor:
        i, j = key
        if not (0 <= i < j < len(self.partitions)):
            raise KeyError(key)
        value = _contingency(self.partitions[i], self.partitions[j], self.point_values(i, j))
        self[key] = value
        return value


#: Columns are taken in chunks so that a product from a table's nonzero cells gathers at most this many elements
#: at a time (a cells x columns temporary).
CELL_PRODUCT_ELEMENTS = 2**22


def _cells_matmul(cells: _Cells, values: Tensor, X: Tensor, rows: int, transpose: bool = False) -> Tensor:
    """``N X`` (``N^T X`` with ``transpose``) for the table ``N`` (``rows`` x its other size) given by its nonzero
    ``cells`` and their ``values``: a sparse CSR product when no gradient is asked for and nothing is batched (3-4x
    faster than gathers, and no ``cells x c`` temporary); with a reverse-mode gradient the same CSR product as a
    :class:`_CellsMatmul` (autograd keeps ``values`` and ``X`` only, not two ``cells x c`` gathers); else (batched,
    forward mode) gathers and ``index_add`` in column chunks of bounded size. # shape: (*batch, rows, c)"""
    needs_grad = (torch.is_grad_enabled() and (values.requires_grad or X.requires_grad)) or (
        carries_tangent(values) or carries_tangent(X)  # forward mode: the CSR product would drop the tangents
    )
    if values.dim() == 1 and X.dim() == 2 and not needs_grad:
        return cells.csr(values, transpose, rows, X.shape[0]) @ X
    if (
        values.dim() == 1
        and X.dim() == 2
        and values.dtype == X.dtype
        and X.device.type in _SPARSE_DEVICES
        and not (carries_tangent(values) or carries_tangent(X))
    ):
        # reverse mode: the same CSR product, and autograd keeps only ``values`` and ``X`` (the gathers below keep
        # two ``cells x c`` tensors, cells up to n: n x r memory in the leave-one-out objective's A_Er Q)
        return _CellsMatmul.apply(values, X, cells, transpose, rows)
    src, dst = (cells.row, cells.col) if transpose else (cells.col, cells.row)
    step = max(1, CELL_PRODUCT_ELEMENTS // max(1, src.numel()))
    out = []
    for start in range(0, X.shape[-1], step):
        scaled = values.unsqueeze(-1) * X[..., src, start : start + step]
        out.append(scaled.new_zeros(*scaled.shape[:-2], rows, scaled.shape[-1]).index_add_(-2, dst, scaled))
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


class _CellsMatmul(torch.autograd.Function):
    r""":math:`N X` (``transpose``: :math:`N^\top X`) for the table :math:`N` given by its nonzero ``cells`` and
    their 1-D ``values``, as one sparse CSR product, keeping only ``values`` and ``X`` for the backward pass:
    :math:`\bar X = N^\top \bar Y` (another CSR product) and :math:`\bar v_c = \bar Y_{dst_c} \cdot X_{src_c}`
    (:func:`torch.sparse.sampled_addmm` on the pattern of :math:`N^\top`, stored in the cells' own order). With
    ``create_graph`` the backward pass is built from differentiable operations (:func:`_cells_matmul` again and
    gathers in chunks of ``CELL_PRODUCT_ELEMENTS``), so second derivatives are those of the gathers."""

    @staticmethod
    def forward(ctx, v: Tensor, X: Tensor, cells: _Cells, transpose: bool, rows: int) -> Tensor:
        ctx.save_for_backward(v, X)
        ctx.cells, ctx.transpose, ctx.rows = cells, transpose, rows
        return cells.csr(v, transpose, rows, X.shape[0]) @ X

    @staticmethod
    def backward(ctx, grad: Tensor):
        v, X = ctx.saved_tensors
        cells, transpose, rows = ctx.cells, ctx.transpose, ctx.rows
        grad_v = grad_X = None
        if ctx.needs_input_grad[1]:
            grad_X = _cells_matmul(cells, v, grad, X.shape[0], transpose=not transpose)
        if ctx.needs_input_grad[0]:
            src, dst = (cells.row, cells.col) if transpose else (cells.col, cells.row)
            if torch.is_grad_enabled():  # create_graph: differentiable gathers, a bounded chunk of cells at a time
                step = max(1, CELL_PRODUCT_ELEMENTS // max(1, X.shape[-1]))
                grad_v = torch.cat(
                    [
                        (grad[dst[s : s + step]] * X[src[s : s + step]]).sum(-1)
                        for s in range(0, max(1, src.numel()), step)
                    ]
                )
            else:
                ka = rows if not transpose else X.shape[0]
                ke = X.shape[0] if not transpose else rows
                pattern = cells.csr(torch.zeros_like(v), True, ke, ka)  # N^T, in the cells' order
                A, B = (X, grad.mT) if not transpose else (grad, X.mT)  # (A B)[col_c, row_c]
                grad_v = torch.sparse.sampled_addmm(pattern, A, B.to(A.dtype), beta=0.0).values()
        return grad_v, grad_X, None, None, None


class _CrossBlocks:
    r""":math:`A_{re}`: the blocks :math:`A_{te}` of the non-eliminated terms against the eliminated grouping,
    stacked (``r x k_e``). Each is a dense tensor (``k_t x k_e``) or, for a grouping whose table with the eliminated
    one is sparse, its nonzero cells and their values: then no ``k_t x k_e`` matrix is formed, and products with
    it cost one gather and one ``index_add`` over the cells."""

    def __init__(self, pieces: list, sizes: list[int], ke: int):
        self.pieces = pieces  # per term: a Tensor (*b, k_t, k_e) or (cells, values (*b, c))
        self.sizes = sizes
        self.ke = ke

    def dense(self, i: int) -> Tensor:
        """Piece ``i`` as a ``k_t x k_e`` tensor (formed from the cells if needed)."""
        piece = self.pieces[i]
        if torch.is_tensor(piece):
            return piece
        cells, values = piece
        flat = cells.row * self.ke + cells.col
        out = values.new_zeros(*values.shape[:-1], self.sizes[i] * self.ke)
        return out.index_add(-1, flat, values).unflatten(-1, (self.sizes[i], self.ke))

    def columns(self, levels: Tensor) -> Tensor:
        """The columns ``levels`` of :math:`A_{re}` (levels of the eliminated grouping, distinct), without forming
        the other columns of a piece kept as cells. # shape: (*b, r, len(levels))"""
        L = levels.shape[0]
        parts = []
        for i, piece in enumerate(self.pieces):
            if torch.is_tensor(piece):
                parts.append(piece.index_select(-1, levels))
                continue
            cells, values = piece
            position = torch.full((self.ke,), -1, dtype=torch.long, device=levels.device)
            position[levels] = torch.arange(L, device=levels.device)
            where = position[cells.col]
            keep = where >= 0
            flat = cells.row[keep] * L + where[keep]
            out = values.new_zeros(*values.shape[:-1], self.sizes[i] * L)
            parts.append(out.index_add(-1, flat, values[..., keep]).unflatten(-1, (self.sizes[i], L)))
        batch = torch.broadcast_shapes(*(p.shape[:-2] for p in parts))
        return torch.cat([p.expand(*batch, *p.shape[-2:]) for p in parts], dim=-2)

    def matmul(self, X: Tensor) -> Tensor:
        """:math:`A_{re} X` for ``X`` (*b, k_e, m). # shape: (*b, r, m)"""
        parts = []
        for i, piece in enumerate(self.pieces):
            if torch.is_tensor(piece):
                parts.append(piece @ X)
            else:
                cells, values = piece
                parts.append(_cells_matmul(cells, values, X, self.sizes[i]))
        batch = torch.broadcast_shapes(*(p.shape[:-2] for p in parts))
        return torch.cat([p.expand(*batch, *p.shape[-2:]) for p in parts], dim=-2)

    def t_matmul(self, x: Tensor) -> Tensor:
        r""":math:`A_{re}^\top x` for ``x`` (*b, r, m). # shape: (*b, k_e, m)"""
        out = None
        for piece, xi in zip(self.pieces, x.split(self.sizes, dim=-2)):
            if torch.is_tensor(piece):
                term = piece.mT @ xi
            else:
                cells, values = piece
                term = _cells_matmul(cells, values, xi, self.ke, transpose=True)
            out = term if out is None else out + term
        assert out is not None
        return out


@reverse_mode_only("BlockMeanSumLinearOperator (the root's Gram matrix)")
class _WeightedGram(torch.autograd.Function):
    r""":math:`a \operatorname{diag}(c) a^\top` for ``a`` (``r x k``) and ``c`` (``k``), with one GEMM in the
    backward pass: :math:`T = (\bar Y + \bar Y^\top) a`, :math:`\bar a = T \operatorname{diag}(c)`,
    :math:`\bar c = \tfrac12 \mathbf 1^\top (a \circ T)`. Autograd through ``(a * c) @ a.mT`` sees two
    different factors and spends two GEMMs (the root's ``256 x 256`` block of the Schur complement over
    ``k_e = 5000`` levels: about 9 ms each at ``n = 2 x 10^4``). Second derivatives are refused rather than wrong."""

    @staticmethod
    def forward(ctx, a: Tensor, c: Tensor) -> Tensor:
        ctx.save_for_backward(a, c)
        return (a * c) @ a.mT

    @staticmethod
    @first_order_only("BlockMeanSumLinearOperator (the root's Gram matrix)")
    def backward(ctx, grad: Tensor):
        a, c = ctx.saved_tensors
        T = (grad + grad.mT) @ a
        grad_a = T * c if ctx.needs_input_grad[0] else None
        grad_c = 0.5 * (a * T).sum(-2) if ctx.needs_input_grad[1] else None
        return grad_a, grad_c


def _cells_product(cells_a: _Cells, va: Tensor, cells_b: _Cells, vb: Tensor, c: Tensor, kb: int, ka: int) -> Tensor:
    r""":math:`N_a \operatorname{diag}(c) N_b^\top` from the nonzero cells of two contingency tables against the
    same partition. Unbatched, reverse mode, on CPU or CUDA: one sparse-by-sparse CSR product
    (:class:`_CellsProduct`); otherwise one product per joined pair of cells and one ``index_add``.
    # shape: (*b, k_a, k_b)"""
    if _csr_product_applies(va, vb, c):
        return _CellsProduct.apply(va, c, vb, cells_a, cells_b, ka, kb)
    return _cells_product_pairs(cells_a, va, cells_b, vb, c, kb, ka)


def _csr_product_applies(va: Tensor, vb: Tensor, c: Tensor) -> bool:
    """Whether :func:`_cells_product` takes the CSR product (:class:`_CellsProduct`): unbatched values of one dtype on
    CPU or CUDA, without forward-mode tangents."""
    plain = va.dim() == 1 and vb.dim() == 1 and c.dim() == 1 and va.device.type in _SPARSE_DEVICES
    plain = plain and va.dtype == vb.dtype == c.dtype
    return plain and not (carries_tangent(va) or carries_tangent(vb) or carries_tangent(c))


def _cells_product_fits(pa: tuple[_Cells, Tensor], pb: tuple[_Cells, Tensor], c: Tensor, ka: int, kb: int) -> bool:
    """Whether a block of the Schur product between two groupings kept as cells comes from the cells
    (:func:`_cells_product`) rather than a GEMM over their dense tables: at most :data:`MAX_CELL_PAIRS` joined pairs,
    or one CSR product that costs less than the GEMM (:data:`CELL_PAIRS_GEMM_RATIO`)."""
    pairs = pa[0].pairs(pb[0])
    if pairs <= MAX_CELL_PAIRS:
        return True
    ke = pa[0].starts.shape[0] - 1
    return _csr_product_applies(pa[1], pb[1], c) and pairs * CELL_PAIRS_GEMM_RATIO <= ka * kb * ke


def _cells_product_pairs(
    cells_a: _Cells, va: Tensor, cells_b: _Cells, vb: Tensor, c: Tensor, kb: int, ka: int
) -> Tensor:
    """:func:`_cells_product` by the joined pairs of cells (any batch shape, any mode of differentiation)."""
    mine, theirs = cells_a.join(cells_b)
    terms = va[..., mine] * c[..., cells_a.col[mine]] * vb[..., theirs]
    flat = cells_a.row[mine] * kb + cells_b.row[theirs]
    batch = torch.broadcast_shapes(va.shape[:-1], vb.shape[:-1], c.shape[:-1])
    out = terms.new_zeros(*batch, ka * kb)
    return out.index_add(-1, flat, terms.expand(*batch, terms.shape[-1])).unflatten(-1, (ka, kb))


#: :class:`_CellsProduct`'s backward pass takes the CSR-by-dense products while they cost at most this many
#: multiply-adds per joined pair of cells that the gathers would visit instead (measured on CPU: about 14 ns per pair
#: for the gathers and one ``index_add``, 0.16 ns per multiply-add of the CSR product, on lme4's InstEval).
CELL_PRODUCT_DENSE_RATIO = 64


class _CellsProduct(torch.autograd.Function):
    r""":math:`Y = N_a \operatorname{diag}(c) N_b^\top` (``k_a x k_b``, dense) for two tables against the same
    partition ``e``, given by their nonzero cells and 1-D values ``va``, ``vb``; ``c`` (``k_e``).

    The forward pass is one sparse-by-sparse CSR product: on lme4's InstEval (students eliminated, the lecturers'
    2.5 million joined pairs of cells) 10 ms, against 90 ms for the pairs' index vectors, gathers and ``index_add``.
    With :math:`h^B_p = \sum_{q \in l(p)} \bar Y_{i_p j_q} v^b_q` (at the cells ``p`` of ``a``) and :math:`h^A`
    likewise at the cells of ``b``, the gradients are :math:`\bar v^a = c_{l} h^B`, :math:`\bar v^b = c_{l} h^A`
    and :math:`\bar c_l = \sum_{p \in l} v^a_p h^B_p`. :math:`h^B` is read off :math:`N_b^\top \bar Y^\top`
    (``k_e x k_a``, taken in column chunks of at most ``CELL_PRODUCT_ELEMENTS`` entries) while those CSR products
    cost at most :data:`CELL_PRODUCT_DENSE_RATIO` multiply-adds per joined pair, else from the joined pairs. One
    table with itself (a diagonal block of the Schur complement) takes one product, with :math:`\bar Y + \bar
    Y^\top`. The backward pass is made of differentiable operations, so second derivatives are those of the pairs'
    form."""

    @staticmethod
    def forward(ctx, va: Tensor, c: Tensor, vb: Tensor, cells_a: _Cells, cells_b: _Cells, ka: int, kb: int) -> Tensor:
        ke = cells_a.starts.shape[0] - 1
        ctx.save_for_backward(va, c, vb)
        ctx.cells = (cells_a, cells_b)
        ctx.sizes = (ka, kb)
        ctx.same = cells_a is cells_b and va is vb  # one table with itself: Y is symmetric
        left = cells_a.csr(va * c[cells_a.col], False, ka, ke)  # N_a diag(c): k_a x k_e
        right = cells_b.csr(vb, True, ke, kb)  # N_b^T: k_e x k_b, the cells' own order
        with warnings.catch_warnings():  # torch's note that CSR support is in beta
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            return (left @ right).to_dense()

    @staticmethod
    def backward(ctx, grad: Tensor):
        va, c, vb = ctx.saved_tensors
        cells_a, cells_b = ctx.cells
        ka, kb = ctx.sizes
        need_a, need_c, need_b = ctx.needs_input_grad[:3]
        same = ctx.same
        h_b: Tensor | None = None
        h_a: Tensor | None = None
        if same:  # va is vb: its gradient holds both sides' terms, and vb's is returned as None
            h_b = _cells_gather_product(cells_a, cells_a, vb, grad, ka, symmetrised=True)
        else:
            if need_a or need_c:
                h_b = _cells_gather_product(cells_a, cells_b, vb, grad, ka)
            if need_b:
                h_a = _cells_gather_product(cells_b, cells_a, va, grad.mT, kb)
        grad_va = c[cells_a.col] * h_b if need_a and h_b is not None else None
        grad_c = None
        if need_c and h_b is not None:
            weight = 0.5 * va * h_b if same else va * h_b  # same: h_b holds both sides' terms
            grad_c = torch.zeros_like(c).index_add(0, cells_a.col, weight)
        grad_vb = c[cells_b.col] * h_a if need_b and h_a is not None else None
        return grad_va, grad_c, grad_vb, None, None, None, None


def _cells_gather_product(
    cells_a: _Cells, cells_b: _Cells, vb: Tensor, grad: Tensor, ka: int, symmetrised: bool = False
) -> Tensor:
    r""":math:`h_p = \sum_{q \in l(p)} G_{i_p j_q} v^b_q` at the cells ``p`` of ``cells_a`` (rows ``i`` of ``G``,
    ``k_a x k_b``), the cells ``q`` of ``cells_b`` (columns ``j``) sharing the level ``l`` of ``e``: from
    :math:`N_b^\top G^\top` in column chunks, or from the joined pairs where that costs more (see
    :class:`_CellsProduct`). ``symmetrised`` (one table with itself): the same for :math:`G + G^\top`; the pairs
    then scatter the one gather of ``G`` twice rather than form :math:`G + G^\top` (a pass over ``k_a^2`` entries
    with one side transposed: 65 ms at ``k_a = 3000``). # shape: (c_a,)"""
    ke = cells_a.starts.shape[0] - 1
    kb = grad.shape[-1]
    pairs = cells_a.pairs(cells_b)
    if cells_b.count * ka > CELL_PRODUCT_DENSE_RATIO * pairs and pairs <= MAX_CELL_PAIRS:
        mine, theirs = cells_a.join(cells_b)
        gathered = grad.reshape(-1)[cells_a.row[mine] * kb + cells_b.row[theirs]]
        h = vb.new_zeros(cells_a.count).index_add(0, mine, gathered * vb[theirs])
        return h.index_add(0, theirs, gathered * vb[mine]) if symmetrised else h
    if symmetrised:
        grad = grad + grad.mT
    perm, crow = cells_a.by_row(ka)  # the cells of a in order of their row: rows i0 .. i1 are crow[i0]:crow[i1]
    bounds = crow.tolist()
    step = max(1, CELL_PRODUCT_ELEMENTS // max(1, ke))
    parts = []
    for i0 in range(0, ka, step):
        i1 = min(ka, i0 + step)
        block = _cells_matmul(cells_b, vb, grad[i0:i1].mT.contiguous(), ke, transpose=True)  # k_e x (i1 - i0)
        which = perm[bounds[i0] : bounds[i1]]
        parts.append(block[cells_a.col[which], cells_a.row[which] - i0])
    return vb.new_zeros(cells_a.count).index_copy(0, perm, torch.cat(parts))


#: Cells per chunk of :class:`_GatherScatter` (``chunk x m`` temporaries).
GATHER_CHUNK = 2**16


@reverse_mode_only("BlockMeanSumLinearOperator (the contingency products)")
class _GatherScatter(torch.autograd.Function):
    r"""``out[row[c]] += v[c] X[col[c]]`` over the cells ``c``, in chunks, for a 1-D ``v`` and a 2-D ``X``:
    ``(k_a, m)`` out, and no ``cells x m`` tensor kept for the backward pass (it regathers per chunk)."""

    @staticmethod
    def forward(ctx, v: Tensor, X: Tensor, row: Tensor, col: Tensor, ka: int) -> Tensor:
        out = X.new_zeros(ka, X.shape[-1])
        for start in range(0, v.shape[0], GATHER_CHUNK):
            sl = slice(start, start + GATHER_CHUNK)
            out.index_add_(0, row[sl], v[sl].unsqueeze(-1) * X[col[sl]])
        ctx.save_for_backward(v, X, row, col)
        return out

    @staticmethod
    @first_order_only("BlockMeanSumLinearOperator (the contingency products)")
    def backward(ctx, grad: Tensor):
        v, X, row, col = ctx.saved_tensors
        grad_v = torch.empty_like(v) if ctx.needs_input_grad[0] else None
        grad_X = torch.zeros_like(X) if ctx.needs_input_grad[1] else None
        for start in range(0, v.shape[0], GATHER_CHUNK):
            sl = slice(start, start + GATHER_CHUNK)
            g_rows = grad[row[sl]]
            if grad_v is not None:
                grad_v[sl] = (g_rows * X[col[sl]]).sum(-1)
            if grad_X is not None:
                grad_X.index_add_(0, col[sl], v[sl].unsqueeze(-1) * g_rows)
        return grad_v, grad_X, None, None, None


#: Devices whose sparse CSR products (``@`` and :func:`torch.sparse.sampled_addmm`) :class:`_CellsDenseProduct` uses.
_SPARSE_DEVICES = ("cpu", "cuda")


@reverse_mode_only("BlockMeanSumLinearOperator (the contingency products)")
class _CellsDenseProduct(torch.autograd.Function):
    r""":math:`N X` for the table :math:`N` (``k_a x k_e``) given by its nonzero ``cells`` and their values ``v``
    (1-D) and a dense ``X`` (``k_e x m``), as sparse CSR products: the forward is one CSR product, the backward one
    with the transposed table (:math:`\bar X = N^\top \bar Y`, CSR as the cells are stored) and one sampled
    product for :math:`\bar v_c = \bar Y_{i_c} \cdot X_{l_c}` (:func:`torch.sparse.sampled_addmm`). The
    :class:`_GatherScatter` form gathers a ``cells x m`` copy of ``X`` (and of the gradient) instead: at
    ``n = 2 x 10^4`` (20,000 cells, ``m = 256``), 28 ms forward and about 50 ms backward against 2 and 8 ms here."""

    @staticmethod
    def forward(ctx, v: Tensor, X: Tensor, cells: _Cells, ka: int) -> Tensor:
        ke = X.shape[-2]
        ctx.save_for_backward(v, X)
        ctx.cells, ctx.ka = cells, ka
        return cells.csr(v, False, ka, ke) @ X

    @staticmethod
    @first_order_only("BlockMeanSumLinearOperator (the contingency products)")
    def backward(ctx, grad: Tensor):
        v, X = ctx.saved_tensors
        cells, ka = ctx.cells, ctx.ka
        ke = X.shape[-2]
        grad_v = grad_X = None
        if ctx.needs_input_grad[0]:
            # the pattern of N^T (rows: the blocks of e), whose stored order is the cells' own
            pattern = cells.csr(torch.zeros_like(v), True, ke, ka)
            grad_v = torch.sparse.sampled_addmm(pattern, X, grad.to(X.dtype).mT, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            grad_X = cells.csr(v, True, ke, ka) @ grad
        return grad_v, grad_X, None, None


def _cells_dense_product(cells: _Cells, values: Tensor, c: Tensor, dense: Tensor, ka: int) -> Tensor:
    r""":math:`N \operatorname{diag}(c) X` for the nonzero cells of :math:`N` (``k_a x k_e``) and a dense
    :math:`X` (``k_e x m``): one gathered row of :math:`X` per cell (in chunks, without batch dimensions).
    # shape: (*b, k_a, m)"""
    vc = values * c[..., cells.col]
    if vc.dim() == 1 and dense.dim() == 2:
        if dense.device.type in _SPARSE_DEVICES:
            return _CellsDenseProduct.apply(vc, dense, cells, ka)
        return _GatherScatter.apply(vc, dense, cells.row, cells.col, ka)
    scaled = vc.unsqueeze(-1) * dense[..., cells.col, :]
    out = scaled.new_zeros(*scaled.shape[:-2], ka, dense.shape[-1])
    return out.index_add(-2, cells.row, scaled)


@dataclass(frozen=True)
class _Capacitance:
    r"""Factorisation of :math:`C = I_q + G A` (:math:`A = Z^\top D^{-1} Z`, :math:`G` block diagonal).

    With ``elim`` the index of a term whose :math:`G_e = \operatorname{diag}(g_e)` is diagonal, :math:`C`
    is ordered as :math:`[[\Delta, g_e A_{er}], [G_r A_{re}, I + G_r A_{rr}]]` with
    :math:`\Delta = I + g_e A_{ee}` diagonal; the rest goes through the Schur complement
    :math:`S = I + G_r (A_{rr} - A_{re} \operatorname{diag}(g_e / \Delta) A_{er})` (LU-factorised).
    Without ``elim``, ``S`` is ``C``.

    With ``joint`` (several diagonal terms over the eliminated grouping's partition, such as a correlated random
    intercept and slope), those terms are eliminated together: their block of :math:`C` is block diagonal with one
    ``r_e x r_e`` block :math:`\Delta_c = I + \operatorname{diag}(g_c) A_c` per level (``elim``, ``delta``, ``g``
    and ``A_re`` are then None; see :meth:`BlockMeanSumLinearOperator._factorise_joint`).
    """

    elim: int | None
    delta: Tensor | None  # (*b, k_e)
    g: Tensor | None  # (*b, k_e): the diagonal of G_e
    A_re: _CrossBlocks | None  # A_{re}, (*b, r, k_e)
    lu: tuple[Tensor, Tensor, Tensor] | _NestedLU | None  # S (r x r, with its graph) and its LU factors, or
    # _NestedLU (unpacks to those, formed on demand); None when r == 0
    logdet: Tensor  # (*b,): log |det C|
    joint: _JointElimination | None = None
    A_tilde: Tensor | None = None  # A_rr with the eliminated terms' correction subtracted (S = I + G_r A_tilde)
    sign: Tensor | None = None  # (*b,): the sign of det C; None: positive
    not_definite: ValueError | None = None  # with validation on, the error for a sum found not positive definite
    # (raised by the log-determinant and GP prediction; solve and inv_quad need an invertible sum only)


@dataclass(frozen=True)
class _JointElimination:
    """Terms ``E`` over one partition of ``k`` levels, all with diagonal :math:`B`, eliminated level by level."""

    terms: tuple[int, ...]
    g: Tensor  # (*b, k, r_e): the diagonals of G_E, level-major
    delta: Tensor  # (*b, k, r_e, r_e): I + diag(g_c) A_c per level
    formed: Tensor | None  # (*b, r, k, r_e): A_rE formed; None when r == 0 or when ``cross`` holds it
    cross: _JointCross | None = None  # A_rE as the cells of sparse tables (training never forms it then)

    @functools.cached_property
    def A_rE(self) -> Tensor | None:
        """The blocks of :math:`Z^\top D^{-1} Z` between the other terms and ``E`` (``(*b, r, k, r_e)``; None when
        ``r == 0``), formed from ``cross`` on first use (the posterior at new inputs)."""
        return self.cross.dense() if self.formed is None and self.cross is not None else self.formed

    def rest_product(self, zE: Tensor) -> Tensor:
        """:math:`A_{rE} z_E` for ``zE`` (``(*b, k, r_e, t)``). # shape: (*b, r, t)"""
        if self.cross is not None:
            return self.cross.matmul(zE)
        assert self.formed is not None
        return torch.einsum("...rci,...cit->...rt", self.formed, zE)

    def level_product(self, x: Tensor) -> Tensor:
        """:math:`A_{Er} x` for ``x`` (``(*b, r, t)``), level by level. # shape: (*b, k, r_e, t)"""
        if self.cross is not None:
            return self.cross.t_matmul(x)
        assert self.formed is not None
        return torch.einsum("...rci,...rt->...cit", self.formed, x)


def _formed_cross(
    blocks: _Contingencies, rest: list[int], eliminated: list[int], g: Tensor, wdt: torch.dtype
) -> Tensor:
    """:math:`A_{rE}` of a joint elimination formed from the blocks of :math:`Z^\top D^{-1} Z` in ``blocks`` (the
    terms ``rest``, groupings or the root, against the eliminated terms), broadcast with ``g``'s batch.
    # shape: (*b, r, k, r_e)"""

    def table(t: int, e: int) -> Tensor:
        return (blocks[t, e] if t < e else blocks[e, t].mT).to(wdt)

    A_rE = torch.stack([torch.cat([table(t, e) for t in rest], dim=-2) for e in eliminated], -1)
    batch = torch.broadcast_shapes(A_rE.shape[:-3], g.shape[:-2])
    return A_rE.expand(*batch, *A_rE.shape[-3:])


class _JointCross:
    r""":math:`A_{rE}` of a joint elimination whose other terms are all groupings with sparse tables against the
    eliminated grouping: per such grouping ``t`` its cells (:class:`_Cells`) and one value vector per eliminated
    term ``e`` (:math:`P_t^\top W_t D^{-1} W_e P_e` at the cells). Products cost one pass over the cells per term
    (:func:`_cells_matmul`); ``dense`` forms the ``(r, k, r_e)`` tensor where a caller needs it."""

    def __init__(self, tables: list[_Cells], values: list[list[Tensor]], sizes: list[int], ke: int, dense):
        self.tables, self.values, self.sizes, self.ke = tables, values, sizes, ke
        self._dense = dense

    def dense(self) -> Tensor:
        return self._dense()

    def matmul(self, zE: Tensor) -> Tensor:
        parts = []
        for table, vals, size in zip(self.tables, self.values, self.sizes):
            terms = [_cells_matmul(table, v, zE[..., e, :], size) for e, v in enumerate(vals)]
            parts.append(functools.reduce(torch.add, terms))
        return torch.cat(parts, dim=-2)

    def t_matmul(self, x: Tensor) -> Tensor:
        pieces = x.split(self.sizes, dim=-2)
        columns = []
        for e in range(len(self.values[0])):
            terms = [
                _cells_matmul(table, vals[e], piece, self.ke, transpose=True)
                for table, vals, piece in zip(self.tables, self.values, pieces)
            ]
            columns.append(functools.reduce(torch.add, terms))
        return torch.stack(columns, dim=-2)

    def correction(self, M: Tensor) -> Tensor:
        r""":math:`A_{rE} \Delta^{-1} G_E A_{Er}` given :math:`M_l = \Delta_l^{-1} \operatorname{diag}(g_l)` per
        level (``(k, r_e, r_e)``): the block between groupings ``s`` and ``t`` is :math:`\sum_{e, e'} N_{se}
        \operatorname{diag}(M_{:, e, e'}) N_{te'}^\top`. The tables :math:`N_{se}` of one grouping share their cells
        (only the values differ), so :math:`\sum_e N_{se} \operatorname{diag}(M_{:, e, e'})` is one table on those
        cells, with values :math:`\sum_e v_{se} M_{l, e, e'}`: ``r_e`` products of tables held as cells
        (:func:`_cells_product`) per block, not ``r_e^2``. # shape: (r, r)"""
        r_e = len(self.values[0])
        ones = M.new_ones(M.shape[-3])
        rows: list[list[Tensor]] = []
        for i, (table_s, vals_s, size_s) in enumerate(zip(self.tables, self.values, self.sizes)):
            levels = M.index_select(-3, table_s.col)  # M at each cell's level: (c_s, r_e, r_e)
            merged = [
                functools.reduce(torch.add, [vals_s[a] * levels[:, a, b] for a in range(r_e)]) for b in range(r_e)
            ]
            row = []
            for j, (table_t, vals_t, size_t) in enumerate(zip(self.tables, self.values, self.sizes)):
                if j < i:
                    row.append(rows[j][i].mT)
                    continue
                terms = [
                    _cells_product(table_s, merged[b], table_t, vals_t[b], ones, size_t, size_s) for b in range(r_e)
                ]
                row.append(functools.reduce(torch.add, terms))
            rows.append(row)
        return torch.cat([torch.cat(row, -1) for row in rows], -2)


#: The capacitance's rest (``r`` columns, the root's among them) is factorised with the root's block eliminated
#: first (:class:`_NestedLU`) from this size on; below, its few more operations cost more than the smaller LU
#: saves (at ``r = 28``, 1 ms in 5).
NESTED_MIN_SIZE = 384

#: Steps of iterative refinement a solve takes where the capacitance eliminates weighted terms (random slopes)
#: jointly (:meth:`BlockMeanSumLinearOperator._refines`): one restores a dense Cholesky's accuracy of the posterior
#: mean for covariates up to about 1e5 from 0 (two up to 1e6).
REFINEMENT_STEPS = 1


class _NestedLU:
    r""":math:`S = I + G_r A_{rr}` with the root's block (last, :math:`G_R = I`) eliminated first:
    ``lu22`` factors :math:`S_{RR} = I + A_{RR}`, ``Y`` is :math:`S_{RR}^{-1} A_{R1}`, ``A1R`` is
    :math:`A_{1R}` and ``lu1`` factors :math:`S' = I + G_1 (A_{11} - A_{1R} Y)`; ``g1`` applies :math:`G_1`.
    Unpacking it (``*cap.lu``, as the prediction strategies do) forms and factorises the whole :math:`S` once,
    through ``full``."""

    def __init__(self, lu22, Y: Tensor, A1R: Tensor, lu1, g1, full):
        self.lu22, self.Y, self.A1R, self.lu1, self.g1 = lu22, Y, A1R, lu1, g1
        self._full = full
        self._grad = torch.is_grad_enabled()  # the whole S is formed as it would have been with the rest
        self._factors: tuple[Tensor, Tensor, Tensor] | None = None

    def __iter__(self):
        if self._factors is None:
            with torch.set_grad_enabled(self._grad):
                self._factors = self._full()[0]
        return iter(self._factors)

    def solve(self, rhs: Tensor) -> Tensor:
        """:math:`S^{-1}` ``rhs``: :math:`z = S_{RR}^{-1} y_R`, :math:`x_1 = S'^{-1} (y_1 - G_1 A_{1R} z)`,
        :math:`x_R = z - Y x_1`."""
        r1 = self.A1R.shape[-2]
        z = _LUSolve.apply(*self.lu22, rhs[..., r1:, :])
        x1 = _LUSolve.apply(*self.lu1, rhs[..., :r1, :] - self.g1(self.A1R @ z))
        xR = z - self.Y @ x1
        batch = torch.broadcast_shapes(x1.shape[:-2], xR.shape[:-2])
        return torch.cat([x1.expand(*batch, *x1.shape[-2:]), xR.expand(*batch, *xR.shape[-2:])], dim=-2)


def _rest_solve(lu, rhs: Tensor) -> Tensor:
    """:math:`S^{-1}` ``rhs`` from :meth:`BlockMeanSumLinearOperator._factorise_rest`'s factors."""
    if isinstance(lu, _NestedLU):
        return lu.solve(rhs)
    return _LUSolve.apply(*lu, rhs)


def _sum_to(x: Tensor, shape: torch.Size) -> Tensor:
    """``x`` summed over the leading dimensions that broadcasting added to a tensor of ``shape``."""
    extra = x.dim() - len(shape)
    if extra > 0:
        x = x.sum(tuple(range(extra)))
    dims = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return x.sum(dims, keepdim=True) if dims else x


@reverse_mode_only("BlockMeanSumLinearOperator (the capacitance solve)")
class _LUSolve(torch.autograd.Function):
    r""":math:`x = S^{-1} y` from the LU factors of :math:`S`, with the gradients written directly:
    :math:`\bar y = S^{-\top} \bar x` (one more solve with the same factors) and :math:`\bar S = -\bar y x^\top`.

    Differentiating through ``lu_factor`` instead costs four ``r x r`` products and two triangular solves with
    ``r`` right-hand sides per backward pass; here a backward pass costs one solve per right-hand side.
    Second derivatives are refused rather than wrong."""

    @staticmethod
    def forward(ctx, S: Tensor, LU: Tensor, pivots: Tensor, rhs: Tensor) -> Tensor:
        batch = torch.broadcast_shapes(LU.shape[:-2], rhs.shape[:-2])
        LU_b, piv_b = LU.expand(*batch, *LU.shape[-2:]), pivots.expand(*batch, pivots.shape[-1])
        x = torch.linalg.lu_solve(LU_b, piv_b, rhs.expand(*batch, *rhs.shape[-2:]))
        ctx.save_for_backward(LU_b, piv_b, x)
        ctx.shapes = (S.shape, rhs.shape)
        return x

    @staticmethod
    @first_order_only("BlockMeanSumLinearOperator (the capacitance solve)")
    def backward(ctx, grad_x: Tensor):
        LU_b, piv_b, x = ctx.saved_tensors
        s_shape, rhs_shape = ctx.shapes
        lam = torch.linalg.lu_solve(LU_b, piv_b, grad_x, adjoint=True)
        grad_S = _sum_to(-(lam @ x.mT), s_shape) if ctx.needs_input_grad[0] else None
        grad_rhs = _sum_to(lam, rhs_shape) if ctx.needs_input_grad[3] else None
        return grad_S, None, None, grad_rhs


@reverse_mode_only("BlockMeanSumLinearOperator (the capacitance log-determinant)")
class _LULogAbsDet(torch.autograd.Function):
    r""":math:`\log |\det S|` from the LU factors of :math:`S`; its gradient :math:`S^{-\top}` is one solve with
    the identity (``2 r^3`` operations, against about ``6 r^3`` through ``lu_factor``'s own backward).
    Second derivatives are refused rather than wrong."""

    @staticmethod
    def forward(ctx, S: Tensor, LU: Tensor, pivots: Tensor) -> Tensor:
        ctx.save_for_backward(LU, pivots)
        return torch.diagonal(LU, dim1=-2, dim2=-1).abs().log().sum(-1)

    @staticmethod
    @first_order_only("BlockMeanSumLinearOperator (the capacitance log-determinant)")
    def backward(ctx, grad: Tensor):
        LU, pivots = ctx.saved_tensors
        eye = torch.eye(LU.shape[-1], dtype=LU.dtype, device=LU.device).expand_as(LU)
        inv_t = torch.linalg.lu_solve(LU, pivots, eye, adjoint=True)  # S^{-T}
        return inv_t * grad.unsqueeze(-1).unsqueeze(-1), None, None


def _scoped(method):
    """Share the Gram matrix and the capacitance among everything one public call computes, and drop the
    parts that carry an autograd graph when it returns (so a second backward pass builds its own)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._depth += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._depth -= 1
            if not self._depth:
                for name in self._scoped_names:
                    self._store.pop(name, None)
                self._scoped_names.clear()

    return wrapper


# ---------------------------------------------------------------------------- the operator


def _level_ratio_hint(g: Tensor, diag: Tensor) -> str:
    """For a joint elimination refused as not positive definite: where the terms' variances dwarf the diagonal (the
    noise), the per-level blocks ``I + diag(g) A`` lose precision in the elimination (groups with fewer points than
    terms: a random slope's one-member groups) and a definite matrix can look indefinite; "" otherwise."""
    with torch.no_grad():
        largest = float(g.abs().max()) if g.numel() else 0.0
        smallest = float(diag.abs().min()) if diag.numel() else 0.0
    if smallest <= 0 or largest < 1e6 * smallest:
        return ""
    return (
        f" The terms' variances reach {largest:.3g}, {largest / smallest:.2g} times the smallest diagonal entry (the "
        "noise): at such ratios the per-level blocks lose precision (groups with fewer points than terms, such as a "
        "random slope's groups of one point), and a positive definite matrix can be refused. A larger noise floor "
        "(a GreaterThan constraint on the noise), a rescaled covariate or rescaled outputs bring the ratio down."
    )


#: A diagonal term times a block mean operator of at most this many blocks becomes that many weighted diagonal terms
#: over its own grouping (:func:`hadamard_plan`); over more, one term over the intersection of the two partitions
TASK_TERMS_MAX = 16


def hadamard_plan(S, X: BlockMeanLinearOperator) -> tuple[Tensor | None, bool] | None:
    r"""How :meth:`BlockMeanSumLinearOperator._hadamard_block_mean` multiplies ``S`` by ``X`` elementwise, also read by
    the prediction's cross covariance (``bma_gp.kernels.sum_prediction_strategy``), which must number the columns the
    same way: ``(L, as_weights)``, ``L`` the Cholesky factor of ``X``'s core :math:`C = L L^\top` (``None`` where it
    is not needed or :math:`C` is not positive definite) and ``as_weights`` whether a diagonal term becomes ``k_X``
    terms weighted by the rows of ``L`` (``L`` unbatched, ``k_X`` times :func:`diagonal_terms_per_grouping` at most
    ``TASK_TERMS_MAX``). ``None``: no closed form (``X`` not symmetric, or a root with a :math:`C` that is not
    positive definite)."""
    if not X.symmetric:
        return None
    C = X._b_sym()
    if C.dim() > 2 and (batch_expanded(X._b_vector(), 1) if X.is_diagonal_mode else batch_expanded(X.B)) is not None:
        # one task matrix copied across a batch (a fantasy model's inputs copied across its fantasy batch): its
        # factor is one, and the product takes the weighted terms the prediction's cross covariance expects
        C = C[(0,) * (C.dim() - 2)]
    # the terms one grouping would hold afterwards: a second task factor multiplies those the first made
    per_grouping = max(1, diagonal_terms_per_grouping(S))
    small = C.dim() == 2 and C.shape[-1] * per_grouping <= TASK_TERMS_MAX
    L: Tensor | None = None
    if S.root is not None or ((any(S.diagonal_blocks) or 1 in getattr(S, "num_blocks", ())) and small):
        factor, info = torch.linalg.cholesky_ex(C.to(core_dtype(C.dtype)))
        if bool((info == 0).all()):  # (one host read, of a k_X x k_X factorisation)
            L = factor.to(C.dtype)
        elif S.root is not None:
            return None
    return L, L is not None and small


def diagonal_terms_per_grouping(S) -> int:
    """The most diagonal terms (one-block terms included) a sum holds over one partition: what a diagonal term
    becomes ``k_X`` times over in an elementwise product (:func:`hadamard_plan`). ``S`` needs ``partitions`` and
    ``diagonal_blocks`` only (the prediction's cross covariance passes its pieces' so)."""
    seen: list[tuple[Partition, int]] = []
    for partition, flag in zip(S.partitions, S.diagonal_blocks):
        if not (flag or partition.num_blocks == 1):
            continue
        for i, (p, count) in enumerate(seen):
            if p.same_as(partition):
                seen[i] = (p, count + 1)
                break
        else:
            seen.append((partition, 1))
    return max((count for _, count in seen), default=0)


def as_block_mean_factor(op) -> BlockMeanLinearOperator | None:
    """``op`` as a block mean operator for an elementwise product with a sum: a block mean operator, GPyTorch's
    ``IndexKernel`` between the same ids (``C[i_a, i_b]``,
    :func:`~bma_gp.block_mean_linear_operator._one_hot_block_mean`), or a multiple ``c X`` of one (a
    ``ScaleKernel``'s output, the constant taken into ``X``); else ``None``."""
    from linear_operator.operators import ConstantMulLinearOperator

    if hasattr(op, "evaluate_kernel"):
        op = op.evaluate_kernel()
    if isinstance(op, BlockMeanLinearOperator):
        return op
    if type(op) is ConstantMulLinearOperator:
        inner = as_block_mean_factor(op.base_linear_op)
        if inner is None:
            return None
        scaled = inner._mul_constant(op._constant)
        return scaled if isinstance(scaled, BlockMeanLinearOperator) else None
    return _one_hot_block_mean(op)


def task_weight(L: Tensor, labels: Tensor, rho: int, w: Tensor | None) -> Tensor:
    """The row weight of the ``rho``-th term a diagonal term with weight ``w`` becomes (:func:`hadamard_plan`)."""
    scale = L[:, rho].index_select(0, labels)
    return scale if w is None else w * scale


def rows_times_root(U: Tensor, rows: Tensor) -> Tensor:
    r""":math:`R_{a, (i, \rho)} = U_{ai} \, \mathrm{rows}_{a \rho}`: the root of :math:`U U^\top \circ
    (\mathrm{rows}\ \mathrm{rows}^\top)`. # shape: (*batch, n, m k_X)"""
    return (U.unsqueeze(-1) * rows.unsqueeze(-2)).flatten(-2)


class BlockMeanSumLinearOperator(
    WarnsOnCatRows,
    TorchIndexing,
    PicklesWithoutCache,
    ClosedFormSamples,
    LowRankInClosedForm,
    ClosedFormRoots,
    LinearOperator,
):
    r"""A per-point diagonal plus block mean matrices over several partitions plus a low-rank root.

    .. math::
        M = \operatorname{diag}(d) + \sum_{j=1}^{J} P_j B_j P_j^\top + U U^\top
          = D + Z G Z^\top, \qquad Z = [P_1, \dots, P_J, U], \quad
          G = \operatorname{blockdiag}(B_1, \dots, B_J, I_m),

    where :math:`P_j` is the :math:`n \times k_j` indicator matrix of partition :math:`j` (optionally
    with weighted rows, :math:`(P_j)_{a, c} = w_{j,a}`: a random slope), :math:`B_j` is symmetric
    and :math:`U` is :math:`n \times m`. With :math:`A = Z^\top D^{-1} Z` (:math:`q \times q`,
    :math:`q = \sum_j k_j + m`) and the capacitance :math:`C = I_q + G A`,

    .. math::
        M^{-1} = D^{-1} - D^{-1} Z C^{-1} G Z^\top D^{-1}, \qquad
        \log\det M = \textstyle\sum_a \log d_a + \log\det C.

    :math:`A` is cheap: the block of a partition with itself is diagonal (block sums of
    :math:`w^2/d`), two partitions meet in their contingency table weighted by :math:`1/d`, a
    partition and :math:`U` in the block sums of the rows of :math:`D^{-1} U`. When one
    :math:`B_e` is diagonal (a random intercept, ``GroupKernel``'s default) its block of
    :math:`C` is diagonal and is eliminated first, so only a matrix of size :math:`q - k_e` is
    factorised. Nothing of size :math:`n \times n` is formed: a solve or log-determinant costs
    :math:`O(n (J + m)^2)` to form :math:`A` and :math:`O((q - k_e)^3)` to factorise.

    Reductions over the ``n`` indices, the products with the root :math:`U` and the capacitance problem run
    in float64 for float32 (and lower) operators (:class:`bma_gp.settings.fast_root_products` forms the root's
    products in its own precision instead: faster, less accurate when ill-conditioned). :math:`C` is never
    singular when :math:`M` is positive definite, so no jitter is added (in float32,
    rounding can still make a very ill-conditioned sum look indefinite: the ``ValueError`` says so); a
    capacitance larger than :class:`bma_gp.settings.max_capacitance_size` raises.

    Build one by adding operators (``M + DiagLinearOperator(d)``, ``M.add_diagonal(d)``,
    ``M1 + M2`` over different partitions, ``M + LowRankRootLinearOperator(U)``) or directly.

    Args:
        diag: the positive per-point diagonal :math:`d`. # shape: (*batch, n)
        *blocks: one symmetric :math:`B_j` per partition. # shape: (*batch, k_j, k_j)
        partitions: the partitions :math:`P_j`, one per block matrix, each of length ``n``.
        root: the low-rank root :math:`U`, or ``None``. # shape: (*batch, n, m)
        weights: per partition ``None`` (plain indicators) or a row weight :math:`w_j`
            (a covariate: random slopes). # shape: (n,)
        diagonal: per partition, whether ``blocks[j]`` is given as the diagonal of a diagonal :math:`B_j`,
            shape ``(*batch, k_j)`` (per-level variances): then no ``k_j x k_j`` matrix is formed for it,
            and :attr:`blocks` forms it only on demand. Default: all ``False``.
    """

    def __init__(
        self,
        diag: Tensor,
        *blocks: Tensor,
        partitions: Sequence[Partition],
        root: Tensor | None = None,
        weights: Sequence[Tensor | None] | None = None,
        diagonal: Sequence[bool] | None = None,
    ):
        if isinstance(partitions, Partition):
            raise TypeError(
                "partitions must be a list with one bma_gp.Partition per block matrix: partitions=[partition]."
            )
        partitions = tuple(partitions)
        if diagonal is None:
            flags: tuple[bool, ...] = (False,) * len(partitions)
        elif not isinstance(diagonal, (list, tuple, np.ndarray)):  # a bare bool, or a string (each character a flag)
            raise TypeError(
                f"diagonal must be a list with one True/False flag per partition, got {diagonal!r}; "
                f"e.g. diagonal=[{diagonal!r}] for one partition."
            )
        else:
            for j, flag in enumerate(diagonal):
                if not (isinstance(flag, (bool, int, np.bool_)) and flag in (True, False)):
                    # bool("False") is True: a string would read a k x k B as k diagonals (a batch of k)
                    raise TypeError(f"diagonal[{j}] must be True or False, got {flag!r}.")
            flags = tuple(bool(f) for f in diagonal)
        if len(flags) != len(partitions):
            raise ValueError(
                f"diagonal must hold one flag per partition, got {len(flags)} for {len(partitions)} partitions."
            )
        if not torch.is_tensor(diag) or not diag.dtype.is_floating_point or diag.dim() < 1:
            raise TypeError("diag must be a floating point tensor of shape (*batch, n).")
        n = diag.shape[-1]
        if len(blocks) != len(partitions):
            raise ValueError(
                f"got {len(blocks)} block matrices for {len(partitions)} partitions: pass one B_j per partition."
            )
        for j, (B, part) in enumerate(zip(blocks, partitions)):
            if not isinstance(part, Partition):
                raise TypeError(f"partitions[{j}] must be a bma_gp.Partition, got {type(part).__name__}.")
            if len(part) != n:
                raise ValueError(f"partitions[{j}] has {len(part)} indices but diag has {n}: they must match.")
            k = part.num_blocks
            if flags[j]:
                if not torch.is_tensor(B) or B.dim() < 1 or B.shape[-1] != k:
                    raise ValueError(
                        f"blocks[{j}] is given as its diagonal (diagonal[{j}] = True) and must have shape "
                        f"(*batch, {k}), got {tuple(B.shape) if torch.is_tensor(B) else type(B).__name__}."
                    )
            elif not torch.is_tensor(B) or B.dim() < 2 or B.shape[-2:] != (k, k):
                raise ValueError(
                    f"blocks[{j}] must have shape (*batch, {k}, {k}) for a partition with {k} blocks, "
                    f"got {tuple(B.shape) if torch.is_tensor(B) else type(B).__name__}."
                )
            if B.dtype != diag.dtype:
                raise TypeError(f"blocks[{j}] has dtype {B.dtype} but diag has {diag.dtype}; cast one with .to().")
            if B.device != diag.device:
                raise ValueError(f"blocks[{j}] is on {B.device} but diag is on {diag.device}; move one with .to().")
        if isinstance(root, LazyRoot):
            if len(root.shape) != 2 or root.shape[-2] != n:
                raise ValueError(f"a lazy root must have shape (n={n}, m), got {tuple(root.shape)}.")
            if diag.dim() > 1 or any(B.dim() > (1 if f else 2) for B, f in zip(blocks, flags)):
                root = root.materialize()  # a batch of sums: the lazy products are for one matrix
        if root is not None:
            if not isinstance(root, LazyRoot) and (not torch.is_tensor(root) or root.dim() < 2 or root.shape[-2] != n):
                raise ValueError(
                    f"root must have shape (*batch, n={n}, m), got "
                    f"{tuple(root.shape) if torch.is_tensor(root) else type(root).__name__}."
                )
            if root.dtype != diag.dtype:
                raise TypeError(f"root has dtype {root.dtype} but diag has {diag.dtype}; cast one with .to().")
            if root.device != diag.device:
                raise ValueError(f"root is on {root.device} but diag is on {diag.device}; move one with .to().")
        weights = tuple(weights) if weights is not None else (None,) * len(partitions)
        if len(weights) != len(partitions):
            raise ValueError(
                f"weights must hold one entry (a tensor of shape (n,) or None) per partition, "
                f"got {len(weights)} for {len(partitions)}."
            )
        for j, w in enumerate(weights):
            if w is not None and (not torch.is_tensor(w) or w.shape != (n,)):
                raise ValueError(f"weights[{j}] must be None or a tensor of shape ({n},).")
            if w is not None:
                check_real(w, f"weights[{j}]")
        trail = [1 if f else 2 for f in flags]  # the non-batch dimensions of each block argument
        batches = {"diag": diag.shape[:-1]}
        batches.update({f"blocks[{j}]": B.shape[: B.dim() - t] for j, (B, t) in enumerate(zip(blocks, trail))})
        if root is not None:
            batches["root"] = torch.Size(root.shape[:-2])
        try:
            batch = torch.broadcast_shapes(*batches.values())
        except RuntimeError:
            shapes = ", ".join(f"{name} {tuple(shape)}" for name, shape in batches.items())
            raise ValueError(
                f"the batch shapes of the sum's parts do not broadcast: {shapes}. Give them one batch shape, or "
                "batch shapes that broadcast (sizes equal or 1)."
            ) from None
        diag = diag.expand(*batch, n)
        blocks = tuple(B.expand(*batch, *B.shape[B.dim() - t :]) for B, t in zip(blocks, trail))
        if torch.is_tensor(root):
            root = root.expand(*batch, *root.shape[-2:])
        device = diag.device
        partitions = tuple(p.to(device) for p in partitions)
        weights = tuple(None if w is None else w.to(device=device, dtype=diag.dtype) for w in weights)
        if any(flags):
            super().__init__(diag, *blocks, partitions=partitions, root=root, weights=weights, diagonal=flags)
        else:
            super().__init__(diag, *blocks, partitions=partitions, root=root, weights=weights)
        self.diag_values = diag
        self._block_args = blocks  # B_j, or its diagonal where diagonal[j]
        self.diagonal_blocks = flags
        self._dense_blocks: list[Tensor | None] = [None if f else B for B, f in zip(blocks, flags)]
        self.partitions = partitions
        self._root_arg = root  # a tensor, a LazyRoot (formed only when something other than a solve needs it) or None
        self._root_tensor = root if torch.is_tensor(root) else None
        self.weights = weights
        self._store: dict[str, object] = {}
        self._depth = 0
        self._scoped_names: set[str] = set()
        self._graphless: set[str] = set()  # stored under no_grad from tensors that require gradients

    # ------------------------------------------------------------------ bookkeeping
    _pickled_empty = {"_store": dict, "_scoped_names": set, "_graphless": set}  # results: recomputed by a copy

    def evaluate_kernel(self) -> BlockMeanSumLinearOperator:
        """Itself: its summands were evaluated when it was built (linear_operator's default rebuilds the operator
        from its tensors and would drop what it has computed)."""
        return self

    @property
    def blocks(self) -> tuple[Tensor, ...]:
        """The block matrices :math:`B_j` (*batch, k_j, k_j); one given as its diagonal is formed here on demand
        (kept unless it requires gradients). The closed forms never ask for it."""
        return tuple(self._dense_block(j) for j in range(len(self._block_args)))

    def _dense_block(self, j: int) -> Tensor:
        """:math:`B_j` as a (*batch, k_j, k_j) matrix, formed from its diagonal (and kept unless it requires
        gradients) only for this ``j``: :attr:`blocks` would form every one."""
        dense = self._dense_blocks[j]
        if dense is None:
            B = self._block_args[j]
            dense = torch.diag_embed(B)
            if not B.requires_grad:
                self._dense_blocks[j] = dense
        return dense

    def _trail(self, j: int) -> int:
        """The non-batch dimensions of block argument ``j``."""
        return 1 if self.diagonal_blocks[j] else 2

    @property
    def root(self) -> Tensor | None:
        """:math:`U` (``None`` without a low-rank part); a lazy root is formed on first use here."""
        if self._root_tensor is None and isinstance(self._root_arg, LazyRoot):
            self._root_tensor = self._root_arg.materialize()
        return self._root_tensor

    @property
    def num_blocks(self) -> tuple[int, ...]:
        """:math:`k_j` of every partition."""
        return tuple(p.num_blocks for p in self.partitions)

    @property
    def rank(self) -> int:
        """:math:`m`, the number of columns of the low-rank root (0 without one)."""
        return 0 if self._root_arg is None else self._root_arg.shape[-1]

    @property
    def capacitance_size(self) -> int:
        """:math:`q = \\sum_j k_j + m`."""
        return sum(self.num_blocks) + self.rank

    def _set_requires_grad(self, val: bool) -> None:
        """``requires_grad`` of ``d``, the ``B_j`` and the root (``requires_grad_``), and every stored result dropped:
        one computed without gradients is kept for good and has no graph (see :meth:`_keep`)."""
        super()._set_requires_grad(val)
        clear_cache_hook(self)  # linear_operator's cache (results of @cached, add_to_cache)
        self._store.clear()
        self._graphless.clear()
        self._scoped_names.clear()
        self._dense_blocks = [None if f else B for B, f in zip(self._block_args, self.diagonal_blocks)]

    def detach(self) -> BlockMeanSumLinearOperator:
        """The same sum out of the graph: every tensor it was given detached, the row weights included
        (linear_operator's ``detach`` reaches the arguments that have a ``detach`` only, and the weights come as a
        tuple: a task kernel's Cholesky rows kept their graph in a prediction's held training covariance, so that
        the second ``backward`` through a prediction of ``(GroupKernel + GroupKernel) * IndexKernel`` failed and
        the task kernel's gradients under ``detach_test_caches`` leaked through it)."""

        def cut(value):
            if isinstance(value, (tuple, list)):
                return type(value)(cut(v) for v in value)
            return value.detach() if hasattr(value, "detach") else value

        return self.__class__(*(cut(a) for a in self._args), **{k: cut(v) for k, v in self._kwargs.items()})

    def detach_(self) -> BlockMeanSumLinearOperator:
        """In place, as linear_operator's: the tensors it was given are detached, and the sum holds no graph after.

        The sum keeps ``d``, the ``B_j`` and the root broadcast to one batch shape (expanded views, which torch
        cannot detach in place); those are replaced by detached ones, and every stored result is dropped."""
        for t in (*self._args, *self._kwargs.values()):
            if torch.is_tensor(t) and not t._is_view():
                t.detach_()
        fresh = self.detach()
        self.__dict__.update(fresh.__dict__)
        return self

    def _differentiable(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in self.representation())

    def _cached(self, name: str) -> bool:
        """Whether ``name`` is cached and usable now: a value computed under ``no_grad`` from tensors that require
        gradients has no graph, so it is not used by a call with gradients."""
        return name in self._store and not (name in self._graphless and self._differentiable())

    def _keep(self, name: str, value) -> None:
        """Store ``value``: with gradients only until the outermost public call returns (see :func:`_scoped`; a
        cached graph cannot be backpropagated twice), and never outside one; without, for good, marked
        graph-less when the operator's tensors require gradients."""
        if self._differentiable():
            if self._depth:
                self._store[name] = value
                self._scoped_names.add(name)
                self._graphless.discard(name)
            return
        self._store[name] = value
        if any(t.requires_grad for t in self.representation()):
            self._graphless.add(name)
        else:
            self._graphless.discard(name)

    def _memo(self, name: str, fn):
        """Cache ``fn()`` (see :meth:`_keep` and :meth:`_cached`). A value computed with
        :class:`bma_gp.settings.validate` off skipped its checks (a singular capacitance is not refused), so
        it is kept apart and used only while validation stays off (a checked value serves both)."""
        if self._cached(name):
            return self._store[name]
        if not self._validating():
            name = f"{name} (unvalidated)"
            if self._cached(name):
                return self._store[name]
        value = fn()
        self._keep(name, value)
        return value

    def _new(self, diag: Tensor | None = None, blocks=None, partitions=None, root=..., weights=None):
        """A sum like this one with some parts replaced (``blocks``: in argument form, diagonals where
        :attr:`diagonal_blocks` says so)."""
        return BlockMeanSumLinearOperator(
            self.diag_values if diag is None else diag,
            *(self._block_args if blocks is None else blocks),
            partitions=self.partitions if partitions is None else partitions,
            root=self._root_arg if root is ... else root,
            weights=self.weights if weights is None else weights,
            diagonal=self.diagonal_blocks,
        )

    def _weighted(self, j: int, x: Tensor, dim: int) -> Tensor:
        w = self.weights[j]
        if w is None:
            return x
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * w.view(shape)

    def _not_positive_definite(self, message: str, rounding: bool = True) -> ValueError:
        """The error for a factorisation that found the sum not positive definite: ``message``, unless an input
        holds inf or nan, which reaches the capacitance the same way and is named instead (only looked at here,
        on the failure path). With ``rounding`` (a failure that rounding can cause) a float32 sum's message
        says that it may be too ill-conditioned for single precision."""
        nonfinite = self._nonfinite_input()
        if nonfinite is not None:
            return nonfinite
        if rounding and core_dtype(self.dtype) != self.dtype:  # U's own rounding (lazy roots), or fast_root_products
            message += (
                f" In {self.dtype} this can also be rounding in a positive definite sum that is too ill-conditioned "
                "for single precision (a diagonal d tiny against the block matrices, nearly collinear root columns): "
                "compute in float64 (.double()) or add a larger diagonal."
            )
        return NotPositiveDefiniteError(message)

    def _check_finite_input(self) -> None:
        """With validation on, the ``ValueError`` of :meth:`_nonfinite_input` (the roots' eigendecompositions would
        fail with torch's ``LinAlgError`` on a non-finite ``B_j``, root or weight instead)."""
        if self._validating():
            error = self._nonfinite_input()
            if error is not None:
                raise error

    def _nonfinite_input(self) -> ValueError | None:
        """The error naming the first inf or nan of the block matrices, the root or the weights; None if all are
        finite (looked at on failure paths only)."""
        inputs = [(f"blocks[{j}]", B) for j, B in enumerate(self._block_args)]
        if isinstance(self._root_arg, Tensor):
            inputs.append(("the root U", self._root_arg))
        inputs += [(f"weights[{j}]", w) for j, w in enumerate(self.weights) if w is not None]
        for name, value in inputs:
            bad = ~torch.isfinite(value.detach())
            if bool(bad.any()):
                index = tuple(int(i) for i in bad.nonzero()[0])
                return ValueError(
                    f"the sum's input is not finite: {name}{list(index)} = {float(value[index])}. The block "
                    "matrices, the root and the weights must be finite; check the kernel hyperparameters or the data "
                    "that produced them."
                )
        return None

    def representation(self) -> tuple[Tensor, ...]:
        """linear_operator's representation (``diag``, the blocks, a tensor root) and the slopes' row weights: the
        generic autograd functions (``Matmul``, ``InvQuadLogdet``, ... of a linear_operator sum holding this one)
        differentiate the representation only, and a weight held as a plain keyword argument lost its gradient
        (a random slope's covariate at test points, under a sum with an exact kernel)."""
        return (*super().representation(), *(w for w in self.weights if w is not None))

    def representation_tree(self) -> _SumRepresentationTree:
        return _SumRepresentationTree(self)

    def _describe(self) -> str:
        parts = ", ".join(f"k_{j + 1} = {k}" for j, k in enumerate(self.num_blocks))
        return f"{parts}{', ' if parts else ''}m = {self.rank}"

    # ------------------------------------------------------------------ required hooks
    def _size(self) -> torch.Size:
        n = self.diag_values.shape[-1]
        return torch.Size((*self.diag_values.shape[:-1], n, n))

    def _transpose_nonbatch(self) -> BlockMeanSumLinearOperator:
        return self

    def _expand_batch(self, batch_shape) -> BlockMeanSumLinearOperator:
        n = self.diag_values.shape[-1]
        return self._new(
            diag=self.diag_values.expand(*batch_shape, n),
            blocks=[
                B.expand(*batch_shape, *B.shape[B.dim() - self._trail(j) :]) for j, B in enumerate(self._block_args)
            ],
            root=None if self.root is None else self.root.expand(*batch_shape, *self.root.shape[-2:]),
        )

    def repeat(self, *sizes) -> LinearOperator:
        """Batch copies (``sizes`` ending in ``1, 1``): the sum of the repeated ``d``, ``B_j`` and root, closed form
        again (linear_operator's ``BatchRepeatLinearOperator`` solves through a dense Cholesky factor)."""
        rep = batch_repeat(self, sizes)
        if rep is None:
            return super().repeat(*sizes)
        return self._map_batch(lambda t, trail: t.repeat(*rep, *([1] * trail)))

    def _map_batch(self, fn) -> BlockMeanSumLinearOperator:
        """Apply ``fn(tensor, trailing_dims)`` to the batch dimensions of every tensor (the root included)."""
        return self._new(
            diag=fn(self.diag_values, 1),
            blocks=[fn(B, self._trail(j)) for j, B in enumerate(self._block_args)],
            root=None if self.root is None else fn(self.root, 2),
        )

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        full = slice(None, None, None)
        if _is_full(row_index) and _is_full(col_index):  # only batch indexing: stays in the family
            return self._map_batch(lambda t, trail: t[(*batch_indices, *([full] * trail))])
        if isinstance(row_index, slice) and row_index == col_index:  # a principal submatrix is again in the family
            op = self._map_batch(lambda t, trail: t[(*batch_indices, *([full] * trail))]) if batch_indices else self
            if not len(range(*row_index.indices(self.shape[-1]))):  # no points: the 0 x 0 matrix
                from bma_gp._composition import empty_principal

                return empty_principal(self, op.batch_shape)
            return op._principal(row_index)
        from bma_gp._composition import indexed_fallback

        return indexed_fallback(self, row_index, col_index, *batch_indices)

    def _principal(self, index: slice | Tensor) -> BlockMeanSumLinearOperator:
        """The principal submatrix over the points ``index``: ``d``, the labels, the weights and the root's rows
        restricted, every block matrix to the blocks those points touch."""
        partitions, blocks = [], []
        for j, (part, B) in enumerate(zip(self.partitions, self._block_args)):
            kept, labels = torch.unique(part.labels[index], return_inverse=True)
            partitions.append(Partition(labels, num_blocks=kept.numel()))
            blocks.append(B.index_select(-1, kept) if self.diagonal_blocks[j] else B[..., kept, :][..., kept])
        root = None if self.root is None else self.root[..., index, :]
        weights = [None if w is None else w[..., index] for w in self.weights]
        return self._new(self.diag_values[..., index], blocks, partitions, root, weights)

    def _sum_batch(self, dim: int) -> BlockMeanSumLinearOperator:
        """The sum over batch dimension ``dim``: again a sum over the same partitions and weights, with ``d`` and
        every ``B_j`` summed and the roots side by side (``sum_b U_b U_b^T = [U_1, ..., U_b] [U_1, ..., U_b]^T``;
        linear_operator's ``SumBatchLinearOperator`` solved it with CG and Lanczos)."""
        full = self._expand_batch(self.batch_shape)  # every tensor with the whole batch shape (views)
        root = full.root
        if root is not None:  # (*batch, n, m) -> (*other batch, n, b m): the batch entries' columns side by side
            root = root.movedim(dim, -2).flatten(-2)
        return self._new(
            diag=full.diag_values.sum(dim),
            blocks=[B.sum(dim) for B in full._block_args],
            root=root,
        )

    def _prod_batch(self, dim: int) -> LinearOperator:
        """The elementwise product over batch dimension ``dim``: the batch entries multiplied with ``*``, which has no
        closed form and says so (linear_operator's multiplied their roots without a word)."""
        full = self._expand_batch(self.batch_shape)
        entries = [full._map_batch(lambda t, trail, i=i: t.select(dim, i)) for i in range(self.batch_shape[dim])]
        res: LinearOperator = entries[0]
        for entry in entries[1:]:
            res = res * entry
        return res

    def _unsqueeze_batch(self, dim: int) -> BlockMeanSumLinearOperator:
        return self._map_batch(lambda t, trail: t.unsqueeze(dim))

    def _permute_batch(self, *dims: int) -> BlockMeanSumLinearOperator:
        return self._map_batch(lambda t, trail: t.permute(*dims, *range(len(dims), t.dim())))

    def _matmul(self, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 1
        if vector:
            rhs = rhs.unsqueeze(-1)
        res = self.diag_values.unsqueeze(-1) * rhs
        for j, (part, B) in enumerate(zip(self.partitions, self._block_args)):
            sums = part.block_sum(self._weighted(j, rhs, -2), dim=-2)
            coef = B.unsqueeze(-1) * sums if self.diagonal_blocks[j] else 0.5 * (B @ sums + B.mT @ sums)
            res = res + self._weighted(j, part.expand(coef, dim=-2), -2)
        if self.root is not None:
            res = res + self.root @ (self.root.mT @ rhs)
        return res.squeeze(-1) if vector else res

    def matmul(self, other):
        if torch.is_tensor(other):
            check_rhs_dtype(other, "other", self.dtype)
            _matmul_broadcast_shape(self.shape, other.shape)
            return self._matmul(other)  # plain torch operations: autograd reaches every tensor
        return super().matmul(other)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._matmul(rhs)

    def _diagonal(self) -> Tensor:
        res = self.diag_values
        for j, (part, B) in enumerate(zip(self.partitions, self._block_args)):
            d = part.expand(B if self.diagonal_blocks[j] else torch.diagonal(B, dim1=-2, dim2=-1), dim=-1)
            w = self.weights[j]
            res = res + (d if w is None else d * w * w)
        if self.root is not None:
            res = res + self.root.pow(2).sum(-1)
        return res

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        res = torch.where(
            row_index == col_index,
            self.diag_values[(*batch_indices, row_index)],
            torch.zeros((), dtype=self.dtype, device=self.device),
        )
        for j, (part, B) in enumerate(zip(self.partitions, self._block_args)):
            rows, cols = part.labels[row_index], part.labels[col_index]
            if self.diagonal_blocks[j]:
                value = torch.where(rows == cols, B[(*batch_indices, rows)], B.new_zeros(()))
            else:
                value = 0.5 * (B[(*batch_indices, rows, cols)] + B[(*batch_indices, cols, rows)])
            w = self.weights[j]
            res = res + (value if w is None else value * w[row_index] * w[col_index])
        if self.root is not None:
            U = self.root
            res = res + (U[(*batch_indices, row_index)] * U[(*batch_indices, col_index)]).sum(-1)
        return res

    def to_dense(self) -> Tensor:
        n = self.shape[-1]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        return self._matmul(eye.expand(*self.batch_shape, n, n))

    # ------------------------------------------------------------------ sums keep the type
    def add_diagonal(self, diag: Tensor) -> BlockMeanSumLinearOperator:
        """Add a scalar, one value per batch entry ``(*batch, 1)`` or a full diagonal ``(*batch, n)``, cast to the
        operator's dtype and device (as linear_operator's ``add_diagonal`` keeps the operator's dtype; a complex
        ``diag`` raises ``TypeError``, since the cast would drop its imaginary part)."""
        if not torch.is_tensor(diag):
            diag = torch.tensor(diag, dtype=self.dtype, device=self.device)
        check_real(diag, "diag")
        diag = diag.to(dtype=self.dtype, device=self.device)
        try:
            new = self.diag_values + diag
        except RuntimeError:
            raise ValueError(
                f"add_diagonal: a diagonal of shape {tuple(diag.shape)} does not broadcast against "
                f"the operator's diagonal of shape {tuple(self.diag_values.shape)}."
            ) from None
        return self._new(diag=new)

    def __add__(self, other):
        from bma_gp._composition import add_structured, adds_exactly, fallback_sum

        if adds_exactly(other):  # a predictive covariance: its exact sum (the sum commutes)
            return other.__add__(self)
        if not isinstance(other, LinearOperator):
            constant = self._constant_term(other)
            if constant is not None:
                return self + constant
        res = add_structured(self, other)
        if res is None:
            res = fallback_sum(self, other)
        return res if res is not None else super().__add__(other)

    def __radd__(self, other):
        return self.__add__(other)

    def __rsub__(self, other):
        # c - S = -(S - c): the sum with the constant term, times -1 (linear_operator's ``self.mul(-1) + other`` adds a
        # number to a negative multiple, which its SumLinearOperator refuses)
        if _is_number(other) or (torch.is_tensor(other) and self._constant_term(other) is not None):
            return (self - other).mul(-1)
        return super().__rsub__(other)

    def __sub__(self, other):
        # linear_operator's __sub__ is ``self + other.mul(-1)``, which a Python number has not (AttributeError)
        return self + (-other) if _is_number(other) else super().__sub__(other)

    def __neg__(self):
        return self.mul(-1)

    def _constant_term(self, c) -> BlockMeanLinearOperator | None:
        """``c 1 1^T`` for a number or a tensor of shape ``()``, ``(1,)`` or ``(*batch, 1, 1)`` (added to every entry,
        as for a dense tensor, and as ``M + c`` adds it to a single operator's ``B``): a block mean operator over one
        block of all ``n`` points, ``lam = 0`` and ``B = c``, a term of rank one that the sum takes in closed form.
        ``None`` for anything else (linear_operator's path)."""
        if not (_is_number(c) or torch.is_tensor(c)):
            return None
        zero = BlockMeanLinearOperator(
            torch.zeros(1, dtype=self.dtype, device=self.device),
            torch.zeros(1, dtype=self.dtype, device=self.device),
            Partition._whole(self.shape[-1], self.device),
            diagonal=True,
        )
        return zero._add_constant(c)

    def _mul_matrix(self, other) -> LinearOperator:
        """The elementwise product with a matrix: no closed form (a sum of block mean matrices times another matrix is
        not in the family). linear_operator's ``MulLinearOperator`` forms this sum's root densely, ``n x (n + q)``:
        it proceeds with a :class:`~bma_gp.ClosedFormFallbackWarning` that says so."""
        from linear_operator.operators import DiagLinearOperator

        if isinstance(other, DiagLinearOperator):  # S o diag(d) = diag(diag(S) d), as linear_operator's diag o S
            return times_diagonal(self, other)
        constants = batch_constants(other)
        if constants is not None:  # one constant per batch entry (a batch ScaleKernel around an unbatched kernel)
            return self._mul_constant(constants)
        from linear_operator.operators import ConstantMulLinearOperator

        if type(other) is ConstantMulLinearOperator and as_block_mean_factor(other.base_linear_op) is not None:
            # S o (c X) = c (S o X): a negative c makes the generic multiple (a FallbackScaledLinearOperator), c = 0
            # the zero sum, where taken into X it left no root of C (a ScaleKernel's output, usually c > 0)
            return self._mul_matrix(other.base_linear_op)._mul_constant(other._constant)
        factor = as_block_mean_factor(other)
        if factor is not None and factor.shape[-1] == self.shape[-1]:
            res = self._hadamard_block_mean(factor)
            if res is not None:
                return res
        from bma_gp._composition import _dense_elementwise

        return _dense_elementwise(self, other)  # exact entries (linear_operator's product went through roots)

    def _hadamard_block_mean(self, X: BlockMeanLinearOperator) -> BlockMeanSumLinearOperator | None:
        r""":math:`S \circ X` for a symmetric block mean operator :math:`X = P_X C P_X^\top +
        \operatorname{diag}(P_X \lambda_X)` over the same points (a task kernel, ``IndexKernel(i)``, another grouping or
        a ``BlockMeanKernel``): the elementwise product distributes over the sum's terms, and each is in the family.

        * :math:`D \circ X = \operatorname{diag}(d \cdot \operatorname{diag}(X))`.
        * A term :math:`W_j P_j B_j P_j^\top W_j` times :math:`X`: with :math:`B_j` diagonal and :math:`C = L L^\top`
          (Cholesky, unbatched), :math:`\sum_\rho W_j \Lambda_\rho P_j B_j P_j^\top \Lambda_\rho W_j` with
          :math:`\Lambda_\rho = \operatorname{diag}(L_{x_a \rho})`: ``k_X`` diagonal terms over the same grouping,
          which the capacitance eliminates together as it does a random intercept and slope; otherwise one block mean
          term over the intersection of the partitions (:meth:`BlockMeanLinearOperator._hadamard_across`), ``k_j
          k_X`` levels at most (also for a diagonal term where ``C`` is batched or has too many blocks,
          :func:`hadamard_plan`). Their products with
          :math:`\operatorname{diag}(P_X \lambda_X)` join the diagonal.
        * The root: :math:`U U^\top \circ P_X L L^\top P_X^\top = R R^\top` with :math:`R_{a, (i, \rho)} = U_{ai}
          L_{x_a \rho}`, rank ``m k_X``, and :math:`\operatorname{diag}(\|U_a\|^2 \lambda_{X, x_a})`.

        ``None`` (the caller's dense product, with its warning) for a non-symmetric ``X``, or a root with a
        :math:`C` that is not positive definite."""
        plan = hadamard_plan(self, X)
        if plan is None:
            return None
        L, as_weights = plan
        labels_x = X.partition.labels
        lam_x = X.lam.index_select(-1, labels_x)  # (*b_x, n)
        diag = self.diag_values * X.diagonal()
        blocks: list[Tensor] = []
        partitions: list[Partition] = []
        weights: list[Tensor | None] = []
        flags: list[bool] = []
        for B, partition, w, flag in zip(self._block_args, self.partitions, self.weights, self.diagonal_blocks):
            if not flag and B.shape[-1] == 1:  # a one-block term (a constant) is diagonal: k_X weighted terms too
                B, flag = B[..., 0], True
            if flag and as_weights:
                assert L is not None
                extra = B.index_select(-1, partition.labels) * lam_x
                diag = diag + (extra if w is None else extra * w.pow(2))
                for rho in range(L.shape[-1]):
                    blocks.append(B)
                    partitions.append(partition)
                    weights.append(task_weight(L, labels_x, rho, w))
                    flags.append(True)
                continue
            term = BlockMeanLinearOperator(B.new_zeros(B.shape[: -1 if flag else -2] + B.shape[-1:]), B, partition,
                                           diagonal=flag)  # fmt: skip
            product = term._mul_matrix(X)
            assert isinstance(product, BlockMeanLinearOperator)
            extra = product.lam.index_select(-1, product.partition.labels)
            diag = diag + (extra if w is None else extra * w.pow(2))
            blocks.append(product._b_vector() if product.is_diagonal_mode else product.B)
            partitions.append(product.partition)
            weights.append(w)
            flags.append(product.is_diagonal_mode)
        root = None
        if self.root is not None:
            assert L is not None
            U = self.root
            root = rows_times_root(U, L.index_select(-2, labels_x))
            diag = diag + U.pow(2).sum(-1) * lam_x
        return BlockMeanSumLinearOperator(
            diag, *blocks, partitions=partitions, root=root, weights=weights, diagonal=flags
        )

    def _mul_constant(self, other):
        if torch.is_tensor(other) and other.dim() > 0:
            c = other
        else:
            c = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        if bool((c < 0).any()):  # U U^T cannot carry a negative factor: the generic multiple, which warns on solves
            from bma_gp._composition import FallbackScaledLinearOperator

            return FallbackScaledLinearOperator(self, other)
        scale = c.unsqueeze(-1) if c.dim() else c
        return self._new(
            diag=self.diag_values * scale,
            blocks=[
                B * (scale if self.diagonal_blocks[j] else scale.unsqueeze(-1)) for j, B in enumerate(self._block_args)
            ],
            root=None if self.root is None else self.root * scale.sqrt().unsqueeze(-1),
        )

    # ------------------------------------------------------------------ the Gram matrix A = Z^T D^{-1} Z
    def _check_diag(self, what: str) -> None:
        if not self._validating():
            return
        d = self.diag_values
        bad = ~(d > 0)
        found = _first_bad(bad)
        if found is not None:
            batch, index = found
            value = float(d.detach()[batch][index])
            if math.isfinite(value) and value < 0:  # a difference or a negative multiple of operators
                advice = (
                    "d is the sum of the noise (add_diagonal, the likelihood) and the block mean operators' lam "
                    "spread over their blocks, so a negative multiple or a difference of operators (-M + D, M - N) "
                    "can make it negative; the closed forms of a sum work through D^-1 and need every d > 0 (also "
                    "for an invertible sum that is not definite). Add a diagonal large enough, or solve such a "
                    "matrix densely (torch.linalg.solve(S.to_dense(), b))."
                )
            elif math.isfinite(value):
                advice = "Add noise (add_diagonal) or check the likelihood's noise."
            else:  # d collects the noise and every block mean operator's lam
                advice = (
                    "d is the sum of the noise (add_diagonal, the likelihood) and the block mean operators' lam "
                    "spread over their blocks: check those for inf/nan (the kernel hyperparameters or the data)."
                )
            kind = "not finite" if not math.isfinite(value) else "<= 0"
            raise ValueError(
                f"{what} needs a positive per-point diagonal d, but d[{index}] = {value:.6g}{_where(batch)} is {kind}. "
                f"{advice}"
            )

    def _gram(self) -> tuple[list[Tensor], _Contingencies]:
        """``(a, A)``: the diagonal of every partition's own block of :math:`Z^\\top D^{-1} Z` and the other
        blocks ``A[i, j]`` (``i < j``; index ``J`` is the root), in the working precision."""
        return self._memo("gram", self._compute_gram)

    def _compute_gram(self, extra: Tensor | None = None):
        wdt = core_dtype(self.dtype)
        dinv = self._working_diag().reciprocal()
        J = len(self.partitions)
        w = [None if x is None else x.to(wdt) for x in self.weights]
        a = [p.block_sum(dinv if wj is None else dinv * wj * wj, dim=-1) for wj, p in zip(w, self.partitions)]
        blocks = _Contingencies(self.partitions, dinv, w)  # two partitions' table: formed when first asked for
        root_t_extra = None
        if self._root_arg is not None:
            cross, gram, root_t_extra = self._root_gram(dinv, w, extra)
            for j in range(J):
                blocks[j, J] = cross[j]
            blocks[J, J] = gram
        return (a, blocks) if extra is None else (a, blocks, root_t_extra)

    def _root_gram(self, dinv: Tensor, w: list[Tensor | None], extra: Tensor | None):
        r""":math:`P_j^\top W_j D^{-1} U` for every partition, :math:`U^\top D^{-1} U` and (with ``extra``)
        :math:`U^\top x`, in one pass over row chunks: products in the root's precision, sums over chunks in
        the working precision, and a backward pass that needs one product with :math:`U`, writes one gradient
        buffer and keeps no ``n x m`` temporaries from the forward."""
        if any(wj is not None and ((torch.is_grad_enabled() and wj.requires_grad) or carries_tangent(wj)) for wj in w):
            # row weights with derivatives (a task factor's Cholesky rows, times a sum with a root; a slope covariate
            # that requires grad): the one-pass function takes the weights as constants, so the same products in
            # plain torch operations, which differentiate everything at the cost of an n x m buffer kept for backward
            U = self.root
            assert U is not None
            U = U.to(dinv.dtype)
            DU = dinv.unsqueeze(-1) * U
            cross = [self._weighted_root_sums(p, dinv, wj, U, DU) for wj, p in zip(w, self.partitions)]
            root_t = None if extra is None else U.mT @ extra.to(U.dtype)
            return cross, U.mT @ DU, root_t
        x = extra if extra is not None else dinv.new_zeros(*dinv.shape, 0)
        lazy = self._root_arg
        if isinstance(lazy, LazyRoot) and self._root_tensor is None:
            labels = [p.labels for p in self.partitions]
            gram, root_t, cross = lazy.weighted_products(
                self.diag_values, dinv, x, labels, [p.num_blocks for p in self.partitions], w
            )
            return cross, gram, (root_t if extra is not None else None)
        out = _RootGram.apply(
            self.root,
            dinv,
            x,
            tuple(p.labels for p in self.partitions),
            tuple(p.num_blocks for p in self.partitions),
            tuple(w),
            not settings.fast_root_products.on(),
        )
        return list(out[2:]), out[0], (out[1] if extra is not None else None)

    @staticmethod
    def _weighted_root_sums(p: Partition, dinv: Tensor, wj: Tensor | None, U: Tensor, DU: Tensor) -> Tensor:
        r""":math:`P^\top W D^{-1} U` with derivatives (:meth:`_root_gram`). A weight that needs them goes through the
        sparse product of :func:`_cells_matmul` (one cell per point), which keeps the ``n`` weights and ``U`` for
        backward: the block sums of ``DU * w`` kept an ``n x m`` tensor per weighted term (``index_add``'s backward
        holds its source), ``k_X`` of them per grouping for a task factor (a user trial: 2.33 against 0.73 GB at
        n = 20,000 with 16 tasks)."""
        if wj is None or U.dim() != 2 or wj.dim() != 1 or dinv.dim() != 1:
            return p.block_sum(DU if wj is None else DU * wj.unsqueeze(-1), dim=-2)
        n = U.shape[0]
        cells = _Cells.build(p, Partition.from_labels(torch.arange(n, device=U.device), num_blocks=n))
        return _cells_matmul(cells, (dinv * wj).to(U.dtype), U, p.num_blocks)

    # ------------------------------------------------------------------ the capacitance
    def _block_is_diagonal(self, j: int) -> bool:
        """A diagonal ``B_j`` is eliminated first. With gradients, only when its off-diagonal entries are zero by
        construction (``diag_embed``, a diagonal mask): a leaf that is diagonal by value still needs the
        gradient of its off-diagonal entries, which the elimination does not produce. A forward-mode tangent (a dual
        tensor, which reports ``requires_grad=False``) must be diagonal by value too; a ``torch.func.jacfwd`` input
        is not eliminated."""

        def decide() -> bool:
            if self.diagonal_blocks[j]:
                return True
            B = self._dense_block(j)
            if not _is_diagonal(B):
                return False
            # the value is diagonal: constant terms (diag_embed(b) + c I) are fine
            if not tracks_derivatives(B):
                return True
            if (B.requires_grad or functorch_wrapped(B)) and not _structurally_diagonal(B.grad_fn, constants=True):
                return False
            # a forward-mode tangent (a dual tensor, requires_grad=False) is not shown by the graph: its value decides
            # (a jacfwd input's batch of directions is not eliminated)
            return not has_forward_tangent(B) or diagonal_tangent(B)

        return self._memo(f"diagonal_{j}", decide)

    def _block_diagonal(self, j: int) -> Tensor:
        """The diagonal of ``B_j``, taken once per public call: each ``torch.diagonal`` of a ``k x k`` leaf costs a
        zero-filled ``k x k`` gradient in the backward pass."""
        if self.diagonal_blocks[j]:
            return self._block_args[j]
        return self._memo(f"block_diagonal_{j}", lambda: torch.diagonal(self._dense_block(j), dim1=-2, dim2=-1))

    def _working_diag(self) -> Tensor:
        """The diagonal :math:`d` in the working precision, cast once per public call (see :meth:`_memo`): every
        path of one call then meets in one cast, so that their gradients (terms of size :math:`b_a^2 / d_a^2` that
        cancel to :math:`(M^{-1} b)_a^2`) are summed in the working precision before they are rounded to a float32
        ``d``'s. # shape: (*batch, n)"""
        return self._memo("working_diag", lambda: self.diag_values.to(core_dtype(self.dtype)))

    def _working_block_diagonal(self, j: int) -> Tensor:
        """:meth:`_block_diagonal` in the working precision, cast once per public call (as :meth:`_working_diag`)."""
        return self._memo(f"working_block_diagonal_{j}", lambda: self._block_diagonal(j).to(core_dtype(self.dtype)))

    def _G(self, j: int, x: Tensor) -> Tensor:
        """:math:`G_j x` in the working precision (``j == J``: the identity of the root)."""
        if j == len(self._block_args):
            return x
        if self._block_is_diagonal(j):  # the diagonal first: no k x k copy in the working precision
            return self._working_block_diagonal(j).to(x.dtype).unsqueeze(-1) * x
        # one product (k <= the columns of x wherever it matters) with the symmetric part, formed once per public
        # call: a solve applies G_j three to five times
        return self._symmetric_block(j, x.dtype) @ x

    def _symmetric_block(self, j: int, dtype: torch.dtype) -> Tensor:
        """:math:`(B_j + B_j^\\top) / 2` in ``dtype`` (see :meth:`_memo`)."""

        def form() -> Tensor:
            B = self._dense_block(j).to(dtype)
            return 0.5 * (B + B.mT)

        return self._memo(f"symmetric_block_{j}_{dtype}", form)

    def _sizes(self) -> list[int]:
        return [*self.num_blocks, *([self.rank] if self._root_arg is not None else [])]

    def _A_block(self, i: int, j: int) -> Tensor:
        a, blocks = self._gram()
        if i == j and i < len(self.partitions):
            return torch.diag_embed(a[i])
        return blocks[i, j] if i <= j else blocks[j, i].mT

    def _capacitance(self, definite: bool = True) -> _Capacitance:
        """The factorised capacitance. With ``definite`` (log-determinants, GP training and prediction) a sum that
        validation found not positive definite raises its ``ValueError``; ``solve`` and ``inv_quad`` pass False:
        like a single block mean operator's, they need an invertible sum only (a singular one raises either way)."""
        cap = self._memo("capacitance", self._factorise)
        if definite and cap.not_definite is not None and self._validating():  # a checked one serves both
            raise type(cap.not_definite)(*cap.not_definite.args)
        return cap

    def _elimination_terms(self) -> list[int]:
        """The terms the capacitance eliminates first: every diagonal term over the partition whose diagonal terms
        have the most columns in all (the largest diagonal grouping; with a correlated random slope, its
        intercept, slope and correlation terms together); ``[]`` without a diagonal term. With validation on, or on
        CPU, only groupings without negative directions of their own (:meth:`_grouping_negative`)."""
        return self._elimination_decision()[0]

    def _elimination_decision(self) -> tuple[list[int], ValueError | None]:
        """:meth:`_elimination_terms`, and with validation on the error for a sum of diagonal terms over one grouping
        that has negative directions (nothing else in the sum to make up for them: it is not positive definite)."""

        def decide() -> tuple[list[int], ValueError | None]:
            groups: list[list[int]] = []
            for j in range(len(self.partitions)):
                if not self._block_is_diagonal(j):
                    continue
                for group in groups:
                    if self.partitions[group[0]].same_as(self.partitions[j]):
                        group.append(j)
                        break
                else:
                    groups.append([j])
            refusal = None
            if self._reads_back():  # eliminate only groupings whose part D' of the sum is positive definite
                negative = [self._grouping_negative(group) for group in groups]
                refuse = self._validating() and len(groups) == 1 and len(groups[0]) == len(self._sizes())
                if refuse and negative[0] is not None:
                    names = [f"blocks[{e}]" for e in groups[0] if bool((self._block_diagonal(e) < 0).any())]
                    count = int(negative[0].max())  # nothing else in the sum to make up for them
                    refusal = self._not_positive_definite(
                        f"the sum ({self._describe()}) is not positive definite: {', '.join(names)} "
                        f"{'has' if len(names) == 1 else 'have'} a negative diagonal entry large enough to make it "
                        f"indefinite ({count} negative eigenvalue{'s' if count > 1 else ''}). Check the block "
                        "matrices.",
                        rounding=False,
                    )
                groups = [group for group, neg in zip(groups, negative) if neg is None]
            if not groups:
                return [], refusal
            return max(groups, key=lambda group: len(group) * self.num_blocks[group[0]]), refusal  # first on ties

        return self._memo("elimination_terms", decide)

    def _grouping_negative(self, group: list[int]) -> Tensor | None:
        r"""The number of negative eigenvalues of the part :math:`D' = D + \sum_{e} P_e G_e P_e^\top` of the sum
        that the diagonal terms ``group`` over one grouping make (per batch entry), or None when it has none (always
        where every :math:`g_e \geq 0`). Such a grouping is not eliminated first: its block of the capacitance has a
        negative eigenvalue at some level, its log-determinant is no sum of logarithms, and yet the sum can be
        positive definite (other terms over the grouping make up for it), so its terms stay in the LU with the
        others. Without validation on an accelerator (no host synchronisation) it is eliminated: the log-determinant
        multiplies the signs of its levels' determinants with the rest's, as ``torch.logdet`` of the dense matrix
        would, but a level whose block is singular (``1 + g a = 0``) makes the solve and the log-determinant NaN or
        ``-inf``, and one close to it costs accuracy."""
        wdt = core_dtype(self.dtype)
        g = torch.stack([self._block_diagonal(e).detach().to(wdt) for e in group], -1)  # (*b, k, r_e)
        if not bool((g < 0).any()):
            return None
        A_EE = torch.stack([torch.stack([self._level_gram(i, j).detach() for j in group], -1) for i in group], -2)
        return self._level_negative_directions(g, A_EE)

    def _validating(self) -> bool:
        """:class:`bma_gp.settings.validate`, except for a meta operator (shape-only evaluation: no values to read
        back, where the checks raised torch's "Tensor.item() cannot be called on meta tensors")."""
        return settings.validate.on() and self.diag_values.device.type != "meta"

    def _reads_back(self) -> bool:
        """Whether values may be read back to the host: with validation on, or on CPU (nothing to synchronise); never
        on the meta device, which holds none (shape-only evaluation)."""
        return self.device.type != "meta" and (settings.validate.on() or self.device.type == "cpu")

    def _elimination_term(self) -> int | None:
        """The first of :meth:`_elimination_terms` (its partition is the eliminated grouping), or None."""
        terms = self._elimination_terms()
        return terms[0] if terms else None

    def _level_gram(self, i: int, j: int) -> Tensor:
        r""":math:`P^\top W_i D^{-1} W_j P` for two terms over the same partition: diagonal, returned as its ``k``
        values (the contingency table of a partition with itself would be a ``k x k`` matrix)."""
        a, blocks = self._gram()
        if i == j:
            return a[i]
        i, j = min(i, j), max(i, j)
        return self._memo(
            f"level_gram_{i}_{j}", lambda: self.partitions[i].block_sum(blocks.point_values(i, j), dim=-1)
        )

    def _factorise(self) -> _Capacitance:
        self._check_diag("the closed-form solve / log-determinant")
        sizes = self._sizes()
        eliminated, refusal = self._elimination_decision()
        if refusal is not None and self._nonfinite_input() is not None:  # the refusal names the non-finite input
            raise refusal
        elim = eliminated[0] if eliminated else None
        rest = [t for t in range(len(sizes)) if t not in eliminated]
        r = sum(sizes[t] for t in rest)
        limit = settings.max_capacitance_size.value()
        if r > limit:
            if refusal is not None:  # not positive definite, and too large to solve with: say the first
                raise refusal
            raise ValueError(
                f"the capacitance matrix of this sum has size q = {sum(sizes)} ({self._describe()}); after "
                f"eliminating the largest diagonal grouping, {r} x {r} must be factorised, more than "
                f"bma_gp.settings.max_capacitance_size = {limit}. Raise the limit with "
                f"`with bma_gp.settings.max_capacitance_size({r}):` if the O({r}^3) factorisation fits your machine, "
                "or use fewer levels / a smaller rank."
            )
        if len(eliminated) > 1:
            return self._factorise_joint(eliminated, rest)
        if refusal is not None:  # not eliminated: all its terms are in the LU below
            return replace(self._factorise_single(elim, rest), not_definite=refusal)
        return self._factorise_single(elim, rest)

    def _factorise_single(self, elim: int | None, rest: list[int]) -> _Capacitance:
        """The capacitance with at most one diagonal term ``elim`` eliminated first, the terms ``rest`` in the LU."""
        a, _ = self._gram()
        wdt = core_dtype(self.dtype)
        logdet = torch.zeros(self.batch_shape, dtype=wdt, device=self.device)
        sign = torch.ones_like(logdet)
        delta = g = A_re = None
        if elim is not None:
            g = self._working_block_diagonal(elim)
            # positive with validation on (_grouping_negative); without, a negative entry of g can make some
            # entries negative in a sum that other terms make positive definite: only the product's sign counts
            delta = 1 + g * a[elim]
            logdet = logdet + delta.abs().log().sum(-1)
            sign = sign * delta.sign().prod(-1)
        lu = None
        if rest:
            A_rr = torch.cat([torch.cat([self._A_block(s_, t) for t in rest], dim=-1) for s_ in rest], dim=-2)
            if elim is not None:  # A_rr - A_re diag(g / delta) A_er: one product with the eliminated grouping
                A_re = self._cross_blocks(rest, elim)
                assert g is not None and delta is not None
                A_rr = A_rr - self._schur_correction(rest, elim, A_re, g / delta)
            lu, rest_sign, rest_logdet = self._factorise_rest(A_rr, rest)
            logdet = logdet + rest_logdet
            sign = sign * rest_sign
        not_definite = self._definiteness_error(sign, A_rr if rest else None, rest)
        return _Capacitance(
            elim, delta, g, A_re, lu, logdet, A_tilde=A_rr if rest else None, sign=sign, not_definite=not_definite
        )

    def _definiteness_error(self, sign: Tensor, A_rr: Tensor | None, rest: list[int]) -> ValueError | None:
        """With validation on, the ``ValueError`` for a sum that is not positive definite (a capacitance with a
        non-positive determinant, or an even number of negative eigenvalues: :meth:`_check_inertia`), None
        otherwise. Returned, not raised: ``solve`` and ``inv_quad`` go on with an invertible sum; a non-finite input
        raises here."""
        if not self._validating():
            return None
        error: ValueError | None
        if bool((sign <= 0).any()):
            error = self._not_positive_definite(
                f"the sum ({self._describe()}) is not positive definite: its capacitance matrix has "
                "a non-positive determinant. Check the block matrices and the diagonal."
            )
        else:
            error = self._check_inertia(A_rr, rest)
        if error is not None and self._nonfinite_input() is not None:
            raise error
        return error

    def _factorise_rest(self, A_rr: Tensor, rest: list[int]) -> tuple[tuple | _NestedLU, Tensor, Tensor]:
        r"""Factors of :math:`S = I + G_r A_{rr}` (``A_rr`` with the eliminated terms' correction already
        subtracted), the sign of :math:`\det S` and :math:`\log\lvert\det S\rvert`: the LU factors
        ``(S, LU, pivots)``, or, when the root is among the terms with others, a :class:`_NestedLU` that eliminates
        the root's block first."""
        J = len(self.partitions)
        r = sum(self._sizes()[t] for t in rest)
        if len(rest) > 1 and rest[-1] == J and self._root_arg is not None and 0 < self.rank and r >= NESTED_MIN_SIZE:
            return self._factorise_nested(A_rr, rest)
        return self._factorise_plain(A_rr, rest)

    def _factorise_nested(self, A_rr: Tensor, rest: list[int]) -> tuple[_NestedLU, Tensor, Tensor]:
        r""":math:`S` with the root's block :math:`S_{RR} = I + A_{RR}` (:math:`G_R = I`) eliminated first:
        :math:`\log\det S = \log\det S_{RR} + \log\det S'`, :math:`S' = I + G_1 \hat A`,
        :math:`\hat A = A_{11} - A_{1R} S_{RR}^{-1} A_{R1}` (``r - m`` columns). One ``(r - m)``-sized LU instead
        of an ``r``-sized one: at ``k = 1000``, ``m = 256`` the factorisation, the inverse the log-determinant's
        gradient needs and the products with :math:`B_1` shrink by 2x, 2x and 1.25x for two ``(r - m) x m``
        products more (``2 (r - m) m^2`` and ``(r - m)^2 m`` operations)."""
        m = self.rank
        r1 = A_rr.shape[-1] - m
        # split, not sliced: a slice's backward pass fills a zero r x r gradient per block
        (A11, A1R), (AR1, ARR) = (rows.split([r1, m], dim=-1) for rows in A_rr.split([r1, m], dim=-2))
        S22 = ARR + torch.eye(m, dtype=A_rr.dtype, device=self.device)
        lu22, sign22, logdet22 = self._lu_logdet(S22)
        Y = _LUSolve.apply(*lu22, AR1)  # S_RR^{-1} A_R1
        A_hat = A11 - A1R @ Y
        lu1, sign1, logdet1 = self._factorise_plain(A_hat, rest[:-1])
        nested = _NestedLU(
            lu22,
            Y,
            A1R,
            lu1,
            functools.partial(self._apply_G_rest, rest[:-1]),
            functools.partial(self._factorise_plain, A_rr, rest),
        )
        return nested, sign22 * sign1, logdet22 + logdet1

    def _factorise_plain(self, A_rr: Tensor, rest: list[int]) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, Tensor]:
        r"""LU factors of :math:`S = I + G_r A_{rr}`, the sign of :math:`\det S` and :math:`\log\lvert\det S\rvert`."""
        sizes = self._sizes()
        offsets = [0]
        for t in rest:
            offsets.append(offsets[-1] + sizes[t])
        S = torch.cat([self._G(t, A_rr[..., offsets[i] : offsets[i + 1], :]) for i, t in enumerate(rest)], dim=-2)
        S = S + torch.eye(offsets[-1], dtype=A_rr.dtype, device=self.device)
        return self._lu_logdet(S)

    def _lu_logdet(self, S: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, Tensor]:
        r"""``(S, LU, pivots)``, the sign of :math:`\det S` and :math:`\log\lvert\det S\rvert` (a singular
        :math:`S` is an error when validating; a negative determinant is judged by :meth:`_definiteness_error`)."""
        r = S.shape[-1]
        LU, pivots, info = torch.linalg.lu_factor_ex(S.detach())  # the gradients come from _LUSolve/_LULogAbsDet
        if self._validating() and bool((info > 0).any()):
            raise self._not_positive_definite(
                f"the capacitance matrix of this sum ({self._describe()}) is singular: the sum is "
                "not invertible (nor positive definite). Check the block matrices and the diagonal."
            )
        diag_u = torch.diagonal(LU, dim1=-2, dim2=-1)
        swaps = pivots != torch.arange(1, r + 1, device=pivots.device, dtype=pivots.dtype)
        sign = (1 - 2 * (swaps.sum(-1) % 2)).to(S.dtype) * diag_u.sign().prod(-1)
        logabs = _LULogAbsDet.apply(S, LU, pivots)
        return (S, LU, pivots), sign, logabs

    def _signed_root(self, t: int, wdt: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
        r"""``(P, N)`` with :math:`G_t = P P^\top - N N^\top` (detached, in ``wdt``), the cheap test of
        :meth:`_check_inertia`: ``N`` is None where :math:`B_t` has no negative eigenvalue. Vectors (diagonals) for a
        diagonal :math:`B_t`; for a dense one the Cholesky factor ``P`` where :math:`B_t` is positive definite, and
        where it is not, ``P`` that of :math:`B_t + \sigma I` and ``N`` the diagonal :math:`\sqrt{\sigma}`, with
        :math:`\sigma` just above its most negative eigenvalue (eigenvalues only, no eigenvectors). A positive
        semidefinite :math:`B_t` within rounding gets ``N = None`` and ``P`` from a shift of ``1e3`` times its
        rounding floor, a perturbation that only adds to the sum. ``(None, None)`` (the identity) for the root."""
        if t == len(self.partitions):
            return None, None

        def decide() -> tuple[Tensor, Tensor | None]:
            if self._block_is_diagonal(t):
                g = self._block_diagonal(t).detach().to(wdt)
                return g.clamp_min(0).sqrt(), ((-g).clamp_min(0).sqrt() if bool((g < 0).any()) else None)
            B = self._symmetric_block(t, wdt).detach()
            L, info = torch.linalg.cholesky_ex(B)
            if not bool((info > 0).any()):
                return L, None
            e = torch.linalg.eigvalsh(B)
            floor = rounding_floor(e)
            low = e[..., :1]
            negative = low < -2.5 * floor
            shift = torch.where(negative, -low, torch.zeros_like(low)) + 1e3 * floor  # (*batch, 1)
            eye = torch.eye(B.shape[-1], dtype=wdt, device=B.device)
            L, info = torch.linalg.cholesky_ex(B + shift.unsqueeze(-1) * eye)
            if bool((info > 0).any()):  # B + shift has eigenvalues of ~1e3 floors at least; if not, shift by |B| more
                shift = shift + (info > 0).unsqueeze(-1) * e.abs().amax(-1, keepdim=True)
                L = torch.linalg.cholesky(B + shift.unsqueeze(-1) * eye)
            N = torch.where(negative, shift, torch.zeros_like(shift)).sqrt().expand(*B.shape[:-1])
            return L, (N if bool(negative.any()) else None)

        return self._memo(f"signed_root_{t}_{wdt}", decide)

    def _level_negative_directions(self, g: Tensor, A_EE: Tensor) -> Tensor | None:
        r"""The number of negative eigenvalues of :math:`D' = D + \sum_{e \in E} P_e G_e P_e^\top` (the jointly
        eliminated terms: ``g`` their diagonals, ``A_EE`` their blocks of :math:`Z^\top D^{-1} Z`, level by level)
        per batch entry, or None when it has none. At level :math:`c` they number
        :math:`\operatorname{neg}(J_c) - \operatorname{neg}(H_c)`, :math:`H_c = J_c + |g_c|^{1/2} A_c |g_c|^{1/2}`,
        :math:`J_c = \operatorname{sign}(g_c)` (see :meth:`_check_inertia`); the determinant of
        :math:`I + \operatorname{diag}(g_c) A_c` sees only their parity."""
        g = g.detach()
        negative = g < 0
        if not bool(negative.any()):
            return None
        s = g.abs().sqrt()
        H = s.unsqueeze(-1) * A_EE.detach().to(g.dtype) * s.unsqueeze(-2)
        H = 0.5 * (H + H.mT) + torch.diag_embed(1 - 2 * negative.to(g.dtype))
        count = (negative.sum(-1) - (torch.linalg.eigvalsh(H) < 0).sum(-1)).sum(-1)
        return count if bool((count > 0).any()) else None

    def _check_inertia(self, A_rr: Tensor | None, rest: list[int]) -> ValueError | None:
        r"""With validation on, the ``ValueError`` (returned, not raised) when the sum is not positive definite although
        its capacitance has a positive determinant (an even number of negative eigenvalues: :meth:`_lu_logdet` sees
        only the sign); None otherwise.

        With :math:`D' = D + \sum_e P_e G_e P_e^\top` (the eliminated terms, positive definite:
        :meth:`_grouping_negative`), :math:`\tilde A = Z_r^\top D'^{-1} Z_r` (``A_rr``) and
        :math:`G_r = L J L^\top`, :math:`L = [L_+, L_-]`, :math:`J = \operatorname{diag}(I_p, -I_\nu)`
        (:meth:`_signed_root`), Haynsworth's inertia formula for :math:`\left[\begin{smallmatrix} D' & Z_r L \\
        L^\top Z_r^\top & -J \end{smallmatrix}\right]` gives :math:`\operatorname{neg}(M) =
        \operatorname{pos}(H) - p`, :math:`H = J + L^\top \tilde A L`. As
        :math:`H_{++} = I + L_+^\top \tilde A L_+ \succ 0`, :math:`M \succ 0` iff the
        ``nu x nu`` Schur complement :math:`H_{--} - H_{-+} H_{++}^{-1} H_{+-}` is negative definite: two Cholesky
        factorisations, and only where some :math:`B_j` has a negative eigenvalue (otherwise :math:`\nu = 0`)."""
        if not self._validating() or A_rr is None:
            return None
        A = A_rr.detach().expand(*self.batch_shape, *A_rr.shape[-2:])  # the blocks' batch: vectors are diagonals
        wdt = A.dtype
        roots = [self._signed_root(t, wdt) for t in rest]
        terms = [i for i, (_, N) in enumerate(roots) if N is not None]
        if not terms:
            return None
        sizes = [self._sizes()[t] for t in rest]

        def right(x: Tensor, F: Tensor | None) -> Tensor:  # x F (F None: the identity; a vector: a diagonal)
            return x if F is None else (x * F.unsqueeze(-2) if F.dim() == x.dim() - 1 else x @ F)

        def left(F: Tensor | None, x: Tensor) -> Tensor:  # F^T x
            return x if F is None else (F.unsqueeze(-1) * x if F.dim() == x.dim() - 1 else F.mT @ x)

        columns = A.split(sizes, dim=-1)
        AP = torch.cat([right(x, P) for (P, _), x in zip(roots, columns)], dim=-1)
        H_pp = torch.cat([left(P, x) for (P, _), x in zip(roots, AP.split(sizes, dim=-2))], dim=-2)
        H_pp = 0.5 * (H_pp + H_pp.mT) + torch.eye(H_pp.shape[-1], dtype=wdt, device=H_pp.device)
        AN = torch.cat([right(columns[i], roots[i][1]) for i in terms], dim=-1)
        H_pn = torch.cat([left(P, x) for (P, _), x in zip(roots, AN.split(sizes, dim=-2))], dim=-2)
        rows = AN.split(sizes, dim=-2)
        H_nn = torch.cat([left(roots[i][1], rows[i]) for i in terms], dim=-2)
        nu = H_nn.shape[-1]
        H_nn = 0.5 * (H_nn + H_nn.mT) - torch.eye(nu, dtype=wdt, device=H_nn.device)
        R, info = torch.linalg.cholesky_ex(H_pp)
        if not bool((info > 0).any()):  # pos(H) - p = nu - neg(S): 0 iff -S is positive definite
            Y = torch.linalg.solve_triangular(R, H_pn, upper=False)
            S = H_nn - Y.mT @ Y
            S = 0.5 * (S + S.mT)
            _, info = torch.linalg.cholesky_ex(-S)
            if not bool((info > 0).any()):
                return None
            negative = nu - (torch.linalg.eigvalsh(S) < 0).sum(-1)  # the failure path: count them
        else:  # H_++ >= I failed only by rounding: count the eigenvalues of all of H
            H = torch.cat([torch.cat([H_pp, H_pn], dim=-1), torch.cat([H_pn.mT, H_nn], dim=-1)], dim=-2)
            negative = nu - (torch.linalg.eigvalsh(H) < 0).sum(-1)
        if not bool((negative > 0).any()):
            return None
        bad = negative > 0
        where = f" (batch index {tuple(int(i) for i in bad.nonzero()[0])})" if bad.dim() else ""
        count = int(negative.max())
        names = [f"blocks[{j}]" for j in range(len(self.partitions)) if self._signed_root(j, wdt)[1] is not None]
        return self._not_positive_definite(
            f"the sum ({self._describe()}) is not positive definite{where}: it has {count} negative "
            f"eigenvalue{'s' if count > 1 else ''}, from the negative eigenvalues of {', '.join(names)} (more than "
            "the diagonal and the other terms make up for). Its capacitance matrix has an even number of negative "
            "eigenvalues, so its determinant is positive. Check the block matrices and the diagonal."
        )

    def _factorise_joint(self, eliminated: list[int], rest: list[int]) -> _Capacitance:
        r"""The capacitance with several diagonal terms ``E`` over one partition eliminated together.

        Their block of :math:`Z^\top D^{-1} Z` is diagonal pairwise (:meth:`_level_gram`), so ordered level by
        level it is block diagonal with one ``r_e x r_e`` block :math:`A_c` per level, and so is
        :math:`\Delta = I + G_E A_{EE}`: :math:`\Delta_c = I + \operatorname{diag}(g_c) A_c`. Its
        log-determinant is a sum of ``k`` small ones; the other terms go through
        :math:`S = I + G_r (A_{rr} - A_{rE} \Delta^{-1} G_E A_{Er})`. ``O(k r_e^3 + k r_e r^2)`` where one
        eliminated term would leave a dense capacitance of ``(r_e - 1) k + r`` columns."""
        sizes = self._sizes()
        wdt = core_dtype(self.dtype)
        g = torch.stack([self._working_block_diagonal(e) for e in eliminated], -1)  # (*b, k, r_e)
        A_EE = torch.stack([torch.stack([self._level_gram(i, j) for j in eliminated], -1) for i in eliminated], -2)
        eye = torch.eye(len(eliminated), dtype=wdt, device=self.device)
        delta = eye + g.unsqueeze(-1) * A_EE  # (*b, k, r_e, r_e)
        sign, logabs = torch.linalg.slogdet(delta)
        if self._validating() and bool((sign <= 0).any()):
            raise self._not_positive_definite(
                f"the sum ({self._describe()}) is not positive definite: the block of the capacitance of the "
                f"terms {[e + 1 for e in eliminated]} over one grouping has a non-positive determinant at some level. "
                "Check the block matrices and the diagonal." + _level_ratio_hint(g, self.diag_values)
            )
        sign, logdet = sign.prod(-1), logabs.sum(-1)  # levels of either sign without validation: their product
        A_rE = lu = A_rr = cross = None
        if rest:
            A_rr = torch.cat([torch.cat([self._A_block(s_, t) for t in rest], dim=-1) for s_ in rest], dim=-2)
            cross = self._joint_cross(rest, eliminated, g, delta)
            if cross is not None:  # the groupings' tables as their cells: no (r, k, r_e) tensor
                eye_e = torch.eye(len(eliminated), dtype=wdt, device=self.device)
                A_rr = A_rr - cross.correction(torch.linalg.solve(delta, eye_e * g.unsqueeze(-2)))
            else:
                A_rE = self._joint_dense_cross(rest, eliminated, g)
                GA_Er = g.unsqueeze(-1) * A_rE.movedim(-3, -1)  # (*b, k, r_e, r)
                X = torch.linalg.solve(delta, GA_Er)  # Delta^{-1} G_E A_{Er}, level by level
                A_rr = A_rr - torch.einsum("...rci,...cis->...rs", A_rE, X)
            lu, rest_sign, rest_logdet = self._factorise_rest(A_rr, rest)
            logdet = logdet + rest_logdet
            sign = sign * rest_sign
        elif sum(sizes) == 0:  # pragma: no cover - a sum has at least one term here
            raise AssertionError
        not_definite = self._definiteness_error(sign, A_rr, rest)
        joint = _JointElimination(tuple(eliminated), g, delta, A_rE, cross)
        return _Capacitance(
            None, None, None, None, lu, logdet, joint, A_tilde=A_rr, sign=sign, not_definite=not_definite
        )

    def _joint_dense_cross(self, rest: list[int], eliminated: list[int], g: Tensor) -> Tensor:
        """:math:`A_{rE}` formed, ``(*b, r, k, r_e)`` (broadcast with ``g``'s batch)."""
        return _formed_cross(self._gram()[1], rest, eliminated, g, core_dtype(self.dtype))

    def _joint_cross(self, rest: list[int], eliminated: list[int], g: Tensor, delta: Tensor) -> _JointCross | None:
        r""":math:`A_{rE}` as cells (:class:`_JointCross`) where every non-eliminated term is a grouping whose table
        with the eliminated one is sparse (as in :meth:`_cross_blocks`), nothing is batched and every block of the
        Schur correction fits the cells' products (:func:`_cells_product_fits`); None otherwise (formed, and the
        correction one GEMM). Random slopes on a grouping crossed with another (``(1 + x | user) + (1 | item)``,
        20,000 x 2,000 levels at ``n = 10^6``): the formed ``(r, k, r_e)`` tensor holds 8 x 10^7 entries and the
        GEMM costs ``2 r^2 k r_e`` operations (1.6 x 10^11 forward, twice that backward)."""
        sizes = self._sizes()
        ke = sizes[eliminated[0]]
        if g.dim() != 2 or delta.dim() != 3 or not all(self._table_as_cells(t, ke) for t in rest):
            return None
        _, blocks = self._gram()
        wdt = core_dtype(self.dtype)
        part_e = self.partitions[eliminated[0]]
        tables = [_Cells.build(self.partitions[t], part_e) for t in rest]
        values = [
            [table.values(blocks.point_values(t, e).to(wdt)) for e in eliminated] for table, t in zip(tables, rest)
        ]
        if any(v.dim() != 1 for row in values for v in row):
            return None
        probe = g[:, 0]  # the dtype and device of M's columns
        pieces = [(table, vals[0]) for table, vals in zip(tables, values)]
        for i in range(len(rest)):
            for j in range(i, len(rest)):
                if not _cells_product_fits(pieces[i], pieces[j], probe, sizes[rest[i]], sizes[rest[j]]):
                    return None
        # formed on demand from the tables alone (a reference to the operator would make a cycle through its memo)
        dense = functools.partial(_formed_cross, blocks, rest, eliminated, g, wdt)
        return _JointCross(tables, values, [sizes[t] for t in rest], ke, dense)

    def _table_as_cells(self, t: int, ke: int) -> bool:
        """Whether term ``t``'s table with an eliminated grouping of ``ke`` levels is held as its nonzero cells: ``t``
        is a grouping (not the root), at most :data:`SPARSE_CELLS_DENSITY` of its ``k_t k_e`` cells can hold one of
        the ``n`` indices, and the operator has labels to find them in (not on the meta device)."""
        if t >= len(self.partitions) or self.device.type == "meta":
            return False
        return self.diag_values.shape[-1] <= SPARSE_CELLS_DENSITY * self._sizes()[t] * ke

    def _cross_blocks(self, rest: list[int], elim: int) -> _CrossBlocks:
        """:math:`A_{re}`, with the nonzero cells of a grouping's table with the eliminated one where at most
        :data:`SPARSE_CELLS_DENSITY` of its cells can hold an index (many crossed levels): that table is never
        formed as a ``k_t x k_e`` matrix."""
        sizes = self._sizes()
        ke = sizes[elim]
        pieces: list = []
        for t in rest:
            if not self._table_as_cells(t, ke):
                pieces.append(self._A_block(t, elim))
                continue
            _, blocks = self._gram()
            table = _Cells.build(self.partitions[t], self.partitions[elim])
            i, j = min(t, elim), max(t, elim)
            pieces.append((table, table.values(blocks.point_values(i, j))))
        return _CrossBlocks(pieces, [sizes[t] for t in rest], ke)

    def _schur_correction(self, rest: list[int], elim: int, A_re: _CrossBlocks, c: Tensor) -> Tensor:
        r""":math:`A_{re} \operatorname{diag}(c) A_{er}` for the Schur complement onto the non-eliminated terms.

        One GEMM per pair of dense blocks. When a grouping's contingency table with the eliminated grouping is
        sparse (:meth:`_cross_blocks`), its blocks come from the nonzero cells instead: the products of cells that
        share an eliminated level, and one gathered row of the root's block sums per cell. Equal to the GEMM up to
        the order of summation, and differentiable the same way.
        """
        J = len(self.partitions)
        sizes = self._sizes()
        rows: list[list[Tensor]] = []
        for i, s_ in enumerate(rest):
            row = []
            for j, t in enumerate(rest):
                pa, pb = A_re.pieces[i], A_re.pieces[j]
                if j < i:  # the lower blocks are the transposes of the upper ones
                    row.append(rows[j][i].mT)
                elif (
                    not torch.is_tensor(pa)
                    and not torch.is_tensor(pb)
                    and _cells_product_fits(pa, pb, c, sizes[s_], sizes[t])
                ):
                    row.append(_cells_product(pa[0], pa[1], pb[0], pb[1], c, sizes[t], sizes[s_]))
                elif not torch.is_tensor(pa) and t == J:
                    row.append(_cells_dense_product(pa[0], pa[1], c, A_re.dense(j).mT, sizes[s_]))
                elif i == j and torch.is_tensor(pa) and pa.dim() == 2 and c.dim() == 1:
                    row.append(_WeightedGram.apply(pa, c))
                else:
                    a_s, a_t = A_re.dense(i), A_re.dense(j)
                    row.append((a_s * c.unsqueeze(-2)) @ a_t.mT)
            rows.append(row)
        batch = torch.broadcast_shapes(*(blk.shape[:-2] for row in rows for blk in row))
        return torch.cat([torch.cat([blk.expand(*batch, *blk.shape[-2:]) for blk in row], -1) for row in rows], -2)

    def _apply_G_rest(self, rest: list[int], x: Tensor) -> Tensor:
        """:math:`G_r x` for the stacked non-eliminated terms."""
        sizes = [self._sizes()[t] for t in rest]
        return torch.cat([self._G(t, piece) for t, piece in zip(rest, x.split(sizes, dim=-2))], dim=-2)

    def _cap_solve(self, y: list[Tensor], definite: bool = True) -> list[Tensor]:
        """Solve :math:`C x = y` with ``y`` given per term (``(*b, k_t, t)`` each); ``definite``: a sum that is not
        positive definite raises (with validation on), as for a posterior; ``solve`` needs an invertible one only."""
        cap = self._capacitance(definite)
        if cap.joint is not None:
            return self._joint_solve(cap, y)
        rest = [t for t in range(len(y)) if t != cap.elim]
        out: list[Tensor] = list(y)  # every entry is replaced below
        if rest:
            rhs = torch.cat([y[t] for t in rest], dim=-2)
            if cap.elim is not None:
                assert cap.A_re is not None and cap.delta is not None
                rhs = rhs - self._apply_G_rest(rest, cap.A_re.matmul(y[cap.elim] / cap.delta.unsqueeze(-1)))
            assert cap.lu is not None
            x_rest = _rest_solve(cap.lu, rhs)
            for t, piece in zip(rest, x_rest.split([y[t].shape[-2] for t in rest], dim=-2)):
                out[t] = piece
        if cap.elim is not None:
            e = cap.elim
            assert cap.delta is not None
            rhs = y[e]
            if rest:
                assert cap.g is not None and cap.A_re is not None
                rhs = rhs - cap.g.unsqueeze(-1) * cap.A_re.t_matmul(torch.cat([out[t] for t in rest], dim=-2))
            out[e] = rhs / cap.delta.unsqueeze(-1)
        return out

    def _joint_solve(self, cap: _Capacitance, y: list[Tensor]) -> list[Tensor]:
        r""":meth:`_cap_solve` with jointly eliminated terms: level-by-level ``r_e x r_e`` solves with
        :math:`\Delta`, the Schur complement for the rest."""
        joint = cap.joint
        assert joint is not None
        E = joint.terms
        rest = [t for t in range(len(y)) if t not in E]
        out: list[Tensor] = list(y)
        batch = torch.broadcast_shapes(*(y[e].shape[:-2] for e in E))
        yE = torch.stack([y[e].expand(*batch, *y[e].shape[-2:]) for e in E], -2)  # (*b, k, r_e, t)
        if rest:
            assert cap.lu is not None and (joint.formed is not None or joint.cross is not None)
            zE = torch.linalg.solve(joint.delta, yE)
            rhs = torch.cat([y[t] for t in rest], dim=-2)
            rhs = rhs - self._apply_G_rest(rest, joint.rest_product(zE))
            x_rest = _rest_solve(cap.lu, rhs)
            for t, piece in zip(rest, x_rest.split([y[t].shape[-2] for t in rest], dim=-2)):
                out[t] = piece
            yE = yE - joint.g.unsqueeze(-1) * joint.level_product(x_rest)
        xE = torch.linalg.solve(joint.delta, yE)
        for i, e in enumerate(E):
            out[e] = xE[..., i, :]
        return out

    # ------------------------------------------------------------------ Z^T x and Z y
    def _z_t(self, x: Tensor, root_t: Tensor | None = None) -> list[Tensor]:
        """:math:`Z^\\top x` per term, in the working precision (``root_t``: :math:`U^\\top x` if already known).
        ``x`` # shape: (*batch, n, t)"""
        wdt = core_dtype(self.dtype)
        x = x.to(wdt)
        out = [p.block_sum(self._weighted(j, x, -2), dim=-2) for j, p in enumerate(self.partitions)]
        if root_t is not None:
            out.append(root_t)
        elif self.root is not None:  # forms a lazy root: only the first solve's U^T D^-1 b comes with its Gram pass
            out.append(_chunked_t_matmul(self.root, x))
        return out

    def _z(self, y: list[Tensor]) -> Tensor:
        """:math:`Z y` from per-term coefficients, in the working precision. # shape: (*batch, n, t)"""
        res = None
        for j, p in enumerate(self.partitions):
            term = self._weighted(j, p.expand(y[j], dim=-2), -2)
            res = term if res is None else res + term
        if self.root is not None:
            term = _chunked_matmul(self.root, y[-1])
            res = term if res is None else res + term
        assert res is not None, "_z needs at least one term"
        return res

    # ------------------------------------------------------------------ solves and log-determinants
    def _check_rhs(self, rhs: Tensor, name: str) -> None:
        check_rhs(self.shape, rhs, name, self.dtype)

    def _woodbury(self, rhs: Tensor, definite: bool = True) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """``(D^{-1} b, u, x)`` with :math:`u = Z^\\top D^{-1} b` and :math:`x = C^{-1} G u` (working precision);
        ``definite`` as in :meth:`_cap_solve`."""
        wdt = core_dtype(self.dtype)
        scaled = rhs.to(wdt) / self._working_diag().unsqueeze(-1)
        if not self._sizes():
            return scaled, [], []
        root_t = None
        if (
            self._root_arg is not None
            and not self._cached("gram")
            and self._depth
            and scaled.shape[:-2] == tuple(self._root_arg.shape[:-2])
        ):
            # one pass over U for its Gram matrix and U^T D^{-1} b (and one gradient buffer for U)
            a, blocks, root_t = self._compute_gram(extra=scaled)
            self._keep("gram", (a, blocks))
        u = self._z_t(scaled, root_t)
        x = self._cap_solve([self._G(t, ut) for t, ut in enumerate(u)], definite)
        return scaled, u, x

    @_scoped
    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        r"""Closed-form :math:`M^{-1} R` (or :math:`L M^{-1} R`) through the capacitance: no CG, any size. Any
        invertible sum with a positive per-point diagonal :math:`d`, definite or not (an indefinite ``B_j``), as a
        single block mean operator's; with :class:`bma_gp.settings.validate` on a singular one, or one with some
        :math:`d_a \le 0` (a negative multiple or a difference of operators, ``-M + D``), raises a ``ValueError``."""
        self._check_rhs(right_tensor, "right_tensor")
        if left_tensor is not None:
            check_left(self.shape, left_tensor, solution_batch(self.shape, right_tensor), self.dtype)
        self._check_diag("solve")
        vector = right_tensor.dim() == 1
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        res = self._woodbury_solve(rhs)
        if self._refines():
            res = self._refined(rhs, res)
        res = res.to(torch.promote_types(self.dtype, right_tensor.dtype))
        if left_tensor is not None:  # before the squeeze: a batched S^{-1} v is a batch of columns
            res = left_tensor @ res
        return res.squeeze(-1) if vector else res

    def _woodbury_solve(self, rhs: Tensor) -> Tensor:
        """:math:`M^{-1} R` by Woodbury, in the working precision (an invertible sum is enough, as for a single
        operator)."""
        scaled, _, x = self._woodbury(rhs, definite=False)
        if not x:
            return scaled
        return scaled - self._z(x) / self._working_diag().to(scaled.dtype).unsqueeze(-1)

    def _working_matmul(self, x: Tensor) -> Tensor:
        r""":math:`M x = D x + Z G Z^\top x` in the working precision (the products of :meth:`_woodbury`)."""
        x = x.to(core_dtype(self.dtype))
        res = self._working_diag().to(x.dtype).unsqueeze(-1) * x
        if not self._sizes():
            return res
        return res + self._z([self._G(t, ut) for t, ut in enumerate(self._z_t(x))])

    def _refines(self) -> bool:
        r"""Whether :meth:`solve` takes a step of iterative refinement: where the capacitance eliminates weighted
        terms over one partition jointly (random slopes, :meth:`_factorise_joint`).

        There the per-level blocks :math:`\Delta_c = I + \operatorname{diag}(g_c) A_c` of a covariate far from 0
        are ill-conditioned (weights :math:`1, x, 1 + c x` of a correlated slope are collinear, and :math:`1` and
        :math:`x` nearly parallel within a level: condition numbers near :math:`10^9` at calendar years,
        :math:`5 \cdot 10^{10}` near :math:`10^4`), and :math:`Z x` in :math:`D^{-1}(b - Z x)` carries their
        rounding as a smooth error over each level. :math:`M^{-1} b` is accurate entry by entry (:math:`10^{-11}`)
        but its weighted level sums :math:`Z^\top M^{-1} b`, which the posterior mean takes times :math:`x_* x`,
        cancel by five orders of magnitude: the mean was 1000x less accurate than a dense Cholesky. One step
        :math:`\alpha \mathrel{+}= M^{-1}(b - M \alpha)` with the operator's exact product restores the dense
        solve's accuracy (residual and mean) for covariates up to about :math:`10^5` from 0."""
        if not self._sizes():
            return False
        joint = self._capacitance(False).joint
        return joint is not None and any(self.weights[e] is not None for e in joint.terms)

    def _refined(self, rhs: Tensor, res: Tensor) -> Tensor:
        r"""``res`` (:math:`\approx M^{-1} R`) after :data:`REFINEMENT_STEPS` steps of iterative refinement. The
        steps start from a constant (detached) solution, so the derivatives come from the last step alone,
        :math:`\partial(M^{-1} R) = M^{-1}(\partial R - \partial M\, \alpha)` up to rounding: no second
        solve's graph is kept."""
        rhs = rhs.to(res.dtype)
        for _ in range(REFINEMENT_STEPS):
            res = res.detach()
            res = res + self._woodbury_solve(rhs - self._working_matmul(res))
        return res

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int = 0) -> Tensor:
        if num_tridiag:
            raise NotImplementedError(_NO_LANCZOS_QUADRATURE.format(type(self).__name__))
        return self.solve(rhs)

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        return self.inv_quad_logdet(inv_quad_rhs, logdet=False, reduce_inv_quad=reduce_inv_quad)[0]

    @_scoped
    def inv_quad_logdet(
        self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True
    ) -> tuple[Tensor, Tensor]:
        r""":math:`R^\top M^{-1} R = R^\top D^{-1} R - u^\top C^{-1} G u` (:math:`u = Z^\top D^{-1} R`) and
        :math:`\log\det M = \sum \log d + \log\det C`, in closed form at every size."""
        if inv_quad_rhs is None and not logdet:
            raise RuntimeError("Either `inv_quad_rhs` or `logdet` must be specified.")
        wdt = core_dtype(self.dtype)
        inv_quad_term = torch.empty(0, dtype=self.dtype, device=self.device)
        if inv_quad_rhs is not None:
            self._check_rhs(inv_quad_rhs, "inv_quad_rhs")
            self._check_diag("inv_quad")
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
            rhs = rhs.to(wdt)  # cast once: the gradients of both uses cancel, and are summed before rounding
            scaled, u, x = self._woodbury(rhs, definite=False)  # logdet (below) needs it positive definite
            quad = (rhs * scaled).sum(-2)
            for ut, xt in zip(u, x):
                quad = quad - (ut * xt).sum(-2)
            inv_quad_term = (quad.sum(-1) if reduce_inv_quad else quad).to(self.dtype)
        logdet_term = torch.zeros([], dtype=self.dtype, device=self.device)
        if logdet:
            logdet_term = self.logdet()
        return inv_quad_term, logdet_term

    @_scoped
    def logdet(self) -> Tensor:
        r""":math:`\log\det M = \sum_a \log d_a + \log\det(I + G Z^\top D^{-1} Z)`.

        With validation off, ``torch.logdet``'s semantics of the dense matrix: the signs of the ``d_a`` and of the
        capacitance's determinant (of each factor of it: an eliminated grouping's levels, the LU) multiply, NaN
        below zero, ``-inf`` at zero."""
        self._check_diag("logdet")
        d = self._working_diag()
        sign, res = d.sign().prod(-1), d.abs().log().sum(-1)
        if self._sizes():
            cap = self._capacitance()
            res = res + cap.logdet
            if cap.sign is not None:
                sign = sign * cap.sign
        # torch.sign(nan) is 0: a NaN input (d, B_j, the root) must stay NaN, as torch.logdet of the dense matrix,
        # not read as a zero determinant (-inf). A zero d_a (a sum without noise, singular when q < n) makes the
        # capacitance NaN through 1/d and stays -inf. Device-side, no host synchronisation
        zero = (sign == 0) & (~res.isnan() | (d == 0).any(-1))
        res = torch.where(sign > 0, res, torch.where(zero, -math.inf, math.nan))
        return res.to(self.dtype)

    # ------------------------------------------------------------------ roots
    def _root_factor(self, j: int, wdt: torch.dtype, singular: bool = False) -> Tensor | None:
        """A symmetric root :math:`L_j = B_j^{1/2}` of a positive semidefinite :math:`B_j`; None when :math:`B_j`
        has an eigenvalue clearly below 0 and, unless ``singular``, also when one is 0 within rounding: then the roots
        of the sum come from the root of the Gram matrix (:meth:`_gram_root_parts`), which is smooth in
        :math:`B_j` where :math:`B_j^{1/2}` is not (its derivative is infinite at a zero eigenvalue). With
        ``singular`` (a sum without a diagonal, whose root is :math:`Z L`) such eigenvalues get root 0 with
        derivative 0 (:func:`~bma_gp._symmetric_function.floored_sqrt`)."""
        if self._block_is_diagonal(j):
            values = self._block_diagonal(j).to(wdt)
            if bool((values < 0).any()):
                return None
            if not singular and bool((values <= rounding_floor(values)).any()):
                return None
            return torch.diag_embed(floored_sqrt(values))
        B = self._dense_block(j).to(wdt)
        B = 0.5 * (B + B.mT)
        e = nan_safe_eigvalsh(B.detach())  # NaN, not LAPACK's error, for a non-finite B with validation off
        floor = rounding_floor(e).squeeze(-1)
        if bool((e[..., 0] < -2.5 * floor).any()):
            return None
        if not singular and bool((e[..., 0] <= floor).any()):
            return None
        return symmetric_matrix_function(B, floored_sqrt, lambda x: x.clamp_min(0))

    def zero_mean_mvn_samples(self, num_samples: int) -> Tensor:
        r"""Draws from :math:`N(0, M)` as :math:`D^{1/2} \epsilon + Z L \epsilon'` with :math:`L =
        \operatorname{blockdiag}(B_1^{1/2}, \dots, B_J^{1/2}, I_m)` (``n`` and ``q`` standard normals per draw):
        :math:`O(n (J + m))` per draw beyond the roots of the dense :math:`B_j` (``k_j x k_j`` each), with no
        factorisation of size ``q``. The square root (:meth:`root_decomposition`, what ``base_samples`` need) takes
        one of size ``q``: a prior draw of a random intercept with a per-point noise took 26 s at 5,000 levels and
        was refused past ``max_capacitance_size``. Where some :math:`d_a < 0` or a :math:`B_j` has no root (an
        indefinite block mean :math:`B`), the square root's draws. # shape: (num_samples, *batch, n)"""
        wdt = core_dtype(self.dtype)
        d = self.diag_values.to(wdt)
        if not bool((d >= 0).all()):
            return super().zero_mean_mvn_samples(num_samples)
        self._check_finite_input()
        factors: list[tuple[bool, Tensor]] = []  # (diagonal, root): a diagonal block's root as a vector
        for j in range(len(self.partitions)):
            if self._block_is_diagonal(j):
                values = self._block_diagonal(j).to(wdt)
                if bool((values < 0).any()):
                    return super().zero_mean_mvn_samples(num_samples)
                factors.append((True, floored_sqrt(values)))
            else:
                root = self._root_factor(j, wdt, singular=True)
                if root is None:
                    return super().zero_mean_mvn_samples(num_samples)
                factors.append((False, root))
        batch, n = self.batch_shape, self.shape[-1]
        pieces = []
        for (diagonal, root), k in zip(factors, self.num_blocks):
            e = torch.randn(*batch, k, num_samples, dtype=wdt, device=self.device)
            pieces.append(root.unsqueeze(-1) * e if diagonal else root @ e)
        if self.root is not None:
            pieces.append(torch.randn(*batch, self.rank, num_samples, dtype=wdt, device=self.device))
        noise = floored_sqrt(d).unsqueeze(-1) * torch.randn(*batch, n, num_samples, dtype=wdt, device=self.device)
        draws = noise + self._z(pieces) if pieces else noise
        return draws.permute(-1, *range(draws.dim() - 1)).contiguous().to(self.dtype)

    def _check_root_size(self, what: str = "a root of this sum needs an eigendecomposition") -> None:
        q = self.capacitance_size
        limit = settings.max_capacitance_size.value()
        if q > limit:
            raise ValueError(
                f"{what} of size q = {q} ({self._describe()}), more than "
                f"bma_gp.settings.max_capacitance_size = {limit}; raise the limit with "
                f"`with bma_gp.settings.max_capacitance_size({q}):` if it fits your machine."
            )

    def _root_parts(self, inverse: bool) -> tuple[Tensor, list[Tensor]]:
        """``(K, L)``: :math:`L = \\operatorname{blockdiag}(B_j^{1/2}, I)` and :math:`K = h(L^\\top A L)`; with an
        indefinite :math:`B_j`, ``L`` the identity and ``K`` from :meth:`_gram_root_parts`."""
        self._check_root_size()
        self._check_diag("root_inv_decomposition" if inverse else "root_decomposition")
        self._check_finite_input()
        wdt = core_dtype(self.dtype)
        sizes = self._sizes()
        J = len(self.partitions)
        L = []
        for j in range(J):  # the first block without a root sends the sum to the Gram-matrix root
            root = self._root_factor(j, wdt)
            if root is None:
                return self._gram_root_parts(inverse)
            L.append(root)
        if self.root is not None:
            L.append(torch.eye(self.rank, dtype=wdt, device=self.device))
        rows = []
        for s in range(len(sizes)):
            rows.append(torch.cat([L[s].mT @ self._A_block(s, t) @ L[t] for t in range(len(sizes))], dim=-1))
        W = torch.cat(rows, dim=-2)
        W = 0.5 * (W + W.mT)
        if inverse:

            def fn(e):
                r = (1 + e).sqrt()
                return -1 / (r * (r + 1))
        else:

            def fn(e):
                return 1 / ((1 + e).sqrt() + 1)

        K = symmetric_matrix_function(W, fn, lambda e: e.clamp_min(0))
        return K, L

    def _core_matrix(self, wdt: torch.dtype) -> Tensor:
        """:math:`G = \\operatorname{blockdiag}(B_1, \\dots, B_J, I_m)` as one matrix. # shape: (*batch, q, q)"""
        sizes = self._sizes()
        pieces = [
            torch.diag_embed(self._block_diagonal(j)) if self._block_is_diagonal(j) else self._dense_block(j)
            for j in range(len(self.partitions))
        ]
        pieces = [piece.to(wdt) for piece in pieces]
        if self.root is not None:
            pieces.append(torch.eye(self.rank, dtype=wdt, device=self.device))
        pieces = [p.expand(*self.batch_shape, *p.shape[-2:]) for p in pieces]
        rows = []
        for s, piece in enumerate(pieces):
            row = [
                piece if t == s else torch.zeros(*self.batch_shape, sizes[s], sizes[t], dtype=wdt, device=self.device)
                for t in range(len(sizes))
            ]
            rows.append(torch.cat(row, dim=-1))
        G = torch.cat(rows, dim=-2)
        return 0.5 * (G + G.mT)

    def _gram_root_parts(self, inverse: bool, zero_diagonal: bool = False) -> tuple[Tensor, list[Tensor]]:
        r"""``(X, [I, ..., I])`` for a sum with an indefinite :math:`B_j`: with :math:`Y = D^{-1/2} Z`,
        :math:`A = Y^\top Y`, :math:`F = A^{1/2}` and :math:`F^+` its pseudo-inverse,
        :math:`(I + Y G Y^\top)^{\pm 1/2} = I + Y X Y^\top` with :math:`X = F^+ f(F G F) F^+`,
        :math:`f(e) = \sqrt{1+e} - 1` (or :math:`1/\sqrt{1+e} - 1`): no root of :math:`G` is needed. With
        ``zero_diagonal`` (:math:`d = 0`, :math:`A = Z^\top Z`): :math:`M^{1/2} = Z X Z^\top`,
        :math:`X = F^+ (F G F)^{1/2} F^+`. Directions of :math:`A` below ``4 q eps`` times its largest eigenvalue
        count as its null space (:math:`Y` is 0 there to rounding)."""
        wdt = core_dtype(self.dtype)
        sizes = self._sizes()
        gram_of = self._new(diag=torch.ones_like(self.diag_values)) if zero_diagonal else self
        A = torch.cat(
            [torch.cat([gram_of._A_block(s, t) for t in range(len(sizes))], dim=-1) for s in range(len(sizes))],
            dim=-2,
        )
        kind = "zero" if zero_diagonal else ("inverse" if inverse else "root")
        X = gram_root_core(A, self._core_matrix(wdt), kind, f"this sum ({self._describe()})", self.dtype)
        eye = [torch.eye(size, dtype=wdt, device=self.device) for size in sizes]
        return X, eye

    @_scoped
    def _cholesky(self, upper: bool | None = False) -> LinearOperator:
        """linear_operator's dense Cholesky factor, with a :class:`~bma_gp.ClosedFormFallbackWarning`: a
        triangular factor has no closed form here (``MultivariateNormal.entropy`` and ``scale_tril`` ask for one)."""
        warn_dense_cholesky(self)
        return super()._cholesky(upper=upper)

    def diagonalization(self, method: str | None = None):
        """linear_operator's diagonalization (a dense eigendecomposition, or Lanczos above ``max_cholesky_size``),
        with a :class:`~bma_gp.ClosedFormFallbackWarning`: see :func:`dense_symeig`."""
        return warned_diagonalization(self, super().diagonalization, method)

    def _symeig(self, eigenvectors: bool = False, return_evals_as_lazy: bool | None = False):
        """The dense eigendecomposition, with a :class:`~bma_gp.ClosedFormFallbackWarning`: see :func:`dense_symeig`."""
        return dense_symeig(self, eigenvectors)

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        r""":math:`M = R R^\top` with the square root
        :math:`R = D^{1/2} + Z L K L^\top Z^\top D^{-1/2}`, :math:`K = h(L^\top A L)`,
        :math:`h(e) = 1/(\sqrt{1+e}+1)` (``method`` is ignored). Applying :math:`R` costs
        :math:`O(n(J+m) + q^2)`. With :math:`d = 0` (a prior of group kernels without noise) it is
        :math:`R = Z L`, padded with zero columns to ``n x n`` when ``q < n`` (GPyTorch's ``rsample(base_samples=...)``
        takes ``n`` base samples per draw), else ``n x q``.

        With an indefinite :math:`B_j` (a block mean approximation's :math:`B` can be indefinite while its matrix is
        not) the same :math:`R` comes from the root of the Gram matrix instead, with :math:`L = I` and
        :math:`K` from :meth:`_gram_root_parts`; with :math:`d = 0` it is then :math:`R = Z K Z^\top`. A sum
        that is not positive definite raises ``ValueError``."""
        check_root_method("root_decomposition", method)
        if bool((self.diag_values == 0).all()):  # no per-point part: R = Z L, n x q, no eigendecomposition
            self._check_finite_input()
            wdt = core_dtype(self.dtype)
            roots = [self._root_factor(j, wdt, singular=True) for j in range(len(self.partitions))]
            L = [x for x in roots if x is not None]
            if len(L) < len(roots):  # an indefinite B_j: R = Z X Z^T
                self._check_root_size()
                X, eye = self._memo("zero_root_parts", lambda: self._gram_root_parts(False, zero_diagonal=True))
                d = self.diag_values.to(X.dtype)
                return _SumRootProduct(
                    _WoodburyRoot(X, torch.zeros_like(d), torch.ones_like(d), torch.ones_like(d), *eye, parent=self)
                )
            if self.root is not None:
                L.append(torch.eye(self.rank, dtype=wdt, device=self.device))
            return _SumRootProduct(_ZLRoot(*L, parent=self))
        K, L = self._memo("root_parts", lambda: self._root_parts(inverse=False))
        wdt = K.dtype
        d = self.diag_values.to(wdt)
        return _SumRootProduct(_WoodburyRoot(K, d.sqrt(), torch.ones_like(d), d.rsqrt(), *L, parent=self))

    @_scoped
    def root_inv_decomposition(
        self, initial_vectors: Tensor | None = None, test_vectors: Tensor | None = None, method: str | None = None
    ) -> LinearOperator:
        r""":math:`M^{-1} = R R^\top` with :math:`R = D^{-1/2} + D^{-1} Z L K L^\top Z^\top D^{-1/2}`,
        :math:`K = g(L^\top A L)`, :math:`g(e) = -1/(\sqrt{1+e}(\sqrt{1+e}+1))` (arguments are ignored)."""
        check_root_method("root_inv_decomposition", method)
        self._check_diag("root_inv_decomposition")
        if self._validating():  # refused here, as before the root became lazy: from the shared factorisation
            self._check_finite_input()
            try:
                self._capacitance(definite=True)
            except ValueError as err:
                if "not positive definite" not in str(err):
                    raise
                raise type(err)(f"{err}; so it has no inverse square root (root_inv_decomposition)") from None
        # K (q x q) is formed at the root's first product: diagonal() reads _inverse_diagonal, which eliminates
        # diagonal groupings instead (two crossed intercepts of 2,500 and 100 levels: r = 100, not q = 2,600)
        return _SumInverseRootProduct(_InverseRoot(parent=self))

    def _inverse_root(self) -> _WoodburyRoot:
        """The root :meth:`root_inv_decomposition` names, with its ``q x q`` core (cached, like the solves')."""
        K, L = self._memo("root_inv_parts", lambda: self._root_parts(inverse=True))
        wdt = K.dtype
        d = self.diag_values.to(wdt)
        return _WoodburyRoot(K, d.rsqrt(), d.reciprocal(), d.rsqrt(), *L, parent=self)

    def _inverse_diagonal(self) -> Tensor:
        r""":math:`\operatorname{diag}(M^{-1}) = 1/d - \operatorname{diag}(D^{-1} Z H Z^\top D^{-1})` with
        :math:`H = C^{-1} G` (:math:`C = I + G A`), read from the capacitance factorisation the solves and the
        log-determinant use (and share, :meth:`_capacitance`).

        Where a diagonal grouping is eliminated first, :math:`H` is never formed: its blocks come from the level
        blocks of the eliminated terms and the rest's Schur complement (``r x r``,
        :func:`~bma_gp.kernels.sum_prediction_strategy._posterior_quadratic_diagonal`), so the cost is the solves'
        :math:`O(r^3 + r^2 k_e + n (J + m)^2)` rather than :math:`O(q^3)` (two crossed intercepts of 2,500 and 100
        levels: ``r = 100``). Otherwise :math:`H` is ``q x q``, within ``max_capacitance_size``."""
        from bma_gp.kernels.sum_prediction_strategy import _posterior_quadratic_diagonal, _quadratic_diagonal

        self._check_diag("the diagonal of the inverse")
        if not self._elimination_terms():
            # (GPyTorch's leave-one-out objective reads it; the message named a root the user never asked for)
            self._check_root_size(
                "the diagonal of the inverse (diag(K^{-1}), which the leave-one-out objective reads) solves a q x q "
                "system"
            )
        quad = _posterior_quadratic_diagonal(self)
        if quad is None:  # nothing eliminated: H = C^{-1} G from the capacitance's LU (q x q)
            sizes = self._sizes()
            cap = self._capacitance()
            assert cap.lu is not None
            q = sum(sizes)
            eye = torch.eye(q, dtype=core_dtype(self.dtype), device=self.device).expand(*self.batch_shape, q, q)
            H = _LUSolve.apply(*cap.lu, self._apply_G_rest(list(range(len(sizes))), eye))
            quad = _quadratic_diagonal(self, 0.5 * (H + H.mT), sizes)
        dinv = self._working_diag().reciprocal()
        return (dinv - dinv * dinv * quad).to(self.dtype)

    @_scoped
    def sqrt_inv_matmul(self, rhs: Tensor, lhs: Tensor | None = None):
        r""":math:`M^{-1/2} R` with the symmetric inverse square root (or :math:`(L M^{-1/2} R,
        \operatorname{diag}(L M^{-1} L^\top))`), in closed form when :math:`d` is one constant: then the
        inverse root of :meth:`root_inv_decomposition` is symmetric and is :math:`M^{-1/2}`.

        Raises:
            NotImplementedError: ``d`` is not constant (it holds the added diagonal and every summand's ``lam``
                spread over its blocks: a constant noise plus a summand whose ``lam`` varies by block gives a
                varying ``d``); the symmetric :math:`M^{-1/2}` has no closed form in this family
                (``root_inv_decomposition()`` still gives a root :math:`R R^\top = M^{-1}`).
        """
        self._check_rhs(rhs, "rhs")
        check_floating(lhs, "lhs")
        self._check_diag("sqrt_inv_matmul")  # before root_inv_decomposition's check, which would name that
        d = self.diag_values
        if not bool((d == d[..., :1]).all()):
            raise NotImplementedError(
                "sqrt_inv_matmul needs the symmetric inverse square root M^{-1/2}, which has a closed form in "
                "BlockMeanSumLinearOperator only when its diagonal d is one constant; this operator's d varies "
                "from point to point. d collects the added diagonal (noise) and each block mean summand's lam "
                "spread over its blocks, so a constant noise still gives a varying d when some summand's lam "
                "differs between blocks (a BlockMeanKernel's does) or when two summands' lam differ. "
                "root_inv_decomposition() gives a (non-symmetric) root R with R R^T = M^{-1} and solve() gives "
                "M^{-1} R, both in closed form."
            )
        root = self.root_inv_decomposition().root
        res = root.matmul(rhs)
        if lhs is None:
            return res
        lhs_root = root._t_matmul(lhs.mT).mT  # L R (R symmetric here)
        return lhs @ res, lhs_root.pow(2).sum(-1)

    def __repr__(self) -> str:
        return (
            f"BlockMeanSumLinearOperator(shape={tuple(self.shape)}, {self._describe()}, dtype={self.dtype}, "
            f"device={self.device})"
        )


# ---------------------------------------------------------------------------- the roots
def dense_symeig(op: LinearOperator, eigenvectors: bool) -> tuple[Tensor, LinearOperator | None]:
    """``torch.linalg.eigh`` of the dense matrix of ``op`` (in float64 below it), with a
    :class:`~bma_gp.ClosedFormFallbackWarning`: a sum has no closed-form spectrum. Unlike linear_operator's generic
    ``_symeig``, negative eigenvalues are kept, not clamped to zero: an indefinite sum (or a negative multiple) is a
    valid operator for products, solves and log-determinants, and its spectrum is what ``torch.linalg.eigvalsh``
    gives."""
    from linear_operator.operators import DenseLinearOperator

    warn_dense_eigh(op)
    dense = op.to_dense()
    evals, evecs = torch.linalg.eigh(dense.to(core_dtype(dense.dtype)))
    return evals.to(op.dtype), (DenseLinearOperator(evecs.to(op.dtype)) if eigenvectors else None)


def warned_diagonalization(op: LinearOperator, diagonalization, method: str | None):
    """``diagonalization(method)`` of ``op``, warning first when it runs Lanczos (a dense eigendecomposition warns in
    :func:`dense_symeig`)."""
    check_root_method("diagonalization", method)
    if method == "lanczos" or (method is None and op.shape[-1] > linear_operator.settings.max_cholesky_size.value()):
        warn_dense_eigh(op)
    return diagonalization(method=method)


def gram_root_core(
    A: Tensor, G: Tensor, kind: str, what: str, input_dtype: torch.dtype | None = None, band: float = 0.0
) -> Tensor:
    r""":math:`X` with :math:`(I + Y G Y^\top)^{1/2} = I + Y X Y^\top` for any :math:`Y` with :math:`Y^\top Y = A`
    (``kind="root"``), :math:`(I + Y G Y^\top)^{-1/2} = I + Y X Y^\top` (``"inverse"``) or
    :math:`(Y G Y^\top)^{1/2} = Y X Y^\top` (``"zero"``), for a symmetric, possibly indefinite :math:`G`:
    :math:`X = F^+ f(F G F) F^+` with :math:`F = A^{1/2}`, :math:`F^+` its pseudo-inverse and
    :math:`f(e) = \sqrt{1+e} - 1`, :math:`1/\sqrt{1+e} - 1` or :math:`\sqrt{e}` (docs/math.md, "Roots for sampling").
    Eigenvalues of :math:`A` below ``4 q eps`` times its largest count as its null space (:math:`Y` is 0 there to
    rounding), with derivative 0. A ``ValueError`` naming ``what`` when the matrix is not positive (semi)definite
    beyond the rounding of ``input_dtype`` (the operator's; default ``G``'s), eigenvalues within it clamped (the
    square roots); the inverse root allows no band: an eigenvalue of :math:`I + F G F` at or below 0 raises. With
    :class:`bma_gp.settings.validate` off (nothing read back) the square roots clamp the eigenvalues of
    :math:`I + F G F` (:math:`F G F`) to 0 instead, and the inverse root is NaN where one is negative. ``band``
    widens the rounding band of the square roots (relative to the identity): for a ``G`` formed by solves whose
    condition multiplies its rounding (a posterior covariance, positive semidefinite by construction).
    ``A``, ``G`` # shape: (*batch, q, q)"""
    A = 0.5 * (A + A.mT)
    q = A.shape[-1]
    wdt = A.dtype
    eps = torch.finfo(wdt).eps
    # the test of definiteness allows the rounding of the inputs: G (and the d behind A) of a float32 operator
    # carry float32 rounding into F G F even where the working precision is float64 (a float32 posterior at the
    # training inputs, positive semidefinite, showed the eigenvalue -1.2e-4 of I + F G F at n = 2000)
    source = input_dtype or G.dtype
    tol = max(eps, torch.finfo(source).eps) if source.is_floating_point else eps
    zero = kind == "zero"

    def pinv_sqrt(e: Tensor) -> Tensor:
        # e^{-1/2} on the kept eigenvalues and 0 (with derivative 0) on the null space: a grouping crossed with
        # another leaves A singular for every d, and there the derivative would be inf times 0 (so is A^{1/2}'s:
        # floored_sqrt keeps the same eigenvalues)
        kept = e > rounding_floor(e)
        return torch.where(kept, torch.where(kept, e, torch.ones_like(e)).rsqrt(), torch.zeros_like(e))

    F, F_pinv = symmetric_matrix_functions(A, floored_sqrt, pinv_sqrt)  # one eigendecomposition of A
    T = F @ G.to(wdt) @ F
    T = 0.5 * (T + T.mT)

    def positive(e: Tensor) -> Tensor:
        if kind == "inverse":
            # no rounding band here: an eigenvalue 1 + e <= 0 clamped to eps would become 1 / sqrt(eps) in the inverse
            # root, a silently unbounded result (float32 inputs carry a band of about q eps32 max|e|, which can be
            # far above 1), while the log-determinant of the same sum refuses it
            if (settings.validate.on() and not A.is_meta) and bool((e <= -1).any()):
                raise NotPositiveDefiniteError(
                    f"{what} is not positive definite: the eigenvalue {float((e + 1).min()):.3g} of I + F G F (F the "
                    "root of its Gram matrix, G its blocks) is not positive, so it has no inverse square root"
                    + (
                        f" (its inputs are {source}: their rounding alone can move that eigenvalue by about "
                        f"{float(10 * q * tol * (1 + e.detach().abs().amax())):.3g}; in float64 it may be positive)"
                        if tol > eps
                        else ""
                    )
                    + ". Check the signs of its blocks B_j and of its diagonal."
                )
            return e  # validation off: NaN where 1 + e < 0, nothing read back
        bound = (0 if zero else -1) - (10 * q * tol * (1 + e.detach().abs().amax(-1, keepdim=True))).clamp_min(band)
        if not (settings.validate.on() and not A.is_meta):  # nothing read back: square roots clamp
            return e.clamp_min(0 if zero else -1 + eps)
        if bool((e < bound).any()):
            raise NotPositiveDefiniteError(
                f"{what} is not positive {'semidefinite' if zero else 'definite'}: the eigenvalue "
                f"{float((e + (0 if zero else 1)).min()):.3g} of {'F G F' if zero else 'I + F G F'} (F the root of "
                "its Gram matrix, G its blocks) is negative, so it has no square root. Check the signs of its blocks "
                "B_j and of its diagonal."
            )
        return e.clamp_min(0 if zero else -1 + eps)

    def fn(e: Tensor) -> Tensor:
        if zero:  # F G F is singular where A is (crossed groupings): there the root is 0 with derivative 0
            return floored_sqrt(e)
        r = (1 + e).sqrt()
        return -e / (r * (r + 1)) if kind == "inverse" else e / (r + 1)

    W = symmetric_matrix_function(T, fn, positive)
    X = F_pinv @ W @ F_pinv
    return 0.5 * (X + X.mT)


class _SumRootProduct(RootLinearOperator):
    """:math:`R R^\top = M` for the root :math:`R` of :meth:`BlockMeanSumLinearOperator.root_decomposition`: its
    diagonal is the sum's closed form, not a sum over the entries of :math:`R` (linear_operator's default, about
    ``n x n`` work for a root that is known by its products)."""

    def _diagonal(self) -> Tensor:
        root = self.root
        if isinstance(root, (_WoodburyRoot, _ZLRoot)) and not root.transposed:
            return root.parent._diagonal()
        return super()._diagonal()


class _SumInverseRootProduct(RootLinearOperator):
    """:math:`R R^\top = M^{-1}` for the root of :meth:`BlockMeanSumLinearOperator.root_inv_decomposition`: its
    diagonal in closed form (:meth:`BlockMeanSumLinearOperator._inverse_diagonal`)."""

    def _diagonal(self) -> Tensor:
        root = self.root
        if isinstance(root, (_WoodburyRoot, _InverseRoot)) and not root.transposed:
            return root.parent._inverse_diagonal()
        return super()._diagonal()


class _InverseRoot(ByProducts):
    r"""The root of :meth:`BlockMeanSumLinearOperator.root_inv_decomposition`, known by its parent only: the
    :class:`_WoodburyRoot` with its ``q x q`` core :math:`K` is built at the first product, so that reading the
    diagonal of :math:`R R^\top` (``_inverse_diagonal``) never forms :math:`K`, nor meets
    ``max_capacitance_size`` where elimination keeps the work small."""

    def __init__(self, parent: BlockMeanSumLinearOperator, transposed: bool = False):
        super().__init__(parent=parent, transposed=transposed)
        self.parent, self.transposed = parent, transposed

    def _size(self) -> torch.Size:
        return self.parent.shape

    def _transpose_nonbatch(self) -> _InverseRoot:
        return _InverseRoot(parent=self.parent, transposed=not self.transposed)

    def _expand_batch(self, batch_shape) -> _InverseRoot:
        return _InverseRoot(parent=self.parent._expand_batch(batch_shape), transposed=self.transposed)

    def _matmul(self, rhs: Tensor) -> Tensor:
        root = self.parent._inverse_root()
        return (root._transpose_nonbatch() if self.transposed else root)._matmul(rhs)


class _WoodburyRoot(ByProducts):
    r""":math:`R = \operatorname{diag}(\alpha) + \operatorname{diag}(\beta) Z L K L^\top Z^\top
    \operatorname{diag}(\gamma)` for a :class:`BlockMeanSumLinearOperator`'s :math:`Z` (never formed)."""

    def __init__(
        self,
        K: Tensor,
        alpha: Tensor,
        beta: Tensor,
        gamma: Tensor,
        *L: Tensor,
        parent: BlockMeanSumLinearOperator,
        transposed: bool = False,
    ):
        super().__init__(K, alpha, beta, gamma, *L, parent=parent, transposed=transposed)
        self.parent = parent
        self.K, self.L = K, list(L)
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.transposed = transposed

    def _size(self) -> torch.Size:
        return self.parent.shape

    def _transpose_nonbatch(self) -> _WoodburyRoot:
        return _WoodburyRoot(
            self.K, self.alpha, self.gamma, self.beta, *self.L, parent=self.parent, transposed=not self.transposed
        )

    def _matmul(self, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 1
        x = rhs.unsqueeze(-1) if vector else rhs
        wdt = self.K.dtype
        xw = x.to(wdt)
        u = self.parent._z_t(self.gamma.unsqueeze(-1) * xw)
        sizes = [t.shape[-2] for t in u]
        v = torch.cat([Lt.mT @ ut for Lt, ut in zip(self.L, u)], dim=-2)
        y = (self.K @ v).split(sizes, dim=-2)
        z = self.parent._z([Lt @ yt for Lt, yt in zip(self.L, y)])
        res = (self.alpha.unsqueeze(-1) * xw + self.beta.unsqueeze(-1) * z).to(
            torch.promote_types(rhs.dtype, self.parent.dtype)
        )
        return res.squeeze(-1) if vector else res

    def _expand_batch(self, batch_shape):
        return _WoodburyRoot(
            self.K,
            self.alpha,
            self.beta,
            self.gamma,
            *self.L,
            parent=self.parent._expand_batch(batch_shape),
            transposed=self.transposed,
        )


class _ZLRoot(ByProducts):
    r""":math:`R = [Z L, 0]` (``n x max(n, q)``; ``transposed``: :math:`R^\top`) with :math:`L =
    \operatorname{blockdiag}(L_1, \dots, L_J, I_m)`, so that :math:`R R^\top = Z G Z^\top`: the root of a
    :class:`BlockMeanSumLinearOperator` whose diagonal is 0 (SPEC section 5's :math:`[D^{1/2}, Z L]` without the
    columns of :math:`D^{1/2}`). With fewer levels than points (``q < n``) ``n - q`` zero columns pad it to a square,
    so that GPyTorch's ``MultivariateNormal.rsample(base_samples=...)``, which takes ``n`` base samples per draw
    (``base_sample_shape``) and reshapes them to the root's width, works; they are never formed, and products use only
    the first ``q`` rows of the right-hand side. With ``q > n`` the root is ``n x q`` and base samples need ``q``
    entries."""

    def __init__(self, *L: Tensor, parent: BlockMeanSumLinearOperator, transposed: bool = False):
        super().__init__(*L, parent=parent, transposed=transposed)
        self.L, self.parent, self.transposed = list(L), parent, transposed

    def _size(self) -> torch.Size:
        n, q = self.parent.shape[-1], sum(self.parent._sizes())
        width = max(n, q)
        return torch.Size((*self.parent.batch_shape, *((width, n) if self.transposed else (n, width))))

    def _transpose_nonbatch(self) -> _ZLRoot:
        return _ZLRoot(*self.L, parent=self.parent, transposed=not self.transposed)

    def _expand_batch(self, batch_shape) -> _ZLRoot:
        return _ZLRoot(*self.L, parent=self.parent._expand_batch(batch_shape), transposed=self.transposed)

    def _matmul(self, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 1
        x = (rhs.unsqueeze(-1) if vector else rhs).to(self.L[0].dtype)
        sizes, n = self.parent._sizes(), self.parent.shape[-1]
        if self.transposed:  # L^T Z^T x, then the zero rows of the padding
            res = torch.cat([Lt.mT @ ut for Lt, ut in zip(self.L, self.parent._z_t(x))], dim=-2)
            if res.shape[-2] < n:
                res = torch.cat([res, res.new_zeros(*res.shape[:-2], n - res.shape[-2], res.shape[-1])], dim=-2)
        else:  # Z L x, the rows of x against the padding dropped
            pieces = x[..., : sum(sizes), :].split(sizes, dim=-2)
            res = self.parent._z([Lt @ piece for Lt, piece in zip(self.L, pieces)])
        res = res.to(torch.promote_types(rhs.dtype, self.parent.dtype))
        return res.squeeze(-1) if vector else res


# ---------------------------------------------------------------------------- chunked products with the root
@reverse_mode_only("BlockMeanSumLinearOperator (the products with the low-rank root)")
class _RootGram(torch.autograd.Function):
    r"""``(U^T D^{-1} U, U^T x, P_1^T W_1 D^{-1} U, ...)`` over row chunks of ``U`` (``dinv`` = :math:`1/d`).

    With ``exact`` (the default: :class:`bma_gp.settings.fast_root_products` off), every product of the forward
    pass runs in ``dinv``'s working precision: each row chunk of a float32 ``U`` is cast through one reused buffer,
    so the Gram matrix and the block sums are those of ``U``'s own entries to float64 rounding. In float32 the
    rounding of ``U d^{-1}`` entry by entry and of the GEMM reached every direction of ``U^T D^{-1} U``, also the
    nearly null ones of close inducing points, and at condition numbers of 10^7 to 10^9 the log-determinant was
    off by 2.7 to 45 (``tests/test_root_products_precision.py``). Without ``exact`` the products and one chunk's
    block sums run in ``U``'s precision and only the per-chunk results are accumulated in the working precision
    (2.4x less time for the GEMM at ``m = 256``); ``U^T x`` (the right-hand sides, whose quadratic form cancels
    against ``b^T D^{-1} b``) is formed in the working precision either way. The backward pass runs in ``U``'s
    precision: gradients need no more. Chunk temporaries are allocated once per pass and reused: a fresh
    ``n x m``-sized allocation per chunk costs page faults that were a third of the time at ``n = 10^6``.
    """

    @staticmethod
    def forward(ctx, U: Tensor, dinv: Tensor, x: Tensor, labels: tuple, ks: tuple, weights: tuple, exact: bool):
        wdt = dinv.dtype
        pdt = wdt if exact else U.dtype  # the products' precision
        m, n = U.shape[-1], U.shape[-2]
        rows = min(n, _chunk_rows(m, max(U.element_size(), torch.finfo(pdt).bits // 8)))
        batch = torch.broadcast_shapes(U.shape[:-2], x.shape[:-2])
        gram = U.new_zeros(*U.shape[:-2], m, m, dtype=wdt)
        root_t = U.new_zeros(*batch, m, x.shape[-1], dtype=wdt)
        cross = [U.new_zeros(*U.shape[:-2], k, m, dtype=wdt) for k in ks]
        # one chunk's block sums in the products' precision; in the working precision they are the totals
        buffers = cross if pdt == wdt else [U.new_zeros(*U.shape[:-2], k, m, dtype=pdt) for k in ks]
        weights_p = [None if w is None else w.to(pdt) for w in weights]
        dinv_p = dinv.to(pdt)
        cast_buf = U.new_empty(*U.shape[:-2], rows, m, dtype=pdt) if pdt != U.dtype else None
        scaled_buf = U.new_empty(*U.shape[:-2], rows, m, dtype=pdt)
        weighted_buf = U.new_empty(*U.shape[:-2], rows, m, dtype=pdt) if any(w is not None for w in weights_p) else None
        # block sums in a narrower precision stay there for about _FLUSH_TERMS rows per level (at least one chunk),
        # then join the working-precision total: the cast of a k x m buffer per chunk cost more than the sums
        flush_every = [max(1, (_FLUSH_TERMS * k) // rows) for k in ks]
        for chunk, start in enumerate(range(0, n, rows)):
            last = start + rows >= n
            c = min(rows, n - start)
            Uc = U.narrow(-2, start, c)
            if cast_buf is not None:
                Uc = cast_buf.narrow(-2, 0, c).copy_(Uc)
            # an expanded (not broadcast) column: torch's broadcast multiply is 1.5x slower here
            s_c = dinv_p.narrow(-1, start, c).unsqueeze(-1).expand_as(Uc)
            scaled = torch.mul(Uc, s_c, out=scaled_buf.narrow(-2, 0, c))
            gram += (Uc.mT @ scaled).to(wdt)
            if x.shape[-1]:
                root_t += _t_matmul_wide(Uc, x.narrow(-2, start, c))
            for j, buf in enumerate(buffers):
                wj = weights_p[j]
                vals = scaled
                if wj is not None:
                    assert weighted_buf is not None
                    vals = torch.mul(scaled, wj.narrow(0, start, c).unsqueeze(-1), out=weighted_buf.narrow(-2, 0, c))
                buf.index_add_(-2, labels[j].narrow(0, start, c), vals)
                if buf is not cross[j] and (last or (chunk + 1) % flush_every[j] == 0):
                    cross[j] += buf.to(wdt)
                    buf.zero_()
        ctx.save_for_backward(U, dinv, x)
        ctx.labels, ctx.weights = labels, [None if w is None else w.to(U.dtype) for w in weights]
        return (gram, root_t, *cross)

    @staticmethod
    @unbatched_backward("BlockMeanSumLinearOperator (the root's products)")
    @first_order_only("BlockMeanSumLinearOperator (the root's products)")
    def backward(ctx, grad_gram: Tensor, grad_root_t: Tensor, *grad_cross: Tensor):
        # rows a (s = 1/d, G the gradient of the Gram matrix, X_j that of the block sums, R that of U^T x):
        #   d/ds_a = u_a^T G u_a + sum_j w_ja X_j[l_ja] . u_a = u_a . T_a,  T_a = u_a (G + G^T)/2 + g_a,
        #   d/du_a = s_a (u_a (G + G^T) + g_a) + R x_a = 2 s_a (T_a - g_a / 2) + R x_a,
        # with g_a = sum_j w_ja X_j[l_ja], gathered per chunk.
        U, dinv, x = ctx.saved_tensors
        dt = U.dtype
        m, n = U.shape[-1], U.shape[-2]
        sym_half = None if grad_gram is None else ((grad_gram + grad_gram.mT) * 0.5).to(dt)
        g_cross = [None if g is None else g.to(dt).contiguous() for g in grad_cross]  # gathers need rows in memory
        g_root = None if grad_root_t is None or not x.shape[-1] else grad_root_t.to(dt)
        grad_U = torch.empty_like(U) if ctx.needs_input_grad[0] else None
        grad_dinv = torch.zeros_like(dinv) if ctx.needs_input_grad[1] else None
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[2] and g_root is not None else None
        have_g = any(g is not None for g in g_cross)
        if sym_half is None and not have_g:
            if grad_U is not None:
                grad_U.zero_()
        rows = min(n, _chunk_rows(m, U.element_size()))
        shape = (*U.shape[:-2], rows, m)
        g_buf = U.new_empty(shape) if have_g else None
        t_buf = U.new_empty(shape) if (sym_half is not None or sum(g is not None for g in g_cross) > 1) else None
        dinv_u = dinv.to(dt)
        for start in range(0, n, rows):
            c = min(rows, n - start)
            Uc = U.narrow(-2, start, c)
            g = None
            for j, gj in enumerate(g_cross):
                if gj is None:
                    continue
                idx = ctx.labels[j].narrow(0, start, c)
                if g is None:
                    assert g_buf is not None
                    g = torch.index_select(gj, -2, idx, out=g_buf.narrow(-2, 0, c))
                    if ctx.weights[j] is not None:
                        g.mul_(ctx.weights[j].narrow(0, start, c).unsqueeze(-1))
                else:
                    assert t_buf is not None
                    piece = torch.index_select(gj, -2, idx, out=t_buf.narrow(-2, 0, c))
                    if ctx.weights[j] is not None:
                        g.addcmul_(piece, ctx.weights[j].narrow(0, start, c).unsqueeze(-1))
                    else:
                        g.add_(piece)
            T = g
            if sym_half is not None:
                assert t_buf is not None
                T = t_buf.narrow(-2, 0, c)
                if g is not None and Uc.dim() == 2:
                    torch.addmm(g, Uc, sym_half, out=T)
                else:
                    torch.matmul(Uc, sym_half, out=T)
                    if g is not None:
                        T.add_(g)
            s = dinv_u.narrow(-1, start, c).unsqueeze(-1)
            if grad_dinv is not None and T is not None:  # row dot products: batched GEMM, 2x vecdot's speed
                grad_dinv.narrow(-1, start, c).copy_((T.unsqueeze(-2) @ Uc.unsqueeze(-1)).squeeze(-1).squeeze(-1))
            if grad_U is not None:
                out = grad_U.narrow(-2, start, c)
                if T is not None:
                    if sym_half is None:  # T = g
                        torch.mul(T, s.expand_as(T), out=out)
                    else:
                        if g is not None:
                            T.sub_(g, alpha=0.5)
                        torch.mul(T, (2 * s).expand_as(T), out=out)  # 2 s exactly: one pass, not two
                if g_root is not None:  # gradients need no more than U's precision
                    xc = x.narrow(-2, start, c).to(dt)
                    if xc.shape[-1] <= 4:  # outer products: an elementwise pass beats a GEMM with inner size t
                        for i in range(xc.shape[-1]):
                            out.addcmul_(xc[..., i : i + 1], g_root[..., :, i].unsqueeze(-2))
                    else:
                        out.add_(xc @ g_root.mT)
            if grad_x is not None and g_root is not None:
                grad_x.narrow(-2, start, c).copy_(Uc @ g_root)
        return grad_U, grad_dinv, grad_x, None, None, None, None


#: Rows per level summed in ``U``'s precision before they join the working-precision block sums.
_FLUSH_TERMS = 2048

#: Rows of ``U`` cast to the working precision at a time for ``U^T x`` (a buffer that stays in cache).
_CAST_ROWS = 2048


def _t_matmul_wide(Uc: Tensor, xc: Tensor, buf: Tensor | None = None) -> Tensor:
    """:math:`U_c^\\top x_c` in ``x``'s (wider) precision, ``U_c`` cast through one reused cache-sized buffer
    (casting the whole chunk at once allocates and faults in twice its memory). ``buf``: that buffer, at least
    ``min(_CAST_ROWS, rows)`` rows of ``x``'s dtype, to reuse across calls."""
    if Uc.dtype == xc.dtype:
        return Uc.mT @ xc
    if buf is None:
        buf = xc.new_empty(*Uc.shape[:-2], min(_CAST_ROWS, Uc.shape[-2]), Uc.shape[-1])
    total = None
    for s in range(0, Uc.shape[-2], _CAST_ROWS):
        c = min(_CAST_ROWS, Uc.shape[-2] - s)
        piece = buf.narrow(-2, 0, c).copy_(Uc.narrow(-2, s, c)).mT @ xc.narrow(-2, s, c)
        total = piece if total is None else total.add_(piece)
    assert total is not None
    return total


def _chunked_t_matmul(U: Tensor, x: Tensor) -> Tensor:
    """:math:`U^\\top x` accumulated in ``x``'s (working) precision, ``U`` cast one row chunk at a time."""
    rows = _chunk_rows(U.shape[-1])
    grad = torch.is_grad_enabled() and (U.requires_grad or x.requires_grad)
    total: Tensor | None = None
    for Uc, xc in zip(U.split(rows, -2), x.split(rows, -2)):
        out = checkpoint(_t_piece, Uc, xc, use_reentrant=False) if grad else _t_piece(Uc, xc)
        total = out if total is None else total + out
    assert total is not None
    return total


def _t_piece(Uc: Tensor, xc: Tensor) -> Tensor:
    return Uc.to(xc.dtype).mT @ xc


def _chunked_matmul(U: Tensor, y: Tensor) -> Tensor:
    """:math:`U y` in ``y``'s (working) precision, ``U`` cast one row chunk at a time."""
    rows = _chunk_rows(U.shape[-1])
    grad = torch.is_grad_enabled() and (U.requires_grad or y.requires_grad)
    pieces = []
    for Uc in U.split(rows, -2):
        pieces.append(checkpoint(_piece, Uc, y, use_reentrant=False) if grad else _piece(Uc, y))
    return torch.cat(pieces, dim=-2)


def _piece(Uc: Tensor, y: Tensor) -> Tensor:
    return Uc.to(y.dtype) @ y
