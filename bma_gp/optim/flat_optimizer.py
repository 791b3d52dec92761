"""Bookkeeping shared by the optimizers that precondition all gradients jointly.

:class:`FlatPreconditionedOptimizer` is a ``torch.optim.Optimizer`` whose update is
a function of the concatenated gradient of every parameter. It owns:

* the flat layout (:class:`~bma_gp.optim.flat_params.FlatParams`), built lazily at the
  first step on the parameters' device and rebuilt when ``add_param_group`` adds
  parameters or the parameters move to another device;
* per-parameter state that lives in flat buffers (``self.state[p][key]`` is a
  view of one d-vector), listed in ``_flat_state_keys``;
* *global* state spanning all parameters (``self.global_state``: a k x k or
  d x d matrix, a step count), kept in float32 or wider and saved under the
  extra key ``"global_state"`` of :meth:`state_dict`;
* the torch.optim protocol: ``step(closure)`` under ``torch.no_grad()``, parameters
  without a gradient left alone, sparse gradients rejected, and helpers for what every
  subclass needs (the finiteness check, the per-group learning rate and decoupled
  weight decay applied after preconditioning).

A subclass implements three hooks: :meth:`_init_global_state` and
:meth:`_fit_global_state` (its state spanning all parameters) and :meth:`_step` (the
update: check the gradients, then commit the layout with :meth:`_commit_layout`,
then change state and parameters).
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import operator
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import numpy as np
import torch
from torch import Tensor

from bma_gp.optim.flat_params import FlatParams, check_params, state_dtype

__all__ = [
    "FlatPreconditionedOptimizer",
    "OptimizerSetting",
    "check_bool",
    "check_hyperparameter",
    "check_torch_optim_flags",
]


try:  # the frame callback torch.compile installs while compiled code runs (None otherwise); private, hence guarded
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _eval_frame_callback
except ImportError:  # pragma: no cover - older torch
    _eval_frame_callback = None  # type: ignore[assignment]
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


#: whether some ``torch.autocast`` region is active (about 0.3 us; private, hence guarded)
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()  # pragma: no cover - older torch
)


def _dynamo_may_trace() -> bool:
    """Whether ``torch.compile`` is tracing the caller or compiles the frames it calls (about 0.2 us eagerly).

    ``torch.compiler.is_compiling()`` is a constant ``True`` in traced code (which so never reaches the callback
    query, a builtin Dynamo cannot trace); after a graph break Dynamo runs a frame eagerly with its callback still
    installed, and there only the callback shows it. Where torch lacks that query, any loaded Dynamo counts."""
    if _is_compiling():
        return True
    if _eval_frame_callback is None:  # pragma: no cover - older torch
        return "torch._dynamo" in sys.modules
    return _eval_frame_callback() is not None


def check_hyperparameter(name: str, value, *, positive: bool = False, integer: bool = False) -> Any:
    """``value`` as a Python number; ``ValueError("Invalid <name> value: ...")`` unless it is a finite non-negative
    number.

    Like ``torch.optim``, any real number is accepted (``numbers.Real``: Python and numpy scalars, not ``bool``) and
    converted to a Python ``float``; a one-element tensor is checked and returned as it is.

    Args:
        name: the argument's name, used in the message.
        value: the value to check (a real number or a one-element tensor).
        positive: require ``value > 0`` instead of ``>= 0``.
        integer: require an integer (``numbers.Integral``, e.g. ``int`` or ``numpy.int64``, not ``bool``), returned as
            a Python ``int``.

    Returns:
        ``value`` as a Python ``float`` (``int`` with ``integer``), or the tensor ``value``.
    """
    if integer:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if ok:
            value = operator.index(value)
            ok = value > 0 if positive else value >= 0
        if not ok:
            need = "a positive integer" if positive else "a non-negative integer"
            raise ValueError(f"Invalid {name} value: {value!r}; it must be {need}.")
        return value
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"Invalid {name} value: a tensor {name} must have one element, got shape {tuple(value.shape)}."
            )
        number = float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"Invalid {name} value: {value!r}; it must be a real number.")
    ok = number > 0 if positive else number >= 0
    if not ok or number == float("inf"):
        need = "a finite positive number" if positive else "a finite non-negative number"
        raise ValueError(f"Invalid {name} value: {value!r}; it must be {need}.")
    return value if isinstance(value, Tensor) else number


def check_bool(name: str, value) -> bool:
    """``value`` as a Python ``bool``: ``True`` or ``False``, or NumPy's ``numpy.True_`` / ``numpy.False_`` (what a
    configuration read through NumPy holds, and torch.optim accepts), converted, so that a param group, a state dict
    and comparisons with ``is True`` hold a plain ``bool``. Raise ``ValueError("Invalid <name> value: ...")`` for
    anything else (a truthy string such as ``"no"`` would silently mean ``True``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise ValueError(f"Invalid {name} value: {value!r}; it must be True or False.")


@contextlib.contextmanager
def _type_errors_refused():
    """A ``TypeError`` of a check of a saved state raised as the ``ValueError`` the other load checks raise."""
    try:
        yield
    except TypeError as error:
        raise ValueError(str(error)) from None


def check_step_count(state: dict[str, Any], key: str, where: str, fix: str) -> int:
    """``state[key]``, a step count: ``TypeError`` unless it is a Python ``int`` (not ``bool``; a missing entry too),
    ``ValueError`` where it is negative. The message names ``where[key]`` and ends with ``fix`` (a sentence).

    Shared by the functional step (its ``stats["step"]``) and the loading of a global state (``load_state_dict``),
    where a ``"2"``, ``None``, ``2.5`` or a missing entry failed only inside the next step, after it changed the
    statistics."""
    name = f"{where}[{key!r}]"
    if key not in state:
        raise TypeError(f"{name} is missing: it must be an int, the number of steps taken; {fix}")
    value = state[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int (the number of steps taken), got {value!r}; {fix}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int (the number of steps taken), got {value!r}; {fix}")
    return value


_T = TypeVar("_T")


class OptimizerSetting(Generic[_T]):
    """An optimizer-wide setting (``opt.eps``, ``opt.damping``, ...), checked when it is assigned as the constructor
    checks it.

    The documented way to change such a setting between steps is to assign the attribute (``opt.eps = 1e-8``); an
    invalid value then raises the constructor's ``ValueError`` (or ``TypeError``) and the attribute keeps its old
    value, instead of reaching the next step unchecked.

    A data descriptor with ``__set__`` and no ``__get__``: reading the attribute finds the value in the instance's
    ``__dict__``, as for a plain attribute (no cost at a step), and there pickling, ``copy.deepcopy``
    (``_pickled_attributes``) and torch's ``__setstate__`` read and write it as before. An assignment, the
    constructor's and :meth:`~FlatPreconditionedOptimizer.load_state_dict`'s included, stores ``check(optimizer,
    value)``: the checked (converted) value, or it raises before anything changes.
    """

    name: str

    def __init__(self, check: Callable[[Any, Any], _T]) -> None:
        self._check = check

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = self._check(obj, value)

    if TYPE_CHECKING:  # for type checkers only: at run time the instance's __dict__ answers reads

        def __get__(self, obj: Any, owner: type | None = None) -> _T: ...


_INF = float("inf")

#: torch.optim's implementation switches and the values of each that mean "nothing special", which the flat
#: preconditioners accept (configuration systems pass them to every optimizer); ``fused`` only where a class has no
#: fused step (:class:`~bma_gp.optim.BlockMeanAdagrad` checks its own)
_TORCH_FLAG_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "foreach": (None, False),
    "capturable": (False,),
    "differentiable": (False,),
    "fused": (None, False),
}


def check_torch_optim_flags(owner: str, values: dict[str, Any], *, fused_hint: str | None) -> None:
    """Accept torch.optim's ``foreach``, ``capturable`` and ``differentiable`` (the keys of ``values`` that are present)
    at their "nothing special" values (``foreach=None`` or ``False``, the others ``False``), and raise ``ValueError``
    naming the argument and the fix for any other value.

    torch.optim's optimizers take these keyword arguments, and configuration systems pass them to every optimizer.
    The flat preconditioners have one implementation of the step (no foreach variant); it reads values back to the
    host (the finiteness check, the preconditioner's root), so it cannot be captured in a CUDA graph, and it updates
    in place under ``torch.no_grad()``, so it is not differentiable.

    Args:
        owner: the optimizer's class name, for the messages.
        values: the arguments given (a constructor's, or a param group's entries).
        fused_hint: where the class has a fused step, what to pass instead of ``foreach=True`` for a faster step
            (a sentence; ``fused`` itself is then not checked here); ``None`` where it has none: ``fused`` is then
            checked too (``None`` or ``False``).
    """
    reasons = {
        "foreach": f"{owner} has no foreach (multi-tensor) implementation; foreach=None and foreach=False run its one "
        f"step. {fused_hint or ''}".rstrip(),
        "capturable": f"{owner}'s step cannot be captured in a CUDA graph (it reads values back to the host: the "
        "finiteness check and the preconditioner's root); call step() outside graph capture.",
        "differentiable": f"{owner}'s step is not differentiable (it updates parameters and state in place under "
        "torch.no_grad()).",
        "fused": f"{owner} has no fused implementation of its step (BlockMeanAdagrad has one).",
    }
    for name, accepted in _TORCH_FLAG_DEFAULTS.items():
        if name not in values or (name == "fused" and fused_hint is not None):
            continue
        value = values[name]
        if isinstance(value, np.bool_):  # numpy.False_ means False, as it does to torch.optim
            value = bool(value)
        if not any(value is ok for ok in accepted):
            allowed = " or ".join(f"{name}={ok!r}" for ok in accepted)
            raise ValueError(f"Invalid {name} value: {value!r}; pass {allowed}. {reasons[name]}")


#: torch.optim.Adagrad's per-group options that these optimizers do not have, and the value each has here
_ADAGRAD_ONLY_OPTIONS = {"lr_decay": 0.0, "initial_accumulator_value": 0.0}


def _is_zero_option(value: Any) -> bool:
    """Whether ``value`` is the number 0 as a config may give it: a Python or NumPy real number (not ``bool``), or a
    one-element real tensor (``torch.tensor(0.)``; read once, at the check)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex() or value.is_meta:
            return False
        return float(value.detach()) == 0
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return bool(value == 0)
        except (TypeError, ValueError):  # pragma: no cover - an exotic Real
            return False
    return False


def check_adagrad_options(
    owner: str,
    group: dict[str, Any],
    where: str = "",
    *,
    keywords: bool = False,
    bounded_by: str = "damping (an optimizer-wide setting)",
) -> None:
    """Refuse torch.optim.Adagrad's ``lr_decay`` and ``initial_accumulator_value`` in a param group (a configuration
    ported from Adagrad) at any value but 0, which is what these optimizers do: torch.optim keeps unknown group entries
    without a word, so the option would be silently ignored. Zero may be given as a Python or NumPy number or a
    one-element tensor (``torch.tensor(0.)``). Raises ``ValueError`` naming the option and the fix (``where``: what to
    add to the message, e.g. where the group comes from and that nothing was changed).

    Checked by ``add_param_group`` (the constructor's groups included), at each step (a group edited in place,
    ``param_groups[0]["lr_decay"] = 0.5``) and by ``load_state_dict`` (a saved group), each before anything
    changes. With ``keywords``, ``group`` holds the constructor's keywords of these names (the message says so)."""
    subject = f"{owner}(...) was given" if keywords else f"a param group of {owner} has"
    for name, value_here in _ADAGRAD_ONLY_OPTIONS.items():
        if name not in group:
            continue
        value = group[name]
        if _is_zero_option(value):
            continue
        fix = (
            "schedule the learning rate instead, e.g. torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t * "
            "lr_decay)) for Adagrad's decay"
            if name == "lr_decay"
            else f"the statistics start at 0; {bounded_by} keeps the first steps bounded"
        )
        raise ValueError(
            f"{subject} {name}={value!r}: that is a torch.optim.Adagrad option {owner} does not "
            f"have, and it would be silently ignored. Remove it (or set it to {value_here!r}); {fix}.{where}"
        )


def _refuse_meta(what: str, value: Tensor) -> None:
    """``ValueError`` for a saved state tensor on the meta device (no values: the checks and the load would fail on
    torch's own error)."""
    if value.is_meta:
        raise ValueError(
            f"state_dict's {what} is a tensor on the meta device: it has no values to load (a checkpoint saved or "
            "loaded with device='meta'?). Load the saved file onto a real device, torch.load(path, "
            "map_location='cpu'), or leave the state out to restart the statistics. Nothing was loaded."
        )


def _all_finite(grads: list[Tensor], dtype: torch.dtype, extra: list[Tensor]) -> tuple[bool, list[float]]:
    """Whether every entry of every tensor in ``grads`` is finite, and the values of the 0-d tensors ``extra``.

    One cheap sum per tensor and one host synchronisation, which also reads ``extra`` back;
    the exact elementwise test runs only when a sum is not finite (inf/nan entries or overflow).
    """
    device = grads[0].device
    flat = [g.view(-1) if g.is_contiguous() else g for g in grads]  # 1-d sums are faster
    sums = [g.sum(dtype=dtype) for g in flat] + [x.to(device=device, dtype=dtype) for x in extra]
    values = torch.stack(sums).tolist()
    finite = all(math.isfinite(v) for v in values[: len(grads)]) or all(bool(torch.isfinite(g).all()) for g in grads)
    return finite, values[len(grads) :]


def _same_setting(value, current) -> bool:
    """Whether a param group's ``value`` of an optimizer-wide setting is the optimizer's ``current`` one (the same
    object, or an equal number or string; a bool only as itself, NumPy's ``numpy.True_`` / ``numpy.False_`` as the
    Python bool it stands for)."""
    if isinstance(value, np.bool_):
        value = bool(value)
    if isinstance(current, np.bool_):
        current = bool(current)
    if value is current:
        return True
    if _host_number(value):  # as the constructor takes one (a float32 1e-10 is another number than 1e-10)
        value = value.item()
        if isinstance(value, bool):
            return False
    if isinstance(value, (bool, Tensor)) or isinstance(current, bool) or callable(value) or callable(current):
        return False
    try:
        return bool(value == current)
    except (TypeError, ValueError, RuntimeError):
        return False


def _host_number(value) -> bool:
    """Whether ``value`` is a one-element real CPU tensor (its number is read without a device synchronisation)."""
    return isinstance(value, Tensor) and value.numel() == 1 and value.device.type == "cpu" and not value.is_complex()


def _setting_repr(value) -> str:
    """``repr(value)``, with a one-element CPU tensor's exact number (its repr rounds: a float32 ``1e-10`` printed as
    the optimizer's ``1e-10``)."""
    if _host_number(value):
        return f"{value!r} (the number {value.item()!r})"
    return repr(value)


#: the likely cause named by :func:`_non_finite_message` when some parameter is already non-finite, per optimizer
NON_FINITE_PARAMETER_CAUSES = {
    "BlockMeanAdagrad": (
        " With damping=0 the preconditioner of a singular F is infinite (F is singular after a single step); "
        "choose damping > 0."
    ),
}


def _non_finite_message(name: str, params: Sequence[Tensor | None] = ()) -> str:
    """The error of a step that got a non-finite gradient; where some of ``params`` is already non-finite (looked
    at only here, on the way to the error) the message says so, since the loss cannot be the cause then."""
    message = (
        f"{name}.step() got a non-finite gradient (inf or nan); no state or parameter was changed. Check the "
        "loss for overflow or lower the learning rate (check_finite=False skips this check and its host "
        "synchronisation)."
    )
    if any(p is not None and not bool(torch.isfinite(p.detach()).all()) for p in params):
        message += (
            " Some parameters are already inf or nan, so the gradient follows from them: an earlier step or code "
            "outside the optimizer made them so." + NON_FINITE_PARAMETER_CAUSES.get(name, "")
        )
    return message


class FlatPreconditionedOptimizer(torch.optim.Optimizer):
    """Base class: joint preconditioning of the flat gradient (see the module docstring).

    Param-group options every subclass supports: ``lr``, ``weight_decay``
    (decoupled: :math:`\\theta \\leftarrow \\theta - \\mathrm{lr}\\,(u + \\mathrm{wd}\\,\\theta)`)
    and ``maximize``.
    """

    #: per-parameter state entries kept as views of one flat buffer each
    _flat_state_keys: tuple[str, ...] = ()
    #: what keeps the first steps bounded, for the message that refuses Adagrad's ``initial_accumulator_value``
    _first_steps_bound = "damping (an optimizer-wide setting)"
    #: instance attributes that pickling and ``copy.deepcopy`` keep besides torch's ``defaults``, ``state`` and
    #: ``param_groups`` (a subclass adds its hyperparameters); caches are rebuilt on the first step
    _pickled_attributes: tuple[str, ...] = ("check_finite", "global_state")
    #: optimizer-wide hyperparameters as (param-group key, attribute): a group may repeat them only with the
    #: optimizer's value (a subclass adds its own)
    _optimizer_wide: tuple[tuple[str, str], ...] = (("check_finite", "check_finite"),)
    #: for :func:`check_torch_optim_flags`: what to pass instead of ``foreach=True`` (``None``: no fused step)
    _fused_hint: str | None = None
    #: optimizer-wide hyperparameters (attributes) that :meth:`state_dict` saves under ``"hyperparameters"`` and
    #: :meth:`load_state_dict` restores, as torch.optim restores its param groups' ``eps``, each with the keywords of
    #: :func:`check_hyperparameter` that the constructor checks it with (a subclass adds its own)
    _saved_hyperparameters: tuple[tuple[str, dict[str, bool]], ...] = ()

    #: checked on assignment (``opt.check_finite = "no"`` raises ``ValueError``), see :class:`OptimizerSetting`
    check_finite = OptimizerSetting(lambda opt, value: check_bool("check_finite", value))

    def __init__(self, params, defaults: dict[str, Any], *, check_finite: bool = True):
        self.check_finite = check_finite
        self.global_state: dict[str, Any] = {}
        self._layout: FlatParams | None = None
        self._flat: dict[str, Tensor] = {}
        self._flat_views: dict[str, list[Tensor]] = {}  # per key, the views of _flat[key] put into self.state
        self._flat_ptrs: dict[str, tuple[int, list[int]]] = {}  # per key, _flat[key]'s address and its views'
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (``__init__`` adds its groups this way too); its ``lr``, ``weight_decay`` and ``maximize`` are
        checked like the constructor's (numbers are kept as Python numbers).

        Raises:
            ValueError: an invalid group option, an optimizer-wide hyperparameter (``eps``, ...) set in the group
                to another value than the optimizer's, torch.optim's ``foreach``, ``capturable`` or
                ``differentiable`` at a value the step cannot honour (:func:`check_torch_optim_flags`), a parameter
                listed twice, or a parameter the optimizer cannot step (not real floating-point, on the meta device,
                or on another device than the others); the group is not added.
        """
        if isinstance(param_group, dict):  # else torch's TypeError
            check_torch_optim_flags(type(self).__name__, param_group, fused_hint=self._fused_hint)
            check_adagrad_options(type(self).__name__, param_group, bounded_by=self._first_steps_bound)
            self._check_optimizer_wide(param_group)
        super().add_param_group(param_group)
        try:
            self._check_no_duplicates(self.param_groups[-1]["params"])
            self._check_group(self.param_groups[-1])
            check_params([p for group in self.param_groups for p in group["params"]])
        except ValueError:
            self.param_groups.pop()
            raise
        group = self.param_groups[-1]
        for key, attribute in self._optimizer_wide:  # numpy.True_ repeating a bool setting: its Python bool
            if isinstance(group.get(key), np.bool_):
                group[key] = getattr(self, attribute)

    def _check_no_duplicates(self, params: list[Tensor]) -> None:
        """Refuse a group that lists a parameter twice. torch.optim only warns (and steps it twice); here the flat
        layout would hold it twice, with two blocks of one preconditioner and its state rebuilt at every step."""
        seen: set[int] = set()
        for p in params:
            if id(p) in seen:
                raise ValueError(
                    f"a param group of {type(self).__name__} lists a parameter (shape {tuple(p.shape)}) more than "
                    "once; list each parameter once, e.g. params=list(dict.fromkeys(params)) (torch.optim warns that "
                    "this will become an error)."
                )
            seen.add(id(p))

    def _check_optimizer_wide(self, group: dict[str, Any]) -> None:
        """Refuse a group that sets an optimizer-wide hyperparameter (:attr:`_optimizer_wide`) to another value than
        the optimizer's: one preconditioner spans every group, so a per-group value would be silently ignored."""
        name = type(self).__name__
        for key, attribute in self._optimizer_wide:
            if key in group and not _same_setting(group[key], getattr(self, attribute)):
                raise ValueError(
                    f"{key} is an optimizer-wide setting of {name} (one preconditioner spans all parameter groups), "
                    f"not a per-group one: a param group has {key}={_setting_repr(group[key])}, the optimizer {key}="
                    f"{getattr(self, attribute)!r}. Set it in the constructor, {name}(params, {key}=...), for all "
                    f"groups (per group: lr, weight_decay, maximize)."
                )

    def _check_groups_unedited(self) -> None:
        """Refuse a step after a param group's optimizer-wide setting was edited in place (``param_groups[0]["eps"] =
        1e-8``, how torch.optim's ``eps`` is changed between steps), torch.optim.Adagrad's ``lr_decay`` or
        ``initial_accumulator_value`` set in place to a value but 0 (:func:`check_adagrad_options`), or torch.optim's
        ``foreach``, ``capturable`` or ``differentiable`` set in place to a value the step cannot honour
        (:func:`check_torch_optim_flags`): the step would silently ignore it. Also refuse an ``lr``, ``weight_decay``
        or ``maximize`` edited in place to a value the constructor refuses (``nan``, a negative number, ``None``),
        or removed (``del param_groups[0]["lr"]``; also ``"params"``): the step would write NaN into the parameters or
        fail half-way. Before anything changes; a few dict lookups and comparisons per group."""
        for i, group in enumerate(self.param_groups):
            self._check_group_edits(i, group)
            for name in _ADAGRAD_ONLY_OPTIONS:
                if name in group:
                    value = group[name]
                    if type(value) in (int, float) and value == 0:  # the usual case, Python numbers only
                        continue
                    check_adagrad_options(
                        type(self).__name__,
                        group,
                        f" (param_groups[{i}] was edited after it was added; nothing was changed.)",
                        bounded_by=self._first_steps_bound,
                    )
            for key, _ in self._optimizer_wide:
                if key in group:
                    try:
                        self._check_optimizer_wide(group)
                    except ValueError as error:
                        raise ValueError(
                            f"param_groups[{i}] was edited after it was added: {error} To change it between steps "
                            "set the optimizer's attribute of that name (opt.eps = 1e-8, ...; the partition cannot "
                            "change) and delete the group's entry or set it to the same value. Nothing was changed."
                        ) from None
                    break

    def _check_group_edits(self, i: int, group: dict[str, Any]) -> None:
        """The per-group part of :meth:`_check_groups_unedited` for ``param_groups[i]``: torch.optim's flags and the
        per-group options, with Python numbers at valid values let through on two comparisons."""
        edited = f" (param_groups[{i}] was edited after it was added; nothing was changed.)"
        if "lr" not in group or "maximize" not in group or "params" not in group:  # _required_group_keys, unrolled
            self._refuse_missing_group_key(i, group)
        for name in ("foreach", "capturable", "differentiable", "fused"):
            value = group.get(name)
            if value is not None and value is not False and not (name == "fused" and self._fused_hint is not None):
                try:
                    check_torch_optim_flags(type(self).__name__, {name: value}, fused_hint=self._fused_hint)
                except ValueError as error:
                    raise ValueError(f"{error}{edited}") from None
        for name, key in (("learning rate", "lr"), ("weight_decay", "weight_decay")):
            value = group.get(key, 0.0)  # lr is present (checked above); a group without weight_decay steps with 0
            if type(value) is float and 0.0 <= value < _INF:  # the usual case: a valid Python float
                continue
            try:
                check_hyperparameter(name, value)
            except ValueError as error:
                raise ValueError(f"{error}{edited}") from None
        maximize = group["maximize"]
        if maximize is not True and maximize is not False:
            try:
                check_bool("maximize", maximize)
            except ValueError as error:
                raise ValueError(f"{error}{edited}") from None
            if isinstance(maximize, np.bool_):  # its Python bool, as the constructor stores it (a numpy.bool_ in the
                group["maximize"] = bool(maximize)  # state dict fails torch.load(weights_only=True))

    #: the entries every param group must hold at a step (``add_param_group`` fills ``lr`` and ``maximize`` from the
    #: defaults; a group without ``weight_decay`` steps without decay)
    _required_group_keys = ("params", "lr", "maximize")

    def _refuse_missing_group_key(self, i: int, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming ``param_groups[i]``'s first missing required entry (:attr:`_required_group_keys`)
        and how to put it back: the step reads it after changing state (torch.optim's optimizers raise ``KeyError``
        there, before changing anything), so it is refused before anything changes."""
        name = type(self).__name__
        key = next(key for key in self._required_group_keys if key not in group)
        if key == "params":
            fix = f"put the group's parameters back (opt.param_groups[{i}]['params'] = [...], in the order they had)"
        else:
            fix = (
                f"put it back, e.g. opt.param_groups[{i}][{key!r}] = opt.defaults[{key!r}] (here "
                f"{self.defaults.get(key)!r}), or set it in the group given to add_param_group"
            )
        raise ValueError(
            f"param_groups[{i}] of {name} has no {key!r} entry: it was removed after the group was added (a tool that "
            f"rebuilt the group?), and every param group needs {', '.join(map(repr, self._required_group_keys))} at a "
            f"step. Nothing was changed; {fix}."
        )

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        """Check (and convert) the per-group options of an added group; raise ``ValueError`` before changing it."""
        lr = check_hyperparameter("learning rate", group["lr"])
        weight_decay = check_hyperparameter("weight_decay", group.get("weight_decay", 0.0))
        maximize = check_bool("maximize", group["maximize"])
        group["lr"] = lr
        group["maximize"] = maximize  # a Python bool (numpy.True_ converted)
        if "weight_decay" in group:
            group["weight_decay"] = weight_decay

    # ------------------------------------------------------------------ subclass hooks
    def _init_global_state(self, layout: FlatParams) -> dict[str, Any]:
        """Fresh global state for ``layout`` (zeros), on its device and dtype."""
        raise NotImplementedError

    def _fit_global_state(self, state: dict[str, Any], layout: FlatParams) -> dict[str, Any]:
        """Global state moved to ``layout``'s device/dtype and grown for added parameters.

        Raise ``ValueError`` when ``state`` cannot belong to ``layout``.
        """
        raise NotImplementedError

    def _step(self, grads: list[Tensor | None], layout: FlatParams, active: list[bool]) -> None:
        """One update from the per-parameter gradients (``None`` where a parameter has none).

        Called by :meth:`step` when some parameter has a gradient. It must raise (``ValueError``)
        before changing anything when the gradients are refused, then call
        :meth:`_commit_layout` before it touches the state.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ layout and state
    def _current_layout(self) -> FlatParams:
        key = FlatParams.key_of(self.param_groups)
        if self._layout is not None and self._layout.key == key:
            return self._layout
        layout = FlatParams(self.param_groups)
        self._check_layout(layout)
        return layout

    def _check_layout(self, layout: FlatParams) -> None:
        """Raise ``ValueError`` for a new layout that :meth:`add_param_group` would have refused, from ``param_groups``
        edited in place (``param_groups[i]["params"].append(p)``), before anything changes (run once per new layout;
        a subclass adds its own checks). Here: a parameter listed twice, which the layout would hold as two blocks of
        one preconditioner and step twice, its state entry rebuilt at every step."""
        seen: dict[int, int] = {}
        for p, gi in zip(layout.params, layout.group_index):
            if id(p) in seen:
                where = f"twice in group {gi}" if seen[id(p)] == gi else f"in groups {seen[id(p)]} and {gi}"
                raise ValueError(
                    f"the param_groups of {type(self).__name__} list a parameter (shape {tuple(p.shape)}) {where}: "
                    "they were edited after construction (add_param_group refuses this). One preconditioner would "
                    "hold it as two blocks and step it twice; remove the second entry. Nothing was changed."
                )
            seen[id(p)] = gi

    def _refit_dtype(self, layout: FlatParams) -> FlatParams:
        """``layout``, or a new layout of the same parameters when their dtypes changed since it was built so that the
        state's dtype changes (``model.double()`` or ``model.float()`` between steps, see
        :meth:`FlatParams.dtype_changed`). :meth:`_commit_layout` then casts the flat and global state to the new
        dtype, as :meth:`load_state_dict` would: the run continues as one whose state was saved and loaded into the
        converted model. Nothing changes before that commit (a step refused by its checks leaves the old layout).
        Costs one attribute read per parameter; subclasses call it where the step does not already check the
        parameters' dtypes."""
        if layout is not self._layout or not layout.dtype_changed():
            return layout
        return FlatParams(self.param_groups)

    def _commit_layout(self, layout: FlatParams) -> None:
        """Make ``layout`` current: (re)build flat buffers from per-parameter state, fit global state."""
        if layout is self._layout:
            return
        old = self._layout
        if old is not None and not layout.extends(old):
            raise ValueError(self._changed_params_message(old, layout))
        state = self.state
        flats: dict[str, Tensor] = {}
        for key in self._flat_state_keys:  # built before anything is assigned: a bad entry changes nothing
            parts = []
            for p in layout.params:
                value = state[p].get(key) if p in state else None
                if value is None:
                    parts.append(torch.zeros(p.numel(), dtype=layout.dtype, device=layout.device))
                elif not isinstance(value, Tensor) or value.numel() != p.numel():
                    got = f"{value.numel()} entries" if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(
                        f"state[p][{key!r}] of a parameter of shape {tuple(p.shape)} holds {got}; it must be a tensor "
                        f"of the parameter's {p.numel()} entries (or be removed, which restarts it from zeros)."
                    )
                else:
                    parts.append(value.reshape(-1).to(device=layout.device, dtype=layout.dtype))
            flats[key] = torch.cat(parts) if parts else torch.zeros(0, dtype=layout.dtype, device=layout.device)
        # per-parameter state removed for every parameter (`optimizer.state = defaultdict(dict)`, `state.clear()`): a
        # reset of the whole optimizer, so the global state restarts too. Without flat state (FullMatrixAdagrad, whose
        # statistics are all global) the entries themselves mark it: every commit leaves one per parameter, if empty
        if self._flat_state_keys:
            cleared = not any(key in state[p] for p in layout.params if p in state for key in self._flat_state_keys)
        else:
            cleared = bool(layout.params) and not any(p in state for p in layout.params)
        if self.global_state and not cleared:
            global_state = self._fit_global_state(self.global_state, layout)
        else:
            global_state = self._init_global_state(layout)
        self._flat_ptrs = {}
        for key, flat in flats.items():
            self._flat[key] = flat
            self._flat_views[key] = views = layout.split(flat)
            for p, view in zip(layout.params, views):
                state.setdefault(p, {})[key] = view
        for p in layout.params:  # the marks of a cleared state (above)
            state.setdefault(p, {})
        self.global_state = global_state
        self._layout = layout

    def _changed_params_message(self, old: FlatParams, new: FlatParams) -> str:
        """The error of a step whose ``param_groups`` lost or replaced a parameter of the state (``new`` does not
        extend ``old``): which one, and the fixes."""
        name = type(self).__name__
        i = next((i for i, (a, b) in enumerate(zip(old.params, new.params)) if a is not b), len(new.params))
        p, gi = old.params[i], old.group_index[i]
        j = i - old.group_index.index(gi)  # its position in its group
        return (
            f"the param_groups of {name} were edited after its state was built: entry {j} of group {gi} (a parameter "
            f"of shape {tuple(p.shape)}) was removed or replaced. One preconditioner spans the parameters in order, "
            "so a step can only add parameters after them (add_param_group). To freeze a parameter keep it listed and "
            "leave its grad None (requires_grad_(False), then zero_grad()); for another set of parameters build a new "
            f"{name}. Nothing was changed."
        )

    def _state_replaced(self, layout: FlatParams) -> bool:
        """Whether some entry ``state[p][key]`` of the flat state is no longer the view of the flat buffer that the
        last commit put there (replaced, ``state[p]["sum"] = torch.zeros_like(p)``, or removed, ``optimizer.state =
        defaultdict(dict)``), or is that tensor but on other memory (``state[p]["sum"].set_(other)`` or ``.data =
        other``: the entry is ``other``'s memory now); one identity test and one ``data_ptr()`` per parameter.

        ``share_memory_()`` of an entry (what torch.multiprocessing's pickler does) moves the whole flat buffer, the
        views with it: not a replacement."""
        state = self.state
        if not self._flat_state_keys:  # the global statistics only: replaced when the whole state was cleared
            return bool(layout.params) and not any(p in state for p in layout.params)
        for key, views in self._flat_views.items():
            for p, view in zip(layout.params, views):
                entry = state.get(p)
                if entry is None or entry.get(key) is not view:
                    return True
            cached = self._flat_ptrs.get(key)
            if cached is None or cached[0] != self._flat[key].data_ptr():
                cached = self._flat_addresses(key, layout)
            if list(map(Tensor.data_ptr, views)) != cached[1]:
                return True
        return False

    def _flat_addresses(self, key: str, layout: FlatParams) -> tuple[int, list[int]]:
        """The address of the flat buffer ``key`` and where the views of it that the last commit put into
        ``self.state`` are (``data_ptr()``, 0 for an empty tensor): worked out once per commit, and again after the
        buffer moved (``share_memory_()``, a ``resize_()`` that grew it)."""
        flat = self._flat[key]
        base, size = flat.data_ptr(), flat.element_size()
        ptrs = [base + start * size if numel else 0 for start, numel in zip(layout.offsets, layout.numels)]
        cached = self._flat_ptrs[key] = (base, ptrs)
        return cached

    def _forget_flat_state(self) -> None:
        """Drop what a subclass derived from the flat buffers: the step rebuilds them from ``self.state``."""

    # ------------------------------------------------------------------ torch.optim protocol
    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss
                (run with gradients enabled).

        Returns:
            The loss returned by ``closure``, or ``None``.

        Raises:
            SparseGradientError: a parameter has a sparse gradient.
            ValueError: a gradient holds inf or nan, or (FullMatrixAdagrad) is so large that its
                statistics would overflow, in their entries or their eigenvalues (when ``check_finite``); a param
                group was edited in place to an optimizer-wide setting of another value, to torch.optim.Adagrad's
                ``lr_decay`` or ``initial_accumulator_value`` at a value but 0, or lost its ``lr``, ``maximize`` or
                ``params`` entry; nothing has been changed when this is raised.
        """
        if _dynamo_may_trace():
            # torch.compile is tracing this call (a compiled training step that calls step()), or running it after a
            # graph break with its frame callback still compiling the frames it calls: Dynamo would turn the step's
            # numpy arithmetic on the parameters' memory into graph ops on copies and drop its in-place writes. So
            # the step runs with Dynamo disabled (a graph break), as it runs eagerly
            return self._step_outside_graph(closure)
        return self._step_eagerly(closure)

    @torch._disable_dynamo
    def _step_outside_graph(self, closure=None):
        """:meth:`step`'s body, never traced by ``torch.compile`` (run eagerly at a graph break), without the step
        hooks that torch.optim wraps around :meth:`step` (they run once, around this call)."""
        with torch.no_grad():
            return self._step_eagerly(closure)

    def _step_eagerly(self, closure=None):
        """The body of :meth:`step` (under ``torch.no_grad()``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups_unedited()
        layout = self._current_layout()
        if layout is self._layout and self._state_replaced(layout):
            # torch.optim reads self.state at every step: a replaced entry is honoured (copied into a new flat
            # buffer when this step commits the layout, after its checks; a cleared state restarts the optimizer)
            self._layout = None
            self._forget_flat_state()
        changed = None if self._layout is None else self._layout.shape_change()
        if changed is not None:
            # h, the block statistics and the cached buffers belong to the old shape: stepping on would read and
            # write the parameter by the old bounds (torch.optim's optimizers raise here too, on their state's shape)
            i, built, now = changed
            raise ValueError(
                f"parameter {i} of {type(self).__name__} changed shape from {tuple(built)} to {tuple(now)} since the "
                "optimizer's state was built (p.data = ... of another shape); its state belongs to the old shape. "
                "Build a new optimizer for the resized parameters. Nothing was changed."
            )
        shared = layout.overlapping()
        if shared is not None:
            i, p = shared
            raise ValueError(
                f"parameter {i} of {type(self).__name__} has entries that share memory (shape {tuple(p.shape)}, "
                f"strides {tuple(p.stride())}: p.data = t.expand(...) since it was added?); the step's in-place "
                "update would write one location several times, and torch would raise half-way through the step. Make "
                "it its own "
                "storage (p.data = p.data.clone()). Nothing was changed."
            )
        grads, active = layout.collect_grads()
        if not any(active):
            return loss
        if _any_autocast_enabled():
            # step() called inside torch.autocast (say scaler.step(opt) in the autocast block): autocast would run the
            # step's matrix products (the k x k root applied to block sums, FullMatrixAdagrad's d x d root) in
            # bfloat16/float16, a silently different step. torch.optim's steps are elementwise, which autocast leaves
            # alone; this one runs as outside autocast (the closure above ran inside it, as the caller asked)
            with torch.autocast(layout.device.type, enabled=False), torch.autocast("cpu", enabled=False):
                self._step_in_grad_mode(grads, layout, active)
        else:
            self._step_in_grad_mode(grads, layout, active)
        return loss

    def _step_in_grad_mode(self, grads: list[Tensor | None], layout: FlatParams, active: list[bool]) -> None:
        """:meth:`_step`, outside ``torch.inference_mode()`` (and under ``torch.no_grad()``)."""
        if torch.is_inference_mode_enabled():
            # a step under torch.inference_mode() (torch's Adagrad steps there: it makes its state at construction):
            # the state this step makes (flat buffers, global state, root) would be inference tensors, whose version
            # counters the step reads and which later steps outside inference mode may not update in place (leaving
            # inference mode turns grad mode back on: off again, as in step)
            with torch.inference_mode(False), torch.no_grad():
                self._step(grads, layout, active)
        else:
            self._step(grads, layout, active)

    def _check_finite(
        self, grads: list[Tensor | None], layout: FlatParams, extra: Sequence[Tensor] = ()
    ) -> list[float]:
        """Raise ``ValueError`` when a gradient holds inf or nan; return the values of the 0-d tensors ``extra``.

        One cheap sum per gradient and one host synchronisation, which also reads ``extra`` back (so
        a subclass gets host values of its state at no further synchronisation).
        """
        present = [grad for grad in grads if grad is not None]
        finite, values = _all_finite(present, layout.dtype, list(extra))
        if not finite:
            raise ValueError(_non_finite_message(type(self).__name__, layout.params))
        return values

    def _maximize_of_group(self) -> list[bool]:
        return [bool(group["maximize"]) for group in self.param_groups]

    def _active_by_group(self, layout: FlatParams, active: list[bool]):
        """Yield ``(lr, weight_decay, indices)`` per group: the flat indices of its parameters that had a gradient."""
        for gi, group in enumerate(self.param_groups):
            indices = [i for i, (a, pg) in enumerate(zip(active, layout.group_index)) if a and pg == gi]
            if indices:
                lr = group["lr"]
                yield float(lr), float(group.get("weight_decay", 0.0)), indices

    def _apply(self, layout: FlatParams, direction: Tensor, active: list[bool]) -> None:
        """``theta <- theta - lr * (u + weight_decay * theta)`` per group, for parameters that had a gradient."""
        views = layout.split(direction)
        for lr, wd, indices in self._active_by_group(layout, active):
            params = [layout.params[i] for i in indices]
            updates = [
                views[i] if views[i].dtype == params[j].dtype else views[i].to(params[j].dtype)
                for j, i in enumerate(indices)
            ]
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_add_(params, updates, alpha=-lr)

    # ------------------------------------------------------------------ (de)serialisation
    @contextlib.contextmanager
    def _torch_hooks_held(self, *names: str):
        """Hold back torch's hook dicts ``names`` (``_optimizer_state_dict_post_hooks``, ...) while torch's
        ``state_dict`` / ``load_state_dict`` runs, and yield them: the caller runs them once its own state is saved
        or loaded, where torch runs them (on the whole state dict, after the whole load)."""
        originals = [getattr(self, name, None) for name in names]  # None: a torch without such hooks
        for name, hooks in zip(names, originals):
            if hooks is not None:
                setattr(self, name, OrderedDict())
        try:
            yield tuple(OrderedDict() if hooks is None else hooks for hooks in originals)
        finally:
            for name, hooks in zip(names, originals):
                if hooks is not None:  # the same objects: the hooks' removable handles refer to them
                    setattr(self, name, hooks)

    def state_dict(self) -> dict[str, Any]:
        """The torch state dict plus ``"global_state"`` (the state spanning all parameters) and, where a subclass has
        them, ``"hyperparameters"`` (its optimizer-wide hyperparameters, plain numbers: ``eps``, ...).

        Like torch's, the returned tensors are references, not copies; the step count and the other plain numbers are
        copied now (a dict kept while training goes on pairs later statistics with this count: deep-copy it to keep
        it). Hooks registered with
        ``register_state_dict_post_hook`` get the whole dict, ``"global_state"`` included.
        """
        with self._torch_hooks_held("_optimizer_state_dict_post_hooks") as (post_hooks,):
            sd = super().state_dict()
        self._save_own_state(sd)
        for hook in post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _save_own_state(self, sd: dict[str, Any]) -> None:
        """Add to torch's state dict ``sd`` what torch does not save (a subclass adds its own entries)."""
        sd["global_state"] = dict(self.global_state)
        for group in sd["param_groups"]:  # torch's copies: a numpy.bool_ set in place (maximize) as its Python bool,
            for key, value in group.items():  # which torch.load(weights_only=True) reads back
                if isinstance(value, np.bool_):
                    group[key] = bool(value)
        if self._saved_hyperparameters:
            sd["hyperparameters"] = {name: getattr(self, name) for name, _ in self._saved_hyperparameters}

    def _loaded_hyperparameters(self, saved: Any, saved_groups: Any) -> dict[str, Any]:
        """The optimizer-wide hyperparameters of a state dict: its ``"hyperparameters"`` entry (``saved``), and the
        values that its param groups (``saved_groups``) repeat (``{"params": ..., "eps": 1e-8}``: a group may repeat
        one at the optimizer's value), checked as the constructor checks them; raise ``ValueError`` before anything
        changes. A group that repeats one at another value than the entry's, or than another group's, is refused (an
        edited state dict: its value would be silently ignored). Names in neither keep the optimizer's values, e.g.
        for state dicts saved before the entry was added."""
        name = type(self).__name__
        known = dict(self._saved_hyperparameters)
        if saved is not None and (not isinstance(saved, dict) or any(key not in known for key in saved)):
            got = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(
                f"state_dict's 'hyperparameters' entry must be a dict with some of the keys {list(known)}, got "
                f"{got}: it was not produced by {name}.state_dict(). Nothing was loaded."
            )
        found = {key: (value, f"state_dict['hyperparameters'][{key!r}]") for key, value in (saved or {}).items()}
        for i, group in enumerate(saved_groups if isinstance(saved_groups, list) else []):
            for key in known:
                if not isinstance(group, dict) or key not in group:
                    continue
                where = f"state_dict['param_groups'][{i}][{key!r}]"
                if key not in found:
                    found[key] = (group[key], where)
                elif not _same_setting(group[key], found[key][0]):
                    raise ValueError(
                        f"state_dict sets the optimizer-wide {key} of {name} twice: {where} = {group[key]!r}, "
                        f"{found[key][1]} = {found[key][0]!r} (one preconditioner spans all groups, so a group "
                        f"repeats it only at the optimizer's value). Set one value in state_dict['hyperparameters']"
                        f"[{key!r}] and delete the param groups' {key!r}. Nothing was loaded."
                    )
        values = {}
        for key, (value, where) in found.items():
            try:
                checked = check_hyperparameter(key, value, **known[key])
            except ValueError as error:
                raise ValueError(
                    f"state_dict holds an invalid optimizer-wide hyperparameter: {error} Nothing was loaded; correct "
                    f"{where}, or delete it to keep this optimizer's {key}={getattr(self, key)!r}."
                ) from None
            values[key] = checked if known[key].get("integer") else float(checked)
        return values

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, exactly.

        Torch casts per-parameter floating state to the parameter's dtype; here the flat
        per-parameter state and the global state keep their precision: they are
        moved to the parameters' device and cast to :func:`~bma_gp.optim.flat_params.state_dtype`
        of the parameters (float32 or wider), so a run continues bit for bit on the
        same device and dtype. As in torch, hooks registered with ``register_load_state_dict_pre_hook`` run first
        (the dict one returns is what is loaded) and those registered with ``register_load_state_dict_post_hook``
        after the whole state, global state included, is loaded.

        The optimizer-wide hyperparameters saved under ``"hyperparameters"`` replace this optimizer's, as torch.optim
        restores the ``eps`` of its param groups: checked as the constructor checks them, and restored together with
        the state or not at all (an invalid one raises ``ValueError`` before anything changes). A state dict saved
        without the entry keeps this optimizer's values, except those its param groups repeat (a group may repeat
        one at the optimizer's value); a group that repeats one at another value than the entry's is refused. After
        the load a group repeats an optimizer-wide setting only at this optimizer's value.
        """
        state_dict = dict(state_dict)
        for pre_hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        names = ("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")
        with self._torch_hooks_held(*names) as (_, post_hooks):
            if torch.is_inference_mode_enabled():
                # loaded under torch.inference_mode(): the state's copies would be inference tensors, which the steps
                # (outside it) may not update in place (torch.optim keeps the state dict's own tensors there)
                with torch.inference_mode(False), torch.no_grad():
                    self._load_own_state(state_dict)
            else:
                self._load_own_state(state_dict)
        for post_hook in post_hooks.values():
            post_hook(self)

    def _load_own_state(self, state_dict: dict[str, Any]) -> None:
        """:meth:`load_state_dict` without the hooks (a subclass that saves more entries loads them here; it may
        change ``state_dict``, a copy)."""
        global_state = state_dict.pop("global_state", None)
        if global_state is None:
            name = type(self).__name__
            raise ValueError(
                f"state_dict has no 'global_state' entry: it was not produced by {name}.state_dict(), or a tool kept "
                "only its 'state' and 'param_groups' (torch.distributed.checkpoint's get_optimizer_state_dict / "
                "set_optimizer_state_dict do: they drop the optimizer's statistics, which no per-parameter entry "
                f"holds). Save and load {name}.state_dict() whole (torch.save, or dcp.save / dcp.load of a dict that "
                "holds it). Nothing was loaded."
            )
        saved_hyperparameters = state_dict.pop("hyperparameters", None)
        saved_flat = {
            idx: {k: st[k] for k in self._flat_state_keys if k in st} for idx, st in state_dict["state"].items()
        }
        self._check_saved_sizes(state_dict, saved_flat)
        self._check_saved_global_state(state_dict, global_state)
        if self.check_finite:  # with check_finite=False a run may hold inf/nan statistics, and may resume them
            self._check_saved_values(saved_flat, global_state)
        # after the checks that name a state dict of another optimizer or model, before anything changes
        hyperparameters = self._loaded_hyperparameters(saved_hyperparameters, state_dict.get("param_groups"))
        saved_groups = state_dict.get("param_groups")
        for i, group in enumerate(saved_groups if isinstance(saved_groups, list) else []):
            if isinstance(group, dict):  # a loaded group would keep the option, and the steps ignore it
                check_adagrad_options(
                    type(self).__name__,
                    group,
                    f" (in state_dict['param_groups'][{i}]; nothing was loaded.)",
                    bounded_by=self._first_steps_bound,
                )
                if "lr" not in group:  # a step could not take the group (maximize is filled in, as torch.optim does)
                    raise ValueError(
                        f"state_dict['param_groups'][{i}] has no 'lr': the group cannot be stepped. It was not saved "
                        f"by {type(self).__name__}.state_dict() whole; put the learning rate back into the saved "
                        "group. Nothing was loaded."
                    )
                # checked as add_param_group checks them: loaded, an invalid one was refused at every later step as
                # "edited after it was added", which sent the user looking for an edit that never happened
                where = f" (in state_dict['param_groups'][{i}]; nothing was loaded.)"
                try:
                    check_hyperparameter("learning rate", group["lr"])
                    if "weight_decay" in group:
                        check_hyperparameter("weight_decay", group["weight_decay"])
                    if "maximize" in group:
                        check_bool("maximize", group["maximize"])
                except ValueError as error:
                    raise ValueError(f"{error}{where}") from None
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        id_map = dict(zip(saved_ids, params))
        dtype = state_dtype(p.dtype for p in params)
        device = params[0].device
        for idx, entries in saved_flat.items():
            if idx in id_map:
                for k, v in entries.items():  # detached: a saved tensor that requires grad loads as a leaf
                    self.state[id_map[idx]][k] = v.detach().to(device=device, dtype=dtype, copy=True)
        for p in params:  # every parameter marked as the steps leave them (a cleared state restarts: _commit_layout)
            self.state.setdefault(p, {})
        self.global_state = {
            k: (
                v.detach().to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, copy=True)
                if isinstance(v, Tensor)
                else copy.deepcopy(v)
            )
            for k, v in global_state.items()
        }
        for key, value in hyperparameters.items():  # checked above: restored with the state, all or nothing
            setattr(self, key, value)
        for group in self.param_groups:  # a loaded group repeats an optimizer-wide setting only at its value
            for key, attribute in self._optimizer_wide:
                if key in group:
                    group[key] = getattr(self, attribute)
            if "maximize" in group:  # checked above: a Python bool, as add_param_group stores it (numpy.True_)
                group["maximize"] = check_bool("maximize", group["maximize"])
        self._layout = None
        self._flat = {}
        self._flat_views = {}
        self._flat_ptrs = {}

    def _check_saved_sizes(self, state_dict: dict[str, Any], saved_flat: dict) -> None:
        """Raise ``ValueError`` (before anything changes) when a saved per-parameter state entry does not have the
        number of entries of the parameter it is loaded into."""
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict.get("param_groups", []) for i in group["params"]]
        if len(saved_ids) != len(params):
            return  # torch's load_state_dict names this mismatch
        for position, (idx, p) in enumerate(zip(saved_ids, params)):
            for key, value in saved_flat.get(idx, {}).items():
                if not isinstance(value, Tensor):  # else torch's load would have replaced the state when it fails
                    raise ValueError(
                        f"state_dict does not fit these parameters: its '{key}' of parameter {position} is a "
                        f"{type(value).__name__}, not a tensor: it was not produced by {type(self).__name__}."
                        "state_dict(). Nothing was loaded."
                    )
                _refuse_meta(f"'{key}' of parameter {position}", value)
                if not value.is_floating_point():
                    raise ValueError(
                        f"state_dict's '{key}' of parameter {position} has dtype {value.dtype}, but "
                        f"{type(self).__name__}'s statistics are real floating-point (float32 or the widest "
                        f"parameter dtype): {self._corrupt_global_fix()}"
                    )
                if value.numel() != p.numel():
                    raise ValueError(
                        f"state_dict does not fit these parameters: its '{key}' of parameter {position} has "
                        f"{value.numel()} entries, the parameter {p.numel()} (shape {tuple(p.shape)}). Load a state "
                        f"dict saved from the same model."
                    )

    #: global state entries whose values are sums of squares (a vector, or a matrix whose diagonal is one)
    _nonnegative_global = ("w", "U", "H")

    def _check_saved_values(self, saved_flat: dict, global_state: dict[str, Any]) -> None:
        """Raise ``ValueError`` (before anything changes) for saved statistics that no run produces: a value that is
        not finite, or a negative sum of squares (the flat state, ``w``, the diagonal of ``U`` or ``H``). The step
        would otherwise fail inside its eigendecomposition with a LAPACK error, or step by ``nan``. One pass over
        the saved state (a load is rare); only with ``check_finite`` (the default), under which a run keeps its
        statistics finite."""
        name = type(self).__name__
        entries = [
            (f"'{key}' of parameter {idx}", value, True) for idx, st in saved_flat.items() for key, value in st.items()
        ]
        entries += [
            (f"global_state[{key!r}]", value, key in self._nonnegative_global)
            for key, value in (global_state or {}).items()
            if isinstance(value, Tensor) and value.is_floating_point()
        ]
        for what, value, squares in entries:
            if not value.is_floating_point():
                continue
            if not bool(torch.isfinite(value).all()):
                problem = "holds a value that is not finite (nan or inf)"
            elif squares and bool(((value if value.dim() < 2 else value.diagonal(dim1=-2, dim2=-1)) < 0).any()):
                problem = "holds a negative sum of squares"
            else:
                continue
            raise ValueError(
                f"state_dict's {what} {problem}: no run of {name} with check_finite=True produces that (was the "
                "checkpoint edited or corrupted?). Load an intact state dict, or leave the state out to restart the "
                "statistics (check_finite=False loads it as it is). Nothing was loaded."
            )

    def _check_saved_global_state(self, state_dict: dict[str, Any], global_state: dict[str, Any]) -> None:
        """Raise ``ValueError`` (before anything changes) when the saved global state cannot belong to these
        parameters (and, for block-mean AdaGrad, this partition), via :meth:`_check_global_sizes`.

        Its size must be that of the parameters of the first ``m`` groups, for some ``m``: all of them, or fewer when
        the state was saved after ``add_param_group`` and before the next step (the step then pads it, as it would
        have in the saving run).

        Also refused, since the next step would fail half-way on them (after changing the statistics) or silently keep
        a stale cached root: a global state that is not a dict, a ``step`` that is missing or not a non-negative
        ``int``, statistics (``_nonnegative_global``) that are not real floating-point tensors, and (via
        :meth:`_check_saved_step_entries`) what a subclass keeps besides, such as block-mean AdaGrad's cached root."""
        name = type(self).__name__
        if not isinstance(global_state, dict):
            raise ValueError(
                f"state_dict's 'global_state' must be a dict (as {name}.state_dict() saves it), got "
                f"{type(global_state).__name__}: it was not produced by {name}.state_dict(). Nothing was loaded."
            )
        if not global_state:
            return  # saved before the first step
        for key, value in global_state.items():
            if isinstance(value, Tensor):
                _refuse_meta(f"global_state[{key!r}]", value)
        with _type_errors_refused():
            check_step_count(global_state, "step", "state_dict's global_state", self._corrupt_global_fix())
        for key in self._nonnegative_global:
            value = global_state.get(key)
            if isinstance(value, Tensor) and not value.is_floating_point():
                raise ValueError(
                    f"state_dict's global_state[{key!r}] has dtype {value.dtype}, but {name}'s statistics are real "
                    f"floating-point (float32 or the widest parameter dtype): a step would round them to integers "
                    f"or fail; {self._corrupt_global_fix()}"
                )
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)
        ):
            return  # torch's load_state_dict names this mismatch
        ends = [0]
        for group in self.param_groups:
            ends.append(ends[-1] + len(group["params"]))
        layout = FlatParams(self.param_groups)
        self._check_global_sizes(global_state, layout, ends[1:])
        with _type_errors_refused():
            self._check_saved_step_entries(global_state)
        self._check_saved_flat_state_present(state_dict, global_state, layout, ends[1:])

    def _corrupt_global_fix(self) -> str:
        """The end of the messages that refuse a saved global state no run produces (edited or corrupted)."""
        name = type(self).__name__
        return (
            f"it was not produced by {name}.state_dict() as it is (edited or corrupted?). Load an intact state dict, "
            "or leave the state out to restart the statistics. Nothing was loaded."
        )

    def _check_saved_step_entries(self, global_state: dict[str, Any]) -> None:
        """Raise ``ValueError`` (before anything changes) for entries of a saved global state, of a size that
        :meth:`_check_global_sizes` accepted, that a step cannot take (a subclass checks what it keeps besides the
        step count and the statistics)."""

    def _check_saved_flat_state_present(
        self, state_dict: dict[str, Any], global_state: dict[str, Any], layout: FlatParams, group_ends: list[int]
    ) -> None:
        """Raise ``ValueError`` (before anything changes) when the saved global state covers a parameter (with
        entries) whose saved per-parameter flat state (``_flat_state_keys``: BlockMeanAdagrad's ``"sum"``) is
        missing: the step would restart that statistic at zero and keep the global statistics built with it, a
        silently different preconditioner. Called once the global state's size fits (:meth:`_check_global_sizes`).

        The global state covers the parameters of the first groups up to the smallest group end whose size it has
        (a state saved after ``add_param_group`` and before the next step has no state for the later groups, and a
        global state sized for the earlier ones). A state dict without any flat state is a cleared state
        (``optimizer.state = defaultdict(dict)``), which the next step treats as a restart of every statistic, and
        loads as such."""
        keys = self._flat_state_keys
        saved_state = state_dict.get("state")
        if not keys or not isinstance(saved_state, dict):
            return
        entries = [entry for entry in saved_state.values() if isinstance(entry, dict)]
        if not any(key in entry for entry in entries for key in keys):
            return  # a cleared state: the step restarts the global state too, as in the saving run
        covered = None
        for end in group_ends:  # the smallest end that the global state's size fits
            try:
                self._check_global_sizes(global_state, layout, [end])
            except ValueError:
                continue
            covered = end
            break
        if covered is None:
            return  # not reached: the caller's check of the sizes passed
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        name = type(self).__name__
        for position, (idx, p) in enumerate(zip(saved_ids[:covered], layout.params)):
            if not p.numel():
                continue  # nothing to restart
            entry = saved_state.get(idx)
            missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
            if missing:
                raise ValueError(
                    f"state_dict does not hold the per-parameter state {missing[0]!r} of parameter {position} (shape "
                    f"{tuple(p.shape)}), while its global state spans that parameter (the first {covered} "
                    f"parameters): {name}'s next step would restart that statistic at zero and keep the global "
                    "statistics it entered, a silently different preconditioner. It was not produced by "
                    f"{name}.state_dict() as it is (edited, or a partial checkpoint). Load an intact state dict; to "
                    "restart all the statistics, load it with 'state' emptied and 'global_state' = {}. Nothing was "
                    "loaded."
                )

    def _check_global_sizes(self, global_state: dict[str, Any], layout: FlatParams, group_ends: list[int]) -> None:
        """Raise ``ValueError`` unless ``global_state`` has the size of the parameters ``layout.params[:e]`` for some
        ``e`` in ``group_ends`` (the ends of the groups, in flat order; see :meth:`_check_saved_global_state`)."""

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in self._pickled_attributes:
            state[name] = self.__dict__[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # as torch.optim's Adagrad: a group saved without it (older torch) minimises
            group.setdefault("maximize", False)
        self.__dict__.setdefault("global_state", {})
        self.__dict__.setdefault("check_finite", True)
        self._layout = None
        self._flat = {}
        self._flat_views = {}
        self._flat_ptrs = {}
