"""Full-matrix AdaGrad: the dense reference that block-mean AdaGrad approximates."""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

from bma_gp.optim.flat_optimizer import (
    FlatPreconditionedOptimizer,
    OptimizerSetting,
    check_adagrad_options,
    check_bool,
    check_hyperparameter,
    check_torch_optim_flags,
)
from bma_gp.optim.flat_params import FlatParams

__all__ = ["FullMatrixAdagrad", "full_matrix_direction"]


def full_matrix_direction(H: Tensor, g: Tensor, eps: float) -> Tensor:
    r"""The full-matrix AdaGrad direction :math:`(H + \epsilon I)^{-1/2} g`.

    Computed from the eigendecomposition :math:`H = Q \operatorname{diag}(\mu) Q^\top`
    as :math:`Q \operatorname{diag}((\max(\mu, 0) + \epsilon)^{-1/2}) Q^\top g`
    (eigenvalues below zero are rounding error of a positive semidefinite sum).

    Args:
        H: symmetric positive semidefinite matrix. # shape: (d, d)
        g: gradient. # shape: (d,)
        eps: the ridge :math:`\epsilon > 0`.
    """
    return _direction_and_eigenvalues(H, g, eps)[0]


def _direction_and_eigenvalues(H: Tensor, g: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`full_matrix_direction` and the eigenvalues :math:`\\mu` of ``H`` it was computed from (for the
    overflow check of :meth:`FullMatrixAdagrad._checked_update`)."""
    mu, Q = _eigh(H)
    coef = (Q.mT @ g) * (mu.clamp_min(0) + eps).rsqrt()
    return Q @ coef, mu


def _eigh(H: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh(H)``; where LAPACK's iteration fails to converge in a narrower dtype, computed again in
    float64 and rounded back: a user trial's float32 ``g g^T`` (a rank-one ``H`` at the first step of a small model
    with a frozen layer) failed in float32 and not in float64, and the same holds for numpy's and scipy's
    float32 drivers on it only in part. The same decomposition, more precisely; float64 failures raise. On that same
    matrix float32 ``eigh`` also returned NaN without raising (as often as not, on two threads: the step wrote NaN
    into the parameters): a non-finite result of a finite ``H`` in a narrower dtype is redone in float64 too."""
    narrow = H.dtype != torch.float64 and H.is_floating_point()
    try:
        mu, Q = torch.linalg.eigh(H)
    except torch.linalg.LinAlgError:
        if not narrow:
            raise
    else:
        if not narrow or bool(torch.isfinite(mu).all() & torch.isfinite(Q).all()) or not bool(torch.isfinite(H).all()):
            return mu, Q
    mu, Q = torch.linalg.eigh(H.double())
    return mu.to(H.dtype), Q.to(H.dtype)


def _checked_eps(opt: Any, value: Any) -> float:
    return float(check_hyperparameter("eps", value, positive=True))


def _checked_max_dim(opt: Any, value: Any) -> int:
    """A positive integer; assigned after construction, also at least the parameters' total size (the constructor's
    check of ``add_param_group``)."""
    max_dim = check_hyperparameter("max_dim", value, positive=True, integer=True)
    if "param_groups" in opt.__dict__:
        opt._check_max_dim(max_dim=max_dim)
    return max_dim


class FullMatrixAdagrad(FlatPreconditionedOptimizer):
    r"""Full-matrix AdaGrad (Duchi, Hazan and Singer, 2011) over all parameters jointly.

    With :math:`g_t` the concatenation of every parameter's gradient (all parameter
    groups, in order; zeros for parameters without a gradient),

    .. math::

        H_t = H_{t-1} + g_t g_t^\top, \qquad
        \theta_t = \theta_{t-1} - \mathrm{lr}\,\bigl[(H_t + \epsilon I)^{-1/2} g_t
            + \mathrm{wd}\,\theta_{t-1}\bigr].

    The dense :math:`d \times d` matrix :math:`H_t` costs :math:`O(d^2)` memory and an
    :math:`O(d^3)` eigendecomposition per step, so this is a reference for small
    models (it is what block-mean AdaGrad approximates, see
    :class:`~bma_gp.optim.BlockMeanAdagrad` and Lu et al., 2018). Models with more than
    ``max_dim`` parameters are refused.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate (per group). Default: ``1e-2``.
        eps: ridge :math:`\epsilon > 0` added to :math:`H_t`. Default: ``1e-4``.
        weight_decay: decoupled weight decay (per group). Default: ``0``.
        maximize: ascend instead of descend (per group). Default: ``False``.
        max_dim: largest total number of parameters accepted. Default: ``20000``
            (the state then takes 1.6 GB in float32).
        check_finite: raise ``ValueError`` before changing anything on an inf/nan gradient, or on a
            gradient so large (finite, say 1e30 in float32) that :math:`H_t` would overflow to inf; ``False``
            skips these checks and their host synchronisations (such a step then fails in the
            eigendecomposition, its step count unchanged but :math:`H_t` not finite). Default: ``True``.
        lr_decay, initial_accumulator_value: torch.optim.Adagrad's options, accepted at 0 (what this optimizer does)
            so that a ported Adagrad configuration passed as keywords works; any other value raises the
            ``ValueError`` a param group with it gets. Not stored.
        foreach, capturable, differentiable, fused: torch.optim's implementation switches, accepted so that
            configurations that pass them to every optimizer work: ``foreach=None`` or ``False``,
            ``capturable=False``, ``differentiable=False`` and ``fused=None`` or ``False`` (the defaults) run the
            one step there is; any other value raises ``ValueError`` (no multi-tensor or fused variant, no CUDA
            graph capture, no autograd through the step). Not stored.

    Only ``lr``, ``weight_decay`` and ``maximize`` are per group; a param group that sets ``eps``, ``max_dim`` or
    ``check_finite`` to another value than the constructor's is refused. Assigned as attributes between steps
    (``opt.eps = 1e-3``) they are checked as the constructor checks them (``max_dim`` also against the parameters'
    size): an invalid value raises its ``ValueError`` and the old value stays.

    Raises:
        ValueError: invalid hyperparameters, ``foreach``/``capturable``/``differentiable``/``fused`` at a value the
            step cannot honour, a param group with an optimizer-wide hyperparameter of another value, or more than
            ``max_dim`` parameters.

    The global state (``H``, ``step``) lives in :attr:`global_state`, in float32 or
    the widest parameter dtype, and is saved by :meth:`state_dict`, with ``eps`` (under ``"hyperparameters"``), which
    :meth:`load_state_dict` restores as torch.optim restores its param groups' ``eps``; ``max_dim`` and
    ``check_finite`` stay the loading optimizer's.
    """

    _pickled_attributes = (*FlatPreconditionedOptimizer._pickled_attributes, "eps", "max_dim")
    _saved_hyperparameters = (("eps", {"positive": True}),)
    _optimizer_wide = (*FlatPreconditionedOptimizer._optimizer_wide, ("eps", "eps"), ("max_dim", "max_dim"))
    _first_steps_bound = "eps (the ridge added to H)"

    # checked on assignment as the constructor checks them (opt.eps = -1.0 raises its ValueError, nothing changed)
    eps = OptimizerSetting(_checked_eps)
    max_dim = OptimizerSetting(_checked_max_dim)

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        max_dim: int = 20000,
        check_finite: bool = True,
        lr_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ):
        flags = dict(foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused)
        check_torch_optim_flags(type(self).__name__, flags, fused_hint=None)
        check_adagrad_options(
            type(self).__name__,
            dict(lr_decay=lr_decay, initial_accumulator_value=initial_accumulator_value),
            " Nothing was made.",
            keywords=True,
            bounded_by=self._first_steps_bound,
        )
        lr = check_hyperparameter("learning rate", lr)
        eps = check_hyperparameter("eps", eps, positive=True)
        weight_decay = check_hyperparameter("weight_decay", weight_decay)
        max_dim = check_hyperparameter("max_dim", max_dim, positive=True, integer=True)
        maximize = check_bool("maximize", maximize)
        self.eps = eps
        self.max_dim = max_dim
        defaults = dict(lr=lr, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, check_finite=check_finite)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; refused when the total size would exceed ``max_dim``. ``H`` grows by zero padding."""
        super().add_param_group(param_group)
        try:
            self._check_max_dim()
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_max_dim(self, edited: str = "", max_dim: int | None = None) -> None:
        """Raise ``ValueError`` when the parameters of all groups exceed ``max_dim`` (default: the optimizer's;
        ``edited``: how they got there, for the message)."""
        max_dim = self.max_dim if max_dim is None else max_dim
        d = sum(p.numel() for group in self.param_groups for p in group["params"])
        if d > max_dim:
            # the state's dtype includes the refused group's parameters (H would be in the widest dtype)
            dtype = max(
                (p.dtype for group in self.param_groups for p in group["params"]),
                key=lambda t: torch.finfo(t).bits,
                default=torch.float32,
            )
            nbytes = d * d * max(torch.finfo(dtype).bits, 32) // 8
            raise ValueError(
                f"FullMatrixAdagrad keeps a dense d x d matrix: d = {d} parameters{edited} need {nbytes} bytes "
                f"({nbytes / 2**30:.2f} GiB) of state plus as much again for its eigendecomposition, above "
                f"max_dim = {max_dim}. Use BlockMeanAdagrad, or raise max_dim if the memory is there."
            )

    def _check_layout(self, layout: FlatParams) -> None:
        """The base class's checks, and ``max_dim`` for parameters appended to ``param_groups`` in place (which
        bypasses :meth:`add_param_group`'s check): refused before ``H`` is allocated."""
        super()._check_layout(layout)
        self._check_max_dim(" (param_groups were edited in place; nothing was changed)")

    def _save_own_state(self, sd: dict[str, Any]) -> None:
        """The base class's entries, plus ``"param_numels"`` (plain numbers) once there is a global state: ``H``
        spans the parameters' entries in their order, and without per-parameter state nothing else would show at load
        that the parameters are not those it was saved with (say the same total in another order)."""
        super()._save_own_state(sd)
        if self.global_state:
            sd["param_numels"] = [p.numel() for group in self.param_groups for p in group["params"]]

    def _load_own_state(self, state_dict: dict[str, Any]) -> None:
        numels = state_dict.pop("param_numels", None)  # absent from state dicts saved before it was added
        params = [p for group in self.param_groups for p in group["params"]]
        # other numbers of parameters or entries: torch's load_state_dict or the check of H's size names the mismatch
        if numels is not None and not (
            isinstance(numels, (list, tuple)) and all(isinstance(m, int) and m >= 0 for m in numels)
        ):
            raise ValueError(
                f"state_dict's 'param_numels' must be a list of entry counts, one per parameter, got {numels!r:.80}: "
                "it was not produced by FullMatrixAdagrad.state_dict(). Nothing was loaded."
            )
        saved_global = state_dict.get("global_state")
        H = saved_global.get("H") if isinstance(saved_global, dict) else None
        # H spans the leading parameters' entries (all of them, or those of the groups before an add_param_group)
        spans = {0, *itertools.accumulate(numels)} if numels is not None else set()
        if numels is not None and torch.is_tensor(H) and H.dim() == 2 and H.shape[-1] not in spans:
            raise ValueError(
                f"state_dict's 'param_numels' ({sum(numels)} entries in all) do not fit its H, {H.shape[0]} x "
                f"{H.shape[1]}: the two were not saved together (a corrupted or hand-edited state dict). Load one "
                "produced by FullMatrixAdagrad.state_dict(). Nothing was loaded."
            )
        if numels is not None and len(numels) == len(params) and sum(numels) == sum(p.numel() for p in params):
            for position, (saved, p) in enumerate(zip(numels, params)):
                if saved != p.numel():
                    raise ValueError(
                        f"state_dict does not fit these parameters: it was saved with parameter {position} of "
                        f"{saved} entries, this optimizer's has {p.numel()} (shape {tuple(p.shape)}); its H spans "
                        "the entries in the saved order. Load a state dict saved from the same model, with the "
                        "parameters in the same order. Nothing was loaded."
                    )
        super()._load_own_state(state_dict)

    def _init_global_state(self, layout: FlatParams) -> dict[str, Any]:
        return {"step": 0, "H": torch.zeros(layout.numel, layout.numel, dtype=layout.dtype, device=layout.device)}

    def _check_global_sizes(self, global_state: dict[str, Any], layout: FlatParams, group_ends: list[int]) -> None:
        H = global_state.get("H")
        if not isinstance(H, Tensor):
            raise ValueError(
                "state_dict's 'global_state' has no tensor 'H': it was not produced by FullMatrixAdagrad.state_dict()."
            )
        fits = [layout.offsets[e] for e in group_ends]
        if H.dim() == 2 and H.shape[0] == H.shape[1] and H.shape[0] in fits:
            finite = torch.nan_to_num(H.detach())  # (a non-finite H: the finiteness check names it)
            # a sum of outer products g g^T, symmetric up to the rounding of its updates
            if (finite - finite.mT).abs().amax() > 64 * torch.finfo(H.dtype).eps * finite.abs().amax():
                raise ValueError(
                    "state_dict's H is not symmetric, so it is no sum of gradient outer products g g^T (a corrupted or "
                    "hand-edited state dict): load one produced by FullMatrixAdagrad.state_dict(). Nothing was loaded."
                )
            return
        earlier = sorted(set(fits[:-1]) - {fits[-1]})
        also = f" (or {earlier} when saved before add_param_group added the later groups)" if earlier else ""
        raise ValueError(
            f"state_dict does not fit this optimizer: its H has shape {tuple(H.shape)}, but these parameters have "
            f"d = {fits[-1]} entries{also}, so H must be {fits[-1]} x {fits[-1]}. It was probably saved from other "
            "parameters (another model, or other parameter shapes); load a state dict saved by an optimizer with "
            "the same parameters. Nothing was loaded."
        )

    def _fit_global_state(self, state: dict[str, Any], layout: FlatParams) -> dict[str, Any]:
        H = state["H"].to(device=layout.device, dtype=layout.dtype)
        d_old, d = H.shape[-1], layout.numel
        if d_old > d:
            raise ValueError(f"the saved H is {d_old} x {d_old} but the optimizer has {d} parameters.")
        if d_old < d:
            grown = torch.zeros(d, d, dtype=H.dtype, device=H.device)
            grown[:d_old, :d_old] = H
            H = grown
        return {**state, "H": H}

    def _step(self, grads: list[Tensor | None], layout: FlatParams, active: list[bool]) -> None:
        layout = self._refit_dtype(layout)  # model.double() between steps: H follows the parameters' dtype
        if not self.check_finite:
            self._commit_layout(layout)
            g = layout.gather_grads(grads, self._maximize_of_group())
            st = self.global_state
            direction = self._update_in_place(st["H"], g)
            st["step"] += 1  # after the eigendecomposition: a step that raises there does not count
            self._apply(layout, direction, active)
            return
        self._check_finite(grads, layout)
        # committing the layout replaces references only (FullMatrixAdagrad has no flat per-parameter state, and
        # _fit_global_state returns a new dict) and marks the parameters in self.state: a step refused below puts them
        # back and so changes nothing
        undo = (self._layout, self.global_state, dict(self._flat), dict(self._flat_views))
        unmarked = [p for p in layout.params if p not in self.state]  # a cleared state stays cleared when refused
        self._commit_layout(layout)
        g = layout.gather_grads(grads, self._maximize_of_group())
        st = self.global_state
        try:
            direction = self._checked_update(st["H"], g)
        except ValueError:
            self._layout, self.global_state, self._flat, self._flat_views = undo
            for p in unmarked:
                self.state.pop(p, None)
            raise
        st["step"] += 1
        self._apply(layout, direction, active)

    def _checked_update(self, H: Tensor, g: Tensor) -> Tensor:
        """``H += g g^T`` and the step's direction, or ``ValueError`` (``H`` unchanged) where ``H`` is not finite or
        the update would overflow it to inf (a large but finite gradient: the eigendecomposition would then fail).

        Both the entries and the eigenvalues of ``H + g g^T`` must stay finite: entries of 2.25e38 fit float32, but
        four of them in ``g g^T`` make the eigenvalue ``|g|^2 = 9e38``, which does not, and the eigendecomposition
        then returns inf and garbage without an error. One host synchronisation reads ``max |g|``, ``|g|`` and the
        range of ``H`` (one read of ``H``, nothing of its size allocated); where the bound of the spectrum
        ``|lambda(H + g g^T)| <= d max |H| + |g|^2`` (``d`` entries; it also bounds every entry) is safely below the
        dtype's largest value, ``H`` is updated in place as without the check. Only near that limit is
        ``H + g g^T`` computed into a new matrix, checked, and its eigendecomposition and direction found and
        checked (finite eigenvalues and direction) before ``H`` takes it, so that nothing changes when the step is
        refused."""
        if not g.numel():
            return full_matrix_direction(H, g, self.eps)
        low, high = torch.aminmax(H)
        # |g| in g's dtype: where it overflows (inf) the bound fails and the exact check below decides
        g_max, g_norm, low, high = torch.stack([g.abs().amax(), torch.linalg.vector_norm(g), low, high]).tolist()
        h_max = max(abs(low), abs(high))
        limit = torch.finfo(H.dtype).max
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(self._non_finite_H_message(H.dtype))
        # products, not powers: a Python float ** 2 past 1.8e308 raises OverflowError, a product is inf
        if g.numel() * h_max + g_norm * g_norm <= limit * (1 - 2.0**-8):
            # every eigenvalue (and entry) of H + g g^T stays finite, with margin
            return self._update_in_place(H, g)
        if not math.isfinite(g_norm) and g_max > 0:  # for the message: |g| without overflow, off the fast path
            g_norm = g_max * float(torch.linalg.vector_norm(g / g_max))
        updated = torch.addr(H, g, g)
        if not bool(torch.isfinite(updated).all()):
            raise ValueError(self._overflow_message(g_max, h_max, H.dtype, g_norm))
        try:
            direction, mu = _direction_and_eigenvalues(updated, g, self.eps)
        except torch.linalg.LinAlgError:  # the eigendecomposition of a matrix at the edge of the range failed
            raise ValueError(self._overflow_message(g_max, h_max, H.dtype, g_norm)) from None
        if not bool(torch.isfinite(mu).all() & torch.isfinite(direction).all()):
            # finite entries, but an eigenvalue past the range: eigh returned inf or garbage
            raise ValueError(self._overflow_message(g_max, h_max, H.dtype, g_norm))
        H.copy_(updated)
        return direction

    def _update_in_place(self, H: Tensor, g: Tensor) -> Tensor:
        """``H += g g^T`` in place and the step's direction. Where the eigendecomposition fails even in float64
        (:func:`_eigh`), ``g g^T`` is subtracted again (``H`` as it was, up to the rounding of that addition and
        subtraction) and ``ValueError`` says so: the step neither counts the gradient nor half-applies it (a user
        trial's retry after such an error counted it twice). A non-finite ``H`` (only with ``check_finite=False``,
        where nothing refused the overflowing gradient) cannot be restored so: torch's error is raised as it is."""
        H.addr_(g, g)
        try:
            return full_matrix_direction(H, g, self.eps)
        except torch.linalg.LinAlgError as error:
            if not bool(torch.isfinite(H).all()):  # check_finite=False with a gradient that overflowed H: as it is
                raise
            H.addr_(g, g, alpha=-1)
            raise ValueError(
                f"FullMatrixAdagrad: the eigendecomposition of H + g g^T ({H.shape[-1]} x {H.shape[-1]}, {H.dtype}) "
                f"failed to converge, in float64 too ({error}); the step was not taken and H was restored (up to the "
                "rounding of adding and subtracting g g^T). Skip this batch, or check the gradients' scale."
            ) from None

    @staticmethod
    def _overflow_message(g_max: float, h_max: float, dtype: torch.dtype, g_norm: float | None = None) -> str:
        """The error of a step whose update ``H += g g^T`` would overflow ``dtype`` (in ``H``'s entries or in its
        eigenvalues, which the eigendecomposition computes): the cause and the fixes."""
        limit = torch.finfo(dtype).max
        wider = (
            ", or use float64 parameters (model.double(): H is then float64, largest value 1.8e308)"
            if torch.finfo(dtype).bits < 64
            else ""
        )
        norm = (
            f", and |g|^2 = {g_norm * g_norm:.3g}, the eigenvalue it adds"
            if g_norm is not None and math.isfinite(g_norm)
            else ""
        )
        return (
            f"FullMatrixAdagrad.step() got a gradient too large for its statistics: adding g g^T (largest |g| = "
            f"{g_max:.3g}, so entries up to {g_max * g_max:.3g}{norm}) to H (largest |entry| {h_max:.3g}) would "
            f"overflow {dtype} (largest finite value {limit:.3g}) to inf, in H's entries or in its eigenvalues, and "
            "the step's eigendecomposition would fail. No state or parameter was changed. Scale the loss down, clip "
            f"the gradients (torch.nn.utils.clip_grad_norm_){wider}."
        )

    @staticmethod
    def _non_finite_H_message(dtype: torch.dtype) -> str:
        """The error of a step that finds ``H`` already holding inf or nan."""
        return (
            f"FullMatrixAdagrad's H ({dtype}) holds inf or nan before this step: it was accumulated or loaded with "
            "check_finite=False, edited, or overflowed when cast to a narrower dtype (model.float() after float64 "
            "steps). No state or parameter was changed. Build a new FullMatrixAdagrad to restart the statistics, "
            "or load a state dict whose H is finite (in float64 parameters where its entries exceed float32's range)."
        )
