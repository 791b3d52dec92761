"""A covariance over integer group ids: a block mean matrix exactly, with no approximation."""

from __future__ import annotations

import functools
import operator
import threading
import warnings

import torch
from gpytorch.constraints import Interval, Positive
from gpytorch.kernels import Kernel
from gpytorch.priors import Prior
from linear_operator import to_linear_operator
from linear_operator.operators import (
    DenseLinearOperator,
    DiagLinearOperator,
    LinearOperator,
    MatmulLinearOperator,
    SumLinearOperator,
)
from torch import Tensor

from bma_gp import settings
from bma_gp._autograd import functorch_active
from bma_gp._broadcast import shared_batch_entry
from bma_gp._warnings import ClosedFormFallbackWarning
from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator
from bma_gp.block_mean_sum_linear_operator import BlockMeanSumLinearOperator
from bma_gp.kernels._active_dims import call_checking_active_dims
from bma_gp.kernels._kept import KeptByInput
from bma_gp.kernels.block_cross_linear_operator import BlockCrossLinearOperator
from bma_gp.kernels.prediction_strategy import BlockMeanPredictionStrategy
from bma_gp.partition import Partition

__all__ = ["GroupKernel", "check_group_ids"]


def as_int(value, name: str, what: str) -> int:
    """``value`` as a Python int: any integer (a Python int, a NumPy integer, a one-element integer tensor such as
    ``ids.max() + 1``), not a bool or a float; else ``ValueError`` that names ``name`` and says ``what`` it must be."""
    if isinstance(value, bool) or (torch.is_tensor(value) and value.dtype == torch.bool):
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {value!r}.") from None


def as_real_values(value, like: Tensor, name: str, what: str, kind: str = "real numbers") -> Tensor:
    """``value`` (a number, list, array or tensor) as a real tensor on ``like``'s device: floating point tensors and
    arrays keep their dtype, anything else (Python numbers, integers) takes ``like``'s, so that ``0.1`` is not rounded
    to float32 first. ``TypeError`` naming ``name`` where it holds no real numbers: a string, ``None`` or a ragged
    list (``name must be <what>``), or a bool or complex dtype (``name must hold <kind>``; torch would drop an
    imaginary part with only a warning). Reads nothing but ``value``: a setter that calls it first changes nothing
    when it raises. The noise setters of :mod:`bma_gp.likelihoods` convert their values the same way."""
    try:
        given = value if torch.is_tensor(value) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):  # strings, None, ragged lists: torch's message names nothing
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r:.60}.") from None
    if given.dtype == torch.bool or given.dtype.is_complex:
        fix = "its real part, value.real, where the imaginary part is 0" if given.dtype.is_complex else "value.float()"
        raise TypeError(f"{name} must hold {kind}, got dtype {given.dtype}; pass {what} ({fix}).")
    if torch.is_tensor(value) or hasattr(value, "dtype"):  # a tensor or an array: its floating point dtype stays
        return given.to(device=like.device, dtype=given.dtype if given.dtype.is_floating_point else like.dtype)
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _same_inputs(x1: Tensor, x2: Tensor) -> bool:
    """Whether ``x2`` is ``x1`` or holds the same values (one comparison pass), so that its ids need no second check:
    GPyTorch selects ``active_dims`` from ``x1`` and ``x2`` separately, so a training call ``kernel(x)`` reaches
    ``forward`` with two equal tensors, and each took the ids' checks (a few passes and a host read-back: 10% of a
    training step with three groupings at n = 4e6). Not under a :mod:`torch.func` transform or on the meta device."""
    if x2 is x1:
        return True
    if not (torch.is_tensor(x1) and torch.is_tensor(x2)) or x1.shape != x2.shape or x1.dtype != x2.dtype:
        return False
    if x1.device != x2.device or x1.device.type == "meta" or functorch_active():
        return False
    return bool(torch.equal(x1, x2))


def check_group_ids(values: Tensor, num_groups: int, name: str = "x") -> Tensor:
    """``values`` (*batch, n) as a LongTensor of group ids; ``ValueError`` unless every entry is an integer in
    ``[0, num_groups)`` (floating point values must be whole numbers, and below the size from which the dtype merges
    neighbouring integers: ``2^24`` in float32, ``2^53`` in float64)."""
    if values.device.type == "meta":  # torch's own error reads ".item() cannot be called on meta tensors"
        raise ValueError(
            f"{name} is on the meta device, which holds no values, and the covariance depends on the group ids; "
            "pass the ids on a real device (the CPU or an accelerator)."
        )
    if values.dtype == torch.bool or values.dtype.is_complex:
        raise ValueError(f"{name} must hold integer group ids, got dtype {values.dtype}.")
    if values.numel() == 0:
        return values.long()
    if not values.dtype.is_floating_point and not values.dtype.is_signed and values.dtype != torch.uint8:
        # uint16, uint32, uint64 (polars' category codes, hashes) have no comparisons in torch: compared as int64,
        # exact but for uint64 ids from 2^63 on, which wrap to negative numbers
        signed = values.long()
        if bool((signed < 0).any()):
            raise ValueError(
                f"{name} holds a group id of 2^63 or more, which is not an integer group id in [0, {num_groups}); "
                f"group ids must be whole numbers 0 .. num_groups - 1 = {num_groups - 1}."
            )
        values = signed
    bad = (values < 0) | (values >= num_groups)
    if values.dtype.is_floating_point:
        bad = bad | (values != values.round())
        exact = int(2 / torch.finfo(values.dtype).eps)  # from here on neighbouring integers round together
        if num_groups > exact and bool((values.abs() >= exact).any()):
            wider = "pass the inputs in float64, or " if values.dtype != torch.float64 else ""  # none is wider
            raise ValueError(
                f"{name} holds group ids of {exact} or more in {values.dtype}, which cannot tell them apart (ids "
                f"{exact} and {exact + 1} are one number there), so distinct groups would merge; {wider}relabel the "
                "ids 0 .. k-1 (bma_gp.partition_builders.group_partition(ids).labels)."
            )
    if bool(bad.any()):
        value = values[bad].reshape(-1)[0].item()
        new_level = (
            " A level not seen in training needs an id of its own within num_groups: reserve ids for such levels "
            "when building the kernel (num_groups = levels seen + 1, the spare id for every new level, as the "
            "examples do); its effect is then predicted as 0."
            if value == num_groups
            else ""
        )
        if isinstance(value, float) and 0 <= value < num_groups and 0 < abs(value - round(value)) < 0.1:
            new_level = (
                " A value this close to an id is often an approximate GP's inducing points moved by training "
                "(learn_inducing_locations=True: an optimiser with weight decay, such as AdamW, moves even a column "
                "whose gradient is 0): keep them fixed (learn_inducing_locations=False), or keep the inducing points "
                "out of weight decay."
            )
        raise ValueError(
            f"{name} holds {value!r}, which is not an integer group id in [0, {num_groups}); "
            f"group ids must be whole numbers 0 .. num_groups - 1 = {num_groups - 1}.{new_level}"
        )
    return values.long()


def _shared_ids(ids: Tensor) -> Tensor | None:
    """The id vector if every batch entry of ``ids`` (*batch, n) holds the same ids, else None. An empty batch holds
    no ids at all: any vector describes it, so the first of the ``n`` rows repeated (a one-group partition) is
    returned, and the result keeps the empty batch shape."""
    if ids.dim() > 1 and 0 in ids.shape[:-1]:
        return ids.new_zeros(ids.shape[-1])
    return shared_batch_entry(ids, 1)


def _shared_rows(ids: Tensor, covariate: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(ids, covariate)`` as 1-D vectors if every batch entry holds the same rows, else None."""
    shared_ids, shared_cov = _shared_ids(ids), _shared_ids(covariate)
    if shared_ids is None or shared_cov is None:
        return None
    return shared_ids, shared_cov


def _present_partition(ids: Tensor) -> tuple[Tensor, Partition]:
    """The ids that occur (sorted) and the partition of the positions by id, relabelled ``0 .. k-1``."""
    present, labels = torch.unique(ids, sorted=True, return_inverse=True)
    return present, Partition.from_labels(labels, num_blocks=present.numel())


class _PresentCache(KeptByInput):
    """The last few :func:`_present_partition` results of a kernel, with copies of their ids: an eval-mode prediction
    evaluates the covariances of the (unchanged) training inputs with the test inputs at every call, and the sorts
    of the ``n`` training ids cost 53 of 82 ms per one-point prediction at ``n = 10^6`` (two id vectors per call:
    the training ids and the joint ones); comparing them costs one pass."""

    #: id vectors kept (a prediction alternates between two: the training ids and the joint ones)
    SIZE = 3

    def __init__(self) -> None:
        super().__init__(self.SIZE)


def _columns_of(rows: Tensor, present: Tensor) -> Tensor:
    """The position of each id of ``rows`` among the sorted ``present`` ids, ``-1`` for an id not among them."""
    position = torch.searchsorted(present, rows).clamp_max(present.numel() - 1)
    return torch.where(present[position] == rows, position, -1)


#: With a cross-group factor (``rank > 0``), the covariance among one set of inputs that hold more groups than
#: this is a diagonal block term plus a low-rank root (:meth:`GroupKernel._factor_train`: ``r x r`` work after
#: eliminating the grouping) instead of a block mean operator with a dense ``k x k`` ``B`` (``k^3`` work, and every
#: matrix function of the one-partition form). See docs/mixed.md for the measured crossover.
FACTOR_DENSE_MAX_GROUPS = 256

#: ``.tasks``: the number of tasks while this thread evaluates a ``MultitaskKernel``'s data covariance (0 outside),
#: set by :func:`install`'s hook of ``MultitaskKernel.forward``.
_TASK_FACTOR = threading.local()


def _factor_form(k: int) -> bool:
    """Whether a ``GroupKernel(rank=r)`` over ``k`` groups present returns its covariance as a diagonal term plus the
    low-rank root ``P W`` (past :data:`FACTOR_DENSE_MAX_GROUPS`), not as one block mean matrix with a dense ``B``.
    Inside a ``MultitaskKernel`` it stays one block mean matrix while ``k t`` fits ``max_capacitance_size``: the
    Kronecker closed form takes a block mean factor (a sum there left it for linear_operator's ``n x n``
    eigendecomposition), and factorises the ``k t x k t`` core anyway."""
    if k <= FACTOR_DENSE_MAX_GROUPS:
        return False
    tasks = getattr(_TASK_FACTOR, "tasks", 0)
    return not (tasks and k * tasks <= settings.max_capacitance_size.value())


def install() -> None:
    """Mark the evaluation of a ``MultitaskKernel``'s data covariance (idempotent), for :func:`_factor_form`."""
    from gpytorch.kernels import MultitaskKernel

    original = MultitaskKernel.__dict__["forward"]
    if hasattr(original, "_bma_gp_original"):
        return

    @functools.wraps(original)
    def forward(self, x1, x2, *args, **params):
        outer = getattr(_TASK_FACTOR, "tasks", 0)
        _TASK_FACTOR.tasks = self.num_tasks
        try:
            return original(self, x1, x2, *args, **params)
        finally:
            _TASK_FACTOR.tasks = outer

    forward._bma_gp_original = original  # type: ignore[attr-defined]
    MultitaskKernel.forward = forward


def _warn_dense(kernel: GroupKernel, what: str) -> None:
    """The warning of a :class:`GroupKernel` that assembles its covariance densely, in training mode only.

    In eval mode the dense matrix is what a model asks for between test points that differ across a batch (the
    ``(b, q, d)`` inputs of batched acquisition functions): the prediction needs no solve with it, and a training
    covariance assembled this way is announced by the solves against it (and was by this warning in training)."""
    if not kernel.training:
        return
    warnings.warn(
        f"GroupKernel: the {what} differ across the batch entries of both inputs, so they share no partition and "
        "the kernel returns a dense (*batch, n1, n2) matrix, whose solves leave the closed forms. Give every batch "
        "entry the same inputs (a batch of models on shared data), or fit the entries one at a time.",
        ClosedFormFallbackWarning,
        stacklevel=4,
    )


def fit_parameter_shape(module, value: Tensor, param: Tensor) -> Tensor | None:
    """``value`` broadcast to the shape of ``param`` (a parameter of ``module``), or None where it does not fit.

    Where ``module`` is not strict (GPyTorch's ``pyro_load_from_samples`` sets its modules so while it calls the
    priors' setting closures with samples of shape ``(*sample_shape, *param.shape)``) a value with leading sample
    dimensions is taken too, broadcast to ``(*sample_shape, *param.shape)``: the parameter takes the batch of samples,
    as GPyTorch's own setters let it (``Module.initialize``). Its own trailing shape must still be ``param``'s."""
    try:
        return value.expand_as(param)
    except RuntimeError:
        pass
    if getattr(module, "_strict_init", True):
        return None
    try:
        shape = torch.broadcast_shapes(value.shape, param.shape)
    except RuntimeError:
        return None
    if param.dim() and shape[len(shape) - param.dim() :] != param.shape:
        return None
    return value.expand(shape).contiguous()  # it becomes the parameter's data: no stride-0 view


def _matrix_prior_size(prior) -> int | None:
    """The size ``n`` of the ``n x n`` matrices a matrix prior is on, where it says (``LKJPrior``'s ``n``,
    ``LKJCovariancePrior``'s correlation prior, a square ``event_shape``), else None."""
    if prior is None:
        return None
    for candidate in (prior, getattr(prior, "correlation_prior", None)):
        n = getattr(candidate, "n", None)
        if isinstance(n, int):
            return n
        event = getattr(candidate, "event_shape", None)
        if isinstance(event, torch.Size) and len(event) == 2 and event[0] == event[1]:
            return int(event[0])
    return None


class _NotForThisKernel(AttributeError, NotImplementedError):
    """A property that this configuration of the kernel does not have (``covar_matrix`` with ``slope=True``,
    ``slope_covar`` without): a ``NotImplementedError`` with the reason, and an ``AttributeError`` so that ``hasattr``,
    ``getattr(kernel, name, default)`` and torch's module inspection (``torch.jit.trace``, which probes every
    attribute) read it as absent, where it escaped them."""


class GroupKernel(Kernel):
    r"""A random effect per group: a covariance over integer group ids.

    .. math::

        k(g, g') = C_{g g'}, \qquad C = v I \;(\text{default}), \qquad
        C = W W^\top + \operatorname{diag}(v) \;(\text{in general}),

    with :math:`v > 0` and :math:`W` of shape ``(num_groups, rank)``. With default arguments
    this is lme4's random intercept ``(1 | g)``: one shared variance :math:`v`, independent
    group effects, no cross-group part. Options:

    * ``per_group_variance=True``: one variance :math:`v_g` per group (``num_groups``
      parameters; a maximum-likelihood fit sets many of them to 0 on small data);
    * ``rank=r``: a rank-:math:`r` cross-group part :math:`W W^\top` (correlated group effects,
      like :class:`gpytorch.kernels.IndexKernel`; :math:`W` starts random);
    * ``slope=True``: a random slope on a covariate :math:`x` (see below).

    **Random slopes.** With ``slope=True`` the inputs have two columns, the group id and then the
    covariate (``active_dims=[id_column, covariate_column]``, in that order), and

    .. math::

        k((g, x), (g', x')) = [g = g']\; [1, x]\, S\, [1, x']^\top, \qquad
        S = \begin{bmatrix} v_0 & \rho \sqrt{v_0 v_1} \\ \rho \sqrt{v_0 v_1} & v_1 \end{bmatrix},

    one 2 x 2 covariance :math:`S` of (intercept, slope) shared by all groups (:attr:`slope_covar`),
    with variances ``var`` :math:`= (v_0, v_1) > 0` and correlation ``corr`` :math:`= \rho \in (-1, 1)`.
    In lme4's terms:

    * ``GroupKernel(k, slope=True)``: ``(1 + x | g)``, correlated intercept and slope;
    * ``GroupKernel(k, slope=True, correlated=False)``: ``(x || g)`` = ``(1 | g) + (0 + x | g)``
      (:math:`\rho = 0`; not invariant under a shift of :math:`x`, as in lme4);
    * ``GroupKernel(k, slope=True, intercept=False)``: ``(0 + x | g)``, slope only (``var`` is
      :math:`(v_1,)`).

    On one set of inputs this is returned as weighted block terms of a
    :class:`~bma_gp.BlockMeanSumLinearOperator` (zero diagonal) over the partition by group id:
    weight :math:`1` (the intercept), weight :math:`x` (the slope) and, for the correlation,
    weight :math:`1 + c x` with a constant :math:`c` chosen so that all three coefficients are
    nonnegative (see ``docs/mixed.md``). So sums with the likelihood's noise, other groupings and
    an inducing-point root keep the closed forms. Against other inputs the result is the same terms,
    :math:`\sum_r b_r \operatorname{diag}(w_r(x_*)) P_*^\top P^\top \operatorname{diag}(w_r(x))` (``A_r P^T diag(w_r)``
    with one value :math:`b_r w_r(x_t)` per new point), built from
    :class:`~bma_gp.kernels.BlockCrossLinearOperator` terms (``t`` values and
    columns; ``t x k`` values only when the group ids differ across a batch). ``slope=True``
    does not combine with ``rank`` or ``per_group_variance``; ``covar_matrix`` is not defined
    for it.

    On one set of inputs the covariance is constant over every pair of groups, so it is returned
    as a :class:`~bma_gp.BlockMeanLinearOperator` with :math:`\lambda = 0` over the partition
    of the inputs by group id (only the ids that occur, relabelled ``0 .. k-1`` in increasing id
    order; :math:`B` is :math:`C` restricted to them, built in :math:`O(k^2)` without forming
    :math:`C`). With ``rank=0``, :math:`B` is exactly diagonal (its off-diagonal entries are
    zeros), so code that receives the operator can see that the effects are independent.
    Nothing is approximated. Against other inputs (e.g. test points) the result is a
    :class:`~bma_gp.kernels.BlockCrossLinearOperator` of size ``t x k``; an id that does not
    occur in training has covariance 0 with the training groups (with ``rank=0``), so its
    predicted effect is 0 with its prior variance. With ``rank=r`` (or ``per_group_variance=True``) its
    row of :math:`W` (its :math:`v_g`) gets no gradient in training and keeps its initial, random value,
    so its predicted effect is arbitrary; zero that row of ``covar_factor`` for an effect of 0.

    With ``rank=r`` and more than :data:`FACTOR_DENSE_MAX_GROUPS` groups present, the same matrix
    :math:`P (\operatorname{diag}(v) + W W^\top) P^\top` is returned as a
    :class:`~bma_gp.BlockMeanSumLinearOperator` instead: the diagonal block term :math:`P
    \operatorname{diag}(v) P^\top` plus the low-rank root :math:`P W` (row :math:`a` is :math:`W_{g_a}`),
    so the sums' closed forms eliminate the grouping and factorise an :math:`r \times r` matrix, not
    the :math:`k \times k` matrix :math:`B` (at 4,000 groups and rank 2 a training iteration takes
    milliseconds instead of about 20 s; docs/mixed.md). Against other inputs the covariance is then
    :math:`A P^\top + W_{\text{rows}} (P W)^\top`, which prediction at new inputs reads in closed form. Inside a
    ``MultitaskKernel`` it stays the block mean operator while ``k t`` fits ``max_capacitance_size`` (the Kronecker
    closed form needs one block mean factor).

    A block mean matrix with :math:`\lambda = 0` is singular wherever a group holds more than
    one input; the likelihood's noise (a constant diagonal) makes it positive definite, and
    the sum stays a block mean operator, so an :class:`~gpytorch.models.ExactGP` with a
    :class:`~gpytorch.likelihoods.GaussianLikelihood` trains and predicts in
    :math:`O(n + k^3)`, without CG, Lanczos or an :math:`n \times n` matrix.

    Args:
        num_groups: number of possible ids; inputs must be integers in ``[0, num_groups)``.
        rank: columns of :math:`W` (default 0: no cross-group part).
        per_group_variance: one variance per group instead of one shared variance (default False).
        prior: optional prior on the matrix :math:`C` (forms the ``num_groups x num_groups`` matrix), or with
            ``slope=True`` on :attr:`slope_covar`: a matrix prior such as
            :class:`~gpytorch.priors.LKJCovariancePrior`. A univariate prior (``GammaPrior``) is refused: it would
            be evaluated at every entry of :math:`C`, and its zero off-diagonal entries have log-density
            :math:`-\infty`; pass it as ``var_prior``.
        var_prior: optional prior on :attr:`var`, evaluated at each of its entries (the variance of
            ``(1 | g)``, or of each group with ``per_group_variance=True``, or of the intercept and the slope),
            as GPyTorch's ``ScaleKernel(outputscale_prior=...)`` is on its outputscale.
        var_constraint: constraint on :math:`v` (default ``Positive()``).
        slope: add a random slope on the second input column (default False).
        intercept: with ``slope=True``, keep the random intercept (default True); False is
            ``(0 + x | g)``.
        correlated: with ``slope=True`` and ``intercept=True``, learn the correlation
            :math:`\rho` of intercept and slope (default True); False fixes :math:`\rho = 0`.
        corr_constraint: constraint on :math:`\rho` (default ``Interval(-1, 1)``).
        **kwargs: ``batch_shape``, ``active_dims`` (select the id column, or the id and covariate
            columns with ``slope=True``) and the rest of :class:`~gpytorch.kernels.Kernel`'s arguments.

    Inputs have shape ``(*batch, n, 1)`` (one id column; floating point holding whole numbers,
    or an integer dtype), or ``(*batch, n, 2)`` with ``slope=True`` (ids, then a finite
    covariate). Ids that are not integers in ``[0, num_groups)`` raise ``ValueError``.

    Without a slope the covariance has the dtype of the kernel's parameters whatever the dtype of the inputs, as
    :class:`gpytorch.kernels.IndexKernel`'s does (ids are labels, not numbers). With ``slope=True`` the covariate
    is a number, so the covariance follows the promoted dtype of the covariate and the parameters, as GPyTorch's
    ``LinearKernel`` and ``RBFKernel`` do: a float64 covariate gives a float64 covariance even with float32
    parameters, and is never rounded to float32 (an integer covariate takes the parameters' dtype).

    Example:
        >>> kernel = GroupKernel(18)                      # (1 | Subject)
        >>> kernel.var.shape
        torch.Size([1])
        >>> GroupKernel(18, rank=2, per_group_variance=True).var.shape
        torch.Size([18])
        >>> slopes = GroupKernel(18, slope=True, active_dims=[1, 0])  # (1 + Days | Subject)
        >>> slopes.var.shape, slopes.corr.shape, slopes.slope_covar.shape
        (torch.Size([2]), torch.Size([1]), torch.Size([2, 2]))
    """

    has_lengthscale = False

    def __init__(
        self,
        num_groups: int,
        rank: int = 0,
        per_group_variance: bool = False,
        prior: Prior | None = None,
        var_constraint: Interval | None = None,
        slope: bool = False,
        intercept: bool = True,
        correlated: bool = True,
        corr_constraint: Interval | None = None,
        var_prior: Prior | None = None,
        **kwargs,
    ):
        num_groups = as_int(num_groups, "num_groups", "a positive int")
        if num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}.")
        rank = as_int(rank, "rank", f"an int in [0, num_groups={num_groups}]")
        if not 0 <= rank <= num_groups:
            raise ValueError(f"rank must be an int in [0, num_groups={num_groups}], got {rank!r}.")
        if not isinstance(per_group_variance, bool):
            raise TypeError(f"per_group_variance must be True or False, got {per_group_variance!r}.")
        if prior is not None and not isinstance(prior, Prior):
            raise TypeError(f"prior must be a gpytorch.priors.Prior, got {type(prior).__name__}.")
        event = getattr(prior, "event_shape", None)
        if prior is not None and isinstance(event, torch.Size) and len(event) < 2:
            raise ValueError(
                f"prior is a prior on the {'2 x 2 matrix slope_covar' if slope else 'num_groups x num_groups matrix C'}"
                f" (a matrix prior such as LKJCovariancePrior), but {type(prior).__name__} has event shape "
                f"{tuple(event)}: it would be evaluated at every entry, and the zero off-diagonal entries have "
                f"log-density -inf. For a prior on the variance pass var_prior={type(prior).__name__}(...)."
            )
        if prior is not None and slope and not intercept:
            raise ValueError(
                "prior is a prior on slope_covar, but (0 + x | g) (intercept=False) has no intercept: that matrix's "
                "intercept row and column are 0, and no matrix prior applies. Put a prior on the slope's variance "
                "with var_prior=... instead."
            )
        size = _matrix_prior_size(prior)
        wanted = 2 if slope else num_groups
        if size is not None and size != wanted:
            target = "slope_covar, the 2 x 2 covariance of (intercept, slope)" if slope else f"C, {wanted} x {wanted}"
            raise ValueError(
                f"prior is a prior on a {size} x {size} matrix, but it applies to {target}: build it for size "
                f"{wanted} (e.g. LKJCovariancePrior({wanted}, ...))."
            )
        if var_prior is not None and not isinstance(var_prior, Prior):
            raise TypeError(f"var_prior must be a gpytorch.priors.Prior, got {type(var_prior).__name__}.")
        for flag, value in (("slope", slope), ("intercept", intercept), ("correlated", correlated)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r}.")
        if not slope and not intercept:
            raise ValueError(
                "intercept=False needs slope=True: (0 + x | g) is GroupKernel(num_groups, slope=True, intercept=False)."
            )
        if slope and (rank or per_group_variance):
            raise ValueError(
                "slope=True takes one 2 x 2 covariance of (intercept, slope) shared by all groups: it does not "
                f"combine with rank={rank} or per_group_variance={per_group_variance}."
            )
        super().__init__(**kwargs)
        self.num_groups = num_groups
        self.rank = rank
        self.per_group_variance = per_group_variance
        self.slope = slope
        self.intercept = intercept
        self.correlated = bool(slope and intercept and correlated)
        for name, constraint in (("var_constraint", var_constraint), ("corr_constraint", corr_constraint)):
            if constraint is not None and not isinstance(constraint, Interval):  # torch: "float is not a Module ..."
                raise TypeError(
                    f"{name} must be a gpytorch.constraints.Interval (e.g. GreaterThan(1e-6), Interval(-0.5, 0.5)), "
                    f"got {type(constraint).__name__} {constraint!r:.60}; a prior goes to var_prior / prior."
                )
        if var_constraint is None:
            var_constraint = Positive()
        if rank > 0:
            self.register_parameter(
                "covar_factor", torch.nn.Parameter(torch.randn(*self.batch_shape, num_groups, rank))
            )
        else:
            self.register_parameter("covar_factor", None)
        if slope:
            num_vars = 2 if intercept else 1
        else:
            num_vars = num_groups if per_group_variance else 1
        self.register_parameter("raw_var", torch.nn.Parameter(torch.zeros(*self.batch_shape, num_vars)))
        self.register_constraint("raw_var", var_constraint)
        if self.correlated:
            self.register_parameter("raw_corr", torch.nn.Parameter(torch.zeros(*self.batch_shape, 1)))
            self.register_constraint("raw_corr", Interval(-1.0, 1.0) if corr_constraint is None else corr_constraint)
        else:
            if corr_constraint is not None:
                raise ValueError(
                    "corr_constraint needs a correlated intercept and slope (slope=True, intercept=True, "
                    "correlated=True)."
                )
            self.register_parameter("raw_corr", None)
        if prior is not None:  # a method, not a lambda, so that the module pickles (torch.save(model))
            # the prior on slope_covar of a correlated intercept and slope is a prior on (var, corr), one to one, so
            # its samples can be loaded (pyro_load_from_samples); C = W W^T + diag(v) is not one to one (nor C = v I
            # a general matrix), so that prior has no setting closure, as GPyTorch's IndexKernelPrior has none
            closure = self._prior_closure if self.correlated else None
            self.register_prior("GroupKernelPrior", prior, self._prior_param, closure)
        if var_prior is not None:
            self.register_prior("var_prior", var_prior, self._var_param, self._var_closure)

    def _prior_param(self, m: GroupKernel) -> Tensor:
        """What the prior is on: :attr:`slope_covar` with ``slope=True``, else :attr:`covar_matrix`."""
        return m.slope_covar if m.slope else m.covar_matrix

    def _var_param(self, m: GroupKernel) -> Tensor:
        return m.var

    def _var_closure(self, m: GroupKernel, value: Tensor) -> None:
        m.var = value

    def _prior_closure(self, m: GroupKernel, value: Tensor) -> None:
        """Set ``var`` and ``corr`` from a sample of :attr:`slope_covar` ``(*batch, 2, 2)`` (correlated slopes)."""
        what = "a tensor of 2 x 2 covariances of (intercept, slope)"
        value = as_real_values(value, m.raw_var, "slope_covar", what, "real covariances").to(m.raw_var.dtype)
        if value.dim() < 2 or tuple(value.shape[-2:]) != (2, 2):
            raise ValueError(
                f"slope_covar of shape {tuple(value.shape)} is no batch of 2 x 2 covariances of (intercept, slope); "
                "pass a tensor of shape (*batch, 2, 2)."
            )
        var = torch.stack([value[..., 0, 0], value[..., 1, 1]], -1)
        off = 0.5 * (value[..., 0, 1] + value[..., 1, 0])
        corr = (off / (var[..., 0] * var[..., 1]).sqrt()).unsqueeze(-1)
        raw_var = m._checked_var(var)
        raw_corr = m._checked_corr(corr)
        m.initialize(raw_var=raw_var, raw_corr=raw_corr)

    def local_load_samples(self, samples_dict, memo, prefix: str) -> None:
        """GPyTorch's, which sets the batch shape to ``(num_samples, *batch_shape)`` and calls the setting closures of
        the priors with the samples; where a closure raises, the kernel is left as it was (batch shape, parameters,
        strictness) and the error is raised."""
        batch_shape = self.batch_shape
        saved = {name: p.data for name, p in self._parameters.items() if p is not None}
        known = set(memo)
        try:
            super().local_load_samples(samples_dict, memo, prefix)
        except BaseException:
            setattr(self, "batch_shape", batch_shape)  # noqa: B010 (an assignment confuses mypy's property type)
            for name, data in saved.items():
                self._parameters[name].data = data
            memo.intersection_update(known)
            self._strict(True)
            raise

    # ------------------------------------------------------------------ parameters
    def initialize(self, **kwargs):
        """GPyTorch's ``initialize``, all or nothing: a refused value (``corr=2.0``) leaves the values set before it
        in the same call unset (a user trial: ``initialize(var=..., corr=2.0)`` raised, with ``var`` changed)."""
        saved = [(p, p.detach().clone()) for p in self.parameters()]
        try:
            return super().initialize(**kwargs)
        except BaseException:
            with torch.no_grad():
                for p, value in saved:
                    p.copy_(value)
            raise

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # NaN or inf in a raw variance or correlation (a diverged run's checkpoint), which the setters refuse, loaded
        # silently and surfaced later as a sum's non-finite input that named neither: refused here, this module left
        # as it was (torch raises the message after loading the other modules)
        for name in ("raw_var", "raw_corr", "covar_factor"):
            value = state_dict.get(prefix + name)
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                error_msgs.append(
                    f"{type(self).__name__} {prefix}{name} holds NaN or inf (from a run that diverged?): not loaded. "
                    "Load a checkpoint from before the divergence, or set finite values (kernel.var = ..., "
                    "kernel.corr = ...)."
                )
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @property
    def var(self) -> Tensor:
        """The variance :math:`v`: shape ``(*batch, 1)`` when shared (the default), ``(*batch, num_groups)``
        with ``per_group_variance=True``; with ``slope=True`` the variances of the intercept and the slope
        ``(*batch, 2)``, or of the slope alone ``(*batch, 1)`` with ``intercept=False``."""
        return self.raw_var_constraint.transform(self.raw_var)

    @var.setter
    def var(self, value) -> None:
        self.initialize(raw_var=self._checked_var(value))

    def _checked_var(self, value) -> Tensor:
        """``raw_var`` for the variance ``value``, checked (``ValueError`` naming ``var``; ``TypeError`` for a value
        that holds no real numbers, a string, ``None`` or a complex tensor); changes nothing. A batch of
        samples ``(*sample_shape, *var.shape)`` is taken where the kernel is not strict
        (:func:`fit_parameter_shape`: ``pyro_load_from_samples``)."""
        what = "a number or a tensor of variances"
        value = as_real_values(value, self.raw_var, "var", what, "real variances").to(self.raw_var.dtype)
        fitted = fit_parameter_shape(self, value, self.raw_var)
        if fitted is None:
            raise ValueError(
                f"var of shape {tuple(value.shape)} does not fit the kernel's variance of shape "
                f"{tuple(self.raw_var.shape)} (per_group_variance={self.per_group_variance}); pass a "
                "scalar or a tensor of that shape."
            )
        value = fitted
        constraint = self.raw_var_constraint
        raw = constraint.inverse_transform(value)
        # inside the constraint's open interval: a NaN, a value outside it, or its bound (var = 0 under Positive():
        # raw_var = -inf, whose gradient is 0, so training could never move it) is refused
        bad = ~torch.isfinite(raw) | ~torch.isfinite(value)
        if constraint.enforced and bool(bad.any()):
            raise ValueError(
                f"var holds {value[bad].reshape(-1)[0].item()!r}, not strictly inside the variance constraint "
                f"{constraint}; pass variances inside it (for Positive(): > 0, e.g. 1e-6 for an effect near 0), or "
                "build the kernel with another constraint (var_constraint=gpytorch.constraints.GreaterThan(bound))."
            )
        return raw

    def _lacks(self, name: str) -> str | None:
        """Why this kernel has no ``name`` (``covar_matrix`` with ``slope=True``, ``slope_covar`` without), or None."""
        if name == "covar_matrix" and self.slope:
            return (
                "a GroupKernel with slope=True has no covariance over group ids alone; its covariance per group is "
                "slope_covar, the 2 x 2 covariance of (intercept, slope)."
            )
        if name == "slope_covar" and not self.slope:
            return "slope_covar needs slope=True; an intercept-only kernel has covar_matrix."
        return None

    def __getattr__(self, name: str):
        # a property that raised AttributeError lands here (Python's fallback): torch.nn.Module's would replace the
        # reason with "has no attribute"
        reason = self._lacks(name) if name in ("covar_matrix", "slope_covar") else None
        if reason is not None:
            raise _NotForThisKernel(reason)
        return super().__getattr__(name)

    @property
    def covar_matrix(self) -> Tensor:
        r""":math:`C = W W^\top + \operatorname{diag}(v)`. # shape: (*batch, num_groups, num_groups)

        A kernel with ``slope=True`` has no covariance over ids alone (it depends on the covariate): see
        :attr:`slope_covar`."""
        if self.slope:
            raise _NotForThisKernel(self._lacks("covar_matrix"))
        return self._covar_between(None, None)

    @property
    def corr(self) -> Tensor | None:
        """The correlation of a group's intercept and slope, in ``(-1, 1)`` (``slope=True``,
        ``intercept=True``, ``correlated=True``; else ``None``). # shape: (*batch, 1)"""
        if self.raw_corr is None:
            return None
        return self.raw_corr_constraint.transform(self.raw_corr)

    @corr.setter
    def corr(self, value) -> None:
        self.initialize(raw_corr=self._checked_corr(value))

    def _checked_corr(self, value) -> Tensor:
        """``raw_corr`` for the correlation ``value``, checked (``ValueError`` naming ``corr``); changes nothing. Takes
        a batch of samples where the kernel is not strict, as :meth:`_checked_var`."""
        if self.raw_corr is None:
            raise ValueError("corr needs slope=True, intercept=True and correlated=True.")
        what = "a number or a tensor of correlations in (-1, 1)"
        value = as_real_values(value, self.raw_corr, "corr", what, "real correlations").to(self.raw_corr.dtype)
        fitted = fit_parameter_shape(self, value, self.raw_corr)
        if fitted is None:
            raise ValueError(
                f"corr of shape {tuple(value.shape)} does not fit the kernel's correlation of shape "
                f"{tuple(self.raw_corr.shape)}; pass a scalar or a tensor of that shape."
            )
        value = fitted
        if not bool((value.abs() < 1).all()):  # also NaN
            raise ValueError(
                f"corr must lie strictly inside (-1, 1), got {value.flatten().tolist()}: at +-1 the covariance of "
                "intercept and slope is singular and its parameter infinite. For a perfectly correlated slope use "
                "a value such as 0.999."
            )
        constraint = self.raw_corr_constraint
        raw = constraint.inverse_transform(value)
        outside = ~torch.isfinite(raw) | (value < constraint.lower_bound) | (value > constraint.upper_bound)
        if constraint.enforced and bool(outside.any()):  # a narrower corr_constraint (gpytorch's RuntimeError
            # named a likelihood's noise_constraint)
            raise ValueError(
                f"corr holds {value[outside].reshape(-1)[0].item()!r}, not strictly inside the correlation constraint "
                f"{constraint}; pass correlations inside it, or build the kernel with another corr_constraint."
            )
        return raw

    @property
    def slope_covar(self) -> Tensor:
        r""":math:`S`, the covariance of a group's (intercept, slope) (``slope=True`` only).

        :math:`S = [[v_0, \rho\sqrt{v_0 v_1}], [\rho\sqrt{v_0 v_1}, v_1]]` with ``var`` :math:`= (v_0, v_1)` and
        ``corr`` :math:`= \rho`; :math:`\rho = 0` with ``correlated=False``; with ``intercept=False`` the
        intercept row and column are zero. # shape: (*batch, 2, 2)"""
        if not self.slope:
            raise _NotForThisKernel(self._lacks("slope_covar"))
        var = self.var
        if not self.intercept:
            zero = torch.zeros_like(var)
            var = torch.cat([zero, var], -1)
        v0, v1 = var[..., 0], var[..., 1]
        if self.correlated:
            corr = self.corr
            assert corr is not None  # correlated kernels have it
            # sqrt(v0 v1), with derivative 0 where a variance is exactly 0 (a softplus far below 0): sqrt's infinite
            # derivative times the softplus's 0 was NaN in every gradient (the limit as the raw value falls is 0)
            prod = v0 * v1
            positive = prod > 0
            root = torch.where(positive, prod, torch.ones_like(prod)).sqrt()
            off = corr[..., 0] * torch.where(positive, root, torch.zeros_like(root))
        else:
            off = torch.zeros_like(v0)
        return torch.stack([torch.stack([v0, off], -1), torch.stack([off, v1], -1)], -2)

    def _variances_of(self, ids: Tensor) -> Tensor:
        """The variances ``v_g`` of the groups ``ids`` (1-D). # shape: (*batch, len(ids))"""
        var = self.var
        if self.per_group_variance:
            return var.expand(*var.shape[:-1], self.num_groups).index_select(-1, ids)
        return var.expand(*var.shape[:-1], ids.shape[-1])

    def _covar_between(self, rows: Tensor | None, cols: Tensor | None) -> Tensor:
        """:math:`C[rows][:, cols]` for 1-D id vectors (``None``: all ids), without forming :math:`C`.

        # shape: (*batch, len(rows), len(cols))"""
        G = self.num_groups
        var = self.var
        W = self.covar_factor
        if rows is None and cols is None:
            out = torch.diag_embed(var.expand(*var.shape[:-1], G))
            return out if W is None else out + W @ W.mT
        rows = torch.arange(G, device=var.device) if rows is None else rows
        cols = torch.arange(G, device=var.device) if cols is None else cols
        v_rows = self._variances_of(rows)
        if rows is cols:  # the training covariance: exactly diag(v) over the present ids
            out = torch.diag_embed(v_rows)
        else:
            out = v_rows.unsqueeze(-1) * (rows.unsqueeze(-1) == cols.unsqueeze(-2)).to(var.dtype)
        if W is not None:
            out = out + W.index_select(-2, rows) @ W.index_select(-2, cols).mT
        return out

    # ------------------------------------------------------------------ inputs
    def group_ids(self, x: Tensor, name: str = "x") -> Tensor:
        """Validate ``x`` and return its ids as a LongTensor (*batch, n).

        ``x`` has shape ``(*batch, n, 1)`` (the id column), or ``(*batch, n, 2)`` (the id column, then the
        covariate) for a kernel with ``slope=True``."""
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a tensor of group ids, got {type(x).__name__}.")
        columns = 2 if self.slope else 1
        if x.dim() < 2 or x.shape[-1] != columns:
            dims = self.active_dims
            # active_dims set, yet the columns arrive unselected: the kernel's forward was called by a container that
            # skips Kernel.__call__ (GPyTorch's MultitaskKernel), where its active_dims have no effect
            bypassed = (
                ""
                if dims is None or x.dim() < 2 or x.shape[-1] == len(dims)
                else f" This kernel's active_dims={dims.tolist()} were not applied: a kernel that calls its forward "
                "directly (GPyTorch's MultitaskKernel, and the MultitaskKernels of an LCMKernel) ignores them; set "
                "active_dims on that kernel instead, e.g. MultitaskKernel(GroupKernel(k), num_tasks=t, "
                "active_dims=[j]), or for an LCMKernel (whose constructor takes none) the attribute, "
                "lcm.active_dims = torch.tensor([j]) (build a BlockMeanKernel among its kernels on those columns)."
            )
            if self.slope:
                raise ValueError(
                    f"{name} must hold two columns, the group id and the slope covariate, shape (*batch, n, 2), "
                    f"got {tuple(x.shape)}; select them with active_dims=[id_column, covariate_column].{bypassed}"
                )
            raise ValueError(
                f"{name} must hold one column of group ids, shape (*batch, n, 1), got {tuple(x.shape)}; "
                f"select the id column with active_dims=[j].{bypassed}"
            )
        try:
            return check_group_ids(x[..., 0], self.num_groups, name)
        except ValueError as err:
            if not self.slope:
                raise
            raise ValueError(  # the likeliest cause: the columns swapped, covariate first
                f"{err} With slope=True the first of the two columns is the group id: "
                "active_dims=[id_column, covariate_column], in that order."
            ) from None

    def slope_covariate(self, x: Tensor, name: str = "x") -> Tensor:
        """The covariate column of ``x`` (*batch, n, 2) of a kernel with ``slope=True``. # shape: (*batch, n)"""
        values = x[..., 1]
        if not values.dtype.is_floating_point:
            values = values.to(self.raw_var.dtype)
        if settings.validate.on() and values.numel() and not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name} holds a slope covariate that is not finite (nan or inf).")
        return values

    def _present(self, ids: Tensor) -> tuple[Tensor, Partition]:
        """:func:`_present_partition` of ``ids`` (1-d), the last one kept (:class:`_PresentCache`)."""
        cache = self.__dict__.get("_present_cache")
        if cache is None:  # also for a kernel unpickled from an older version
            cache = self.__dict__["_present_cache"] = _PresentCache()
        return cache(ids, lambda: _present_partition(ids))

    # ------------------------------------------------------------------ kernel interface
    def __call__(self, x1, *args, **kwargs):
        return call_checking_active_dims(self, super().__call__, x1, args, kwargs)

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params
    ) -> Tensor | LinearOperator:
        if last_dim_is_batch:
            raise NotImplementedError(
                "GroupKernel does not support GPyTorch's deprecated last_dim_is_batch mode, in which "
                "AdditiveStructureKernel and ProductStructureKernel evaluate their base kernel on one input column "
                "at a time. Give each id column its own GroupKernel and add (or multiply) them: "
                "GroupKernel(k0, active_dims=[0]) + GroupKernel(k1, active_dims=[1])."
            )
        if not diag and 0 in (x1.shape[-2:-1] + x2.shape[-2:-1]):  # no points on one side: the empty matrix
            ids1, ids2 = self.group_ids(x1, "x1"), self.group_ids(x2, "x2")  # (a partition needs an index)
            batch = torch.broadcast_shapes(ids1.shape[:-1], ids2.shape[:-1], self.raw_var.shape[:-1])
            shape = (*batch, ids1.shape[-1], ids2.shape[-1])
            return to_linear_operator(torch.zeros(shape, dtype=self.raw_var.dtype, device=self.raw_var.device))
        if self.slope:
            return self._slope_forward(x1, x2, diag)
        ids1 = self.group_ids(x1, "x1")
        ids2 = ids1 if _same_inputs(x1, x2) else self.group_ids(x2, "x2")
        batch = torch.broadcast_shapes(ids1.shape[:-1], ids2.shape[:-1], self.raw_var.shape[:-1])
        if diag:
            if ids1.shape[-1] != ids2.shape[-1]:
                raise ValueError(
                    f"diag=True needs x1 and x2 of the same length, got {ids1.shape[-1]} and {ids2.shape[-1]}."
                )
            return self._covar_pairs(ids1, ids2, batch)

        shared1, shared2 = _shared_ids(ids1), _shared_ids(ids2)
        same = ids1 is ids2 or (ids1.shape == ids2.shape and torch.equal(ids1, ids2))
        if same and shared1 is not None:
            present, partition = self._present(shared1)
            k = present.numel()
            if self.covar_factor is None:  # C = diag(v): the operator holds the k variances, never a k x k matrix
                v = self._variances_of(present).expand(*batch, k)
                return BlockMeanLinearOperator(torch.zeros_like(v), v, partition, diagonal=True)
            if _factor_form(k):
                return self._factor_train(shared1, present, partition, batch)
            B = self._covar_between(present, present).expand(*batch, k, k)
            return BlockMeanLinearOperator(torch.zeros_like(B[..., 0]), B, partition)
        if shared2 is not None:
            return self._cross(ids1, shared2, batch)
        if shared1 is not None:
            return self._cross(ids2, shared1, batch).mT
        # ids that differ across batch entries: no shared partition; assemble densely
        _warn_dense(self, "group ids")
        return to_linear_operator(self._pairs(ids1, ids2).expand(*batch, ids1.shape[-1], ids2.shape[-1]))

    def _pairs(self, ids1: Tensor, ids2: Tensor) -> Tensor:
        r""":math:`C[g_a, g'_b]` for id tensors with batch dimensions, from :math:`v` and :math:`W` without forming the
        ``G x G`` matrix :math:`C = \operatorname{diag}(v) + W W^\top` (gathered from it, a batch of test sets over
        1,500 groups formed 2.25 million entries to read a few thousand). # shape: (*batch, n1, n2)"""
        G = self.num_groups
        var = self.var
        v = var.expand(*var.shape[:-1], G)
        W = self.covar_factor
        shapes = [ids1.shape[:-1], ids2.shape[:-1], v.shape[:-1]] + ([W.shape[:-2]] if W is not None else [])
        batch = torch.broadcast_shapes(*shapes)
        i1 = ids1.expand(*batch, ids1.shape[-1])
        i2 = ids2.expand(*batch, ids2.shape[-1])
        v1 = v.expand(*batch, G).gather(-1, i1)
        out = torch.where(i1.unsqueeze(-1) == i2.unsqueeze(-2), v1.unsqueeze(-1), torch.zeros_like(v1).unsqueeze(-1))
        if W is not None:
            r = W.shape[-1]
            Wb = W.expand(*batch, G, r)
            W1 = Wb.gather(-2, i1.unsqueeze(-1).expand(*batch, i1.shape[-1], r))
            W2 = Wb.gather(-2, i2.unsqueeze(-1).expand(*batch, i2.shape[-1], r))
            out = out + W1 @ W2.mT
        return out

    def _factor_train(self, ids: Tensor, present: Tensor, partition: Partition, batch: torch.Size) -> LinearOperator:
        r""":math:`P \operatorname{diag}(v) P^\top + (P W)(P W)^\top` among one set of inputs, with a rank-:math:`r`
        factor: a diagonal block term plus the low-rank root :math:`P W` (row :math:`a` is :math:`W_{g_a}`), so
        the sums' closed forms eliminate the grouping and factorise an :math:`r \times r` matrix instead of the
        :math:`k \times k` matrix :math:`B = \operatorname{diag}(v) + W W^\top`. The same matrix as the block mean
        operator of :math:`B`, without forming :math:`B`."""
        k, n = present.numel(), ids.shape[-1]
        v = self._variances_of(present).expand(*batch, k)
        W = self.covar_factor
        root = W.index_select(-2, ids)  # (*b, n, r)
        return BlockMeanSumLinearOperator(
            v.new_zeros(*batch, n),
            v,
            partitions=[partition],
            root=root.expand(*batch, *root.shape[-2:]),
            diagonal=[True],
        )

    def _batch_rows_diagonal(self, rows: Tensor, present: Tensor, batch: torch.Size) -> Tensor:
        """The variance part of ``C[rows, present]`` for ids ``rows`` that differ across the batch (``(*batch, t)``):
        ``v_{rows}`` where the row's group is the column's, else 0. # shape: (*batch, t, k)"""
        var = self.var
        if self.per_group_variance:
            v = var.expand(*batch, self.num_groups).gather(-1, rows)
        else:
            v = var.expand(*batch, 1)
        return v.unsqueeze(-1) * (rows.unsqueeze(-1) == present).to(var.dtype)

    def _factor_cross(
        self, rows: Tensor, column_ids: Tensor, present: Tensor, partition: Partition, batch: torch.Size
    ) -> LinearOperator:
        r""":math:`C[rows, ids] = A P^\top + W_{rows} (P W)^\top`, the cross covariance that matches
        :meth:`_factor_train`: the variances of the groups both sides share (:math:`A_{tc} = v_c [g_t = c]`) and
        the factor's product, whose right-hand side is the training covariance's root, so that prediction at new
        inputs stays in closed form (:func:`~bma_gp.kernels.sum_prediction_strategy.new_input_prediction`); for a
        batch of test sets whose ids differ across the batch :math:`A` is held dense (its nonzero in its own column
        per batch entry)."""
        t = rows.shape[-1]
        W = self.covar_factor
        r = W.shape[-1]
        right = W.index_select(-2, column_ids)
        if rows.dim() == 1:
            values = self._variances_of(rows).expand(*batch, t)  # one nonzero per row
            left = W.index_select(-2, rows)
            diagonal = BlockCrossLinearOperator.one_hot(values, _columns_of(rows, present), partition)
        else:
            # ids that differ across a batch of test sets: A dense (one nonzero per row, in its own column per batch
            # entry), the factor's rows gathered per entry; the same two pieces, so the prediction keeps its columns
            rows = rows.expand(*batch, t)
            A = self._batch_rows_diagonal(rows, present, batch)
            left = W.expand(*batch, *W.shape[-2:]).gather(-2, rows.unsqueeze(-1).expand(*batch, t, r))
            diagonal = BlockCrossLinearOperator(A, partition)
        low_rank = MatmulLinearOperator(
            DenseLinearOperator(left.expand(*batch, t, r)), DenseLinearOperator(right.expand(*batch, -1, r).mT)
        )
        return SumLinearOperator(diagonal, low_rank)

    def _covar_pairs(self, ids1: Tensor, ids2: Tensor, batch: torch.Size) -> Tensor:
        """``C[ids1[..., i], ids2[..., i]]`` for each i. # shape: (*batch, n)"""
        n = ids1.shape[-1]
        ids1, ids2 = ids1.expand(*batch, n), ids2.expand(*batch, n)
        var = self.var
        if self.per_group_variance:
            var = var.expand(*batch, self.num_groups).gather(-1, ids1)
        out = var * (ids1 == ids2).to(var.dtype)
        W = self.covar_factor
        if W is not None:
            W = W.expand(*batch, *W.shape[-2:])
            index = lambda ids: ids.unsqueeze(-1).expand(*batch, n, W.shape[-1])  # noqa: E731
            out = out + (W.gather(-2, index(ids1)) * W.gather(-2, index(ids2))).sum(-1)
        return out

    def _cross(self, rows: Tensor, column_ids: Tensor, batch: torch.Size) -> BlockCrossLinearOperator:
        r"""``C[rows, column_ids]`` as :math:`A P^\top` over the partition of ``column_ids``."""
        present, partition = self._present(column_ids)
        k = present.numel()
        if self.covar_factor is not None and _factor_form(k):
            return self._factor_cross(rows, column_ids, present, partition, batch)
        if self.covar_factor is None and rows.dim() == 1:  # C = diag(v): one nonzero per row, held as such
            values = self._variances_of(rows)
            return BlockCrossLinearOperator.one_hot(
                values.expand(*batch, rows.shape[-1]), _columns_of(rows, present), partition
            )
        if rows.dim() == 1:
            values = self._covar_between(rows, present)
        else:  # ids that differ across the batch: C[rows, present] per batch entry, no G x k table
            t = rows.shape[-1]
            rows = rows.expand(*batch, t)
            values = self._batch_rows_diagonal(rows, present, batch)
            W = self.covar_factor
            if W is not None:
                W = W.expand(*batch, *W.shape[-2:])
                W_rows = W.gather(-2, rows.unsqueeze(-1).expand(*batch, t, W.shape[-1]))
                values = values + W_rows @ W.index_select(-2, present).mT
        return BlockCrossLinearOperator(values.expand(*batch, rows.shape[-1], k), partition)

    # ------------------------------------------------------------------ random slopes
    def _slope_forward(self, x1: Tensor, x2: Tensor, diag: bool) -> Tensor | LinearOperator:
        r"""``[1, x_a] S [1, x_b]^T`` for points of one group, 0 across groups, in the promoted dtype of the covariates
        and ``S`` also inside ``torch.autocast`` (whose bfloat16 products made the test-by-training covariance
        bfloat16 against a float32 training covariance: the prediction refused the inputs, which were float32)."""
        if not torch.amp.is_autocast_available(x1.device.type):  # (meta)
            return self._slope_forward_exact(x1, x2, diag)
        with torch.autocast(x1.device.type, enabled=False):
            return self._slope_forward_exact(x1, x2, diag)

    def _slope_forward_exact(self, x1: Tensor, x2: Tensor, diag: bool) -> Tensor | LinearOperator:
        S = self.slope_covar
        ids1, cov1 = self.group_ids(x1, "x1"), self.slope_covariate(x1, "x1")
        if x2 is x1:
            ids2, cov2 = ids1, cov1
        else:  # equal inputs: the ids once (the covariates stay apart: derivatives may be asked of either)
            ids2 = ids1 if _same_inputs(x1, x2) else self.group_ids(x2, "x2")
            cov2 = self.slope_covariate(x2, "x2")
        # the covariate is a number, not a label: its products follow the promoted dtype of covariates and
        # parameters, as GPyTorch's LinearKernel / RBFKernel do (a float64 covariate is not rounded to float32)
        dtype = torch.promote_types(torch.promote_types(cov1.dtype, cov2.dtype), S.dtype)
        S, cov1 = S.to(dtype), cov1.to(dtype)
        cov2 = cov1 if x2 is x1 else cov2.to(dtype)
        batch = torch.broadcast_shapes(ids1.shape[:-1], ids2.shape[:-1], cov1.shape[:-1], cov2.shape[:-1], S.shape[:-2])
        t, n = ids1.shape[-1], ids2.shape[-1]
        if diag:
            if t != n:
                raise ValueError(f"diag=True needs x1 and x2 of the same length, got {t} and {n}.")
            rows = torch.stack([torch.ones_like(cov1), cov1], -1).unsqueeze(-2) @ S.unsqueeze(-3)  # (*b, n, 1, 2)
            value = (rows.squeeze(-2) * torch.stack([torch.ones_like(cov2), cov2], -1)).sum(-1)
            return (value * (ids1 == ids2).to(S.dtype)).expand(*batch, n)

        shared1, shared2 = _shared_rows(ids1, cov1), _shared_rows(ids2, cov2)
        same = x2 is x1 or (
            ids1.shape == ids2.shape
            and torch.equal(ids1, ids2)
            and cov1.shape == cov2.shape
            and torch.equal(cov1, cov2)
        )
        if same and shared1 is not None:
            return self._slope_train(*shared1, S, batch)
        if shared2 is not None:
            return self._slope_cross(ids1, cov1, *shared2, S, batch)
        if shared1 is not None:
            return self._slope_cross(ids2, cov2, *shared1, S, batch).mT
        # rows that differ across batch entries: no shared partition; assemble densely
        _warn_dense(self, "group ids or slope covariates")
        f1 = torch.stack([torch.ones_like(cov1), cov1], -1)
        f2 = torch.stack([torch.ones_like(cov2), cov2], -1)
        dense = (f1 @ S @ f2.mT) * (ids1.unsqueeze(-1) == ids2.unsqueeze(-2)).to(S.dtype)
        return to_linear_operator(dense.expand(*batch, t, n))

    def _slope_terms(self, S: Tensor, covariate: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        r"""``S`` as weighted indicator terms over one partition: ``(b_r, w_r)`` with
        :math:`[1, x_a] S [1, x_b]^\top = \sum_r b_r w_r(a) w_r(b)` (``w_r = None``: the plain indicator).

        The operator's terms are independent (block diagonal :math:`G`), so the correlation goes into a third
        direction: with a constant :math:`c` (no gradient),

        .. math::
            S = (s_{00} - s_{01}/c)\, e_0 e_0^\top + (s_{11} - c\, s_{01})\, e_1 e_1^\top
                + (s_{01}/c)\, (1, c)(1, c)^\top,

        an identity in :math:`S` for every :math:`c \ne 0` (so the coefficients carry the exact gradient), with
        weights :math:`1`, :math:`x` and :math:`1 + c x`. :math:`c = \operatorname{sign}(s_{01})
        \sqrt{s_{11}/s_{00}}` makes all three coefficients nonnegative, :math:`v_0 (1 - |\rho|)`,
        :math:`v_1 (1 - |\rho|)` and :math:`|\rho| v_0`, so every block stays positive semidefinite (roots
        and sampling need that)."""
        if not self.intercept:
            return [(S[..., 1, 1], covariate)]
        if not self.correlated:
            return [(S[..., 0, 0], None), (S[..., 1, 1], covariate)]
        s00, s01, s11 = S[..., 0, 0], S[..., 0, 1], S[..., 1, 1]
        with torch.no_grad():
            ratio = (s11 / s00).sqrt().reshape(-1)
            # a variance at exactly 0 (a softplus far below 0, where training drives an unneeded slope) made c 0 or
            # inf and the coefficient s01 / c 0 / 0: NaN in the kernel. Then s01 = 0 too, and any c != 0 is exact
            # and keeps the three coefficients nonnegative (s00, s11 and 0): c = 1 there
            ratio = torch.where(torch.isfinite(ratio) & (ratio > 0), ratio, torch.ones_like(ratio))
            positive = (s01 >= 0).reshape(-1)
            if ratio.numel() == 1:
                c = torch.where(positive, ratio, -ratio).reshape(())
            else:
                # one c for the whole batch (the weights have no batch dimensions): exact for every c != 0; the
                # blocks of a batch entry whose correlation has the other sign, or a very different ratio, may be
                # indefinite, which solves and log-determinants allow but roots do not
                sign = 1.0 if 2 * int(positive.sum()) >= positive.numel() else -1.0
                c = sign * ratio.log().mean().exp()
        return [(s00 - s01 / c, None), (s11 - s01 * c, covariate), (s01 / c, 1 + c * covariate)]

    def _slope_train(self, ids: Tensor, covariate: Tensor, S: Tensor, batch: torch.Size) -> LinearOperator:
        """The covariance among one set of inputs: weighted block terms over the partition by group id."""
        _, partition = self._present(ids)
        k, n = partition.num_blocks, ids.shape[-1]
        terms = self._slope_terms(S, covariate)
        blocks = [b.unsqueeze(-1).expand(*b.shape, k).expand(*batch, k) for b, _ in terms]  # diagonals: b I
        return BlockMeanSumLinearOperator(
            S.new_zeros(*batch, n),
            *blocks,
            partitions=[partition] * len(terms),
            weights=[w for _, w in terms],
            diagonal=[True] * len(terms),
        )

    def _slope_cross(
        self, rows: Tensor, row_cov: Tensor, column_ids: Tensor, column_cov: Tensor, S: Tensor, batch: torch.Size
    ) -> LinearOperator:
        r""":math:`\sum_r A_r P^\top \operatorname{diag}(w_r)` over the partition of ``column_ids``: the weighted terms
        of the training covariance (:meth:`_slope_terms`, weights :math:`w_r` of the columns' covariate) with
        :math:`(A_r)_{tc} = b_r w_r(x_t) [g_t = c]`, the rows' own weights (:math:`w_r = 1`: no diagonal).

        So the blocks of :math:`F` (:math:`K_{*x} = F Z^\top`) at new inputs are :math:`b_r w_r(x_t)` and
        :math:`Z_* = F G^{-1}` are the new points' own columns :math:`(1, x_t, 1 + c x_t)`, with
        :math:`Z_* G Z_*^\top = K_{**}`. The same covariance written :math:`(s_{00} + s_{01} x_t) P^\top +
        (s_{01} + s_{11} x_t) P^\top \operatorname{diag}(x)` (two terms, as before) is exact too, but its
        :math:`Z_*` is not a point's columns: with a correlated slope and a covariate far from 0 (calendar years)
        :math:`Z_* G Z_*^\top` exceeded :math:`K_{**}` by half and :math:`Z_* \Sigma Z_*^\top` (:math:`10^6` there)
        carried the rounding of the ill-conditioned per-level blocks into variances of :math:`5 \cdot 10^{-3}`
        (3.7x off). Uncorrelated slopes and slopes alone give the same numbers either way; so does a correlated one
        at :math:`s_{01} = 0` exactly, which keeps the two-term form for its derivatives (:math:`b_2 = 0` there)."""
        present, partition = self._present(column_ids)
        k, t = present.numel(), rows.shape[-1]
        terms = self._slope_terms(S, column_cov)
        row_weights = [w for _, w in self._slope_terms(S, row_cov)]  # the same c (a function of S alone)
        if rows.dim() == 1:  # one nonzero per row, held as its value and column: nothing t x k
            columns = _columns_of(rows, present)

            def cross(c: Tensor) -> BlockCrossLinearOperator:
                return BlockCrossLinearOperator.one_hot(c.expand(*batch, t), columns, partition)

        else:
            match = (rows.unsqueeze(-1) == present).to(S.dtype)  # (*b, t, k)

            def cross(c: Tensor) -> BlockCrossLinearOperator:
                return BlockCrossLinearOperator((c.unsqueeze(-1) * match).expand(*batch, t, k), partition)

        coefs = [b.unsqueeze(-1) if w is None else b.unsqueeze(-1) * w for (b, _), w in zip(terms, row_weights)]
        if self.correlated:
            # where s01 is exactly 0 (corr 0, its initial value; a variance at 0) b_2 = s01 / c is 0, and Z_* = F G^+
            # drops the third block with its derivative: there the two-term form, of the same values, carries them
            s00, s01, s11 = (S[..., i, j].unsqueeze(-1) for i, j in ((0, 0), (0, 1), (1, 1)))
            two_term = (s00 + s01 * row_cov, s01 + s11 * row_cov, torch.zeros_like(s01))
            coefs = [torch.where(s01 == 0, old, new) for old, new in zip(two_term, coefs)]
        ops: list[LinearOperator] = []
        for (_, column_weight), coef in zip(terms, coefs):
            block = cross(coef.expand(*coef.shape[:-1], t))
            ops.append(
                block if column_weight is None else MatmulLinearOperator(block, DiagLinearOperator(column_weight))
            )
        return ops[0] if len(ops) == 1 else SumLinearOperator(*ops)

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return 1

    def prediction_strategy(self, train_inputs, train_prior_dist, train_labels, likelihood):
        return BlockMeanPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)
