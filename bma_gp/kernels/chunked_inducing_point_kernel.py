"""GPyTorch's SGPR kernel with its ``n x m`` root computed in row chunks: the same numbers, a fraction of the memory.

:class:`gpytorch.kernels.InducingPointKernel` forms the root ``U = K(x, Z) L^{-T}`` of its low-rank
covariance in one piece. Autograd then keeps every ``n x m`` intermediate of the base kernel (distances,
exponentials, the kernel matrix) for the backward pass, and the SGPR trace term squares ``U`` once more.
At ``n = 10^6`` and ``m = 256`` in float32 each of these is 1 GB.

:class:`ChunkedInducingPointKernel` computes ``U`` and the row sums of ``U**2`` (the diagonal the trace
term needs) one block of rows at a time under :func:`torch.utils.checkpoint.checkpoint`. Only ``U``
itself is kept; the backward pass recomputes one block's kernel at a time. The price is one more
evaluation of the base kernel per training step.
"""

from __future__ import annotations

import math

import torch
from gpytorch import settings
from gpytorch.kernels import InducingPointKernel
from linear_operator import to_dense
from linear_operator.operators import (
    DiagLinearOperator,
    LowRankRootAddedDiagLinearOperator,
    LowRankRootLinearOperator,
)
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["ChunkedInducingPointKernel"]

#: Bytes of one row block's kernel matrix (the recomputed intermediates are a few times this).
CHUNK_BYTES = 2**24


class _RootWithDiagonal(LowRankRootLinearOperator):
    """``U U^T`` whose diagonal was summed while ``U`` was formed (the trace term reads it without another
    ``n x m`` pass). Operators derived from it (indexing, batch expansion) are plain
    ``LowRankRootLinearOperator``s that compute their own diagonal."""

    def __init__(self, root: Tensor, diagonal: Tensor | None = None):
        super().__init__(root)
        self._known_diagonal = diagonal

    def _diagonal(self) -> Tensor:
        if self._known_diagonal is not None and self._known_diagonal.shape == self.shape[:-1]:
            return self._known_diagonal
        return super()._diagonal()


def _root_block(kernel, x: Tensor, inducing: Tensor, inv_root: Tensor) -> tuple[Tensor, Tensor]:
    root = to_dense(kernel(x, inducing)) @ inv_root
    return root, root.square().sum(-1)


class ChunkedInducingPointKernel(InducingPointKernel):
    r"""A drop-in :class:`gpytorch.kernels.InducingPointKernel` (same arguments, parameters, added loss term
    and predictions) whose root :math:`U = K_{xZ} L^{-\top}` is computed ``chunk_rows`` rows at a time.

    With gradients, each block runs under non-reentrant checkpointing, so the autograd graph holds ``U``
    and the inputs rather than every ``n x m`` intermediate of the base kernel. Summed with
    :class:`~bma_gp.GroupKernel` or :class:`~bma_gp.BlockMeanKernel` the result is the same closed-form
    :class:`~bma_gp.BlockMeanSumLinearOperator` as with GPyTorch's class.

    Args:
        base_kernel, inducing_points, likelihood, active_dims: as for GPyTorch's ``InducingPointKernel``.
        chunk_rows: rows per block; default: about 16 MB of kernel matrix per block.
    """

    def __init__(self, base_kernel, inducing_points, likelihood, active_dims=None, chunk_rows: int | None = None):
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)):
            raise TypeError(f"chunk_rows must be a positive int or None, got {type(chunk_rows).__name__}")
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int or None (the default), got {chunk_rows}")
        super().__init__(base_kernel, inducing_points, likelihood, active_dims=active_dims)
        self.chunk_rows = chunk_rows

    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)
        copied.chunk_rows = self.chunk_rows
        return copied

    def _rows(self, dtype: torch.dtype) -> int:
        if self.chunk_rows is not None:
            return self.chunk_rows
        m = self.inducing_points.shape[-2]
        return max(1024, CHUNK_BYTES // max(1, m * torch.finfo(dtype).bits // 8))

    def _root(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(U, rowsum(U**2))``, block by block, written into one ``n x m`` result (no list of blocks to join)."""
        inv_root = self._inducing_inv_root
        grad = torch.is_grad_enabled()
        rows = self._rows(x.dtype)
        n, m = x.shape[-2], inv_root.shape[-1]
        if n <= rows:
            return _root_block(self.base_kernel, x, self.inducing_points, inv_root)
        root = diag = None
        for start in range(0, n, rows):
            xc = x.narrow(-2, start, min(rows, n - start))
            if grad:
                block, block_diag = checkpoint(
                    _root_block, self.base_kernel, xc, self.inducing_points, inv_root, use_reentrant=False
                )
            else:
                block, block_diag = _root_block(self.base_kernel, xc, self.inducing_points, inv_root)
            if root is None or diag is None:
                batch = block.shape[:-2]
                root = block.new_empty(*batch, n, m)
                diag = block_diag.new_empty(*batch, n)
            # in-place copies into slices: autograd hands each block its slice of the gradient
            root[..., start : start + block.shape[-2], :] = block
            diag[..., start : start + block.shape[-2]] = block_diag
        assert root is not None and diag is not None
        return root, diag

    def _get_covariance(self, x1: Tensor, x2: Tensor):
        if not torch.equal(x1, x2):  # test x train: t x n, built from two roots as GPyTorch does
            return super()._get_covariance(x1, x2)
        root, diag = self._root(x1)
        covar = _RootWithDiagonal(root, diag)
        if not self.training and settings.sgpr_diagonal_correction.on():
            correction = (self.base_kernel(x1, x2, diag=True) - diag).clamp(0, math.inf)
            covar = LowRankRootAddedDiagLinearOperator(covar, DiagLinearOperator(correction))
        return covar
