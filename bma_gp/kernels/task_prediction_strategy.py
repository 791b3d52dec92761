"""Exact prediction of a batch-independent multi-output model on block mean kernels, task by task.

GPyTorch's batch-independent multi-output model returns
``MultitaskMultivariateNormal.from_batch_mvn(MultivariateNormal(mean, covar))`` for a batch of ``T`` kernels: its
covariance is a ``BlockInterleavedLinearOperator`` over the batch, zero between tasks. With a
``MultitaskGaussianLikelihood`` of ``rank=0`` (a noise per task, none between them) the tasks are independent GPs,
and GPyTorch's ``DefaultPredictionStrategy`` (the one it picks for any such model) formed the ``(t T) x (n T)``
cross covariance densely, zeros between tasks included, and at the training inputs a dense ``(n T) x (n T)``
posterior that sampling factorised by a dense Cholesky, without a word.

:class:`TaskPredictionStrategy` predicts each task with the strategy of its kernel (the block mean or sum strategy's
closed forms, ``O(n + k^3)`` per task) and interleaves the results again: the predictive covariance is a
:class:`~bma_gp._composition.BlockMeanInterleavedLinearOperator` whose roots and solves are the tasks' own.
:func:`install` routes GPyTorch's ``prediction_strategy`` to it.
"""

from __future__ import annotations

import functools
import warnings

import torch
from gpytorch import settings
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from gpytorch.likelihoods import FixedNoiseGaussianLikelihood, MultitaskGaussianLikelihood
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from linear_operator.operators import (
    BlockInterleavedLinearOperator,
    DiagLinearOperator,
    LinearOperator,
    ZeroLinearOperator,
)
from torch import Tensor

__all__ = ["TaskPredictionStrategy"]


def _task_noise(likelihood, prior: MultitaskMultivariateNormal) -> Tensor | None:
    """The likelihood's noise at the training inputs, ``(*batch, T, n)``, when it adds a diagonal to the interleaved
    covariance (a ``MultitaskGaussianLikelihood`` of ``rank=0``); else None (a noise that couples the tasks)."""
    if not isinstance(likelihood, MultitaskGaussianLikelihood):
        return None
    mean = prior.mean  # (*batch, n, T)
    zero = MultitaskMultivariateNormal(torch.zeros_like(mean), DiagLinearOperator(torch.zeros_like(mean).flatten(-2)))
    covar = likelihood(zero).lazy_covariance_matrix
    if not isinstance(covar, DiagLinearOperator):
        return None
    noise = covar.diagonal(dim1=-2, dim2=-1).expand(*mean.shape[:-2], mean.shape[-2] * mean.shape[-1])
    return noise.reshape(mean.shape).mT  # point-major (interleaved) -> task-major


def _routable(train_prior_dist, likelihood) -> bool:
    """Whether ``train_prior_dist`` is ``from_batch_mvn``'s interleaved layout over a batch of lazily evaluated block
    mean or group kernels, observed through a ``MultitaskGaussianLikelihood`` (its rank is checked when the strategy
    is built)."""
    from bma_gp._composition import _is_lazy_block_mean

    if not isinstance(train_prior_dist, MultitaskMultivariateNormal) or not train_prior_dist._interleaved:
        return False
    covar = train_prior_dist.lazy_covariance_matrix
    return (
        isinstance(covar, BlockInterleavedLinearOperator)
        and _is_lazy_block_mean(covar.base_linear_op)
        and isinstance(likelihood, MultitaskGaussianLikelihood)
    )


class TaskPredictionStrategy(DefaultPredictionStrategy):
    """Exact prediction of ``MultitaskMultivariateNormal.from_batch_mvn`` over a batch of block mean or group kernels
    with a ``MultitaskGaussianLikelihood(rank=0)``: the batch of tasks predicted by its kernel's own strategy (as the
    batch ``MultivariateNormal`` with a batch ``GaussianLikelihood`` would be), the results interleaved again.

    Built by GPyTorch's ``prediction_strategy`` (see :func:`install`) for such models only; :attr:`task_strategy` is
    ``None`` when the likelihood's noise couples the tasks (``rank >= 1``), and then every method is GPyTorch's, as
    under an ``observation_nan_policy`` other than ``"ignore"`` (whose masks belong to each point and task).
    """

    def __init__(self, train_inputs, train_prior_dist, train_labels, likelihood, root=None, inv_root=None) -> None:
        super().__init__(train_inputs, train_prior_dist, train_labels, likelihood, root=root, inv_root=inv_root)
        self.task_strategy: DefaultPredictionStrategy | None = None
        noise = _task_noise(likelihood, train_prior_dist)
        if noise is None:
            return
        from gpytorch.models.exact_prediction_strategies import prediction_strategy

        covar = train_prior_dist.lazy_covariance_matrix.base_linear_op  # (*batch, T, n, n)
        tasks = MultivariateNormal(train_prior_dist.mean.mT, covar)
        labels = train_labels.reshape(train_prior_dist.mean.shape).mT
        task_likelihood = FixedNoiseGaussianLikelihood(noise=noise, learn_additional_noise=False)
        self.task_strategy = prediction_strategy(train_inputs, tasks, labels, task_likelihood)

    def exact_prediction(self, test_mean: Tensor, test_test_covar, test_train_covar):
        strategy = self.task_strategy
        if (
            strategy is None
            # GPyTorch's "mask" drops a point from every batch entry when any entry misses it: the tasks' batch would
            # drop a point from every task when one task misses it. GPyTorch's path masks each (point, task) entry.
            or settings.observation_nan_policy.value() != "ignore"
            or not isinstance(test_test_covar, BlockInterleavedLinearOperator)
            or not isinstance(test_train_covar, BlockInterleavedLinearOperator)
        ):
            return super().exact_prediction(test_mean, test_test_covar, test_train_covar)
        from bma_gp._composition import BlockMeanInterleavedLinearOperator

        tasks, t = test_test_covar.num_blocks, test_test_covar.base_linear_op.shape[-1]
        task_mean = test_mean.reshape(*test_mean.shape[:-1], t, tasks).mT  # (*batch, T, t)
        mean, covar = strategy.exact_prediction(
            task_mean, test_test_covar.base_linear_op, test_train_covar.base_linear_op
        )
        mean = mean.mT.reshape(*mean.shape[:-2], t * tasks)
        if isinstance(covar, ZeroLinearOperator):  # skip_posterior_variances
            return mean, ZeroLinearOperator(*test_test_covar.shape, dtype=covar.dtype, device=covar.device)
        covar = covar if isinstance(covar, LinearOperator) else DiagLinearOperator(covar)
        return mean, BlockMeanInterleavedLinearOperator(covar)


def _kernel_product(train_prior_dist) -> bool:
    """Whether the training covariance is the elementwise product of two lazily evaluated kernel tensors that is a
    block mean operator (``covar_module(x).mul(task_covar_module(i))``, GPyTorch's Hadamard multitask model, over a
    ``BlockMeanKernel`` or ``GroupKernel`` and a ``GroupKernel`` or ``IndexKernel``; marked by
    :func:`bma_gp._composition._hooked_mul_matrix`). GPyTorch asks no kernel for its strategy there, and
    :class:`~bma_gp.kernels.BlockMeanPredictionStrategy` predicts from the model's joint covariance of training and
    new inputs, the same product (:meth:`~bma_gp.kernels.BlockMeanPredictionStrategy._joint_cross`)."""
    from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator

    covar = getattr(train_prior_dist, "lazy_covariance_matrix", None)
    return isinstance(covar, BlockMeanLinearOperator) and bool(getattr(covar, "_bma_gp_kernel_product", False))


def _warn_evaluated_prior(train_prior_dist) -> None:
    """A :class:`~bma_gp.ClosedFormFallbackWarning` when the training covariance is one of the package's operators
    but not a lazily evaluated kernel tensor (``lazily_evaluate_kernels(False)``, or a ``forward`` that evaluates the
    kernel itself): GPyTorch then never asks the kernel for its strategy and predicts with its default one, whose
    test covariances are dense up to ``max_eager_kernel_size`` and whose posterior samples (``model(train_x)
    .rsample()``) factorise the dense ``t x t`` covariance (Cholesky, or Lanczos above ``max_cholesky_size``).
    Nothing inside GPyTorch's own evaluation of a lazy kernel tensor, which switches the setting off itself."""
    from bma_gp._warnings import ClosedFormFallbackWarning
    from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator
    from bma_gp.block_mean_product_linear_operator import BlockMeanProductLinearOperator
    from bma_gp.block_mean_sum_linear_operator import BlockMeanSumLinearOperator
    from bma_gp.kernels.block_mean_kernel import _inside_lazy_evaluation

    covar = getattr(train_prior_dist, "lazy_covariance_matrix", None)
    family = (BlockMeanLinearOperator, BlockMeanSumLinearOperator, BlockMeanProductLinearOperator)
    if not isinstance(covar, family) or _inside_lazy_evaluation():
        return
    warnings.warn(
        f"the training covariance is an evaluated {type(covar).__name__}, not a lazily evaluated kernel tensor "
        f"(gpytorch.settings.lazily_evaluate_kernels is {'off' if settings.lazily_evaluate_kernels.off() else 'on'}"
        "; a forward that evaluates its kernel does the same): GPyTorch then predicts with its "
        "DefaultPredictionStrategy instead of bma-gp's closed-form one, so the test covariances are formed densely "
        "(up to gpytorch.settings.max_eager_kernel_size) and posterior samples, e.g. model(train_x).rsample() in "
        "eval mode, factorise the dense t x t predictive covariance (Cholesky, or Lanczos above max_cholesky_size). "
        f"{_evaluated_prior_advice(covar)}",
        ClosedFormFallbackWarning,
        stacklevel=4,
    )


def _evaluated_prior_advice(covar=None) -> str:
    """What to write instead, for :func:`_warn_evaluated_prior`."""
    from bma_gp.block_mean_sum_linear_operator import BlockMeanSumLinearOperator

    if settings.lazily_evaluate_kernels.off():
        return "Keep lazily_evaluate_kernels on (GPyTorch's default)."
    if isinstance(covar, BlockMeanSumLinearOperator):  # a Hadamard model over a sum of kernels
        return (
            "Return from forward a kernel's output as it comes (a lazily evaluated kernel tensor). A product of a sum "
            "of kernels and a task kernel computed in forward (sum_kernel(x).mul(task_kernel(i))) is closed form in "
            "training, but its prediction needs the product as one kernel with active_dims, e.g. for the task id in "
            "input column 2: covar_module = (BlockMeanKernel(...) + GroupKernel(k, active_dims=[1])) * "
            "IndexKernel(num_tasks, rank=1, active_dims=[2]), whose prediction is closed form."
        )
    return (
        "Return from forward a kernel's output as it comes (a lazily evaluated kernel tensor); the elementwise "
        "product of two of them (kernel_x(x).mul(task_kernel(i)), GPyTorch's Hadamard multitask model) keeps the "
        "closed form too where it is one BlockMeanLinearOperator. To combine kernels otherwise, build one kernel of "
        "them with active_dims and return its output, e.g. for a Hadamard model with the task id in input column 1: "
        "covar_module = BlockMeanKernel(...) * GroupKernel(num_tasks, rank=1, active_dims=[1])."
    )


def _multitask_members(kernel) -> list:
    r"""The kernels whose sum ``kernel`` is, through ``ScaleKernel``\ s (constant multiples of the task matrices),
    ``LCMKernel``\ s and ``AdditiveKernel``\ s (``MultitaskKernel(a) + MultitaskKernel(b)``, an ``LCMKernel`` written
    out): the ``MultitaskKernel``\ s of a sum of Kronecker products, or whatever else stands in their place."""
    from gpytorch.kernels import AdditiveKernel, LCMKernel, ScaleKernel

    while isinstance(kernel, ScaleKernel):  # ScaleKernel(MultitaskKernel(...)): a multiple of the task matrix
        kernel = kernel.base_kernel
    if isinstance(kernel, LCMKernel):
        return [member for part in kernel.covar_module_list for member in _multitask_members(part)]
    if isinstance(kernel, AdditiveKernel):
        return [member for part in kernel.kernels for member in _multitask_members(part)]
    return [kernel]


def _kronecker(train_prior_dist, likelihood) -> bool:
    r"""Whether the training covariance is a lazily evaluated ``MultitaskKernel`` around a block mean or group kernel
    (or an ``LCMKernel`` of such kernels, or a sum of them, ``ScaleKernel``\ s around any of them included), observed
    through a ``MultitaskGaussianLikelihood``: a Kronecker sum with block mean factors, predicted by
    :class:`~bma_gp.kernels.kronecker_prediction_strategy.KroneckerPredictionStrategy` (GPyTorch asks the
    ``MultitaskKernel`` for its strategy, which is GPyTorch's default one; an ``LCMKernel`` asks for none; the
    ``AdditiveKernel`` of ``MultitaskKernel(a) + MultitaskKernel(b)`` asked for :class:`SumPredictionStrategy`,
    whose ``fast_pred_var`` and predictions at the training inputs formed ``n t x n t`` matrices without a word once
    the training covariance was closed form)."""
    from gpytorch.kernels import MultitaskKernel
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    from bma_gp._composition import _involves_block_mean

    covar = getattr(train_prior_dist, "lazy_covariance_matrix", None)
    if not isinstance(covar, LazyEvaluatedKernelTensor):
        return False
    members = _multitask_members(covar.kernel)
    return (
        isinstance(train_prior_dist, MultitaskMultivariateNormal)
        and all(isinstance(m, MultitaskKernel) and _involves_block_mean(m.data_covar_module) for m in members)
        and isinstance(likelihood, MultitaskGaussianLikelihood)
    )


def _choose(train_prior_dist, likelihood) -> str:
    """``"tasks"``, ``"product"``, ``"kronecker"`` or ``"default"`` (after :func:`_warn_evaluated_prior`): the
    strategy the hook gives. Run outside ``torch.compile``'s tracing: reading the distribution's lazily cached
    covariance writes its ``__dict__``, and Dynamo stopped every compiled prediction, plain GPyTorch models' included,
    with "Guard failed on the same frame it was created"."""
    if _routable(train_prior_dist, likelihood):
        return "tasks"
    if _kernel_product(train_prior_dist):
        return "product"
    if _kronecker(train_prior_dist, likelihood):
        return "kronecker"
    _warn_evaluated_prior(train_prior_dist)
    return "default"


# _choose kept out of Dynamo's tracing. torch._disable_dynamo imports torch._dynamo at its first call (1.2-1.7 s), so
# it is called only while compiling (Dynamo is loaded then): otherwise a user's first prediction paid that import
_choose_untraced = torch._disable_dynamo(_choose)


def _choose_outside_tracing(train_prior_dist, likelihood) -> str:
    """:func:`_choose`, out of ``torch.compile``'s trace where one is running (``torch.compiler.is_compiling`` is
    constant ``True`` there, and the disabled call a graph break)."""
    if torch.compiler.is_compiling():
        return _choose_untraced(train_prior_dist, likelihood)
    return _choose(train_prior_dist, likelihood)


def _routed(original):
    """GPyTorch's ``prediction_strategy``, with :class:`TaskPredictionStrategy` for a batch-independent multi-output
    model on block mean or group kernels (:func:`_routable`), :class:`~bma_gp.kernels.BlockMeanPredictionStrategy`
    for the product of two lazily evaluated kernels (:func:`_kernel_product`),
    :class:`~bma_gp.kernels.kronecker_prediction_strategy.KroneckerPredictionStrategy` for a ``MultitaskKernel`` around
    one of them (:func:`_kronecker`), and a warning when GPyTorch's default strategy is chosen for an evaluated block
    mean training covariance (:func:`_warn_evaluated_prior`)."""

    @functools.wraps(original)
    def prediction_strategy(train_inputs, train_prior_dist, train_labels, likelihood):
        choice = _choose_outside_tracing(train_prior_dist, likelihood)
        if choice == "tasks":
            return TaskPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)
        if choice == "product":
            from bma_gp.kernels.prediction_strategy import BlockMeanPredictionStrategy

            return BlockMeanPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)
        if choice == "kronecker":
            from bma_gp.kernels.kronecker_prediction_strategy import KroneckerPredictionStrategy

            return KroneckerPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)
        return original(train_inputs, train_prior_dist, train_labels, likelihood)

    prediction_strategy._bma_gp_original = original
    return prediction_strategy


def install() -> None:
    """Route GPyTorch's ``prediction_strategy`` (where it is defined and where ``ExactGP`` looks it up) to
    :class:`TaskPredictionStrategy` for batch-independent multi-output models on block mean kernels (idempotent)."""
    from gpytorch.models import exact_gp, exact_prediction_strategies

    for module in (exact_prediction_strategies, exact_gp):
        original = module.prediction_strategy
        if not hasattr(original, "_bma_gp_original"):
            module.prediction_strategy = _routed(original)
