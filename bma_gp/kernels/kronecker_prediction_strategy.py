r"""Closed-form prediction of a multitask model on a block mean kernel, ``fast_pred_var`` (LOVE) included.

``MultitaskKernel(BlockMeanKernel(...))`` (or around a ``GroupKernel``) under a ``MultitaskGaussianLikelihood`` of
any rank has the training covariance :math:`\Sigma = M \otimes K + I_n \otimes D`, solved in closed form by
:mod:`bma_gp._kronecker`. At new inputs its cross covariance is :math:`(A P^\top) \otimes K_*`
(:class:`~bma_gp.kernels.BlockCrossLinearOperator` times the task matrix): its rows are constant within the training
blocks, so they meet :math:`\Sigma^{-1}` only in the span of the block indicators, where :math:`\Sigma` acts as the
core :math:`H = C \otimes K + I_k \otimes D` (``k t x k t``; ``k`` blocks of ``t x t`` for a diagonal ``B``):

.. math::

    (P^\top \otimes I_t)\, \Sigma^{-1} (P \otimes I_t) = (S^{1/2} \otimes I_t)\, H^{-1} (S^{1/2} \otimes I_t)
    = W W^\top, \qquad W = (S^{1/2} \otimes I_t)\, L_H^{-\top},

so that, with :math:`\alpha = \Sigma^{-1} (y - m)` and :math:`Z` its block sums (``k x t``),

.. math::

    \mu_* = m_* + \operatorname{vec}(A Z K_*^\top), \qquad
    \Sigma_* = K_{**} - F F^\top, \quad F = (A \otimes K_*)\, W \quad (n_* t \times k t).

At the training inputs themselves the cross covariance is :math:`M' \otimes K'` (the prior there), and the
posterior covariance :math:`M' \otimes K' - (M' \otimes K') \Sigma^{-1} (M' \otimes K')` keeps the split:
:math:`V_i = \lambda_i K' - \lambda_i^2 K' G_i^{-1} K'` within block :math:`i` and
:math:`Q = C \otimes K' - (C \otimes K') H^{-1} (C \otimes K')` on the block means (:class:`_KroneckerSplit`, whose
products, diagonal, roots for draws, solves and log-determinant are read from those small matrices; the
likelihood's noise adds :math:`D` to each).

GPyTorch's default strategy (which ``MultitaskKernel`` asks for) formed the ``n t x n t`` inverse root of
:math:`\Sigma` densely under ``fast_pred_var`` (``(n t)^2`` memory: +0.24-0.28 GB at ``n = 2000``, +0.95-0.98 GB
at ``n = 5000``, ``t = 2``) and the ``n_* t x n t`` cross covariance without it (``n t x n t`` at the training
inputs, whose draws and ``log_prob`` then took a dense Cholesky factorisation of that size).
:class:`KroneckerPredictionStrategy` keeps the closed form's small factors, :math:`W` (``O((k t)^2)``, or
``O(k t^2)`` for a diagonal ``B``) and :math:`\alpha` as its caches, computed once and reused by every later call as
GPyTorch's LOVE cache is; the predictive covariance at new inputs is :math:`K_{**}` minus the Gram matrix of
:math:`F`, subtracted in the working precision (float64 for a float32 model), and nothing ``n x n`` is formed. The
result is exact, so it is the same with ``fast_pred_var`` on or off.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from gpytorch import settings
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from gpytorch.utils.memoize import cached
from linear_operator import to_linear_operator
from linear_operator.operators import (
    ConstantMulLinearOperator,
    DiagLinearOperator,
    KroneckerProductLinearOperator,
    LinearOperator,
    MatmulLinearOperator,
    RootLinearOperator,
    SumKroneckerLinearOperator,
    SumLinearOperator,
    ZeroLinearOperator,
)
from torch import Tensor

from bma_gp._errors import NotPositiveDefiniteError
from bma_gp._indexing import check_floating
from bma_gp._kronecker import signal_parts
from bma_gp._warnings import ClosedFormFallbackWarning
from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator
from bma_gp.kernels._bound_data import check_prediction_dtype
from bma_gp.kernels.block_cross_linear_operator import BlockCrossLinearOperator
from bma_gp.kernels.prediction_strategy import _attach_clear_hook
from bma_gp.kernels.sum_prediction_strategy import KeepsIntegers, _cast_target
from bma_gp.partition import Partition

__all__ = ["KroneckerPredictionStrategy"]


def _constants(op, scale: Tensor | None = None) -> tuple[Any, Tensor | None]:
    """``(B, c)`` with ``op = c B`` under any number of constant multiples (``ScaleKernel``s; ``c`` of shape
    ``(*batch, 1, 1)``, None for 1), times ``scale`` where one is given."""
    while isinstance(op, ConstantMulLinearOperator):
        constant = op.expanded_constant
        scale = constant if scale is None else scale * constant
        op = op.base_linear_op
    return op, scale


def _scaled_cross(op, scale: Tensor | None = None) -> tuple[BlockCrossLinearOperator, Tensor | None] | None:
    """``(A P^T, c)`` with ``op = c A P^T`` (times ``scale``): a block cross covariance under any number of constant
    multiples, else None."""
    op, scale = _constants(op, scale)
    if isinstance(op, SumLinearOperator):
        # kernels over the same blocks summed inside the MultitaskKernel (BlockMeanKernel + GroupKernel over the
        # group ids), which the training covariance adds into one block mean factor: their A's added into one
        parts = [_scaled_cross(part) for part in op.linear_ops]
        if not parts or any(part is None for part in parts):
            return None
        found = [part for part in parts if part is not None]
        partition = found[0][0].partition
        values = torch.zeros((), dtype=found[0][0].dtype, device=found[0][0].device)
        for cross, c in found:
            if cross.partition is not partition and not cross.partition.same_as(partition):
                return None
            values = values + (cross.values if c is None else cross.values * c.to(cross.values.dtype))
        return BlockCrossLinearOperator(values, partition), scale
    if not isinstance(op, BlockCrossLinearOperator) or op.transposed:
        return None
    return op, scale


class _KroneckerOneHotGram(KeepsIntegers, LinearOperator):
    r""":math:`F F^\top` for an ``n_* t x k t`` :math:`F` whose row block ``j`` (``t`` rows) is :math:`F_j`
    (``t x t``) in column block :math:`c_j` and zero elsewhere (``c_j = -1``: zero rows): entries
    :math:`[c_j = c_l] (F_j F_l^\top)_{ab}`. What a ``GroupKernel``'s prediction subtracts (one group per new point,
    a diagonal ``B``): products in ``O(n_* t (t + c) + k t c)``, the diagonal in ``O(n_* t^2)``, nothing
    ``n_* t x k t``.

    Args:
        factors: the :math:`F_j`. # shape: (*batch, n_*, t, t)
        columns: the :math:`c_j`. # shape: (n_*,)
        num_columns: ``k``.
    """

    def __init__(self, factors: Tensor, columns: Tensor, num_columns: int):
        super().__init__(factors, columns=columns, num_columns=num_columns)
        self.factors, self.columns, self.num_columns = factors, columns, num_columns
        self._index = columns.clamp_min(0)

    def _size(self) -> torch.Size:
        *batch, rows, t, _ = self.factors.shape
        return torch.Size((*batch, rows * t, rows * t))

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _expand_batch(self, batch_shape) -> LinearOperator:
        return _KroneckerOneHotGram(
            self.factors.expand(*batch_shape, *self.factors.shape[-3:]), self.columns, self.num_columns
        )

    def _matmul(self, rhs: Tensor) -> Tensor:
        check_floating(rhs, "rhs")
        vector = rhs.dim() == 1
        x = rhs.unsqueeze(-1) if vector else rhs
        rows, t = self.factors.shape[-3:-1]
        x = x.to(self.factors.dtype).unflatten(-2, (rows, t))  # (*batch, n_*, t, c)
        projected = self.factors.mT @ x  # F_j^T x_j
        sums = projected.new_zeros(*projected.shape[:-3], self.num_columns, *projected.shape[-2:])
        sums = sums.index_add(-3, self._index, projected)  # per column block (zero rows add nothing)
        res = (self.factors @ sums.index_select(-3, self._index)).flatten(-3, -2)
        return res.squeeze(-1) if vector else res

    def _diagonal(self) -> Tensor:
        return self.factors.square().sum(-1).flatten(-2)

    def to_dense(self) -> Tensor:
        same = (self.columns.unsqueeze(-1) == self.columns.unsqueeze(-2)).to(self.factors.dtype)  # (n_*, n_*)
        blocks = torch.einsum("...jac,...lbc->...jalb", self.factors, self.factors)
        res = blocks * same[:, None, :, None]
        rows, t = self.factors.shape[-3:-1]
        return res.reshape(*res.shape[:-4], rows * t, rows * t)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        t = self.factors.shape[-2]
        factors = self.factors.expand(*self.batch_shape, *self.factors.shape[-3:])
        left = factors[(*batch_indices, row_index // t, row_index % t)]  # (..., t)
        right = factors[(*batch_indices, col_index // t, col_index % t)]
        same = self.columns[row_index // t] == self.columns[col_index // t]
        value = (left * right).sum(-1)
        return torch.where(same, value, torch.zeros_like(value))


def _scaled_block_mean(op) -> tuple[BlockMeanLinearOperator, Tensor | None] | None:
    """``(M, c)`` with ``op = c M`` for a symmetric block mean operator ``M`` under any number of constant multiples,
    else None."""
    op, scale = _constants(op)
    if not isinstance(op, BlockMeanLinearOperator) or not op.symmetric:
        return None
    return op, scale


def _cholesky(A: Tensor, what: str) -> Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        raise NotPositiveDefiniteError(
            f"the posterior covariance of this multitask model at its training inputs is singular ({what} is not "
            "positive definite: a block whose covariance the data determine exactly, such as a GroupKernel's "
            "within-group directions), so it has no solve or log-determinant. Add the likelihood's noise "
            "(likelihood(model(train_x))), whose covariance is positive definite."
        )
    return L


class _KroneckerSplit(KeepsIntegers, LinearOperator):
    r""":math:`\sum_i \Pi_i \otimes V_i + (U \otimes I_t)\, Q\, (U \otimes I_t)^\top` over ``n`` points in ``k`` blocks
    and ``t`` tasks (the task index the fastest, as ``MultitaskKernel`` orders it), with :math:`\Pi_i` the centring
    within block :math:`i`, :math:`U = P S^{-1/2}` the normalised block indicators, :math:`V_i` ``t x t`` and
    :math:`Q` ``k t x k t`` (``k`` blocks of ``t x t`` where it is block diagonal): the form of a Kronecker sum with a
    block mean factor (:mod:`bma_gp._kronecker`) and of the posterior covariance of such a model at its training
    inputs. Products split a right-hand side into block sums and within-block deviations, ``O(n t (t + c) +
    (k t)^2 c)``; the diagonal, roots (for draws), solves and the log-determinant are read from the small matrices
    (held in the working precision, ``output_dtype`` what the operator returns). Nothing ``n t x n t`` is formed but by
    :meth:`to_dense`.

    Args:
        deviation: the :math:`V_i`. # shape: (*batch, k, t, t)
        core: :math:`Q`. # shape: (*batch, k t, k t) or (*batch, k, t, t)
        partition: the blocks of the ``n`` points.
        output_dtype: the dtype of what the operator returns (None: the blocks').
    """

    def __init__(self, deviation: Tensor, core: Tensor, partition: Partition, output_dtype: torch.dtype | None = None):
        super().__init__(deviation, core, partition=partition, output_dtype=output_dtype)
        self.deviation, self.core, self.partition = deviation, core, partition
        self._output_dtype = output_dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.deviation.dtype if self._output_dtype is None else self._output_dtype

    @property
    def _t(self) -> int:
        return self.deviation.shape[-1]

    @property
    def _full(self) -> bool:
        """Whether :math:`Q` is held whole (``k t x k t``), not as its ``k`` diagonal blocks."""
        return self.core.dim() == self.deviation.dim() - 1

    def _size(self) -> torch.Size:
        core_batch = self.core.shape[:-2] if self._full else self.core.shape[:-3]
        batch = torch.broadcast_shapes(self.deviation.shape[:-3], core_batch)
        size = self.partition.n * self._t
        return torch.Size((*batch, size, size))

    def _with(self, deviation: Tensor, core: Tensor) -> _KroneckerSplit:
        return _KroneckerSplit(deviation, core, self.partition, self._output_dtype)

    def _transpose_nonbatch(self) -> LinearOperator:
        return self._with(self.deviation.mT, self.core.mT)

    def _expand_batch(self, batch_shape) -> LinearOperator:
        core = self.core.expand(*batch_shape, *self.core.shape[-2 if self._full else -3 :])
        return self._with(self.deviation.expand(*batch_shape, *self.deviation.shape[-3:]), core)

    def to(self, *args: Any, **kwargs: Any) -> LinearOperator:
        """The same operator returning ``dtype`` (the blocks keep the working precision, widened if ``dtype`` is wider
        still), its parts moved to ``device``."""
        device, dtype = _cast_target(*args, **kwargs)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"a predictive covariance can be cast to a floating-point dtype only, got {dtype}")
        wide = self.deviation.dtype if dtype is None else torch.promote_types(self.deviation.dtype, dtype)
        return _KroneckerSplit(
            self.deviation.to(device=device, dtype=wide),
            self.core.to(device=device, dtype=wide),
            self.partition.to(device) if device is not None else self.partition,
            self.dtype if dtype is None else dtype,
        )

    # ------------------------------------------------------------------ products
    def _apply(self, deviation: Tensor, core: Tensor, rhs: Tensor) -> Tensor:
        """``rhs`` (``(*batch, n t, c)``) times the operator of these blocks, in their dtype."""
        partition, t = self.partition, self._t
        x = rhs.to(deviation.dtype).unflatten(-2, (partition.n, t))  # (*batch, n, t, c)
        sizes = partition.sizes.to(device=x.device, dtype=x.dtype)
        sums = partition.block_sum(x, dim=-3)  # (*batch, k, t, c)
        res = partition.expand(deviation, dim=-3) @ (x - partition.expand(sums / sizes[:, None, None], dim=-3))
        root = sizes.sqrt()[:, None, None]
        z = sums / root
        if core.dim() == deviation.dim() - 1:  # Q whole
            w = (core @ z.flatten(-3, -2)).unflatten(-2, (partition.num_blocks, t))
        else:
            w = core @ z
        return (res + partition.expand(w / root, dim=-3)).flatten(-3, -2)

    def _matmul(self, rhs: Tensor) -> Tensor:
        check_floating(rhs, "rhs")
        vector = rhs.dim() == 1
        x = rhs.unsqueeze(-1) if vector else rhs
        res = self._apply(self.deviation, self.core, x).to(torch.promote_types(rhs.dtype, self.dtype))
        return res.squeeze(-1) if vector else res

    def _diagonal(self) -> Tensor:
        r""":math:`(1 - 1/s_i) [V_i]_{aa} + Q_{(i, a), (i, a)} / s_i` at a point of block :math:`i`, task :math:`a`."""
        partition, t = self.partition, self._t
        sizes = partition.sizes.to(device=self.deviation.device, dtype=self.deviation.dtype)[:, None]
        core = self.core.diagonal(dim1=-2, dim2=-1)
        core = core.unflatten(-1, (partition.num_blocks, t)) if self._full else core
        deviation = self.deviation.diagonal(dim1=-2, dim2=-1)
        return partition.expand((1 - 1 / sizes) * deviation + core / sizes, dim=-2).flatten(-2).to(self.dtype)

    def to_dense(self) -> Tensor:
        size = self.shape[-1]
        eye = torch.eye(size, dtype=self.deviation.dtype, device=self.deviation.device)
        return self._apply(self.deviation, self.core, eye).expand(*self.shape).to(self.dtype)

    def evaluate_kernel(self) -> LinearOperator:
        return self

    # ------------------------------------------------------------------ roots, solves, log-determinant
    @cached(name="root_decomposition")
    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        r""":math:`R R^\top` with :math:`R` of the same form, :math:`R_{V_i} R_{V_i}^\top = V_i` and :math:`R_Q R_Q^\top
        = Q` from the small matrices' eigendecompositions (eigenvalues below 0, rounding of a positive semi-definite
        matrix, clamped to 0): ``n t x n t``, applied by products (draws); ``method`` is ignored."""

        def root(A: Tensor) -> Tensor:
            values, vectors = torch.linalg.eigh(0.5 * (A + A.mT))
            return vectors * values.clamp_min(0).sqrt().unsqueeze(-2)

        return RootLinearOperator(self._with(root(self.deviation), root(self.core)))

    def _factors(self) -> tuple[Tensor, Tensor]:
        """The Cholesky factors of the :math:`V_i` (the identity for a singleton block, which has no within-block
        direction) and of :math:`Q`."""
        single = (self.partition.sizes == 1).to(self.deviation.device)[:, None, None]
        eye = torch.eye(self._t, dtype=self.deviation.dtype, device=self.deviation.device)
        deviation = torch.where(single, eye, self.deviation)
        return _cholesky(deviation, "a within-block t x t matrix"), _cholesky(self.core, "the block means' matrix")

    def _closed_solve(self, rhs: Tensor, factors: tuple[Tensor, Tensor] | None = None) -> Tensor:
        LV, LQ = self._factors() if factors is None else factors
        res = self._apply(torch.cholesky_inverse(LV), torch.cholesky_inverse(LQ), rhs)
        return res.to(torch.promote_types(rhs.dtype, self.dtype))

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        check_floating(right_tensor, "right_tensor")
        vector = right_tensor.dim() == 1
        res = self._closed_solve(right_tensor.unsqueeze(-1) if vector else right_tensor)
        res = res.squeeze(-1) if vector else res
        return res if left_tensor is None else left_tensor @ res

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int | None = 0):
        return self._closed_solve(rhs)

    def _logdet(self, factors: tuple[Tensor, Tensor] | None = None) -> Tensor:
        r""":math:`\sum_i (s_i - 1) \log|V_i| + \log|Q|`."""
        LV, LQ = self._factors() if factors is None else factors
        weights = (self.partition.sizes - 1).to(device=LV.device, dtype=LV.dtype)
        res = (weights * 2 * LV.diagonal(dim1=-2, dim2=-1).log().sum(-1)).sum(-1)
        log_Q = 2 * LQ.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return (res + (log_Q if self._full else log_Q.sum(-1))).to(self.dtype)

    def logdet(self) -> Tensor:
        return self._logdet()

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool | None = False, reduce_inv_quad=True):
        factors = self._factors()
        inv_quad = None
        if inv_quad_rhs is not None:
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
            inv_quad = (rhs * self._closed_solve(rhs, factors)).sum(-2)
            if reduce_inv_quad:
                inv_quad = inv_quad.sum(-1)
        return inv_quad, self._logdet(factors) if logdet else None

    # ------------------------------------------------------------------ the likelihood's noise
    def _task_noise(self, other) -> Tensor | None:
        """``D`` (``(*batch, t, t)``, working precision) with ``other = I_n (x) D`` (a ``MultitaskGaussianLikelihood``'s
        noise of any rank, a constant diagonal), else None."""
        from bma_gp._kronecker import _identity_scale, _symmetric, _task_noise

        n, t, wdt = self.partition.n, self._t, self.deviation.dtype
        if isinstance(other, SumLinearOperator):
            parts = [self._task_noise(part) for part in other.linear_ops]
            return None if any(p is None for p in parts) else functools.reduce(torch.add, parts)  # type: ignore[arg-type]
        if isinstance(other, DiagLinearOperator):
            values = _task_noise(other, n, t, True)
            return None if values is None else torch.diag_embed(values.to(wdt))
        if isinstance(other, KroneckerProductLinearOperator) and len(other.linear_ops) == 2:
            data, task = other.linear_ops
            if task.shape[-1] != t or task.shape[-2] != t:
                return None
            scale = _identity_scale(data, n)
            return None if scale is None else _symmetric(task, wdt) * scale.to(wdt).unsqueeze(-1)
        return None

    def __add__(self, other):
        D = self._task_noise(other) if isinstance(other, LinearOperator) and other.shape == self.shape else None
        if D is None:
            return super().__add__(other)
        k = self.partition.num_blocks
        core = self.core + (
            _block_diagonal(D.unsqueeze(-3).expand(*D.shape[:-2], k, *D.shape[-2:])) if self._full else D.unsqueeze(-3)
        )
        return self._with(self.deviation + D.unsqueeze(-3), core)


def _block_diagonal(blocks: Tensor) -> Tensor:
    """The block diagonal matrix of ``k`` blocks ``t x t``, ``(*batch, k, t, t)`` -> ``(*batch, k t, k t)``."""
    k, t = blocks.shape[-3], blocks.shape[-1]
    eye = torch.eye(k, dtype=blocks.dtype, device=blocks.device)
    return (eye[:, None, :, None] * blocks.unsqueeze(-2)).reshape(*blocks.shape[:-3], k * t, k * t)


class KroneckerPredictionStrategy(DefaultPredictionStrategy):
    r"""Closed-form exact prediction of ``MultitaskKernel(BlockMeanKernel or GroupKernel)`` with a
    ``MultitaskGaussianLikelihood`` (any rank), at new inputs (see the module docstring) and at the training inputs
    themselves (:meth:`_training_prediction`): the caches are the small Cholesky factors of the training covariance's
    closed form, :math:`W` and :math:`\alpha` with its block sums :math:`Z`, and ``fast_pred_var`` changes nothing
    (both paths are exact). GPyTorch's default strategy is used where the training covariance has no closed form (its
    solves warn themselves), where the test-by-training covariance is neither (``cat(train_x, new_x)``, a fantasy
    model) and where an observation NaN policy other than ``"ignore"`` is set; there, under ``fast_pred_var``, a
    :class:`~bma_gp.ClosedFormFallbackWarning` says that GPyTorch forms the ``n t x n t`` inverse root densely.

    Built by GPyTorch's ``prediction_strategy`` for such models (routed by
    :func:`bma_gp.kernels.task_prediction_strategy.install`).
    """

    @cached(name="kronecker_closed_form")
    def _closed_form(self):
        """The closed form of the noisy training covariance (:class:`~bma_gp._kronecker.KroneckerBlockMean`, task
        index the fastest, as ``MultitaskKernel`` orders it), or None (read once: finding it compares the noise at
        every point)."""
        from bma_gp._composition import _ClosedKroneckerSum

        covar = self.lik_train_train_covar
        closed = covar._closed() if isinstance(covar, _ClosedKroneckerSum) else None
        return closed if closed is not None and closed.data_first else None

    def _cross(self, closed, test_train_covar) -> list[tuple[BlockCrossLinearOperator, Tensor]] | None:
        """``[(A_q P^T, K_q*)]`` with ``test_train_covar = sum_q (c_q A_q P^T) (x) K_q*`` over the training partition
        (each constant ``c_q`` folded into ``K_q*``, in the working precision), else None."""
        if closed is None:
            return None
        res = []
        for data, task, scale in _kronecker_terms(test_train_covar):
            found = _scaled_cross(data, scale)
            if found is None or task.shape[-1] != closed.t or task.shape[-2] != closed.t:
                return None
            cross, scale = found
            if not cross.partition.same_as(closed.partition):
                return None
            K = task.to_dense().to(closed.dtype)
            res.append((cross, K if scale is None else K * scale.to(K.dtype)))
        return res or None

    def _training_factor(self, closed, op) -> list[tuple[BlockMeanLinearOperator, Tensor]] | None:
        """``[(M_q', K_q')]`` in the working precision with ``op = sum_q M_q' (x) K_q'`` (a constant multiple folded
        into ``K_q'``), every ``M_q'`` a symmetric block mean operator over the training partition (the prior at the
        training inputs), else None."""
        if closed is None:
            return None
        res = []
        for data, task, outer in _kronecker_terms(op):
            found = _scaled_block_mean(data)
            if found is None or task.shape[-1] != closed.t or task.shape[-2] != closed.t:
                return None
            M, scale = found
            if M.shape[-1] != closed.n or not M.partition.same_as(closed.partition):
                return None
            K = task.to_dense().to(closed.dtype)
            for c in (scale, outer):
                K = K if c is None else K * c.to(K.dtype)
            res.append((M, K))
        return res or None

    # ------------------------------------------------------------------ caches
    @cached(name="kronecker_factors")
    def _factors(self) -> tuple[Tensor, Tensor]:
        """``(L_G, L_H)``: the Cholesky factors of the training covariance's closed form
        (:meth:`~bma_gp._kronecker.KroneckerBlockMean.factors`), ``L_H`` ``(*batch, k t, k t)`` or, for a diagonal
        ``B``, ``(*batch, k, t, t)``."""
        LG, LH, _ = self._closed_form().factors()
        if settings.detach_test_caches.on():
            LG, LH = LG.detach(), LH.detach()
        return _attach_clear_hook(self, LG), _attach_clear_hook(self, LH)

    def _blocks_only(self) -> bool:
        """Whether :math:`L_H` (and :math:`W`) are held as their ``k`` diagonal ``t x t`` blocks, ``(*batch, k, t,
        t)``: every block mean factor has a diagonal ``B`` (:meth:`~bma_gp._kronecker.KroneckerBlockMean.factors`).
        Read from the closed form, not from a shape: with one block (``k = 1``) both forms end in ``t x t``, and the
        blocks' extra dimension was taken for a batch dimension (predictions of shape ``(1, n_*, t)``, or a batched
        model's ``(b, b, n_*, t)`` and a crash at the training inputs)."""
        return self._closed_form().diagonal_core()

    @cached(name="kronecker_covar_cache")
    def _covar_factor(self) -> Tensor:
        r""":math:`W = (S^{1/2} \otimes I_t) L_H^{-\top}` with :math:`W W^\top = (P^\top \otimes I) \Sigma^{-1}
        (P \otimes I)`, in the working precision: ``(*batch, k t, k t)``, or ``(*batch, k, t, t)`` (its diagonal
        blocks) for a diagonal ``B``. # the LOVE cache"""
        closed = self._closed_form()
        _, LH = self._factors()
        eye = torch.eye(LH.shape[-1], dtype=LH.dtype, device=LH.device).expand_as(LH)
        inverse_transposed = torch.linalg.solve_triangular(LH.mT, eye, upper=True)  # L_H^{-T}
        root = closed.partition.sizes.to(device=LH.device, dtype=LH.dtype).sqrt()
        if self._blocks_only():  # diagonal B: one t x t factor per block
            return root[:, None, None] * inverse_transposed
        return root.repeat_interleave(closed.t)[:, None] * inverse_transposed

    @cached(name="kronecker_alpha")
    def _alpha(self) -> Tensor:
        r""":math:`\alpha = \Sigma^{-1} (y - m)` in the working precision, point by point: the mean sums it over each
        block (float32 lost those sums). # shape: (*batch, n, t)"""
        closed = self._closed_form()
        wdt = closed.dtype
        train_mean = self.likelihood(self.train_prior_dist, self.train_inputs).loc
        offset = (self.train_labels - train_mean).to(wdt).unsqueeze(-1)
        res = closed.solve(offset).squeeze(-1).unflatten(-1, (closed.n, closed.t))
        if settings.detach_test_caches.on():
            res = res.detach()
        return _attach_clear_hook(self, res)

    @cached(name="kronecker_mean_cache")
    def _mean_sums(self) -> Tensor:
        r"""The block sums :math:`Z = (P^\top \otimes I_t) \alpha`. # shape: (*batch, k, t)"""
        return self._closed_form().partition.block_sum(self._alpha(), dim=-2)

    @property
    @cached(name="covar_cache")
    def covar_cache(self):
        """GPyTorch's cache (the dense ``n t x n t`` inverse root), for the paths that still take it: announced with a
        :class:`~bma_gp.ClosedFormFallbackWarning` where the training covariance has a closed form."""
        if self._closed_form() is not None:
            size = self.lik_train_train_covar.shape[-1]
            warnings.warn(
                f"fast_pred_var: GPyTorch's prediction strategy forms the dense {size} x {size} inverse root of the "
                "training covariance of this MultitaskKernel around a block mean kernel (O((n t)^2) memory), because "
                "the test-by-training covariance is neither one of new inputs nor one of the training inputs over "
                "the training blocks (cat(train_x, new_x), say), or an observation NaN policy other than 'ignore' is "
                "set, or a fantasy model asks for it. Predict at new inputs and at the training inputs apart, or "
                "leave gpytorch.settings.fast_pred_var off.",
                ClosedFormFallbackWarning,
                stacklevel=5,
            )
        return super().covar_cache

    # ------------------------------------------------------------------ prediction
    def exact_prediction(self, test_mean: Tensor, test_test_covar, test_train_covar):
        if settings.observation_nan_policy.value() != "ignore":
            return super().exact_prediction(test_mean, test_test_covar, test_train_covar)
        closed = self._closed_form()
        training = self._training_factor(closed, test_train_covar)
        if training is not None:
            prior = self._training_factor(closed, test_test_covar)
            if prior is not None:
                check_prediction_dtype(self, test_train_covar)
                return self._training_prediction(closed, test_mean, training, prior, test_train_covar.dtype)
        crosses = self._cross(closed, test_train_covar)
        if crosses is None:
            return super().exact_prediction(test_mean, test_test_covar, test_train_covar)
        check_prediction_dtype(self, test_train_covar)
        sums = self._mean_sums()  # Z, (*batch, k, t)
        shift = None
        for cross, K in crosses:  # sum_q A_q Z K_q*^T
            AZ = cross._gather_blocks(sums) if cross.is_one_hot else cross.values.to(sums.dtype) @ sums
            term = AZ @ K.mT
            shift = term if shift is None else shift + term
        assert shift is not None
        dtype = torch.promote_types(test_mean.dtype, test_train_covar.dtype)
        mean = test_mean.to(dtype) + shift.flatten(-2).to(dtype)
        if settings.skip_posterior_variances.on():
            return mean, ZeroLinearOperator(*test_test_covar.shape, dtype=test_test_covar.dtype, device=mean.device)
        if settings.fast_pred_var.on():
            self._last_test_train_covar = test_train_covar
        gram = self._gram(crosses)
        if torch.is_tensor(test_test_covar):
            return mean, to_linear_operator((test_test_covar.to(gram.dtype) - gram.to_dense()).to(dtype))
        from bma_gp.kernels.prediction_strategy import _PredictiveDifference

        return mean, _PredictiveDifference(test_test_covar, gram)

    def _gram(self, crosses: list[tuple[BlockCrossLinearOperator, Tensor]]) -> LinearOperator:
        r""":math:`F F^\top` with :math:`F = \sum_q (A_q \otimes K_q*) W` in the working precision."""
        W = self._covar_factor()
        first = crosses[0][0]
        k, t = first.partition.num_blocks, crosses[0][1].shape[-1]
        blocks = self._blocks_only()
        if blocks:  # diagonal cores: W block diagonal, (*batch, k, t, t)
            columns = first.columns
            same_columns = columns is not None and all(
                cross.columns is not None and torch.equal(cross.columns, columns) for cross, _ in crosses
            )
            if same_columns:  # F_j = sum_q a_{q,j} K_q* W_{c_j}: one t x t block per new point
                assert columns is not None
                factors = None
                for cross, K in crosses:
                    part = cross._gather_blocks((K.unsqueeze(-3) @ W).flatten(-2)).unflatten(-1, (t, t))
                    factors = part if factors is None else factors + part
                assert factors is not None
                return _KroneckerOneHotGram(factors, columns, k)
            if len(crosses) > 1:  # one-hot rows in different columns: the block diagonal W whole
                W, blocks = _block_diagonal(W), False
        F = None
        if blocks:  # (one term, a diagonal B, a cross that is not one-hot)
            cross, K = crosses[0]
            KW = K.unsqueeze(-3) @ W  # K_* W_i, (*batch, k, t, t)
            A = cross.values.to(W.dtype)  # F[(j, a), (i, c)] = A_ji (K_* W_i)_ac
            F = (A[..., :, None, :, None] * KW.transpose(-3, -2).unsqueeze(-4)).flatten(-2)  # (*batch, n_*, t, k t)
        else:
            W3 = W.unflatten(-2, (k, t)).flatten(-2)  # (*batch, k, t k t)
            for cross, K in crosses:
                AW = cross._gather_blocks(W3) if cross.is_one_hot else cross.values.to(W.dtype) @ W3
                part = K.unsqueeze(-3) @ AW.unflatten(-1, (t, k * t))  # (*batch, n_*, t, k t)
                F = part if F is None else F + part
        assert F is not None
        F = F.flatten(-3, -2)  # (*batch, n_* t, k t)
        return MatmulLinearOperator(F, F.mT)

    def _training_prediction(self, closed, test_mean: Tensor, cross, prior, cross_dtype: torch.dtype):
        r"""The posterior at the training inputs, with :math:`X = \sum_q M_q' \otimes K_q'` the prior covariance there
        (the test-by-training one) and :math:`T = \sum_q M_q'' \otimes K_q''` the test one (the same matrix):
        :math:`\mu = m + X \alpha` and :math:`T - X \Sigma^{-1} X^\top`, which the split of the module docstring
        takes to the within-block directions, :math:`V_i = P_i'' - P_i' G_i^{-1} P_i'^\top` with
        :math:`P_i = \sum_q \lambda_{q,i} K_q`, and the block means, :math:`Q = X'' - X' H^{-1} X'^\top` with
        :math:`X = \sum_q C_q \otimes K_q`: a :class:`_KroneckerSplit`, ``O(k t^3 + (k t)^3)`` beyond the mean's
        ``O(n t^2)``. GPyTorch's strategy formed the ``n t x n t`` cross covariance densely (and under
        ``fast_pred_var`` the inverse root too)."""
        wdt = closed.dtype
        alpha = self._alpha()  # (*batch, n, t)
        shift = None
        for M1, K1 in cross:  # sum_q (M_q' alpha) K_q'^T, closed form
            term = (M1 if M1.dtype == wdt else M1.to(wdt)) @ alpha @ K1.mT
            shift = term if shift is None else shift + term
        assert shift is not None
        dtype = torch.promote_types(test_mean.dtype, cross_dtype)
        mean = test_mean.to(dtype) + shift.flatten(-2).to(dtype)
        if settings.skip_posterior_variances.on():
            size = mean.shape[-1]
            return mean, ZeroLinearOperator(*mean.shape[:-1], size, size, dtype=dtype, device=mean.device)
        LG, LH = self._factors()
        k, t = closed.partition.num_blocks, closed.t
        blocks = self._blocks_only()
        full = not blocks or not all(M._diagonal_core() for M, _ in (*cross, *prior))
        P1, X1 = signal_parts([M for M, _ in cross], [K for _, K in cross], full)
        P2, X2 = signal_parts([M for M, _ in prior], [K for _, K in prior], full)
        # within the blocks: V_i = P_i'' - (L_G^{-1} P_i'^T)^T (L_G^{-1} P_i'^T)
        Y = torch.linalg.solve_triangular(LG, P1.mT.expand(*LG.shape[:-2], t, t), upper=False)
        V = P2 - Y.mT @ Y
        if full:  # the block means: Q = X'' - X' H^{-1} X'^T
            L = _block_diagonal(LH) if blocks else LH
            Y = torch.linalg.solve_triangular(L, X1.mT.expand(*L.shape[:-2], k * t, k * t), upper=False)
        else:  # one t x t block per block: Q_i = X_i'' - X_i' H_i^{-1} X_i'^T
            Y = torch.linalg.solve_triangular(LH, X1.mT.expand(*LH.shape[:-2], t, t), upper=False)
        Q = X2 - Y.mT @ Y
        return mean, _KroneckerSplit(V, Q, closed.partition, dtype)


def _kronecker_terms(op, scale: Tensor | None = None) -> list[tuple[Any, Any, Tensor | None]]:
    """``[(data_q, task_q, c_q)]`` with ``op = sum_q c_q data_q (x) task_q`` through constant multiples and sums of
    two-factor Kronecker products (a ``MultitaskKernel``'s covariance, an ``LCMKernel``'s sum of them), the data factor
    first; an empty list for anything else (a term that is not such a product)."""
    op, scale = _constants(op, scale)
    if isinstance(op, KroneckerProductLinearOperator) and not isinstance(op, DiagLinearOperator):
        return [(op.linear_ops[0], op.linear_ops[1], scale)] if len(op.linear_ops) == 2 else []
    if type(op) in (SumLinearOperator, SumKroneckerLinearOperator) or _is_lcm_sum(op):
        res = []
        for term in op.linear_ops:
            found = _kronecker_terms(term, scale)
            if not found:
                return []
            res.extend(found)
        return res
    return []


def _is_lcm_sum(op) -> bool:
    from bma_gp._composition import BlockMeanLCMLinearOperator, BlockMeanSumKroneckerLinearOperator

    return isinstance(op, (BlockMeanLCMLinearOperator, BlockMeanSumKroneckerLinearOperator))
