"""A GPyTorch kernel bound to training inputs: the block-exchangeable version of a base kernel."""

from __future__ import annotations

import functools
import math
import threading
import warnings

import numpy as np
import torch
from gpytorch import settings as gpt_settings
from gpytorch.kernels import Kernel
from linear_operator import to_dense, to_linear_operator
from linear_operator.operators import LinearOperator
from torch import Tensor

from bma_gp._autograd import functorch_wrapped, has_forward_tangent
from bma_gp._composition import ClosedFormFallbackWarning
from bma_gp._kernel_sums.generic import kernel_diagonal, translation_invariant
from bma_gp._warnings import caller_stacklevel
from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator
from bma_gp.kernel_block_mean import (
    block_mean_of_kernel,
    check_finite_inputs,
    check_single_output,
    chunk_rows,
    optional_flag,
)
from bma_gp.kernels._bound_data import check_eager_inputs, check_training_inputs, record_bound_data
from bma_gp.kernels.block_cross_linear_operator import BlockCrossLinearOperator
from bma_gp.kernels.leading_rows_linear_operator import LeadingRowsLinearOperator
from bma_gp.kernels.prediction_strategy import BlockMeanPredictionStrategy
from bma_gp.partition import Partition

__all__ = ["BlockMeanKernel"]

#: Largest number of kernel entries evaluated at once for a cross-covariance (batch x rows x training points).
_CROSS_CHUNK_ENTRIES = 2**22
#: warned where an ExactGP in eval mode evaluates the kernel eagerly (:meth:`BlockMeanKernel._joint_block_mean`)
_EAGER_PREDICTION_MESSAGE = (
    "BlockMeanKernel was evaluated on training and new inputs together in eval mode, under "
    "gpytorch.settings.lazily_evaluate_kernels(False): GPyTorch then predicts with its DefaultPredictionStrategy "
    "instead of bma-gp's closed-form one. Every test row is a new point for this kernel, so model(train_x) gives "
    "the posterior of new points at the training inputs, not the posterior at the training points (docs/gp.md), "
    "and posterior samples or fast_pred_var may use Lanczos or a dense factorisation. Keep "
    "lazily_evaluate_kernels on (GPyTorch's default) for the closed-form prediction."
)
#: how many ``LazyEvaluatedKernelTensor.evaluate_kernel`` calls are running in this thread (:func:`install`)
_lazy_evaluation = threading.local()


def _inside_lazy_evaluation() -> bool:
    """Whether this thread is inside GPyTorch's ``LazyEvaluatedKernelTensor.evaluate_kernel``, which switches
    ``lazily_evaluate_kernels`` off itself while it evaluates (so the setting is off there without the user)."""
    return getattr(_lazy_evaluation, "depth", 0) > 0


def install() -> None:
    """Mark GPyTorch's ``LazyEvaluatedKernelTensor.evaluate_kernel`` while it runs (idempotent).

    It evaluates the kernel under ``lazily_evaluate_kernels(False)`` (``kernel(x).to_dense()``, a fantasy
    update, a sum's closed-form routing), which :meth:`BlockMeanKernel._joint_block_mean` cannot tell from the
    user's own setting; the mark lets it warn only for the latter. The wrapper calls the original (with its cache)
    and returns its result; when the kernel raises (a ``GroupKernel`` given an id that is not a group), it puts back
    the kernel's ``active_dims``, which the original sets to None for the call and restores only after a return:
    every later call of the kernel then read all input columns and failed ("x1 must hold one column of group ids")."""
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    original = LazyEvaluatedKernelTensor.__dict__.get("evaluate_kernel")
    if original is None or hasattr(original, "_bma_gp_original"):
        # installed already; or a GPyTorch that evaluates elsewhere, where the warning may also fire in GPyTorch's
        # own evaluation (tests/test_lazy_warning.py notices) but nothing else changes
        return

    @functools.wraps(original)
    def evaluate_kernel(self, *args, **kwargs):
        depth = getattr(_lazy_evaluation, "depth", 0)
        _lazy_evaluation.depth = depth + 1
        active_dims = self.kernel.active_dims
        try:
            return original(self, *args, **kwargs)
        except BaseException:
            self.kernel.active_dims = active_dims  # set to None by the original, restored there only on success
            raise
        finally:
            _lazy_evaluation.depth = depth

    evaluate_kernel._bma_gp_original = original  # type: ignore[attr-defined]
    LazyEvaluatedKernelTensor.evaluate_kernel = evaluate_kernel

    getitem = LazyEvaluatedKernelTensor.__dict__.get("_getitem")
    if getitem is not None and not hasattr(getitem, "_bma_gp_original"):
        LazyEvaluatedKernelTensor._getitem = _hooked_lazy_getitem(getitem)


def _hooked_lazy_getitem(original):
    """GPyTorch indexes a lazily evaluated kernel tensor by indexing its inputs: ``kernel(x)[I, J]`` is
    ``kernel(x[I], x[J])``. A ``BlockMeanKernel`` recognises its training inputs only as a whole (followed by new
    points), so an index that takes some of the training rows but not all of them, in order, gave the base kernel at
    those points instead of the entries of the block mean matrix: ``kernel(x)[-5:, -5:]``, or the marginal
    ``mvn[..., -5:]`` of the training prior, without a word. Such an index now reads the evaluated operator (the
    block mean operator in closed form, cached); indices that keep the training rows whole or leave them out (the
    prediction strategy's split of the joint covariance at the training rows) keep GPyTorch's lazy form."""

    @functools.wraps(original)
    def _getitem(self, row_index, col_index, *batch_indices):
        if _cuts_training_rows(self, row_index, col_index):
            return self.evaluate_kernel()._getitem(row_index, col_index, *batch_indices)
        return original(self, row_index, col_index, *batch_indices)

    _getitem._bma_gp_original = original
    return _getitem


def _cuts_training_rows(lazy, row_index, col_index) -> bool:
    """Whether ``row_index`` / ``col_index`` of the lazily evaluated kernel tensor ``lazy`` take some training rows of
    a ``BlockMeanKernel`` inside its kernel but not all of them as a leading run (see :func:`_hooked_lazy_getitem`)."""
    kernels = [m for m in lazy.kernel.modules() if isinstance(m, BlockMeanKernel)]
    if not kernels:
        return False
    outs = lazy.kernel.num_outputs_per_input(lazy.x1, lazy.x2)
    out1, out2 = outs if isinstance(outs, tuple) else (outs, outs)
    for kernel in kernels:
        for x, index, per_input, size in (
            (lazy.x1, row_index, out1, lazy.shape[-2]),
            (lazy.x2, col_index, out2, lazy.shape[-1]),
        ):
            if kernel.active_dims is not None:
                x = x.index_select(-1, kernel.active_dims.to(x.device))
            rows = kernel._num_train_rows(x) * per_input
            if rows and _takes_part_of(index, rows, size):
                return True
    return False


def _takes_part_of(index, rows: int, size: int) -> bool:
    """Whether ``index`` (a slice, an integer or an integer tensor over ``size`` entries) takes some of the first
    ``rows`` entries but not exactly all of them in order at its start."""
    if isinstance(index, slice):
        start, stop, step = index.indices(size)
        if start >= rows or stop <= start:  # none of them (or nothing at all)
            return False
        return not (start == 0 and step == 1 and stop >= rows)
    if isinstance(index, int):
        return (index % size) < rows
    if torch.is_tensor(index):
        index = torch.where(index < 0, index + size, index)
        return bool((index < rows).any())
    return False


def _check_train_x(train_x) -> Tensor:
    if not torch.is_tensor(train_x):
        raise TypeError(f"train_x must be a torch.Tensor of shape (n, d), got {type(train_x).__name__}.")
    if not train_x.dtype.is_floating_point:
        raise ValueError(f"train_x must be floating point, got dtype {train_x.dtype}; convert it with .float().")
    if train_x.dim() == 1:
        train_x = train_x.unsqueeze(-1)
    if train_x.dim() < 2 or train_x.shape[-2] == 0 or train_x.shape[-1] == 0:
        raise ValueError(
            f"train_x must have shape (n, d) or (*batch, n, d) with n, d >= 1 (or (n,) for d = 1), "
            f"got {tuple(train_x.shape)}."
        )
    return train_x


def _check_partition(partition, n: int) -> Partition:
    if not isinstance(partition, Partition):
        raise TypeError(
            f"partition must be a bma_gp.Partition, got {type(partition).__name__}; build one with "
            "Partition.from_labels(labels) or a builder from bma_gp.partition_builders."
        )
    if len(partition) != n:
        raise ValueError(
            f"partition has {len(partition)} indices but train_x has {n} rows; they must match "
            "(one block label per training input)."
        )
    return partition


def _check_kernel_kwargs(base_kernel: Kernel, kwargs: dict) -> None:
    """Refuse the ``Kernel`` arguments that ``BlockMeanKernel`` has no use for: GPyTorch's ``Kernel.__init__`` takes
    and drops them silently, so a lengthscale prior or a batch shape given here had no effect."""
    for name in ("ard_num_dims", "lengthscale_prior", "lengthscale_constraint"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"BlockMeanKernel has no lengthscale of its own, so it does not take {name}: set {name} on base_kernel "
                f"(e.g. gpytorch.kernels.RBFKernel({name}=...)), whose hyperparameters it trains."
            )
    batch_shape = kwargs.get("batch_shape")
    if batch_shape is not None and torch.Size(batch_shape) != base_kernel.batch_shape:
        raise ValueError(
            f"BlockMeanKernel takes its batch shape from base_kernel ({tuple(base_kernel.batch_shape)}), so "
            f"batch_shape={tuple(batch_shape)} would be ignored: create base_kernel with that batch_shape instead."
        )
    unknown = sorted(set(kwargs) - {"active_dims", "batch_shape"})
    if unknown:
        raise TypeError(
            f"BlockMeanKernel got unexpected keyword arguments {unknown}; it takes base_kernel, train_x, "
            "partition, chunk_size and progress (set kernel options on base_kernel)."
        )


def _same_rows(x: Tensor, ref: Tensor) -> bool:
    """Whether ``x`` (*batch, n, d) holds exactly the rows of ``ref`` (*batch', n, d), batches broadcast.

    The memory of a tensor made inside a ``torch.func`` transform is not compared: such a wrapper has no storage
    (``data_ptr`` raised "Cannot access data pointer of Tensor that doesn't have storage"), and the values decide."""
    if x.shape[-2:] != ref.shape[-2:]:
        return False
    if (
        x.shape == ref.shape
        and not functorch_wrapped(x)
        and not functorch_wrapped(ref)
        and x.device == ref.device
        and x.data_ptr() == ref.data_ptr()
        and x.stride() == ref.stride()
        and x.dtype == ref.dtype
    ):
        return True  # the same memory: nothing to compare
    try:
        torch.broadcast_shapes(x.shape, ref.shape)
    except RuntimeError:
        return False
    return bool((x == ref.to(device=x.device, dtype=x.dtype)).all())


def _chunked_rows(fn, x: Tensor, chunk: int) -> Tensor:
    """``torch.cat([fn(rows) for rows in x.split(chunk, -2)], -2)``, recomputed in backward when
    gradients are needed so that only one chunk of kernel entries is alive at a time."""
    pieces = []
    for rows in x.split(chunk, dim=-2):
        if torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(fn, rows, use_reentrant=False))
        else:
            pieces.append(fn(rows))
    return torch.cat(pieces, dim=-2)


class BlockMeanKernel(Kernel):
    r"""The block-exchangeable process of ``base_kernel`` over a partition of the training inputs.

    With training inputs :math:`X` in blocks :math:`X_1, \dots, X_k` (a :class:`~bma_gp.Partition`),
    the training covariance is the Frobenius-nearest block mean matrix to
    :math:`K = k(X, X)` (:doc:`docs/math.md, section 2 </math>`):

    .. math::

        \hat K = \operatorname{diag}(\lambda_c) + P B P^\top, \qquad
        B_{ij} = \operatorname{mean}\, k(X_i, X_j), \quad
        \lambda_i + B_{ii} = \operatorname{mean}\, \operatorname{diag} k(X_i, X_i),

    the exact covariance of the process obtained by averaging over permutations of the
    training points inside each block. Every other input is a singleton block of that process:

    .. math::

        \operatorname{cov}(f(x), f(X_m)) = \frac{1}{s_j} \sum_{x' \in X_j} k(x, x')
        \quad (j = c_m), \qquad \operatorname{cov}(f(x), f(x')) = k(x, x').

    The joint covariance is again a block mean matrix (over the training blocks plus one
    singleton block per new point), so it is positive semidefinite and posterior variances are
    never negative.

    Inputs are interpreted by comparing rows with ``train_x``:

    * equal to ``train_x``: the training points (a :class:`~bma_gp.BlockMeanLinearOperator`);
    * ``train_x`` followed by more rows (what :class:`gpytorch.models.ExactGP` passes when
      predicting): the training points, then new points (a block mean operator over
      ``k + t`` blocks);
    * anything else: new points (``base_kernel`` itself; against the training points a
      :class:`~bma_gp.kernels.BlockCrossLinearOperator` of size ``t x k``, against the training
      points followed by ``m`` new points, a fantasy model's training inputs, one of size
      ``t x (k + m)`` over the blocks of the joint operator above); ``train_x`` against ``train_x`` followed by
      new points: the leading rows of that joint operator
      (:class:`~bma_gp.kernels.leading_rows_linear_operator.LeadingRowsLinearOperator`); ``train_x`` followed by
      new points against ``train_x`` followed by other new points: those rows and columns of the joint operator over
      the training blocks and both sets of new points (a :class:`~bma_gp.FallbackIndexedLinearOperator`, products
      in :math:`O(n)` per column; nothing ``n x n``).

    Predictions at inputs equal to ``train_x`` are therefore the posterior of the latent
    values *at the training points*; any other set of inputs gets the new-point covariance.
    In an :class:`~gpytorch.models.ExactGP` with a
    :class:`~gpytorch.likelihoods.GaussianLikelihood` the marginal likelihood, its gradient and
    predictions use the closed forms of the block mean operator only (see
    :class:`~bma_gp.kernels.BlockMeanPredictionStrategy`).

    Args:
        base_kernel: the kernel to approximate (its ``active_dims`` and batch shape are respected).
        train_x: the training inputs the kernel is bound to. # shape: (n, d) or (*batch, n, d)
        partition: a partition of the ``n`` training inputs into ``k`` blocks.
        chunk_size: rows of kernel entries evaluated at once when forming block sums
            (``None``: about 64 MB of kernel entries at a time for the training covariance, 2^22 entries for a
            cross-covariance).
        progress: a tqdm progress bar for each pass over the kernel's block sums (forward and backward): ``False``
            (the default: a training loop stays quiet), ``True``, or ``None`` for one where the pass evaluates more
            than 10^9 kernel entries (n above about 31,600), as :func:`~bma_gp.kernel_block_mean` shows by default.

    Example:
        >>> import gpytorch, torch
        >>> from bma_gp import BlockMeanKernel, Partition
        >>> train_x = torch.linspace(0, 1, 100).unsqueeze(-1)
        >>> partition = Partition.from_labels((train_x[:, 0] * 10).long().clamp(max=9))  # 10 blocks along x
        >>> base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        >>> covar_module = BlockMeanKernel(base, train_x, partition)
        >>> type(covar_module(train_x).evaluate_kernel()).__name__
        'BlockMeanLinearOperator'

    Cost: the training covariance needs every kernel entry once (:math:`O(n^2 d)` time,
    :math:`O(n \cdot \text{chunk})` memory); everything after is :math:`O(n + k^3)`.
    When the training data change, call :meth:`set_train_data` (and
    ``model.set_train_data``) so that the kernel and the model agree.
    """

    has_lengthscale = False

    def __init__(
        self,
        base_kernel: Kernel,
        train_x: Tensor,
        partition: Partition,
        *,
        chunk_size: int | None = None,
        progress: bool | None = False,
        **kwargs,
    ):
        if not isinstance(base_kernel, Kernel):
            raise TypeError(f"base_kernel must be a gpytorch Kernel, got {type(base_kernel).__name__}.")
        if any(isinstance(m, BlockMeanKernel) for m in base_kernel.modules()):
            raise ValueError(
                "base_kernel contains a BlockMeanKernel: its block sums would be taken on chunks of train_x, which the "
                "inner BlockMeanKernel takes for new points (its exact cross-covariances, not its block mean matrix). "
                "Wrap the inner kernel's own base kernel with this partition instead."
            )
        if "active_dims" in kwargs and kwargs["active_dims"] is not None:
            raise ValueError(
                "BlockMeanKernel does not take active_dims itself: set active_dims on base_kernel "
                "(it is respected; train_x keeps all input columns)."
            )
        chunk_size = chunk_rows(chunk_size)
        progress = optional_flag(
            progress,
            "progress",
            "False (no progress bar, the default), True (one per block-sum pass) or None (one "
            "above 10^9 kernel entries, as kernel_block_mean shows)",
        )
        _check_kernel_kwargs(base_kernel, kwargs)
        check_single_output(base_kernel, _check_train_x(train_x))
        super().__init__(**kwargs)
        self.base_kernel = base_kernel
        self.chunk_size = chunk_size
        self.progress = progress
        self._train_x: Tensor
        self._partition: Partition
        self._data_version = 0
        self._block_sums_cache: tuple | None = None  # (key, block mean) of the last training pass
        self.set_train_data(train_x, partition)

    @property
    def batch_shape(self) -> torch.Size:
        """The base kernel's batch shape (the wrapper has no parameters of its own)."""
        base = self._modules.get("base_kernel")
        return base.batch_shape if base is not None else torch.Size()

    @batch_shape.setter
    def batch_shape(self, value) -> None:
        self._batch_shape = torch.Size()  # follows base_kernel, which expand_batch / indexing update

    # ------------------------------------------------------------------ bound data
    @property
    def train_x(self) -> Tensor:
        """The training inputs the kernel is bound to (all columns, before ``active_dims``)."""
        return self._train_x

    @property
    def partition(self) -> Partition:
        """The partition of the training inputs."""
        return self._partition

    @property
    def data_version(self) -> int:
        """How many times the training inputs or the partition were set (:meth:`set_train_data`,
        :meth:`set_partition`). A prediction strategy cached by a model in eval mode records it and raises
        ``ValueError`` once it changed, instead of combining the new data with solves against the old."""
        return self._data_version

    def set_train_data(self, train_x: Tensor, partition: Partition | None = None) -> None:
        """Bind the kernel to new training inputs (and optionally a new partition).

        Nothing derived from the old data is kept: the block sums are recomputed on the next call.
        Without ``partition`` the old one is kept, which must then have one label per new row.

        Raises:
            TypeError: ``train_x`` is not a tensor or ``partition`` not a :class:`~bma_gp.Partition`.
            ValueError: ``train_x`` has a bad shape or dtype, holds NaN or inf in the columns the base kernel reads
                (with :class:`bma_gp.settings.validate` on), or the partition has the wrong length.
        """
        train_x = _check_train_x(train_x)
        partition = _check_partition(
            self._partition if partition is None and hasattr(self, "_partition") else partition, train_x.shape[-2]
        )
        check_finite_inputs(self.base_kernel, train_x, "train_x")
        self._train_x = train_x
        self._partition = partition
        self._data_version += 1
        self._block_sums_cache = None

    def set_partition(self, partition: Partition) -> None:
        """Use a new partition of the same training inputs.

        Like :meth:`set_train_data`, this does not reach the model: a model in eval mode keeps its cached prediction
        strategy until ``model.set_train_data`` or ``model.train()`` (predicting before that raises ``ValueError``)."""
        self._partition = _check_partition(partition, self._train_x.shape[-2])
        self._data_version += 1
        self._block_sums_cache = None

    def _apply(self, fn, *args, **kwargs):
        # .to(), .double(), .cuda() move the bound inputs together with the parameters
        module = super()._apply(fn, *args, **kwargs)
        self._train_x = fn(self._train_x)
        return module

    # ------------------------------------------------------------------ saved state
    # The partition is not a parameter and is not loaded, but it is part of the model as inducing points are: the state
    # dict records which partition of how many training points the hyperparameters were fitted with (n, k and a
    # 128-bit fingerprint of which points share a block, one int64 tensor), and loading it into a kernel bound to as
    # many points under other blocks warns (a partition rebuilt with another seed or rule: the loaded model predicts
    # otherwise); the same blocks under other ids (k-means run again) are the same model. Other training data
    # (another n) is a transfer of hyperparameters, as in GPyTorch, and loads silently. Nothing here raises: torch
    # loads module by module, so a refusal would leave the modules loaded before this one changed.
    def get_extra_state(self) -> Tensor:
        fingerprint = self._partition._fingerprint() or (0, 0)
        return torch.tensor([self._partition.n, self._partition.num_blocks, *fingerprint], dtype=torch.long)

    def set_extra_state(self, state) -> None:
        if not (torch.is_tensor(state) and state.shape == (4,) and not state.is_complex()):
            warnings.warn(
                "the saved state's BlockMeanKernel entry (key '..._extra_state') is not the tensor of 4 values (n, k "
                f"and the partition's fingerprint) that BlockMeanKernel.state_dict() writes, got {_short_repr(state)}: "
                "it is ignored, and whether the saved model had this kernel's partition is not checked.",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )
            return
        if state.dtype != torch.long:
            # cast by a state dict utility ({k: v.double() ...}, an average of state dicts): the fingerprint's 64-bit
            # values are not exact in a float, so there is nothing to compare
            return
        n, k, *saved = state.tolist()
        current = self._partition._fingerprint()
        if n != self._partition.n or current is None or not any(saved) or tuple(saved) == current:
            return
        warnings.warn(
            f"the loaded state was fitted with another partition of the same {n} training points ({k} blocks; this "
            f"kernel's has {self._partition.num_blocks}, and other points share them): the hyperparameters are "
            "loaded, but this model's block mean covariance differs from the saved model's, and so do its "
            "predictions. To restore the saved model, build the kernel (or kernel.set_partition) with the partition it "
            "was trained with (save partition.labels beside the state dict, rebuild with Partition.from_labels); to "
            "use the hyperparameters with this partition on purpose, ignore this warning.",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs):
        key = prefix + "_extra_state"
        saved = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)
        if not saved and key in missing_keys:  # a state saved before the partition was recorded: nothing to compare
            missing_keys.remove(key)

    def __getitem__(self, index) -> Kernel:
        new_kernel = super().__getitem__(index)
        if new_kernel is not self and self._train_x.dim() > 2:
            index = index if isinstance(index, tuple) else (index,)
            batch = torch.broadcast_shapes(self._train_x.shape[:-2], self.batch_shape)
            new_kernel._train_x = self._train_x.expand(*batch, *self._train_x.shape[-2:])[index]
            new_kernel._block_sums_cache = None
        return new_kernel

    # ------------------------------------------------------------------ pieces
    def _partition_on(self, device: torch.device) -> Partition:
        return self._partition.to(device)

    def _base_dense(self, x1: Tensor, x2: Tensor) -> Tensor:
        with gpt_settings.lazily_evaluate_kernels(False):
            return to_dense(self.base_kernel(x1, x2))

    def _train_block_mean(self, train_x: Tensor) -> BlockMeanLinearOperator:
        """The block mean of ``base_kernel`` on the training inputs (``train_x``, the bound inputs in the caller's
        dtype and device): one pass over every training kernel entry, kept for the next call while no gradient is
        asked of it and the data, the dtype and device, and the base kernel's parameters, buffers and plain
        attributes (:func:`_settings_of`) are unchanged. A model's prediction strategy and then its fantasy model's
        (training points plus fantasy points) ask for it one after the other; the second reused nothing and redid
        the pass."""
        key = self._block_sums_key(train_x)
        cached = self.__dict__.get("_block_sums_cache")  # (a kernel unpickled from an older version has none)
        # one made under torch.inference_mode() holds inference tensors, which autograd may not save: outside that
        # mode it is made afresh (a model evaluated under inference_mode, then trained with the kernel frozen but the
        # noise or the mean learnt, raised "Inference tensors cannot be saved for backward")
        if (
            key is not None
            and cached is not None
            and _same_key(cached[0], key)
            and (torch.is_inference_mode_enabled() or not cached[1].lam.is_inference())
        ):
            return cached[1]
        partition = self._partition_on(train_x.device)
        # its check of the inputs names them train_x (changed in place, or bound with validation off)
        progress = getattr(self, "progress", False)  # a kernel pickled before the option: none
        res = _kernel_block_mean(self.base_kernel, train_x, partition, self.chunk_size, progress)
        self._block_sums_cache = None if key is None else (key, res)
        return res

    def _block_sums_key(self, train_x: Tensor) -> tuple | None:
        """What the training block sums depend on, or None where they must be computed afresh (a gradient with
        respect to a parameter or the inputs is recorded: a kept result's graph may be freed by then; or one of them
        carries a forward-mode tangent, which ``requires_grad`` does not show: a kept result has none, and
        :func:`~bma_gp.kernel_block_mean` refuses such tensors in words; or one of them is a ``torch.func``
        transform's wrapper: a result made of wrappers is dead once the transform returns)."""
        state = [
            *self.base_kernel.named_parameters(),
            *self.base_kernel.named_buffers(),
            *_tensor_attributes(self.base_kernel),
        ]
        if torch.is_grad_enabled() and (train_x.requires_grad or any(t.requires_grad for _, t in state)):
            return None
        if any(functorch_wrapped(t) or has_forward_tangent(t) for t in [train_x, *(t for _, t in state)]):
            return None
        # the inputs by value too (O(n d) against the pass's O(n^2 d)): changed in place, or a deep copy's
        values = tuple((name, t.detach().clone()) for name, t in [("train_x", train_x), *state])
        return (
            self._data_version,
            train_x.shape,
            train_x.dtype,
            train_x.device,
            _settings_of(self.base_kernel),
            values,
        )

    def _centred(self, x_new: Tensor, train_x: Tensor) -> tuple[Tensor, Tensor]:
        """Both inputs minus the training inputs' (constant) column means, for a translation-invariant base kernel.

        ``base_kernel(x_new, train_x)`` has unequal inputs, where GPyTorch's distances (``torch.cdist``) are not
        centred: on float32 decimal years a periodic kernel's cross-covariances were off by up to 1."""
        if not translation_invariant(self.base_kernel):
            return x_new, train_x
        centre = train_x.detach().mean(-2, keepdim=True)
        return x_new - centre, train_x - centre

    def _cross_block_means(self, x_new: Tensor, train_x: Tensor) -> Tensor:
        """:math:`A_{ij}` = mean of ``base_kernel(x_new[i], X_j)``. # shape: (*batch, t, k)"""
        partition = self._partition_on(train_x.device)
        x_new, train_x = self._centred(x_new, train_x)
        n = train_x.shape[-2]
        # a batch kernel on unbatched inputs evaluates one matrix per batch entry
        batch = torch.broadcast_shapes(x_new.shape[:-2], train_x.shape[:-2], self.base_kernel.batch_shape)
        chunk = self.chunk_size or max(1, _CROSS_CHUNK_ENTRIES // max(1, n * math.prod(batch)))  # (an empty batch: 0)

        def block_means(rows: Tensor) -> Tensor:
            return partition.block_average(self._base_dense(rows, train_x), dim=-1)

        return _chunked_rows(block_means, x_new, chunk)

    def _cross_diagonal(self, x_new: Tensor, train_x: Tensor) -> Tensor:
        """:math:`A_{i c_i}` = mean of ``base_kernel(x_new[i], X_{c_i})``, ``c_i`` the block of training point ``i``:
        the diagonal of the cross-covariance of ``n`` new points with the training points, one chunk of rows at a
        time (no ``n x n`` or ``n x k`` matrix). # shape: (*batch, n)"""
        partition = self._partition_on(train_x.device)
        x_new, train_x = self._centred(x_new, train_x)
        n = train_x.shape[-2]
        batch = torch.broadcast_shapes(x_new.shape[:-2], train_x.shape[:-2], self.base_kernel.batch_shape)
        chunk = self.chunk_size or max(1, _CROSS_CHUNK_ENTRIES // max(1, n * math.prod(batch)))  # (an empty batch: 0)

        def own_block_means(rows: Tensor, labels: Tensor) -> Tensor:
            means = partition.block_average(self._base_dense(rows, train_x), dim=-1)  # (*b, c, k)
            return means.gather(-1, labels.unsqueeze(-1).expand(*means.shape[:-1], 1)).squeeze(-1)

        pieces = []
        for rows, labels in zip(x_new.split(chunk, dim=-2), partition.labels.split(chunk)):
            if torch.is_grad_enabled():
                pieces.append(torch.utils.checkpoint.checkpoint(own_block_means, rows, labels, use_reentrant=False))
            else:
                pieces.append(own_block_means(rows, labels))
        return torch.cat(pieces, dim=-1)

    def _train_diagonal(self, train_x: Tensor) -> Tensor:
        # lam_i + B_ii is the mean of the diagonal of block i: O(n), no block sums needed
        partition = self._partition_on(train_x.device)
        diag = kernel_diagonal(self.base_kernel, train_x, train_x)
        return partition.expand(partition.block_average(diag, dim=-1), dim=-1)

    def _num_train_rows(self, x: Tensor) -> int:
        """n if ``x`` starts with the training inputs (possibly followed by new points), else 0."""
        train_x = self._train_x
        n = train_x.shape[-2]
        if x.shape[-2] < n or x.shape[-1] != train_x.shape[-1]:
            return 0
        return n if _same_rows(x[..., :n, :], train_x) else 0

    # ------------------------------------------------------------------ kernel interface
    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params
    ) -> Tensor | LinearOperator:
        if last_dim_is_batch:
            raise NotImplementedError(
                "BlockMeanKernel does not support GPyTorch's deprecated last_dim_is_batch mode, in which "
                "AdditiveStructureKernel and ProductStructureKernel evaluate their base kernel on one input column "
                "at a time. Build the sum (or product) over the columns instead: AdditiveKernel(*[BlockMeanKernel("
                "RBFKernel(active_dims=[j]), train_x, partition) for j in range(d)]) (ProductKernel for a product)."
            )
        check_eager_inputs(self, x1, x2)  # inside a model evaluated with lazily_evaluate_kernels(False)
        train_x = self._train_x.to(device=x1.device, dtype=x1.dtype)
        r1, r2 = self._num_train_rows(x1), self._num_train_rows(x2)
        if r1 or r2:
            # the training rows as the model passed them: equal in value to the bound inputs (so they were recognised),
            # but where either tracks a gradient, the tensor the model is called with is the one differentiated, as
            # for any GPyTorch kernel (the bound one took the gradient, or a stale graph of it raised on a second
            # backward pass, when a learnable input transform rebuilt the inputs every iteration)
            rows = (x1 if r1 else x2)[..., : train_x.shape[-2], :]
            if (rows.requires_grad or train_x.requires_grad) and rows.shape[-2:] == train_x.shape[-2:]:
                train_x = rows
        new1, new2 = x1[..., r1:, :], x2[..., r2:, :]

        if diag:
            if x1.shape[-2] != x2.shape[-2]:  # a rectangular matrix's diagonal, read entry by entry from the
                # structured operator (its dense (n + t1) x (n + t2) matrix is not formed)
                full = to_linear_operator(self.forward(x1, x2))
                index = torch.arange(min(x1.shape[-2], x2.shape[-2]), device=x1.device)
                return full[..., index, index]
            parts, m = [], max(r1, r2)
            if r1 and r2:
                parts.append(self._train_diagonal(train_x))
            elif m:  # training point i against new point i: the mean of k over its block, O(n * chunk)
                parts.append(self._cross_diagonal((x2 if r1 else x1)[..., :m, :], train_x))
            if x1.shape[-2] > m or not parts:  # (no points at all: the base kernel's empty diagonal)
                parts.append(kernel_diagonal(self.base_kernel, x1[..., m:, :], x2[..., m:, :]))
            # the inputs' batch too: the training rows' diagonal is computed once, unbatched (as kernel(x1, x2) is)
            batch = torch.broadcast_shapes(
                x1.shape[:-2], x2.shape[:-2], self.batch_shape, *(p.shape[:-1] for p in parts)
            )
            return torch.cat([p.expand(*batch, p.shape[-1]) for p in parts], dim=-1)

        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], self.batch_shape)
        res = self._full(train_x, x1, x2, r1, r2, new1, new2)
        if res.shape[:-2] != batch:
            res = res.expand(*batch, *res.shape[-2:])
        return res

    def _full(self, train_x, x1, x2, r1, r2, new1, new2) -> LinearOperator:
        t1, t2 = new1.shape[-2], new2.shape[-2]
        same_inputs = x1 is x2 or (x1.shape == x2.shape and r1 == r2 and torch.equal(new1, new2))
        if r1 and r2 and not t1 and not t2:
            return self._train_block_mean(train_x)
        if r1 and r2 and same_inputs:
            return self._joint_block_mean(train_x, new1)
        if not r1 and r2 and not t2:
            return BlockCrossLinearOperator(self._cross_block_means(new1, train_x), self._partition_on(train_x.device))
        if r1 and not t1 and not r2:
            cross = BlockCrossLinearOperator(self._cross_block_means(new2, train_x), self._partition_on(train_x.device))
            return cross.mT
        if not r1 and not r2:
            return to_linear_operator(self._base_dense(new1, new2))
        if not r1 and r2:  # new points against the training points and more new points (a fantasy model's data)
            return self._joint_cross(train_x, new1, new2)
        if r1 and not r2:
            return self._joint_cross(train_x, new2, new1).mT
        if r1 and r2 and not t1:  # the training points against them and more new points (a fantasy model's data):
            # the leading rows of the block mean operator of all of them, not the n x (n + t) matrix
            return LeadingRowsLinearOperator(self._joint_block_mean(train_x, new2, warn=False), r1)
        if r1 and r2 and not t2:
            return LeadingRowsLinearOperator(self._joint_block_mean(train_x, new1, warn=False), r2, transposed=True)
        # the training points and new points against them and other new points
        return self._joint_mixture(train_x, new1, new2)

    def _joint_block_mean(self, train_x: Tensor, x_new: Tensor, warn: bool = True) -> BlockMeanLinearOperator:
        """Training points followed by new points: one block mean operator over ``k + t`` blocks (``warn``: about
        an eager evaluation in eval mode, where ``x1`` and ``x2`` are both the training and new points)."""
        eager = not gpt_settings.lazily_evaluate_kernels.on() and not _inside_lazy_evaluation()
        if warn and not self.training and eager:
            # the user switched lazy evaluation off: an ExactGP in eval mode evaluates its kernel on
            # cat(train_x, test_x) at once here, and GPyTorch then never asks this kernel for its prediction
            # strategy. Inside LazyEvaluatedKernelTensor.evaluate_kernel the setting is off because GPyTorch
            # evaluates a lazy kernel tensor (kernel(x).to_dense(), a fantasy update), not because of the user.
            warnings.warn(_EAGER_PREDICTION_MESSAGE, ClosedFormFallbackWarning, stacklevel=2)
        train = self._train_block_mean(train_x)
        cross = self._cross_block_means(x_new, train_x)  # (*b, t, k)
        new_new = self._base_dense(x_new, x_new)  # (*b, t, t)
        k, t = train.partition.num_blocks, x_new.shape[-2]
        batch = torch.broadcast_shapes(train.lam.shape[:-1], cross.shape[:-2], new_new.shape[:-2])
        lam = torch.cat([train.lam.expand(*batch, k), train.lam.new_zeros(*batch, t)], dim=-1)
        top = torch.cat([train.B.expand(*batch, k, k), cross.mT.expand(*batch, k, t)], dim=-1)
        bottom = torch.cat([cross.expand(*batch, t, k), new_new.expand(*batch, t, t)], dim=-1)
        return BlockMeanLinearOperator(lam, torch.cat([top, bottom], dim=-2), _joint_partition(train.partition, t))

    def _joint_cross(self, train_x: Tensor, rows: Tensor, x_new: Tensor) -> BlockCrossLinearOperator:
        r"""New points ``rows`` against the training points followed by the new points ``x_new`` (the training
        inputs of a fantasy model): :math:`[A, k(\text{rows}, x_{new})] P^\top` over the partition of
        :meth:`_joint_block_mean`, so that prediction against those points stays closed form (``t x (k + m)``
        values, not the ``t x (n + m)`` matrix)."""
        partition = self._partition_on(train_x.device)
        cross = self._cross_block_means(rows, train_x)  # (*b, t, k)
        new_new = self._base_dense(rows, x_new)  # (*b, t, m)
        batch = torch.broadcast_shapes(cross.shape[:-2], new_new.shape[:-2])
        values = torch.cat([cross.expand(*batch, *cross.shape[-2:]), new_new.expand(*batch, *new_new.shape[-2:])], -1)
        return BlockCrossLinearOperator(values, _joint_partition(partition, x_new.shape[-2]))

    def _joint_mixture(self, train_x: Tensor, new1: Tensor, new2: Tensor) -> LinearOperator:
        r"""The training points followed by the new points ``new1`` against the training points followed by other new
        points ``new2``: rows ``0 .. n + t1`` and columns ``0 .. n`` and ``n + t1 .. n + t1 + t2`` of the block mean
        operator :math:`M` of the training points, ``new1`` and ``new2`` (:meth:`_joint_block_mean` over
        ``k + t1 + t2`` blocks), which holds every entry: the block means of the training points, the cross block
        means of either new point set and the base kernel between ``new1`` and ``new2``. The rows and columns are
        taken lazily (a :class:`~bma_gp.FallbackIndexedLinearOperator` of :math:`M`): products cost
        :math:`O(n + (k + t_1 + t_2)^2)` per column and nothing ``n x n`` is formed but by ``to_dense``."""
        n, t1, t2, d = train_x.shape[-2], new1.shape[-2], new2.shape[-2], new1.shape[-1]
        batch = torch.broadcast_shapes(new1.shape[:-2], new2.shape[:-2])
        new = torch.cat([new1.expand(*batch, t1, d), new2.expand(*batch, t2, d)], dim=-2)
        joint = self._joint_block_mean(train_x, new, warn=False)
        device = joint.lam.device
        columns = torch.cat([torch.arange(n, device=device), torch.arange(n + t1, n + t1 + t2, device=device)])
        return joint[..., : n + t1, columns]

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return 1

    def prediction_strategy(self, train_inputs, train_prior_dist, train_labels, likelihood):
        strategy = BlockMeanPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)
        prior = train_prior_dist.lazy_covariance_matrix
        if isinstance(prior, LinearOperator) and not isinstance(prior.evaluate_kernel(), BlockMeanLinearOperator):
            check_training_inputs(strategy)  # a kernel around this one gave it other columns: says so, with the fix
            raise ValueError(
                "the model's training inputs do not match BlockMeanKernel.train_x, so the training covariance is "
                "not the block mean approximation. After model.set_train_data(x, y), also call "
                "kernel.set_train_data(x, partition) on the BlockMeanKernel."
            )
        return record_bound_data(strategy, self)


#: ``torch.nn.Module``'s own bookkeeping in ``vars(module)``: not settings of a kernel
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _setting_attributes(module: torch.nn.Module):
    """``(name, value)`` of the attributes a module keeps besides its parameters, buffers and submodules (which live
    in torch's own dictionaries) and ``torch.nn.Module``'s bookkeeping."""
    return ((k, v) for k, v in vars(module).items() if k not in _MODULE_INTERNALS)


def _tensor_attributes(kernel: Kernel) -> list[tuple[str, Tensor]]:
    """The tensors kept as plain attributes of the modules of ``kernel`` (not registered as parameters or buffers: a
    custom kernel's ``self.weights = torch.tensor(...)``), compared by value like the parameters."""
    return [
        (f"{name}.{k}" if name else k, v)
        for name, module in kernel.named_modules()
        for k, v in _setting_attributes(module)
        if torch.is_tensor(v)
    ]


def _setting_value(name: str, value, depth: int = 0):
    """A comparable stand-in for a non-tensor attribute: numbers and strings by value; lists, tuples and dicts by their
    items (tensors in them by their bytes, so that a change in place is seen); a numpy array by its bytes; another
    public attribute (a function such as ``ArcKernel``'s ``delta_func``, another object) by identity, held so that
    its id is not reused. Another private attribute is left out: GPyTorch keeps its bookkeeping there (memoisation
    caches, the registries of priors and constraints), whose objects a deep copy (a fantasy model's kernel) makes
    anew."""
    plain = (bool, int, float, str, type(None))
    if type(value) in plain:
        return value
    if name.startswith("_"):
        return None
    if torch.is_tensor(value):  # inside a container (a module's own tensors are compared as tensors)
        t = value.detach().cpu().contiguous()
        return ("tensor", t.dtype, tuple(t.shape), t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.tolist())
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if depth < 4 and isinstance(value, (list, tuple)):
        return (type(value), tuple(_setting_value(name, v, depth + 1) for v in value))
    if depth < 4 and isinstance(value, dict):
        return (type(value), tuple((repr(k), _setting_value(name, v, depth + 1)) for k, v in value.items()))
    return ("object", id(value), _Held(value))


class _Held:
    """An object kept in a cache key, equal only to itself (its own ``__eq__`` may not return a bool: numpy)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __eq__(self, other) -> bool:
        return isinstance(other, _Held) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def _settings_of(kernel: Kernel) -> tuple:
    """The class and the other attributes of every module of ``kernel``, but ``training`` and the tensors
    (:func:`_tensor_attributes`, compared by value): what its values depend on besides its parameters and buffers (a
    Matern kernel's ``nu``, a polynomial kernel's ``power``, a replaced inner kernel whose parameters have the same
    names and values, a distance function replaced on the kernel)."""
    return tuple(
        (
            name,
            type(module),
            tuple(
                sorted(
                    (
                        (k, _setting_value(k, v))
                        for k, v in _setting_attributes(module)
                        if k != "training" and not torch.is_tensor(v)
                    ),
                    key=lambda item: item[0],
                )
            ),
        )
        for name, module in kernel.named_modules()
    )


def _same_key(a: tuple, b: tuple) -> bool:
    """Whether two :meth:`BlockMeanKernel._block_sums_key` values agree (the inputs and parameters by value)."""
    if a[:5] != b[:5] or len(a[5]) != len(b[5]):
        return False
    return all(
        n == m and x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
        for (n, x), (m, y) in zip(a[5], b[5])
    )


def _joint_partition(partition: Partition, t: int) -> Partition:
    """The training blocks followed by one singleton block per new point (``k + t`` blocks)."""
    k, labels = partition.num_blocks, partition.labels
    return Partition.from_labels(torch.cat([labels, torch.arange(k, k + t, device=labels.device)]), num_blocks=k + t)


def _kernel_block_mean(
    kernel: Kernel, x: Tensor, partition: Partition, chunk_size: int | None, progress: bool | None = False
) -> BlockMeanLinearOperator:
    """The block mean of ``kernel(x, x)`` on the training inputs: :func:`bma_gp.kernel_block_mean`, its errors about
    the inputs naming them ``train_x``."""
    return block_mean_of_kernel(kernel, x, partition, chunk_size, progress=progress, x_name="train_x")
