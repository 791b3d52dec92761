"""Which training data a cached prediction strategy was built on, for kernels bound to their training inputs.

:class:`~bma_gp.BlockMeanKernel` holds its training inputs and partition, and
:meth:`~bma_gp.BlockMeanKernel.set_train_data` / :meth:`~bma_gp.BlockMeanKernel.set_partition` replace them. An
:class:`~gpytorch.models.ExactGP` in eval mode caches its prediction strategy (the solves against the training
covariance) until ``model.set_train_data`` or ``model.train()`` drops it, so a kernel changed in between would be
combined with solves against the old training covariance: wrong means and negative variances, with no error. The
strategies record the data version of every such kernel when they are built and refuse to predict once one changed.

Every strategy a kernel containing a ``BlockMeanKernel`` gives (its own, a sum's, a product's:
``bma_gp.kernels.sum_prediction_strategy.install``) goes through :func:`record_bound_data`, which also refuses a
model whose training inputs are not the ones a ``BlockMeanKernel`` in it is bound to (the kernel would take them for
new points, so the model would condition on the exact base kernel instead of its block mean approximation). Any
other strategy (GPyTorch's default, the Kronecker strategy of a ``MultitaskKernel``, a Hadamard multitask model's) is
given the versions by the model (:func:`install`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from gpytorch.kernels import (
    AdditiveKernel,
    InducingPointKernel,
    Kernel,
    LCMKernel,
    MultitaskKernel,
    ProductKernel,
    ScaleKernel,
)
from gpytorch.lazy import LazyEvaluatedKernelTensor
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from linear_operator.operators import LinearOperator
from torch import Tensor

from bma_gp import settings

__all__ = [
    "check_bound_data",
    "check_eager_inputs",
    "check_prediction_dtype",
    "check_training_inputs",
    "install",
    "record_bound_data",
]

_MISMATCH_MESSAGE = (
    "the model's training inputs do not match BlockMeanKernel.train_x, so the training covariance is not the block "
    "mean approximation. After model.set_train_data(x, y), also call kernel.set_train_data(x, partition) on the "
    "BlockMeanKernel."
)

#: warned where a model with a BlockMeanKernel is called in training mode on other inputs (debug(False))
_ELSEWHERE_MESSAGE = (
    "the model was called in training mode on inputs other than its training inputs (possible under "
    "gpytorch.settings.debug(False)): its BlockMeanKernel takes them for new points, so this is the prior of its base "
    "kernel there, not the block mean approximation of the training covariance, and a marginal likelihood of it trains "
    "the exact base-kernel GP on these points. To train on a subset of the rows (a minibatch), bind a BlockMeanKernel "
    "to it (kernel.set_train_data(x_subset, partition) with model.set_train_data(x_subset, y_subset, strict=False))."
)
#: raised where the model's training inputs and a BlockMeanKernel's bound copy differ in dtype (:func:`_check_seen`)
_DTYPE_MESSAGE = (
    "BlockMeanKernel's bound training inputs (train_x) are {bound} but the model's training inputs are {seen}: the "
    "kernel was converted without the model (model.covar_module.float() converts the kernel's copy of train_x, not "
    "the model's train_inputs), so it cannot recognise them. Convert the whole model instead (model.float() / "
    "model.double() / model.to(dtype): ExactGP converts its training data too)."
)

#: raised where a kernel around a BlockMeanKernel passes it other columns than its train_x has (:func:`_check_prior`)
_COLUMNS_MESSAGE = (
    "BlockMeanKernel is bound to train_x with {bound} columns but is given inputs with {seen} (the model's training "
    "inputs after the active_dims of the kernels around it), so it takes every input for a new point and the "
    "training covariance would be the exact base kernel's, not the block mean approximation. Bind it to the inputs it "
    "is given (BlockMeanKernel(base_kernel, train_x[..., dims], partition) inside a kernel with active_dims=dims; "
    "kernel.set_train_data(x, partition) after new training data), or set active_dims on its base kernel rather than "
    "on a kernel around it."
)
#: raised where an ApproximateGP holds a BlockMeanKernel (:func:`_install_approximate`)
_APPROXIMATE_MESSAGE = (
    "BlockMeanKernel is bound to the training inputs of an ExactGP and is not supported in an ApproximateGP: the "
    "variational strategy evaluates it on the inducing points and a batch of inputs together, which it takes for new "
    "points, so the ELBO and the predictions would be those of its base kernel, not of the block mean approximation. "
    "Use the base kernel itself in the ApproximateGP (that is the model it would train), or an ExactGP with the "
    "BlockMeanKernel (closed-form training, O(n + k^3) after the block sums); GroupKernel works in both."
)
#: raised where an ApproximateGP in training mode holds a ChunkedInducingPointKernel (:func:`_install_approximate`)
_APPROXIMATE_INDUCING_MESSAGE = (
    "ChunkedInducingPointKernel (like GPyTorch's InducingPointKernel) is the SGPR kernel of an ExactGP and is not "
    "supported in an ApproximateGP: in training mode it is defined only between equal inputs, and the variational "
    "strategy evaluates it between the inducing points and the data. An ApproximateGP has inducing points of its own: "
    "use the base kernel itself in it, or the ChunkedInducingPointKernel in an ExactGP."
)


def _inputs_seen(kernel: Kernel, x: Tensor | None) -> Iterator[tuple[Kernel, Tensor | None]]:
    """Every :class:`~bma_gp.BlockMeanKernel` in ``kernel`` with the inputs its ``forward`` gets when ``kernel``'s
    ``forward`` gets ``x`` (GPyTorch's sums and products apply each child's ``active_dims`` in the child's
    ``__call__``; ``ScaleKernel``, ``MultitaskKernel`` and ``LCMKernel`` call their children's ``forward`` with their
    own inputs); ``None`` inside any other container, whose ``forward`` may pass anything."""
    from bma_gp.kernels.block_mean_kernel import BlockMeanKernel

    if isinstance(kernel, BlockMeanKernel):
        yield kernel, x
        return
    if isinstance(kernel, ScaleKernel):
        yield from _inputs_seen(kernel.base_kernel, x)
        return
    if isinstance(kernel, MultitaskKernel):
        # its forward calls the data kernel's forward with its own inputs (the data kernel's active_dims unapplied)
        yield from _inputs_seen(kernel.data_covar_module, x)
        return
    if isinstance(kernel, InducingPointKernel):
        # its forward calls base_kernel(x, inducing_points) (the base kernel's active_dims applied in its __call__):
        # a block mean kernel in it gets the model's inputs as its first inputs and the inducing points as new points.
        # Not followed, the model's inputs were never compared with its train_x: after model.set_train_data alone
        # the SGPR trained and predicted on the exact base kernel's K_xZ, without a word
        base = kernel.base_kernel
        dims = base.active_dims
        yield from _inputs_seen(base, x if x is None or dims is None else x.index_select(-1, dims.to(x.device)))
        return
    if isinstance(kernel, LCMKernel):
        # its forward calls each member's forward with its own inputs (the members' active_dims unapplied)
        for member in kernel.covar_module_list:
            yield from _inputs_seen(member, x)
        return
    if isinstance(kernel, (AdditiveKernel, ProductKernel)):
        for child in kernel.kernels:
            dims = child.active_dims
            yield from _inputs_seen(child, x if x is None or dims is None else x.index_select(-1, dims.to(x.device)))
        return
    for module in kernel.modules():
        if isinstance(module, BlockMeanKernel):
            yield module, None


# whether the model being called is a fantasy model (``get_fantasy_model``): a BlockMeanKernel in it stays bound to
# the parent's training inputs and takes the fantasy points for new points (one singleton block each), so the model's
# training inputs may extend the kernel's
_FANTASY_MODEL: ContextVar[bool] = ContextVar("bma_gp_fantasy_model", default=False)


def check_training_inputs(strategy: DefaultPredictionStrategy) -> None:
    """``ValueError`` if a ``BlockMeanKernel`` in the model's kernel does not take the model's training inputs (as
    the kernels around it pass them on) for its own: it would treat them as new points, silently a different model."""
    _check_prior(strategy.train_prior_dist.lazy_covariance_matrix, _input_columns(strategy.train_inputs))


def _input_columns(train_inputs) -> tuple[Tensor, ...]:
    """A model's training inputs as ``(*batch, n, d)`` tensors (GPyTorch's 1-D inputs as one column), what
    :func:`_columns_of` compares with."""
    return tuple(t if t.dim() > 1 else t.unsqueeze(-1) for t in train_inputs or () if torch.is_tensor(t))


def _lazy_kernel_tensors(op) -> Iterator[LazyEvaluatedKernelTensor]:
    """The lazily evaluated kernel tensors ``op`` is built of: ``op`` itself, or those among the operators it holds
    (the terms of a ``SumLinearOperator`` or of the package's fallback sum, an ``AddedDiagLinearOperator``'s operator,
    the factors of a ``MulLinearOperator``, a ``ConstantMulLinearOperator``'s base, ...: every ``LinearOperator`` in
    its ``_args``), read without evaluating anything."""
    if isinstance(op, LazyEvaluatedKernelTensor):
        yield op
        return
    if isinstance(op, LinearOperator):
        for arg in op._args:
            yield from _lazy_kernel_tensors(arg)


def _check_prior(prior, inputs: tuple[Tensor, ...] | None = None) -> None:
    """:func:`check_training_inputs` for the prior covariance of the model at its training inputs.

    A prior that is one lazily evaluated kernel is the model's kernel at its training inputs: each block mean kernel
    in it must be bound to what it is given there. A prior built in the model's ``forward`` from several kernel
    outputs (``self.bmk(x) + self.rbf(x)``, ``ScaleKernel(bmk)(x) * ...``, ``.add_diagonal(d)``) is searched for the
    lazily evaluated kernel tensors still in it (:func:`_lazy_kernel_tensors`), and a block mean kernel in one of them
    is checked where it is given the model's training inputs ``inputs``, or columns of them (:func:`_columns_of`, the
    rule of :func:`check_eager_inputs`: a ``forward`` may hand a kernel points of its own, or transformed inputs).
    Summands the sum evaluated at once (a product, ``add_diagonal``, the package's closed-form sums) are checked while
    the model is called, where their ``forward`` runs (:func:`check_eager_inputs`)."""
    if not isinstance(prior, LazyEvaluatedKernelTensor):
        if inputs is None or not inputs:
            return
        extended = _FANTASY_MODEL.get()
        for lazy in _lazy_kernel_tensors(prior):
            for module, seen in _inputs_seen(lazy.kernel, lazy.x1):
                if seen is not None and _columns_of(seen, inputs):
                    _check_seen(module, seen, extended)
        return
    # from the model's kernel (``kernel`` may be inside it: a ScaleKernel hands its base kernel's strategy on), whose
    # active_dims the lazy tensor's inputs have already
    # a fantasy model's training inputs are the kernel's followed by the fantasy points (new points for the kernel)
    extended = _FANTASY_MODEL.get()
    for module, seen in _inputs_seen(prior.kernel, prior.x1):
        if seen is not None:
            _check_seen(module, seen, extended)


class _UnboundInputsError(ValueError):
    """The refusal of a :class:`~bma_gp.BlockMeanKernel` given other inputs than its training inputs
    (:func:`_check_seen`): a ``ValueError`` the model's call tells apart from others."""


def _check_seen(module, seen: Tensor, extended: bool) -> None:
    """``ValueError`` unless the :class:`~bma_gp.BlockMeanKernel` ``module``, given ``seen`` where its ``forward``
    gets the model's training inputs, takes them for its training inputs (``extended``: a fantasy model's, which
    may be followed by the fantasy points)."""
    if (seen.shape[-2] == module.train_x.shape[-2] or extended) and module._num_train_rows(seen):
        return
    if seen.shape[-1] != module.train_x.shape[-1]:  # the model's inputs, but columns chosen by a kernel around it
        raise _UnboundInputsError(_COLUMNS_MESSAGE.format(seen=seen.shape[-1], bound=module.train_x.shape[-1]))
    if seen.dtype != module.train_x.dtype:  # the kernel converted alone (model.covar_module.float())
        raise _UnboundInputsError(_DTYPE_MESSAGE.format(seen=seen.dtype, bound=module.train_x.dtype))
    raise _UnboundInputsError(_MISMATCH_MESSAGE)


# the number of training rows of the ExactGP being called on its training inputs (training mode) or on test inputs
# (eval mode, where its kernels are evaluated on the training inputs followed by the test inputs), with its training
# inputs; None outside such a call. Each BlockMeanKernel whose ``forward`` runs inside the call checks the inputs it
# gets (:func:`check_eager_inputs`): with lazily_evaluate_kernels(False) the model's prior is no lazily evaluated kernel
# that :func:`_check_prior` could read, and with lazy evaluation on a ``forward`` that combines kernel outputs
# (``self.bmk(x) * self.rbf(x)``, ``self.bmk(x).add_diagonal(d)``, the package's closed-form sums) evaluates them there.
# The third entry: the ids of the BlockMeanKernels that do not check (with lazy evaluation on, those inside a kernel
# :func:`_inputs_seen` does not know, as the lazy check of the prior leaves them)
_MODEL_CALL: ContextVar[tuple[int, tuple[Tensor, ...], frozenset[int]] | None] = ContextVar(
    "bma_gp_model_call", default=None
)


def check_eager_inputs(module, x1: Tensor, x2: Tensor) -> None:
    """:func:`_check_prior` for a kernel evaluated while the model is called: ``ValueError`` if the
    :class:`~bma_gp.BlockMeanKernel` ``module``, whose ``forward`` gets ``x1`` and ``x2`` inside a model call (with
    ``lazily_evaluate_kernels(False)``, or in a ``forward`` that combines kernel outputs and so evaluates them), is
    not given its training inputs where the model's training inputs are (the first rows; the test inputs follow them
    in eval mode).

    Only inputs whose first rows are the model's training inputs, or columns of them (chosen by the ``active_dims``
    of the kernels around it), are checked: a kernel that hands its base kernel other points (a custom wrapper that
    evaluates it at ``1 - x``, an ``InducingPointKernel``'s inducing points, a model whose ``forward`` transforms its
    inputs for one kernel call) gives it new points, as the lazy mode's check lets it (it reads no container it does
    not know); those trained and predicted eagerly until session 31, where the check refused them."""
    state = _MODEL_CALL.get()
    if state is None:
        return
    rows, inputs, unchecked = state
    if id(module) in unchecked:
        return
    for x in (x1,) if x2 is x1 else (x1, x2):
        if x.dim() >= 2 and x.shape[-2] >= rows:
            seen = x[..., :rows, :]
            if _columns_of(seen, inputs):
                _check_seen(module, seen, _FANTASY_MODEL.get())


def _columns_of(seen: Tensor, inputs: tuple[Tensor, ...]) -> bool:
    """Whether every column of ``seen`` (``(*batch, n, d')``) equals a column of one of the model's training inputs
    ``inputs`` (``(*batch, n, d)`` each; batches broadcast): the model's training inputs as the kernels around a
    :class:`~bma_gp.BlockMeanKernel` pass them on, not points of their own."""
    for j in range(seen.shape[-1]):
        column = seen[..., j]
        if not any(_equal_broadcast(column, t[..., i]) for t in inputs for i in range(t.shape[-1])):
            return False
    return True


def _equal_broadcast(a: Tensor, b: Tensor) -> bool:
    if a.shape[-1] != b.shape[-1]:
        return False
    try:
        return bool((a == b.to(device=a.device, dtype=a.dtype)).all())
    except RuntimeError:  # batches that do not broadcast
        return False


def _model_call(model, args) -> tuple[int, tuple[Tensor, ...], frozenset[int]] | None:
    """What :data:`_MODEL_CALL` holds while ``model(*args)`` runs: the number of the model's training rows, its
    training inputs (each ``(*batch, n, d)``) and the block mean kernels left unchecked (with lazy evaluation on,
    :func:`_inside_unknown_kernels`) where its kernels are evaluated on inputs that start with its training
    inputs (a training call in training mode; eval mode, which evaluates them on the training inputs followed by the
    test inputs, but for ``prior_mode``), a model with a :class:`~bma_gp.BlockMeanKernel`; else None (also inside
    GPyTorch's evaluation of a lazily evaluated kernel: a model called from a kernel)."""
    from gpytorch import settings as gpt_settings

    from bma_gp.kernels.block_mean_kernel import BlockMeanKernel, _inside_lazy_evaluation

    if _inside_lazy_evaluation() or not model.train_inputs:
        return None
    if not model.training and gpt_settings.prior_mode.on():
        return None
    first = model.train_inputs[0]
    if not torch.is_tensor(first) or not any(isinstance(m, BlockMeanKernel) for m in model.modules()):
        return None
    if model.training and not _is_training_call(model, args):
        return None
    rows = first.shape[-2] if first.dim() > 1 else first.shape[-1]
    unchecked = _inside_unknown_kernels(model) if gpt_settings.lazily_evaluate_kernels.on() else frozenset()
    return rows, _input_columns(model.train_inputs), unchecked


def _inside_unknown_kernels(model) -> frozenset[int]:
    """The ids of the :class:`~bma_gp.BlockMeanKernel` modules of ``model`` inside a kernel that :func:`_inputs_seen`
    does not know (a custom wrapper, whose ``forward`` may pass them anything: a reference that evaluates a kernel
    densely on training inputs that extend its ``train_x``, say). The lazy check of the prior leaves them unchecked,
    and so does the check while a model with lazy evaluation on is called."""
    from bma_gp.kernels.block_mean_kernel import BlockMeanKernel

    known = (
        BlockMeanKernel,
        ScaleKernel,
        MultitaskKernel,
        InducingPointKernel,
        LCMKernel,
        AdditiveKernel,
        ProductKernel,
    )
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, Kernel) and not isinstance(module, known):
            inside.update(id(m) for m in module.modules() if isinstance(m, BlockMeanKernel))
    return frozenset(inside)


def record_bound_data(strategy: DefaultPredictionStrategy, kernel: Kernel) -> DefaultPredictionStrategy:
    """Remember the data version of every :class:`~bma_gp.BlockMeanKernel` in ``kernel`` on ``strategy``.

    Raises:
        ValueError: such a kernel is bound to other training inputs than the model's (as the kernels around it pass
            them on).
    """
    from bma_gp.kernels.block_mean_kernel import BlockMeanKernel  # that module builds the strategies

    check_training_inputs(strategy)
    strategy._bound_data_versions = tuple(
        (module, module.data_version) for module in kernel.modules() if isinstance(module, BlockMeanKernel)
    )
    return strategy


def check_prediction_dtype(strategy: DefaultPredictionStrategy, test_train_covar) -> None:
    """``TypeError`` when the test inputs' covariance with the training data is of another dtype than the training
    covariance the strategy's caches come from: a float32 model given float64 test inputs (``torch.cat`` of its
    training inputs with them promotes to float64) would return float64 predictions computed from float32 caches.
    GPyTorch's own strategy fails there with a matmul dtype error. The dtypes are those of the evaluated kernels (a
    lazily evaluated kernel tensor gives its kernel's parameters' dtype, not the inputs'; GPyTorch memoises the
    evaluation, which prediction needs anyway)."""

    def evaluated_dtype(op) -> torch.dtype:
        return op.evaluate_kernel().dtype if isinstance(op, LazyEvaluatedKernelTensor) else op.dtype

    train_dtype = evaluated_dtype(strategy.train_prior_dist.lazy_covariance_matrix)
    test_dtype = evaluated_dtype(test_train_covar)
    if test_dtype != train_dtype:
        raise TypeError(
            f"the test inputs give a {test_dtype} covariance with the training data, but the model's "
            f"training covariance (and the prediction caches computed from it) is {train_dtype}: the predictions "
            f"would be {test_dtype} numbers computed from {train_dtype} caches. Pass test inputs of the "
            f"model's dtype (test_x.to({train_dtype})), or convert the model (model.to({test_dtype}), "
            "e.g. model.double(): it converts its training data too)."
        )


def check_bound_data(strategy: DefaultPredictionStrategy) -> None:
    """``ValueError`` if a :class:`~bma_gp.BlockMeanKernel` recorded by :func:`record_bound_data` was given new
    training inputs or a new partition after ``strategy`` was built."""
    for kernel, version in getattr(strategy, "_bound_data_versions", ()):
        if kernel.data_version != version:
            raise ValueError(
                "BlockMeanKernel.set_train_data or set_partition was called while the model held a cached prediction "
                "strategy (built in eval mode on the old training data), whose solves belong to the old training "
                "covariance. After changing the kernel's data, call model.set_train_data(train_x, train_y, "
                "strict=False) (or model.train() and then model.eval()) so that GPyTorch rebuilds it."
            )


def _tracked(strategy: DefaultPredictionStrategy) -> bool:
    """Whether ``strategy`` is one of the block mean strategies or was built for a model with a
    :class:`~bma_gp.BlockMeanKernel` (the strategies :func:`install` rebuilds; GPyTorch's own models are left as
    they are)."""
    from bma_gp.kernels.prediction_strategy import BlockMeanPredictionStrategy
    from bma_gp.kernels.sum_prediction_strategy import SumPredictionStrategy

    ours = isinstance(strategy, (BlockMeanPredictionStrategy, SumPredictionStrategy))
    return ours or bool(getattr(strategy, "_bound_data_versions", ()))


def _holds_bma_gp_module(model) -> bool:
    """Whether ``model`` holds a kernel or a noise model of this package (whose model may get a strategy that records
    nothing: GPyTorch's default under ``lazily_evaluate_kernels(False)``, the Kronecker strategy of a
    ``MultitaskKernel``)."""
    from bma_gp.kernels.block_mean_kernel import BlockMeanKernel
    from bma_gp.kernels.chunked_inducing_point_kernel import ChunkedInducingPointKernel
    from bma_gp.kernels.group_kernel import GroupKernel
    from bma_gp.likelihoods import GroupNoise

    types = (BlockMeanKernel, ChunkedInducingPointKernel, GroupKernel, GroupNoise)
    return any(isinstance(module, types) for module in model.modules())


def _hyperparameters(model) -> list[Tensor]:
    """What a prediction strategy's caches are computed from besides the training data: the model's parameters and
    buffers, and a ``FixedNoiseGaussianLikelihood``'s noise (a plain attribute)."""
    from gpytorch.likelihoods.noise_models import FixedGaussianNoise

    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        noise = getattr(module, "noise", None) if isinstance(module, FixedGaussianNoise) else None
        if torch.is_tensor(noise):
            tensors.append(noise)
    return tensors


def _record_hyperparameters(strategy: DefaultPredictionStrategy, model) -> None:
    """Keep a copy of the hyperparameters ``strategy`` was built with (:func:`_hyperparameters_changed`)."""
    strategy._bma_gp_hyperparameters = tuple((t, t.detach().clone()) for t in _hyperparameters(model))


def _hyperparameters_changed(strategy: DefaultPredictionStrategy, model) -> bool:
    """Whether a hyperparameter of ``model`` was changed in eval mode after ``strategy`` was built: an optimizer
    step, an assignment (``likelihood.noise = ...``), ``initialize(...)`` (which writes through ``.data``, unseen by
    the version counters) or a parameter replaced. GPyTorch drops its caches only in ``train()`` and
    ``load_state_dict``; the block mean strategies cache their solves and factors for the variances too, so the
    mean *and* the variances stayed those of the old hyperparameters, with no error."""
    recorded = getattr(strategy, "_bma_gp_hyperparameters", None)
    if recorded is None:
        return False
    current = _hyperparameters(model)
    return len(current) != len(recorded) or any(
        t is not old or t.dtype != copy.dtype or t.device != copy.device or not torch.equal(t.detach(), copy)
        for t, (old, copy) in zip(current, recorded)
    )


def _clear_caches(model) -> None:
    """GPyTorch's eval-mode caches of the model's modules (an ``InducingPointKernel``'s ``K_ZZ`` root), as
    ``model.train()`` clears them; the prediction strategy is left to the caller."""
    from gpytorch.module import Module

    for module in model.modules():
        if module is not model and isinstance(module, Module):
            module._clear_cache()


def _moved(strategy: DefaultPredictionStrategy, model) -> bool:
    """Whether ``model`` was moved to another dtype or device (``model.double()``, ``model.to(...)``) after its
    prediction strategy was built: its training inputs or targets are now of another dtype or device (the targets
    tell a move of a model whose inputs are integer group ids). ``ExactGP._apply`` converts the training data and
    the parameters but keeps the strategy, whose solves stay in the old dtype: GPyTorch's own strategy then fails
    on the dtype mismatch, while the block mean strategies promoted their float32 solves into float64 results with
    float32 accuracy (or kept float64 caches in a model moved to float32)."""
    if not _tracked(strategy):
        return False
    old, new = strategy.train_inputs, model.train_inputs
    if not old or not new:
        return False
    # the targets too: integer inputs (a GroupKernel's ids) keep their dtype through model.double() / model.float()
    old, new = (*old, strategy.train_labels), (*new, model.train_targets)
    return any(
        torch.is_tensor(a) and torch.is_tensor(b) and (a.dtype != b.dtype or a.device != b.device)
        for a, b in zip(old, new)
    )


def _holds_block_mean_kernel(prior) -> bool:
    """Whether ``prior`` is a lazily evaluated kernel with a :class:`~bma_gp.BlockMeanKernel` in it (any other model
    is left without the row comparison of :func:`_is_training_call`)."""
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    from bma_gp.kernels.block_mean_kernel import BlockMeanKernel

    if not isinstance(prior, LazyEvaluatedKernelTensor):
        return False
    return any(isinstance(module, BlockMeanKernel) for module in prior.kernel.modules())


def _is_training_call(model, args) -> bool:
    """Whether ``model(*args)`` was called on the model's training inputs (in training mode GPyTorch's debug check
    demands it; without the check a model may be evaluated elsewhere, which is its prior there)."""
    inputs = [a.unsqueeze(-1) if torch.is_tensor(a) and a.dim() == 1 else a for a in args]
    return len(inputs) == len(model.train_inputs) and all(
        torch.is_tensor(a) and a.shape == t.shape and torch.equal(a, t) for a, t in zip(inputs, model.train_inputs)
    )


def _rebuilt(model, strategy: DefaultPredictionStrategy) -> DefaultPredictionStrategy | None:
    """What replaces a cached ``strategy`` that may not be used: None (GPyTorch builds a new one from the model's
    training data at the next call), but for a fantasy model's strategy a new strategy of its class on the model's
    prior at its training inputs. A ``BlockMeanKernel`` takes the fantasy points for new points (which
    ``get_fantasy_model`` keeps), and the strategy keeps its class."""
    if not getattr(strategy, "_bma_gp_fantasy", False):
        return None
    from gpytorch.module import Module

    prior = Module.__call__(model, *model.train_inputs)  # the model's forward, as get_fantasy_model evaluates it
    rebuilt = type(strategy)(model.train_inputs, prior, model.train_targets, model.likelihood)
    rebuilt._bma_gp_fantasy = True
    return rebuilt


def _check_noise_first(model, inputs, noise) -> None:
    """``get_fantasy_model``'s ``noise=`` for a ``FixedNoiseGaussianLikelihood`` checked before GPyTorch appends it
    to the training noise (:func:`~bma_gp.kernels.sum_prediction_strategy._check_fantasy_noise`), for a model on the
    block mean strategies: a number (a 0-d tensor) failed there in ``torch.cat`` with a ``RuntimeError`` that names
    neither ``noise`` nor the fix."""
    from gpytorch.likelihoods import FixedNoiseGaussianLikelihood

    from bma_gp.kernels.prediction_strategy import BlockMeanPredictionStrategy
    from bma_gp.kernels.sum_prediction_strategy import SumPredictionStrategy, _check_fantasy_noise

    ours = isinstance(model.prediction_strategy, (BlockMeanPredictionStrategy, SumPredictionStrategy))
    if noise is None or not ours or not isinstance(model.likelihood, FixedNoiseGaussianLikelihood):
        return
    first = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
    if torch.is_tensor(first):
        _check_fantasy_noise(noise, first.shape[-2] if first.dim() > 1 else first.shape[-1])


def _check_fantasy_dtype(model, inputs, targets) -> None:
    """``TypeError`` before a fantasy of a model on the block mean strategies whose fantasy points or targets are of
    another floating dtype than its training data, as for test inputs (:func:`check_prediction_dtype`): a float32
    model took float64 fantasy points without a word and predicted float64 numbers from float32 caches (GPyTorch's own
    update fails there with a matmul dtype error)."""
    if not _tracked(model.prediction_strategy) or model.train_inputs is None:
        return
    given = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    pairs = [("inputs", x, t) for x, t in zip(given, model.train_inputs)] + [("targets", targets, model.train_targets)]
    for name, x, t in pairs:
        if torch.is_tensor(x) and torch.is_tensor(t) and x.is_floating_point() and x.dtype != t.dtype:
            raise TypeError(
                f"get_fantasy_model: the fantasy {name} are {x.dtype} but the model's training data are {t.dtype}, "
                f"so the fantasy model would compute {x.dtype} predictions from {t.dtype} caches. Pass fantasy "
                f"{name} of the model's dtype ({name}.to({t.dtype})), or convert the model first (model.to("
                f"{x.dtype}), e.g. model.double(): it converts its training data too)."
            )


def _check_fantasy_groups(model) -> None:
    """``ValueError`` before a fantasy of ``model`` whose :class:`~bma_gp.GroupGaussianLikelihood` cannot find the
    fantasy points' groups (:meth:`~bma_gp.GroupNoise._check_fantasy_inputs`)."""
    from bma_gp.likelihoods import GroupNoise

    for module in model.likelihood.modules() if model.likelihood is not None else ():
        if isinstance(module, GroupNoise) and model.train_inputs:
            module._check_fantasy_inputs(list(model.train_inputs))


def _copy_training_modes(model, fantasy) -> None:
    """Give every module of ``fantasy`` the training mode of the same module of ``model``: GPyTorch's
    ``InducingPointKernel`` deep-copies itself as a new instance, in training mode, so the fantasy model of a model in
    eval mode (``self.sgpr(x) + self.group(x)``, closed form) evaluated it without its diagonal correction at the
    fantasy and test points: the posterior variances of a fantasy 4.6e-4 off (0.8%) those of the model given all the
    points, silently."""
    modes = {name: module.training for name, module in model.named_modules()}
    for name, module in fantasy.named_modules():  # parents before their children
        mode = modes.get(name)
        if mode is not None and module.training != mode:
            module.train(mode)


def _follow_fantasy_inputs(fantasy) -> None:
    """Give the training groups a :class:`~bma_gp.GroupGaussianLikelihood` of ``fantasy`` stored (for
    ``mll(model(train_x), train_y)``, which passes it no inputs) the fantasy model's training inputs: the likelihood
    is the parent's copy, so ``fantasy.train()`` and a marginal likelihood on the fantasy's training points raised
    its "after model.set_train_data also call likelihood.set_train_inputs" ``ValueError``. The fantasy levels are not
    recorded as observed (conditioning learns no noise), so predictions keep the unseen-level policy."""
    from bma_gp.likelihoods import GroupNoise

    for module in fantasy.likelihood.modules() if fantasy.likelihood is not None else ():
        if isinstance(module, GroupNoise) and module.train_groups is not None and fantasy.train_inputs:
            module._store_train_groups(fantasy.train_inputs)


def _multitask_container(strategy: DefaultPredictionStrategy) -> bool:
    """Whether ``strategy``'s training covariance is a lazily evaluated kernel with a ``MultitaskKernel`` or an
    ``LCMKernel`` around a :class:`~bma_gp.BlockMeanKernel` (containers that call their members' ``forward`` with
    their own inputs, :func:`_inputs_seen`)."""
    prior = getattr(strategy.train_prior_dist, "lazy_covariance_matrix", None)
    if prior is None or not _holds_block_mean_kernel(prior):
        return False
    return any(isinstance(module, (MultitaskKernel, LCMKernel)) for module in prior.kernel.modules())


def _inducing_container(strategy: DefaultPredictionStrategy) -> bool:
    """Whether ``strategy``'s training covariance is a lazily evaluated kernel with an ``InducingPointKernel`` around a
    :class:`~bma_gp.BlockMeanKernel` (alone, it gets GPyTorch's SGPR strategy, which checks nothing)."""
    prior = getattr(strategy.train_prior_dist, "lazy_covariance_matrix", None)
    if prior is None or not _holds_block_mean_kernel(prior):
        return False
    return any(isinstance(module, InducingPointKernel) for module in prior.kernel.modules())


def _refresh_inducing_caches(model) -> None:
    """Drop the eval-mode caches of an ``InducingPointKernel`` (``K_ZZ``, its inverse root, a chunked kernel's kept
    training root) whose base kernel holds a :class:`~bma_gp.BlockMeanKernel` that got new training inputs or a new
    partition since they were kept. ``K_ZZ`` depends on them wherever the inducing points start with the kernel's
    training inputs (inducing points equal to ``train_x``: its block mean matrix); GPyTorch drops the cache only in
    ``train()``, so after ``kernel.set_partition(p)`` and ``model.set_train_data(..., strict=False)`` (what the block
    mean kernel's error asks for) the predictions used the old partition's ``K_ZZ`` (means 0.24 off, silently)."""
    from bma_gp.kernels.block_mean_kernel import BlockMeanKernel

    for module in model.modules():
        if not isinstance(module, InducingPointKernel):
            continue
        versions = tuple(
            (id(m), m.data_version) for m in module.base_kernel.modules() if isinstance(m, BlockMeanKernel)
        )
        if not versions:
            continue
        if module.__dict__.get("_bma_gp_bound_versions") != versions:
            module._clear_cache()
            module.__dict__["_bma_gp_bound_versions"] = versions


def _record(model, strategy: DefaultPredictionStrategy) -> None:
    """What a model records on a strategy it built: the data versions of its ``BlockMeanKernel``s (the block mean
    strategies record them themselves) and, in eval mode, the hyperparameters the strategy was built with."""
    if not hasattr(strategy, "_bound_data_versions"):
        from bma_gp.kernels.block_mean_kernel import BlockMeanKernel

        if _multitask_container(strategy) or _inducing_container(strategy):
            # GPyTorch's or the Kronecker strategy of a MultitaskKernel / LCMKernel, or GPyTorch's SGPR strategy,
            # which do not check the inputs their BlockMeanKernels get: refused as the block mean strategies refuse
            # them (training mode checks the same in __call__), with the strategy dropped so that the model keeps
            # nothing built on them
            try:
                check_training_inputs(strategy)
            except ValueError:
                model.prediction_strategy = None
                raise
        strategy._bound_data_versions = tuple(
            (module, module.data_version) for module in model.modules() if isinstance(module, BlockMeanKernel)
        )
    if not model.training and not hasattr(strategy, "_bma_gp_hyperparameters"):
        if _tracked(strategy) or _holds_bma_gp_module(model):  # GPyTorch's strategy under lazy evaluation off
            _record_hyperparameters(strategy, model)
            # built (and its caches filled) without autograd: no graph to the hyperparameters (_without_graph)
            strategy._bma_gp_without_graph = not torch.is_grad_enabled()


def _without_graph(strategy: DefaultPredictionStrategy, model) -> bool:
    """Whether ``strategy`` was built without autograd (a prediction under ``torch.no_grad()``, say a validation
    metric) and is now asked for gradients that need its graph: autograd on, ``detach_test_caches(False)``, and a
    parameter of the model that requires gradients. Its training covariance and mean cache hold no graph, so the
    gradients of a predictive loss were those with the solve held fixed, without a word (a user trial: 17.03 against
    -0.28 for a variance's raw parameter). GPyTorch's own models do the same; ``model.train(); model.eval()`` was
    the way out."""
    from gpytorch import settings as gpytorch_settings

    if not getattr(strategy, "_bma_gp_without_graph", False) or not torch.is_grad_enabled():
        return False
    if gpytorch_settings.detach_test_caches.on():
        return False
    return any(p.requires_grad for p in model.parameters())


def _refreshed(model, strategy: DefaultPredictionStrategy) -> DefaultPredictionStrategy:
    """A strategy on ``model``'s training data with its current hyperparameters, dtype and device, built as
    ``ExactGP.__call__`` builds one (for a fantasy model's, :func:`_rebuilt`'s), in place of ``strategy``."""
    from gpytorch.models.exact_prediction_strategies import prediction_strategy
    from gpytorch.module import Module

    rebuilt = _rebuilt(model, strategy)
    if rebuilt is None:
        prior = Module.__call__(model, *model.train_inputs)
        rebuilt = prediction_strategy(model.train_inputs, prior, model.train_targets, model.likelihood)
    _record(model, rebuilt)
    return rebuilt


def install() -> None:
    """Make every :class:`~gpytorch.models.ExactGP` refuse a cached prediction strategy built before a
    :class:`~bma_gp.BlockMeanKernel` among its modules got new data (idempotent).

    The kernels' own strategies (a ``BlockMeanKernel``'s, a sum's or a product's) record the data versions when they
    are built. A model whose prior is not one lazily evaluated kernel (``covar_x.mul(covar_i)``, GPyTorch's Hadamard
    multitask model) gets GPyTorch's default strategy, and one whose kernel is a ``MultitaskKernel`` around a
    ``BlockMeanKernel`` the Kronecker strategy (:mod:`bma_gp.kernels.kronecker_prediction_strategy`); neither records
    anything: the model records the versions of every ``BlockMeanKernel`` among its modules on the strategy it built,
    and checks them before each prediction.
    A block mean strategy built before the model was moved to another dtype or device is dropped and rebuilt, and
    so is one built before a hyperparameter of the model changed in eval mode (with GPyTorch's eval-mode caches of
    its modules), and any strategy a prediction with :class:`bma_gp.settings.validate` off used (its caches skipped
    the checks) once a prediction runs with validation on, and so is the strategy of a fantasy model made from such a
    strategy or under validation off (``get_fantasy_model`` updates the parent's caches). In
    training mode a model whose training inputs a ``BlockMeanKernel`` in it is not bound to raises the same
    ``ValueError`` as in eval mode (the kernel would take them for new points: the exact base kernel, trained
    densely); a fantasy model's training inputs may extend the kernel's (the fantasy points are new points for it,
    one singleton block each), so that it trains, and rebuilds its strategy after ``train()`` / ``eval()``, on all of
    them. A training-mode output remembers the inputs it was computed at (``_bma_gp_inputs``), so that a
    :class:`~bma_gp.GroupGaussianLikelihood` can tell stored training groups that no longer belong to the model's
    training inputs."""
    from gpytorch.models import ExactGP

    original = ExactGP.__dict__["__call__"]
    if hasattr(original, "_bma_gp_original"):
        return

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        # a fantasy model rebuilds its strategy (after train() / eval(), set_train_data) and trains on its own
        # training inputs, which extend those of a BlockMeanKernel in it: the checks accept them there
        token = _FANTASY_MODEL.set(getattr(self, "_bma_gp_fantasy_model", False))
        try:
            return _call(self, *args, **kwargs)
        finally:
            _FANTASY_MODEL.reset(token)

    def _call(self, *args, **kwargs):
        validated = settings.validate.on()
        strategy = self.prediction_strategy
        if strategy is not None and not self.training and _moved(strategy, self):
            _clear_caches(self)  # GPyTorch's InducingPointKernel keeps its K_ZZ root in the old dtype
            self.prediction_strategy = strategy = _rebuilt(self, strategy)  # in the new dtype / on the new device
        if strategy is not None and not self.training and _hyperparameters_changed(strategy, self):
            _clear_caches(self)  # GPyTorch's own eval-mode caches, as model.train() clears them
            self.prediction_strategy = strategy = _rebuilt(self, strategy)  # with the new hyperparameters
        if strategy is not None and not self.training and _without_graph(strategy, self):
            _clear_caches(self)  # GPyTorch's eval-mode caches, filled without autograd too
            self.prediction_strategy = strategy = _rebuilt(self, strategy)  # rebuilt with autograd on
        if strategy is not None and validated and getattr(strategy, "_bma_gp_unvalidated", False):
            # its caches (GPyTorch's mean and covariance caches, the block mean strategies' factors) may hold NaN from
            # unchecked solves: rebuilt, so that validation raises what it finds
            self.prediction_strategy = strategy = _rebuilt(self, strategy)
        if strategy is not None and not self.training:
            check_bound_data(strategy)
        _refresh_inducing_caches(self)
        # the block mean kernels check the inputs they get while the model evaluates them (all of them with lazy
        # evaluation off; those a forward that combines kernel outputs evaluates, with it on)
        state = _model_call(self, args)
        token = _MODEL_CALL.set(state)
        try:
            res = original(self, *args, **kwargs)
        except ValueError as error:
            if strategy is None and isinstance(error, _UnboundInputsError):
                # refused while GPyTorch predicted with the strategy it had just built on those inputs (a forward
                # that combines kernel outputs, GPyTorch's default strategy): not kept, so that the model, once its
                # kernels are bound to its training inputs, builds its strategy on their block mean approximation
                self.prediction_strategy = None
            raise
        finally:  # also when it raised after filling a cache (a size limit past an unchecked mean)
            _MODEL_CALL.reset(token)
            if not validated and self.prediction_strategy is not None:
                self.prediction_strategy._bma_gp_unvalidated = True
        if self.training:
            # the points of a training-mode output, for a likelihood that reads groups from the inputs
            # (GroupGaussianLikelihood checks its stored training groups against them)
            try:
                res._bma_gp_inputs = args
            except AttributeError:  # an output that takes no attributes (__slots__): nothing to check against
                pass
        if self.training and self.train_inputs is not None:
            prior = getattr(res, "lazy_covariance_matrix", None)
            if isinstance(prior, LazyEvaluatedKernelTensor):
                if _holds_block_mean_kernel(prior) and (state is not None or _is_training_call(self, args)):
                    # a training covariance on inputs the BlockMeanKernel takes for new points is the exact base
                    # kernel's (an n x n dense matrix, trained by dense Cholesky / CG): refused here, as in eval mode
                    _check_prior(prior)
                elif _holds_block_mean_kernel(prior):  # other inputs in training mode: only under debug(False)
                    warnings.warn(_ELSEWHERE_MESSAGE, UserWarning, stacklevel=2)
            elif state is not None and prior is not None:
                # a forward that combines kernel outputs (self.bmk(x) + self.rbf(x)): the lazily evaluated kernels
                # still in the sum, which the marginal likelihood evaluates after this call
                _check_prior(prior, state[1])
        if self.prediction_strategy is not None:
            _record(self, self.prediction_strategy)
        return res

    __call__._bma_gp_original = original  # type: ignore[attr-defined]
    ExactGP.__call__ = __call__

    original_fantasy = ExactGP.__dict__["get_fantasy_model"]

    @functools.wraps(original_fantasy)
    def get_fantasy_model(self, inputs, targets, **kwargs):
        # GPyTorch builds the fantasy strategy from the parent's caches (its mean cache, the roots of its training
        # covariance): a fantasy of a strategy used unchecked, or made under validate(False), is marked as that
        # strategy is, so that __call__ rebuilds it (from the fantasy model's data) before a prediction with
        # validation on
        _check_noise_first(self, inputs, kwargs.get("noise"))  # before anything of the parent changes
        _check_fantasy_dtype(self, inputs, targets)
        _check_fantasy_groups(self)
        strategy = self.prediction_strategy
        if (
            strategy is not None
            and not self.training
            and (_moved(strategy, self) or _hyperparameters_changed(strategy, self))
        ):
            # its caches belong to another dtype or other hyperparameters than the fantasy rows GPyTorch appends to
            # them (a NotPSDError or a dtype mismatch): rebuilt first, as a prediction would rebuild it
            _clear_caches(self)
            self.prediction_strategy = _refreshed(self, strategy)
        validated = settings.validate.on()
        unchecked = not validated or getattr(self.prediction_strategy, "_bma_gp_unvalidated", False)
        try:
            fantasy = original_fantasy(self, inputs, targets, **kwargs)
        finally:  # the parent's caches filled here skipped the checks too
            if not validated and self.prediction_strategy is not None:
                self.prediction_strategy._bma_gp_unvalidated = True
        _copy_training_modes(self, fantasy)
        fantasy._bma_gp_fantasy_model = True  # its training inputs extend its BlockMeanKernels' (see __call__)
        _follow_fantasy_inputs(fantasy)
        if fantasy.prediction_strategy is not None:
            fantasy.prediction_strategy._bma_gp_fantasy = True
            if unchecked:
                fantasy.prediction_strategy._bma_gp_unvalidated = True
        return fantasy

    get_fantasy_model._bma_gp_original = original_fantasy  # type: ignore[attr-defined]
    ExactGP.get_fantasy_model = get_fantasy_model
    _install_approximate()


def _install_approximate() -> None:
    """Make every :class:`~gpytorch.models.ApproximateGP` (also a deep GP layer) with a :class:`~bma_gp.BlockMeanKernel`
    among its modules refuse its variational output (idempotent): the variational strategy evaluates the kernel on
    ``cat(inducing_points, x)``, which the kernel takes for new points (or for its training points followed by new
    points, where the inducing points equal ``train_x``), so the ELBO and the predictions were silently those of the
    base kernel itself, not of its block mean approximation. A :class:`~bma_gp.ChunkedInducingPointKernel` in
    training mode is refused there too, in words. ``model(x, prior=True)`` is the kernel's prior at ``x`` and stays
    allowed."""
    from gpytorch.models import ApproximateGP

    original = ApproximateGP.__dict__["__call__"]
    if hasattr(original, "_bma_gp_original"):
        return

    @functools.wraps(original)
    def __call__(self, inputs, prior: bool = False, **kwargs):
        if not prior:
            _refuse_exact_gp_kernels(self)
        return original(self, inputs, prior=prior, **kwargs)

    __call__._bma_gp_original = original  # type: ignore[attr-defined]
    ApproximateGP.__call__ = __call__


def _refuse_exact_gp_kernels(model) -> None:
    """``NotImplementedError`` if the approximate GP ``model`` holds a :class:`~bma_gp.BlockMeanKernel`, or a
    :class:`~bma_gp.ChunkedInducingPointKernel` in training mode (which GPyTorch's forward refuses between the
    inducing points and the data with "x1 should equal x2 in training mode", an error that names neither)."""
    from bma_gp.kernels.block_mean_kernel import BlockMeanKernel
    from bma_gp.kernels.chunked_inducing_point_kernel import ChunkedInducingPointKernel

    for module in model.modules():
        if isinstance(module, BlockMeanKernel):
            raise NotImplementedError(_APPROXIMATE_MESSAGE)
        if isinstance(module, ChunkedInducingPointKernel) and module.training:
            raise NotImplementedError(_APPROXIMATE_INDUCING_MESSAGE)
