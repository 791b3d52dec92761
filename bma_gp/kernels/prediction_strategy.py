"""Exact GP prediction when the training covariance is a block mean matrix.

GPyTorch's :class:`~gpytorch.models.exact_prediction_strategies.DefaultPredictionStrategy`
solves against a dense (or CG/Lanczos-backed) training covariance. When the noisy training
covariance is a :class:`~bma_gp.BlockMeanLinearOperator` and the test/train cross-covariance
is :math:`A P^\\top` (:class:`~bma_gp.kernels.BlockCrossLinearOperator`), the posterior needs
only closed forms:

.. math::

    \\mu_* = m_* + A\\, P^\\top \\alpha, \\qquad \\alpha = (\\hat K + \\sigma^2 I)^{-1} (y - m), \\\\
    \\Sigma_* = K_{**} - A\\, G\\, A^\\top, \\qquad
    G = P^\\top (\\hat K + \\sigma^2 I)^{-1} P = S^{1/2} C^{-1} S^{1/2},

where :math:`C` is the :math:`k \\times k` core matrix of the noisy training covariance
(:math:`M U = U C` for :math:`U = P S^{-1/2}`, see "Two invariant subspaces" in docs/math.md),
factorised once by :meth:`~bma_gp.BlockMeanLinearOperator.core_cholesky`. At the training
inputs themselves the posterior covariance is again a symmetric block mean operator, so it can
be sampled. The cost after the training covariance is :math:`O(n + k^3)` once and
:math:`O(tk^2)` per batch of :math:`t` test points.
"""

from __future__ import annotations

import functools
import warnings

import torch
from gpytorch import settings
from gpytorch.distributions import MultivariateNormal
from gpytorch.likelihoods import GaussianLikelihood
from gpytorch.likelihoods.noise_models import HomoskedasticNoise
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from gpytorch.utils.memoize import cached, clear_cache_hook
from linear_operator import to_linear_operator
from linear_operator.operators import (
    DenseLinearOperator,
    DiagLinearOperator,
    LinearOperator,
    MatmulLinearOperator,
    SumLinearOperator,
    ZeroLinearOperator,
)
from torch import Tensor

from bma_gp import settings as bma_settings
from bma_gp._broadcast import shared_batch_entry
from bma_gp._indexing import TorchIndexing, check_floating
from bma_gp._precision import core_dtype
from bma_gp._samples import ClosedFormSamples
from bma_gp._warnings import ClosedFormFallbackWarning
from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator
from bma_gp.kernels._bound_data import check_bound_data, check_prediction_dtype
from bma_gp.kernels.block_cross_linear_operator import BlockCrossLinearOperator
from bma_gp.kernels.leading_rows_linear_operator import LeadingBlockLinearOperator, LeadingRowsLinearOperator
from bma_gp.kernels.sum_prediction_strategy import (
    KeepsIntegers,
    _CastOnce,
    _DenseFactorSolves,
    _widened,
    closed_form_fantasy,
    exact_difference,
    new_input_prediction,
    observed_mean_cache,
    training_prediction,
)

__all__ = ["BlockMeanPredictionStrategy"]


def _attach_clear_hook(strategy, tensor: Tensor) -> Tensor:
    """Drop the strategy's caches when gradients flow back through ``tensor`` (as GPyTorch does)."""
    if tensor.grad_fn is not None:
        wrapper = functools.partial(clear_cache_hook, strategy)
        functools.update_wrapper(wrapper, clear_cache_hook)
        tensor.grad_fn.register_hook(wrapper)
    return tensor


def _is_principal_slice(row_index, col_index, batch_indices) -> bool:
    """Whether an index of linear_operator's ``_getitem`` takes the same slice of rows and columns of every batch."""
    full_batch = all(isinstance(b, slice) and b == slice(None) for b in batch_indices)
    return isinstance(row_index, slice) and row_index == col_index and full_batch


def _fresh_dense(op) -> Tensor:
    """``op`` as a dense tensor, formed again: linear_operator keeps ``to_dense`` in a cache that does not know the
    graph, so a matrix formed under ``no_grad`` served a later call with gradients (a ``log_prob`` with gradients
    after one without them lost the noise's). Dense, diagonal, sum and product operators are read from their parts
    (``O(t^2)`` beyond the products), anything else is multiplied with the identity. # shape: (*batch, t, t)"""
    if torch.is_tensor(op):
        return op
    if isinstance(op, DenseLinearOperator):
        return op.tensor
    if isinstance(op, DiagLinearOperator):
        return torch.diag_embed(op._diagonal())
    if isinstance(op, SumLinearOperator):
        parts = [_fresh_dense(part) for part in op.linear_ops]
        return functools.reduce(torch.add, parts)
    if isinstance(op, MatmulLinearOperator):
        return _fresh_dense(op.left_linear_op) @ _fresh_dense(op.right_linear_op)
    eye = torch.eye(op.shape[-1], dtype=op.dtype, device=op.device)
    return op.matmul(eye)


def _leading_rows(op) -> bool:
    """Whether ``op`` (a test-by-training covariance) is, or is a constant multiple of, a
    :class:`LeadingRowsLinearOperator`: a ``BlockMeanKernel``'s rows at ``cat(train_x, new_x)``."""
    from bma_gp._composition import unscaled

    return isinstance(unscaled(op), LeadingRowsLinearOperator)


class _PredictiveDifference(_CastOnce, _DenseFactorSolves, TorchIndexing, ClosedFormSamples, LinearOperator):
    r""":math:`K_{**} - G` at new inputs, :math:`G = (A W)(A W)^\top` held in the working precision
    (:class:`_OneHotGram` or a product of the ``t x k`` factor): entries, products, the diagonal and the dense matrix
    are formed there and only then cast to the model's dtype. For a well-observed block the difference is far smaller
    than :math:`K_{**}` (about noise / rows), and a float32 subtraction lost it: 9 % of a random intercept's variance
    at 1000 rows per group and noise 1e-3 (22 % with a cross-group factor). Nothing ``t x t`` is formed but by
    :meth:`to_dense`, and by roots, solves and ``inv_quad_logdet`` (a joint ``log_prob``): one exact Cholesky
    factorisation of the matrix in the working precision
    (:class:`~bma_gp.kernels.sum_prediction_strategy._DenseFactorSolves`), also once the likelihood's noise is added,
    instead of linear_operator's generic paths (Lanczos and CG past ``max_cholesky_size``). A cast (``to(dtype)``,
    ``float()``, ``half()``, ...) keeps both parts and the working precision and rounds only the result
    (:class:`~bma_gp.kernels.sum_prediction_strategy._CastOnce`).

    Args:
        prior: :math:`K_{**}`, an operator or a tensor in the model's dtype. # shape: (*batch, t, t)
        gram: :math:`G`, an operator in the working precision. # shape: (*batch, t, t)
        output_dtype: the dtype of what the operator returns, when it differs from ``prior``'s (a cast operator);
            None (the default): ``prior``'s.
    """

    def __init__(self, prior, gram: LinearOperator, output_dtype: torch.dtype | None = None):
        output_dtype = None if output_dtype == prior.dtype else output_dtype
        super().__init__(prior, gram, output_dtype=output_dtype)
        self.prior, self.gram = prior, gram
        self._output_dtype = output_dtype
        self._prior_in_working_precision: LinearOperator | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.prior.dtype if self._output_dtype is None else self._output_dtype

    def _cast(self, device: torch.device | None, dtype: torch.dtype) -> _PredictiveDifference:
        """See :class:`~bma_gp.kernels.sum_prediction_strategy._CastOnce`; :math:`G` stays in the working precision
        (widened if ``dtype`` is wider still)."""
        prior, gram = self.prior, self.gram
        if device is not None:
            prior, gram = prior.to(device=device), gram.to(device=device)
        wide = torch.promote_types(prior.dtype, dtype)
        prior = prior if wide == prior.dtype else prior.to(wide)
        wide = torch.promote_types(gram.dtype, dtype)
        gram = gram if wide == gram.dtype else gram.to(wide)
        res = _PredictiveDifference(prior, gram, dtype)
        if device is None or res.device == self.device:  # K_** in the working precision, if converted already
            kept = self._prior_in_working_precision
            if kept is not None and kept.dtype == gram.dtype:
                res._prior_in_working_precision = kept
        return res

    def _size(self) -> torch.Size:
        batch = torch.broadcast_shapes(self.prior.shape[:-2], self.gram.shape[:-2])
        return torch.Size((*batch, *self.prior.shape[-2:]))

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _expand_batch(self, batch_shape) -> LinearOperator:
        t = self.prior.shape[-1]
        prior, gram = self.prior.expand(*batch_shape, t, t), self.gram._expand_batch(batch_shape)
        return _PredictiveDifference(prior, gram, self._output_dtype)

    def _working_prior(self):
        r""":math:`K_{**}` in the working precision: a structured operator converted (its entries are sums, such as
        :math:`\lambda + B`, that float32 rounds), a dense matrix as a tensor (cast where it is used, so that asking
        for the diagonal does not copy ``t x t`` entries)."""
        prior = self.prior
        if isinstance(prior, DenseLinearOperator):
            return prior.tensor
        if torch.is_tensor(prior) or prior.dtype == self.gram.dtype:
            return prior
        working = self._prior_in_working_precision
        if working is None or self._needs_graph():  # one without a graph is kept for calls that need none
            working = prior.to(self.gram.dtype)
            if not any(t.requires_grad for t in working.representation()):
                self._prior_in_working_precision = working
        return working

    def _matmul(self, rhs: Tensor) -> Tensor:
        check_floating(rhs, "rhs")
        wdt = self.gram.dtype
        x = rhs.to(wdt)
        prior = self._working_prior()
        res = (prior.to(wdt) if torch.is_tensor(prior) else prior) @ x - self.gram._matmul(x)
        return res.to(torch.promote_types(rhs.dtype, self.dtype))

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._matmul(rhs)

    def _diagonal(self) -> Tensor:
        base = self._working_prior().diagonal(dim1=-2, dim2=-1).to(self.gram.dtype)
        res = base - self.gram._diagonal()
        return res.clamp_min(0).to(self.dtype)  # >= 0 up to rounding: G is bounded by K_** in exact arithmetic

    def _working_dense(self) -> Tensor:
        prior = _fresh_dense(self._working_prior())
        return (prior.to(self.gram.dtype) - _fresh_dense(self.gram)).expand(*self.shape)

    def to_dense(self) -> Tensor:
        return self._working_dense().to(self.dtype)

    def evaluate_kernel(self) -> LinearOperator:
        """Itself (linear_operator's default rebuilds the operator from its tensors, without what it has kept)."""
        return self

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        prior = self._working_prior()
        if isinstance(prior, LinearOperator):
            base = prior._expand_batch(self.batch_shape)._get_indices(row_index, col_index, *batch_indices)
        else:
            base = prior.expand(*self.shape)[(*batch_indices, row_index, col_index)]
        gram = self.gram._expand_batch(self.batch_shape)._get_indices(row_index, col_index, *batch_indices)
        return (base.to(gram.dtype) - gram).to(self.dtype)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        # a principal slice (``mvn[..., a:b]``) is the same difference on the slice, so it keeps the exact root
        if _is_principal_slice(row_index, col_index, batch_indices):
            index = (*batch_indices, row_index, col_index)
            return _PredictiveDifference(self.prior[index], self.gram[index], self._output_dtype)
        return super()._getitem(row_index, col_index, *batch_indices)

    def add_diagonal(self, diag):
        diag = diag if torch.is_tensor(diag) else torch.tensor(diag, dtype=self.dtype, device=self.device)
        return self + DiagLinearOperator(diag.to(self.dtype).expand(*self.shape[:-1]))

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator):  # the likelihood's noise goes into K_**: the sum keeps its root
            prior = self.prior if isinstance(self.prior, LinearOperator) else DenseLinearOperator(self.prior)
            return _PredictiveDifference(prior + _widened(other, prior.dtype), self.gram, self._output_dtype)
        return super().__add__(other)


class _OneHotGram(KeepsIntegers, LinearOperator):
    r""":math:`F F^\top` for a ``t x k`` :math:`F` with one nonzero per row, :math:`F_{i, c_i} = f_i`: entries
    :math:`f_i f_j [c_i = c_j]` (``c_i = -1``: a zero row). Products, the diagonal and entries in :math:`O(t)`; the
    term a random intercept's prediction subtracts from :math:`K_{**}`, without a ``t x k`` matrix.

    Args:
        f: the nonzero of each row. # shape: (*batch, t)
        columns: its column, ``-1`` for none. # shape: (t,)
        num_columns: ``k``.
    """

    def __init__(self, f: Tensor, columns: Tensor, num_columns: int):
        super().__init__(f, columns=columns, num_columns=num_columns)
        self.f = torch.where(columns >= 0, f, torch.zeros_like(f))
        self.columns, self.num_columns = columns, num_columns
        self._index = columns.clamp_min(0)

    def _size(self) -> torch.Size:
        t = self.f.shape[-1]
        return torch.Size((*self.f.shape[:-1], t, t))

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _expand_batch(self, batch_shape) -> LinearOperator:
        return _OneHotGram(self.f.expand(*batch_shape, self.f.shape[-1]), self.columns, self.num_columns)

    def _dense(self) -> Tensor:
        r"""The ``t x t`` matrix :math:`f f^\top \circ [c_i = c_j]`, without a ``k x t`` intermediate."""
        same = self.columns.unsqueeze(-1) == self.columns.unsqueeze(-2)  # rows without a column have f = 0
        outer = self.f.unsqueeze(-1) * self.f.unsqueeze(-2)
        return torch.where(same, outer, torch.zeros_like(outer))

    def to_dense(self) -> Tensor:
        return self._dense()

    def _matmul(self, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 1
        x = rhs.unsqueeze(-1) if vector else rhs
        t, c = self.f.shape[-1], x.shape[-1]
        if self.num_columns * c > t * (t + c):
            # many columns (a draw's or a dense covariance's identity): the column sums would be a k x c matrix, 8 GB
            # at 10^5 levels and 10^4 columns; the t x t matrix and its product are smaller
            res = self._dense() @ x
            return res.squeeze(-1) if vector else res
        scaled = self.f.unsqueeze(-1) * x
        sums = scaled.new_zeros(*scaled.shape[:-2], self.num_columns, scaled.shape[-1]).index_add(
            -2, self._index, scaled
        )
        res = self.f.unsqueeze(-1) * sums.index_select(-2, self._index)
        return res.squeeze(-1) if vector else res

    def _diagonal(self) -> Tensor:
        return self.f * self.f

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        if _is_principal_slice(row_index, col_index, batch_indices):  # rows and columns alike: F's rows
            return _OneHotGram(self.f[..., row_index], self.columns[row_index], self.num_columns)
        return super()._getitem(row_index, col_index, *batch_indices)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        f = self.f.expand(*self.batch_shape, self.f.shape[-1])
        same = self.columns[row_index] == self.columns[col_index]
        value = f[(*batch_indices, row_index)] * f[(*batch_indices, col_index)]
        return torch.where(same, value, torch.zeros_like(value))


def _posterior_at_training_points(
    prior: BlockMeanLinearOperator, cross: BlockMeanLinearOperator, noisy: BlockMeanLinearOperator
) -> BlockMeanLinearOperator:
    r""":math:`K_{**} - K_{*X} (\hat K + \sigma^2 I)^{-1} K_{X*}` when all three are block mean
    operators on one partition: a symmetric block mean operator
    (:meth:`~bma_gp.BlockMeanLinearOperator.schur_complement`), so it can be sampled."""
    return prior.schur_complement(cross, noisy)


def _plain_index(indices: Tensor, values: Tensor) -> Tensor | None:
    """The rows (or columns) an interpolated operator takes from its base, when it takes each with weight 1 and the
    same ones in every batch entry (what ``op[..., a:b, c:d]`` builds), else None. # shape: (r,)"""
    if indices.shape[-1] != 1 or not bool((values == 1).all()):
        return None
    return shared_batch_entry(indices[..., 0], 1)


class BlockMeanPredictionStrategy(DefaultPredictionStrategy):
    r"""Closed-form exact prediction for a block mean training covariance.

    Used automatically by :class:`~bma_gp.BlockMeanKernel` and :class:`~bma_gp.GroupKernel`
    (also inside :class:`~gpytorch.kernels.ScaleKernel`) through the kernel's
    ``prediction_strategy`` hook. If the noisy training covariance is not a block mean
    operator (e.g. heteroscedastic fixed noise) or the cross-covariance is not block structured,
    every method falls back to GPyTorch's default behaviour.

    The posterior mean is :math:`m_* + A P^\top \alpha` and the covariance
    :math:`K_{**} - (A W)(A W)^\top` with :math:`W W^\top = P^\top (\hat K + \sigma^2 I)^{-1} P`
    (from an eigendecomposition of the :math:`k \times k` core matrix), whether or not
    ``gpytorch.settings.fast_pred_var`` is on: both are exact here.
    """

    def __init__(self, train_inputs, train_prior_dist, train_labels, likelihood, root=None, inv_root=None):
        super().__init__(train_inputs, train_prior_dist, train_labels, likelihood, root=root, inv_root=inv_root)
        covar = self.lik_train_train_covar
        evaluated = covar.evaluate_kernel() if isinstance(covar, LinearOperator) else covar
        if not isinstance(evaluated, BlockMeanLinearOperator):
            evaluated = self._prior_plus_homoskedastic_noise() or evaluated
        self.block_mean_covar: BlockMeanLinearOperator | None = (
            evaluated if isinstance(evaluated, BlockMeanLinearOperator) else None
        )
        if self.block_mean_covar is not None:
            self.lik_train_train_covar = evaluated
        #: the training covariance is a product of two lazily evaluated kernels computed in the model's forward
        #: (GPyTorch's Hadamard multitask model; routed here by bma_gp.kernels.task_prediction_strategy): the
        #: test-by-training covariance is then rows of the evaluated joint covariance (:meth:`_joint_cross`)
        prior = train_prior_dist.lazy_covariance_matrix
        self._kernel_product = bool(getattr(prior, "_bma_gp_kernel_product", False))

    def _prior_plus_homoskedastic_noise(self) -> BlockMeanLinearOperator | None:
        """``K + sigma^2 I`` as a block mean operator when the likelihood is a plain
        :class:`~gpytorch.likelihoods.GaussianLikelihood` (one noise value per batch entry, whose
        gradient is exact through the block offsets) and the prior is one block mean operator.
        Summing a lazily evaluated kernel with a noise that needs gradients may give a more general
        operator; this keeps prediction on the single-partition closed forms."""
        likelihood = self.likelihood
        if type(likelihood) is not GaussianLikelihood or not isinstance(likelihood.noise_covar, HomoskedasticNoise):
            return None
        prior = self.train_prior_dist.lazy_covariance_matrix
        prior = prior.evaluate_kernel() if isinstance(prior, LinearOperator) else prior
        if not isinstance(prior, BlockMeanLinearOperator) or not prior.symmetric:
            return None
        noisy = prior.add_diagonal(likelihood.noise)
        return noisy if isinstance(noisy, BlockMeanLinearOperator) else None

    def _noisy_for(self, prior: BlockMeanLinearOperator) -> BlockMeanLinearOperator | None:
        r"""The noisy training covariance :math:`K + \sigma^2 I` for the posterior at the training inputs, made from
        ``prior`` (this call's :math:`K` there) and the likelihood with this call's graph, so that the posterior's
        gradients are those of the exact :math:`K - K (K + \sigma^2 I)^{-1} K`, as for sums
        (:func:`~bma_gp.kernels.sum_prediction_strategy.training_posterior`; ``detach_test_caches`` does not cut
        them). The strategy's own :attr:`block_mean_covar` carries the graph of the call that built it: none after a
        first call under ``no_grad``, or one a first ``backward()`` has consumed (the second raised), so the gradients
        depended on the calls before. Without gradients it is used as it is. None where the covariance with this
        call's graph is no block mean operator (a per-point noise that is constant in every block folds into ``lam``
        only without a gradient): then the sums' closed form applies."""
        M = self.block_mean_covar
        assert M is not None  # the callers checked it
        if not torch.is_grad_enabled():
            return M
        dist = MultivariateNormal(torch.zeros(prior.shape[:-1], dtype=prior.dtype, device=prior.device), prior)
        cov = self.likelihood(dist, self.train_inputs).lazy_covariance_matrix
        cov = cov.evaluate_kernel() if isinstance(cov, LinearOperator) else cov
        if isinstance(cov, BlockMeanLinearOperator) and cov.partition.same_as(M.partition) and cov.shape == M.shape:
            return cov
        return None

    # ------------------------------------------------------------------ caches
    @cached(name="mean_cache")
    def _mean_cache(self, nan_policy: str) -> Tensor:
        r""":math:`\alpha = M^{-1}(y - m)` in the working precision (float64 for a float32 model): the mean sums
        :math:`M^{-1} r` over each block, entries of size :math:`r / \text{noise}` whose block sums are far smaller (a
        random intercept's shrunken group mean), and in float32 that sum lost up to 30 posterior standard deviations
        (n = 4000, 40 groups, noise 1e-3). Under ``observation_nan_policy("mask")`` or ``("fill")``
        :math:`M_{oo}^{-1} r_o` of the observed points, NaN at the others, as GPyTorch's
        (:func:`~bma_gp.kernels.sum_prediction_strategy._observed_problem`; GPyTorch's float32 solve there was off
        by about a posterior standard deviation)."""
        M = self.block_mean_covar
        if M is None:
            return super()._mean_cache(nan_policy)
        wdt = core_dtype(M.dtype)
        if nan_policy == "ignore":
            mean_cache = (M if wdt == M.dtype else M.to(wdt)).solve(self._offset(wdt)).squeeze(-1)
        else:
            observed_cache = observed_mean_cache(self, M, nan_policy)
            if observed_cache is None:
                return super()._mean_cache(nan_policy)
            mean_cache = observed_cache
        if settings.detach_test_caches.on():
            mean_cache = mean_cache.detach()
        return _attach_clear_hook(self, mean_cache)

    def _offset(self, dtype: torch.dtype) -> Tensor:
        """:math:`y - m`, the training targets less the prior mean, as a column in ``dtype``. # shape: (*batch, n, 1)"""
        train_mean = self.likelihood(self.train_prior_dist, self.train_inputs).loc
        return (self.train_labels - train_mean).to(dtype).unsqueeze(-1)

    @cached(name="alpha_block_sums")
    def _alpha_block_sums(self, nan_policy: str) -> Tensor:
        r""":math:`P^\top \alpha = P^\top M^{-1}(y - m)` by the core alone
        (:meth:`~bma_gp.BlockMeanLinearOperator._solve_block_sums`): the mean at a block cross covariance needs
        only these, and summing :math:`\alpha`'s entries (size :math:`(y - m) / \text{noise}`) lost
        :math:`\epsilon\, s\, B / \text{noise}` relative (1.5e-5 in float64 at noise 1e-10). Where an observation NaN
        policy drops points, the block sums of :meth:`_conditioning_alpha`. # shape: (*batch, k, 1)"""
        M = self.block_mean_covar
        assert M is not None  # only asked for by the block mean paths
        if nan_policy != "ignore":
            return M.partition.block_sum(self._conditioning_alpha().unsqueeze(-1), dim=-2)
        sums = M._solve_block_sums(self._offset(M.core_dtype))
        if settings.detach_test_caches.on():
            sums = sums.detach()
        return _attach_clear_hook(self, sums)

    def exact_predictive_mean(self, test_mean: Tensor, test_train_covar) -> Tensor:
        r""":math:`m_* + K_{*X} \alpha` with :math:`\alpha = M^{-1}(y - m)` held in the working precision
        (:meth:`_mean_cache`): a block cross covariance :math:`A P^\top`, and the training covariance over the same
        partition, take its block sums from the core (:meth:`_alpha_block_sums`), so that they do not cancel in
        float32 (nor at tiny noise); anything else applies it in the model's precision. Under an observation NaN
        policy :math:`\alpha` is 0 at the points the policy drops (:meth:`_conditioning_alpha`), so every product
        takes the observed points only, as GPyTorch's masked one."""
        if self.block_mean_covar is None:
            return super().exact_predictive_mean(test_mean, test_train_covar)
        cross = self._block_cross(test_train_covar)
        if cross is not None:
            sums = self._alpha_block_sums(settings.observation_nan_policy.value())  # P^T alpha, (*batch, k, 1)
            res = cross._gather_blocks(sums) if cross.is_one_hot else cross.values.to(sums.dtype) @ sums
        elif isinstance(test_train_covar, BlockMeanLinearOperator):  # at the training points
            alpha = self._conditioning_alpha()
            K = test_train_covar if test_train_covar.dtype == alpha.dtype else test_train_covar.to(alpha.dtype)
            M = self.block_mean_covar
            if K.partition.same_as(M.partition):
                # K alpha = lam * alpha + P B (P^T alpha) with P^T alpha from the core: the block sums of alpha cancel
                # at noise far below the variances (1.9e-5 relative at noise 1e-10 for a random intercept)
                sums = self._alpha_block_sums(settings.observation_nan_policy.value())
                res = K._matmul_with_sums(alpha.unsqueeze(-1), sums.to(alpha.dtype))
            else:
                res = K @ alpha.unsqueeze(-1)
        else:
            res = test_train_covar @ self._conditioning_alpha().to(test_train_covar.dtype).unsqueeze(-1)
        # the dtype GPyTorch's m_* + K_{*X} alpha promotes to: float32 mean parameters with float64 inputs give float64
        dtype = torch.promote_types(test_mean.dtype, test_train_covar.dtype)
        return test_mean.to(dtype) + res.squeeze(-1).to(dtype)

    def _conditioning_alpha(self) -> Tensor:
        """:attr:`mean_cache` with 0 where an observation NaN policy other than ``"ignore"`` drops a point (there
        GPyTorch's mean cache, and :meth:`_mean_cache`, hold NaN, and GPyTorch drops those columns of the products).
        # shape: (*batch, n)"""
        alpha = self.mean_cache
        if settings.observation_nan_policy.value() != "ignore":
            alpha = torch.where(torch.isnan(alpha), torch.zeros_like(alpha), alpha)
        return alpha

    @property
    @cached(name="block_covar_root")
    def block_covar_root(self) -> tuple[Tensor, Tensor]:
        r"""``(sqrt(s), L)`` with :math:`L L^\top = C` the operator's Cholesky factor of the core
        matrix of the noisy training covariance (:meth:`BlockMeanLinearOperator.core_cholesky`), so
        that :math:`W = S^{1/2} L^{-\top}` satisfies
        :math:`W W^\top = P^\top (\hat K + \sigma^2 I)^{-1} P = S^{1/2} C^{-1} S^{1/2}`.

        Both are in the operator's core dtype (double precision for single- and half-precision
        models: :math:`C` is ill-conditioned when blocks are large, entries :math:`\sim s B` against
        :math:`\lambda \sim` noise, and in float32 that cancels the posterior variance away). A core
        that is not positive definite raises the operator's ``ValueError`` (validation on) or gives
        NaN (validation off)."""
        M = self.block_mean_covar
        assert M is not None  # only asked for by the block mean paths
        if M._diagonal_core():  # C = diag(c): L is the vector sqrt(c), no k x k matrix (many groups)
            if bma_settings.validate.on():
                M._check_finite()
            factor, info = M._core_cholesky_diagonal()
            if bma_settings.validate.on() and bool((info > 0).any()):
                M._raise_not_positive_definite("core_cholesky")
        else:
            factor = M.core_cholesky()
        root_sizes = M.partition.sizes.to(device=factor.device, dtype=factor.dtype).sqrt()
        if settings.detach_test_caches.on():
            factor = factor.detach()
        return root_sizes, _attach_clear_hook(self, factor)

    def _cross_factor(self, values: Tensor) -> Tensor:
        """:math:`A W` for the cross values :math:`A`, in the working precision (the core's). # shape: (*batch, t, k)"""
        root_sizes, factor = self.block_covar_root
        scaled = values.to(factor.dtype) * root_sizes
        if self.block_mean_covar is not None and self.block_mean_covar._diagonal_core():  # L = diag(factor)
            return scaled / factor.unsqueeze(-2)
        batch = torch.broadcast_shapes(scaled.shape[:-2], factor.shape[:-2])
        k = factor.shape[-1]
        return torch.linalg.solve_triangular(
            factor.expand(*batch, k, k), scaled.expand(*batch, *scaled.shape[-2:]).mT, upper=False
        ).mT

    def _block_cross(self, test_train_covar) -> BlockCrossLinearOperator | None:
        """``test_train_covar`` if it is :math:`A P^\\top` over the training partition, else None."""
        if self.block_mean_covar is None or not isinstance(test_train_covar, BlockCrossLinearOperator):
            return None
        if test_train_covar.transposed or not test_train_covar.partition.same_as(self.block_mean_covar.partition):
            return None
        return test_train_covar

    def _joint_cross(self, test_train_covar) -> BlockCrossLinearOperator | None:
        r"""``test_train_covar`` as :math:`A P^\top` over the partition of the training covariance when it is rows
        of a joint covariance of the training and new points evaluated as one block mean operator, else None.

        A model whose forward multiplies two lazily evaluated kernels (``covar_module(x).mul(task_covar_module(i))``,
        GPyTorch's Hadamard multitask model) has no lazily evaluated kernel tensor: GPyTorch evaluates the joint
        covariance on ``cat(train, test)`` (a block mean operator over the intersection of the factors' partitions,
        the new points included) and takes its rows ``joint[..., n:, :n]``, a ``FallbackIndexedLinearOperator``.
        Between a new point :math:`a` and a training point :math:`b \ne a` its entry is :math:`B_{g_a g_b}`
        (:math:`\lambda` is on the diagonal only), which depends on :math:`b` only through its block of the training
        partition when that partition refines the joint one on the training points (checked): then
        :math:`A_{a j} = B_{g_a c_j}`, :math:`c_j` the joint block of training block :math:`j`. ``t x k`` values
        (one per new point when :math:`B` is held as its diagonal and the blocks correspond one to one), the same
        numbers GPyTorch's path reads from the ``t x n`` matrix."""
        from bma_gp._composition import FallbackIndexedLinearOperator

        if not isinstance(test_train_covar, FallbackIndexedLinearOperator):
            return None
        joint = test_train_covar.base_linear_op
        prior = self.train_prior_dist.lazy_covariance_matrix
        prior = prior.evaluate_kernel() if isinstance(prior, LinearOperator) else prior
        if not isinstance(joint, BlockMeanLinearOperator) or not isinstance(prior, BlockMeanLinearOperator):
            return None
        if not joint.symmetric:
            return None
        n = prior.shape[-1]
        rows = _plain_index(test_train_covar.left_interp_indices, test_train_covar.left_interp_values)
        cols = _plain_index(test_train_covar.right_interp_indices, test_train_covar.right_interp_values)
        if rows is None or cols is None or cols.shape[0] != n or joint.shape[-1] < n:
            return None
        if not torch.equal(cols, torch.arange(n, device=cols.device)) or bool((rows < n).any()):
            return None  # the columns must be the training points, and no row one of them
        labels = joint.partition.labels
        train = prior.partition.to(labels.device)
        k = train.num_blocks
        joint_train = labels[:n]
        block_of = torch.empty(k, dtype=labels.dtype, device=labels.device).scatter_(0, train.labels, joint_train)
        if not torch.equal(block_of.index_select(0, train.labels), joint_train):
            return None  # two points of one training block in different joint blocks
        g = labels.index_select(0, rows.to(labels.device))
        if joint.is_diagonal_mode:
            b = joint._b_vector()  # (*batch, K): B = diag(b)
            inverse = torch.full((joint.partition.num_blocks,), -1, dtype=labels.dtype, device=labels.device)
            inverse[block_of] = torch.arange(k, device=labels.device)
            if torch.equal(inverse.index_select(0, block_of), torch.arange(k, device=labels.device)):
                return BlockCrossLinearOperator.one_hot(b.index_select(-1, g), inverse.index_select(0, g), train)
            hit = (g.unsqueeze(-1) == block_of).to(b.dtype)  # (t, k)
            values = b.index_select(-1, g).unsqueeze(-1) * hit
        else:
            values = joint.B.index_select(-2, g).index_select(-1, block_of)
        return BlockCrossLinearOperator(values, train)

    def _warn_joint_cross(self, test_train_covar) -> None:
        """A :class:`~bma_gp.ClosedFormFallbackWarning` when a model routed here for a product of lazily evaluated
        kernels gives a test-by-training covariance :meth:`_joint_cross` cannot read: GPyTorch's path follows."""
        warnings.warn(
            "prediction at new inputs: the training covariance is a product of two lazily evaluated kernels computed "
            "in forward (GPyTorch's Hadamard multitask model), but the test-by-training covariance "
            f"({type(test_train_covar).__name__}, shape {tuple(test_train_covar.shape)}) is not rows of a block mean "
            "joint covariance over the training blocks, so GPyTorch's path forms the t x n cross covariance (O(t n) "
            "memory). Where the task ids differ across a batch of test sets, the product of the joint covariance was "
            "itself linear_operator's product of both factors' roots (a jittered Cholesky, Lanczos past "
            "max_cholesky_size: approximate, and (n + t)-sized). Predict each test set alone (model(x[i], i[i])), or "
            "write the product as one kernel with active_dims, e.g. covar_module = BlockMeanKernel(...) * "
            "GroupKernel(num_tasks, rank=1, active_dims=[task column]), whose prediction is closed form, test "
            "batches included.",
            ClosedFormFallbackWarning,
            stacklevel=4,
        )

    def _one_hot_factor(self, cross: BlockCrossLinearOperator) -> Tensor | None:
        """The nonzero of each row of :math:`A W` (working precision) when :math:`A` has one per row and the core is
        diagonal (a random intercept: :math:`W` diagonal, so :math:`A W` has one too), else None.
        # shape: (*batch, t)"""
        M = self.block_mean_covar
        if not cross.is_one_hot or M is None or not M._diagonal_core():
            return None
        assert cross.row_values is not None and cross.columns is not None
        root_sizes, factor = self.block_covar_root  # W = diag(root_sizes / factor), in the working precision
        index = cross.columns.clamp_min(0)
        scale = root_sizes.index_select(-1, index) / factor.index_select(-1, index)
        values = cross.row_values.to(scale.dtype)
        return torch.where(cross.columns >= 0, values * scale, torch.zeros_like(values))

    def _at_training_points(self, test_test_covar, test_train_covar) -> bool:
        """Whether the test points are the training points themselves (block mean on both sides)."""
        M = self.block_mean_covar
        return (
            M is not None
            and isinstance(test_train_covar, BlockMeanLinearOperator)
            and isinstance(test_test_covar, BlockMeanLinearOperator)
            and test_train_covar.partition.same_as(M.partition)
            and test_test_covar.partition.same_as(M.partition)
        )

    def _leading_training_points(self, test_train_covar) -> BlockMeanLinearOperator | None:
        """The prior :math:`K` of all the training points when the test points are the leading ones (a
        ``BlockMeanKernel`` fantasy model at its parent's training inputs: ``test_train_covar`` is the leading rows of
        :math:`K`, over the partition of the noisy training covariance), else None."""
        M = self.block_mean_covar
        if M is None or not isinstance(test_train_covar, LeadingRowsLinearOperator) or test_train_covar.transposed:
            return None
        base = test_train_covar.base
        return base if isinstance(base, BlockMeanLinearOperator) and base.partition.same_as(M.partition) else None

    def _leading_training_prediction(self, test_mean: Tensor, test_train_covar):
        """The sum strategy's closed form at the training inputs (:func:`training_prediction`, per-point noise) when
        the test points are the leading training points (:meth:`_leading_training_points`), cut to them; else None.
        The means of the other training points are computed too (``O(n)``) and dropped."""
        if not isinstance(test_train_covar, LeadingRowsLinearOperator) or test_train_covar.transposed:
            return None
        r, n = test_train_covar.shape[-2:]
        if n != self.num_train:
            return None
        prior = test_train_covar.base
        padded = torch.cat([test_mean, test_mean.new_zeros(*test_mean.shape[:-1], n - r)], dim=-1)
        res = training_prediction(self, padded, prior, prior)
        if res is None:
            return None
        mean, covar = res
        return mean[..., :r], LeadingBlockLinearOperator(covar, r)

    # ------------------------------------------------------------------ prediction
    def exact_prediction(self, test_mean: Tensor, test_test_covar, test_train_covar):
        check_bound_data(self)
        check_prediction_dtype(self, test_train_covar)
        cross = self._joint_cross(test_train_covar) if self._kernel_product else None
        if cross is not None:  # rows of the joint covariance of a product in forward: A P^T, no t x n matrix
            test_train_covar = cross
        prior = self._leading_training_points(test_train_covar)
        if prior is not None:
            # the leading r of the training points, whole blocks of K (the parent's training blocks): the posterior
            # there is the principal block of the one at all the training points, K - K M^{-1} K
            r = test_train_covar.shape[-2]
            alpha = self._conditioning_alpha()
            K = prior if prior.dtype == alpha.dtype else prior.to(alpha.dtype)
            dtype = torch.promote_types(test_mean.dtype, prior.dtype)
            mean = test_mean.to(dtype) + (K @ alpha.unsqueeze(-1)).squeeze(-1)[..., :r].to(dtype)
            if settings.skip_posterior_variances.on():
                return mean, ZeroLinearOperator(*test_test_covar.size(), dtype=dtype, device=test_mean.device)
            noisy = self._noisy_for(prior)
            if noisy is None:
                res = self._leading_training_prediction(test_mean, test_train_covar)
                if res is not None:
                    return res
                noisy = self.block_mean_covar
                assert noisy is not None  # _leading_training_points checked it
            posterior = _posterior_at_training_points(prior, prior, noisy)
            leading = posterior[..., :r, :r]
            leading._rounding = posterior._rounding  # the rounding level its samples clamp to (matrix_sqrt)
            return mean, leading
        if self._at_training_points(test_test_covar, test_train_covar):
            # K_** - K_*X M^{-1} K_X*: products and sums of block mean operators on one partition
            mean = self.exact_predictive_mean(test_mean, test_train_covar)
            if settings.skip_posterior_variances.on():
                return mean, ZeroLinearOperator(
                    *test_test_covar.size(), dtype=test_test_covar.dtype, device=test_test_covar.device
                )
            noisy = self._noisy_for(test_test_covar)
            if noisy is None:
                res = training_prediction(self, test_mean, test_test_covar, test_train_covar)
                if res is not None:
                    return res
                noisy = self.block_mean_covar
                assert noisy is not None  # _at_training_points checked it
            return mean, _posterior_at_training_points(test_test_covar, test_train_covar, noisy)
        if self.block_mean_covar is None:  # e.g. per-point noise, or a group kernel's factor: the sum strategy's
            # closed forms at the training inputs and at new ones
            res = self._leading_training_prediction(test_mean, test_train_covar)
            if res is None:
                res = training_prediction(self, test_mean, test_test_covar, test_train_covar)
            if res is None:
                res = new_input_prediction(self, test_mean, test_test_covar, test_train_covar)
            if res is not None:
                return res
        if self._block_cross(test_train_covar) is None:
            if self._kernel_product and self.block_mean_covar is not None:  # (the sums' path above warned itself)
                self._warn_joint_cross(test_train_covar)
            if _leading_rows(test_train_covar):
                # the joint covariance at cat(train_x, new_x): GPyTorch densifies both covariances of a small problem
                # (joint size up to max_eager_kernel_size), and exact_predictive_covar no longer saw the training
                # rows, so the posterior's draws took Lanczos past max_cholesky_size (a user trial: n = 200, draws'
                # covariance 100% off); kept lazy, it takes the one exact factorisation
                with settings.max_eager_kernel_size(0):
                    return super().exact_prediction(test_mean, test_test_covar, test_train_covar)
            return super().exact_prediction(test_mean, test_test_covar, test_train_covar)
        # no densification of the (t x n) cross-covariance, whatever max_eager_kernel_size says
        return (
            self.exact_predictive_mean(test_mean, test_train_covar),
            self.exact_predictive_covar(test_test_covar, test_train_covar),
        )

    def exact_predictive_covar(self, test_test_covar, test_train_covar) -> LinearOperator:
        if settings.skip_posterior_variances.on():  # GPyTorch's zero is float32 on the CPU, whatever the model's dtype
            return ZeroLinearOperator(
                *test_test_covar.size(), dtype=test_test_covar.dtype, device=test_test_covar.device
            )
        cross = self._block_cross(test_train_covar)
        if cross is None:
            # the joint posterior at cat(train_x, new_x) (BoTorch's qNEI), also of a fantasy model, and other test
            # covariances without the closed form at new inputs: one exact factorisation in the working precision,
            # not GPyTorch's sum whose roots are Lanczos past max_cholesky_size
            exact = exact_difference(self, test_test_covar, test_train_covar)
            if exact is not None:
                return exact
        if cross is None:
            return super().exact_predictive_covar(test_test_covar, test_train_covar)
        if settings.fast_pred_var.on():
            self._last_test_train_covar = test_train_covar
        # (A W)(A W)^T in the working precision, subtracted there (_PredictiveDifference)
        f = self._one_hot_factor(cross)
        if f is not None:  # A W with one nonzero per row: (A W)(A W)^T in O(t), no t x k matrix
            assert cross.columns is not None
            gram: LinearOperator = _OneHotGram(f, cross.columns, cross.partition.num_blocks)
        else:
            factor = self._cross_factor(cross.values)  # (*batch, t, k): A W
            gram = MatmulLinearOperator(factor, factor.mT)
        if torch.is_tensor(test_test_covar):
            return to_linear_operator((test_test_covar.to(gram.dtype) - gram.to_dense()).to(test_test_covar.dtype))
        return _PredictiveDifference(test_test_covar, gram)

    def get_fantasy_strategy(self, inputs, targets, full_inputs, full_targets, full_output, **kwargs):
        r"""The strategy of the model conditioned on the training and fantasy points together: a new one on all of
        them, whose closed forms cost :math:`O(n + k^3)` as the parent's.

        The covariance of all the points is again a block mean matrix: for a :class:`~bma_gp.GroupKernel` over the
        groups of all the points (a fantasy point may open a group the training data lack), for a
        :class:`~bma_gp.BlockMeanKernel` over the training blocks plus one singleton block per fantasy point (new
        points for the kernel, which stays bound to its training inputs). So the fantasy model is the parent's prior
        conditioned exactly on the training and fantasy points: a ``GroupKernel`` model given all of them by
        ``set_train_data``, a ``BlockMeanKernel`` model also bound to them (``kernel.set_train_data``) with a partition
        that adds each fantasy point as a block of its own. GPyTorch's update would append the fantasy rows to
        :math:`(n + m) \times (n + m)` roots of the training covariance.

        Raises:
            ValueError: ``noise`` was given with a likelihood other than a ``FixedNoiseGaussianLikelihood``, whose
                fantasy likelihood would not hold it.
            NotImplementedError: the noisy covariance of all the points is outside the closed-form family (no
                shared partition, e.g. group ids that differ across a batch, or a likelihood that adds no positive
                per-point noise)."""
        fantasy = closed_form_fantasy(self, inputs, targets, full_inputs, full_targets, full_output, **kwargs)
        if fantasy is None:
            raise NotImplementedError(
                "get_fantasy_model: the noisy covariance of the training and fantasy points together is not a block "
                "mean operator or a sum of them with a positive per-point noise (inputs that differ across a batch, "
                "or a likelihood without positive per-point noise), and GPyTorch's fantasy update would factorise "
                "it densely. Add the points to the training data instead, with model.set_train_data(x, y, "
                "strict=False) (and, for a BlockMeanKernel, kernel.set_train_data(x, partition))."
            )
        if self._kernel_product:  # the fantasy model's forward multiplies the same kernels
            fantasy._kernel_product = True
        return fantasy
