"""Block-mean AdaGrad: full-matrix AdaGrad with a block mean correlation matrix.

:class:`BlockMeanAdagrad` holds the hyperparameters and the state; the step's math is
:func:`bma_gp.optim.functional.block_mean_adagrad`, which uses the closed forms of
:class:`bma_gp.BlockMeanLinearOperator` and the block operations of :class:`bma_gp.Partition`.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bma_gp import Partition
from bma_gp.optim import _fused, functional
from bma_gp.optim.flat_optimizer import (
    FlatPreconditionedOptimizer,
    OptimizerSetting,
    check_adagrad_options,
    check_bool,
    check_hyperparameter,
    check_torch_optim_flags,
)
from bma_gp.optim.flat_params import FlatParams
from bma_gp.optim.functional import Workspace, _block_mean_adagrad, normalised_correlation
from bma_gp.optim.param_blocks import ParamBlocks, check_partition_rule

__all__ = ["BlockMeanAdagrad"]

#: below this many parameter entries (with a gradient) ``fused=True`` with ``torch.compile`` takes the eager path:
#: there the compiled passes' fixed cost (guards, two calls) is more than they save (CPU crossover measured between
#: 1.3e5 and 5.3e5 entries; see docs/optimizer.md). numba's kernels (CPU) follow :data:`FUSED_MIN_NUMEL_ONE_BLOCK`.
FUSED_MIN_NUMEL = 2**18

#: with numba's kernels (CPU) and one block per tensor (``partition="tensor"``), below this many parameter entries
#: (with a gradient) ``fused=True`` takes the eager step, which is as fast or faster there (numba over eager measured
#: 1.34-1.52x at 132 to 33k entries, 1.00x at 66k, 0.89x at 131k; docs/optimizer.md). With several blocks per tensor
#: numba's kernels run at every size (0.65x the eager step at 144 entries).
FUSED_MIN_NUMEL_ONE_BLOCK = 2**16

#: and with fewer than this many entries per stepped tensor on average: each tensor costs numba's passes a few
#: microseconds more than the eager step's (two kernel dispatches and array conversions per tensor), which the
#: entries' faster passes repay only from about 16384 entries per tensor (6 December 2026, 1 / 2 threads, median of
#: interleaved rounds, fused / eager: 200 tensors of 512 to 2048 entries 1.06-1.21, of 4096 0.97-1.14, of 8192
#: 0.88-1.09, of 16384 0.70-0.87; a user trial's 400 tensors of 528 entries: 1.22)
FUSED_MIN_MEAN_NUMEL_ONE_BLOCK = 2**14


#: the global state's cached root (``None`` until a step computes it)
_ROOT_KEYS = ("root_lam", "root_B", "root_step")


def _short(values: list[int], limit: int = 8) -> str:
    """``values`` for a message, the first ``limit`` of them when there are more."""
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, ...] ({len(values)})"


_FUSED_NEEDS_ROWS = (
    "fused=True supports partition='tensor' and partition='row' (blocks that are rows of each parameter); with a "
    "callable partition use fused=False."
)


def _rule_name(rule) -> str:
    """``rule`` (a partition rule) for a message."""
    return repr(rule) if isinstance(rule, str) else f"the callable {getattr(rule, '__name__', repr(rule))}"


# The checks of the optimizer-wide settings, shared by the constructor and assignments to the attributes
# (:class:`~bma_gp.optim.flat_optimizer.OptimizerSetting`): each returns the value to store or raises.
def _checked_eps(opt: Any, value: Any) -> float:
    # eps = 0 divides 0 by 0 where a gradient entry has always been 0 (h = 0), which poisons the statistics
    return float(check_hyperparameter("eps", value, positive=True))


def _checked_damping(opt: Any, value: Any) -> float:
    return float(check_hyperparameter("damping", value))


def _checked_update_interval(opt: Any, value: Any) -> int:
    return check_hyperparameter("update_interval", value, positive=True, integer=True)


def _checked_fused(opt: Any, value: Any) -> bool:
    if value is None:  # torch.optim's default value, "let the optimizer choose": here the eager step
        value = False
    value = check_bool("fused", value)
    if value and callable(opt.__dict__.get("partition_rule")):
        raise ValueError(_FUSED_NEEDS_ROWS)
    return value


def _checked_max_blocks(opt: Any, value: Any) -> int:
    return check_hyperparameter("max_blocks", value, positive=True, integer=True)


def _check_num_blocks(k: int, max_blocks: int, rule: Any) -> None:
    """``ValueError`` before any state is made where the partition has more than ``max_blocks`` blocks: the
    statistics ``U`` and the root are ``k x k`` and each root an ``O(k^3)`` eigendecomposition (``partition="row"`` on
    a tall tensor gave ``k`` of the order of its entries: 14 GB asked for at 60,000 rows)."""
    if k <= max_blocks:
        return
    gib = 3 * 8 * k * k / 2**30  # U, the root's B and eigh's workspace, in float64 at worst
    raise ValueError(
        f"BlockMeanAdagrad: the partition {_rule_name(rule)} gives k = {k} blocks, more than max_blocks = "
        f"{max_blocks}. The preconditioner keeps k x k matrices (about {gib:.1f} GiB) and each root is an O(k^3) "
        "eigendecomposition. Use a coarser partition (partition='tensor', or a callable with fewer blocks), or raise "
        "max_blocks if the memory and time are there. Nothing was changed."
    )


def _checked_partition_rule(opt: Any, rule: Any) -> Any:
    """The constructor's partition; afterwards only the same rule again (a no-op): the partition cannot change."""
    if "partition_rule" not in opt.__dict__:  # the constructor's assignment
        check_partition_rule(rule)
        return rule
    current = opt.__dict__["partition_rule"]
    if rule is current or (isinstance(rule, str) and isinstance(current, str) and rule == current):
        return current
    raise ValueError(_partition_fixed_message(type(opt).__name__, f"partition_rule = {_rule_name(rule)}", current))


def _partition_fixed_message(name: str, assigned: str, current: Any) -> str:
    return (
        f"the partition of {name} cannot change after construction ({assigned} was assigned; it is "
        f"{_rule_name(current)}): the statistics in global_state (U, w) and the cached root belong to its blocks, "
        "and steps would go on with them, or hand them to other blocks once add_param_group adds parameters. For "
        f"another partition build a new {name}(params, partition=...). Nothing was changed."
    )


class BlockMeanAdagrad(FlatPreconditionedOptimizer):
    r"""Block-mean AdaGrad (Lu, Harandi, Hartley and Pascanu, 2018), in the form of docs/math.md.

    Full-matrix AdaGrad preconditions with :math:`H_t^{-1/2}`,
    :math:`H_t = \sum_{\tau \le t} g_\tau g_\tau^\top` (:math:`d \times d`). Here
    :math:`H_t \approx Z F Z` with :math:`Z` diagonal and :math:`F` a *block mean*
    matrix over a partition of the :math:`d` parameter entries into :math:`k` blocks,
    streamed exactly in :math:`O(d + k^2)` memory. With :math:`g_t` the concatenated
    gradient of all parameters (all groups, in order) and :math:`P` the
    :math:`d \times k` block indicator matrix:

    .. math::

        h_t &= h_{t-1} + g_t^2, \qquad z_t = \sqrt{h_t} + \epsilon, \qquad
        n_t = g_t / z_t, \\
        U_t &= U_{t-1} + (P^\top n_t)(P^\top n_t)^\top, \qquad
        w_t = w_{t-1} + P^\top (n_t^2), \\
        F_t &= D^{-1/2} \operatorname{blockmean}(N_t) D^{-1/2}, \qquad
        D = \operatorname{diag}(w_t / s), \qquad N_t = \textstyle\sum_\tau n_\tau n_\tau^\top, \\
        u_t &= z_t^{-1/2} \odot \bigl[(F_t + \delta I)^{-1/2} (z_t^{-1/2} \odot g_t)\bigr], \\
        \theta_t &= \theta_{t-1} - \mathrm{lr}\,(u_t + \mathrm{wd}\,\theta_{t-1}).

    :math:`N_t` is never formed: :math:`\operatorname{blockmean}(N_t)` needs only
    :math:`U_t` and :math:`w_t` (see :func:`~bma_gp.optim.functional.normalised_correlation`), and the inverse
    square root is the closed form of :class:`bma_gp.BlockMeanLinearOperator`
    (:math:`O(k^3)`), recomputed every ``update_interval`` steps (the stale root is
    applied in between). With :math:`F = I` and :math:`\delta = 0` the update is
    exactly ``torch.optim.Adagrad``'s :math:`\mathrm{lr}\, g_t / (\sqrt{h_t} + \epsilon)`.
    Entries whose gradient has always been exactly zero (:math:`h = 0`) are not
    moved (their :math:`z^{-1/2}` is taken as 0 rather than :math:`\epsilon^{-1/2}`,
    which would amplify the coupling term by up to :math:`10^5`).

    The class holds hyperparameters and state; the step is the functional core
    :func:`bma_gp.optim.functional.block_mean_adagrad` (an eager path per tensor for
    ``"tensor"`` and ``"row"``, a compiled one with ``fused=True``, and a flat one for
    callable partitions). Costs are in docs/optimizer.md.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate (per group). Default: ``1e-2``.
        eps: :math:`\epsilon`, added after the square root as in torch's Adagrad; must be positive (with 0, an
            entry whose gradient has always been 0 would give :math:`0 / 0` in the statistics).
            Default: ``1e-10``.
        damping: :math:`\delta \ge 0` added to :math:`F` before the inverse root. With ``0`` a singular
            :math:`F` (after ``t`` steps its block means have rank at most ``t``, so at least the first ``k - 1``
            steps of ``k`` blocks) has an infinite root: with ``check_finite`` such a step raises ``ValueError``,
            nothing changed (it copies ``h`` first, only with ``damping=0``); without, it writes ``inf``/``nan``.
            Default: ``0.1``.
        partition: the blocks of :math:`F`: ``"tensor"`` (one block per parameter
            tensor, the paper's choice), ``"row"`` (one block per slice along dim 0
            of every tensor with two or more dims, one block per other tensor) or a
            callable ``f(param) -> LongTensor`` with a block id in ``0 .. k_p - 1``
            for each of the ``param.numel()`` entries (row-major). Default: ``"tensor"``.
        update_interval: recompute :math:`(F + \delta I)^{-1/2}` every this many
            steps. Default: ``1``.
        weight_decay: decoupled weight decay, applied after preconditioning
            (per group). Default: ``0``.
        maximize: ascend instead of descend (per group). Default: ``False``.
        check_finite: raise ``ValueError`` on an inf/nan gradient before any state or
            parameter changes. This costs one sum over the gradients and reads it back
            from the device every step: the step's one host synchronisation (on an
            accelerator it also reads whether some entry of :math:`h` is still 0, see
            above). ``False`` skips
            it, and the step then has no host synchronisation on an accelerator; a
            non-finite gradient then turns the state into ``nan`` (on CPU the
            eigendecomposition of the ``k x k`` core may raise
            ``torch.linalg.LinAlgError``). Default: ``True``.
        fused: run the step as two fused passes over the parameters (``"tensor"`` and ``"row"``
            partitions only): pass 1 reduces the block sums and the finiteness flag without
            writing, pass 2 writes ``h`` and the parameters. Same results to rounding, same state
            (checkpoints move between both modes), about half the eager step's time at millions of
            parameters. On CPU with numba installed (``pip install bma-gp[jit]``) the passes are
            numba kernels, compiled once per machine and dtype (seconds) and loaded from numba's
            disk cache by later processes (about a second); they run at every model size, except that
            with one block per tensor steps with fewer than :data:`FUSED_MIN_NUMEL_ONE_BLOCK` gradient
            entries, or fewer than :data:`FUSED_MIN_MEAN_NUMEL_ONE_BLOCK` per tensor on average (many small
            tensors), take the eager path, which is as fast or faster there. Otherwise
            (CUDA, or no numba) they are ``torch.compile``'d: each new parameter structure compiles
            once per process (seconds), steps with fewer than :data:`FUSED_MIN_NUMEL` gradient
            entries take the eager path, where it is faster, and where ``torch.compile`` fails (the
            CPU backend needs a C++ compiler) the same passes run eagerly, with one
            ``RuntimeWarning`` per process. Costs in docs/optimizer.md. Like ``torch.optim``'s ``fused``, it is
            opt-in. Default: ``False`` (``None``, torch.optim's default, means the same).
        max_blocks: the most blocks the partition may have: the statistics and the root are ``k x k`` and each
            root an ``O(k^3)`` eigendecomposition, so a partition with more blocks (``"row"`` on a tall tensor,
            one block per row) raises ``ValueError`` at the first step, before any state is made. At the default
            4096 the ``k x k`` matrices take about 0.4 GB in float64. Raise it where the memory and time are there.
        lr_decay, initial_accumulator_value: torch.optim.Adagrad's options, accepted at 0 (what this optimizer does)
            so that a ported Adagrad configuration passed as keywords works; any other value raises the
            ``ValueError`` a param group with it gets. Not stored.
        foreach, capturable, differentiable: torch.optim's implementation switches, accepted so that configurations
            that pass them to every optimizer work: ``foreach=None`` or ``False``, ``capturable=False`` and
            ``differentiable=False`` (the defaults) run the one step there is; ``foreach=True`` (there is no
            multi-tensor variant; ``fused=True`` is the faster step), ``capturable=True`` (the step reads values
            back to the host, so it cannot be captured in a CUDA graph) and ``differentiable=True`` (it updates in
            place under ``torch.no_grad()``) raise ``ValueError``. Not stored; a param group may repeat them at
            those values.

    State: ``state[p]["sum"]`` is :math:`h` of parameter ``p`` (as in
    ``torch.optim.Adagrad``; a view of one flat buffer). A replaced entry is what the next
    step uses, and a cleared ``optimizer.state`` restarts the optimizer. :attr:`global_state` holds
    ``U`` (:math:`k \times k`), ``w`` (:math:`k`), ``step``, and the cached root
    (``root_lam``, ``root_B``, ``root_step``), all in float32 or the widest
    parameter dtype; :meth:`state_dict` saves it under ``"global_state"`` and
    :meth:`load_state_dict` restores it exactly. The state dict also carries ``eps``, ``damping`` and
    ``update_interval`` (``"hyperparameters"``), which :meth:`load_state_dict` restores with the state (checked as
    the constructor checks them; an invalid one raises ``ValueError`` and nothing is loaded), as torch.optim restores
    its param groups; a state dict saved without them keeps the constructor's values, except those its param groups
    repeat (docs/optimizer.md, "Hyperparameters in the checkpoint"). The partition is not restored
    (a callable cannot be saved) but checked: the state dict carries the sizes of the blocks the global state belongs
    to (``"block_sizes"``) and a hash of their labels (``"partition_fingerprint"``), and a state saved under a
    partition whose blocks hold other entries is refused with ``ValueError`` (state dicts without them still load).
    ``fused`` and ``check_finite`` stay the loading optimizer's (the same results to rounding, checked or not: a
    checkpoint moves between both modes). ``add_param_group`` appends the new
    parameters' blocks after the existing ones: ``U`` and ``w`` grow by zero
    padding (the new blocks start with no statistics, i.e. as identity blocks of
    :math:`F`) and the root is recomputed at the next step.

    Only ``lr``, ``weight_decay`` and ``maximize`` are per group. ``eps``, ``damping``, ``partition``,
    ``update_interval``, ``fused`` and ``check_finite`` are optimizer-wide (one :math:`F` spans all groups): a param
    group that sets one to another value than the constructor's is refused. To change one between steps assign the
    attribute (``opt.damping = 0.2``): the value is checked as the constructor checks it (an invalid one raises its
    ``ValueError`` and the old value stays). The partition (``partition_rule``) cannot be assigned after
    construction (``ValueError``): build a new optimizer. Parameters that are all empty tensors step as a no-op
    (no state until a step whose parameters hold entries).

    Raises:
        ValueError: invalid hyperparameters or partition (``TypeError`` for a
            partition of the wrong type), ``foreach``/``capturable``/``differentiable`` at a value the step cannot
            honour, or a param group with an optimizer-wide hyperparameter of another value; from :meth:`step`, a
            non-finite gradient or, with ``damping=0``, a singular :math:`F` (``check_finite``, nothing changed).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = BlockMeanAdagrad(model.parameters(), lr=0.1)
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward()
        >>> opt.step()

    Reference:
        Jie Lu, Mehrtash Harandi, Richard Hartley, Razvan Pascanu (2018),
        "Block Mean Approximation for Efficient Second Order Optimization",
        arXiv:1804.05484.
    """

    _flat_state_keys = ("sum",)
    _pickled_attributes = (
        *FlatPreconditionedOptimizer._pickled_attributes,
        "fused",
        "eps",
        "damping",
        "partition_rule",
        "update_interval",
        "max_blocks",
    )
    _fused_hint = "For a faster step pass fused=True."
    _saved_hyperparameters = (
        ("eps", {"positive": True}),
        ("damping", {}),
        ("update_interval", {"positive": True, "integer": True}),
    )
    _optimizer_wide = (
        *FlatPreconditionedOptimizer._optimizer_wide,
        ("eps", "eps"),
        ("damping", "damping"),
        ("partition", "partition_rule"),
        ("update_interval", "update_interval"),
        ("fused", "fused"),
    )

    # optimizer-wide settings, checked on assignment as the constructor checks them (opt.damping = -1.0 raises the
    # constructor's ValueError and keeps the old value); the partition is set once, by the constructor
    eps = OptimizerSetting(_checked_eps)
    damping = OptimizerSetting(_checked_damping)
    update_interval = OptimizerSetting(_checked_update_interval)
    fused = OptimizerSetting(_checked_fused)
    partition_rule = OptimizerSetting(_checked_partition_rule)
    max_blocks = OptimizerSetting(_checked_max_blocks)

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        eps: float = 1e-10,
        damping: float = 0.1,
        partition: str | Callable[[Tensor], Tensor] = "tensor",
        update_interval: int = 1,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        check_finite: bool = True,
        fused: bool | None = False,
        max_blocks: int = 4096,
        lr_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        flags = dict(foreach=foreach, capturable=capturable, differentiable=differentiable)
        check_torch_optim_flags(type(self).__name__, flags, fused_hint=self._fused_hint)
        check_adagrad_options(
            type(self).__name__,
            dict(lr_decay=lr_decay, initial_accumulator_value=initial_accumulator_value),
            " Nothing was made.",
            keywords=True,
            bounded_by=self._first_steps_bound,
        )
        lr = check_hyperparameter("learning rate", lr)
        # eps = 0 divides 0 by 0 where a gradient entry has always been 0 (h = 0), which poisons the statistics
        eps = check_hyperparameter("eps", eps, positive=True)
        damping = check_hyperparameter("damping", damping)
        update_interval = check_hyperparameter("update_interval", update_interval, positive=True, integer=True)
        weight_decay = check_hyperparameter("weight_decay", weight_decay)
        check_partition_rule(partition)
        maximize = check_bool("maximize", maximize)
        if fused is None:  # torch.optim's default value, "let the optimizer choose": here the eager step
            fused = False
        fused = check_bool("fused", fused)
        if fused and callable(partition):
            raise ValueError(_FUSED_NEEDS_ROWS)
        self.partition_rule = partition
        self.fused = fused
        self.eps = eps
        self.damping = damping
        self.update_interval = update_interval
        self.max_blocks = max_blocks
        self._blocks: tuple[tuple, ParamBlocks] | None = None  # (layout key, blocks)
        self._workspace: Workspace | None = None
        self._h_has_zero = True
        self._h_version = -1  # h's version counter after the last step (h changed elsewhere when it differs)
        self._pending_ratio_form: dict[str, dict] | None = None  # loaded bounds for the next workspace
        self._carried_ratio_form: dict[str, dict] | None = None  # bounds of a replaced h, checked by the next step
        self._loading_block_sizes: list[int] | None = None  # a state dict's "block_sizes" while it is loaded
        self._loading_fingerprint: str | None = None  # a state dict's "partition_fingerprint" while it is loaded
        defaults = dict(lr=lr, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, check_finite=check_finite)

    def _ratio_form_state(self) -> dict[str, dict] | None:
        """The CPU eager step's per-tensor bounds of ``h`` and retry steps (:class:`~bma_gp.optim.functional.Workspace`
        ``h_max`` and ``chain_until``), when they still describe the current ``h``, or the loaded ones that wait for
        the next step: saved with the state, so that a reloaded run picks the same scales as the run it continues and
        stays bit for bit."""
        if self._pending_ratio_form is not None:  # loaded and not used yet (no step since): carried on as loaded
            return copy.deepcopy(self._pending_ratio_form)
        ws, h = self._workspace, self._flat.get("sum")
        if ws is None or h is None or ws.h is not h or ws.h_version != h._version:
            return None
        if self._layout is None or self._state_replaced(self._layout):  # state["sum"] is no longer this h
            return None
        if not ws.h_max and not ws.chain_until:
            return None
        return {"h_max": dict(ws.h_max), "chain_until": dict(ws.chain_until)}

    def _save_own_state(self, sd: dict[str, Any]) -> None:
        """:meth:`FlatPreconditionedOptimizer.state_dict`'s entries, plus ``"ratio_form"``: the CPU eager step's
        bounds of ``h`` (plain numbers), where it keeps some."""
        super()._save_own_state(sd)
        ratio_form = self._ratio_form_state()
        if ratio_form is not None:
            sd["ratio_form"] = ratio_form
        w = self.global_state.get("w")
        if isinstance(w, Tensor) and w.dim() == 1:
            # the sizes of the blocks U and w belong to (those of the last step's layout, or after a load the first
            # blocks of the current one): a partition with as many blocks of other sizes is refused at load, and so
            # is one with blocks of the same sizes over other entries (by a hash of the blocks' labels)
            try:
                blocks: ParamBlocks | None = self._blocks_of(self._layout or self._current_layout())
            except ValueError:  # a callable partition that refuses parameters added since: the next step says so
                blocks = None
            if blocks is not None and blocks.num_blocks >= w.shape[0]:
                sd["block_sizes"] = blocks.partition.sizes[: w.shape[0]].tolist()
                fingerprint = blocks.label_fingerprint(w.shape[0])
                if fingerprint is not None:
                    sd["partition_fingerprint"] = fingerprint

    def _load_own_state(self, state_dict: dict[str, Any]) -> None:
        ratio_form = self._checked_ratio_form(state_dict.pop("ratio_form", None))  # before anything changes
        self._loading_block_sizes = state_dict.pop("block_sizes", None)  # read by _check_global_sizes
        self._loading_fingerprint = state_dict.pop("partition_fingerprint", None)  # read by _check_global_sizes
        try:
            super()._load_own_state(state_dict)
        finally:
            self._loading_block_sizes = None
            self._loading_fingerprint = None
        if self.global_state:
            for key in _ROOT_KEYS:  # a state saved without a cached root: the next step computes one
                self.global_state.setdefault(key, None)
        self._workspace = None
        self._pending_ratio_form = ratio_form
        self._carried_ratio_form = None

    def _check_saved_step_entries(self, global_state: dict[str, Any]) -> None:
        """The cached root of a saved global state whose ``U`` and ``w`` fit (:meth:`_check_global_sizes`): of their
        ``k`` blocks, real floating-point, and from a step not after the saved ``step``
        (:func:`~bma_gp.optim.functional._check_step_and_root`, the functional step's check of its ``stats``).
        Otherwise the next step with a stale root (``update_interval > 1``) failed half-way with ``IndexError``
        after updating ``h``, ``U`` and ``w``, or a ``root_step`` after ``step`` kept the stale root for good."""
        k = global_state["w"].shape[-1]  # a TypeError is refused as a ValueError by the caller
        functional._check_step_and_root(
            global_state, k, where="state_dict's global_state", fix=self._corrupt_global_fix()
        )

    def _checked_ratio_form(self, ratio_form: Any) -> dict[str, dict] | None:
        """A state dict's ``"ratio_form"`` (the CPU eager step's bounds of ``h``, :meth:`_ratio_form_state`) as plain
        numbers, or ``ValueError`` (before anything changes) where it is not what :meth:`state_dict` saves: a dict
        ``{"h_max": {i: bound}, "chain_until": {i: step}}`` over the positions ``i`` of the parameters, with
        non-negative finite bounds and int steps. The next step read it only after committing the loaded state and
        failed there with a raw ``ValueError`` or ``TypeError``."""
        if ratio_form is None:
            return None
        num_params = sum(len(group["params"]) for group in self.param_groups)
        fix = (
            "it was not produced by BlockMeanAdagrad.state_dict() as it is (edited or corrupted?). Load an intact "
            "state dict, or delete its 'ratio_form' entry (the next step then bounds h afresh, with the rounding of a "
            "fresh run). Nothing was loaded."
        )
        if not isinstance(ratio_form, dict) or set(ratio_form) != {"h_max", "chain_until"}:
            got = sorted(map(str, ratio_form)) if isinstance(ratio_form, dict) else type(ratio_form).__name__
            raise ValueError(
                f"state_dict's 'ratio_form' must be a dict with the keys 'h_max' and 'chain_until', got {got}; {fix}"
            )
        checked: dict[str, dict] = {}
        for key, kind in (("h_max", "a finite non-negative number"), ("chain_until", "an int step")):
            entries = ratio_form[key]
            if not isinstance(entries, dict):
                raise ValueError(
                    f"state_dict's 'ratio_form'[{key!r}] must be a dict from parameter positions to {kind}, got "
                    f"{type(entries).__name__}; {fix}"
                )
            out: dict[int, Any] = {}
            checked[key] = out
            for i, value in entries.items():
                position = operator.index(i) if isinstance(i, numbers.Integral) and not isinstance(i, bool) else -1
                if not 0 <= position < num_params:
                    raise ValueError(
                        f"state_dict's 'ratio_form'[{key!r}] has the key {i!r}, not the position of one of this "
                        f"optimizer's {num_params} parameters; {fix}"
                    )
                number: float | int | None = None
                if key == "h_max" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    number = float(value)
                    if not 0 <= number < math.inf:  # also nan
                        number = None
                elif key == "chain_until" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
                    number = operator.index(value)
                if number is None:
                    raise ValueError(
                        f"state_dict's 'ratio_form'[{key!r}][{i!r}] is {value!r}; it must be {kind}; {fix}"
                    )
                out[position] = number
        return checked

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_pending_ratio_form"] = self._ratio_form_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("fused", False)
        self.__dict__.setdefault("max_blocks", 4096)  # pickled before the limit existed
        self.__dict__.setdefault("_pending_ratio_form", None)
        self._carried_ratio_form = None
        self._blocks = None
        self._workspace = None
        self._h_has_zero = True
        self._h_version = -1  # h's version counter after the last step (h changed elsewhere when it differs)

    def _forget_flat_state(self) -> None:
        # a replaced h: the step rebuilds the workspace and finds its zero entries again. The bounds of the old h
        # (kept by the workspace, or loaded and not used yet) are carried to the new one as candidates only: its
        # first step keeps those that still bound it (Workspace.h_version -1), so that an entry replaced by the same
        # values (state[p]["sum"].set_(copy)) continues with the scales, and so the rounding, of the run before
        ws = self._workspace
        if self._pending_ratio_form is not None:
            self._carried_ratio_form = self._pending_ratio_form
        elif ws is not None and (ws.h_max or ws.chain_until):
            self._carried_ratio_form = {"h_max": dict(ws.h_max), "chain_until": dict(ws.chain_until)}
        self._workspace = None
        self._pending_ratio_form = None
        self._h_has_zero = True
        self._h_version = -1

    # test hook: the correlation matrix F (replaced by the identity to recover torch.optim.Adagrad)
    _correlation = staticmethod(normalised_correlation)

    # ------------------------------------------------------------------ structure and state
    def _check_optimizer_wide(self, group: dict[str, Any]) -> None:
        if "fused" in group and group["fused"] is None:  # torch.optim's default: False, as in the constructor
            group = {**group, "fused": False}
        super()._check_optimizer_wide(group)

    def _blocks_of(self, layout: FlatParams) -> ParamBlocks:
        """The blocks of ``layout``'s parameters (built once per layout; raises ValueError for a bad callable)."""
        if self._blocks is None or self._blocks[0] != layout.key:
            if functional._default_device_elsewhere(layout.device):
                # torch's default device is another (torch.set_default_device): the blocks' tensors, and the ids of a
                # callable partition that returns a list (or makes its tensor without a device), on the parameters'
                with torch.device(layout.device):
                    blocks = ParamBlocks.build(layout.params, self.partition_rule)
            else:
                blocks = ParamBlocks.build(layout.params, self.partition_rule)
            _check_num_blocks(blocks.num_blocks, self.max_blocks, self.partition_rule)
            self._blocks = (layout.key, blocks)
        return self._blocks[1]

    @property
    def partition(self) -> Partition | None:
        """The partition of all parameter entries (built at the first step)."""
        return None if self._layout is None else self._blocks_of(self._layout).partition

    @partition.setter
    def partition(self, value: Any) -> None:
        raise ValueError(_partition_fixed_message(type(self).__name__, "partition = ...", self.partition_rule))

    def _init_global_state(self, layout: FlatParams) -> dict[str, Any]:
        k = self._blocks_of(layout).num_blocks
        return {
            "step": 0,
            "U": torch.zeros(k, k, dtype=layout.dtype, device=layout.device),
            "w": torch.zeros(k, dtype=layout.dtype, device=layout.device),
            "root_lam": None,
            "root_B": None,
            "root_step": None,
        }

    def _check_global_sizes(self, global_state: dict[str, Any], layout: FlatParams, group_ends: list[int]) -> None:
        U, w = global_state.get("U"), global_state.get("w")
        if not isinstance(U, Tensor) or not isinstance(w, Tensor):
            raise ValueError(
                "state_dict's 'global_state' has no tensors 'U' and 'w': it was not produced by "
                "BlockMeanAdagrad.state_dict()."
            )
        blocks = self._blocks_of(layout)  # may raise ValueError for a bad callable: nothing has changed yet
        fits = [blocks.first_block[e] for e in group_ends]
        k_saved = w.shape[-1] if w.dim() == 1 else -1
        rule_name = _rule_name(self.partition_rule)
        if k_saved in fits and U.shape == (k_saved, k_saved):
            saved_sizes = getattr(self, "_loading_block_sizes", None)  # absent from state dicts saved before it was
            sizes = blocks.partition.sizes[:k_saved].tolist()
            if saved_sizes is not None and list(saved_sizes) != sizes:
                raise ValueError(
                    f"state_dict does not fit this optimizer: its global state belongs to {k_saved} blocks of sizes "
                    f"{_short(list(saved_sizes))}, but these parameters form blocks of sizes {_short(sizes)} under "
                    f"partition={rule_name}. It was probably saved with another partition; load a state dict saved by "
                    "an optimizer with the same parameters and partition. Nothing was loaded."
                )
            saved_fingerprint = getattr(self, "_loading_fingerprint", None)  # absent from older state dicts
            if saved_fingerprint is not None and saved_fingerprint != blocks.label_fingerprint(k_saved):
                raise ValueError(
                    f"state_dict does not fit this optimizer: its global state belongs to {k_saved} blocks of the "
                    f"same sizes, {_short(sizes)}, as these parameters form under partition={rule_name}, but the "
                    "blocks hold other entries (the saved partition's labels differ from this partition's: hash "
                    f"{saved_fingerprint} saved, {blocks.label_fingerprint(k_saved)} here). It was saved with another "
                    "partition that has blocks of these sizes (another callable, or the same blocks numbered in "
                    "another order); construct the optimizer with the partition it was saved with. Nothing was loaded."
                )
            return
        earlier = sorted(set(fits[:-1]) - {fits[-1]})
        also = f" (or {earlier} when saved before add_param_group added the later groups)" if earlier else ""
        raise ValueError(
            f"state_dict does not fit this optimizer: its global state has U of shape {tuple(U.shape)} and w of "
            f"shape {tuple(w.shape)}, but these parameters form k = {fits[-1]} blocks{also} under partition="
            f"{rule_name}. It was probably saved with another partition, or from other parameters; load a state "
            "dict saved by an optimizer with the same parameters and partition. Nothing was loaded."
        )

    def _fit_global_state(self, state: dict[str, Any], layout: FlatParams) -> dict[str, Any]:
        self._h_has_zero = True
        self._h_version = -1  # h's version counter after the last step (h changed elsewhere when it differs)
        k = self._blocks_of(layout).num_blocks
        U = state["U"].to(device=layout.device, dtype=layout.dtype)
        w = state["w"].to(device=layout.device, dtype=layout.dtype)
        k_old = w.shape[-1]
        if k_old > k or U.shape != (k_old, k_old):
            raise ValueError(
                f"the optimizer state has {k_old} blocks but the parameters now form {k} blocks; load a "
                "state_dict only into an optimizer with the same parameters and partition rule."
            )
        new = dict(state, U=U, w=w)
        if k_old < k:
            new["U"] = torch.zeros(k, k, dtype=U.dtype, device=U.device)
            new["U"][:k_old, :k_old] = U
            new["w"] = torch.cat([w, w.new_zeros(k - k_old)])
            new.update(root_lam=None, root_B=None, root_step=None)
            new.pop(functional.FINGERPRINT_KEY, None)  # recorded by the functional step for the old blocks only
        elif state.get("root_lam") is not None:
            new["root_lam"] = state["root_lam"].to(device=layout.device, dtype=layout.dtype)
            new["root_B"] = state["root_B"].to(device=layout.device, dtype=layout.dtype)
        return new

    # ------------------------------------------------------------------ the step
    def _uses_fused(self, blocks: ParamBlocks, grads: list[Tensor | None], layout: FlatParams) -> bool:
        """Whether this step takes the compiled path: ``fused=True``, some gradient with entries, and enough entries
        that the compiled passes are faster than the eager ones (:data:`FUSED_MIN_NUMEL` for ``torch.compile``'d
        passes; for numba's kernels on CPU, :data:`FUSED_MIN_NUMEL_ONE_BLOCK` entries and
        :data:`FUSED_MIN_MEAN_NUMEL_ONE_BLOCK` per tensor on average with one block per tensor, any size
        otherwise)."""
        if not self.fused:
            return False
        sizes = [g.numel() for g, seg in zip(grads, blocks.segments) if g is not None and seg is not None]
        numel = sum(sizes)
        if _fused.uses_numba(layout.device, layout.dtype):
            one_block = all(seg is None or seg.num_blocks == 1 for seg in blocks.segments)
            if not one_block:
                return numel > 0
            tensors = sum(1 for size in sizes if size)
            return numel >= FUSED_MIN_NUMEL_ONE_BLOCK and numel >= FUSED_MIN_MEAN_NUMEL_ONE_BLOCK * tensors
        if _fused.forked_without_numba(layout.device, layout.dtype):
            # a child forked where numba cannot run (its GNU OpenMP layer): the eager step, the fastest path without
            # a compiler (the fused passes uncompiled took 10.2 against 1.57 ms at 1M entries, 424 against 100 ms
            # with one block per row)
            return False
        return numel > 0 and numel >= FUSED_MIN_NUMEL

    def _step(self, grads: list[Tensor | None], layout: FlatParams, active: list[bool]) -> None:
        if not layout.numel:
            # only empty tensors (a zero-width layer): nothing to step, as with torch.optim.Adagrad; no blocks, so no
            # state either: it starts at the first step whose parameters hold entries (after add_param_group)
            return
        if self.check_finite and self.damping == 0:
            # a singular F makes the root infinite: the functional step then raises with the statistics and h
            # restored, and here the layout this step committed (the first step's fresh state, ...) is undone
            undo = self._undo_point(layout)
            try:
                self._step_on(grads, layout)
            except ValueError:
                self._undo(undo)
                raise
            return
        self._step_on(grads, layout)

    def _undo_point(self, layout: FlatParams) -> tuple:
        """What :meth:`_commit_layout` and the step's bookkeeping may replace (references: tensors changed in place
        are restored by the functional step), for :meth:`_undo`; only taken with ``damping = 0``."""
        state = self.state
        entries = [(p, dict(state[p]) if p in state else None) for p in layout.params]
        flat = (self._layout, dict(self._flat), dict(self._flat_views), self.global_state, dict(self.global_state))
        ratio_forms = (self._pending_ratio_form, self._carried_ratio_form)
        return (*flat, entries, self._workspace, self._h_has_zero, self._h_version, *ratio_forms)

    def _undo(self, undo: tuple) -> None:
        """Put back what :meth:`_undo_point` took: a refused step changes nothing."""
        (self._layout, self._flat, self._flat_views, global_state, global_items, entries, self._workspace) = undo[:7]
        self._h_has_zero, self._h_version, self._pending_ratio_form, self._carried_ratio_form = undo[7:]
        global_state.clear()
        global_state.update(global_items)
        self.global_state = global_state
        for p, entry in entries:
            if entry is None:
                self.state.pop(p, None)
            else:
                self.state[p].clear()
                self.state[p].update(entry)

    def _step_on(self, grads: list[Tensor | None], layout: FlatParams) -> None:
        """:meth:`_step` for parameters that hold entries."""
        blocks = self._blocks_of(layout)  # may raise ValueError: nothing has changed yet
        groups = [self.param_groups[gi] for gi in layout.group_index]
        maximize = [bool(g["maximize"]) for g in groups]
        fused = self._uses_fused(blocks, grads, layout)
        cpu = layout.device.type == "cpu"
        # the CPU step for one block per tensor: its test reads every stepped parameter's dtype against the state's
        tensor_blocks = (
            cpu and not fused and functional._tensor_blocks_apply(layout.params, grads, blocks, layout.dtype, maximize)
        )
        if not tensor_blocks:
            # elsewhere the parameters' dtypes are read here: after model.double() (float32 state) or model.float()
            # (float64 state) the state is cast to the new dtype at this step's commit, not kept in the old one
            refitted = self._refit_dtype(layout)
            if refitted is not layout:
                # the CPU step's bounds of h carry over to the cast h (as through state_dict and load_state_dict)
                self._pending_ratio_form = self._ratio_form_state()
                layout = refitted
                fused = self._uses_fused(blocks, grads, layout)
                tensor_blocks = (
                    cpu
                    and not fused
                    and functional._tensor_blocks_apply(layout.params, grads, blocks, layout.dtype, maximize)
                )
        committed = layout is self._layout
        h = self._flat.get("sum") if committed else None
        if h is not None and h._version != self._h_version:
            # h changed outside the steps (say a reset in place): some entry may be 0 again, and the CPU lists
            # of such entries (which assume that h only grows) are rebuilt from h
            self._h_has_zero = True
            if self._workspace is not None:
                self._workspace.forget_zeros()
        checks_itself = fused or tensor_blocks
        if self.check_finite and not (checks_itself and committed):
            # the fused path's first pass checks the gradients itself, writing nothing, and so does the CPU
            # eager step for one block per tensor; a new layout is checked first, since committing it changes
            # the state. On an accelerator, whether some entry of h is still 0 is read back with the check (on
            # CPU the eager step keeps a list of them)
            read = self._h_has_zero and h is not None and h.numel() > 0 and h.device.type != "cpu"
            values = self._check_finite(grads, layout, [h.amin()] if read and h is not None else [])
            if values:
                self._h_has_zero = values[0] == 0
        self._commit_layout(layout)
        h = self._flat["sum"]
        if not fused and (self._workspace is None or self._workspace.h is not h):
            self._workspace = Workspace.build(blocks, h)
            if self._pending_ratio_form is not None:  # a loaded state: the bounds of the run it continues
                self._workspace.h_max.update(self._pending_ratio_form["h_max"])
                self._workspace.chain_until.update(self._pending_ratio_form["chain_until"])
                self._workspace.h_version = h._version
            elif self._carried_ratio_form is not None:  # a replaced h: the old bounds, checked against it
                self._workspace.h_max.update(self._carried_ratio_form["h_max"])
                self._workspace.chain_until.update(self._carried_ratio_form["chain_until"])
                self._workspace.h_version = -1
        self._pending_ratio_form = None
        self._carried_ratio_form = None
        # Python floats, as torch.optim takes them: a scheduler or a hand may set a tensor or a numpy scalar, and a
        # numpy float32 would round the step's coefficients to float32 (and the fused table refuses it)
        group_lr = [float(g["lr"]) for g in self.param_groups]
        lr = [group_lr[gi] for gi in layout.group_index]  # per parameter, as the functional core takes them
        _block_mean_adagrad(  # block_mean_adagrad without its argument checks: these are built for the blocks
            layout.params,
            grads,
            h,
            self.global_state,
            blocks,
            None if fused else self._workspace,
            lr=lr,
            weight_decay=[float(g.get("weight_decay", 0.0)) for g in groups],
            maximize=maximize,
            eps=self.eps,
            damping=self.damping,
            update_interval=self.update_interval,
            correlation=self._correlation,
            mask=self._h_has_zero or (not self.check_finite and h.device.type != "cpu"),
            check_finite=self.check_finite,
            fused=fused,
        )
        if h.device.type == "cpu" and self._workspace is not None and not fused:
            self._h_has_zero = self._workspace.has_zeros()
        self._h_version = h._version
