"""The posterior covariance at the training inputs when the prior is a closed-form sum.

At the training inputs an exact GP's posterior covariance is :math:`S = K - K M^{-1} K` with
:math:`M = K + N` the noisy training covariance and :math:`N = \\operatorname{diag}(\\nu)` the
likelihood's noise. GPyTorch builds it as a dense ``n x n`` matrix, which then needs Lanczos or an
``n x n`` Cholesky to be sampled. When the prior :math:`K = \\operatorname{diag}(c) + Z G Z^\\top`
is in the family of :class:`~bma_gp.BlockMeanSumLinearOperator` (group kernels, block mean kernels,
an inducing-point kernel with or without its diagonal correction :math:`c`), :math:`K = M - N`
turns it into :math:`S = N - N M^{-1} N`, and Woodbury with a root :math:`G = L L^\\top`
(:math:`E = \\operatorname{diag}(c + \\nu)`, :math:`A = Z^\\top E^{-1} Z`) gives

.. math::

    S = \\operatorname{diag}\\Big(\\frac{\\nu c}{c + \\nu}\\Big) + V V^\\top, \\qquad
    V = \\operatorname{diag}\\Big(\\frac{\\nu}{c + \\nu}\\Big) Z L (I + L^\\top A L)^{-1/2},

a non-negative diagonal plus a positive semidefinite term of rank :math:`q`, with no subtraction
left and no inverse of :math:`G` (singular :math:`B_j` are fine); one ``q x q`` eigendecomposition
builds it. Its roots (:class:`TrainingPosteriorLinearOperator`) are :math:`[V, 0]` when :math:`c = 0`,
:math:`[\\operatorname{diag}(\\sqrt{\\nu c / (c + \\nu)}), V]` otherwise, and, once the likelihood has added
its noise, a square root through Woodbury as for the sums themselves (docs/math.md, section 4).

:class:`SumPredictionStrategy` is what :class:`gpytorch.kernels.AdditiveKernel` (``k1 + k2``) returns
for sums that contain a :class:`~bma_gp.GroupKernel` or :class:`~bma_gp.BlockMeanKernel` once
:func:`install` has run (importing ``bma_gp`` runs it); at any other test inputs, and when the
prior or the likelihood is outside the family, it is GPyTorch's default strategy. A single block mean
kernel whose noisy training covariance leaves the one-partition form (per-point noise) reaches the same
closed form through :class:`~bma_gp.kernels.BlockMeanPredictionStrategy`.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from gpytorch import settings as gpytorch_settings
from gpytorch.distributions import MultivariateNormal
from gpytorch.likelihoods import FixedNoiseGaussianLikelihood, GaussianLikelihoodWithMissingObs
from gpytorch.likelihoods.gaussian_likelihood import _GaussianLikelihoodBase
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from gpytorch.utils.memoize import cached, clear_cache_hook
from linear_operator import to_linear_operator
from linear_operator.operators import (
    ConstantMulLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    KroneckerProductLinearOperator,
    LinearOperator,
    MatmulLinearOperator,
    RootLinearOperator,
    SumLinearOperator,
    ZeroLinearOperator,
)
from linear_operator.utils.cholesky import psd_safe_cholesky
from linear_operator.utils.getitem import _is_noop_index
from torch import Tensor

from bma_gp import settings
from bma_gp._autograd import carries_tangent
from bma_gp._by_products import ByProducts
from bma_gp._composition import ClosedFormFallbackWarning, _build, _collect, _Parts, is_expanded_constant
from bma_gp._indexing import TorchIndexing, check_floating
from bma_gp._precision import core_dtype
from bma_gp._samples import ClosedFormSamples
from bma_gp._symmetric_function import floored_sqrt, symmetric_matrix_function
from bma_gp._warnings import quiet_elementwise
from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator, check_left, check_rhs, solution_batch
from bma_gp.block_mean_sum_linear_operator import (
    BlockMeanSumLinearOperator,
    _cells_matmul,
    _LUSolve,
    _rest_solve,
    _scoped,
    as_block_mean_factor,
    gram_root_core,
    hadamard_plan,
    rows_times_root,
    task_weight,
)
from bma_gp.kernels._bound_data import check_bound_data, check_prediction_dtype, record_bound_data
from bma_gp.kernels.block_cross_linear_operator import BlockCrossLinearOperator
from bma_gp.kernels.leading_rows_linear_operator import LeadingRowsLinearOperator
from bma_gp.partition import Partition

__all__ = [
    "PredictiveCovarianceLinearOperator",
    "SumPredictionStrategy",
    "TrainingPosteriorLinearOperator",
    "install",
    "new_input_prediction",
    "training_posterior",
]

#: Rows of the low-rank root processed at a time in the diagonal (bounds the ``n x m`` temporaries).
_CHUNK_ELEMENTS = 2**21


# ---------------------------------------------------------------------------- the family, as one sum
def as_sum(op) -> BlockMeanSumLinearOperator | None:
    """``op`` as a :class:`~bma_gp.BlockMeanSumLinearOperator` (a single block mean operator too), or None
    when some summand is outside the family or the operator is not symmetric."""
    if isinstance(op, BlockMeanSumLinearOperator):
        return op
    if not isinstance(op, LinearOperator):
        return None
    parts = _Parts()
    if not _collect(op, parts) or not parts.terms:
        return None
    res = _build(parts, op)
    if isinstance(res, BlockMeanLinearOperator):
        if not res.symmetric:
            return None
        lam = res.partition.expand(res.lam, dim=-1)
        if res.is_diagonal_mode:  # a grouping's variances: keep them a vector (no k x k matrix)
            return BlockMeanSumLinearOperator(lam, res._b_vector(), partitions=[res.partition], diagonal=[True])
        return BlockMeanSumLinearOperator(lam, res.B, partitions=[res.partition])
    return res if isinstance(res, BlockMeanSumLinearOperator) else None


#: Elements per piece when two large tensors are compared (an ``n x m`` root: no ``n x m`` temporaries).
_COMPARE_CHUNK = 2**22


def _pieces(x: Tensor) -> list[Tensor]:
    """``x`` split along its rows (its only dimension for a vector) into views of about ``_COMPARE_CHUNK`` elements."""
    if x.dim() == 0 or x.numel() == 0:
        return [x]
    dim = -2 if x.dim() >= 2 else 0
    per_row = max(1, x.numel() // x.shape[dim])
    return list(x.split(max(1, _COMPARE_CHUNK // per_row), dim=dim))


def _within(a: Tensor, b: Tensor, units: float) -> bool:
    """Whether every entry of ``a`` and ``b`` (same shape) differs by at most ``units`` times the unit roundoff of
    the larger magnitude in either, compared piece by piece."""
    a, b = a.detach(), b.detach().to(a.dtype)
    if torch.equal(a, b):
        return True
    pa, pb = _pieces(a), _pieces(b)
    scale = max(float(torch.maximum(x.abs().amax(), y.abs().amax())) for x, y in zip(pa, pb))
    tol = units * torch.finfo(a.dtype).eps * scale
    return all(bool(((x - y).abs() <= tol).all()) for x, y in zip(pa, pb))


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal, or equal up to a few units of rounding (the same kernel evaluated on two copies of the inputs)."""
    if a.shape != b.shape:
        try:
            a, b = torch.broadcast_tensors(a, b)
        except RuntimeError:
            return False
    return _within(a, b, 16)


def _same(a: BlockMeanSumLinearOperator, b: BlockMeanSumLinearOperator) -> bool:
    """Whether the two sums are the same matrix term by term (same partitions and weights, equal tensors)."""
    if a.shape != b.shape or len(a.partitions) != len(b.partitions) or (a.root is None) != (b.root is None):
        return False
    for j, (pa, pb, wa, wb) in enumerate(zip(a.partitions, b.partitions, a.weights, b.weights)):
        if not pa.same_as(pb) or (wa is None) != (wb is None):
            return False
        if wa is not None and wb is not None and not torch.equal(wa, wb):
            return False
        if a.diagonal_blocks[j] and b.diagonal_blocks[j]:  # both held as diagonals: no k x k matrices
            if not _close(a._block_args[j], b._block_args[j]):
                return False
        elif not _close(a._dense_block(j), b._dense_block(j)):
            return False
    if a.root is not None and b.root is not None and (a.root.shape != b.root.shape or not _close(a.root, b.root)):
        return False
    return _close(a.diag_values, b.diag_values)


def _noise_diagonal(strategy: DefaultPredictionStrategy) -> Tensor | None:
    """The likelihood's noise at the training inputs as a vector, when it adds a diagonal (else None).

    The likelihood is applied to a zero covariance exactly as the strategy applies it to the prior, so the
    noise is what the training covariance holds: ``M = K + diag(noise)``."""
    likelihood = strategy.likelihood
    if not isinstance(likelihood, _GaussianLikelihoodBase) or isinstance(likelihood, GaussianLikelihoodWithMissingObs):
        return None
    mean = strategy.train_prior_dist.mean
    zero = MultivariateNormal(torch.zeros_like(mean), DiagLinearOperator(torch.zeros_like(mean)))
    covar = likelihood(zero, strategy.train_inputs).lazy_covariance_matrix
    if not isinstance(covar, DiagLinearOperator):
        return None
    noise = covar.diagonal(dim1=-2, dim2=-1)
    if not bool((noise > 0).all()):
        return None
    return noise


# ---------------------------------------------------------------------------- the factor
def _root_of_block(M: BlockMeanSumLinearOperator, j: int, wdt: torch.dtype) -> Tensor | None:
    """A root of the positive semidefinite ``B_j`` of ``M``: a vector ``l`` (``B_j = diag(l^2)``, when ``B_j`` is
    diagonal) or the symmetric square root; None when ``B_j`` has a clearly negative eigenvalue (no root exists).
    A block held as its diagonal is never formed as a matrix."""
    if M.diagonal_blocks[j]:
        values = M._block_args[j].to(wdt)
        B = None
    else:
        B = M._dense_block(j).to(wdt)
        values = torch.diagonal(B, dim1=-2, dim2=-1)
    if B is None or B.shape[-1] == 1 or not bool((B - torch.diag_embed(values)).detach().any()):
        if bool((values < 0).any()):
            return None
        return floored_sqrt(values)  # a variance at 0 (within rounding): root 0 with derivative 0, not inf
    B = 0.5 * (B + B.mT)
    e = torch.linalg.eigvalsh(B.detach())
    if bool((e[..., 0] < -16 * torch.finfo(wdt).eps * B.shape[-1] * e.abs().amax(-1)).any()):
        return None
    return symmetric_matrix_function(B, floored_sqrt, lambda x: x.clamp_min(0))


def _left(L: Tensor | None, X: Tensor, transpose: bool = False) -> Tensor:
    """``L X`` (or ``L^T X``) for a root given as None (identity), a vector (diagonal) or a matrix."""
    if L is None:
        return X
    if L.dim() == X.dim() - 1:
        return L.unsqueeze(-1) * X
    return (L.mT if transpose else L) @ X


def _right(X: Tensor, L: Tensor | None) -> Tensor:
    """``X L``."""
    if L is None:
        return X
    if L.dim() == X.dim() - 1:
        return X * L.unsqueeze(-2)
    return X @ L


def _scaled_gram(op: BlockMeanSumLinearOperator, roots: list[Tensor | None]) -> Tensor:
    r""":math:`L^\top A L` with :math:`A = Z^\top D^{-1} Z` the Gram matrix of ``op`` (its diagonal :math:`D`) and
    :math:`L = \operatorname{blockdiag}(\text{roots})`. # shape: (*batch, q, q)"""
    a, blocks = op._gram()
    J = len(op.partitions)
    T = len(op._sizes())

    def scaled(i: int, j: int) -> Tensor:
        if i == j and i < J:  # a diagonal block: scale its diagonal, then embed
            Li = roots[i]
            if Li is None or Li.dim() == a[i].dim():
                values = a[i] if Li is None else Li * a[i] * Li
                return torch.diag_embed(values)
            return Li.mT @ (a[i].unsqueeze(-1) * Li)
        A_ij = blocks[i, j] if i < j else blocks[j, i].mT
        return _right(_left(roots[i], A_ij, transpose=True), roots[j])

    return torch.cat([torch.cat([scaled(i, j) for j in range(T)], dim=-1) for i in range(T)], dim=-2)


def _check_weight_size(M: BlockMeanSumLinearOperator, what: str) -> None:
    """Raise a ``ValueError`` naming ``q`` when a ``q x q`` matrix of the training posterior (``what``) would pass
    ``max_capacitance_size``."""
    q = sum(M._sizes())
    limit = settings.max_capacitance_size.value()
    if q > limit:
        raise ValueError(
            f"{what} of the posterior covariance at the training inputs needs a {q} x {q} matrix "
            f"({M._describe()}), more than bma_gp.settings.max_capacitance_size = {limit}; raise the limit with "
            f"`with bma_gp.settings.max_capacitance_size({q}):` if it fits your machine. Its products, variances "
            "and draws (rsample without base_samples) need no such matrix."
        )


def _condition_estimate(M: BlockMeanSumLinearOperator, iters: int = 16) -> float:
    r"""An estimate of the condition of the noisy training covariance ``M`` (positive definite):
    :math:`2 \lambda_{max} / \lambda_{min}`, each by ``iters`` power iterations from a fixed vector (no random
    draw), with ``M`` and with its (closed-form) solve, doubled against their underestimates; the largest over a
    batch. ``2 iters`` products and solves, no ``n x n`` matrix. Used for the rounding band of a posterior's root
    (the smallest diagonal entry of ``M`` is no bound: with a block mean kernel it holds the block offsets)."""
    n = M.shape[-1]
    with torch.no_grad():
        start = torch.linspace(1.0, 2.0, n, dtype=M.dtype, device=M.device).expand(*M.batch_shape, n).unsqueeze(-1)
        tiny = torch.finfo(M.dtype).tiny
        norms = []
        for apply in (M.matmul, M.solve):
            v, norm = start, torch.ones((), dtype=M.dtype, device=M.device)
            for _ in range(iters):
                w = apply(v)
                norm = w.norm(dim=-2, keepdim=True)
                v = w / norm.clamp_min(tiny)
            norms.append(norm.squeeze(-1).squeeze(-1))
        ratio = 2 * norms[0] * norms[1]  # lambda_max * (1 / lambda_min)
        return float(torch.nan_to_num(ratio, nan=0.0, posinf=0.0).amax())


def _training_weight(M: BlockMeanSumLinearOperator) -> Tensor:
    r""":math:`H = C^{-1} G = L (I + L^\top A L)^{-1} L^\top` as a ``q x q`` matrix, by solves with ``M``'s own
    capacitance factorisation (no :math:`q \times q` factorisation). Only a sum without an eliminated grouping
    needs it (for its variances), and then ``q`` is the size of that factorisation. # shape: (*batch, q, q)"""
    _check_weight_size(M, "the weight H")
    sizes = M._sizes()
    q = sum(sizes)
    eye = torch.eye(q, dtype=core_dtype(M.dtype), device=M.device).expand(*M.batch_shape, q, q)
    H = torch.cat(M._cap_solve([M._G(t, piece) for t, piece in enumerate(eye.split(sizes, dim=-2))]), dim=-2)
    return 0.5 * (H + H.mT)


class _Factor:
    r"""Everything :math:`S = \operatorname{diag}(s) + \operatorname{diag}(\beta) Z H Z^\top \operatorname{diag}(\beta)`
    needs, in the working precision: the noisy training covariance ``M`` (its :math:`Z`, and its capacitance
    factorisation, which applies :math:`H = C^{-1} G`), :math:`s = \nu c / (c + \nu)` and
    :math:`\beta = \nu / (c + \nu)`. :math:`H` itself (``q x q``) is never formed when ``M`` eliminates a grouping
    (:func:`_posterior_quadratic_diagonal`); a root :math:`Y` with :math:`Y Y^\top = H` only for
    ``root_decomposition`` (:func:`_posterior_root_factor`)."""

    def __init__(self, prior: BlockMeanSumLinearOperator, noise: Tensor):
        wdt = core_dtype(prior.dtype)
        M = prior.add_diagonal(noise.to(prior.dtype))
        sizes = M._sizes()
        # the noise (or the mean, through the strategy's batch) can carry a batch of hyperparameter samples the
        # prior covariance does not (an unbatched kernel with a batched likelihood): broadcast both to the joint batch
        c, nu = torch.broadcast_tensors(prior.diag_values.to(wdt), noise.to(wdt))
        e = c + nu
        self.M = M
        self.s = nu * c / e
        self.beta = nu / e
        self.diag_kind = "nonnegative" if bool((c != 0).any()) else "zero"
        # H needs no root of G; a root of H (sampling) exists only when every B_j is positive semidefinite. A block
        # mean kernel's B can be indefinite while its block mean matrix is not (B_ii averages off-diagonal entries).
        self.psd = all(_root_of_block(M, j, wdt) is not None for j in range(len(M.partitions)))
        self.sizes = sizes


def _posterior_root_factor(M: BlockMeanSumLinearOperator) -> Tensor:
    r""":math:`Y = L R^{-\top}` with :math:`R R^\top = I + L^\top A L` (Cholesky; :math:`L` the roots of the
    blocks of ``M``), so :math:`Y Y^\top = L (I + L^\top A L)^{-1} L^\top = H`: the ``q x q`` root that sampling
    at the training inputs applies. A Cholesky factorisation and a triangular inverse, about a sixth of the work
    of the eigendecomposition a symmetric root would take. # shape: (*batch, q, q)"""
    _check_weight_size(M, "a root")
    wdt = core_dtype(M.dtype)
    sizes = M._sizes()
    roots: list[Tensor | None] = [_root_of_block(M, j, wdt) for j in range(len(M.partitions))]
    if any(L is None for L in roots):  # pragma: no cover - root_decomposition checks TrainingPosterior...psd first
        raise RuntimeError("a root of the training posterior needs positive semidefinite block matrices")
    if M.root is not None:
        roots.append(None)
    W = _scaled_gram(M, roots)
    eye = torch.eye(W.shape[-1], dtype=wdt, device=W.device).expand_as(W)
    R = torch.linalg.cholesky(eye + 0.5 * (W + W.mT))  # I + W >= I: positive definite
    F = torch.linalg.solve_triangular(R, eye, upper=False).mT  # R^{-T}
    return torch.cat([_left(L, piece) for L, piece in zip(roots, F.split(sizes, dim=-2))], dim=-2)


def _plus(test_mean: Tensor, shift: Tensor, test_train_covar) -> Tensor:
    """``test_mean + shift`` (``shift`` in the working precision) in the dtype GPyTorch's prediction promotes
    ``test_mean`` and the cross covariance to: float32 mean parameters with float64 inputs give float64."""
    dtype = torch.promote_types(test_mean.dtype, test_train_covar.dtype)
    return test_mean.to(dtype) + shift.to(dtype)


def training_posterior(strategy: DefaultPredictionStrategy, test_test_covar, test_train_covar):
    """The closed-form posterior covariance when the test inputs are the training inputs, or None.

    None when the test covariances are not the prior covariance at the training inputs, the prior is
    outside the family (or has a negative diagonal; an indefinite block matrix only takes the root away),
    or the likelihood is not Gaussian with a positive diagonal noise; also with ``skip_posterior_variances``
    (GPyTorch's own path handles it). The covariance does not depend on the targets, so it is the same under every
    observation NaN policy (GPyTorch's covariance, too, conditions on all training points).

    The operator is built from the test-by-training covariance (equal to the training prior, and evaluated afresh
    by every call), so gradients are those of the exact posterior covariance and never reach back into a graph an
    earlier backward pass has freed; GPyTorch's ``detach_test_caches`` does not cut them."""
    if gpytorch_settings.skip_posterior_variances.on():
        return None
    n = strategy.num_train
    if tuple(test_train_covar.shape[-2:]) != (n, n) or tuple(test_test_covar.shape[-2:]) != (n, n):
        return None
    covar = strategy.train_prior_dist.lazy_covariance_matrix
    prior = as_sum(covar.evaluate_kernel() if isinstance(covar, LinearOperator) else covar)  # GPyTorch memoises it
    if prior is None or not bool((prior.diag_values >= 0).all()):
        return None
    cross = as_sum(test_train_covar)
    if cross is None or not _same(cross, prior):
        return None
    if test_test_covar is not test_train_covar:
        other = as_sum(test_test_covar)
        if other is None or not _same(other, prior):
            return None
    factor = _training_factor(strategy, cross)
    if factor is None:
        return None
    return TrainingPosteriorLinearOperator(factor.s, factor.beta, factor.M, diag_kind=factor.diag_kind, psd=factor.psd)


def _training_factor(strategy: DefaultPredictionStrategy, prior: BlockMeanSumLinearOperator) -> _Factor | None:
    """The factor; one computed without autograd is kept on the strategy for later calls that need no gradient
    (GPyTorch drops the strategy when the model is trained or its data change)."""
    noise = _noise_diagonal(strategy)
    if noise is None:
        return None
    needs_grad = torch.is_grad_enabled() and (noise.requires_grad or prior._differentiable())
    cached = getattr(strategy, "_bma_gp_factor", None)
    if cached is not None and not needs_grad:
        return cached
    factor = _Factor(prior, noise)
    if not needs_grad:
        strategy._bma_gp_factor = factor
    return factor


def training_prediction(strategy: DefaultPredictionStrategy, test_mean: Tensor, test_test_covar, test_train_covar):
    """``(mean, covariance)`` in closed form at the training inputs, or None (then use the strategy's own path).
    The mean is :func:`_training_mean`'s, in the working precision, also under an observation NaN policy other than
    ``"ignore"`` (conditioned on the observed targets only, :func:`_observed_problem`)."""
    covar = training_posterior(strategy, test_test_covar, test_train_covar)
    if covar is None:
        return None
    return _training_mean(strategy, covar, test_mean, test_train_covar), covar


def _policy_mean(strategy: DefaultPredictionStrategy, test_mean: Tensor, test_train_covar) -> Tensor:
    """The predictive mean where :func:`_observed_problem` has no closed form (``"fill"`` with NaN targets at
    different points per batch entry): GPyTorch's, from the training covariance at the observed points and products
    with the test-by-training covariance, in the model's precision."""
    return strategy.exact_predictive_mean(test_mean, test_train_covar)


def _observed_problem(
    strategy: DefaultPredictionStrategy, M: BlockMeanSumLinearOperator, nan_policy: str
) -> tuple[BlockMeanSumLinearOperator, Tensor, Tensor | None] | None:
    r"""``(M_o, r, observed)``: the noisy training covariance and the residual :math:`y - \mu` (model's dtype) the
    posterior mean conditions on under GPyTorch's observation NaN policy, and the mask of the points it keeps
    (``(n,)``; None under ``"ignore"``: ``M`` and the plain residual). None where one mask does not say it.

    ``"mask"`` drops the points whose target is NaN in some batch entry (GPyTorch's ``_get_observed``): the mean is
    :math:`\mu_* + K_{*o} M_{oo}^{-1} r_o`. ``"fill"`` zeroes the covariance between a point with a NaN target and the
    others in each batch entry, which is the same where the NaNs are at the same points in every entry (else None:
    GPyTorch's path, :func:`_policy_mean`). :math:`M_{oo}` is held over all ``n`` points as a sum again,
    :math:`M_o = \begin{pmatrix} M_{oo} & 0 \\ 0 & D_{mm} \end{pmatrix}`: the rows of :math:`Z` at a dropped point
    are zeroed (a 0/1 weight on every partition, and on the root's rows) and its diagonal kept, as GPyTorch's
    ``"fill"`` keeps it; with :math:`r` zero there, :math:`M_o^{-1} r` is :math:`M_{oo}^{-1} r_o` at the observed
    points and 0 at the others, so every product with the test-by-training covariance stays as for ``"ignore"``."""
    train_mean = strategy.likelihood(strategy.train_prior_dist, strategy.train_inputs).loc
    labels = strategy.train_labels
    r = labels - train_mean
    if nan_policy == "ignore":
        return M, r, None
    n = labels.shape[-1]
    observed = gpytorch_settings.observation_nan_policy._get_observed(labels, torch.Size((n,))).to(labels.device)
    if nan_policy == "fill" and not torch.equal(torch.isnan(labels), (~observed).expand_as(labels)):
        return None
    if bool(observed.all()):  # no NaN target: the problem of "ignore"
        return M, r, observed
    keep = observed.to(M.dtype)
    weights = [keep if w is None else w * keep for w in M.weights]
    root = None if M._root_arg is None else M.root * keep.unsqueeze(-1)
    r = torch.where(observed, r, torch.zeros_like(r))
    return M._new(weights=weights, root=root), r, observed


def observed_mean_cache(
    strategy: DefaultPredictionStrategy, covar, nan_policy: str, dtype: torch.dtype | None = None
) -> Tensor | None:
    """GPyTorch's mean cache under an observation NaN policy in closed form: :math:`M_{oo}^{-1} r_o` of
    :func:`_observed_problem` for the noisy training covariance ``covar``, NaN at the points it drops (as GPyTorch's),
    in ``dtype`` (None: the working precision); None where that has no closed form. # shape: (*batch, n)"""
    M = as_sum(covar)
    found = None if M is None else _observed_alpha(strategy, M, nan_policy)
    if found is None:
        return None
    alpha, observed = found
    assert observed is not None
    return (alpha if dtype is None else alpha.to(dtype)).masked_fill(~observed, math.nan)


def _observed_alpha(
    strategy: DefaultPredictionStrategy, M: BlockMeanSumLinearOperator, nan_policy: str
) -> tuple[Tensor, Tensor | None] | None:
    """``(alpha, observed)``: :math:`M_o^{-1} r` of :func:`_observed_problem` in the working precision (0 at the
    points it drops) and its mask, or None where it has none. # shape: (*batch, n), (n,)"""
    problem = _observed_problem(strategy, M, nan_policy)
    if problem is None:
        return None
    M_o, r, observed = problem
    return _working_solve(M_o, r.unsqueeze(-1)).squeeze(-1), observed


def _training_mean(
    strategy: DefaultPredictionStrategy, covar: TrainingPosteriorLinearOperator, test_mean: Tensor, test_train_covar
) -> Tensor:
    r""":math:`\mu + K \alpha` at the training inputs, :math:`K = \operatorname{diag}(c_0) + Z G Z^\top` the prior
    and :math:`\alpha = M^{-1} r`, from the coefficients :math:`c = Z^\top \alpha` of the new inputs
    (:func:`_posterior_coefficients`, working precision): :math:`\alpha = D^{-1}(r - Z G c)` and
    :math:`K \alpha = c_0 \odot \alpha + Z G c`. GPyTorch's :math:`K \alpha` in float32 sums entries of size
    :math:`r / \text{noise}` that cancel (0.12 posterior sd off for crossed groupings); with ``detach_test_caches``
    :math:`\alpha` and :math:`c` are held fixed as GPyTorch holds its :math:`\alpha`, so gradients reach
    :math:`K`'s :math:`c_0` and :math:`G` only."""
    K = as_sum(test_train_covar)
    assert K is not None  # training_posterior checked it
    M = covar.M
    wdt = core_dtype(M.dtype)
    policy = gpytorch_settings.observation_nan_policy.value()
    coef = _new_input_coefficients(strategy, M)
    problem = _observed_problem(strategy, M, policy)
    if coef is None or problem is None:
        return _policy_mean(strategy, test_mean, test_train_covar)
    M_o, r, _ = problem  # under a NaN policy, alpha = M_o^{-1} r is 0 at the points it drops
    pieces = [p.unsqueeze(-1) for p in coef.split(M._sizes(), dim=-1)]
    g_coef = _new_input_g_coefficients(strategy, M) if _same_covariances(K, M) else None
    if g_coef is not None:
        # G c = C^{-1} G u itself, not G times c = u - A x, which cancels at noise far below the variances (the
        # mean at the training inputs of crossed groupings was 7e-6 off at noise 1e-10 in a helper's audit)
        g_pieces = [p.unsqueeze(-1) for p in g_coef.split(M._sizes(), dim=-1)]
    else:
        g_pieces = [M_o._G(j, p) for j, p in enumerate(pieces)]
    fitted = M_o._z(g_pieces).squeeze(-1)
    alpha = (r.to(wdt) - fitted) / M_o.diag_values.to(wdt)
    if gpytorch_settings.detach_test_caches.on():
        alpha = alpha.detach()
        root = K.root if K.rank else None
        if (
            root is not None
            and torch.is_grad_enabled()
            and root.requires_grad
            and _training_side_differentiable(strategy)
        ):
            # K's root enters K alpha twice, U (U^T alpha): U^T alpha from M is held fixed, so its dependence on the
            # inducing points and hyperparameters is added back with the graph of K's own root (zero in value)
            change = (root - root.detach()).to(wdt).mT @ alpha.unsqueeze(-1)
            pieces[-1] = pieces[-1] + change
            g_pieces[-1] = g_pieces[-1] + change  # the root's G is the identity
    if g_coef is not None:
        if torch.is_grad_enabled() and gpytorch_settings.detach_test_caches.on():
            # c held fixed (detached, as GPyTorch holds alpha) but K's G with its graph, in value M's G c (the same):
            # d(K alpha) reaches K's G as GPyTorch's does (the root's G is the identity, and its piece has the change
            # above); without detach_test_caches, G c's own graph is the whole derivative
            for t in range(len(K._block_args)):
                Gc = K._G(t, pieces[t])
                g_pieces[t] = g_pieces[t] + (Gc - Gc.detach())
        shift = K.diag_values.to(wdt) * alpha + K._z(g_pieces).squeeze(-1)
    else:
        shift = K.diag_values.to(wdt) * alpha + K._z([K._G(j, p) for j, p in enumerate(pieces)]).squeeze(-1)
    return _plus(test_mean, shift, test_train_covar)


def _same_covariances(K: BlockMeanSumLinearOperator, M: BlockMeanSumLinearOperator) -> bool:
    """Whether the prior ``K`` and the noisy covariance ``M`` share their terms' covariances ``G`` (the likelihood
    adds to the diagonal only), so that ``M``'s ``G c`` is ``K``'s too."""
    if K._sizes() != M._sizes() or len(K._block_args) != len(M._block_args):
        return False
    return all(  # the blocks as given (a diagonal's vector: no k x k matrix formed)
        a is b or (a.shape == b.shape and torch.equal(a, b)) for a, b in zip(K._block_args, M._block_args)
    )


def _check_fantasy_noise(noise, m: int) -> None:
    """``ValueError`` unless ``noise`` (``get_fantasy_model``'s, for a ``FixedNoiseGaussianLikelihood``) is a tensor
    with one finite, nonnegative variance per fantasy point: the fantasy likelihood appends it to the training noise
    as it is; a wrong length or a NaN left the fantasy covariance outside the family (a misleading
    ``NotImplementedError``), a negative variance made one that is not a covariance."""
    if not torch.is_tensor(noise) or noise.dim() == 0 or noise.shape[-1] != m:
        shape = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
        raise ValueError(
            f"get_fantasy_model(..., noise=...) must be a tensor of shape (..., {m}): one noise variance per fantasy "
            f"point, as the fantasy targets have; got {shape}."
        )
    if not bool(torch.isfinite(noise).all()):
        raise ValueError(
            "get_fantasy_model(..., noise=...) holds NaN or infinite variances; give every fantasy point a finite "
            "noise variance."
        )
    if bool((noise < 0).any()):  # a negative variance made a covariance that is not positive definite, unrefused
        raise ValueError(
            f"get_fantasy_model(..., noise=...) holds negative variances (the smallest is {noise.min().item():.3g}); "
            "noise is the variance of each fantasy observation: give every fantasy point a noise variance >= 0."
        )


def closed_form_fantasy(
    strategy: DefaultPredictionStrategy, inputs, targets, full_inputs, full_targets, full_output, **kwargs
) -> DefaultPredictionStrategy | None:
    r"""A new strategy of ``strategy``'s class on the training and fantasy points together, when their noisy
    covariance (the fantasy likelihood's, as the new strategy will evaluate it) is in the family: a
    :class:`~bma_gp.BlockMeanSumLinearOperator` (a single block mean operator too) with a positive per-point
    diagonal. Else None. A batch of fantasy targets at shared inputs expands the inputs and the prior as GPyTorch's
    update does (``full_inputs`` itself is left as it is, for GPyTorch's own update).

    Raises:
        ValueError: in the family, ``noise`` was given with a likelihood other than a
            ``FixedNoiseGaussianLikelihood``, whose fantasy likelihood would not hold it; or, with one, ``noise`` has
            not one finite, nonnegative variance per fantasy point."""
    noise = kwargs.get("noise")
    if noise is not None and isinstance(strategy.likelihood, FixedNoiseGaussianLikelihood):
        _check_fantasy_noise(noise, inputs[0].shape[-2])
    likelihood = strategy.likelihood.get_fantasy_likelihood(**kwargs)
    prior, train_inputs = full_output, full_inputs
    if full_inputs[0].dim() <= full_targets.dim():
        batch = full_output.batch_shape
        if batch and full_targets.shape[:-1] == batch:
            # a batch model's unbatched inputs with targets of the model's batch: that batch, not a batch of fantasies
            # on top of it (the fantasy model's strategy held (2, 2, n) means for a model batch of 2 and failed on its
            # first prediction; GPyTorch's own update fails for these shapes)
            train_inputs = [x.expand(batch + x.shape) for x in full_inputs]
        else:  # one set of fantasy inputs for a batch of fantasy targets
            fantasies = full_targets.shape[:1]
            train_inputs = [x.expand(fantasies + x.shape) for x in full_inputs]
            prior = full_output.expand(fantasies + full_output.batch_shape)
    covar = likelihood(prior, train_inputs).lazy_covariance_matrix  # as the new strategy will call it
    M = as_sum(covar.evaluate_kernel() if isinstance(covar, LinearOperator) else covar)
    if M is None or not bool((M.diag_values > 0).all()):
        return None
    if "noise" in kwargs and not isinstance(strategy.likelihood, FixedNoiseGaussianLikelihood):
        # GaussianLikelihood / GroupGaussianLikelihood copy themselves as the fantasy likelihood, without it: the
        # fantasy model's predictions used the likelihood's noise at the fantasy points
        raise ValueError(
            "get_fantasy_model(..., noise=...) sets the fantasy points' noise variances, which the fantasy "
            f"model's {type(strategy.likelihood).__name__} cannot hold: it would predict with its own noise there. "
            "Leave noise out to use the likelihood's noise, or use a FixedNoiseGaussianLikelihood (per-point "
            "noise, to which the fantasy noise is appended)."
        )
    strategy.fantasy_inputs, strategy.fantasy_targets = inputs, targets  # as GPyTorch's update records them
    return strategy.__class__(train_inputs, prior, full_targets, likelihood)


class SumPredictionStrategy(DefaultPredictionStrategy):
    """GPyTorch's default exact prediction, with the posterior covariance in closed form when the noisy training
    covariance is a :class:`~bma_gp.BlockMeanSumLinearOperator`: at the training inputs (see the module docstring)
    and at new inputs whose covariance with the data is a sum of :class:`~bma_gp.kernels.BlockCrossLinearOperator`
    terms and inducing-point products (:func:`new_input_prediction`). Both are taken before GPyTorch's own
    ``exact_prediction``, so neither ``fast_pred_var`` (LOVE) nor ``max_eager_kernel_size`` changes them. Solves
    against the training covariance (the mean) reach the closed forms through the operator itself."""

    def exact_prediction(self, test_mean: Tensor, test_test_covar, test_train_covar):
        check_bound_data(self)
        check_prediction_dtype(self, test_train_covar)
        if test_train_covar.shape[-2] == 0:
            # no test points: GPyTorch's path forms nothing (0 x n); the closed form's checks of the cross covariance's
            # columns warned of a fallback (a user trial: "as a gpytorch ProductKernel makes", with none in the model)
            return super().exact_prediction(test_mean, test_test_covar, test_train_covar)
        res = training_prediction(self, test_mean, test_test_covar, test_train_covar)
        if res is not None:
            return res
        res = new_input_prediction(self, test_mean, test_test_covar, test_train_covar)
        if res is not None:
            return res
        return super().exact_prediction(test_mean, test_test_covar, test_train_covar)

    def get_fantasy_strategy(self, inputs, targets, full_inputs, full_targets, full_output, **kwargs):
        r"""The strategy of the model conditioned on the training and fantasy points together.

        When the noisy covariance of all of them is in the family (a :class:`~bma_gp.BlockMeanSumLinearOperator`
        with a positive per-point diagonal), a new strategy on them: its closed forms (:func:`new_input_prediction`,
        :func:`training_prediction`, the operator's solves) start from that covariance, in :math:`O(n + q^3)`.
        GPyTorch's update appends the fantasy rows to a root of the old training covariance and its pseudo-inverse,
        :math:`(n + m) \times (n + m)` dense matrices (9 million entries and 11 s at ``n = 3000``), which those
        closed forms never read. Outside the family (an exact kernel in the sum), GPyTorch's update.

        Raises:
            ValueError: in the family, ``noise`` was given with a likelihood other than a
                ``FixedNoiseGaussianLikelihood``, whose fantasy likelihood would not hold it."""
        fantasy = closed_form_fantasy(self, inputs, targets, full_inputs, full_targets, full_output, **kwargs)
        if fantasy is None:
            return super().get_fantasy_strategy(inputs, targets, full_inputs, full_targets, full_output, **kwargs)
        return fantasy

    # ------------------------------------------------------------------ GPyTorch's path, in the working precision
    def _low_precision_family(self) -> tuple[BlockMeanSumLinearOperator, Tensor] | None:
        r"""``(M, alpha)``: the noisy training covariance in the family and :math:`M^{-1}(y - \mu)` in the working
        precision (under an observation NaN policy :math:`M_o^{-1} r` of the observed points, 0 at the others:
        :func:`_observed_problem`), when ``M`` is held below it (a float32 model), else None. One computed without
        autograd is kept."""
        policy = gpytorch_settings.observation_nan_policy.value()
        cached = getattr(self, "_bma_gp_low_precision", None)
        if cached is not None and cached[0] == policy and not torch.is_grad_enabled():
            return cached[1:]
        covar = self.likelihood(self.train_prior_dist, self.train_inputs).lazy_covariance_matrix
        M = as_sum(covar.evaluate_kernel() if isinstance(covar, LinearOperator) else covar)
        if M is None or core_dtype(M.dtype) == M.dtype or not bool((M.diag_values > 0).all()):
            return None
        found = _observed_alpha(self, M, policy)
        if found is None:
            return None
        alpha = found[0]
        if gpytorch_settings.detach_test_caches.on():
            alpha = alpha.detach()
        if not M._differentiable() and not torch.is_grad_enabled():
            self._bma_gp_low_precision = (policy, M, alpha)
        return M, alpha

    @cached(name="mean_cache")
    def _mean_cache(self, nan_policy: str) -> Tensor:
        r"""GPyTorch's :math:`M^{-1}(y - \mu)`, but a training covariance in the family that is not positive definite
        raises its ``ValueError`` with validation on, as a single block mean operator's strategy does: the sum's
        ``solve`` alone needs an invertible sum only (its capacitance, factorised once, serves both). Under an
        observation NaN policy, for a training covariance in the family, :math:`M_{oo}^{-1} r_o` in closed form
        (:func:`_observed_problem`), NaN at the points it drops, as GPyTorch's."""
        mvn = self.likelihood(self.train_prior_dist, self.train_inputs)
        covar = mvn.lazy_covariance_matrix
        covar = covar.evaluate_kernel() if isinstance(covar, LinearOperator) else covar
        if isinstance(covar, BlockMeanSumLinearOperator):
            _check_definite(covar)
        if nan_policy != "ignore":
            mean_cache = observed_mean_cache(self, covar, nan_policy, covar.dtype)
            if mean_cache is None:
                return super()._mean_cache(nan_policy)
        else:
            mean_cache = covar.solve((self.train_labels - mvn.loc).unsqueeze(-1)).squeeze(-1)
        if gpytorch_settings.detach_test_caches.on():
            mean_cache = mean_cache.detach()
        if mean_cache.grad_fn is not None:  # as GPyTorch: its caches are dropped when gradients flow back
            wrapper = functools.partial(clear_cache_hook, self)
            functools.update_wrapper(wrapper, clear_cache_hook)
            mean_cache.grad_fn.register_hook(wrapper)
        return mean_cache

    def exact_predictive_mean(self, test_mean: Tensor, test_train_covar) -> Tensor:
        r""":math:`\mu_* + K_{*x} M^{-1} (y - \mu)` as GPyTorch's, but for a float32 model whose training covariance is
        in the family with both factors in the working precision: GPyTorch's float32 :math:`M^{-1} r` has entries of
        size :math:`r / \text{noise}` that cancel in the product (a ``GroupKernel * GroupKernel`` interaction, noise
        1e-3: means off by 0.2-0.6 posterior standard deviations)."""
        found = self._low_precision_family()
        if found is None:
            return super().exact_predictive_mean(test_mean, test_train_covar)
        _, alpha = found
        cross = test_train_covar.to_dense() if isinstance(test_train_covar, LinearOperator) else test_train_covar
        res = (cross.to(alpha.dtype) @ alpha.unsqueeze(-1)).squeeze(-1)
        return _plus(test_mean, res, test_train_covar)

    def exact_predictive_covar(self, test_test_covar, test_train_covar) -> LinearOperator:
        r""":math:`K_{**} - K_{*x} M^{-1} K_{x*}` as GPyTorch's (``fast_pred_var`` off), but for a float32 model whose
        training covariance is in the family with :math:`M^{-1} K_{x*}` solved in the working precision: in float32
        its entries lose :math:`\epsilon \kappa(M)` and the difference, far smaller than :math:`K_{**}`, lost that
        much more (posterior variances off by a factor of 20 for a ``GroupKernel * GroupKernel`` interaction at noise
        1e-3). With ``fast_pred_var`` on too: it is exact here, not LOVE's approximation.

        With ``skip_posterior_variances`` a zero of the test covariance's dtype and device (GPyTorch's is float32 on
        the CPU, which made a float64 model's predictive variances float32)."""
        if gpytorch_settings.skip_posterior_variances.on():
            return ZeroLinearOperator(
                *test_test_covar.size(), dtype=test_test_covar.dtype, device=test_test_covar.device
            )
        exact = exact_difference(self, test_test_covar, test_train_covar)
        if exact is not None:
            return exact
        found = self._low_precision_family()
        if found is None:
            return super().exact_predictive_covar(test_test_covar, test_train_covar)
        if gpytorch_settings.fast_pred_var.on():
            self._last_test_train_covar = test_train_covar
        M, _ = found
        cross = test_train_covar.to_dense() if isinstance(test_train_covar, LinearOperator) else test_train_covar
        correction = _working_solve(M, cross.mT).to(cross.dtype)  # (*batch, n, t)
        if torch.is_tensor(test_test_covar):
            return to_linear_operator(test_test_covar - cross @ correction)
        return test_test_covar + MatmulLinearOperator(cross, correction.mul(-1))


def exact_difference(strategy, test_test_covar, test_train_covar) -> LinearOperator | None:
    r""":math:`K_{**} - K_{*x} M^{-1} K_{x*}` as a predictive difference (one exact factorisation for its roots,
    solves and draws, formed in the working precision) where the closed forms at new inputs do not apply but the
    noisy training covariance :math:`M` is in the family: the joint covariance at ``cat(train_x, new_x)`` of a
    ``BlockMeanKernel`` alone, in a sum or in a product (BoTorch's qNEI), also of a fantasy model. GPyTorch's sum of
    the prior and the correction took Lanczos past ``max_cholesky_size`` (rank-40 to rank-100 roots 7-100% off in
    user trials, and base samples of the joint size did not fit them), and a float32 subtraction lost the difference
    (variances 2-20% off at noise 1e-3 to 1e-4). :math:`M` is detached under ``detach_test_caches``, as GPyTorch's
    solve is. ``None`` under ``fast_pred_var`` (LOVE, asked for) or an observation NaN policy; past
    ``max_capacitance_size`` test points ``None`` with a :class:`ClosedFormFallbackWarning`."""
    from bma_gp.kernels.prediction_strategy import _PredictiveDifference

    if gpytorch_settings.fast_pred_var.on() or gpytorch_settings.observation_nan_policy.value() != "ignore":
        return None
    M = strategy.lik_train_train_covar
    M = M.evaluate_kernel() if isinstance(M, LinearOperator) else M
    if not isinstance(M, (BlockMeanSumLinearOperator, BlockMeanLinearOperator)):
        return None
    t, limit = test_train_covar.shape[-2], settings.max_capacitance_size.value()
    if t > limit:
        warnings.warn(
            f"the posterior covariance at these {t} test points (above bma_gp.settings.max_capacitance_size = "
            f"{limit}) is GPyTorch's: its roots and draws take linear_operator's Lanczos past max_cholesky_size, "
            "which is approximate for this full-rank matrix. Raise max_capacitance_size for one exact factorisation "
            "(memory of a t x t matrix), or predict fewer points at a time.",
            ClosedFormFallbackWarning,
            stacklevel=4,
        )
        return None
    if gpytorch_settings.detach_test_caches.on():
        M = M.detach()
    wdt = core_dtype(M.dtype)
    if M.dtype != wdt:
        M = M.to(wdt)
    cross = test_train_covar.to_dense() if isinstance(test_train_covar, LinearOperator) else test_train_covar
    cross = cross.to(wdt)
    return _PredictiveDifference(test_test_covar, MatmulLinearOperator(cross, M.solve(cross.mT)))


def _check_definite(M: BlockMeanSumLinearOperator) -> None:
    """With validation on, the ``ValueError`` of a training covariance ``M`` that is not positive definite (a posterior
    needs it; ``M.solve`` goes on with an invertible one, the strategy's own solves check). ``M`` with a non-positive
    diagonal raises in its solve."""
    if settings.validate.on() and M._sizes() and bool((M.diag_values > 0).all()):
        M._capacitance()


def _working_solve(M: BlockMeanSumLinearOperator, rhs: Tensor) -> Tensor:
    """:math:`M^{-1} R` through the capacitance, left in the working precision (``M.solve`` without its final cast to
    the operator's dtype). # shape: (*batch, n, c)"""

    def solve(op: BlockMeanSumLinearOperator) -> Tensor:
        scaled, _, x = op._woodbury(rhs)
        if x:
            scaled = scaled - op._z(x) / op.diag_values.to(scaled.dtype).unsqueeze(-1)
        if op._refines():  # as M.solve (see BlockMeanSumLinearOperator._refines)
            scaled = op._refined(rhs, scaled)
        return scaled

    return _scoped(solve)(M)


# ---------------------------------------------------------------------------- new inputs
_Piece = tuple  # ("term", values or _OneHot, partition, weight) or ("root", left, right)


@dataclass(frozen=True, eq=False)
class _OneHot:
    r"""A ``t x k`` block of :math:`F` with at most one nonzero per row, :math:`F_{i, c_i} = v_i` (a random
    intercept's or slope's cross covariance at seen and unseen levels), held as its ``t`` values and columns
    (``-1``: a zero row) so that nothing ``t x k`` is formed.

    Attributes:
        values: the nonzero of each row. # shape: (*batch, t)
        columns: its column. # shape: (t,)
        k: the number of columns.
    """

    values: Tensor
    columns: Tensor
    k: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.values.shape, self.k))

    def dim(self) -> int:
        return self.values.dim() + 1

    def weight(self) -> Tensor:
        """The values with zeros on the rows without a column. # shape: (*batch, t)"""
        return torch.where(self.columns >= 0, self.values, torch.zeros_like(self.values))

    def index(self) -> Tensor:
        """The columns with ``-1`` read as 0 (those rows' weight is 0). # shape: (t,)"""
        return self.columns.clamp_min(0)

    def expand(self, *shape: int) -> _OneHot:
        return _OneHot(self.values.expand(*shape[:-1]), self.columns, self.k)

    def narrow(self, start: int, length: int) -> _OneHot:
        """Rows ``start .. start + length``."""
        return _OneHot(self.values.narrow(-1, start, length), self.columns.narrow(0, start, length), self.k)

    def dense(self) -> Tensor:
        """The block as a tensor. # shape: (*batch, t, k)"""
        hit = torch.nn.functional.one_hot(self.index(), self.k).to(self.values.dtype)
        return self.weight().unsqueeze(-1) * hit

    def matmul(self, y: Tensor) -> Tensor:
        """:math:`F_j y`. ``y`` # shape: (*batch, k, c) -> (*batch, t, c)"""
        return self.weight().to(y.dtype).unsqueeze(-1) * y.index_select(-2, self.index())

    def t_matmul(self, x: Tensor) -> Tensor:
        r""":math:`F_j^\top x`. ``x`` # shape: (*batch, t, c) -> (*batch, k, c)"""
        scaled = self.weight().to(x.dtype).unsqueeze(-1) * x
        return scaled.new_zeros(*scaled.shape[:-2], self.k, scaled.shape[-1]).index_add(-2, self.index(), scaled)

    def rows(self, batch_shape: torch.Size, batch_indices: tuple[Tensor, ...], index: Tensor) -> Tensor:
        """Rows ``index`` as dense rows (entries of ``_get_indices``). # shape: (*index.shape, k)"""
        values = self.weight().expand(*batch_shape, self.values.shape[-1])[(*batch_indices, index)]
        hit = torch.nn.functional.one_hot(self.index()[index], self.k).to(values.dtype)
        return values.unsqueeze(-1) * hit


def _same_columns(a: _OneHot, b: _OneHot) -> bool:
    return a.columns is b.columns or torch.equal(a.columns, b.columns)


def _block_matmul(block: Tensor | _OneHot, y: Tensor) -> Tensor:
    """:math:`F_j y` for a dense or one-hot block (``y`` in the working precision)."""
    return block.matmul(y) if isinstance(block, _OneHot) else block.to(y.dtype) @ y


def _block_t_matmul(block: Tensor | _OneHot, x: Tensor) -> Tensor:
    r""":math:`F_j^\top x` for a dense or one-hot block (``x`` in the working precision)."""
    return block.t_matmul(x) if isinstance(block, _OneHot) else block.to(x.dtype).mT @ x


def _dense_block(block: Tensor | _OneHot) -> Tensor:
    return block.dense() if isinstance(block, _OneHot) else block


def _cross_values(op: BlockCrossLinearOperator) -> Tensor | _OneHot:
    """A cross covariance's :math:`A`: one-hot when it is held so, else its dense values."""
    if op.is_one_hot:
        assert op.row_values is not None and op.columns is not None
        return _OneHot(op.row_values, op.columns, op.partition.num_blocks)
    return op.values


def _index_cross(op) -> BlockCrossLinearOperator | None:
    r"""GPyTorch's ``IndexKernel`` between new and training task ids, ``C[i_a, j_b]`` (an ``InterpolatedLinearOperator``
    with one weight 1 per row on both sides, possibly scaled), as the cross covariance :math:`A P^\top` over the
    training ids present (numbered in sorted order, as the training covariance's product numbers them,
    :func:`bma_gp.block_mean_linear_operator._one_hot_block_mean`): :math:`A_{a,c} = C[i_a, \mathrm{present}_c]`.
    ``None`` for anything else (training ids that differ across a batch included)."""
    from bma_gp.block_mean_linear_operator import _task_lookup

    scale = None
    if type(op) is ConstantMulLinearOperator:
        op, scale = op.base_linear_op, op.expanded_constant
    found = _task_lookup(op)
    if found is None:
        return None
    rows, ids, C = found  # rows (*batch, t)
    present, labels = torch.unique(ids, sorted=True, return_inverse=True)
    batch = torch.broadcast_shapes(C.shape[:-2], rows.shape[:-1])
    C = C.index_select(-1, present).expand(*batch, *C.shape[-2:-1], present.numel())
    t = rows.shape[-1]
    values = torch.gather(C, -2, rows.expand(*batch, t).unsqueeze(-1).expand(*batch, t, present.numel()))
    if scale is not None:
        values = values * scale
    return BlockCrossLinearOperator(values, Partition.from_labels(labels, num_blocks=present.numel()))


def _block_mean_as_cross(op) -> BlockCrossLinearOperator | None:
    r"""A :class:`~bma_gp.BlockMeanLinearOperator` with :math:`\lambda = 0` as the cross covariance
    :math:`(P B) P^\top` (row :math:`a` of :math:`A` is row :math:`g_a` of :math:`B`; one value per row when
    :math:`B` is held as its diagonal), or ``None``. A ``GroupKernel`` returns that operator between test and
    training inputs whose ids in its column are the training ids (as many, in the same order) while other columns
    differ: among equal ids it gives its training form, the same matrix. A nonzero :math:`\lambda` is no
    :math:`A P^\top`."""
    if not isinstance(op, BlockMeanLinearOperator) or bool(op.lam.ne(0).any()):
        return None
    labels = op.partition.labels
    if op.is_diagonal_mode:
        return BlockCrossLinearOperator.one_hot(op._b_vector().index_select(-1, labels), labels, op.partition)
    return BlockCrossLinearOperator(op.B.index_select(-2, labels), op.partition)


def _cross_pieces(op, out: list[_Piece]) -> bool:
    r"""Add the summands of a test-by-training covariance to ``out``; False when one is not of the form
    :math:`A P_j^\top` (a group or block mean kernel), :math:`A P_j^\top \operatorname{diag}(w)` (a random slope)
    or :math:`U_* U^\top` (an inducing-point kernel)."""
    if isinstance(op, ZeroLinearOperator):
        return True
    cross = _block_mean_as_cross(op)  # a group kernel whose test ids are the training ids
    if cross is not None:
        return _cross_pieces(cross, out)
    if isinstance(op, SumLinearOperator):
        return all(_cross_pieces(term, out) for term in op.linear_ops)
    if isinstance(op, BlockCrossLinearOperator):
        if op.transposed:
            return False
        out.append(("term", _cross_values(op), op.partition, None))
        return True
    if type(op) is DenseLinearOperator and is_expanded_constant(op.tensor):
        # GPyTorch's ConstantKernel between new and training inputs: c 1 1^T, the cross covariance of the training
        # sum's one-block term (lam = 0, B = c) over all n points
        t = op.tensor
        out.append(("term", t[..., :, :1].contiguous(), Partition._whole(t.shape[-1], t.device), None))
        return True
    if isinstance(op, MatmulLinearOperator):
        left, right = op.left_linear_op, op.right_linear_op
        if isinstance(left, BlockCrossLinearOperator) and isinstance(right, DiagLinearOperator):
            if left.transposed:
                return False
            out.append(("term", _cross_values(left), left.partition, right.diagonal(dim1=-2, dim2=-1)))
            return True
        if isinstance(left, DenseLinearOperator) and isinstance(right, DenseLinearOperator):
            out.append(("root", left.to_dense(), right.to_dense()))
            return True
    if isinstance(op, ConstantMulLinearOperator):  # a ScaleKernel around a random slope or a group kernel's factor
        base, c = op.base_linear_op, op.expanded_constant
        while isinstance(base, ConstantMulLinearOperator):  # nested ScaleKernels: one constant
            base, c = base.base_linear_op, c * base.expanded_constant
        if (
            isinstance(base, MatmulLinearOperator)
            and isinstance(base.left_linear_op, BlockCrossLinearOperator)
            and isinstance(base.right_linear_op, DiagLinearOperator)
        ):  # a random slope's A P^T diag(w): the scale goes into A, as it does for an intercept's A P^T
            scaled = base.left_linear_op._mul_constant(c[..., 0, 0])
            return _cross_pieces(MatmulLinearOperator(scaled, base.right_linear_op), out)
        if type(base) is DenseLinearOperator and is_expanded_constant(base.tensor):
            # a ScaleKernel around a sum with GPyTorch's ConstantKernel (ScaleKernel(sgpr + ConstantKernel())): the
            # scale distributes over the summands, and the constant's s c 1 1^T is the cross covariance of the
            # training sum's one-block term B = s c (any sign of s: no root is taken of it)
            t = base.tensor[..., :, :1] * c
            out.append(("term", t.contiguous(), Partition._whole(base.tensor.shape[-1], base.tensor.device), None))
            return True
        if not isinstance(base, MatmulLinearOperator) or not bool((c >= 0).all()):
            return False
        inner: list[_Piece] = []
        if not _cross_pieces(base, inner) or len(inner) != 1 or inner[0][0] != "root":
            return False
        # the scale split as sqrt(c) on both sides: the training operator's root is sqrt(c) U
        half = c.sqrt()  # (*batch, 1, 1)
        out.append(("root", inner[0][1] * half, inner[0][2] * half))
        return True
    return False


def _same_weight(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.shape[-1:] != b.shape[-1:]:
        return False
    try:  # a batch of models broadcasts the cross covariance's weight to (*batch, n); the training one is (n,)
        a, b = torch.broadcast_tensors(a.to(b.dtype), b)
    except RuntimeError:
        return False
    return torch.equal(a, b)


def _same_root(a: Tensor, b: Tensor) -> bool:
    """The training root and the right factor of a cross covariance: the same columns computed twice (in row
    chunks and at once), so equal up to the rounding of one product with ``m`` terms."""
    if a.shape[-2:] != b.shape[-2:]:
        return False
    try:
        a, b = torch.broadcast_tensors(a, b)
    except RuntimeError:
        return False
    return _within(a, b, 64 * a.shape[-1])


def _cross_factor(
    M: BlockMeanSumLinearOperator, pieces: list[_Piece], roots: list[tuple[int, Tensor]] | None = None
) -> list[Tensor | _OneHot | None] | None:
    r""":math:`F` with :math:`K_{*x} = F Z^\top` for the columns :math:`Z` of ``M``, one block per term of ``M``
    (None: zero), or None when a piece has no matching column block in ``M``. ``roots`` (if given) receives, per
    inducing-point piece, its first column in the root of ``M`` and the cross covariance's own training root (the
    right factor, ``(*batch, n, m)``, with the graph of this evaluation)."""
    sizes = M._sizes()
    J = len(M.partitions)
    blocks: list[Tensor | _OneHot | None] = [None] * len(sizes)

    def add(j: int, values: Tensor | _OneHot) -> None:
        current = blocks[j]
        if current is None:
            blocks[j] = values
        elif isinstance(current, _OneHot) and isinstance(values, _OneHot) and _same_columns(current, values):
            blocks[j] = _OneHot(current.values + values.values, current.columns, current.k)
        else:
            blocks[j] = _dense_block(current) + _dense_block(values)

    for piece in pieces:
        if piece[0] == "term":
            _, values, partition, weight = piece
            for j, (p, w) in enumerate(zip(M.partitions, M.weights)):
                if _same_weight(weight, w) and isinstance(partition, Partition) and p.same_as(partition):
                    add(j, values)
                    break
            else:
                return None
        else:
            _, left, right = piece
            if M.root is None:
                return None
            m, rank = left.shape[-1], M.rank
            cols = right.mT
            for offset in range(rank - m + 1):
                if _same_root(M.root.narrow(-1, offset, m), cols):
                    break
            else:
                return None
            if roots is not None:
                roots.append((offset, cols))
            if m < rank:
                left = torch.nn.functional.pad(left, (offset, rank - m - offset))
            add(J, left)
    return blocks


#: A table of two partitions is multiplied as a dense ``k_i x k_j`` matrix up to this many entries; a larger one
#: that the capacitance keeps as its nonzero cells (many crossed levels) is multiplied from the cells.
_DENSE_TABLE_ELEMENTS = 2**24


def _gram_matmul(M: BlockMeanSumLinearOperator, X: Tensor) -> Tensor:
    r""":math:`A X` for the Gram matrix :math:`A = Z^\top D^{-1} Z` of ``M``, from its term blocks without forming
    it: a partition's own block is diagonal (block sums of :math:`1/d`), so it scales rows instead of a ``k x k``
    product. A table with the grouping the capacitance eliminates that the capacitance keeps as its nonzero cells
    (many crossed levels) and that has more than ``_DENSE_TABLE_ELEMENTS`` entries is multiplied from those cells,
    so no table is formed that training did not form. With one grouping of ``k`` levels and a root of rank ``m``
    that is :math:`O(k m c)` for ``c`` columns, where the formed ``q x q`` matrix costs :math:`O(q^2 c)`.
    # shape: (*batch, q, c)"""
    sizes = M._sizes()
    J = len(M.partitions)
    a, _ = M._gram()
    cells: dict[int, tuple] = {}  # term -> (cells, values) of its table with the eliminated grouping
    e = None
    cap = M._capacitance() if M._elimination_term() is not None and len(sizes) > 1 else None
    if cap is not None and cap.A_re is not None:  # one eliminated term (a joint elimination keeps no cells)
        e = cap.elim
        assert e is not None
        rest = [t for t in range(len(sizes)) if t != e]
        for t, piece in zip(rest, cap.A_re.pieces):
            if not torch.is_tensor(piece) and sizes[t] * sizes[e] > _DENSE_TABLE_ELEMENTS:
                cells[t] = piece
    X_blocks = X.split(sizes, dim=-2)
    out: list[Tensor] = []
    for i in range(len(sizes)):
        terms = []
        for j, X_j in enumerate(X_blocks):
            if i == j and i < J:
                terms.append(a[i].to(X_j.dtype).unsqueeze(-1) * X_j)
            elif i < J and j < J and M.partitions[i].same_as(M.partitions[j]):  # diagonal: no k x k table
                terms.append(M._level_gram(i, j).to(X_j.dtype).unsqueeze(-1) * X_j)
            elif e in (i, j) and i != j and (j if i == e else i) in cells:
                table, values = cells[j if i == e else i]  # the pair's other term's table with the eliminated one
                terms.append(_cells_matmul(table, values.to(X_j.dtype), X_j, sizes[i], transpose=i == e))
            else:
                terms.append(M._A_block(i, j).to(X_j.dtype) @ X_j)
        acc = terms[0]
        for term in terms[1:]:
            acc = acc + term
        out.append(acc)
    batch = torch.broadcast_shapes(*(o.shape[:-2] for o in out))
    return torch.cat([o.expand(*batch, *o.shape[-2:]) for o in out], dim=-2)


#: The posterior weight is formed as a ``q x q`` matrix only while the largest diagonal grouping (the one the
#: capacitance factorisation eliminates) has at most this many levels; past it, it is applied as products
#: (:class:`_ImplicitWeight`). Measured with ``GroupKernel(k, rank=2)`` at n = 10^5, 1000 test points, float32:
#: formed 0.059 / 0.31 / 2.28 s at k = 1000 / 2000 / 4000 against 0.083 / 0.18 / 0.38 s as products. Where every
#: term is stable (random slopes, ``GroupKernel(k, rank=r)``), the weight below it is :math:`G - \Sigma` as products,
#: and variances, entries and products at new inputs come from the structured forms on both sides of the threshold
#: (:class:`_Structured`, with ``R^2 <= q``): :math:`O(t)` for ``t`` new points, flat in ``k``.
_DENSE_WEIGHT_MAX_ELIMINATED = 1024


def _posterior_weight(M: BlockMeanSumLinearOperator) -> Tensor | _ImplicitWeight:
    r""":math:`W = Z^\top M^{-1} Z = A (I + G A)^{-1} = A - A C^{-1} G A` (``q x q``, working precision) through
    the operator's own capacitance factorisation (its largest diagonal grouping eliminated first).

    Formed as a matrix when the eliminated grouping is small (then :math:`W` costs about what the capacitance
    does) and ``q`` fits ``max_capacitance_size``; otherwise applied as products (:class:`_ImplicitWeight`), which
    needs no ``q x q`` matrix at all: a random intercept with many levels predicts ``t`` points in :math:`O(t q)`
    memory, however large ``q`` is. Formed, it is :math:`T W T` (:func:`_transformed_weight`) with
    :math:`T = G` on the terms :func:`_stable_terms` picks, to be used with :func:`_stable_blocks` of :math:`F`.
    Where it picks every term, :math:`G - \Sigma` is applied as products too (``_ImplicitWeight(M, stable=True)``,
    formed once ``q`` columns have been asked for): a random slope over 1024 levels (``q = 3072``) formed a
    ``q x q`` weight for 10 test points, 0.6 s and 400 MB against 0.01 s for its products. The predictive covariance
    takes its structured form (:class:`_Structured` with ``stable``) where the other terms are few."""
    if _weight_as_products(M):
        return _ImplicitWeight(M, stable=_stable_past_threshold(M))
    stable = _stable_terms(M)
    if stable is not None and all(stable):
        return _ImplicitWeight(M, stable=True)
    return _transformed_weight(M, stable if stable is not None else [False] * len(M._sizes()))


def _weight_as_products(M: BlockMeanSumLinearOperator) -> bool:
    """Whether :func:`_posterior_weight` applies the weight as products whatever the terms: the eliminated grouping
    has more than :data:`_DENSE_WEIGHT_MAX_ELIMINATED` levels, or ``q`` passes ``max_capacitance_size`` while the
    factorisation itself fits (e.g. a random slope's three terms)."""
    sizes = M._sizes()
    elim = M._elimination_term()
    return elim is not None and (
        sizes[elim] > _DENSE_WEIGHT_MAX_ELIMINATED or sum(sizes) > settings.max_capacitance_size.value()
    )


#: The structured forms of the stable weight (:class:`_Structured` with ``stable``) are taken while the other terms'
#: columns ``R`` have :math:`R^2 \le q`, or, past the threshold of :func:`_weight_as_products` (where the alternative
#: is :math:`W`'s structured forms, as costly), are at most this many (a ``2 R x 2 R`` core). A user
#: trial (session 37): 1100 x 40 crossed levels (``R^2 > q``) fell to ``K_** - F W F^T``, 29 % off at noise 1e-8.
_STABLE_STRUCTURED_MIN_COLUMNS = 128


def _stable_past_threshold(M: BlockMeanSumLinearOperator) -> bool:
    r"""Whether the weight applied as products past :data:`_DENSE_WEIGHT_MAX_ELIMINATED` levels is :math:`G - \Sigma`
    (``stable``, every term transformed) rather than :math:`W`: where every term's :math:`G_j` is diagonal (random
    intercepts and slopes) or the root's, and the other terms' columns ``R`` have :math:`R^2 \le q` or are at most
    :data:`_STABLE_STRUCTURED_MIN_COLUMNS`, so that the structured forms at new inputs (:class:`_Structured` with
    ``stable``) serve the variances.
    :math:`K_{**} - F W F^\top` cancels terms of the size of :math:`A` (``n`` over the noise): a user trial (session
    37) had variances at seen levels 22 % off at noise 1e-8 with 1766 x 5 crossed levels, against 5e-7 with 867 x 5
    (below the threshold, where the weight is the stable one)."""
    sizes = M._sizes()
    J = len(M.partitions)
    if not sizes or not all(j >= J or M._block_is_diagonal(j) for j in range(len(sizes))):
        return False
    cap = M._capacitance()
    eliminated = list(cap.joint.terms) if cap.joint is not None else [cap.elim] if cap.elim is not None else []
    R = sum(size for j, size in enumerate(sizes) if j not in eliminated)
    return R * R <= sum(sizes) or R <= _STABLE_STRUCTURED_MIN_COLUMNS


def _formed_weight(M: BlockMeanSumLinearOperator) -> Tensor:
    """:math:`W` formed as a ``q x q`` matrix (working precision); past ``max_capacitance_size`` a ``ValueError``."""
    return _transformed_weight(M, [False] * len(M._sizes()))


#: The stable form of the weight (:func:`_transformed_weight` with stable terms) is taken up to this many levels of
#: the eliminated grouping, the default of ``_DENSE_WEIGHT_MAX_ELIMINATED``; a larger threshold for the formed
#: weight forms :math:`W` past it.
_STABLE_WEIGHT_MAX_ELIMINATED = 1024


def _stable_terms(M: BlockMeanSumLinearOperator) -> list[bool] | None:
    r"""Per term of ``M`` (the root last), whether the posterior at new inputs works with :math:`Z_* = F_j G_j^{-1}`
    and the weight's rows and columns :math:`G_j W`: every diagonal :math:`G_j` (random intercepts and slopes;
    :math:`G^{+}` there) and the root's (the identity), and a dense :math:`G_j` (``GroupKernel(k, rank=r)``, a
    ``BlockMeanKernel``) whose condition number is below :math:`\lVert G_j \rVert \max_a A_{aa}`: its
    :math:`F_j G_j^{-1}` rounds at :math:`\epsilon \operatorname{cond}(G_j)` where :math:`F W F^\top` cancels at
    :math:`\epsilon \lVert G_j \rVert \lVert A_{jj} \rVert` (``n`` over the noise), so it is taken where it is the
    more accurate. None where the weight is not formed (:func:`_posterior_weight` applies it as products) or there
    are groupings and none qualifies (the weight is then :math:`W` itself: ``[False] * len(sizes)``)."""
    sizes = M._sizes()
    if not sizes or sum(sizes) > settings.max_capacitance_size.value():
        return None
    elim = M._elimination_term()
    if elim is not None and sizes[elim] > min(_DENSE_WEIGHT_MAX_ELIMINATED, _STABLE_WEIGHT_MAX_ELIMINATED):
        return None

    def decide() -> list[bool] | None:
        J = len(M.partitions)
        flags = [j >= J or M._block_is_diagonal(j) or _well_conditioned(M, j) for j in range(len(sizes))]
        return flags if J == 0 or any(flags[:J]) else None  # a root alone (an SGPR term): its G is I

    return M._memo("stable_terms", decide)


def _well_conditioned(M: BlockMeanSumLinearOperator, j: int) -> bool:
    r"""Whether the dense :math:`G_j` is positive definite with :math:`\operatorname{cond}(G_j) < \lVert G_j
    \rVert \max_a A_{aa}`, that is :math:`\lambda_{\min}(G_j) \max_a A_{aa} > 1`, in every batch entry (see
    :func:`_stable_terms`; decided on the values, without a graph)."""
    with torch.no_grad():
        values = torch.linalg.eigvalsh(M._symmetric_block(j, core_dtype(M.dtype)).detach())  # (*batch, k), ascending
        a = M._gram()[0][j].detach().amax(-1)
        return bool((torch.isfinite(values[..., -1]) & (values[..., 0] * a > 1)).all())


def _transformed_weight(M: BlockMeanSumLinearOperator, stable: list[bool]) -> Tensor:
    r""":math:`T W T` (``q x q``, working precision) with :math:`T = \operatorname{blockdiag}(T_j)`,
    :math:`T_j = G_j` on the ``stable`` terms ``S`` and the identity on the others ``N``; with
    :math:`F = Z_* G`, :math:`F W F^\top = (F T^{-1}) T W T (F T^{-1})^\top` (:func:`_stable_blocks` forms
    :math:`F T^{-1}`). From :math:`G W = I - C^{-1}` (:math:`C = I + G A`) and one solve
    :math:`Y = C^{-1} G R` with :math:`R`'s columns :math:`e` on ``S`` and :math:`A e` on ``N``:

    * :math:`(T W T)_{SS} = (G - \Sigma)_{SS}`, :math:`\Sigma = C^{-1} G` the posterior covariance of the random
      effects: rounded at the size of :math:`G`, so the variance keeps the accuracy of :math:`K_{**}` itself, as a
      dense Cholesky does, where :math:`A - A C^{-1} G A` cancels terms of the size of :math:`A` (``n`` over the
      noise) that :math:`F`'s two factors of :math:`G` then scale to :math:`|G A G|`;
    * :math:`(T W T)_{SN} = (G W)_{SN} = (C^{-1} G A)_{SN} = Y_{SN}`, and :math:`(T W T)_{NS}` its transpose;
    * :math:`(T W T)_{NN} = W_{NN} = (A - A Y)_{NN}`.

    ``stable`` all False is :math:`W` itself; past ``max_capacitance_size`` a ``ValueError``. # shape: (*batch, q, q)"""
    _check_weight_size(M, "the weight Z^T M^-1 Z")
    sizes = M._sizes()
    q = sum(sizes)
    wdt = core_dtype(M.dtype)
    eye = torch.eye(q, dtype=wdt, device=M.device).expand(*M.batch_shape, q, q)
    on = torch.cat([torch.full((k,), flag, dtype=torch.bool, device=M.device) for k, flag in zip(sizes, stable)])
    dense = not bool(on.all())
    A = _scaled_gram(M, [None] * len(sizes)) if dense else None
    R = eye if A is None else torch.where(on, eye, A)  # columns: e on S, A e on N
    Y = torch.cat(M._cap_solve([M._G(t, piece) for t, piece in enumerate(R.split(sizes, dim=-2))]), dim=-2)
    if A is None:  # every term stable: G - Sigma
        W = torch.cat([M._G(t, piece) for t, piece in enumerate(eye.split(sizes, dim=-2))], dim=-2) - Y
    else:
        W = A - _gram_matmul(M, Y)  # the N x N block (the others are replaced)
        if bool(on.any()):
            G = torch.cat([M._G(t, piece) for t, piece in enumerate(eye.split(sizes, dim=-2))], dim=-2)
            rows, cols = on.unsqueeze(-1), on.unsqueeze(-2)
            W = torch.where(rows & cols, G - Y, torch.where(rows, Y, torch.where(cols, Y.mT, W)))
    return 0.5 * (W + W.mT)


def _stable_blocks(M: BlockMeanSumLinearOperator, blocks: list[Tensor | _OneHot | None], stable: list[bool]) -> list:
    r""":math:`F T^{-1}` block by block (:func:`_transformed_weight`): on a ``stable`` term with a diagonal
    :math:`G_j`, each column of its block divided by its variance, 0 where that is 0 (there :math:`F`'s column is 0
    too, and so are :math:`G - \Sigma`'s row and column); with a dense :math:`G_j`, :math:`F_j G_j^{-1}` by a
    Cholesky solve; the root's (:math:`G = I`) and the other terms' blocks unchanged."""
    J = len(M.partitions)
    out: list[Tensor | _OneHot | None] = []
    for j, block in enumerate(blocks):
        if block is None or j >= J or not stable[j]:
            out.append(block)
            continue
        if not M._block_is_diagonal(j):
            B = M._symmetric_block(j, core_dtype(M.dtype))
            F = _dense_block(block).to(B.dtype)
            out.append(torch.cholesky_solve(F.mT, torch.linalg.cholesky(B)).mT)
            continue
        g = M._working_block_diagonal(j)
        if isinstance(block, _OneHot):
            values = block.values.to(g.dtype)
            gv = g.index_select(-1, block.index())
            safe = torch.where(gv != 0, gv, torch.ones_like(gv))
            out.append(_OneHot(torch.where(gv != 0, values / safe, torch.zeros_like(safe)), block.columns, block.k))
        else:
            gv = g.unsqueeze(-2)
            ratio = block.to(g.dtype) / torch.where(gv != 0, gv, torch.ones_like(gv))
            out.append(torch.where(gv != 0, ratio, torch.zeros_like(ratio)))
    return out


def _stable_weight_matmul(M: BlockMeanSumLinearOperator, X: Tensor) -> Tensor:
    r""":math:`(G - \Sigma) X = G X - C^{-1} G X` (every term stable, :func:`_transformed_weight`). # shape:
    (*batch, q, c)"""
    GX = [M._G(t, piece) for t, piece in enumerate(X.split(M._sizes(), dim=-2))]
    return torch.cat(GX, dim=-2) - torch.cat(M._cap_solve(GX), dim=-2)


def _weight_matmul(M: BlockMeanSumLinearOperator, X: Tensor) -> Tensor:
    """:math:`W X = A X - A C^{-1} G A X` from the sum's Gram blocks and capacitance. # shape: (*batch, q, c)"""
    AX = _gram_matmul(M, X)
    GA = [M._G(t, piece) for t, piece in enumerate(AX.split(M._sizes(), dim=-2))]
    return AX - _gram_matmul(M, torch.cat(M._cap_solve(GA), dim=-2))


class _ImplicitWeight(LinearOperator):
    r"""The posterior weight :math:`W = Z^\top M^{-1} Z` (``q x q``, symmetric) as products with ``M``'s Gram
    blocks and capacitance factorisation, never formed: :math:`W X = A X - A C^{-1} G A X`.

    A product costs what :math:`A` does (its blocks: a grouping's own block is diagonal) plus one solve with the
    factorised capacitance, whose size excludes the largest diagonal grouping. The factorisation is made when
    the weight is built (so its errors surface there) and kept with ``M``: when ``M`` carries an autograd graph,
    the weight holds a copy of it whose caches live as long as the weight does, as a formed matrix's graph would.

    A product with ``c`` columns costs about what ``c`` columns of the formed matrix do, and a cross table stored
    as its cells costs up to ``n`` per column. So once products with ``q`` columns in all have been asked for
    (one diagonal of ``t >= q`` test points, or several smaller ones), :meth:`formed` forms :math:`W` after all,
    if ``q`` fits ``max_capacitance_size``: from then on the cost is that of the formed weight, and the total is
    at most about twice the cheaper of the two.

    With ``stable``, the weight is :math:`G W G = G - \Sigma` instead (:func:`_transformed_weight` with every term
    stable, to be used with :func:`_stable_blocks` of :math:`F`): :math:`(G - \Sigma) X = G X - C^{-1} G X`.

    Args:
        M: the noisy training covariance.
        batch: a batch shape it was expanded to (default: ``M``'s).
        stable: the weight :math:`G - \Sigma` instead of :math:`W`.
    """

    def __init__(self, M: BlockMeanSumLinearOperator, batch: tuple[int, ...] | None = None, stable: bool = False):
        if M._differentiable():  # a private copy whose Gram blocks and factorisation (and graph) stay cached
            M = M._new()
            M._depth += 1
        super().__init__(M, batch=batch, stable=stable)
        self.M = M
        self.stable = stable
        self._batch = tuple(M.batch_shape) if batch is None else tuple(batch)
        self._columns = 0  # product columns asked for so far
        self._formed: Tensor | None = None
        M._capacitance()  # factorise now: a size limit or an indefinite sum raises here, not at first use

    def formed(self, columns: int) -> Tensor | None:
        """:math:`W` as a matrix once products with at least ``q`` columns in all have been asked for, counting the
        ``columns`` about to be (see the class docstring); None before, and whenever ``q`` exceeds
        ``max_capacitance_size``. One formed without gradients is formed again when gradients are enabled and ``M``
        carries a graph, so that a graph is never missed. # shape: (*batch, q, q)"""
        formed = self._formed
        if formed is not None and torch.is_grad_enabled() and self.M._differentiable() and not formed.requires_grad:
            return self._form()
        if formed is None:
            q = self.shape[-1]
            self._columns += columns
            if self._columns >= q and q <= settings.max_capacitance_size.value():
                self._formed = self._form()
        return self._formed

    def _form(self) -> Tensor:
        M = self.M
        return _transformed_weight(M, [True] * len(M._sizes())) if self.stable else _formed_weight(M)

    @property
    def dtype(self) -> torch.dtype:
        return core_dtype(self.M.dtype)

    @property
    def device(self) -> torch.device:
        return self.M.device

    def _size(self) -> torch.Size:
        q = sum(self.M._sizes())
        return torch.Size((*self._batch, q, q))

    def _transpose_nonbatch(self) -> _ImplicitWeight:
        return self

    def _expand_batch(self, batch_shape) -> _ImplicitWeight:
        return _ImplicitWeight(self.M, batch=tuple(batch_shape), stable=self.stable)

    def _unsqueeze_batch(self, dim: int) -> _ImplicitWeight:
        """A batch dimension of size 1 at ``dim``, in ``M`` too where ``M`` has that batch dimension (``M``'s batch
        shape is aligned to the right of this one's; linear_operator's default unsqueezed ``M`` and kept the old batch
        shape, so ``M`` then broadcast against the wrong dimensions)."""
        batch = list(self._batch)
        batch.insert(dim, 1)
        lead = len(self._batch) - len(self.M.batch_shape)  # leading dimensions that M broadcasts over
        return _ImplicitWeight(
            self.M.unsqueeze(dim - lead) if dim >= lead else self.M, batch=tuple(batch), stable=self.stable
        )

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        """Batch entries: the weight of ``M``'s entries, ``M`` expanded to the whole batch shape first
        (linear_operator's default indexed ``M``, which may have fewer batch dimensions, and kept the old batch
        shape)."""
        if _is_noop_index(row_index) and _is_noop_index(col_index):
            M = self.M._expand_batch(torch.Size(self._batch)) if self.M.batch_shape != self._batch else self.M
            return _ImplicitWeight(M._getitem(row_index, col_index, *batch_indices), stable=self.stable)
        return super()._getitem(row_index, col_index, *batch_indices)

    def _matmul(self, rhs: Tensor) -> Tensor:
        res = (_stable_weight_matmul if self.stable else _weight_matmul)(self.M, rhs.to(self.dtype))
        return res.expand(*torch.broadcast_shapes(res.shape[:-2], self._batch), *res.shape[-2:])

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._matmul(rhs)

    def __repr__(self) -> str:
        stable = ", G - Sigma" if self.stable else ""
        return f"_ImplicitWeight(q={self.shape[-1]}{stable}, {self.M._describe()})"


def _posterior_coefficients(M: BlockMeanSumLinearOperator, offset: Tensor) -> Tensor:
    r""":math:`Z^\top M^{-1} r` for the residual :math:`r = y - \mu` (``offset``, ``(*batch, n)``), the posterior
    mean's coefficients, in the working precision (``q``).

    From Woodbury, :math:`Z^\top M^{-1} r = u - A x` with :math:`u = Z^\top D^{-1} r` and :math:`x = C^{-1} G u`:
    the cancellation between the two happens among ``q`` numbers in the working precision, not among the ``n``
    entries of :math:`M^{-1} r` in the model's (float32: GPyTorch's :math:`K_{*x} M^{-1} r` lost two to three
    digits of the mean at a group kernel's factor, n = 10^5)."""
    return _solved_coefficients(M, offset.unsqueeze(-1)).squeeze(-1)


def _solved_coefficients(M: BlockMeanSumLinearOperator, rhs: Tensor) -> Tensor:
    r""":math:`Z^\top M^{-1} R = u - A x` (Woodbury: :math:`u = Z^\top D^{-1} R`, :math:`x = C^{-1} G u`), working
    precision. ``rhs`` # shape: (*batch, n, c) -> (*batch, q, c)"""
    scaled, u, x = M._woodbury(rhs)
    if M._refines():
        # weighted terms eliminated jointly (random slopes, BlockMeanSumLinearOperator._refines): Z^T of the refined
        # M^{-1} R. u - A x took the rounding of A times the components of x that the ill-conditioned per-level
        # blocks leave along their null directions (W n = 0, A n = 0 up to eps |A| |n|), which Z x does not see; the
        # block sums of the refined solve round at about eps |Z|^T |M^{-1} R| only, as a dense solve's mean does
        alpha = scaled - M._z(x) / M._working_diag().to(scaled.dtype).unsqueeze(-1)
        return torch.cat(M._z_t(M._refined(rhs, alpha)), dim=-2)
    return torch.cat(u, dim=-2) - _gram_matmul(M, torch.cat(x, dim=-2))


def _new_input_weight(
    strategy: DefaultPredictionStrategy,
) -> tuple[BlockMeanSumLinearOperator, Tensor | _ImplicitWeight, list[bool] | None] | None:
    """``(M, W, stable)`` for the strategy's noisy training covariance, or None outside the family: with
    ``stable`` (per term, :func:`_stable_terms`), ``W`` is :func:`_transformed_weight`'s :math:`T W T`, to be used
    with :func:`_stable_blocks` of :math:`F`. One computed without autograd is kept on the strategy (GPyTorch drops
    the strategy when the model is trained or its data change); with gradients (``detach_test_caches`` off) it is
    rebuilt per call, as at the training inputs."""
    cached = getattr(strategy, "_bma_gp_weight", None)
    if cached is not None and not torch.is_grad_enabled():
        return cached
    covar = strategy.likelihood(strategy.train_prior_dist, strategy.train_inputs).lazy_covariance_matrix
    M = as_sum(covar.evaluate_kernel() if isinstance(covar, LinearOperator) else covar)
    if M is None or not M._sizes() or not bool((M.diag_values > 0).all()):
        return None
    if gpytorch_settings.detach_test_caches.on():
        # as GPyTorch detaches the training covariance in its predictive covariance: GPyTorch memoises the kernel's
        # evaluation, so a W rebuilt from it per call reached into the graph of the first prediction, which that
        # prediction's backward pass had freed ("Trying to backward through the graph a second time" on the second
        # gradient with respect to the test inputs)
        M = M.detach()
    needs_grad = M._differentiable()
    if cached is not None and not needs_grad:
        return cached

    def weight(op: BlockMeanSumLinearOperator) -> tuple[Tensor | _ImplicitWeight, list[bool] | None]:
        W = _posterior_weight(op)
        stable = torch.is_tensor(W) or (isinstance(W, _ImplicitWeight) and W.stable)
        if not stable:
            return W, None
        flags = _stable_terms(op)  # the rule _posterior_weight followed
        if flags is None and isinstance(W, _ImplicitWeight):  # past its threshold of levels (_stable_past_threshold)
            flags = [True] * len(op._sizes())
        return W, flags

    W, stable = _scoped(weight)(M)
    if not needs_grad:
        strategy._bma_gp_weight = (M, W, stable)
    return M, W, stable


def _new_input_coefficients(strategy: DefaultPredictionStrategy, M: BlockMeanSumLinearOperator) -> Tensor | None:
    """:func:`_posterior_coefficients` of the strategy's data, of the observed points under an observation NaN policy
    (:func:`_observed_problem`, whose ``M_o`` has the columns of ``M``), kept like the weight when no gradient is
    needed; None where that has no closed form."""

    def compute(policy: str) -> Tensor | None:
        problem = _observed_problem(strategy, M, policy)
        if problem is None:
            return None
        M_o, offset, _ = problem
        coef = _scoped(lambda op: _posterior_coefficients(op, offset))(M_o)  # one scope of the operator's caches
        return coef.detach() if gpytorch_settings.detach_test_caches.on() else coef  # as GPyTorch's mean cache

    keep = not M._differentiable() and not torch.is_grad_enabled()
    return _kept_with(strategy, "_bma_gp_coefficients", M, compute, keep)


def _new_input_g_coefficients(strategy: DefaultPredictionStrategy, M: BlockMeanSumLinearOperator) -> Tensor | None:
    r""":math:`G Z^\top M^{-1} r = C^{-1} G Z^\top D^{-1} r` (the ``x`` of the sum's Woodbury solve) for
    :func:`new_input_prediction`'s stable terms, kept as :func:`_new_input_coefficients` keeps the coefficients; None
    where they have no closed form or the sum refines its solve (jointly eliminated slopes, whose ``x`` is the
    unrefined one)."""

    def compute(policy: str) -> Tensor | None:
        problem = _observed_problem(strategy, M, policy)
        if problem is None or problem[0]._refines():
            return None
        M_o, offset, _ = problem
        x = _scoped(lambda op: torch.cat(op._woodbury(offset.unsqueeze(-1))[2], dim=-2).squeeze(-1))(M_o)
        return x.detach() if gpytorch_settings.detach_test_caches.on() else x

    keep = not M._differentiable() and not torch.is_grad_enabled()
    return _kept_with(strategy, "_bma_gp_g_coefficients", M, compute, keep)


def _kept_with(strategy: DefaultPredictionStrategy, name: str, M, compute, keep: bool = True) -> Tensor | None:
    """``compute(policy)`` for the observation NaN policy in force, kept on the strategy as ``name`` with ``M`` and
    the policy (where ``keep``), and read back while both are the same; None results are not kept."""
    policy = gpytorch_settings.observation_nan_policy.value()
    cached = getattr(strategy, name, None)
    if cached is not None and cached[0] is M and cached[1] == policy:
        return cached[2]
    value = compute(policy)
    if value is not None and keep:
        setattr(strategy, name, (M, policy, value))
    return value


def _training_side_differentiable(strategy: DefaultPredictionStrategy) -> bool:
    """Whether the training side of a cross covariance may depend on something that requires gradients: a training
    input (a fantasy model's fantasy inputs) or a parameter of the model's kernel. Its ``requires_grad`` alone does
    not say: GPyTorch evaluates the kernel on ``cat(train_x, test_x)``, whose training rows require gradients whenever
    the test inputs do (an acquisition function's gradient with the hyperparameters frozen), with a zero gradient."""
    if any(torch.is_tensor(x) and x.requires_grad for x in strategy.train_inputs):
        return True
    kernel = getattr(strategy.train_prior_dist.lazy_covariance_matrix, "kernel", None)
    if not isinstance(kernel, torch.nn.Module):  # not a lazily evaluated kernel tensor: assume it may
        return True
    return any(p.requires_grad for p in kernel.parameters())


def _root_change(
    strategy: DefaultPredictionStrategy, M: BlockMeanSumLinearOperator, roots: list[tuple[int, Tensor]]
) -> Tensor | None:
    r""":math:`\Delta = U_x - \operatorname{detach}(U_x)` in the root's columns of ``M``: zero, with the graph of the
    training roots of the cross covariance (:func:`_cross_factor`'s ``roots``), or None where no gradient needs it.

    GPyTorch's ``detach_test_caches`` holds :math:`\alpha = M^{-1} r` (and, with eagerly evaluated kernels, the noisy
    training covariance of the predictive covariance) fixed, but differentiates the whole test-by-training covariance
    :math:`K_{*x} = U_* U_x^\top`, its training side too: :math:`U_x` depends on the inducing points, the base
    kernel's hyperparameters and the training inputs (a fantasy model's fantasy inputs). The closed forms read the
    training side from the detached ``M`` (the coefficients :math:`Z^\top \alpha`, the weight
    :math:`W = Z^\top M^{-1} Z`), so that dependence is added back through :math:`\Delta` (see
    :func:`new_input_prediction`); only with gradients enabled, under ``detach_test_caches`` (without it ``M`` keeps
    its graph), and when a training root requires gradients. # shape: (*batch, n, rank)"""
    if not (torch.is_grad_enabled() and gpytorch_settings.detach_test_caches.on()):
        return None
    live = [(offset, cols) for offset, cols in roots if cols.requires_grad]
    if not live or not _training_side_differentiable(strategy):
        return None
    wdt, rank = core_dtype(M.dtype), M.rank
    delta = None
    for offset, cols in live:
        # a training root copied across a batch of test sets (an expanded view) is one matrix
        while cols.dim() > max(2, M.dim()) and cols.stride(0) == 0:
            cols = cols[0]
        m = cols.shape[-1]
        change = torch.nn.functional.pad((cols - cols.detach()).to(wdt), (offset, rank - m - offset))
        delta = change if delta is None else delta + change
    return delta


def _new_input_alpha(strategy: DefaultPredictionStrategy, M: BlockMeanSumLinearOperator) -> Tensor | None:
    """GPyTorch's detached mean cache :math:`M_o^{-1} r` (:func:`_observed_alpha`; 0 at the points an observation NaN
    policy drops) in the working precision, kept with ``M``; None where it has no closed form. # shape: (*batch, n)"""

    def compute(policy: str) -> Tensor | None:
        found = _observed_alpha(strategy, M, policy)
        return None if found is None else found[0].detach()

    return _kept_with(strategy, "_bma_gp_alpha", M, compute)


def _blocks_matmul(blocks: list[Tensor | _OneHot | None], sizes: list[int], y: Tensor) -> Tensor:
    """:math:`F y` from the blocks of :math:`F` (None: zero), in ``y``'s dtype. ``y`` # shape: (*batch, q, c)"""
    res = None
    for block, piece in zip(blocks, y.split(sizes, dim=-2)):
        if block is not None:
            values = block if isinstance(block, _OneHot) else block.to(y.dtype)
            term = _block_matmul(values, piece)
            res = term if res is None else res + term
    assert res is not None
    return res


def new_input_prediction(strategy: DefaultPredictionStrategy, test_mean: Tensor, test_test_covar, test_train_covar):
    r"""``(mean, covariance)`` at new inputs in closed form, or None (then GPyTorch's path).

    With the noisy training covariance :math:`M = D + Z G Z^\top` (:math:`Z = [P_1 W_1, \dots, U]`) and the
    test-by-training covariance :math:`K_{*x} = F Z^\top` (each group term :math:`A_j P_j^\top`, with the slope's
    weights, an inducing-point kernel :math:`U_* U^\top`), the posterior covariance is

    .. math::
        K_{**} - K_{*x} M^{-1} K_{x*} = K_{**} - F W F^\top, \qquad W = Z^\top M^{-1} Z = A (I + G A)^{-1},

    :math:`A = Z^\top D^{-1} Z`: memory :math:`O(t q + q^2)`, never :math:`t \times n`, and :math:`O(t q)` when the
    largest diagonal grouping has more than ``_DENSE_WEIGHT_MAX_ELIMINATED`` levels (then :math:`W` is applied as
    products, :class:`_ImplicitWeight`, and ``q`` may exceed ``max_capacitance_size``). None with
    ``skip_posterior_variances``, a summand outside the family (an exact kernel: then GPyTorch's path, with the
    :class:`~bma_gp.ClosedFormFallbackWarning` of its solves) or a likelihood whose noisy covariance leaves it.
    The mean is :math:`\mu_* + F c` with the coefficients :math:`c = Z^\top M^{-1} (y - \mu)` of
    :func:`_posterior_coefficients`, in the working precision, of the observed points under an observation NaN
    policy other than ``"ignore"`` (:func:`_observed_problem`); the covariance is the same closed form."""
    if gpytorch_settings.skip_posterior_variances.on():
        return None
    if not isinstance(test_train_covar, LinearOperator) or tuple(test_train_covar.shape[-1:]) != (strategy.num_train,):
        return None
    pieces: list[_Piece] = []
    if not _cross_pieces(test_train_covar, pieces) or not pieces:
        _warn_unrecognised_cross(strategy, test_train_covar)
        return None
    found = _new_input_weight(strategy)
    if found is None:
        return None
    M, W, stable = found
    roots: list[tuple[int, Tensor]] = []
    blocks = _cross_factor(M, pieces, roots)
    if blocks is None or all(b is None for b in blocks):
        _warn_unrecognised_cross(strategy, test_train_covar, M)
        return None
    sizes = M._sizes()
    delta = _root_change(strategy, M, roots)
    graph = None
    if delta is not None and blocks[-1] is not None:
        # GPyTorch's K_{*x} M^{-1} K_{x*} with M fixed and K_{*x} = F (Z + Delta)^T: to first order the closed form
        # F W F^T plus G1 G2^T + G2 G1^T, G1 = F's root block and G2 = F Z^T M^{-1} Delta (both t x rank; G2 is
        # zero, with the graph of Delta)
        change = _scoped(lambda op: _solved_coefficients(op, delta))(M)  # Z^T M^{-1} Delta, (*batch, q, rank)
        root_block = blocks[-1]
        assert not isinstance(root_block, _OneHot)
        graph = (root_block, _blocks_matmul(blocks, sizes, change))
    # the stable form: F W F^T = Z_* (G - Sigma) Z_*^T with Z_* = F G^+ (F's root block, and so the graph term's
    # G1, unchanged: the root's G is the identity)
    covar_blocks = _scoped(_stable_blocks)(M, blocks, stable) if stable is not None else blocks
    covar = PredictiveCovarianceLinearOperator.from_blocks(test_test_covar, W, covar_blocks, sizes, graph)
    # the mean as F (Z^T M^{-1} r), its coefficients in the working precision (of the observed points under a NaN
    # policy: Z's rows at the others are zeroed in M_o, so F's blocks apply as they are)
    coef = _new_input_coefficients(strategy, M)
    if coef is None:
        return _policy_mean(strategy, test_mean, test_train_covar), covar
    # the stable terms' part of F c as (F G^+)(G c), G c = C^{-1} G u with no cancellation (c = u - A x lost
    # eps n G / noise relative: 2.4e-5 at noise 1e-10 for a random intercept in a user trial)
    g_coef = None if stable is None else _new_input_g_coefficients(strategy, M)
    pieces_and_vectors = []
    for j, (block, c) in enumerate(zip(blocks, coef.split(sizes, dim=-1))):
        if g_coef is not None and stable is not None and stable[j]:
            pieces_and_vectors.append((covar_blocks[j], g_coef.split(sizes, dim=-1)[j]))
        else:
            pieces_and_vectors.append((block, c))
    if delta is not None:
        alpha = _new_input_alpha(strategy, M)
        if alpha is not None:  # the root's coefficients U^T alpha with the graph of the cross covariance's U (+ 0)
            root_coef = (delta.mT @ alpha.to(delta.dtype).unsqueeze(-1)).squeeze(-1)
            piece, vector = pieces_and_vectors[-1]
            pieces_and_vectors[-1] = (piece, vector + root_coef)
    shift = None
    for piece, vector in pieces_and_vectors:
        if piece is not None:
            term = _block_matmul(piece, vector.unsqueeze(-1)).squeeze(-1)
            shift = term if shift is None else shift + term
    assert shift is not None  # some block is not None (checked above)
    return _plus(test_mean, shift, test_train_covar), covar


def _has_dense_part(op) -> bool:
    """Whether ``op`` is a dense matrix or a sum with one among its summands."""
    if isinstance(op, DenseLinearOperator):
        return True
    return isinstance(op, SumLinearOperator) and any(_has_dense_part(term) for term in op.linear_ops)


def _has_leading_rows(op) -> bool:
    """Whether ``op`` is (or holds, as a summand or scaled) the columns of a block mean operator of the training
    points followed by new points (:class:`~bma_gp.kernels.LeadingRowsLinearOperator`, transposed): what a
    ``BlockMeanKernel`` returns for ``cat(train_x, new_x)`` against ``train_x``."""
    if isinstance(op, LeadingRowsLinearOperator):
        return op.transposed
    if isinstance(op, ConstantMulLinearOperator):
        return _has_leading_rows(op.base_linear_op)
    return isinstance(op, SumLinearOperator) and any(_has_leading_rows(term) for term in op.linear_ops)


def _kernel_product_strategy(strategy: DefaultPredictionStrategy) -> bool:
    return bool(getattr(strategy, "_kernel_product", False))


def _warn_unrecognised_cross(
    strategy: DefaultPredictionStrategy, test_train_covar: LinearOperator, M: BlockMeanSumLinearOperator | None = None
) -> None:
    """A :class:`~bma_gp.ClosedFormFallbackWarning` when the noisy training covariance is in the family (so the
    closed form would apply) but the test-by-training covariance does not match its columns: GPyTorch's path then
    forms the ``t x n`` cross covariance and its solves. Nothing when the training covariance is outside the family
    (its own solves warn)."""
    if M is None:  # the training covariance (known already past the cross pieces' check)
        covar = strategy.likelihood(strategy.train_prior_dist, strategy.train_inputs).lazy_covariance_matrix
        M = as_sum(covar.evaluate_kernel() if isinstance(covar, LinearOperator) else covar)
    if M is None or not M._sizes():
        return
    if _has_dense_part(test_train_covar):
        # what a kernel product gives where _product_cross does not apply: GPyTorch's ProductKernel multiplies its
        # factors' cross covariances as dense matrices, so no group ids or partitions are left to match
        hint = (
            "It is (or holds) a dense matrix, as a gpytorch ProductKernel (k1 * k2) makes the covariance between "
            "different inputs unless every factor is a GroupKernel, a BlockMeanKernel or an IndexKernel (in a "
            "ScaleKernel or not): the prediction is exact, but the t x n matrix is formed."
        )
    elif _has_leading_rows(test_train_covar):
        # BoTorch's qNEI / qNEHVI posterior at cat(X_baseline = train_x, X_candidates): a BlockMeanKernel's rows for
        # the training inputs themselves are its training covariance (with the within-block term on its diagonal),
        # which is not of the form A P^T that the closed form at new inputs reads
        hint = (
            "The test inputs start with the training inputs themselves (train_x followed by new points, as BoTorch's "
            "qNEI evaluates X_baseline = train_x with the candidates): a BlockMeanKernel's covariance of those rows "
            "with the training points is its training covariance (LeadingRowsLinearOperator, the within-block term "
            "on its diagonal), not the cross covariance A P^T of new points that the closed form at new inputs "
            "takes. The prediction is exact, but the t x n matrix is formed. model(train_x) and model(new_x) alone "
            "stay closed form."
        )
    elif _kernel_product_strategy(strategy):
        # a model that multiplies two lazily evaluated kernels in forward (routed to the block mean strategy)
        hint = (
            "The training covariance is a product of two lazily evaluated kernels computed in forward (GPyTorch's "
            "Hadamard multitask model), and the test-by-training covariance is not rows of a block mean joint "
            "covariance over the training blocks. Write the product as one kernel with active_dims, e.g. "
            "covar_module = BlockMeanKernel(...) * GroupKernel(num_tasks, rank=1, active_dims=[task column]), whose "
            "prediction is closed form."
        )
    else:
        hint = (
            "Group ids, partitions and slope covariates of the test points must come from the same kernels as the "
            "training covariance."
        )
    extra = test_train_covar.shape[:-2]
    if len(extra) > len(M.shape[:-2]) and not _kernel_product_strategy(strategy):
        # a non-batch model asked for a batch of test sets: GPyTorch copies the training inputs across that batch
        hint += (
            f" The test inputs carry batch dimensions {tuple(extra)} that the training covariance (batch shape "
            f"{tuple(M.shape[:-2])}) lacks: GPyTorch copies the training inputs across them, and a kernel whose "
            "covariance between a batch of test sets and those copies is not built from the training covariance's "
            "own columns leaves the closed form. If each test set alone, model(test_x[i]), predicts without this "
            "warning, the batch of test sets is the cause, not the group ids."
        )
    warnings.warn(
        f"prediction at new inputs: the test-by-training covariance ({type(test_train_covar).__name__}, shape "
        f"{tuple(test_train_covar.shape)}) does not match the columns of the training covariance ({M._describe()}), "
        "so the closed form at new inputs does not apply and GPyTorch's exact path forms the t x n cross covariance "
        f"(exact, O(t n) memory). {hint}",
        ClosedFormFallbackWarning,
        stacklevel=4,
    )


#: Elements of the row chunk of ``F`` (and of ``F W``) formed at a time for the diagonal.
_DIAG_CHUNK = 2**22

#: On CPU, a row chunk of ``[V, F_r]`` with at most this fraction of nonzero entries enters the diagonal's quadratic
#: form as a sparse CSR matrix (:func:`_row_quadratic`). Measured on lme4's InstEval (three crossed groupings, the
#: students eliminated; 1.5 % nonzero: a test row's students' table row and its lecturer and department): 37 ms
#: against 124 ms per chunk of 1,836 rows and 2,284 columns; per multiply-add the CSR product is about 14x slower than
#: the GEMM, so it pays below about 7 %.
SPARSE_ROWS_DENSITY = 0.04


def _sparse_rows_matmul(U: Tensor, Y: Tensor) -> Tensor:
    """``U @ Y``: one GEMM, or on CPU, without gradients or tangents, a CSR product where ``U`` is sparse
    (:data:`SPARSE_ROWS_DENSITY`; rows of one-hot group columns and of a grouping's sparse table with the eliminated
    one). The same sums up to their order."""
    plain = U.dim() == 2 and Y.dim() == 2 and U.device.type == "cpu" and U.dtype == Y.dtype
    if plain and not (carries_tangent(U) or carries_tangent(Y)):
        if not (torch.is_grad_enabled() and (U.requires_grad or Y.requires_grad)):
            if int(torch.count_nonzero(U)) <= SPARSE_ROWS_DENSITY * U.numel():
                with warnings.catch_warnings():  # torch's note that CSR support is in beta
                    warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
                    return U.to_sparse_csr() @ Y
    return U @ Y


def _row_quadratic(U: Tensor, core: Tensor) -> Tensor:
    r""":math:`\operatorname{diag}(U C U^\top)` for a row chunk ``U`` of :math:`[V, F_r]` and the core ``C``
    (:func:`_sparse_rows_matmul`). # shape: (*batch, c)"""
    return (_sparse_rows_matmul(U, core) * U).sum(-1)


#: A block of ``F`` with more columns than this, and at most one nonzero per row (a random intercept's cross
#: covariance at seen or unseen levels), enters the diagonal as (column, value) pairs.
_SPARSE_COLUMNS = 64


#: The structured forms at new inputs (:class:`_Structured`) keep :math:`A_{Er}` at the eliminated levels the test
#: points use (``levels r_e x R`` entries); past this many the predictive covariance applies :math:`W` as products.
#: Not where the tables are held as cells (:meth:`_LevelRows.from_cells`): nothing ``levels x R`` is formed there.
_STRUCTURED_MAX_ELEMENTS = 2**26


#: The cross term of :meth:`_Structured._one_hot_rest_quadratic` is gathered pair by pair (:meth:`_LevelRows.cross`)
#: where the pairs, weighted by this many multiply-adds each, cost less than the product ``A_{Er} C_VF`` they replace
#: (the table's nonzeros times ``R``). Measured on CPU, float64, at n = 10^6 crossed users and items (20,000 x 2,000,
#: 100,000 new pairs): a gathered pair cost 95 ns where the CSR-by-dense product took 0.6 ns per multiply-add.
LEVEL_PAIR_COST = 128

#: Pairs formed at a time by :meth:`_LevelRows.cross` (each holds a few index and value tensors of this length).
_LEVEL_PAIRS_CHUNK = 2**22


@dataclass(frozen=True, eq=False)
class _LevelRows:
    r""":math:`A_{Er}` at the ``L`` eliminated levels the test rows use (``L x r_e x R``), held by its nonzeros level
    by level, for :meth:`_Structured._one_hot_rest_quadratic`: read from the cells of the grouping tables with the
    eliminated grouping (:meth:`from_cells`, a random intercept's sparse tables: no ``L x R`` matrix is formed or
    scanned), or from a dense tensor (:meth:`from_dense`). Only without gradients or tangents, on CPU
    (:meth:`eligible`).

    With them, per chunk of levels, :math:`A_l C` is a CSR product where the rows are sparse (:meth:`product`),
    the level's own form :math:`A_l C_{VV} A_l^\top` one gather per nonzero (:meth:`level_forms`), and, where
    cheaper than the product with :math:`C_{VF}`, the cross term

    .. math::
        w_a^\top P_l e_c = \sum_{i \in l} w_{a e_i} a_i (C_{VF})_{c_i c},

    with ``(e_i, c_i, a_i)`` the nonzeros of level ``l``: :math:`J \sum_a n_{l(a)}` gathers for ``J`` one-hot blocks,
    where the product costs the nonzeros times ``R`` multiply-adds (a user's few items among thousands: one pair per
    test row and item of its user; :meth:`pairs_pay`, :meth:`cross`). The level's form as pairs of nonzeros would
    take :math:`\sum_l n_l^2` gathers, which measured slower than its product (2.3 s against 1.1 s at 20,000 users
    with 44 items each), so it takes the product and then one gather per nonzero.

    Attributes:
        shape: ``(L, r_e, R)``.
        e, c: each nonzero's row within its level and its column, by level (then row, then column). # shape: (N,)
        a: its value. # shape: (N,)
        start, count: each level's first nonzero and number of nonzeros. # shape: (L,)
        crow: the CSR row pointers of the ``L r_e`` rows. # shape: (L r_e + 1,)
        held: the dense ``(L, r_e, R)`` tensor, where given or formed (:meth:`dense`).
    """

    shape: tuple[int, int, int]
    e: Tensor
    c: Tensor
    a: Tensor
    start: Tensor
    count: Tensor
    crow: Tensor
    held: Tensor | None = None

    @staticmethod
    def eligible(x: Tensor) -> bool:
        """Whether values like ``x`` may be read as nonzeros: on CPU, without a tangent, and no graph to keep."""
        return x.device.type == "cpu" and not carries_tangent(x) and not (torch.is_grad_enabled() and x.requires_grad)

    @staticmethod
    def _by_level(shape: tuple[int, int, int], level: Tensor, e: Tensor, c: Tensor, a: Tensor, held=None) -> _LevelRows:
        """From the nonzeros in order (``level`` each one's level)."""
        L, re, _ = shape
        count = torch.bincount(level, minlength=L)
        row_count = torch.bincount(level * re + e, minlength=L * re)
        crow = torch.cat([row_count.new_zeros(1), torch.cumsum(row_count, 0)])
        return _LevelRows(shape, e, c, a, torch.cumsum(count, 0) - count, count, crow, held)

    @staticmethod
    def from_dense(A: Tensor) -> _LevelRows:
        """The nonzeros of ``A`` (``(L, r_e, R)``, :meth:`eligible`), found by one scan."""
        L, re, R = A.shape
        flat = A.reshape(L * re, R)
        index = flat.nonzero()  # row-major: by level, then row, then column
        i, c = index.unbind(-1)
        return _LevelRows._by_level((L, re, R), i // re, i % re, c, flat[i, c], A)

    @staticmethod
    def from_cells(A_re, levels: Tensor, dtype: torch.dtype) -> _LevelRows | None:
        r"""The columns ``levels`` of :math:`A_{re}` (``A_re`` a ``_CrossBlocks``, one eliminated grouping: ``r_e =
        1``) as nonzeros, from its pieces' cells (each table's cells are held by level of the eliminated grouping, so a
        level's cells are one range); None where a piece is dense, its values batched, or they are not
        :meth:`eligible`."""
        pieces = A_re.pieces
        if not pieces or any(torch.is_tensor(p) for p in pieces):
            return None
        return _LevelRows._from_tables([(cells, [values]) for cells, values in pieces], A_re.sizes, levels, dtype)

    @staticmethod
    def from_joint_cells(cross, levels: Tensor, dtype: torch.dtype) -> _LevelRows | None:
        r""":math:`A_{Er}` of a joint elimination (a correlated random intercept and slope: ``r_e`` terms over one
        grouping) at the levels ``levels``, from the cells of its sparse tables (``cross`` a ``_JointCross``, one value
        vector per eliminated term), where the training side never formed :math:`A_{rE}` (``k x r_e x R``: 1.9 GB at
        60,000 users and 2,000 items, formed for a prediction before); None as :meth:`from_cells`."""
        return _LevelRows._from_tables(list(zip(cross.tables, cross.values)), cross.sizes, levels, dtype)

    @staticmethod
    def _from_tables(tables: list, sizes: list[int], levels: Tensor, dtype: torch.dtype) -> _LevelRows | None:
        """From ``(cells, [values per eliminated term])`` per other term (of ``sizes`` levels each, in order)."""
        re = len(tables[0][1]) if tables else 0
        if not re or any(len(v) != re or any(x.dim() != 1 or not _LevelRows.eligible(x) for x in v) for _, v in tables):
            return None
        L = levels.shape[0]
        order = torch.arange(L, device=levels.device)
        parts, offset = [], 0
        for (cells, values), size in zip(tables, sizes):
            lo = cells.starts[levels]
            count = cells.starts[levels + 1] - lo
            level = torch.repeat_interleave(order, count)
            first = torch.cumsum(count, 0) - count  # each level's first nonzero among this table's
            index = lo[level] + torch.arange(level.shape[0], device=level.device) - first[level]
            column = cells.row[index] + offset
            for term, vals in enumerate(values):
                parts.append((level, torch.full_like(level, term), column, vals[index].to(dtype)))
            offset += size
        level, e, c, a = (torch.cat(x) for x in zip(*parts))
        if len(parts) > 1:  # by level and row, each row's columns in order (the tables' columns follow one another)
            by = torch.argsort(level * re + e, stable=True)
            level, e, c, a = level[by], e[by], c[by], a[by]
        return _LevelRows._by_level((L, re, offset), level, e, c, a)

    def dense(self) -> Tensor:
        """:math:`A_{Er}` at the levels. # shape: (L, r_e, R)"""
        if self.held is not None:
            return self.held
        return self._dense_rows(0, self.shape[0], 0, self.a.shape[0])

    def _dense_rows(self, start: int, stop: int, lo: int, hi: int) -> Tensor:
        """The rows of the levels ``start .. stop`` (nonzeros ``lo .. hi``) formed. # shape: (stop - start, r_e, R)"""
        _, re, R = self.shape
        level = torch.repeat_interleave(torch.arange(stop - start, device=self.a.device), self.count[start:stop])
        out = self.a.new_zeros((stop - start) * re, R)
        out[level * re + self.e[lo:hi], self.c[lo:hi]] = self.a[lo:hi]
        return out.view(stop - start, re, R)

    def combine(self, w: Tensor, levels: Tensor) -> Tensor:
        """``w_a^T A_{l_a}`` for rows with weights ``w`` (``(c, r_e)``) at the levels ``levels`` (``(c,)``), one gather
        per row and nonzero of its level. # shape: (c, R)"""
        out = w.new_zeros(levels.shape[0], self.shape[2])
        for row, entry in self._pairs(levels):
            out.index_put_((row, self.c[entry]), w[row, self.e[entry]] * self.a[entry], accumulate=True)
        return out

    def product(self, start: int, stop: int, right: Tensor) -> tuple[Tensor, Tensor | None]:
        """``A_l @ right`` for the levels ``start .. stop`` (``(stop - start) r_e x R`` rows): a CSR product from the
        nonzeros where at most :data:`SPARSE_ROWS_DENSITY` of the rows' entries are nonzero, else the GEMM on the
        dense rows, which it also returns (None with the CSR product). # shape: (stop - start, r_e, width)"""
        _, re, R = self.shape
        lo, hi = int(self.crow[start * re]), int(self.crow[stop * re])
        if hi - lo > SPARSE_ROWS_DENSITY * (stop - start) * re * R:
            rows = self.held[start:stop] if self.held is not None else self._dense_rows(start, stop, lo, hi)
            return (rows.reshape(-1, R) @ right).reshape(stop - start, re, -1), rows
        crow = self.crow[start * re : stop * re + 1] - lo
        with warnings.catch_warnings():  # torch's note that CSR support is in beta
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
            csr = torch.sparse_csr_tensor(
                crow, self.c[lo:hi], self.a[lo:hi], size=((stop - start) * re, R), check_invariants=False
            )
            return (csr @ right).reshape(stop - start, re, -1), None

    def product_and_forms(self, start: int, stop: int, right: Tensor) -> tuple[Tensor, Tensor]:
        """``T = A_l @ right`` (:meth:`product`) and :math:`A_l X A_l^\top` with ``X`` the first ``R`` columns of
        ``right``, per level ``start .. stop``: from the nonzeros after a CSR product (:meth:`level_forms`),
        elementwise over the dense rows after the GEMM. # shape: (stop - start, r_e, width), (stop - start, r_e, r_e)"""
        T, dense = self.product(start, stop, right)
        R = self.shape[2]
        if dense is None:
            return T, self.level_forms(start, stop, T[..., :R])
        # elementwise: a batched GEMM of many tiny matrices copied each one (19,862 copies, 0.4 s, at 20,000 users)
        return T, (T[..., :R].unsqueeze(-2) * dense.unsqueeze(-3)).sum(-1)

    def level_forms(self, start: int, stop: int, T: Tensor) -> Tensor:
        """:math:`A_l X^\\top` per level ``start .. stop`` from ``T = A_l X`` (``(stop - start, r_e, R)``), one
        gather per nonzero: with ``X = C_VV``, the level's own form :math:`A_l C_{VV} A_l^\\top`. # shape: (stop -
        start, r_e, r_e)"""
        re = self.shape[1]
        lo, hi = int(self.crow[start * re]), int(self.crow[stop * re])
        span = torch.arange(start, stop, device=T.device)
        level = torch.repeat_interleave(span - start, self.count[start:stop])  # the nonzeros' levels, from 0
        e, c, a = self.e[lo:hi], self.c[lo:hi], self.a[lo:hi]
        gathered = T[level, :, c] * a.unsqueeze(-1)  # (N, r_e): row e1 of T at column c, times a
        out = T.new_zeros((stop - start) * re, re).index_add_(0, level * re + e, gathered)
        return out.view(stop - start, re, re).mT  # [l, e1, e2] = sum over l's nonzeros in row e2

    def pairs_pay(self, inverse: Tensor, blocks: int) -> bool:
        """Whether the cross term's pairs for the test rows' levels ``inverse`` and ``blocks`` one-hot blocks cost less
        than the product with :math:`C_{VF}` (:data:`LEVEL_PAIR_COST`)."""
        pairs = int(self.count[inverse].sum())
        return bool(blocks) and LEVEL_PAIR_COST * blocks * pairs <= self.a.shape[0] * self.shape[2]

    def _pairs(self, levels: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """Each row ``a`` (at level ``levels[a]``) with every nonzero of its level: ``(row, entry)`` index pairs, at
        most :data:`_LEVEL_PAIRS_CHUNK` at a time (one row alone where it has more)."""
        reps = self.count[levels]
        for lo, hi in self._chunks(reps):
            row = torch.repeat_interleave(torch.arange(lo, hi, device=reps.device), reps[lo:hi])
            # the k-th pair of a row: its level's k-th nonzero
            offset = (
                torch.arange(row.shape[0], device=row.device) - (torch.cumsum(reps[lo:hi], 0) - reps[lo:hi])[row - lo]
            )
            yield row, self.start[levels[row]] + offset

    @staticmethod
    def _chunks(reps: Tensor) -> list[tuple[int, int]]:
        """Ranges of consecutive owners with at most :data:`_LEVEL_PAIRS_CHUNK` pairs each (one owner alone where it
        has more)."""
        ends = torch.cumsum(reps, 0)
        n, bounds = reps.shape[0], [0]
        while bounds[-1] < n:
            done = int(ends[bounds[-1] - 1]) if bounds[-1] else 0
            after = int(torch.searchsorted(ends, done + _LEVEL_PAIRS_CHUNK, right=True))
            bounds.append(min(n, max(after, bounds[-1] + 1)))
        return list(zip(bounds[:-1], bounds[1:]))

    def gathered_products(self, X: Tensor, levels: Tensor, columns: Tensor) -> Tensor:
        """``(A_l X)[e, c_a]`` for rows ``a`` at the levels ``levels`` and columns ``columns`` (``X`` ``R x R``): one
        gather per row and nonzero of its level, nothing ``L x R`` formed. # shape: (t, r_e)"""
        re = self.shape[1]
        out = X.new_zeros(levels.shape[0] * re)
        for row, entry in self._pairs(levels):
            out.index_add_(0, row * re + self.e[entry], self.a[entry] * X[self.c[entry], columns[row]])
        return out.view(levels.shape[0], re)

    def cross(self, C_VF: Tensor, w: Tensor, inverse: Tensor, columns: list, values: list) -> Tensor:
        """``sum_j u_j w^T P_l e_{c_j}`` per test row (``C_VF`` the core's ``R x R`` block). # shape: (t,)"""
        out = C_VF.new_zeros(w.shape[0])
        for row, entry in self._pairs(inverse):
            weighted = w[row, self.e[entry]] * self.a[entry]
            for cj, uj in zip(columns, values):
                out.index_add_(0, row, weighted * uj[row] * C_VF[self.c[entry], cj[row]])
        return out


@dataclass(frozen=True, eq=False)
class _Structured:
    r""":math:`F W F^\top` at new inputs from the capacitance factorisation, without products with :math:`W`.

    With :math:`M_E = D + Z_E G_E Z_E^\top` (the noise and the eliminated terms :math:`E`, block diagonal by
    level), :math:`\tilde A = Z^\top M_E^{-1} Z` and :math:`K = S_r^{-1} = (I + G_r \tilde A_{rr})^{-1}` (``S_r`` the
    Schur complement the factorisation already holds), Woodbury on :math:`M = M_E + Z_r G_r Z_r^\top` gives

    .. math::
        W_{rr} = \tilde A_{rr} K, \qquad W_{Er} = \tilde A_{Er} K, \qquad
        W_{EE} = \tilde A_{EE} - \tilde A_{Er} K G_r \tilde A_{rE},

    with :math:`\tilde A_{EE} = A_{EE} \Delta^{-1}` and :math:`\tilde A_{Er} = \Delta^{-\top} A_{Er}`, one
    ``r_e x r_e`` block per level (:math:`\Delta = I + G_E A_{EE}`). So with :math:`V = F_E \tilde A_{Er}`,

    .. math::
        F W F^\top = F_E \tilde A_{EE} F_E^\top + [V, F_r]
            \begin{bmatrix} -K G_r & K \\ K^\top & \tilde A_{rr} K \end{bmatrix} [V, F_r]^\top .

    When :math:`F_E` has one nonzero per row (random intercepts and slopes at seen and unseen levels), the first
    term couples only test points at the same level (sums over the levels they use) and the second has rank
    ``2 R``: products cost :math:`O(t (r_e^2 + R))` per column and the diagonal :math:`O(t (r_e^2 + R^2))`, after
    :math:`O(k r_e R + R^3)` once, where products with :math:`W` cost up to ``n`` per column. No inverse of any
    :math:`G_j` is needed, and :math:`F_r` may be dense (a block mean kernel, a dense ``B_j``, an inducing-point
    root).

    :math:`[V, F_r]` is formed ``_DIAG_CHUNK / 2R`` rows at a time, so nothing ``t x R`` is kept.

    With every term stable (``stable``: ``_ImplicitWeight(M, stable=True)``, :func:`_transformed_weight`), ``F``'s
    blocks are :math:`Z_* = F G^{+}` and the weight is :math:`G - \Sigma`, :math:`\Sigma = C^{-1} G` the random
    effects' posterior covariance. Its blocks from the same factorisation, with
    :math:`H = \Delta^{-1} G_E A_{Er}` and :math:`K G_r = S_r^{-1} G_r`:

    .. math::
        (G - \Sigma)_{EE} = (G_E - \Delta^{-1} G_E) - H K G_r H^\top, \qquad
        (G - \Sigma)_{Er} = H K G_r, \qquad (G - \Sigma)_{rr} = G_r - K G_r,

    so the same pieces hold them, with ``w`` the rows :math:`\Delta^{-1} G_E v` (:math:`V = Z_{*E} H`), ``core``
    :math:`[[-K G_r, K G_r], [K G_r, G_r - K G_r]]`, and ``g`` and ``delta`` (no ``A_EE``) to apply
    :math:`G_E - \Delta^{-1} G_E` as :func:`_stable_weight_matmul` does: :math:`G_E u - \Delta^{-1} (G_E u)` for
    each right-hand side :math:`u` (a row's :math:`v`, a level's sum of :math:`v x`), one solve per row or level
    rather than a formed ``r_e x r_e`` matrix, whose columns can cancel in :math:`v^\top (\cdot) v` (twice the
    products' error with a correlated slope on calendar years). Each rounds at the size of :math:`G`, as the products
    do, at the same cost as :math:`W`'s.

    Attributes:
        inverse: each test row's position among the eliminated levels the test rows use. # shape: (t,)
        v: :math:`F_E` per row, one value per eliminated term. # shape: (*batch, t, r_e)
        A_EE: :math:`\tilde A_{EE}` at those levels; None with ``g`` and ``delta``. # shape: (*batch, levels, r_e, r_e)
        index: each test row's eliminated level. # shape: (t,)
        w: :math:`\Delta^{-1} v` per row (:math:`V` row :math:`a` is :math:`w_a^\top A_{Er}` at its level), None
            without other terms; the stable form's :math:`\Delta^{-1} G_E v`, always. # shape: (*batch, t, r_e)
        A_Er: :math:`A_{Er}` at the eliminated levels the test rows use, or its nonzeros (:class:`_LevelRows`, read
            from a sparse table's cells; :meth:`_levels` forms it where needed). # shape: (*batch, levels, r_e, R)
        rest: the blocks of :math:`F_r` (None: zero) and their widths.
        core: the ``2R x 2R`` matrix between :math:`[V, F_r]` and its transpose. # shape: (*batch, 2 R, 2 R)
        g: the stable form's :math:`G_E` at those levels (its diagonals). # shape: (*batch, levels, r_e)
        delta: the stable form's :math:`\Delta` at those levels. # shape: (*batch, levels, r_e, r_e)
    """

    inverse: Tensor
    v: Tensor
    A_EE: Tensor | None
    index: Tensor
    w: Tensor | None = None
    A_Er: Tensor | _LevelRows | None = None
    rest: tuple = ()
    core: Tensor | None = None
    g: Tensor | None = None
    delta: Tensor | None = None

    @staticmethod
    def build(
        M: BlockMeanSumLinearOperator, blocks: list[Tensor | _OneHot | None], t: int, stable: bool = False
    ) -> _Structured | None:
        """The pieces (of :math:`G - \\Sigma` with the blocks of :math:`Z_*` where ``stable``), or None when the
        factorisation eliminates no grouping, a block of an eliminated term is not one-hot (or two put a row in
        different columns), :math:`A_{Er}` at the levels the test rows use would pass ``_STRUCTURED_MAX_ELEMENTS``
        entries (formed: not where the tables' cells give its nonzeros, :class:`_LevelRows`), or (``stable``) the
        ``R`` columns of the other terms have :math:`R^2 > q`."""
        cap = M._capacitance()
        E = list(cap.joint.terms) if cap.joint is not None else [cap.elim] if cap.elim is not None else []
        if not E:
            return None
        if any(torch.is_tensor(blocks[e]) for e in E):
            # a batch of test sets: a group kernel's cross covariance is dense there (each entry has its own
            # columns); taken entry by entry, each one-hot again (it formed the q x q weight instead)
            return _BatchedStructured.build(M, blocks, t, stable, E)  # type: ignore[return-value]
        sizes = M._sizes()
        rest = [i for i in range(len(sizes)) if i not in E]
        R, re = sum(sizes[i] for i in rest), len(E)
        # G - Sigma (at most _DENSE_WEIGHT_MAX_ELIMINATED eliminated levels) is also formed, once q columns of its
        # products have been asked for, and then a one-hot block's variance is a gather. Structured, K G_r costs
        # O(R^3) and each variance O(R^2), so it is taken while R^2 <= q: random slopes (R = 0) and GroupKernel(k,
        # rank=r) (R = r) always. Measured at n = 10^5, 1000 new points, one thread: a slope over 1024 levels 162 ms
        # as products, 8 ms structured (5 ms at 1025 levels); intercepts crossed over 1000 x 800 levels 120 ms
        # structured against 8-10 ms formed (150 ms as products before), 1000 x 32 levels 8 ms either way.
        if stable and R * R > sum(sizes) and (R > _STABLE_STRUCTURED_MIN_COLUMNS or not _weight_as_products(M)):
            return None
        onehots: dict[int, _OneHot] = {}
        for e in E:
            block = blocks[e]
            if isinstance(block, _OneHot):
                onehots[e] = block
            elif block is not None:
                return None
        first = next(iter(onehots.values()), None)
        if first is not None and any(not _same_columns(b, first) for b in onehots.values()):
            return None
        wdt, device = core_dtype(M.dtype), M.device
        index = first.index() if first is not None else torch.zeros(t, dtype=torch.long, device=device)
        zero = torch.zeros(t, dtype=wdt, device=device)
        columns = [onehots[e].weight().to(wdt) if e in onehots else zero for e in E]
        v = torch.stack(torch.broadcast_tensors(*columns), -1)  # (*b, t, r_e)
        # Delta and A_EE per level
        if cap.joint is not None:
            delta, g = cap.joint.delta, cap.joint.g  # (*b, k, r_e, r_e), (*b, k, r_e)
        else:
            assert cap.delta is not None and cap.g is not None
            delta, g = cap.delta.unsqueeze(-1).unsqueeze(-1), cap.g.unsqueeze(-1)
        levels, inverse = torch.unique(index, return_inverse=True)
        # a random intercept's sparse tables: A_Er's nonzeros at those levels from their cells (nothing L x R formed,
        # so no bound on L R: the rows of V are gathered from them too)
        from_cells = None
        if rest and cap.joint is None and cap.A_re is not None:
            from_cells = _LevelRows.from_cells(cap.A_re, levels, wdt)
        elif rest and cap.joint is not None and cap.joint.formed is None and cap.joint.cross is not None:
            from_cells = _LevelRows.from_joint_cells(cap.joint.cross, levels, wdt)
        if from_cells is None and levels.shape[0] * re * R > _STRUCTURED_MAX_ELEMENTS:
            return None
        delta_l = delta.index_select(-3, levels)
        g_l = A_EE = None
        if stable:  # G - Sigma's EE block (before the rest's part) is G_E u - Delta^-1 G_E u: w = Delta^-1 G_E v
            g_l = g.index_select(-2, levels).to(wdt)
            rhs = g_l.index_select(-2, inverse) * v
        else:  # A Delta^-1
            if cap.joint is not None:
                A = torch.stack([torch.stack([M._level_gram(i, j).to(wdt) for j in E], -1) for i in E], -2)
            else:
                A = M._gram()[0][E[0]].to(wdt).unsqueeze(-1).unsqueeze(-1)
            A_EE = torch.linalg.solve(delta_l.mT, A.index_select(-3, levels)).mT
            A_EE = 0.5 * (A_EE + A_EE.mT)
            rhs = v
            if not rest:
                return _Structured(inverse, v, A_EE, index)
        # V = F_E Delta^-T A_Er, row by row: w = Delta_l^-1 v (stable: V = Z_*E Delta^-1 G_E A_Er, w = Delta^-1 G_E v)
        w = torch.linalg.solve(delta_l.index_select(-3, inverse), rhs.unsqueeze(-1)).squeeze(-1)  # (*b, t, r_e)
        if not rest:
            return _Structured(inverse, v, None, index, w, g=g_l, delta=delta_l)
        A_Er: Tensor | _LevelRows
        if from_cells is not None:  # A_Er's nonzeros at the levels the test rows use
            A_Er = from_cells
        elif cap.joint is not None:  # A_Er at the levels the test rows use
            assert cap.joint.A_rE is not None
            A_Er = cap.joint.A_rE.index_select(-2, levels).movedim(-3, -1)  # (*b, L, r_e, R)
        else:
            assert cap.A_re is not None
            A_Er = cap.A_re.columns(levels).to(wdt).mT.unsqueeze(-2)  # (*b, L, 1, R)
        pieces = tuple((blocks[i], sizes[i]) for i in rest)
        assert cap.lu is not None and cap.A_tilde is not None
        eye = torch.eye(R, dtype=wdt, device=device).expand(*M.batch_shape, R, R)
        if stable:  # K G_r = S^-1 G_r, as _cap_solve applies it (G - Sigma: no A_tilde, no K alone)
            G_r = M._apply_G_rest(rest, eye)
            KG = _rest_solve(cap.lu, G_r)
            KG_sym = 0.5 * (KG + KG.mT)
            core = torch.cat([torch.cat([-KG_sym, KG], -1), torch.cat([KG.mT, 0.5 * (G_r + G_r.mT) - KG_sym], -1)], -2)
            return _Structured(inverse, v, None, index, w, A_Er, pieces, core, g_l, delta_l)
        K = _LUSolve.apply(*cap.lu, eye)
        KG = _LUSolve.apply(*cap.lu, M._apply_G_rest(rest, eye))
        AK = cap.A_tilde.to(wdt) @ K
        core = torch.cat([torch.cat([-0.5 * (KG + KG.mT), K], -1), torch.cat([K.mT, 0.5 * (AK + AK.mT)], -1)], -2)
        return _Structured(inverse, v, A_EE, index, w, A_Er, pieces, core)

    def _u_rows(self, rows: Tensor | slice) -> Tensor:
        """Rows of :math:`[V, F_r]` (a slice, or indices without batch dimensions). # shape: (*batch, c, 2 R)"""
        assert self.w is not None and self.A_Er is not None
        w, A = self.w[..., rows, :], self.A_Er
        if isinstance(A, _LevelRows) and w.dim() == 2:  # gathered from its nonzeros: nothing L x R formed
            V = A.combine(w, self.inverse[rows])
        else:
            A = A.dense() if isinstance(A, _LevelRows) else A
            V = (w.unsqueeze(-1) * A.index_select(-3, self.inverse[rows])).sum(-2)  # (*b, c, R)
        c, wdt = V.shape[-2], V.dtype
        pieces = [V]
        for block, size in self.rest:
            if block is None:
                pieces.append(V.new_zeros(c, size))
            elif isinstance(block, _OneHot):
                pieces.append(_OneHot(block.values[..., rows], block.columns[rows], block.k).dense().to(wdt))
            else:
                pieces.append(block[..., rows, :].to(wdt))
        batch = torch.broadcast_shapes(*(p.shape[:-2] for p in pieces))
        return torch.cat([p.expand(*batch, c, p.shape[-1]) for p in pieces], dim=-1)

    def _chunks(self) -> list[slice]:
        t = self.index.shape[0]
        size = max(1, _DIAG_CHUNK // max(1, self.core.shape[-1] if self.core is not None else 1))
        return [slice(start, min(t, start + size)) for start in range(0, t, size)]

    def unbatched(self) -> bool:
        """Whether no piece has batch dimensions (then :meth:`entries` applies)."""
        rows = (self.v, self.w, self.g, self.core)
        A_Er = None if isinstance(self.A_Er, _LevelRows) else self.A_Er  # nonzeros are unbatched
        levels = (self.A_EE, self.delta, A_Er)
        return all(x is None or x.dim() == 2 for x in rows) and all(x is None or x.dim() == 3 for x in levels)

    def _stable_rows(self, rows: Tensor | slice) -> Tensor:
        r""":math:`(G_E - \Delta^{-1} G_E) v` at the rows ``rows``, from the rows' own solves ``w``. # shape:
        (*batch, c, r_e)"""
        assert self.g is not None and self.w is not None
        return self.g.index_select(-2, self.inverse[rows]) * self.v[..., rows, :] - self.w[..., rows, :]

    def diagonal(self) -> Tensor:
        r""":math:`\operatorname{diag}(F W F^\top)`. # shape: (*batch, t)"""
        if self.A_EE is None:
            out = (self.v * self._stable_rows(slice(None))).sum(-1)
        else:
            rows = self.A_EE.index_select(-3, self.inverse)  # (*b, t, r_e, r_e)
            out = (self.v.unsqueeze(-1) * rows * self.v.unsqueeze(-2)).sum((-2, -1))
        if self.core is not None:
            quad = self._one_hot_rest_quadratic()
            if quad is None:
                quad = torch.cat([_row_quadratic(U, self.core) for U in map(self._u_rows, self._chunks())], dim=-1)
            out = out + quad
        return out

    def _one_hot_rest_quadratic(self) -> Tensor | None:
        r""":math:`\operatorname{diag}(U C U^\top)`, :math:`U = [V, F_r]`, level by level where every block of
        :math:`F_r` is one-hot or zero (crossed random intercepts and slopes); None otherwise, or with batch
        dimensions.

        Row ``a`` of :math:`V` is :math:`w_a^\top A_l`, with :math:`A_l` the ``r_e x R`` rows of :math:`A_{Er}` at
        the row's eliminated level ``l``, and its row of :math:`F_r` has one value :math:`u_{aj}` per block ``j``, at
        column :math:`c_{aj}`. With :math:`[Q_l, P_l] = A_l [C_{VV}, C_{VF}]` once per level (``r_e x R`` by
        ``R x 2R``, a CSR product where :math:`A_{Er}` is sparse, then :math:`Q_l A_l^\top` one gather per nonzero;
        ``C`` is symmetric; where the table is sparse enough, :math:`w_a^\top P_l e_c` from pairs of nonzeros
        instead, and only :math:`A_l C_{VV}` multiplied out: :class:`_LevelRows`, whose nonzeros come from the
        tables' cells where they are held so),

        .. math::
            (U C U^\top)_{aa} = w_a^\top Q_l A_l^\top w_a + 2 \sum_j u_{aj}\, w_a^\top P_l e_{c_{aj}}
                + \sum_{i, j} u_{ai} u_{aj} (C_{FF})_{c_{ai} c_{aj}},

        gathers of ``O(r_e^2 + r_e J + J^2)`` per row for ``J`` blocks. Each row's ``2R`` columns were formed and
        multiplied by the ``2R x 2R`` core before: ``L r_e`` rows of ``R`` columns now, for the ``L`` levels the
        test rows use (lme4's InstEval, 14,685 new rows over 2,972 student levels: see
        docs/results/session35_crossed_predict.md). The levels go ``_DIAG_CHUNK / 2R`` (``/ R``) at a time, each with
        the rows at them. # shape: (t,)"""
        C, A, w = self.core, self.A_Er, self.w
        if C is None or A is None or w is None or not self.unbatched():
            return None
        if any(block is not None and not isinstance(block, _OneHot) for block, _ in self.rest):
            return None
        L, re, R = A.shape
        wdt = C.dtype
        columns, values, offset = [], [], 0
        for block, size in self.rest:
            if isinstance(block, _OneHot):
                if block.values.dim() != 1:
                    return None
                columns.append(block.index() + offset)
                values.append(block.weight().to(wdt))
            offset += size
        C_FF = C[R:, R:]
        out = C.new_zeros(w.shape[0])
        for i, (ci, ui) in enumerate(zip(columns, values)):  # the F_r part: the same for any level
            for j, (cj, uj) in enumerate(zip(columns, values)):
                if j >= i:
                    out = out + (1 if i == j else 2) * ui * uj * C_FF[ci, cj]
        nonzeros = A if isinstance(A, _LevelRows) else _LevelRows.from_dense(A) if _LevelRows.eligible(A) else None
        if nonzeros is not None and nonzeros.pairs_pay(self.inverse, len(columns)):
            # the cross term from pairs: only A_l C_VV is multiplied out
            out = out + 2 * nonzeros.cross(C[:R, R:], w, self.inverse, columns, values)
            columns, values = [], []
        width = R * (1 + bool(columns))
        right = C[:R, :width].contiguous()
        order = torch.argsort(self.inverse)  # the rows level by level
        bounds = torch.searchsorted(self.inverse[order], torch.arange(L + 1, device=order.device)).tolist()
        size = max(1, _DIAG_CHUNK // max(1, re * width))
        parts = []
        for start in range(0, L, size):
            stop = min(L, start + size)
            rows = order[bounds[start] : bounds[stop]]
            if nonzeros is not None:  # the nonzeros are known: no scan of dense rows for a CSR copy
                T, Q = nonzeros.product_and_forms(start, stop, right)
            else:
                A_c = A[start:stop]  # type: ignore[index]  # (Lc, r_e, R)
                T = _sparse_rows_matmul(A_c.reshape(-1, R), right).reshape(stop - start, re, width)
                Q = (T[..., :R].unsqueeze(-2) * A_c.unsqueeze(-3)).sum(-1)  # elementwise, as product_and_forms
            level = self.inverse[rows] - start
            w_c = w[rows]  # (c, r_e)
            part = (w_c.unsqueeze(-1) * Q[level] * w_c.unsqueeze(-2)).sum((-2, -1))
            P = T[..., R:]  # (Lc, r_e, R): A_l C_VF
            for cj, uj in zip(columns, values):
                part = part + 2 * uj[rows] * (w_c * P[level, :, cj[rows]]).sum(-1)
            parts.append(part)
        if not parts:  # no test rows
            return out
        by_level = torch.cat(parts)
        return out + by_level.new_zeros(out.shape).scatter(0, order, by_level)

    def entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        r"""Entries ``(rows, cols)`` of :math:`F W F^\top` (no batch dimensions). # shape: broadcast of the indices"""
        rows, cols = torch.broadcast_tensors(rows, cols)
        same = self.inverse[rows] == self.inverse[cols]
        vr, vc = self.v[rows], self.v[cols]  # (..., r_e)
        if self.A_EE is None:  # v_r . (G_E - Delta^-1 G_E) v_c
            shape = cols.shape
            out = (vr * self._stable_rows(cols.reshape(-1)).reshape(*shape, -1)).sum(-1) * same
        else:
            out = ((vr.unsqueeze(-1) * self.A_EE[self.inverse[rows]]).sum(-2) * vc).sum(-1) * same
        if self.core is not None:
            shape = rows.shape
            Ur, Uc = self._u_rows(rows.reshape(-1)), self._u_rows(cols.reshape(-1))
            out = out + ((Ur @ self.core) * Uc).sum(-1).reshape(shape)
        return out

    def matmul(self, x: Tensor) -> Tensor:
        r""":math:`F W F^\top x`. ``x`` # shape: (*batch, t, c), working precision"""
        vx = self.v.unsqueeze(-1) * x.unsqueeze(-2)  # (*b, t, r_e, c)
        per_level = self.A_EE if self.A_EE is not None else self.delta
        assert per_level is not None
        u = vx.new_zeros(*vx.shape[:-3], per_level.shape[-3], *vx.shape[-2:]).index_add(-3, self.inverse, vx)
        if self.A_EE is None:  # G_E u - Delta^-1 G_E u per level
            assert self.g is not None and self.delta is not None
            gu = self.g.unsqueeze(-1) * u
            Au = gu - torch.linalg.solve(self.delta, gu)
        else:
            Au = self.A_EE @ u
        out = (self.v.unsqueeze(-1) * Au.index_select(-3, self.inverse)).sum(-2)
        if self.core is not None:
            chunks = self._chunks()
            Y = None
            for chunk in chunks:
                part = self._u_rows(chunk).mT @ x[..., chunk, :]
                Y = part if Y is None else Y + part
            assert Y is not None
            Z = self.core @ Y
            out = out + torch.cat([self._u_rows(chunk) @ Z for chunk in chunks], dim=-2)
        return out


def _one_hot_rows(block: Tensor) -> _OneHot | None:
    """A dense unbatched ``t x k`` block with at most one nonzero per row as a :class:`_OneHot`, else None."""
    if block.dim() != 2:
        return None
    hit = block != 0
    if bool((hit.sum(-1) > 1).any()):
        return None
    columns = torch.where(
        hit.any(-1), hit.to(torch.int8).argmax(-1), torch.full_like(block[:, 0], -1, dtype=torch.long)
    )
    values = block.gather(-1, columns.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return _OneHot(values, columns, block.shape[-1])


class _BatchedStructured:
    """:class:`_Structured` for a batch of test sets over an unbatched training covariance, one per batch entry (each
    entry's eliminated blocks one-hot again): ``diagonal`` and ``matmul`` as :class:`_Structured`'s, entry by
    entry."""

    def __init__(self, entries: list[_Structured], batch: torch.Size, t: int):
        self.entries_ = entries
        self.batch = batch
        self.t = t

    @staticmethod
    def build(M, blocks, t: int, stable: bool, E: list[int]) -> _BatchedStructured | None:
        if M.batch_shape:
            return None
        shapes = [b.shape[:-2] if torch.is_tensor(b) else b.values.shape[:-1] for b in blocks if b is not None]
        batch = torch.broadcast_shapes(*shapes)
        if not batch:
            return None
        entries = []
        for idx in itertools.product(*map(range, batch)):
            sub: list[Tensor | _OneHot | None] = []
            for i, block in enumerate(blocks):
                if block is None:
                    sub.append(None)
                    continue
                if isinstance(block, _OneHot):
                    values = block.values.expand(*batch, block.values.shape[-1])[idx]
                    sub.append(_OneHot(values, block.columns, block.k))
                    continue
                entry = block.expand(*batch, *block.shape[-2:])[idx]
                if i in E:
                    one_hot = _one_hot_rows(entry)
                    if one_hot is None:
                        return None
                    sub.append(one_hot)
                else:
                    sub.append(entry)
            parts = _Structured.build(M, sub, t, stable)
            if not isinstance(parts, _Structured):
                return None
            entries.append(parts)
        return _BatchedStructured(entries, batch, t)

    def unbatched(self) -> bool:
        return False

    def diagonal(self) -> Tensor:
        return torch.stack([e.diagonal() for e in self.entries_]).reshape(*self.batch, self.t)

    def matmul(self, x: Tensor) -> Tensor:
        x = x.expand(*self.batch, *x.shape[-2:]).reshape(-1, *x.shape[-2:])
        out = torch.stack([e.matmul(x[i]) for i, e in enumerate(self.entries_)])
        return out.reshape(*self.batch, *out.shape[-2:])


def _block_rows(block: Tensor | _OneHot, start: int, length: int) -> Tensor:
    """Rows ``start .. start + length`` of a block of :math:`F` as a dense tensor."""
    if isinstance(block, _OneHot):
        return block.narrow(start, length).dense()
    return block.narrow(-2, start, length)


def _dense_limit_error(size: int, inputs: str, purpose: str) -> ValueError | None:
    """The ``ValueError`` of a dense ``size x size`` factorisation of a covariance at ``inputs`` past
    ``max_capacitance_size`` (None within it); ``purpose`` is ``"draw"`` (a root) or ``"solve"`` (solves,
    ``log_prob``)."""
    limit = settings.max_capacitance_size.value()
    if size <= limit:
        return None
    raise_limit = f"raise the limit with `with bma_gp.settings.max_capacitance_size({size}):`"
    if purpose == "draw":
        return ValueError(
            f"an exact draw at {size} {inputs} needs their {size} x {size} predictive covariance factorised, more "
            f"than bma_gp.settings.max_capacitance_size = {limit}. Draw at fewer inputs per call (joint draws need "
            f"one call), or {raise_limit} if an O({size}^3) eigendecomposition fits your machine."
        )
    return ValueError(
        f"a joint log_prob (or a solve, inv_quad or logdet) at {size} {inputs} needs their {size} x {size} "
        f"predictive covariance factorised (one dense Cholesky), more than bma_gp.settings.max_capacitance_size = "
        f"{limit}. Evaluate per-point densities instead (torch.distributions.Normal(pred.mean, "
        f"pred.stddev).log_prob(y), which needs no factorisation), pass fewer points per call, or {raise_limit} if "
        f"an O({size}^3) factorisation fits your machine."
    )


def _cast_target(*args: Any, **kwargs: Any) -> tuple[torch.device | None, torch.dtype | None]:
    """The device and dtype of a ``to(...)`` call, read as :meth:`torch.Tensor.to` reads them: a device named by a
    string (``"cpu"``, ``"cuda:0"``) or an index (``.to(0)``) too, which linear_operator's ``_to_helper`` ignored
    (the operator stayed where it was, without a word)."""
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    return device, dtype


class KeepsIntegers:
    """A mixin for operators that hold integer tensors (positions, one-hot columns) among their arguments:
    linear_operator's ``to(dtype)`` casts every argument, and ``.to(torch.float32)`` made them floats, which no index
    takes. Here a dtype casts the floating-point tensors only; ``type(dtype)`` (and so ``float()``, ``double()``,
    ``half()``) is ``to(dtype)``, bfloat16 included (linear_operator's ``type`` knows three dtypes)."""

    def type(self, dtype: torch.dtype) -> LinearOperator:
        return self.to(dtype)

    def to(self, *args: Any, **kwargs: Any) -> LinearOperator:
        device, dtype = _cast_target(*args, **kwargs)

        def cast(value):
            if torch.is_tensor(value):
                return value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            return value.to(dtype=dtype, device=device) if hasattr(value, "to") else value

        args_ = [cast(a) for a in self._args]  # type: ignore[attr-defined]
        kwargs_ = {k: cast(v) for k, v in self._kwargs.items()}  # type: ignore[attr-defined]
        return self.__class__(*args_, **kwargs_)


class _DenseFactorSolves(KeepsIntegers):
    r"""Solves, inverse quadratic forms and log-determinants of a predictive covariance :math:`S` from one exact
    dense Cholesky factorisation :math:`S = L L^\top` of the matrix formed in the working precision (a mixin for
    the ``LinearOperator`` subclasses of prediction, before ``LinearOperator``):

    .. math::
        S^{-1} R = L^{-\top} L^{-1} R, \qquad R^\top S^{-1} R = \lVert L^{-1} R \rVert^2, \qquad
        \log\det S = 2 \textstyle\sum_a \log L_{aa}.

    linear_operator's own ``solve`` / ``inv_quad_logdet`` take a dense Cholesky up to ``max_cholesky_size`` and
    beyond it CG and stochastic Lanczos quadrature: a joint ``log_prob`` of 2500 test points was off by 3e-4 nats per
    point, without a word. Here the factorisation is exact at every size up to
    :class:`bma_gp.settings.max_capacitance_size`, past which a ``ValueError`` says what to do instead. A singular
    matrix (repeated inputs without noise) gets linear_operator's jitter (``psd_safe_cholesky``, with its
    ``NumericalWarning``), as below ``max_cholesky_size``; :meth:`root_decomposition` keeps the exact, clamped
    symmetric root there. Gradients flow through the factorisation to every tensor the matrix is formed from.

    A factor made without a graph is kept on the operator (one factorisation for a draw and a ``log_prob``) and
    reused only by calls that need no graph; one with a graph is made again per call (a kept graph would be
    backpropagated twice). Subclasses form the matrix (:meth:`_working_dense`) and name their points
    (:attr:`_dense_inputs`)."""

    #: what the rows are, for the messages
    _dense_inputs = "new inputs"
    #: ``(L,)``: the exact Cholesky factor made without a graph, None where the matrix is singular
    _kept_cholesky: tuple[Tensor | None] | None = None
    #: the factor with linear_operator's jitter of a singular matrix, made without a graph
    _kept_jittered: Tensor | None = None
    #: the symmetric square root of a singular matrix (what draws use), made without a graph
    _kept_eigen_root: Tensor | None = None

    def _working_dense(self) -> Tensor:
        """The dense matrix in the working precision. # shape: (*batch, n, n)"""
        raise NotImplementedError

    #: a sum with this operator on either side is its ``__add__`` (``D + pred`` as ``pred + D``): see
    #: :func:`bma_gp._composition.adds_exactly`
    _adds_exactly = True

    def _is_symmetric(self) -> bool:
        """Whether the matrix is symmetric (a covariance); a submatrix at different rows and columns is not."""
        return True

    def add_diagonal(self, diag) -> LinearOperator:
        """``S + diag(d)`` (and so ``add_jitter``): an exact sum (:class:`_DenseFactorSum`). The covariances that take a
        diagonal into their own form override this; linear_operator's ``AddedDiagLinearOperator`` took CG."""
        if not self._is_symmetric():  # rows and columns at different positions: no covariance, the generic sum
            return super().add_diagonal(diag)  # type: ignore[misc]
        diag = diag if torch.is_tensor(diag) else torch.tensor(diag, dtype=self.dtype, device=self.device)  # type: ignore
        n = self.shape[-1]  # type: ignore[attr-defined]
        if diag.dim() == 0 or diag.shape[-1] == 1:
            diag = diag.expand(*diag.shape[:-1] if diag.dim() else (), n)
        batch = torch.broadcast_shapes(self.batch_shape, diag.shape[:-1])  # type: ignore[attr-defined]
        operand = self if self.batch_shape == batch else self._expand_batch(batch)  # type: ignore[attr-defined]
        # the sum itself, not self + D: a class whose __add__ of a diagonal calls its add_diagonal (the posterior at
        # the training inputs, for a diagonal with negative entries) would come back here
        return _DenseFactorSum(operand, DiagLinearOperator(diag.to(self.dtype).expand(*batch, n)))  # type: ignore

    def root_inv_decomposition(self, initial_vectors=None, test_vectors=None, method: str | None = None):
        r""":math:`S^{-1} = R R^\top` with :math:`R = L^{-\top}` for the exact Cholesky factor :math:`S = L L^\top`
        (the one the solves use; arguments are ignored). linear_operator's generic inverse root took a Lanczos
        root of rank ``max_root_decomposition_size`` past ``max_cholesky_size``: 99.5% off, without a word."""
        L = self._solve_factor()
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
        root = torch.linalg.solve_triangular(L, eye, upper=False).mT
        return RootLinearOperator(DenseLinearOperator(root.to(self.dtype)))  # type: ignore[attr-defined]

    def _mul_constant(self, other) -> LinearOperator:
        """``S * c`` (``MultivariateNormal * c``, an outcome transform's un-standardisation): a
        :class:`_ScaledDenseFactorSolves`, whose solves, log-determinant and roots are this operator's, rescaled.
        linear_operator's ``ConstantMulLinearOperator`` took a dense Cholesky up to ``max_cholesky_size`` and CG and
        stochastic Lanczos beyond (a user trial: a joint ``log_prob`` 0.09-0.9 nats off at 900 points)."""
        return _ScaledDenseFactorSolves(self, other)

    def __add__(self, other):
        """``S + T`` for another covariance ``T`` of the same size (a second predictive covariance, a block mean
        operator, a diagonal the class does not take into its own form): a :class:`_DenseFactorSum`, factorised
        exactly as ``S`` is. Another matrix (not known to be symmetric) gives a sum that warns where it is solved
        (:class:`~bma_gp.FallbackSumLinearOperator`): linear_operator's took CG silently past ``max_cholesky_size``."""
        from bma_gp._composition import fallback_sum

        if isinstance(other, LinearOperator) and not isinstance(other, ZeroLinearOperator):
            try:
                shape = torch.broadcast_shapes(self.shape, other.shape)
            except RuntimeError:
                shape = None
            if shape is not None and shape[-2:] == self.shape[-2:]:
                if self._is_symmetric() and _known_covariance(other):
                    return _DenseFactorSum(self, other)
                fallback = fallback_sum(self, other)
                if fallback is not None:
                    return fallback
        return super().__add__(other)

    def _working_dtype(self) -> torch.dtype:
        return core_dtype(self.dtype)  # type: ignore[attr-defined]

    def _needs_graph(self) -> bool:
        """Whether this call must build a graph: gradients are on and a tensor of the operator requires them."""
        return torch.is_grad_enabled() and any(t.requires_grad for t in self.representation())  # type: ignore

    def _symmetric_dense(self, purpose: str) -> Tensor:
        """:meth:`_working_dense`, symmetrised, after the size check (``purpose``: see :func:`_dense_limit_error`)."""
        error = _dense_limit_error(self.shape[-1], self._dense_inputs, purpose)  # type: ignore[attr-defined]
        if error is not None:
            raise error
        self._check_principal(purpose)
        D = self._working_dense()
        return 0.5 * (D + D.mT)

    def _check_principal(self, purpose: str) -> None:
        """Nothing for the covariances themselves; :class:`_DenseSubmatrix` refuses rows and columns that differ."""

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        """Rows and columns (slices or position vectors, every batch entry): a :class:`_DenseSubmatrix`, whose
        solves and ``log_prob`` factorise the submatrix exactly as this operator's own do (``pred[..., :m]`` and
        ``pred[..., idx]`` of a predictive distribution; linear_operator's interpolated operator took CG and
        stochastic Lanczos past ``max_cholesky_size``). Anything else (batch entries too) as the class's base."""
        if _is_noop_index(row_index) and _is_noop_index(col_index):  # batch entries only: the class's own
            return super()._getitem(row_index, col_index, *batch_indices)  # type: ignore[misc]
        rows, cols = _positions(row_index, self.shape[-2]), _positions(col_index, self.shape[-1])  # type: ignore
        if rows is None or cols is None:
            return super()._getitem(row_index, col_index, *batch_indices)  # type: ignore[misc]
        if all(_is_noop_index(b) for b in batch_indices):
            return _DenseSubmatrix(self, rows, cols)
        if all(isinstance(b, (int, slice)) for b in batch_indices):  # batch entries first (pred[1, :m])
            entries = self._getitem(slice(None), slice(None), *batch_indices)
            if isinstance(entries, _DenseFactorSolves):
                return _DenseSubmatrix(entries, rows, cols)
        return super()._getitem(row_index, col_index, *batch_indices)  # type: ignore[misc]

    def _dense_cholesky(self, purpose: str) -> Tensor | None:
        """The Cholesky factor of the dense matrix in the working precision, None where it is singular (kept as the
        class docstring says). # shape: (*batch, n, n)"""
        kept = self._kept_cholesky
        if kept is not None and not self._needs_graph():
            return kept[0]
        L, info = torch.linalg.cholesky_ex(self._symmetric_dense(purpose))
        factor = None if bool((info > 0).any()) else L
        if not L.requires_grad:
            self._kept_cholesky = (factor,)
        return factor

    def _solve_factor(self) -> Tensor:
        """The factor that solves use: :meth:`_dense_cholesky`'s, or for a singular matrix linear_operator's
        ``psd_safe_cholesky`` (jitter, with its ``NumericalWarning``), as its own Cholesky path adds."""
        L = self._dense_cholesky("solve")
        if L is not None:
            return L
        kept = self._kept_jittered
        if kept is not None and not self._needs_graph():
            return kept
        L = psd_safe_cholesky(self._symmetric_dense("solve"))
        if not L.requires_grad:
            self._kept_jittered = L
        return L

    def _exact_solve(self, rhs: Tensor) -> Tensor:
        """:math:`S^{-1} R` in the working precision. ``rhs`` (working precision) # shape: (*batch, n, c)"""
        L = self._solve_factor()
        y = torch.linalg.solve_triangular(L, rhs, upper=False)
        return torch.linalg.solve_triangular(L.mT, y, upper=True)

    def _exact_inv_quad_logdet(self, rhs: Tensor | None, logdet: bool) -> tuple[Tensor | None, Tensor | None]:
        r""":math:`\operatorname{diag}(R^\top S^{-1} R)` (per column) and :math:`\log\det S`, None where not asked,
        in the working precision. ``rhs`` (working precision) # shape: (*batch, n, c)"""
        L = self._solve_factor()
        quad = None if rhs is None else torch.linalg.solve_triangular(L, rhs, upper=False).square().sum(-2)
        det = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1) if logdet else None
        return quad, det

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        r""":math:`S^{-1} R` (or :math:`L S^{-1} R`) exactly, never by CG (see the class docstring)."""
        check_floating(right_tensor, "right_tensor")
        check_floating(left_tensor, "left_tensor")
        check_rhs(self.shape, right_tensor, "right_tensor")  # type: ignore[attr-defined]
        if left_tensor is not None:
            batch = solution_batch(self.shape, right_tensor)  # type: ignore[attr-defined]
            check_left(self.shape, left_tensor, batch, self.dtype)  # type: ignore[attr-defined]
        vector = right_tensor.dim() == 1
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        res = self._exact_solve(rhs.to(self._working_dtype()))
        res = res.to(torch.promote_types(self.dtype, right_tensor.dtype))  # type: ignore[attr-defined]
        if left_tensor is not None:  # before the squeeze: a batched S^{-1} v is a batch of columns
            res = left_tensor @ res
        return res.squeeze(-1) if vector else res

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int = 0) -> Tensor:
        return self.solve(rhs)

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        return self.inv_quad_logdet(inv_quad_rhs, logdet=False, reduce_inv_quad=reduce_inv_quad)[0]

    def logdet(self) -> Tensor:
        return self.inv_quad_logdet(None, logdet=True)[1]

    def inv_quad_logdet(
        self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True
    ) -> tuple[Tensor, Tensor]:
        r""":math:`R^\top S^{-1} R` and :math:`\log\det S` exactly, at every size (see the class docstring):
        what ``MultivariateNormal.log_prob`` asks for."""
        if inv_quad_rhs is None and not logdet:
            raise RuntimeError("Either `inv_quad_rhs` or `logdet` must be specified.")
        check_floating(inv_quad_rhs, "inv_quad_rhs")
        dtype, device = self.dtype, self.device  # type: ignore[attr-defined]
        rhs = None
        if inv_quad_rhs is not None:
            check_rhs(self.shape, inv_quad_rhs, "inv_quad_rhs")  # type: ignore[attr-defined]
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
            dtype = torch.promote_types(dtype, rhs.dtype)
            rhs = rhs.to(self._working_dtype())
        quad, det = self._exact_inv_quad_logdet(rhs, logdet)
        inv_quad_term = torch.empty(0, dtype=dtype, device=device)
        if quad is not None:
            inv_quad_term = (quad.sum(-1) if reduce_inv_quad else quad).to(dtype)
        logdet_term = torch.zeros([], dtype=dtype, device=device) if det is None else det.to(dtype)
        return inv_quad_term, logdet_term

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        r"""An exact root (``method`` is ignored): the kept Cholesky factor, or where the matrix is singular
        (repeated inputs without noise) its symmetric square root through one eigendecomposition (working precision;
        eigenvalues below zero, which only rounding gives, clamped at 0). What ``rsample`` uses.

        linear_operator's generic root takes a dense Cholesky up to ``max_cholesky_size`` points and, beyond, a
        Lanczos root of rank ``max_root_decomposition_size``: an approximate draw, without a word.

        Raises:
            ValueError: the size is larger than :class:`bma_gp.settings.max_capacitance_size`."""
        L = self._dense_cholesky("draw")
        if L is None:
            kept = self._kept_eigen_root
            if kept is not None and not self._needs_graph():
                L = kept  # one eigendecomposition per operator: each draw repeated it (1.4 s at 2000 points)
            else:
                # floored_sqrt: an eigenvalue 0 within rounding (two equal test points) has derivative 0, not inf
                # (NaN gradients through every draw of that batch entry)
                L = symmetric_matrix_function(self._symmetric_dense("draw"), floored_sqrt, lambda x: x.clamp_min(0))
                if not L.requires_grad:
                    self._kept_eigen_root = L
        # contiguous: the kept factor can be a transposed view, and linear_operator's products of roots view them
        # (pred * RootLinearOperator(R) raised "view size is not compatible with input tensor's size and stride")
        return RootLinearOperator(DenseLinearOperator(L.to(self.dtype).contiguous()))  # type: ignore[attr-defined]


def _widened(diag: DiagLinearOperator, dtype: torch.dtype) -> DiagLinearOperator:
    """A diagonal added to :math:`K_{**}` in ``dtype`` (exactly) when it is narrower: a cast operator's noise, in its
    narrower output dtype. # shape: (*batch, t, t)"""
    wide = torch.promote_types(diag.dtype, dtype)
    return diag if wide == diag.dtype else DiagLinearOperator(diag._diagonal().to(wide))


class _CastOnce:
    r"""A mixin for the predictive covariances at new inputs, which hold :math:`K_{**}` and the part the data explain
    apart and subtract them in the working precision (before :class:`_DenseFactorSolves` in the bases): ``to(dtype)``,
    ``to(device, dtype)``, ``type(dtype)``, ``float()``, ``double()`` and ``half()`` give the same operator with
    another dtype, whose products, diagonal, entries, dense matrix, roots and solves form the difference in the
    working precision as before and round it once to the new dtype: what ``C.to_dense().to(dtype)`` gives.
    linear_operator's generic cast rounded :math:`K_{**}` and the explained part to the new dtype separately and
    subtracted there, so a posterior variance far below the prior's was lost: 2e-6 (noise 1e-4) came out 0 in
    float16 and 0.0039 in bfloat16, and ``.float()`` of a float64 model's covariance was 1 % off. A wider dtype
    widens :math:`K_{**}` (exactly); the working precision is kept (it is float64 already); a device moves every part.
    The factorisations the operator kept (no graph) are shared with the cast one on the same device."""

    #: the kept factorisations the cast operator shares (same matrix in the same working precision)
    _SHARED_KEPT: tuple[str, ...] = ("_kept_cholesky", "_kept_jittered", "_kept_eigen_root")

    def _cast(self, device: torch.device | None, dtype: torch.dtype) -> LinearOperator:
        """The operator with output ``dtype``, its parts moved to ``device`` (None: where they are)."""
        raise NotImplementedError

    def to(self, *args: Any, **kwargs: Any) -> LinearOperator:
        device, dtype = _cast_target(*args, **kwargs)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(
                f"{type(self).__name__}: a predictive covariance can be cast to a floating-point dtype only, got "
                f"{dtype}"
            )
        res = self._cast(device, self.dtype if dtype is None else dtype)  # type: ignore[attr-defined]
        if self._shares_kept_with(res):
            for name in self._SHARED_KEPT:
                if name in self.__dict__:
                    res.__dict__[name] = self.__dict__[name]
        return res

    def _shares_kept_with(self, res: LinearOperator) -> bool:
        """Whether ``res``, a cast of this operator, may take the values this one kept: on the same device."""
        return res.device == self.device  # type: ignore[attr-defined]

    def type(self, dtype: torch.dtype) -> LinearOperator:
        return self.to(dtype)


class _Positions:
    """Positions of rows or columns (an int64 vector) held for :class:`_DenseSubmatrix`; ``to`` moves them to a device
    and keeps their dtype."""

    __slots__ = ("value",)

    def __init__(self, value: Tensor, device: torch.device | None = None):
        self.value = value.long() if device is None else value.to(device=device, dtype=torch.long)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> _Positions:
        return self if device is None else _Positions(self.value, device)


def _positions(index, size: int) -> Tensor | None:
    """A slice or a vector of positions as a vector of positions (``(m,)``, int64), None for anything else (an index
    tensor with batch dimensions)."""
    if isinstance(index, slice):
        return torch.arange(size)[index]
    if torch.is_tensor(index) and index.dim() == 1 and not index.is_floating_point() and index.dtype != torch.bool:
        return index.long()
    return None


class _DenseSubmatrix(_DenseFactorSolves, TorchIndexing, LinearOperator):
    r"""Rows ``rows`` and columns ``cols`` of a predictive covariance ``parent`` (a :class:`_DenseFactorSolves`
    operator), what indexing it returns. Products go through the parent's (the columns scattered into its ``n``,
    the rows gathered), so nothing the size of the parent is formed but one block of products with its columns;
    solves, ``inv_quad_logdet`` and roots factorise the submatrix (formed from ``len(cols)`` products with the
    parent, in the working precision) exactly, as the parent's own do, within ``max_capacitance_size``. They need
    the same rows as columns (a principal submatrix, what ``pred[..., idx]`` takes), else a ``ValueError``.

    Args:
        parent: the predictive covariance. # shape: (*batch, n, n)
        rows: positions of the rows. # shape: (r,)
        cols: positions of the columns. # shape: (c,)
    """

    def __init__(
        self,
        parent: LinearOperator,
        rows: Tensor | _Positions,
        cols: Tensor | _Positions,
        added: Tensor | None = None,
    ):
        rows, cols = (_Positions(p if torch.is_tensor(p) else p.value, parent.device) for p in (rows, cols))
        # the positions as keyword arguments in holders: linear_operator's generic .to(dtype), unsqueeze and
        # permute of the arguments would cast them to floats or give them batch dimensions
        if added is None:
            super().__init__(parent, rows=rows, cols=cols)
        else:
            super().__init__(parent, added, rows=rows, cols=cols)
        self.parent, self.rows, self.cols = parent, rows.value, cols.value
        #: a diagonal added to a principal submatrix (the likelihood's noise after indexing), or None
        self.added = added
        self._principal = self.rows.shape == self.cols.shape and bool(torch.equal(self.rows, self.cols))
        self._dense_inputs = getattr(parent, "_dense_inputs", "inputs")

    @property
    def dtype(self) -> torch.dtype:
        return self.parent.dtype

    @property
    def device(self) -> torch.device:
        return self.parent.device

    def _size(self) -> torch.Size:
        return torch.Size((*self.parent.batch_shape, len(self.rows), len(self.cols)))

    def _transpose_nonbatch(self) -> _DenseSubmatrix:
        return _DenseSubmatrix(self.parent, self.cols, self.rows, self.added)  # the parent is symmetric

    def _expand_batch(self, batch_shape) -> _DenseSubmatrix:
        added = None if self.added is None else self.added.expand(*batch_shape, self.added.shape[-1])
        return _DenseSubmatrix(self.parent._expand_batch(batch_shape), self.rows, self.cols, added)

    def _unsqueeze_batch(self, dim: int) -> _DenseSubmatrix:
        added = None if self.added is None else self.added.unsqueeze(dim)
        return _DenseSubmatrix(self.parent._unsqueeze_batch(dim), self.rows, self.cols, added)

    def add_diagonal(self, diag) -> LinearOperator:
        """A diagonal added to a principal submatrix (the likelihood's noise on ``pred[..., idx]``) stays in this
        operator, with its exact solves (linear_operator's ``AddedDiagLinearOperator`` took CG)."""
        if not self._principal:
            return super().add_diagonal(diag)
        diag = diag if torch.is_tensor(diag) else torch.tensor(diag, dtype=self.dtype, device=self.device)
        diag = diag.to(dtype=self.dtype, device=self.device)
        if diag.dim() == 0 or diag.shape[-1] == 1:
            diag = diag.expand(*diag.shape[:-1] if diag.dim() else (), len(self.rows))
        batch = torch.broadcast_shapes(self.batch_shape, diag.shape[:-1])
        diag = diag.expand(*batch, len(self.rows))
        total = diag if self.added is None else self.added + diag
        parent = self.parent if self.parent.batch_shape == batch else self.parent._expand_batch(batch)
        return _DenseSubmatrix(parent, self.rows, self.cols, total)

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator) and self._principal and other.shape[-1] == self.shape[-1]:
            return self.add_diagonal(other.diagonal(dim1=-2, dim2=-1))
        return super().__add__(other)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        if self.added is None and all(_is_noop_index(b) for b in batch_indices):
            rows, cols = _positions(row_index, len(self.rows)), _positions(col_index, len(self.cols))
            if rows is not None and cols is not None:
                return _DenseSubmatrix(self.parent, self.rows[rows], self.cols[cols])
        return super(_DenseFactorSolves, self)._getitem(row_index, col_index, *batch_indices)

    def _is_symmetric(self) -> bool:
        return self._principal

    def _check_principal(self, purpose: str) -> None:
        if not self._principal:
            raise ValueError(
                f"a {purpose} of rows and columns taken at different positions of a predictive covariance: only the "
                "same rows as columns (pred[..., idx], a principal submatrix) give a covariance; index both alike."
            )

    def _scattered(self, rhs: Tensor) -> Tensor:
        """``rhs`` placed at the parent's columns ``cols`` (zeros elsewhere; repeated columns add up). # (*, n, c)"""
        n = self.parent.shape[-1]
        full = rhs.new_zeros(*rhs.shape[:-2], n, rhs.shape[-1])
        return full.index_add(-2, self.cols, rhs)

    def _matmul(self, rhs: Tensor) -> Tensor:
        check_floating(rhs, "rhs")
        vector = rhs.dim() == 1
        x = rhs.unsqueeze(-1) if vector else rhs
        res = self.parent._matmul(self._scattered(x)).index_select(-2, self.rows)
        if self.added is not None:
            res = res + self.added.unsqueeze(-1) * x
        return res.squeeze(-1) if vector else res

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._transpose_nonbatch()._matmul(rhs)

    def _diagonal(self) -> Tensor:
        if self._principal:
            res = self.parent._diagonal().index_select(-1, self.rows)
            return res if self.added is None else res + self.added
        return super()._diagonal()

    def _working_dense(self) -> Tensor:
        parent = self.parent
        working = getattr(parent, "_working_matmul", None)
        if working is None:  # a parent formed whole anyway (t x t at new inputs): its entries gathered
            res = parent._working_dense().index_select(-2, self.rows).index_select(-1, self.cols)
        else:  # products with the selected columns only
            eye = torch.eye(len(self.cols), dtype=parent.dtype, device=parent.device)
            res = working(self._scattered(eye).expand(*parent.batch_shape, parent.shape[-1], len(self.cols)))
            res = res.index_select(-2, self.rows)
        if self.added is not None:
            res = res + torch.diag_embed(self.added.to(res.dtype))
        return res

    def to_dense(self) -> Tensor:
        return self._working_dense().to(self.dtype)

    def evaluate_kernel(self) -> _DenseSubmatrix:
        return self


def _known_covariance(op) -> bool:
    """Whether ``op`` is a symmetric matrix whose dense form an exact sum may take: a predictive covariance (or its
    principal submatrix, multiple or sum), a diagonal, a symmetric block mean operator or a sum of them, or a
    Kronecker product of symmetric factors (a ``MultitaskGaussianLikelihood``'s noise ``I_t (x) D`` with a
    correlated ``D = F F^T + s I``, ``rank >= 1``)."""
    if isinstance(op, _DenseFactorSolves):
        return op._is_symmetric()
    if isinstance(op, (DiagLinearOperator, BlockMeanSumLinearOperator)):
        return True
    if isinstance(op, KroneckerProductLinearOperator):
        return all(_symmetric_factor(factor) for factor in op.linear_ops)
    return isinstance(op, BlockMeanLinearOperator) and op.symmetric


def _symmetric_factor(op) -> bool:
    """Whether ``op`` is symmetric by its form: a diagonal, a root ``R R^T``, or a sum of them (the factors of a
    multitask likelihood's Kronecker noise)."""
    if isinstance(op, (DiagLinearOperator, RootLinearOperator)):
        return True
    if isinstance(op, SumLinearOperator):  # AddedDiagLinearOperator too
        return all(_symmetric_factor(part) for part in op.linear_ops)
    return False


def _working_dense_of(op: LinearOperator, dtype: torch.dtype, shape: torch.Size) -> Tensor:
    """The dense matrix of a summand in ``dtype``, expanded to ``shape``: a predictive covariance's own working
    form (not rounded to its output dtype first), any other's ``to_dense``."""
    dense = op._working_dense() if isinstance(op, _DenseFactorSolves) else op.to_dense()
    return dense.to(dtype).expand(shape)


class _ScaledDenseFactorSolves(_DenseFactorSolves, ConstantMulLinearOperator):
    r""":math:`c S` for an operator :math:`S` with exact dense solves (a predictive covariance, its submatrix or an
    exact sum of them) and a constant :math:`c` (one per batch entry): products and entries as linear_operator's
    ``ConstantMulLinearOperator``; solves, inverse quadratic forms and the log-determinant from :math:`S`'s
    (:math:`(cS)^{-1} R = S^{-1} R / c`, :math:`\log\det cS = \log\det S + n \log c`), roots as
    :math:`\sqrt{c}` times :math:`S`'s. A log-determinant or root of a multiple with :math:`c \le 0` (not a
    covariance) raises ``ValueError``."""

    def __init__(self, base_linear_op: LinearOperator, constant):
        super().__init__(base_linear_op, constant)
        self._dense_inputs = getattr(base_linear_op, "_dense_inputs", "inputs")

    def _is_symmetric(self) -> bool:
        base = self.base_linear_op
        return base._is_symmetric() if isinstance(base, _DenseFactorSolves) else False

    def _constants(self) -> Tensor:
        """:math:`c` per batch entry. # shape: (*batch,)"""
        return self._constant.expand(self.batch_shape)

    def _positive(self, what: str) -> Tensor:
        c = self._constants()
        if not bool((c > 0).all()):
            raise ValueError(  # not NotPSDError: linear_operator's generic root would catch it and clamp (see
                # _composition's _negative_root)
                f"{what} of a predictive covariance times {float(c.min()):.3g}: a multiple by a constant <= 0 is not "
                "a covariance (not positive definite); multiply a distribution by a positive number."
            )
        return c

    def _working_dense(self) -> Tensor:
        dense = _working_dense_of(self.base_linear_op, self._working_dtype(), self.shape)
        return dense * self._constants().to(dense.dtype)[..., None, None]

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        check_floating(right_tensor, "right_tensor")
        check_floating(left_tensor, "left_tensor")
        vector = right_tensor.dim() == 1
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        res = self.base_linear_op.solve(rhs)
        res = res / self._constants().to(res.dtype)[..., None, None]
        if left_tensor is not None:
            res = left_tensor @ res
        return res.squeeze(-1) if vector else res

    def inv_quad_logdet(
        self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True
    ) -> tuple[Tensor, Tensor]:
        check_floating(inv_quad_rhs, "inv_quad_rhs")
        c = self._positive("the log-determinant") if logdet else self._constants()
        quad, det = self.base_linear_op.inv_quad_logdet(inv_quad_rhs, logdet=logdet, reduce_inv_quad=reduce_inv_quad)
        if inv_quad_rhs is not None:
            quad = quad / (c if reduce_inv_quad else c.unsqueeze(-1)).to(quad.dtype)
        if logdet:
            det = det + self.shape[-1] * c.to(det.dtype).log()
        return quad, det

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        c = self._positive("root_decomposition")
        root = self.base_linear_op.root_decomposition(method=method).root
        return RootLinearOperator(root._mul_constant(c.sqrt().to(root.dtype)))

    def root_inv_decomposition(self, initial_vectors=None, test_vectors=None, method: str | None = None):
        c = self._positive("root_inv_decomposition")
        root = self.base_linear_op.root_inv_decomposition(
            initial_vectors=initial_vectors, test_vectors=test_vectors, method=method
        ).root
        return RootLinearOperator(root._mul_constant(c.rsqrt().to(root.dtype)))


class _DenseFactorSum(_DenseFactorSolves, SumLinearOperator):
    """A sum of a predictive covariance (or its principal submatrix, or a multiple) and another covariance of the same
    size (``pred_a + pred_b``, ``pred + BlockMeanLinearOperator``): products as linear_operator's
    ``SumLinearOperator``; solves, ``log_prob`` and roots from one exact Cholesky factorisation of the summed dense
    matrix, as a predictive covariance's own (within ``max_capacitance_size``)."""

    _dense_inputs = "inputs"

    def _working_dense(self) -> Tensor:
        wdt = self._working_dtype()
        pieces = [_working_dense_of(op, wdt, self.shape) for op in self.linear_ops]
        total = pieces[0]
        for piece in pieces[1:]:
            total = total + piece
        return total

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        if _is_noop_index(row_index) and _is_noop_index(col_index):  # batch entries: the summands', still exact
            parts = [op._getitem(row_index, col_index, *batch_indices) for op in self.linear_ops]
            if all(_known_covariance(part) for part in parts):
                return _DenseFactorSum(*parts)
        return super()._getitem(row_index, col_index, *batch_indices)


class PredictiveCovarianceLinearOperator(
    _CastOnce, _DenseFactorSolves, TorchIndexing, ClosedFormSamples, LinearOperator
):
    r"""The posterior covariance at new inputs :math:`K_{**} - F W F^\top` (see :func:`new_input_prediction`).

    ``F`` is held in blocks, one per term of the training covariance (the tensors the kernels returned, not
    copied; None for a term the test points do not touch), :math:`W` is ``q x q``, formed or applied as products
    (:class:`_ImplicitWeight`). Products cost :math:`O(t q)` per column beyond :math:`K_{**}`'s and :math:`W`'s; the
    diagonal is formed ``_DIAG_CHUNK / q`` rows at a time (with a formed :math:`W`, a block with one nonzero per
    row, a random intercept, by gathers; with products, :math:`W F_c^\top` per chunk), so nothing ``t x t`` or
    ``t x n`` is formed (only :meth:`to_dense` forms ``t x t``). The diagonal is clamped at 0, where only rounding
    can take it (:math:`F W F^\top` is bounded by :math:`K_{**}`'s diagonal in exact arithmetic). Solves,
    ``inv_quad_logdet`` (a joint ``log_prob``) and roots factorise the ``t x t`` matrix once, exactly
    (:class:`_DenseFactorSolves`), never by CG or Lanczos. A cast (``to(dtype)``, ``half()``, ...) keeps that
    working precision and rounds the difference once (:class:`_CastOnce`).

    Args:
        prior: :math:`K_{**}`, a :class:`~linear_operator.operators.LinearOperator` or tensor. # shape: (*batch, t, t)
        W: a tensor or an :class:`_ImplicitWeight`. # shape: (*batch, q, q)
        tensors: the blocks of :math:`F` that are not zero, ``(*batch, t, k_j)`` each, or for a block with at
            most one nonzero per row (``one_hot``) two tensors: the ``(*batch, t)`` values and the ``(t,)`` columns.
        present: per term of the training covariance, whether its block is among ``tensors`` (else zero).
        sizes: :math:`k_j` per term (the root's ``m`` last). :meth:`from_blocks` builds it from a list.
        one_hot: per term, whether its block is given as values and columns (default: none is).
        graph: whether the last two tensors are :attr:`graph`'s.
        output_dtype: the dtype of what the operator returns, when it differs from ``prior``'s (a cast operator,
            :class:`_CastOnce`); None (the default): ``prior``'s.
    """

    def __init__(
        self,
        prior,
        W: Tensor | _ImplicitWeight,
        *tensors: Tensor,
        present: tuple[bool, ...],
        sizes: tuple[int, ...],
        one_hot: tuple[bool, ...] = (),
        graph: bool = False,
        output_dtype: torch.dtype | None = None,
    ):
        one_hot = tuple(one_hot) or (False,) * len(present)
        output_dtype = None if output_dtype == prior.dtype else output_dtype
        super().__init__(
            prior,
            W,
            *tensors,
            present=tuple(present),
            sizes=tuple(sizes),
            one_hot=one_hot,
            graph=bool(graph),
            output_dtype=output_dtype,
        )
        given = iter(tensors)
        self.prior = prior
        self._output_dtype = output_dtype
        self.W = W
        self.sizes = list(sizes)
        self.blocks: list[Tensor | _OneHot | None] = []
        for p, o, k in zip(present, one_hot, sizes):
            if not p:
                self.blocks.append(None)
            elif o:
                self.blocks.append(_OneHot(next(given), next(given), k))
            else:
                self.blocks.append(next(given))
        #: ``(G1, G2)``, the term :math:`G_1 G_2^\top + G_2 G_1^\top` subtracted too: zero, with the graph of the
        #: training side of an inducing-point cross covariance (:func:`new_input_prediction`), or None
        self.graph: tuple[Tensor, Tensor] | None = (next(given), next(given)) if graph else None
        self._sparse: list[bool] | None = None
        self._parts: _Structured | bool | None = None  # the structured forms' pieces (False: they do not apply)

    @classmethod
    def from_blocks(
        cls,
        prior,
        W: Tensor | _ImplicitWeight,
        blocks: list[Tensor | _OneHot | None],
        sizes: list[int],
        graph: tuple[Tensor, Tensor] | None = None,
        output_dtype: torch.dtype | None = None,
    ):
        """The operator from :math:`F`'s blocks (None: a zero block) and the optional graph term (see
        :attr:`graph`); ``output_dtype`` as the class takes it."""
        present = tuple(b is not None for b in blocks)
        one_hot = tuple(isinstance(b, _OneHot) for b in blocks)
        tensors: list[Tensor] = []
        for b in blocks:
            if isinstance(b, _OneHot):
                tensors += [b.values, b.columns]
            elif b is not None:
                tensors.append(b)
        if graph is not None:
            tensors += list(graph)
        return cls(
            prior,
            W,
            *tensors,
            present=present,
            sizes=tuple(sizes),
            one_hot=one_hot,
            graph=graph is not None,
            output_dtype=output_dtype,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.prior.dtype if self._output_dtype is None else self._output_dtype

    def _cast(self, device: torch.device | None, dtype: torch.dtype) -> PredictiveCovarianceLinearOperator:
        """See :class:`_CastOnce`: ``W`` stays in the working precision, ``F``'s blocks as they are."""

        def move(t):
            return t if device is None else t.to(device=device)

        prior = move(self.prior)
        wide = torch.promote_types(prior.dtype, dtype)
        prior = prior if wide == prior.dtype else prior.to(wide)
        blocks = [
            None if b is None else _OneHot(move(b.values), move(b.columns), b.k) if isinstance(b, _OneHot) else move(b)
            for b in self.blocks
        ]
        graph = self._map_graph(move)
        return PredictiveCovarianceLinearOperator.from_blocks(
            prior, move(self.W), blocks, self.sizes, graph, output_dtype=dtype
        )

    @property
    def device(self) -> torch.device:
        return self.prior.device

    def _size(self) -> torch.Size:
        batch = torch.broadcast_shapes(
            self.prior.shape[:-2], self.W.shape[:-2], *(b.shape[:-2] for b in self.blocks if b is not None)
        )
        return torch.Size((*batch, *self.prior.shape[-2:]))

    def _transpose_nonbatch(self) -> PredictiveCovarianceLinearOperator:
        return self

    def _expand_batch(self, batch_shape) -> PredictiveCovarianceLinearOperator:
        t = self.shape[-1]
        prior = self.prior.expand(*batch_shape, t, t)
        W = self.W.expand(*batch_shape, *self.W.shape[-2:])
        blocks = [None if b is None else b.expand(*batch_shape, *b.shape[-2:]) for b in self.blocks]
        graph = self._map_graph(lambda g: g.expand(*batch_shape, *g.shape[-2:]))
        return PredictiveCovarianceLinearOperator.from_blocks(prior, W, blocks, self.sizes, graph, self._output_dtype)

    def _map_graph(self, fn) -> tuple[Tensor, Tensor] | None:
        return None if self.graph is None else (fn(self.graph[0]), fn(self.graph[1]))

    def _unsqueeze_batch(self, dim: int) -> PredictiveCovarianceLinearOperator:
        """A new batch dimension of size 1 at ``dim`` in every part, expanded to the whole batch shape first
        (linear_operator's default unsqueezed every tensor argument, the one-hot blocks' batch-free columns too, which
        broke products, and parts broadcast over the batch at the wrong place)."""
        full = self._expand_batch(self.batch_shape)
        blocks = [
            b
            if b is None
            else _OneHot(b.values.unsqueeze(dim), b.columns, b.k)
            if isinstance(b, _OneHot)
            else b.unsqueeze(dim)
            for b in full.blocks
        ]
        return PredictiveCovarianceLinearOperator.from_blocks(
            full.prior.unsqueeze(dim),
            full.W.unsqueeze(dim),
            blocks,
            self.sizes,
            full._map_graph(lambda g: g.unsqueeze(dim)),
            self._output_dtype,
        )

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        """Batch entries: every part's, each expanded to the whole batch shape first (linear_operator's default
        indexed the one-hot blocks' batch-free columns with the batch indices too)."""
        if _is_noop_index(row_index) and _is_noop_index(col_index):
            full = self._expand_batch(self.batch_shape)
            every = (slice(None),)
            blocks = [
                None
                if b is None
                else _OneHot(b.values[(*batch_indices, *every)], b.columns, b.k)
                if isinstance(b, _OneHot)
                else b[(*batch_indices, *every, *every)]
                for b in full.blocks
            ]
            prior, W = (
                x._getitem(row_index, col_index, *batch_indices)
                if isinstance(x, LinearOperator)
                else x[(*batch_indices, *every, *every)]
                for x in (full.prior, full.W)
            )
            graph = full._map_graph(lambda g: g[(*batch_indices, *every, *every)])
            return PredictiveCovarianceLinearOperator.from_blocks(
                prior, W, blocks, self.sizes, graph, self._output_dtype
            )
        return super()._getitem(row_index, col_index, *batch_indices)

    def evaluate_kernel(self) -> PredictiveCovarianceLinearOperator:
        return self

    # ------------------------------------------------------------------ F and F^T
    def _f_t(self, x: Tensor) -> Tensor:
        r""":math:`F^\top x` in the working precision. ``x`` # shape: (*batch, t, c)"""
        wdt = self.W.dtype
        pieces = []
        for b, k in zip(self.blocks, self.sizes):
            if b is None:
                pieces.append(x.new_zeros(*x.shape[:-2], k, x.shape[-1], dtype=wdt))
            else:
                pieces.append(_block_t_matmul(b, x.to(wdt)))
        batch = torch.broadcast_shapes(*(p.shape[:-2] for p in pieces))
        return torch.cat([p.expand(*batch, *p.shape[-2:]) for p in pieces], dim=-2)

    def _f(self, y: Tensor) -> Tensor:
        """:math:`F y` in the working precision. ``y`` # shape: (*batch, q, c)"""
        wdt = self.W.dtype
        res = None
        for b, piece in zip(self.blocks, y.split(self.sizes, dim=-2)):
            if b is not None:
                term = _block_matmul(b, piece.to(wdt))
                res = term if res is None else res + term
        assert res is not None
        return res

    def _working_matmul(self, x: Tensor) -> Tensor:
        r""":math:`(K_{**} - F W F^\top) x`, the difference in the working precision. ``x`` # shape: (*batch, t, c)"""
        prior = self.prior
        res = prior @ x.to(torch.promote_types(x.dtype, prior.dtype))  # (a cast operator's x may be narrower)
        correction = self._structured_product(x.to(core_dtype(prior.dtype)))
        if correction is None:
            correction = self._f(self._w(self._f_t(x)))
        if self.graph is not None:
            G1, G2 = (g.to(correction.dtype) for g in self.graph)
            xw = x.to(correction.dtype)
            correction = correction + G1 @ (G2.mT @ xw) + G2 @ (G1.mT @ xw)
        return res.to(correction.dtype) - correction

    def _matmul(self, rhs: Tensor) -> Tensor:
        check_floating(rhs, "rhs")
        vector = rhs.dim() == 1
        x = rhs.unsqueeze(-1) if vector else rhs
        res = self._working_matmul(x).to(torch.promote_types(rhs.dtype, self.dtype))
        return res.squeeze(-1) if vector else res

    def matmul(self, other):
        if torch.is_tensor(other):
            return self._matmul(other)
        return super().matmul(other)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._matmul(rhs)

    def _w(self, X: Tensor) -> Tensor:
        """:math:`W X` (working precision), by plain tensor operations whether or not ``W`` is formed."""
        W = self.W
        if isinstance(W, _ImplicitWeight):
            formed = W.formed(X.shape[-1])
            return W._matmul(X) if formed is None else formed @ X
        return W @ X

    def _working_dense(self) -> Tensor:
        t = self.shape[-1]
        eye = torch.eye(t, dtype=self.prior.dtype, device=self.device)
        return self._working_matmul(eye.expand(*self.batch_shape, t, t))

    def to_dense(self) -> Tensor:
        return self._working_dense().to(self.dtype)

    def __add__(self, other):
        """A diagonal (the likelihood's noise) goes into :math:`K_{**}`, so the sum keeps its exact root."""
        if isinstance(other, DiagLinearOperator):
            prior = self.prior if isinstance(self.prior, LinearOperator) else DenseLinearOperator(self.prior)
            return PredictiveCovarianceLinearOperator.from_blocks(
                prior + _widened(other, prior.dtype), self.W, self.blocks, self.sizes, self.graph, self._output_dtype
            )
        return super().__add__(other)

    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        diag = diag if torch.is_tensor(diag) else torch.tensor(diag, dtype=self.dtype, device=self.device)
        return self + DiagLinearOperator(diag.expand(*self.shape[:-1]))

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        res = self._closed_form_indices(row_index, col_index, *batch_indices)
        if self.graph is None:
            return res
        G1, G2 = (g.expand(*self.batch_shape, *g.shape[-2:]) for g in self.graph)
        rows, cols = (*batch_indices, row_index), (*batch_indices, col_index)
        extra = (G1[rows] * G2[cols]).sum(-1) + (G2[rows] * G1[cols]).sum(-1)
        return res - extra.to(res.dtype)

    def _closed_form_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        """Entries of :math:`K_{**} - F W F^\top` (without the :attr:`graph` term)."""
        prior = self.prior
        if isinstance(prior, LinearOperator):
            base = prior._expand_batch(self.batch_shape)._get_indices(row_index, col_index, *batch_indices)
        else:
            base = prior.expand(*self.shape)[(*batch_indices, row_index, col_index)]
        wdt = self.W.dtype

        def rows(index: Tensor) -> Tensor:
            pieces = []
            for b, k in zip(self.blocks, self.sizes):
                if b is None:
                    pieces.append(torch.zeros(*index.shape, k, dtype=wdt, device=index.device))
                elif isinstance(b, _OneHot):
                    pieces.append(b.rows(self.batch_shape, batch_indices, index).to(wdt))
                else:
                    b = b.expand(*self.batch_shape, *b.shape[-2:])
                    pieces.append(b[(*batch_indices, index)].to(wdt))
            shape = torch.broadcast_shapes(*(p.shape[:-1] for p in pieces))
            return torch.cat([p.expand(*shape, p.shape[-1]) for p in pieces], dim=-1)

        parts = self._structured() if not batch_indices else None
        if parts is not None and parts.unbatched():
            return (base.to(parts.v.dtype) - parts.entries(row_index, col_index)).to(self.dtype)
        fr, fc = rows(row_index), rows(col_index)
        implicit = self.W if isinstance(self.W, _ImplicitWeight) else None
        W = self.W if implicit is None else implicit.formed(fc[..., 0].numel())
        if W is None:  # products: W applied to the entries' columns of F
            assert implicit is not None
            shape = torch.broadcast_shapes(fr.shape, fc.shape)
            q = shape[-1]
            fr, fc = fr.expand(shape).reshape(-1, q), fc.expand(shape).reshape(-1, q)
            if not batch_indices:
                quad = (fr * implicit._matmul(fc.mT).mT).sum(-1)
            else:  # each entry's column goes to its own batch member; one product for all
                batch = tuple(self.batch_shape)
                flat = torch.zeros(shape[:-1], dtype=torch.long, device=fr.device)
                for index, size in zip(batch_indices, batch):
                    flat = flat * size + index.to(flat.device).expand(shape[:-1])
                flat = flat.reshape(-1)
                entries = torch.arange(flat.numel(), device=fr.device)
                X = fc.new_zeros(math.prod(batch), q, flat.numel())
                X[flat, :, entries] = fc
                Y = implicit._matmul(X.view(*batch, q, -1)).reshape(-1, q, flat.numel())
                quad = (fr * Y[flat, :, entries]).sum(-1)
            return (base.to(wdt) - quad.reshape(shape[:-1])).to(self.dtype)
        W = W.expand(*self.batch_shape, *W.shape[-2:])[batch_indices] if batch_indices else W
        quad = ((fr.unsqueeze(-2) @ W).squeeze(-2) * fc).sum(-1)
        return (base.to(wdt) - quad).to(self.dtype)

    # ------------------------------------------------------------------ the diagonal
    def _sparse_blocks(self) -> list[bool]:
        """Which blocks have more than ``_SPARSE_COLUMNS`` columns and at most one nonzero per row (no batch)."""
        if self._sparse is None:
            flags = []
            for b in self.blocks:
                ok = b is not None and b.dim() == 2 and self.W.dim() == 2 and b.shape[-1] > _SPARSE_COLUMNS
                if ok and not isinstance(b, _OneHot):
                    assert b is not None
                    rows = max(1, _DIAG_CHUNK // b.shape[-1])
                    ok = all(bool(((c != 0).sum(-1) <= 1).all()) for c in b.detach().split(rows, dim=-2))
                flags.append(ok)
            self._sparse = flags
        return self._sparse

    def _implicit_quadratic_diagonal(self) -> Tensor:
        r""":math:`\operatorname{diag}(F W F^\top)` with :math:`W` applied as products: per chunk of rows,
        :math:`W F_c^\top` (``q`` x rows) and a row-wise product with :math:`F_c`. # shape: (*batch, t)"""
        W = self.W
        assert isinstance(W, _ImplicitWeight)
        wdt, t, q = W.dtype, self.shape[-1], W.shape[-1]
        rows = max(1, _DIAG_CHUNK // q)
        out = []
        for start in range(0, t, rows):
            c = min(rows, t - start)
            pieces = [
                torch.zeros(c, k, dtype=wdt, device=self.device) if b is None else _block_rows(b, start, c).to(wdt)
                for b, k in zip(self.blocks, self.sizes)
            ]
            batch = torch.broadcast_shapes(*(p.shape[:-2] for p in pieces))
            Fc = torch.cat([p.expand(*batch, *p.shape[-2:]) for p in pieces], dim=-1)  # (*batch, c, q)
            out.append((Fc * W._matmul(Fc.mT).mT).sum(-1))
        res = torch.cat(out, dim=-1)
        return res.expand(*self.batch_shape, t)

    def _structured(self) -> _Structured | None:
        """The pieces of the structured forms (:class:`_Structured`), or None where they do not apply. Made without
        gradients, they are kept on the operator and reused without gradients only: with gradients enabled they are
        made again, so that a graph is never missed."""
        grad = torch.is_grad_enabled()
        if self._parts is not None and not grad:
            return self._parts if isinstance(self._parts, _Structured) else None
        W = self.W
        # the structured forms write W's products (or G - Sigma's, with F's blocks Z_*) from M's structure
        parts = None
        if isinstance(W, _ImplicitWeight):
            parts = _Structured.build(W.M, self.blocks, self.shape[-1], stable=W.stable)
        if not grad:
            self._parts = parts if parts is not None else False
        return parts

    def _structured_quadratic_diagonal(self) -> Tensor | None:
        r""":math:`\operatorname{diag}(F W F^\top)` without products with :math:`W` (:class:`_Structured`), or None
        where that does not apply. # shape: (*batch, t)"""
        parts = self._structured()
        if parts is None:
            return None
        res = parts.diagonal()
        return res.expand(*torch.broadcast_shapes(res.shape[:-1], self.batch_shape), self.shape[-1])

    def _structured_product(self, x: Tensor) -> Tensor | None:
        r""":math:`F W F^\top x` without products with :math:`W` (:class:`_Structured`; working precision), or None
        where that does not apply. ``x`` # shape: (*batch, t, c)"""
        parts = self._structured()
        return None if parts is None else parts.matmul(x)

    def _quadratic_diagonal(self) -> Tensor:
        r""":math:`\operatorname{diag}(F W F^\top)` in row chunks, in the working precision. # shape: (*batch, t)"""
        if isinstance(self.W, _ImplicitWeight):
            structured = self._structured_quadratic_diagonal()
            if structured is not None:
                return structured
            formed = self.W.formed(self.shape[-1])
            if formed is None:
                return self._implicit_quadratic_diagonal()
            W = formed
        else:
            W = self.W
        wdt = W.dtype
        sparse = self._sparse_blocks()
        offsets = [0]
        for k in self.sizes:
            offsets.append(offsets[-1] + k)
        dense = [i for i, b in enumerate(self.blocks) if b is not None and not sparse[i]]
        scattered = [i for i, b in enumerate(self.blocks) if b is not None and sparse[i]]
        dense_cols = torch.cat(
            [torch.arange(offsets[i], offsets[i + 1], device=W.device) for i in dense]
            or [torch.zeros(0, dtype=torch.long, device=W.device)]
        )
        W_dd = W.index_select(-2, dense_cols).index_select(-1, dense_cols)
        W_d = W.index_select(-1, dense_cols)  # rows of all terms, dense columns
        qd = dense_cols.numel()
        t = self.shape[-1]
        rows = max(1, _DIAG_CHUNK // max(1, qd, max((self.sizes[i] for i in scattered), default=1)))
        out = []
        for start in range(0, t, rows):
            c = min(rows, t - start)
            total = torch.zeros(*self.batch_shape, c, dtype=wdt, device=W.device)
            Fd = None
            if dense:
                pieces = [_block_rows(self.blocks[i], start, c).to(wdt) for i in dense]  # type: ignore[arg-type]
                batch = torch.broadcast_shapes(*(p.shape[:-2] for p in pieces))
                Fd = torch.cat([p.expand(*batch, *p.shape[-2:]) for p in pieces], dim=-1)
                total = total + ((Fd @ W_dd) * Fd).sum(-1)
            coords = []
            for i in scattered:
                block = self.blocks[i]
                if isinstance(block, _OneHot):
                    part = block.narrow(start, c)
                    coords.append((offsets[i] + part.index(), part.weight().to(wdt)))
                    continue
                values = block.narrow(-2, start, c).to(wdt)  # type: ignore[union-attr]
                column = values.abs().argmax(-1)
                coords.append((offsets[i] + column, values.gather(-1, column.unsqueeze(-1)).squeeze(-1)))
            for a, (col_a, val_a) in enumerate(coords):
                if Fd is not None:
                    total = total + 2 * val_a * (W_d.index_select(-2, col_a) * Fd).sum(-1)
                for col_b, val_b in coords[a:]:
                    factor = 1 if col_b is col_a else 2
                    total = total + factor * val_a * val_b * W[col_a, col_b]
            out.append(total)
        return torch.cat(out, dim=-1)

    def _diagonal(self) -> Tensor:
        prior = self.prior
        base = prior.diagonal(dim1=-2, dim2=-1)
        quad = self._quadratic_diagonal()
        if self.graph is not None:
            G1, G2 = (g.to(quad.dtype) for g in self.graph)
            quad = quad + 2 * (G1 * G2).sum(-1)
        return (base.to(quad.dtype) - quad).clamp_min(0).to(self.dtype)  # >= 0 up to rounding

    def __repr__(self) -> str:
        return (
            f"PredictiveCovarianceLinearOperator(shape={tuple(self.shape)}, q={self.W.shape[-1]}, "
            f"dtype={self.dtype}, device={self.device})"
        )


# ---------------------------------------------------------------------------- the operator
#: Points whose ratio ``s / d`` (``d`` the posterior variance) is at most this times the largest go to
#: :class:`_SplitRoot`'s QR block: the square root's Gram matrix weighs each point by ``d / s``, and its
#: eigendecomposition loses about ``eps`` times the spread of those weights at the other points (``s`` is 0 where
#: SGPR's diagonal correction is, at the inducing points, and tiny next to them). A small ``s`` everywhere is fine.
_SPLIT_THRESHOLD = 1e-6


def _z_rows(M: BlockMeanSumLinearOperator, rows: Tensor) -> Tensor:
    """The rows ``rows`` of :math:`Z` (one column per level of each grouping, then the root's), in the working
    precision. # shape: (*batch, len(rows), q)"""
    wdt = core_dtype(M.dtype)
    pieces = []
    for j, p in enumerate(M.partitions):
        piece = torch.nn.functional.one_hot(p.labels.index_select(0, rows), p.num_blocks).to(wdt)
        w = M.weights[j]
        pieces.append(piece if w is None else piece * w.to(wdt).index_select(-1, rows).unsqueeze(-1))
    if M.root is not None:
        pieces.append(M.root.index_select(-2, rows).to(wdt))
    batch = torch.broadcast_shapes(*(piece.shape[:-2] for piece in pieces))
    return torch.cat([piece.expand(*batch, *piece.shape[-2:]) for piece in pieces], dim=-1)


#: ``s`` is zero (the root is ``V``), non-negative (it may vanish somewhere: a root split at those points), or at
#: least a positive diagonal that was added to it (a likelihood's noise: a square root through Woodbury).
_DIAG_KINDS = ("zero", "nonnegative", "positive")


class TrainingPosteriorLinearOperator(_CastOnce, _DenseFactorSolves, TorchIndexing, LinearOperator):
    r""":math:`S = \operatorname{diag}(s) + V V^\top` with :math:`V = \operatorname{diag}(\beta) Z Y`
    (:math:`Z` the columns of the noisy training covariance ``M``, :math:`Y` of size :math:`q \times q` with
    :math:`Y Y^\top = H`, :math:`H = C^{-1} G`). Products apply :math:`H` by solves with ``M``'s capacitance
    factorisation, the diagonal reads it from the blocks of that factorisation
    (:func:`_posterior_quadratic_diagonal`) and draws condition prior draws
    (:meth:`zero_mean_mvn_samples`): none of them forms a :math:`q \times q` matrix when ``M`` eliminates a grouping,
    so they work past ``max_capacitance_size`` whenever ``M``'s own factorisation does. Only a root and a solve
    form :math:`Y` (on first use).

    Products cost :math:`O(n (J + m))` per column plus a capacitance solve, the diagonal :math:`O(n (J + m)^2)` plus
    ``O(k r^2)`` once (``r`` the columns left after the elimination); both terms of the
    diagonal are non-negative (:math:`s \ge 0` exactly, and :math:`z_a^\top H z_a` with :math:`H = Y Y^\top
    \succeq 0` is clamped at zero, where only rounding can take it). Adding a diagonal (the likelihood's noise)
    keeps the type. Solves, ``inv_quad`` and ``logdet`` (a joint ``log_prob``) are closed form once :math:`s > 0`
    (``diag_kind="positive"``): Woodbury and the determinant lemma through the ``q x q`` capacitance
    :math:`I + V^\top \operatorname{diag}(1/s) V` (:meth:`_woodbury_factor`), nothing ``n x n``; without the
    noise (typically singular) they factorise the dense ``n x n`` matrix exactly, with a
    :class:`~bma_gp.ClosedFormFallbackWarning` (never CG or Lanczos). :meth:`root_decomposition`:

    * :math:`s = 0` (no inducing-point correction): :math:`[V, 0]`, ``n x max(n, q)`` (zero columns pad it to a
      square so that GPyTorch's ``rsample(base_samples=...)`` takes ``n`` base samples);
    * :math:`s \ge 0`, possibly zero somewhere (SGPR's diagonal correction, zero at the inducing points), and
      :math:`s = 0` with :math:`q > n`: an ``n x n`` root, so that GPyTorch's ``rsample(base_samples=...)`` takes
      ``n`` base samples (:meth:`_n_column_root`: the square root below when :math:`s` is not tiny anywhere, else
      :class:`_SplitRoot`, one QR factorisation of size ``(q + z) x z`` for the ``z`` points where it is); past
      ``max_capacitance_size`` :math:`[\operatorname{diag}(\sqrt{s}), V]` (``n x (n + q)``), with a warning, and a
      ``ValueError`` when :math:`Y` itself (``q x q``) is past it;
    * :math:`s` at least an added positive diagonal (``likelihood(model(train_x))``): the square root
      :math:`\operatorname{diag}(\sqrt{s}) + V K V^\top \operatorname{diag}(1/\sqrt{s})`,
      :math:`K = h(V^\top \operatorname{diag}(1/s) V)`, :math:`h(e) = 1 / (\sqrt{1 + e} + 1)`, as for the sums'
      own roots (docs/math.md, section 4); :math:`V^\top \operatorname{diag}(1/s) V = Y^\top Z^\top
      \operatorname{diag}(\beta^2 / s) Z Y` is one more Gram matrix.

    Args:
        s: the diagonal. # shape: (*batch, n)
        beta: the row scaling of :math:`Z`. # shape: (*batch, n)
        M: the noisy training covariance, a :class:`~bma_gp.BlockMeanSumLinearOperator`.
        H: :math:`L (I + L^\top A L)^{-1} L^\top` formed (``(*batch, q, q)``), or None (the default, what the
            prediction strategy passes) to apply it through ``M``'s capacitance factorisation.
        diag_kind: ``"zero"``, ``"nonnegative"`` or ``"positive"`` (see above).
        Y: a root of ``H`` already formed (:func:`_posterior_root_factor`), or None to form it on first use.
        psd: whether every block matrix of ``M`` is positive semidefinite, so that ``H`` is and has the root ``Y``.
            Without it (a block mean kernel's indefinite ``B``) products and the diagonal stay closed form, and a
            root is linear_operator's generic one, with a :class:`~bma_gp.ClosedFormFallbackWarning`.
        output_dtype: the dtype of what the operator returns, when it differs from ``M``'s (a cast operator,
            :class:`_CastOnce`: ``M``, ``s`` and the factors keep their precision); None (the default): ``M``'s.
    """

    #: the kept values a cast operator shares (:class:`_CastOnce`) when it holds the same ``M``: none depends on the
    #: output dtype
    _SHARED_KEPT = (
        *_CastOnce._SHARED_KEPT,
        "_kept_woodbury",
        "_square_core",
        "_gram_square_core",
        "_split_rows",
        "_split_kept",
        "_prior_root_kept",
    )

    def __init__(
        self,
        s: Tensor,
        beta: Tensor,
        M: BlockMeanSumLinearOperator,
        H: Tensor | None = None,
        diag_kind: str = "zero",
        Y: Tensor | None = None,
        psd: bool = True,
        output_dtype: torch.dtype | None = None,
    ):
        if diag_kind not in _DIAG_KINDS:
            raise ValueError(f"diag_kind must be one of {_DIAG_KINDS}, got {diag_kind!r}.")
        shapes = [s.shape[:-1], beta.shape[:-1], M.batch_shape] + ([] if H is None else [H.shape[:-2]])
        batch = torch.broadcast_shapes(*shapes)
        n, q = s.shape[-1], sum(M._sizes())
        s, beta = s.expand(*batch, n), beta.expand(*batch, n)
        if H is not None:
            H = H.expand(*batch, q, q)
        if M.batch_shape != batch:
            M = M._expand_batch(batch)
        output_dtype = None if output_dtype == M.dtype else output_dtype
        super().__init__(s, beta, M, H=H, diag_kind=diag_kind, psd=psd, output_dtype=output_dtype)
        self.s, self.beta, self.M = s, beta, M
        self._output_dtype = output_dtype
        self._h = H
        self.q = q
        self.diag_kind = diag_kind
        self.psd = bool(psd)
        self._y = None if Y is None else Y.expand(*batch, q, q)
        self._kept_woodbury: tuple[Tensor, Tensor | None] | None = None

    @property
    def H(self) -> Tensor:
        r""":math:`H = C^{-1} G` as a ``q x q`` matrix, formed on first use when it was not given (nothing of this
        operator needs it when ``M`` eliminates a grouping). # shape: (*batch, q, q)"""
        if self._h is None or self._graphless(self._h):
            self._h = _training_weight(self.M)
        return self._h

    @property
    def Y(self) -> Tensor:
        r""":math:`Y` with :math:`Y Y^\top = H`, formed on first use (only roots need it). # shape: (*batch, q, q)"""
        if self._y is None or self._graphless(self._y):
            self._y = _posterior_root_factor(self.M)
        return self._y

    def _graphless(self, kept: Tensor) -> bool:
        """Whether a kept factor was made without the graph this call needs (under ``no_grad``, from a training
        covariance whose tensors require gradients): then it is made again."""
        return not kept.requires_grad and self.M._differentiable()

    @property
    def dtype(self) -> torch.dtype:  # the factors are held in the working precision
        return self.M.dtype if self._output_dtype is None else self._output_dtype

    def _cast(self, device: torch.device | None, dtype: torch.dtype) -> TrainingPosteriorLinearOperator:
        """See :class:`_CastOnce`: ``M`` widened if ``dtype`` is wider (exactly), ``s``, ``beta`` and the factors
        kept in the working precision."""

        def move(t):
            if t is None:
                return None
            t = t if device is None else t.to(device=device)
            wide = torch.promote_types(t.dtype, dtype)
            return t if wide == t.dtype else t.to(wide)

        return TrainingPosteriorLinearOperator(
            move(self.s),
            move(self.beta),
            move(self.M),
            H=move(self._h),
            diag_kind=self.diag_kind,
            Y=move(self._y),
            psd=self.psd,
            output_dtype=dtype,
        )

    def _shares_kept_with(self, res: LinearOperator) -> bool:
        """Only with the same ``M`` (not moved, not widened): a root of the prior is kept in ``M``'s dtype."""
        return isinstance(res, TrainingPosteriorLinearOperator) and res.M is self.M

    @property
    def device(self) -> torch.device:
        return self.M.device

    def _size(self) -> torch.Size:
        return self.M.shape

    def _transpose_nonbatch(self) -> TrainingPosteriorLinearOperator:
        return self

    def _expand_batch(self, batch_shape) -> TrainingPosteriorLinearOperator:
        n, q = self.s.shape[-1], self.q
        return TrainingPosteriorLinearOperator(
            self.s.expand(*batch_shape, n),
            self.beta.expand(*batch_shape, n),
            self.M._expand_batch(batch_shape),
            H=None if self._h is None else self._h.expand(*batch_shape, q, q),
            diag_kind=self.diag_kind,
            Y=None if self._y is None else self._y.expand(*batch_shape, q, q),
            psd=self.psd,
            output_dtype=self._output_dtype,
        )

    def evaluate_kernel(self) -> TrainingPosteriorLinearOperator:
        return self

    # ------------------------------------------------------------------ V and V^T
    def _v(self, x: Tensor) -> Tensor:
        """:math:`V x` in the working precision. ``x`` # shape: (*batch, q, t)"""
        y = (self.Y @ x.to(self.Y.dtype)).split(self.M._sizes(), dim=-2)
        return self.beta.unsqueeze(-1) * self.M._z(list(y))

    def _v_t(self, x: Tensor) -> Tensor:
        """:math:`V^\\top x` in the working precision. ``x`` # shape: (*batch, n, t)"""
        u = self.M._z_t(self.beta.unsqueeze(-1) * x.to(self.beta.dtype))
        return self.Y.mT @ torch.cat(u, dim=-2)

    def _working_matmul(self, x: Tensor) -> Tensor:
        """:math:`S x` in the working precision. ``x`` # shape: (*batch, n, c)"""
        xw = x.to(self.s.dtype)
        u = self.M._z_t(self.beta.unsqueeze(-1) * xw)  # Z^T diag(beta) x, per term
        if self._h is None:  # H u = C^{-1} G u: one solve with M's capacitance factorisation
            coef = self.M._cap_solve([self.M._G(t, ut) for t, ut in enumerate(u)])
        else:
            coef = list((self._h @ torch.cat(u, dim=-2)).split(self.M._sizes(), dim=-2))
        return self.s.unsqueeze(-1) * xw + self.beta.unsqueeze(-1) * self.M._z(coef)

    def _matmul(self, rhs: Tensor) -> Tensor:
        check_floating(rhs, "rhs")
        vector = rhs.dim() == 1
        x = rhs.unsqueeze(-1) if vector else rhs
        res = self._working_matmul(x).to(torch.promote_types(rhs.dtype, self.dtype))
        return res.squeeze(-1) if vector else res

    def matmul(self, other):
        if torch.is_tensor(other):
            return self._matmul(other)  # plain torch operations: autograd reaches every tensor
        return super().matmul(other)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._matmul(rhs)

    def _working_diagonal(self) -> Tensor:
        """The diagonal in the working precision. # shape: (*batch, n)"""
        quad = _posterior_quadratic_diagonal(self.M) if self._h is None else None
        if quad is None:
            quad = _quadratic_diagonal(self.M, self.H, self.M._sizes())
        if self.psd:
            return self.s + self.beta.pow(2) * quad.clamp_min(0)  # quad >= 0 up to rounding
        return (self.s + self.beta.pow(2) * quad).clamp_min(0)  # H indefinite: the sum is >= 0

    def _diagonal(self) -> Tensor:
        return self._working_diagonal().to(self.dtype)

    def _working_dense(self) -> Tensor:
        n = self.shape[-1]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        return self._working_matmul(eye.expand(*self.batch_shape, n, n))

    def to_dense(self) -> Tensor:
        return self._working_dense().to(self.dtype)

    # ------------------------------------------------------------------ solves and log-determinants
    def _woodbury_factor(self) -> tuple[Tensor, Tensor | None]:
        r"""The capacitance of :math:`S` (:math:`s > 0`), kept as :class:`_DenseFactorSolves` keeps its factor:
        ``(R, None)`` with :math:`R R^\top = I + V^\top \operatorname{diag}(1/s) V = I + Y^\top A' Y` (Cholesky,
        :math:`A' = Z^\top \operatorname{diag}(\beta^2 / s) Z` the Gram matrix of the square root) where
        :math:`H = Y Y^\top` has a root, else ``(I + H A', H)`` (an indefinite :math:`B_j`: :math:`H` is indefinite,
        the capacitance not symmetric, solved by LU). ``q x q``, within ``max_capacitance_size``."""
        kept = self._kept_woodbury
        if kept is not None and not self._needs_graph():
            return kept
        _check_weight_size(self.M, "log_prob (a solve or log-determinant)")
        gram = self._scaled_gram()
        eye = torch.eye(self.q, dtype=gram.dtype, device=gram.device)
        factor: tuple[Tensor, Tensor | None]
        if self.psd:
            E = self.Y.mT @ gram @ self.Y
            factor = (torch.linalg.cholesky(eye + 0.5 * (E + E.mT)), None)  # I + E >= I: positive definite
        else:
            H = self.H
            factor = (eye + H @ gram, H)
        if not factor[0].requires_grad:
            self._kept_woodbury = factor
        return factor

    def _woodbury_terms(self, rhs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r"""``(x, c, d)`` with :math:`x = \operatorname{diag}(1/s) R`,
        :math:`S^{-1} R = x - \operatorname{diag}(\beta / s) Z c` and
        :math:`R^\top S^{-1} R = \operatorname{diag}(R^\top x) - d`, in the working precision. With a root
        of :math:`H`, :math:`u = V^\top x`, :math:`c = Y C^{-1} u` and :math:`d` the squared column norms of
        :math:`R_C^{-1} u` (:math:`C = R_C R_C^\top`: no cancellation within it); else :math:`u = Z^\top
        \operatorname{diag}(\beta) x`, :math:`c = (I + H A')^{-1} H u` and :math:`d = \operatorname{diag}(u^\top c)`.
        ``rhs`` # shape: (*batch, n, c)"""
        factor, H = self._woodbury_factor()
        x = rhs / self.s.unsqueeze(-1)
        if H is None:
            w = torch.linalg.solve_triangular(factor, self._v_t(x), upper=False)
            c = self.Y @ torch.linalg.solve_triangular(factor.mT, w, upper=True)
            return x, c, w.square().sum(-2)
        u = torch.cat(self.M._z_t(self.beta.unsqueeze(-1) * x), dim=-2)
        c = torch.linalg.solve(factor, H @ u)
        return x, c, (u * c).sum(-2)

    def _exact_solve(self, rhs: Tensor) -> Tensor:
        r""":math:`S^{-1} R`: by Woodbury through the ``q x q`` capacitance (:meth:`_woodbury_factor`) when
        :math:`s > 0` (the likelihood's noise added), else the dense ``n x n`` factorisation, with a warning."""
        if self.diag_kind != "positive":
            self._warn_dense()
            return super()._exact_solve(rhs)
        x, c, _ = self._woodbury_terms(rhs)
        return x - (self.beta / self.s).unsqueeze(-1) * self.M._z(list(c.split(self.M._sizes(), dim=-2)))

    def _exact_inv_quad_logdet(self, rhs: Tensor | None, logdet: bool) -> tuple[Tensor | None, Tensor | None]:
        r""":math:`R^\top S^{-1} R` per column and :math:`\log\det S = \sum_a \log s_a + \log\det(I + V^\top
        \operatorname{diag}(1/s) V)` (the determinant lemma; :math:`\log\det(I + H A')` without a root of :math:`H`)
        when :math:`s > 0`, else the dense ``n x n`` factorisation, with a warning."""
        if self.diag_kind != "positive":
            self._warn_dense()
            return super()._exact_inv_quad_logdet(rhs, logdet)
        quad = None
        if rhs is not None:
            x, _, d = self._woodbury_terms(rhs)
            quad = (rhs * x).sum(-2) - d
        det = None
        if logdet:
            factor, H = self._woodbury_factor()
            cap = 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1) if H is None else torch.logdet(factor)
            det = self.s.log().sum(-1) + cap
        return quad, det

    def _warn_dense(self) -> None:
        n = self.shape[-1]
        warnings.warn(
            f"a solve or log_prob of the posterior covariance at the {n} training inputs without the likelihood's "
            f"noise (diagonal {self.diag_kind!r}: typically singular, so no Woodbury identity applies) factorises "
            f"the dense {n} x {n} matrix, O(n^3) (one Cholesky, with linear_operator's jitter where it is singular). "
            "For the closed form add the noise: likelihood(model(train_x)).log_prob(train_y).",
            ClosedFormFallbackWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------ sums and roots
    def add_diagonal(self, diag: Tensor) -> TrainingPosteriorLinearOperator:
        """Add a scalar, one value per batch entry ``(*batch, 1)`` or a full diagonal ``(*batch, n)``."""
        if not torch.is_tensor(diag):
            diag = torch.tensor(diag, dtype=self.dtype, device=self.device)
        diag = diag.to(self.s.dtype)
        if bool((diag > 0).all()):
            kind = "positive"
        elif bool((diag >= 0).all()):
            kind = "nonnegative" if self.diag_kind == "zero" else self.diag_kind
        else:  # some entry < 0: the sum need not be positive semidefinite; linear_operator's generic sum
            return super().add_diagonal(diag.to(self.dtype))
        return TrainingPosteriorLinearOperator(
            self.s + diag,
            self.beta,
            self.M,
            H=self._h,
            diag_kind=kind,
            Y=self._y,
            psd=self.psd,
            output_dtype=self._output_dtype,
        )

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator):
            return self.add_diagonal(other.diagonal(dim1=-2, dim2=-1))
        return super().__add__(other)

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        r""":math:`S = R R^\top` (``method`` is ignored; see the class docstring for the three forms), ``n x n``
        except past ``max_capacitance_size``. Only the square forms factorise anything: one more :math:`q \times q`
        eigendecomposition, and for the ``z`` points split off (:class:`_SplitRoot`) a QR factorisation of size
        ``(q + z) x z`` and an eigendecomposition of size ``q + z``. Without :attr:`psd` ``H`` has no root:
        linear_operator's generic root (dense Cholesky up to ``max_cholesky_size``, Lanczos beyond), with a
        warning."""
        if not self.psd:
            if bool((self.s > 0).all()):  # the square root through the Gram matrix: H needs no root there
                core = getattr(self, "_gram_square_core", None)
                if core is None or self._graphless(core):
                    core = self._gram_square_root_core()
                    if not core.requires_grad:
                        self._gram_square_core = core
                return _RootProduct(_GramSquareRoot(self, core))
            warnings.warn(
                "root_decomposition of the posterior covariance at the training inputs: a block matrix B_j of the "
                "prior is indefinite (a block mean kernel's B can be, while its block mean matrix is positive "
                "semidefinite) and the diagonal s is 0 somewhere, so the closed-form root does not exist; "
                "linear_operator's generic root (dense Cholesky up to max_cholesky_size, Lanczos beyond) is used.",
                ClosedFormFallbackWarning,
                stacklevel=2,
            )
            return super().root_decomposition(method=method)
        if self.diag_kind == "positive":
            return _RootProduct(self._square_root())
        if self.diag_kind == "zero" and self.q <= self.shape[-1]:
            return _RootProduct(_PosteriorRoot(self))
        root, size = self._n_column_root()
        if root is not None:
            return _RootProduct(root)
        _check_weight_size(self.M, "a root")  # Y past the limit too: a ValueError now, not a shape error in rsample
        warnings.warn(
            f"root_decomposition of the posterior covariance at the training inputs: an n x n root needs a "
            f"{size} x {size} factorisation here, more than "
            f"bma_gp.settings.max_capacitance_size = {settings.max_capacitance_size.value()}, so the root has "
            f"n + q = {self.shape[-1] + self.q} columns and rsample(base_samples=...) needs base samples of that "
            "size (last dimension n + q) instead of n. Draw without base_samples (closed form), or raise the limit "
            f"with `with bma_gp.settings.max_capacitance_size({size}):`.",
            ClosedFormFallbackWarning,
            stacklevel=2,
        )
        return _RootProduct(_PosteriorRoot(self))

    def _square_root(self) -> _SquareRoot:
        """The square root (:class:`_SquareRoot`; :math:`s > 0` everywhere)."""
        core = getattr(self, "_square_core", None)
        if core is None or self._graphless(core):
            core = self._square_root_core()
            if not core.requires_grad:  # kept for the next draw; one with a graph is rebuilt per call
                self._square_core = core
        return _SquareRoot(self, core)

    def _n_column_root(self) -> tuple[_Root | None, int]:
        r"""A root with ``n`` columns (GPyTorch's ``rsample(base_samples=...)`` takes ``n`` base samples per draw)
        where :math:`s` is not at least an added noise: the square root (:class:`_SquareRoot`) when no ratio
        :math:`s_a / d_a` (:math:`d` the posterior variance) is below ``_SPLIT_THRESHOLD`` times the largest, else
        :class:`_SplitRoot`, which handles the ``z`` points below it by one QR factorisation of size ``(q + z) x z``
        (:math:`s` is 0 where a training input is an inducing point, and the square root's Gram matrix loses digits
        in proportion to the spread of :math:`d / s`). There :math:`s` is raised to ``eps`` times the variance (its
        rounding), so that the factorisation has a finite derivative. Also returns ``q + z``; the root is None when
        that passes ``max_capacitance_size``."""
        n, q = self.shape[-1], self.q
        small = getattr(self, "_split_rows", None)  # the values decide, not the graph: kept in every case
        if small is None:
            if self.diag_kind == "zero":
                small = torch.ones(n, dtype=torch.bool, device=self.device)
            else:
                with torch.no_grad():
                    d = self._working_diagonal().to(self.s.dtype)
                    ratio = torch.where(d > 0, self.s / torch.where(d > 0, d, torch.ones_like(d)), 0)
                    small = (ratio <= _SPLIT_THRESHOLD * ratio.amax(-1, keepdim=True)).reshape(-1, n).any(0)
            self._split_rows = small
        rows = small.nonzero().squeeze(-1)  # one set of rows for every batch entry
        z = rows.numel()
        if z == 0:
            return self._square_root(), q
        if z == n and q <= n:  # s = 0 everywhere (a zero diagonal added to it): [V, 0] is square already
            zero = TrainingPosteriorLinearOperator(
                self.s, self.beta, self.M, H=self._h, diag_kind="zero", Y=self._y, output_dtype=self._output_dtype
            )
            return _PosteriorRoot(zero), q
        if q + z > settings.max_capacitance_size.value():
            return None, q + z
        kept = getattr(self, "_split_kept", None)
        if kept is not None and not self._graphless(kept[1]):
            return _SplitRoot(self, *kept), q + z
        wdt = self.s.dtype
        V0 = self.beta.index_select(-1, rows).unsqueeze(-1) * (_z_rows(self.M, rows) @ self.Y)  # (*batch, z, q)
        # s at least eps times the variance there (the rounding of SGPR's correction, which is clamped at 0), so that
        # [V0, diag(sqrt s0)] has full rank and its QR factorisation a finite derivative where V0's rows repeat
        with torch.no_grad():
            floor = torch.finfo(wdt).eps * self._working_diagonal().to(wdt).index_select(-1, rows)
        s0 = torch.maximum(self.s.index_select(-1, rows), floor)
        Q0, T0 = torch.linalg.qr(torch.cat([V0.mT, torch.diag_embed(s0.sqrt())], dim=-2))  # [V0, diag(sqrt s0)]^T
        Qq, Qd = Q0[..., :q, :], Q0[..., q:, :]  # T0^T T0 = V0 V0^T + diag(s0)
        eye = torch.eye(q, dtype=wdt, device=self.device)
        Pi = torch.cat([eye - Qq @ Qq.mT, -Qq @ Qd.mT], dim=-1)  # [I, 0] (I - Q0 Q0^T): (*batch, q, q + z)
        if z < n:
            gram = self.Y.mT @ self._scaled_gram(~small) @ self.Y
            E = Pi.mT @ gram @ Pi
            K = symmetric_matrix_function(
                0.5 * (E + E.mT), lambda x: 1 / ((1 + x).sqrt() + 1), lambda x: x.clamp_min(0)
            )
            core = Pi @ K @ Pi.mT
        else:  # every row is in the QR block
            core = torch.zeros(*Pi.shape[:-2], q, q, dtype=wdt, device=self.device)
        kept = (rows, T0, Qq, core)
        if not T0.requires_grad:  # kept for the next draw; one with a graph is rebuilt per call
            self._split_kept = kept
        return _SplitRoot(self, *kept), q + z

    def zero_mean_mvn_samples(self, num_samples: int) -> Tensor:
        r"""Draws from :math:`N(0, S)` by conditioning prior draws (Matheron's rule): no ``q x q`` factorisation.

        :math:`H = L (I + L^\top A L)^{-1} L^\top` is the posterior covariance of the coefficients :math:`u` in
        :math:`r = Z u + e`, :math:`u \sim N(0, G)`, :math:`e \sim N(0, D)` (:math:`D` the diagonal of the noisy
        training covariance ``M``, so :math:`M = D + Z G Z^\top`). Hence
        :math:`h = u - C^{-1} G Z^\top D^{-1} (Z u + e) \sim N(0, H)`, one closed-form solve with ``M``'s own
        capacitance (:meth:`~bma_gp.BlockMeanSumLinearOperator._woodbury`), and
        :math:`\operatorname{diag}(\sqrt{s})\, \varepsilon + \operatorname{diag}(\beta) Z h \sim N(0, S)`, exactly.
        :math:`u = L \varepsilon'` needs a root of each block only (elementwise for a grouping's variances).
        ``rsample(base_samples=...)`` goes through :meth:`root_decomposition` instead (its columns must match the
        base samples), and ``ciq_samples`` is not needed. Returns # shape: (num_samples, *batch, n)"""
        n, q = self.shape[-1], sum(self.M._sizes())
        if self.psd:
            noise = torch.randn(*self.batch_shape, q + 2 * n, num_samples, dtype=self.s.dtype, device=self.device)
            draws = self._pathwise(noise)
        else:
            prior_root = self._prior_root()
            if prior_root is None:  # warned; linear_operator's generic root
                return super().zero_mean_mvn_samples(num_samples)
            columns = prior_root.shape[-1] + 2 * n
            noise = torch.randn(*self.batch_shape, columns, num_samples, dtype=self.s.dtype, device=self.device)
            draws = self._function_space_pathwise(noise, prior_root)
        return draws.permute(-1, *range(draws.dim() - 1)).contiguous().to(self.dtype)

    def _prior_root(self) -> LinearOperator | None:
        r"""A root of the prior :math:`K = M - \operatorname{diag}(\nu)` at the training inputs (:math:`\nu = \beta
        d_M` the likelihood's noise, :math:`d_M` the diagonal of ``M``), in closed form from its Gram matrix
        (:meth:`~bma_gp.BlockMeanSumLinearOperator.root_decomposition`; an indefinite :math:`B_j` is fine there). None,
        with a :class:`~bma_gp.ClosedFormFallbackWarning`, when it has none: a prior diagonal that is 0 at some points
        and not at others, or a prior that is not positive definite."""
        kept = getattr(self, "_prior_root_kept", None)
        if kept is not None and not self.M._differentiable():
            return kept
        M = self.M
        d = M.diag_values.to(self.s.dtype)
        prior = M._new(diag=((1 - self.beta) * d).to(M.dtype))
        try:
            root = prior.root_decomposition().root
        except ValueError as error:
            warnings.warn(
                "draws from the posterior at the training inputs: a block matrix B_j of the prior is indefinite, so "
                f"they need a root of the prior, which has none in closed form ({error}); linear_operator's generic "
                "root (dense Cholesky up to max_cholesky_size, Lanczos beyond) is used.",
                ClosedFormFallbackWarning,
                stacklevel=3,
            )
            return None
        if not self.M._differentiable():  # kept for the next draw; one with a graph is rebuilt per call
            self._prior_root_kept = root
        return root

    def _function_space_pathwise(self, noise: Tensor, prior_root: LinearOperator) -> Tensor:
        r"""Matheron's rule with prior draws of the function instead of the coefficients (an indefinite :math:`B_j`
        has no coefficient draws): with :math:`f = R_K \varepsilon \sim N(0, K)` and :math:`e \sim N(0,
        \operatorname{diag}(\nu))`, :math:`f - K M^{-1}(f + e) = \nu \odot M^{-1}(f + e) - e` has covariance
        :math:`K - K M^{-1} K`, the posterior's; a diagonal added to this operator since (its :math:`s` beyond
        :math:`\nu c / d_M`) adds independent draws. ``noise`` rows: ``R_K``'s columns, then ``n``, then ``n``.
        # shape: (*batch, p + 2n, t) -> (*batch, n, t)"""
        M, wdt = self.M, self.s.dtype
        n = self.shape[-1]
        d = M.diag_values.to(wdt)
        nu = self.beta * d
        extra = (self.s - nu * (1 - self.beta)).clamp_min(0)  # what add_diagonal put on top of the posterior
        noise = noise.to(wdt)
        eps_f, eps_e, eps_s = noise.split([noise.shape[-2] - 2 * n, n, n], dim=-2)
        f = prior_root.matmul(eps_f).to(wdt)  # the roots apply in the working precision and keep it
        e = nu.sqrt().unsqueeze(-1) * eps_e
        scaled, _, x = M._woodbury(f + e)  # M^{-1} b = D^{-1} b - D^{-1} Z x, in the working precision
        solved = scaled - M._z(x) / d.unsqueeze(-1)
        return nu.unsqueeze(-1) * solved - e + extra.sqrt().unsqueeze(-1) * eps_s

    def _pathwise(self, noise: Tensor) -> Tensor:
        """The linear map of :meth:`zero_mean_mvn_samples` applied to standard normal ``noise`` (its rows: the ``q``
        coefficients' draws, then the ``n`` data noise draws, then the ``n`` draws of the diagonal), in the working
        precision. # shape: (*batch, q + 2n, t) -> (*batch, n, t)"""
        M, wdt = self.M, self.s.dtype
        n, sizes = self.shape[-1], M._sizes()
        roots: list[Tensor | None] = [_root_of_block(M, j, wdt) for j in range(len(M.partitions))]
        if M.root is not None:
            roots.append(None)
        noise = noise.to(wdt)
        eps_u, eps_e, eps_s = noise.split([sum(sizes), n, n], dim=-2)
        u = [_left(L, piece) for L, piece in zip(roots, eps_u.split(sizes, dim=-2))]
        _, _, x = M._woodbury(M._z(u) + M.diag_values.to(wdt).sqrt().unsqueeze(-1) * eps_e)
        h = [u_j - x_j for u_j, x_j in zip(u, x)]
        positive = self.s > 0
        sqrt_s = torch.where(positive, torch.where(positive, self.s, torch.ones_like(self.s)).sqrt(), 0)
        return sqrt_s.unsqueeze(-1) * eps_s + self.beta.unsqueeze(-1) * M._z(h)

    def _scaled_gram(self, keep: Tensor | None = None) -> Tensor:
        r""":math:`Z^\top \operatorname{diag}(\beta^2 / s) Z`, ``q x q``, in the working precision; with ``keep``
        (a mask over the rows), of those rows only."""
        M = self.M
        wdt = self.s.dtype
        blocks = [B.to(wdt) for B in M.blocks]  # not used by the Gram matrix; only their shapes are checked
        diag = self.s / self.beta.pow(2)
        if keep is not None:  # 1 / inf = 0: the other rows add nothing
            diag = torch.where(keep, diag, torch.full_like(diag, math.inf))
        aux = BlockMeanSumLinearOperator(
            diag,
            *blocks,
            partitions=M.partitions,
            root=None if M.root is None else M.root.to(wdt),
            weights=M.weights,
        )
        return _scaled_gram(aux, [None] * len(M._sizes()))

    def _gram_square_root_core(self) -> Tensor:
        r""":math:`X` with :math:`S^{1/2} = \operatorname{diag}(\sqrt{s}) + \operatorname{diag}(\beta) Z X Z^\top
        \operatorname{diag}(\beta / \sqrt{s})` when :math:`H` has no root (an indefinite :math:`B_j`): with
        :math:`Y = \operatorname{diag}(\beta / \sqrt{s}) Z`, :math:`S = \operatorname{diag}(\sqrt{s})(I + Y H
        Y^\top)\operatorname{diag}(\sqrt{s})`, and :func:`~bma_gp.block_mean_sum_linear_operator.gram_root_core`
        gives :math:`I + Y X Y^\top = (I + Y H Y^\top)^{1/2}` from :math:`Y^\top Y` and the formed :math:`H`."""
        _check_weight_size(self.M, "a root")
        # S is positive semidefinite by construction (a conditional covariance), but H = C^{-1} G comes from solves
        # with M, whose condition multiplies their rounding: an eigenvalue of I + Y H Y^T that is 0 in exact
        # arithmetic (a prior of lower rank than n) came out -7e-10, -4e-8 and -3.5e-7 in float64 at noise 1e-3,
        # 1e-5 and 1e-7 (n = 100, a block mean and a group kernel), -3.6e-5 in float32 at noise 1e-2. The band is
        # that rounding: 10 q eps (of M's dtype where it is narrower) times an estimate of M's condition.
        q = self.H.shape[-1]
        eps = max(torch.finfo(self.H.dtype).eps, torch.finfo(self.M.dtype).eps)  # a float32 M's entries carry its
        band = 10 * q * eps * _condition_estimate(self.M)
        return gram_root_core(
            self._scaled_gram(), self.H, "root", "the posterior covariance at the training inputs", self.M.dtype, band
        )

    def _square_root_core(self) -> Tensor:
        r""":math:`K = h(Y^\top A' Y)` with :math:`A' = Z^\top \operatorname{diag}(\beta^2 / s) Z`."""
        E = self.Y.mT @ self._scaled_gram() @ self.Y
        return symmetric_matrix_function(0.5 * (E + E.mT), lambda x: 1 / ((1 + x).sqrt() + 1), lambda x: x.clamp_min(0))

    def __repr__(self) -> str:
        return (
            f"TrainingPosteriorLinearOperator(shape={tuple(self.shape)}, q={self.q}, "
            f"diagonal={self.diag_kind}, dtype={self.dtype}, device={self.device})"
        )


def _quadratic_diagonal(
    M: BlockMeanSumLinearOperator, H: Tensor, sizes: list[int], terms: list[int] | None = None
) -> Tensor:
    r""":math:`z_a^\top H z_a` for every row :math:`z_a` of :math:`Z`, in ``H``'s precision; with ``terms``, of the
    columns of those terms of ``M`` only (``H`` ordered as they are, the root's index is ``J``). # shape: (*batch, n)"""
    wdt = H.dtype
    J = len(M.partitions)
    terms = list(range(len(sizes))) if terms is None else terms
    offsets = {}
    total = 0
    for t in terms:
        offsets[t] = total
        total += sizes[t]

    def block(i: int, j: int) -> Tensor:
        return H[..., offsets[i] : offsets[i] + sizes[i], offsets[j] : offsets[j] + sizes[j]]

    weights = [None if w is None else w.to(wdt) for w in M.weights]
    n = M.shape[-1]
    out = torch.zeros(*H.shape[:-2], n, dtype=wdt, device=H.device)
    groupings = [t for t in terms if t < J]
    for a, i in enumerate(groupings):
        li, ki = M.partitions[i].labels, sizes[i]
        for j in groupings[a:]:
            lj, kj = M.partitions[j].labels, sizes[j]
            values = block(i, j).reshape(*H.shape[:-2], ki * kj).index_select(-1, li * kj + lj)
            for w in (weights[i], weights[j]):
                if w is not None:
                    values = values * w
            out = out + (values if i == j else 2 * values)
    if M.root is not None and J in terms:
        m = M.rank
        H_uu = block(J, J)
        cross = [block(i, J) for i in groupings]  # (*batch, k_i, m)
        rows = max(1024, _CHUNK_ELEMENTS // max(1, m))
        pieces = []
        for start in range(0, n, rows):
            c = min(rows, n - start)
            Uc = M.root.narrow(-2, start, c).to(wdt)
            T = Uc @ H_uu
            for i, X in zip(groupings, cross):
                g = 2 * X.index_select(-2, M.partitions[i].labels.narrow(0, start, c))
                w = weights[i]
                T = T + (g if w is None else g * w.narrow(0, start, c).unsqueeze(-1))
            pieces.append((T * Uc).sum(-1))
        out = out + torch.cat(pieces, dim=-1)
    return out


def _cross_row_dots(A_re, X: Tensor) -> Tensor:
    r""":math:`\sum_\rho X_{l \rho} (A_{er})_{l \rho}` for every eliminated level :math:`l`, with ``A_re`` the
    :class:`~bma_gp.block_mean_sum_linear_operator._CrossBlocks` (``r x k_e``, dense pieces or nonzero cells) and
    ``X`` # shape: (*batch, k_e, r) -> (*batch, k_e)"""
    out = None
    offset = 0
    for piece, size in zip(A_re.pieces, A_re.sizes):
        Xi = X[..., offset : offset + size]
        if torch.is_tensor(piece):
            term = (Xi * piece.mT).sum(-1)
        else:
            cells, values = piece
            prod = Xi.reshape(*Xi.shape[:-2], -1).index_select(-1, cells.col * size + cells.row) * values
            term = prod.new_zeros(*prod.shape[:-1], A_re.ke).index_add(-1, cells.col, prod)
        out = term if out is None else out + term
        offset += size
    assert out is not None
    return out


def _posterior_quadratic_diagonal(M: BlockMeanSumLinearOperator) -> Tensor | None:
    r""":math:`z_a^\top H z_a` for every row, :math:`H = C^{-1} G`, from the blocks of ``M``'s capacitance
    factorisation: no :math:`q \times q` matrix. None when ``M`` eliminates no grouping (then :math:`H` has the size of
    that factorisation and is formed).

    With the eliminated terms :math:`E` (one level :math:`l` per row, weights :math:`\omega_a`), the other terms
    :math:`r`, :math:`\Delta = I + G_E A_{EE}` (one ``r_e x r_e`` block per level), the Schur complement
    :math:`S_r` (LU-factorised), :math:`Q = S_r^{-1} G_r` and :math:`T = \Delta^{-1} G_E A_{Er}`, block elimination of
    :math:`C` gives :math:`H_{EE} = \Delta^{-1} G_E + T Q T^\top`, :math:`H_{Er} = -T Q` and :math:`H_{rr} = Q`, so

    .. math::
        z_a^\top H z_a = \omega_a^\top (\Delta^{-1} G_E + T Q T^\top)_l\, \omega_a
            - 2\, \omega_a^\top (T Q)_l\, z_{r}(a) + z_r(a)^\top Q\, z_r(a):

    the level blocks of :math:`T Q T^\top` (``k r_e^2``), gathers of :math:`T Q` (``k r_e x r``) and the rest's
    quadratic form with :math:`Q` (``r x r``, within ``max_capacitance_size`` as ``S_r`` is). # shape: (*batch, n)"""
    cap = M._capacitance()
    sizes = M._sizes()
    J = len(M.partitions)
    wdt = core_dtype(M.dtype)
    if cap.joint is not None:
        E = list(cap.joint.terms)
        g, delta = cap.joint.g, cap.joint.delta  # (*b, k, r_e), (*b, k, r_e, r_e)
    elif cap.elim is not None:
        E = [cap.elim]
        assert cap.g is not None and cap.delta is not None
        g, delta = cap.g.unsqueeze(-1), cap.delta.unsqueeze(-1).unsqueeze(-1)
    else:
        return None
    rest = [t for t in range(len(sizes)) if t not in E]
    labels, k, re = M.partitions[E[0]].labels, sizes[E[0]], len(E)
    n = M.shape[-1]
    ones = torch.ones(n, dtype=wdt, device=M.device)
    omega = torch.stack([ones if (w := M.weights[e]) is None else w.to(wdt) for e in E], -1)  # (n, r_e)
    P = torch.linalg.solve(delta, torch.diag_embed(g)) if re > 1 else g.unsqueeze(-1) / delta  # Delta^-1 G_E
    if rest:
        R = sum(sizes[t] for t in rest)
        assert cap.lu is not None
        G_r = M._apply_G_rest(rest, torch.eye(R, dtype=wdt, device=M.device).expand(*M.batch_shape, R, R))
        Q = _LUSolve.apply(*cap.lu, G_r)
        Q = 0.5 * (Q + Q.mT)
        joint_cells = None
        if not M.batch_shape and cap.joint is not None and cap.joint.formed is None and cap.joint.cross is not None:
            all_levels = torch.arange(k, device=M.device)
            joint_cells = _LevelRows.from_joint_cells(cap.joint.cross, all_levels, wdt)
        if joint_cells is not None:  # A_rE held as its tables' cells: nothing k x r_e x R formed
            return _joint_cells_quadratic_diagonal(M, joint_cells, P, Q, labels, omega, rest)
        if cap.joint is not None:
            assert cap.joint.A_rE is not None
            T = torch.linalg.solve(delta, g.unsqueeze(-1) * cap.joint.A_rE.movedim(-3, -1))  # (*b, k, r_e, R)
            TQ = T @ Q.unsqueeze(-3)
            P = P + TQ @ T.mT
        else:
            assert cap.A_re is not None and cap.g is not None and cap.delta is not None
            c = cap.g / cap.delta  # (*b, k)
            AQ = cap.A_re.t_matmul(Q)  # A_Er Q: (*b, k, R)
            TQ = (c.unsqueeze(-1) * AQ).unsqueeze(-2)  # (*b, k, 1, R)
            P = P + (c * c * _cross_row_dots(cap.A_re, AQ)).unsqueeze(-1).unsqueeze(-1)
    # the eliminated terms' own block, level by level
    P_rows = P.index_select(-3, labels)  # (*b, n, r_e, r_e)
    out = (omega.unsqueeze(-1) * P_rows * omega.unsqueeze(-2)).sum((-2, -1))
    if not rest:
        return out
    # -2 omega^T (T Q)_l z_r(a): one entry of T Q per rest grouping and eliminated term, a row piece for the root
    batch = TQ.shape[:-3]
    flat = TQ.reshape(*batch, k * re * R)
    offset = 0
    cross = torch.zeros(*batch, n, dtype=wdt, device=M.device)
    for t in rest:
        if t < J:
            lt, wt = M.partitions[t].labels, M.weights[t]
            for e in range(re):
                vals = flat.index_select(-1, (labels * re + e) * R + offset + lt) * omega[:, e]
                cross = cross + (vals if wt is None else vals * wt.to(wdt))
        else:
            m, root = sizes[t], M.root
            assert root is not None
            rows = max(1024, _CHUNK_ELEMENTS // max(1, m * re))
            pieces = []
            for start in range(0, n, rows):
                cnt = min(rows, n - start)
                Uc = root.narrow(-2, start, cnt).to(wdt)  # (*b, c, m)
                X = TQ[..., offset : offset + m].index_select(-3, labels.narrow(0, start, cnt))  # (*b, c, r_e, m)
                pieces.append(((X * Uc.unsqueeze(-2)).sum(-1) * omega.narrow(0, start, cnt)).sum(-1))
            cross = cross + torch.cat(pieces, dim=-1)
        offset += sizes[t]
    return out - 2 * cross + _quadratic_diagonal(M, Q, sizes, terms=rest)


def _joint_cells_quadratic_diagonal(
    M: BlockMeanSumLinearOperator, rows: _LevelRows, P: Tensor, Q: Tensor, labels: Tensor, omega: Tensor, rest: list
) -> Tensor:
    r""":func:`_posterior_quadratic_diagonal` for a joint elimination whose other terms are groupings with sparse
    tables (``rows``: :math:`A_{Er}` at every level, from the cells), without :math:`T` or :math:`T Q`
    (``k x r_e x R`` each: 1.9 GB at 60,000 users with a correlated slope against 2,000 items). With
    :math:`T_l = \Delta_l^{-1} G_l A_l` (``P`` holds :math:`\Delta^{-1} G_E`), the level blocks
    :math:`(T Q T^	op)_l = P_l (A_l Q A_l^	op) P_l^	op` take :math:`A_l Q` a chunk of levels at a time
    (:meth:`_LevelRows.product`) and :meth:`_LevelRows.level_forms`, and the cross term's entries
    :math:`(T Q)_l[e, c] = P_l (A_l Q)[:, c]` at each row's column are gathered from the level's nonzeros
    (:meth:`_LevelRows.gathered_products`). # shape: (n,)"""
    k, re, R = rows.shape
    S = Q.new_zeros(k, re, re)
    size = max(1, _DIAG_CHUNK // max(1, re * R))
    for start in range(0, k, size):
        stop = min(k, start + size)
        S[start:stop] = rows.product_and_forms(start, stop, Q)[1]
    H = P + P @ S @ P.mT  # (k, r_e, r_e): Delta^-1 G_E + T Q T^T, level by level
    P_rows = H.index_select(-3, labels)  # (n, r_e, r_e)
    out = (omega.unsqueeze(-1) * P_rows * omega.unsqueeze(-2)).sum((-2, -1))
    cross = torch.zeros_like(out)
    offset = 0
    for t in rest:
        lt, wt = M.partitions[t].labels, M.weights[t]
        AQ_rows = rows.gathered_products(Q, labels, offset + lt)  # (n, r_e): (A_l Q)[:, c_a]
        vals = ((P.index_select(-3, labels) @ AQ_rows.unsqueeze(-1)).squeeze(-1) * omega).sum(-1)  # omega^T (T Q)
        cross = cross + (vals if wt is None else vals * wt.to(out.dtype))
        offset += M._sizes()[t]
    return out - 2 * cross + _quadratic_diagonal(M, Q, M._sizes(), terms=rest)


class _Root(ByProducts):
    """A root of a :class:`TrainingPosteriorLinearOperator`, applied without forming it (``transposed``: its
    transpose)."""

    def __init__(self, parent: TrainingPosteriorLinearOperator, *tensors: Tensor, transposed: bool = False):
        super().__init__(parent, *tensors, transposed=transposed)
        self.parent = parent
        self.transposed = transposed
        s = parent.s
        positive = s > 0
        # sqrt(s) with a zero (not an infinite) derivative where s vanishes
        self.sqrt_s = torch.where(positive, torch.where(positive, s, torch.ones_like(s)).sqrt(), 0)

    def _columns(self) -> int:
        raise NotImplementedError

    def _size(self) -> torch.Size:
        n, cols = self.parent.shape[-1], self._columns()
        shape = (cols, n) if self.transposed else (n, cols)
        return torch.Size((*self.parent.batch_shape, *shape))

    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _backward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _matmul(self, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 1
        x = rhs.unsqueeze(-1) if vector else rhs
        x = x.to(self.parent.s.dtype)
        res = self._backward(x) if self.transposed else self._forward(x)
        res = res.to(torch.promote_types(rhs.dtype, self.dtype))
        return res.squeeze(-1) if vector else res


class _RootProduct(RootLinearOperator):
    """:math:`R R^\top` for a root :math:`R` of a :class:`TrainingPosteriorLinearOperator` (what its
    :meth:`~TrainingPosteriorLinearOperator.root_decomposition` returns): the posterior covariance, whose diagonal is
    the posterior's closed form, not a sum over the ``n x n`` entries of :math:`R` (linear_operator's default)."""

    def _diagonal(self) -> Tensor:
        root = self.root
        if isinstance(root, _Root) and not root.transposed:
            return root.parent._diagonal()
        return super()._diagonal()


def _stack(head: Tensor, tail: Tensor) -> Tensor:
    batch = torch.broadcast_shapes(head.shape[:-2], tail.shape[:-2])
    return torch.cat([head.expand(*batch, *head.shape[-2:]), tail.expand(*batch, *tail.shape[-2:])], dim=-2)


class _PosteriorRoot(_Root):
    r""":math:`[V, 0]` (``n x max(n, q)``) when :math:`s = 0`, else :math:`[\operatorname{diag}(\sqrt{s}), V]`
    (``n x (n + q)``)."""

    def _columns(self) -> int:
        n, q = self.parent.shape[-1], self.parent.q
        return max(n, q) if self.parent.diag_kind == "zero" else n + q

    def _transpose_nonbatch(self) -> _PosteriorRoot:
        return _PosteriorRoot(self.parent, transposed=not self.transposed)

    def _expand_batch(self, batch_shape) -> _PosteriorRoot:
        return _PosteriorRoot(self.parent._expand_batch(batch_shape), transposed=self.transposed)

    def _forward(self, x: Tensor) -> Tensor:
        n, q = self.parent.shape[-1], self.parent.q
        if self.parent.diag_kind == "zero":
            return self.parent._v(x.narrow(-2, 0, q))  # the padding columns are zero
        head, tail = x.narrow(-2, 0, n), x.narrow(-2, n, q)
        return self.sqrt_s.unsqueeze(-1) * head + self.parent._v(tail)

    def _backward(self, x: Tensor) -> Tensor:
        n, q = self.parent.shape[-1], self.parent.q
        tail = self.parent._v_t(x)
        if self.parent.diag_kind == "zero":
            if q >= n:
                return tail
            return _stack(tail, tail.new_zeros(1).expand(*tail.shape[:-2], n - q, tail.shape[-1]))
        return _stack(self.sqrt_s.unsqueeze(-1) * x, tail)


class _SquareRoot(_Root):
    r""":math:`R = \operatorname{diag}(\sqrt{s}) + V K V^\top \operatorname{diag}(1/\sqrt{s})` for :math:`s > 0`:
    :math:`R R^\top = \operatorname{diag}(s) + V V^\top` when :math:`K = h(V^\top \operatorname{diag}(1/s) V)`."""

    def __init__(self, parent: TrainingPosteriorLinearOperator, K: Tensor, transposed: bool = False):
        super().__init__(parent, K, transposed=transposed)
        self.K = K

    def _columns(self) -> int:
        return self.parent.shape[-1]

    def _transpose_nonbatch(self) -> _SquareRoot:
        return type(self)(self.parent, self.K, transposed=not self.transposed)

    def _expand_batch(self, batch_shape) -> _SquareRoot:
        q = self.K.shape[-1]
        return type(self)(
            self.parent._expand_batch(batch_shape), self.K.expand(*batch_shape, q, q), transposed=self.transposed
        )

    def _forward(self, x: Tensor) -> Tensor:
        r = self.sqrt_s.unsqueeze(-1)
        return r * x + self.parent._v(self.K @ self.parent._v_t(x / r))

    def _backward(self, x: Tensor) -> Tensor:
        r = self.sqrt_s.unsqueeze(-1)
        return r * x + self.parent._v(self.K @ self.parent._v_t(x)) / r


class _SplitRoot(_Root):
    r"""An ``n x n`` root of :math:`S = \operatorname{diag}(s) + V V^\top` that treats the ``z`` rows ``rows`` (where
    :math:`s` is 0 or nearly so) apart: with :math:`[V_0, \operatorname{diag}(\sqrt{s_0})]^\top = Q_0 T_0` (QR,
    :math:`Q_0 = [Q_q; Q_d]`), those rows of :math:`R` are :math:`T_0^\top` in the columns ``rows`` and 0 elsewhere,
    and the other rows are :math:`V_+ Q_q` in the columns ``rows`` and the square root
    :math:`\operatorname{diag}(\sqrt{s_+}) + V_+ K' V_+^\top \operatorname{diag}(1/\sqrt{s_+})` of the rest,
    :math:`\operatorname{diag}(s_+) + V_+ (I - Q_q Q_q^\top) V_+^\top`, in their own columns
    (:math:`K' = \Pi h(\Pi^\top V_+^\top \operatorname{diag}(1/s_+) V_+ \Pi) \Pi^\top`,
    :math:`\Pi = [I - Q_q Q_q^\top, -Q_q Q_d^\top]`). :math:`R R^\top = S` block by block: :math:`T_0^\top T_0 = V_0
    V_0^\top + \operatorname{diag}(s_0)`, :math:`V_+ Q_q T_0 = V_+ V_0^\top`, and the two pieces of the last block
    add up to :math:`\operatorname{diag}(s_+) + V_+ V_+^\top`."""

    def __init__(
        self,
        parent: TrainingPosteriorLinearOperator,
        rows: Tensor,
        T0: Tensor,
        Qq: Tensor,
        core: Tensor,
        transposed: bool = False,
    ):
        super().__init__(parent, rows, T0, Qq, core, transposed=transposed)
        self.rows, self.T0, self.Qq, self.core = rows, T0, Qq, core
        keep = torch.ones_like(parent.s, dtype=torch.bool).index_fill(-1, rows, False)
        self.keep = keep.to(parent.s.dtype)
        self.sqrt_s = self.sqrt_s * self.keep
        self.inv_sqrt_s = torch.where(keep, 1 / torch.where(keep, self.sqrt_s, torch.ones_like(self.sqrt_s)), 0)

    def _columns(self) -> int:
        return self.parent.shape[-1]

    def _transpose_nonbatch(self) -> _SplitRoot:
        return _SplitRoot(self.parent, self.rows, self.T0, self.Qq, self.core, transposed=not self.transposed)

    def _expand_batch(self, batch_shape) -> _SplitRoot:
        z, q = self.T0.shape[-1], self.Qq.shape[-2]
        return _SplitRoot(
            self.parent._expand_batch(batch_shape),
            self.rows,
            self.T0.expand(*batch_shape, z, z),
            self.Qq.expand(*batch_shape, q, z),
            self.core.expand(*batch_shape, q, q),
            transposed=self.transposed,
        )

    def _forward(self, x: Tensor) -> Tensor:
        p = self.parent
        x0 = x.index_select(-2, self.rows)
        coef = self.Qq @ x0 + self.core @ p._v_t(self.inv_sqrt_s.unsqueeze(-1) * x)
        out = self.keep.unsqueeze(-1) * (self.sqrt_s.unsqueeze(-1) * x + p._v(coef))
        return out.index_add(-2, self.rows, (self.T0.mT @ x0).expand(*out.shape[:-2], *x0.shape[-2:]))

    def _backward(self, x: Tensor) -> Tensor:
        p = self.parent
        u = p._v_t(self.keep.unsqueeze(-1) * x)
        out = self.sqrt_s.unsqueeze(-1) * x + self.inv_sqrt_s.unsqueeze(-1) * p._v(self.core @ u)
        head = self.T0 @ x.index_select(-2, self.rows) + self.Qq.mT @ u
        out = out.expand(*head.shape[:-2], *out.shape[-2:])
        return out.index_add(-2, self.rows, head)


class _GramSquareRoot(_SquareRoot):
    r""":math:`R = \operatorname{diag}(\sqrt{s}) + \operatorname{diag}(\beta) Z X Z^\top
    \operatorname{diag}(\beta / \sqrt{s})` (:meth:`TrainingPosteriorLinearOperator._gram_square_root_core`, held as
    ``K``), the square root when :math:`H` has no root: :class:`_SquareRoot` with :math:`Y` the identity."""

    def _zxz(self, x: Tensor) -> Tensor:
        r""":math:`\operatorname{diag}(\beta) Z X Z^\top \operatorname{diag}(\beta) x`."""
        M, beta = self.parent.M, self.parent.beta.unsqueeze(-1)
        u = torch.cat(M._z_t(beta * x), dim=-2)
        return beta * M._z(list((self.K @ u).split(M._sizes(), dim=-2)))

    def _forward(self, x: Tensor) -> Tensor:
        r = self.sqrt_s.unsqueeze(-1)
        return r * x + self._zxz(x / r)

    def _backward(self, x: Tensor) -> Tensor:
        r = self.sqrt_s.unsqueeze(-1)
        return r * x + self._zxz(x) / r


# ---------------------------------------------------------------------------- the hook
def _hook(cls, kernel_strategy, applies) -> None:
    """Make ``cls.prediction_strategy`` return ``kernel_strategy(kernel, ...)`` for kernels with ``applies(kernel)``,
    and what it returned before for every other kernel (idempotent)."""
    from gpytorch.kernels import Kernel

    original = cls.__dict__.get("prediction_strategy", Kernel.prediction_strategy)
    if hasattr(original, "_bma_gp_original"):
        return

    def prediction_strategy(self, train_inputs, train_prior_dist, train_labels, likelihood):
        if applies(self):
            return kernel_strategy(self, train_inputs, train_prior_dist, train_labels, likelihood)
        return original(self, train_inputs, train_prior_dist, train_labels, likelihood)

    prediction_strategy.__doc__ = original.__doc__
    prediction_strategy._bma_gp_original = original  # type: ignore[attr-defined]
    cls.prediction_strategy = prediction_strategy


def _closed_form_roots(kernel) -> bool:
    """What the package's strategy predicts in closed form without a grouping: a product (with a task factor), a sum of
    two or more inducing-point kernels, or inducing-point kernels plus GPyTorch ``ConstantKernel``s (each summand
    possibly in a ``ScaleKernel``, the sum too). A sum with an exact summand (``+ RBFKernel()``) keeps GPyTorch's
    strategy, whose solves of the fallback sum warn."""
    from gpytorch.kernels import AdditiveKernel, ConstantKernel, InducingPointKernel, ProductKernel, ScaleKernel

    if isinstance(kernel, ProductKernel):
        return True
    if not isinstance(kernel, AdditiveKernel):
        return False
    if sum(isinstance(m, InducingPointKernel) for m in kernel.modules()) >= 2:
        return True

    def leaves(k):
        while isinstance(k, ScaleKernel):
            k = k.base_kernel
        if isinstance(k, AdditiveKernel):
            return [leaf for part in k.kernels for leaf in leaves(part)]
        return [k]

    return all(isinstance(leaf, (InducingPointKernel, ConstantKernel)) for leaf in leaves(kernel))


def _sum_strategy(kernel, train_inputs, train_prior_dist, train_labels, likelihood) -> SumPredictionStrategy:
    strategy = SumPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)
    return record_bound_data(strategy, kernel)


def install() -> None:
    """Give kernels that contain a :class:`~bma_gp.GroupKernel` or :class:`~bma_gp.BlockMeanKernel` a prediction
    strategy that knows them (idempotent); every other kernel keeps GPyTorch's.

    * :class:`gpytorch.kernels.AdditiveKernel` (``k1 + k2``, also inside a ``ScaleKernel``) and
      :class:`gpytorch.kernels.ProductKernel` (``k1 * k2``; a product of block mean operators is one again):
      :class:`SumPredictionStrategy`;
    * every :class:`~gpytorch.models.ExactGP` records the data of the ``BlockMeanKernel`` among its modules on a
      strategy that did not (GPyTorch's default one: a ``MultitaskKernel`` around one, a Hadamard multitask model),
      :func:`bma_gp.kernels._bound_data.install`.

    Each strategy records the data of every ``BlockMeanKernel`` in the kernel
    (:func:`~bma_gp.kernels._bound_data.record_bound_data`), so that a cache built before ``set_partition`` or the
    kernel's ``set_train_data`` raises instead of combining old solves with the new kernel."""
    from gpytorch.kernels import AdditiveKernel, ProductKernel

    from bma_gp._composition import _involves_block_mean, _sums_inducing_points
    from bma_gp.kernels._bound_data import install as install_model_check

    def applies(kernel) -> bool:
        # also a sum or product of inducing-point kernels without a grouping (an additive SGPR, a multitask SGPR, an
        # SGPR plus ConstantKernels, scaled or not): GPyTorch's default strategy took the root_inv_decomposition of
        # their closed-form training covariance densely (n x n under fast_pred_var: +1.0 GB at n = 5,000 for an SGPR
        # plus a constant), or Lanczos of its Woodbury operator, and solved in float32 (variances 500x off)
        return _involves_block_mean(kernel) or (_sums_inducing_points(kernel) and _closed_form_roots(kernel))

    _hook(AdditiveKernel, _sum_strategy, applies)
    _hook(ProductKernel, _sum_strategy, applies)
    _hook_product_forward(ProductKernel)
    install_model_check()


def _hook_product_forward(cls) -> None:
    """Evaluate ``cls`` (GPyTorch's ``ProductKernel``) without the elementwise-product warning in eval mode when it
    contains a block mean kernel (idempotent).

    In eval mode a model evaluates the product between test points (``GroupKernel * BlockMeanKernel``: a block mean
    operator over the test ids times the base kernel's dense matrix), which prediction never solves with; it warned
    on every prediction. A training covariance that leaves the closed forms still warns in training, and in eval
    mode through the solves against it."""
    from bma_gp._composition import _involves_block_mean, block_mean_product

    original = cls.__dict__["forward"]
    if hasattr(original, "_bma_gp_original"):
        return

    @functools.wraps(original)
    def forward(self, x1, x2, diag=False, **params):
        if not (_involves_block_mean(self) or _inducing_factor(self)):
            return original(self, x1, x2, diag=diag, **params)
        with block_mean_product():  # c D times a factor: a dense product, not one of roots
            return product_forward(self, x1, x2, diag, params)

    def product_forward(self, x1, x2, diag, params):
        ordered = not diag and _block_mean_first(self.kernels) != list(self.kernels) and torch.equal(x1, x2)
        if self.training:
            return _ordered_product(self, x1, x2, params) if ordered else original(self, x1, x2, diag=diag, **params)
        if ordered:  # in eval mode as silent as GPyTorch's order below (a test-by-test covariance formed densely)
            with quiet_elementwise(), torch.sparse.check_sparse_tensor_invariants(enable=False):
                return _ordered_product(self, x1, x2, params)
        if not diag:
            cross = _product_cross(self, x1, x2, params)
            if cross is None:
                cross = _sum_product_cross(self, x1, x2, params)
            if cross is not None:
                return cross
        # GPyTorch's product densifies an IndexKernel's test-by-test covariance through a sparse tensor made without
        # an explicit invariant check, and torch's once-per-process warning about that would reach the user
        with quiet_elementwise(), torch.sparse.check_sparse_tensor_invariants(enable=False):
            return original(self, x1, x2, diag=diag, **params)

    forward._bma_gp_original = original  # type: ignore[attr-defined]
    cls.forward = forward


def _inducing_factor(kernel) -> bool:
    """Whether a product kernel has a ``ChunkedInducingPointKernel`` factor (in ``ScaleKernel``s or not): its product
    with a task kernel is a low-rank root (:func:`bma_gp._composition.root_times_block_mean`), and its prediction
    reads the cross covariance as that root's columns (:func:`_sum_product_cross`)."""
    from gpytorch.kernels import ScaleKernel

    from bma_gp.kernels.chunked_inducing_point_kernel import ChunkedInducingPointKernel

    for factor in kernel.kernels:
        while isinstance(factor, ScaleKernel):
            factor = factor.base_kernel
        if isinstance(factor, ChunkedInducingPointKernel):
            return True
    return False


def _block_mean_first(kernels) -> list:
    """A product's factors with those that involve a block mean or group kernel first (otherwise in their order): the
    elementwise product commutes, and a block mean operator multiplies an ``IndexKernel`` in closed form where two
    ``IndexKernel``'s multiplied first (``IndexKernel(i1) * IndexKernel(i2) * GroupKernel(g)``) gave linear_operator's
    product of their roots. The training covariance and the cross covariance (:func:`_product_cross`) number the
    intersection's blocks in this order."""
    from bma_gp._composition import _involves_block_mean

    kernels = list(kernels)
    return [k for k in kernels if _involves_block_mean(k)] + [k for k in kernels if not _involves_block_mean(k)]


def _ordered_product(kernel, x1: Tensor, x: Tensor, params: dict):
    """GPyTorch's ``ProductKernel.forward`` between equal inputs, its factors taken in :func:`_block_mean_first`'s
    order."""
    from linear_operator import to_linear_operator

    factors = _block_mean_first(kernel.kernels)
    result = to_linear_operator(factors[0](x1, x, **params))
    for factor in factors[1:]:
        result = result * to_linear_operator(factor(x1, x, **params))
    return result


def _product_cross(kernel, x1: Tensor, x2: Tensor, params: dict) -> BlockCrossLinearOperator | None:
    """The covariance of a product of block mean kernels between different inputs (new and training points) as a
    :class:`BlockCrossLinearOperator` over the intersection of the factors' partitions
    (:meth:`BlockCrossLinearOperator.hadamard`), or ``None`` (then GPyTorch's ``ProductKernel.forward``, which
    multiplies the factors' cross covariances as dense matrices). Applies when every factor is a ``GroupKernel``,
    ``BlockMeanKernel`` or GPyTorch ``IndexKernel`` (also inside a ``ScaleKernel``), at least one of them of this
    package, whose cross covariance is one; the prediction at new inputs then matches it with the training
    covariance's product, a block mean operator over the same intersection."""
    from gpytorch.kernels import IndexKernel, ProductKernel, ScaleKernel
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    from bma_gp._composition import _involves_block_mean
    from bma_gp.kernels.block_mean_kernel import BlockMeanKernel
    from bma_gp.kernels.group_kernel import GroupKernel

    def bare(k):
        while isinstance(k, ScaleKernel):
            k = k.base_kernel
        return k

    def qualifies(k) -> bool:  # a factor, or a product of them (ScaleKernel(GroupKernel * BlockMeanKernel))
        k = bare(k)
        if isinstance(k, ProductKernel):
            return all(qualifies(part) for part in k.kernels)
        return isinstance(k, (GroupKernel, BlockMeanKernel, IndexKernel))

    factors = [bare(k) for k in kernel.kernels]
    if not all(qualifies(k) for k in factors) or not any(_involves_block_mean(k) for k in factors):
        return None
    if x1.shape == x2.shape and torch.equal(x1, x2):
        return None
    crosses = []
    for factor in _block_mean_first(kernel.kernels):  # the training covariance's order
        cross = factor(x1, x2, **params)
        if isinstance(cross, LazyEvaluatedKernelTensor):
            cross = cross.evaluate_kernel()
        if not isinstance(cross, BlockCrossLinearOperator):
            # a group kernel whose test ids are the training ids, or an IndexKernel's C[i_test, i_train]
            cross = _block_mean_as_cross(cross) or _index_cross(cross)
            if cross is None:
                return None
        crosses.append(cross)
    result: BlockCrossLinearOperator | None = crosses[0]
    for cross in crosses[1:]:
        result = result.hadamard(cross) if result is not None else None
    return result


def _sum_product_cross(kernel, x1: Tensor, x2: Tensor, params: dict) -> LinearOperator | None:
    r"""The covariance between new and training points of a product of one sum of block mean kernels with
    ``GroupKernel`` / ``IndexKernel`` factors (``(BlockMeanKernel + GroupKernel) * IndexKernel``), as the columns of
    the training covariance's product (:meth:`BlockMeanSumLinearOperator._hadamard_block_mean`, numbered as
    :func:`~bma_gp.block_mean_sum_linear_operator.hadamard_plan` numbers them), so that the prediction at new inputs
    stays closed form; ``None`` where it does not apply (then GPyTorch's product of the cross covariances, densely).

    With the factors' product :math:`X = P_X C P_X^\top + \dots` at the training points (:math:`C = L L^\top`) and
    :math:`A_*` its cross covariance (``t x k_X``), the new point :math:`a` has :math:`C_{x_a x_b} = u_a^\top
    L_{x_b}` with :math:`u_a = L^{-1} A_{*a}` (any task id, seen in training or not). So a sum's term
    :math:`A_j P_j^\top W_j` times :math:`A_* P_X^\top` is :math:`\sum_\rho (\operatorname{diag}(u_{\cdot\rho})
    A_j) P_j^\top W_j \Lambda_\rho` (a diagonal term, the training covariance's weighted terms) or :math:`(A_j \circ
    A_*) P_{j \cap X}^\top W_j` (a term over the intersection), and a root's :math:`U_* U^\top` is
    :math:`R_* R^\top` with :math:`R_* = U_* \odot u` and :math:`R = U \odot L_{x}` row by row. Which form a term
    takes is read from its cross covariance (one-hot: a diagonal term, as a ``GroupKernel``'s intercept); where the
    training covariance chose otherwise the prediction does not match its columns and says so."""
    from gpytorch.kernels import AdditiveKernel, IndexKernel, ScaleKernel
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    from bma_gp._composition import _involves_block_mean
    from bma_gp.kernels.chunked_inducing_point_kernel import ChunkedInducingPointKernel
    from bma_gp.kernels.group_kernel import GroupKernel

    def bare(k):
        while isinstance(k, ScaleKernel):
            k = k.base_kernel
        return k

    if x1.shape == x2.shape and torch.equal(x1, x2):
        return None
    factors = _block_mean_first(kernel.kernels)
    sums = [
        f
        for f in factors
        if (isinstance(bare(f), AdditiveKernel) and _involves_block_mean(f))
        or isinstance(bare(f), ChunkedInducingPointKernel)
        # a random slope alone is a sum too (its weighted terms over one grouping): GroupKernel(slope=True) *
        # IndexKernel formed its t x n cross densely, and GPyTorch's K_*x alpha in float32 lost the means entirely
        or (isinstance(bare(f), GroupKernel) and bare(f).slope)
    ]

    def evaluated(op):
        return op.evaluate_kernel() if isinstance(op, LazyEvaluatedKernelTensor) else op

    if not sums:
        # a cross-group factor over many groups is a sum too (a diagonal term plus the root P W, past
        # FACTOR_DENSE_MAX_GROUPS), whose cross covariance is A P^T + W_rows (P W)^T; over fewer groups it is one
        # block cross covariance, which _product_cross took
        sums = [
            f
            for f in factors
            if isinstance(bare(f), GroupKernel)
            and bare(f).covar_factor is not None
            and not isinstance(evaluated(f(x1, x2, **params)), BlockCrossLinearOperator)
        ]
    others = [f for f in factors if not any(f is g for g in sums)]
    if len(sums) != 1 or not others or not all(isinstance(bare(f), (GroupKernel, IndexKernel)) for f in others):
        return None

    # the training points once: GPyTorch copies them across a batch of test sets, and the training covariance's
    # product (unbatched) splits its diagonal terms only by an unbatched task matrix
    x_train = x2
    while x_train.dim() > 2 and bool((x_train == x_train[:1]).all()):
        x_train = x_train[0]
    pieces: list[_Piece] | None = []
    assert pieces is not None
    if not _cross_pieces(evaluated(sums[0](x1, x2, **params)), pieces):
        return None
    # the training covariance holds one term per distinct unweighted partition (a BlockMeanKernel and a GroupKernel
    # over the same blocks add into one block mean matrix before the product): so do its columns here
    pieces = _merged_terms(pieces)
    for factor in others:  # in the training covariance's order: the sum times each factor in turn
        cross = evaluated(factor(x1, x2, **params))
        if not isinstance(cross, BlockCrossLinearOperator):
            cross = _block_mean_as_cross(cross) or _index_cross(cross)
        train = as_block_mean_factor(evaluated(factor(x_train, x_train, **params)))
        if cross is None or train is None or pieces is None:
            return None
        pieces = _times_block_mean(pieces, cross, train)
    if not pieces:
        return None
    out: list[LinearOperator] = []
    for piece in pieces:
        if piece[0] == "root":
            out.append(MatmulLinearOperator(DenseLinearOperator(piece[1]), DenseLinearOperator(piece[2])))
            continue
        _, values, partition, weight = piece
        term = (
            BlockCrossLinearOperator.one_hot(values.values, values.columns, partition)
            if isinstance(values, _OneHot)
            else BlockCrossLinearOperator(values, partition)
        )
        out.append(term if weight is None else MatmulLinearOperator(term, DiagLinearOperator(weight)))
    return out[0] if len(out) == 1 else SumLinearOperator(*out)


def _merged_terms(pieces: list[_Piece]) -> list[_Piece]:
    """The unweighted term pieces of a cross covariance over the same partition added into one, as the sum's
    training operator adds the block matrices of such terms into one term (``_composition._build``): a
    ``BlockMeanKernel`` and a ``GroupKernel`` over the same blocks (``(BlockMeanKernel + GroupKernel) * IndexKernel``)
    are one block mean matrix with a dense ``B`` at the training points, whose product with a task kernel is one term
    over the intersection of the partitions, not the intercept's diagonal terms weighted by the task factor."""
    out: list[_Piece] = []
    for piece in pieces:
        if piece[0] == "term" and piece[3] is None:
            for i, other in enumerate(out):
                if other[0] == "term" and other[3] is None and other[2].same_as(piece[2]):
                    a, b = other[1], piece[1]
                    if isinstance(a, _OneHot) and isinstance(b, _OneHot) and _same_columns(a, b):
                        values: Tensor | _OneHot = _OneHot(a.values + b.values, a.columns, a.k)
                    else:
                        values = _dense_block(a) + _dense_block(b)
                    out[i] = ("term", values, other[2], None)
                    break
            else:
                out.append(piece)
        else:
            out.append(piece)
    return out


def _times_block_mean(
    pieces: list[_Piece], cross_x: BlockCrossLinearOperator, train_x: BlockMeanLinearOperator
) -> list[_Piece] | None:
    """The pieces of a cross covariance of a sum (:func:`_cross_pieces`) times one factor's, numbered as
    :meth:`BlockMeanSumLinearOperator._hadamard_block_mean` numbers the training product's terms (see
    :func:`_sum_product_cross`); ``None`` where a piece has no such form."""
    if cross_x.transposed or not train_x.symmetric or cross_x.partition.num_blocks != train_x.partition.num_blocks:
        return None
    has_root = any(piece[0] == "root" for piece in pieces)
    diagonal = [piece[0] == "term" and _one_value_per_row(piece[1]) for piece in pieces]
    if len(pieces) == 1 and pieces[0][0] == "term" and pieces[0][3] is None:
        # the sum was one block mean matrix at the training points (two group kernels over the same ids), whose
        # product with the factor is one operator over the intersection of the partitions (its training form)
        diagonal = [False]
    labels_x = train_x.partition.labels
    L: Tensor | None = None
    as_weights = False
    if has_root or any(diagonal):
        diagonal_partitions = [piece[2] for piece, one_value in zip(pieces, diagonal) if one_value]
        plan = hadamard_plan(_RootAndDiagonals(has_root, diagonal_partitions), train_x)
        if plan is None:
            return None
        L, as_weights = plan
    rows_new = None
    if L is not None:  # u_a = L^{-1} A_*a for every new point: (*batch, t, k_X)
        values = _dense_block(_cross_values(cross_x))
        rows_new = torch.linalg.solve_triangular(L, values.to(L.dtype).mT, upper=False).mT
    out: list[_Piece] = []
    for piece, one_value in zip(pieces, diagonal):
        if piece[0] == "root":
            _, left, right = piece
            if L is None or rows_new is None:
                return None
            R = rows_times_root(right.mT, L.index_select(-2, labels_x))
            out.append(("root", rows_times_root(left, rows_new), R.mT))
            continue
        _, values, partition, weight = piece
        if one_value and as_weights:
            assert L is not None and rows_new is not None
            for rho in range(L.shape[-1]):
                u = rows_new[..., rho]
                scaled = (
                    _OneHot(values.values * u, values.columns, values.k)
                    if isinstance(values, _OneHot)
                    else values * u.unsqueeze(-1)
                )
                out.append(("term", scaled, partition, task_weight(L, labels_x, rho, weight)))
            continue
        term = (
            BlockCrossLinearOperator.one_hot(values.values, values.columns, partition)
            if isinstance(values, _OneHot)
            else BlockCrossLinearOperator(values, partition)
        )
        product = term.hadamard(cross_x)
        if product is None:
            return None
        out.append(("term", _cross_values(product), product.partition, weight))
    return out


def _one_value_per_row(values: Tensor | _OneHot) -> bool:
    """Whether a cross covariance's :math:`A` has at most one nonzero per row: a diagonal term's (a group kernel's
    intercept or slope, one-hot, or dense where a batch of test sets gives each entry its own columns; a constant's
    one column), which the training covariance's product splits into weighted terms."""
    if isinstance(values, _OneHot):
        return True
    return bool(((values != 0).sum(-1) <= 1).all())


class _RootAndDiagonals:
    """What :func:`~bma_gp.block_mean_sum_linear_operator.hadamard_plan` reads of a sum (whether it has a root, and
    the partitions of its diagonal terms), for :func:`_times_block_mean`, which knows them from the cross
    covariance's pieces."""

    def __init__(self, root: bool, diagonal_partitions: list[Partition]):
        self.root = object() if root else None
        self.partitions = diagonal_partitions
        self.diagonal_blocks = (True,) * len(diagonal_partitions)
