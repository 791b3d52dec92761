r"""Gaussian likelihoods whose noise depends on a point's group: one learned noise variance per level.

The training covariance of an :class:`~gpytorch.models.ExactGP` with :class:`GroupGaussianLikelihood`
is :math:`K + \operatorname{diag}(\sigma^2_{g_a})`: a per-point diagonal, which keeps group kernels
(:class:`~bma_gp.GroupKernel`), their sums and an inducing-point root in the closed forms of
:class:`~bma_gp.BlockMeanSumLinearOperator` (``docs/math.md``, section 4).
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
from gpytorch.constraints import GreaterThan, Interval
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from gpytorch.likelihoods.gaussian_likelihood import _GaussianLikelihoodBase
from gpytorch.likelihoods.noise_models import Noise
from gpytorch.priors import Prior
from linear_operator.operators import DiagLinearOperator
from torch import Tensor

from bma_gp._warnings import caller_stacklevel
from bma_gp.kernels.group_kernel import as_int, as_real_values, check_group_ids, fit_parameter_shape
from bma_gp.partition import _as_array

__all__ = ["GroupGaussianLikelihood", "GroupNoise"]

_UNSEEN = ("mean", "error")
_NO_BATCH = torch.Size()


def _as_variances(value, like: Tensor, what: str) -> Tensor:
    """``value`` as real noise variances on ``like``'s device (:func:`~bma_gp.kernels.group_kernel.as_real_values`:
    floating point tensors and arrays keep their dtype, Python numbers take ``like``'s); ``TypeError`` naming
    ``noise`` for what holds no real numbers."""
    return as_real_values(value, like, "noise", what, "real noise variances")


class GroupNoise(Noise):
    r"""A noise model with one variance per group: point :math:`a` gets :math:`\sigma^2_{g_a}`.

    The noise model of :class:`GroupGaussianLikelihood` (see there for how the groups are found and
    for unseen levels). Returns a :class:`~linear_operator.operators.DiagLinearOperator` of shape
    ``(*batch, n, n)``.
    """

    def __init__(
        self,
        num_groups: int,
        group_dim: int | None = None,
        noise_prior: Prior | None = None,
        noise_constraint: Interval | None = None,
        batch_shape: torch.Size = _NO_BATCH,
        unseen: str = "mean",
        train_inputs: Tensor | None = None,
    ):
        num_groups = as_int(num_groups, "num_groups", "a positive int")
        if num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}.")
        # group_dim given (also -1) declares that column to hold the group ids; left out, the ids are read from the
        # last column of 2-D inputs, but 1-D training ids are compared with the model's inputs only once that column
        # was seen to hold them (:meth:`_check_train_groups`): a model whose inputs hold no group column is not refused
        self._group_dim_declared = group_dim is not None
        if group_dim is None:
            group_dim = -1
        try:
            if isinstance(group_dim, bool):
                raise TypeError
            group_dim = operator.index(group_dim)  # NumPy and one-element torch integers too, as num_groups
        except TypeError:
            raise TypeError(f"group_dim must be an int (the column of the group ids), got {group_dim!r}.") from None
        if unseen not in _UNSEEN:
            raise ValueError(f"unseen must be one of {_UNSEEN}, got {unseen!r}.")
        if noise_prior is not None and not isinstance(noise_prior, Prior):
            raise TypeError(f"noise_prior must be a gpytorch.priors.Prior, got {type(noise_prior).__name__}.")
        if noise_constraint is not None and not isinstance(noise_constraint, Interval):
            raise TypeError(
                "noise_constraint must be a gpytorch.constraints.Interval, e.g. GreaterThan(1e-6) for a lower bound, "
                f"got {type(noise_constraint).__name__} {noise_constraint!r:.60}."
            )
        try:
            sizes = torch.Size(batch_shape)
        except TypeError:  # an int: torch's "Value after * must be an iterable" came from torch.zeros
            raise TypeError(
                f"batch_shape must be a torch.Size (or a tuple of sizes), got {batch_shape!r}; for a batch of b "
                "likelihoods pass torch.Size([b])."
            ) from None
        if any(size < 0 for size in sizes):
            raise ValueError(f"batch_shape must hold sizes of 0 or more, got {tuple(sizes)}.")
        batch_shape = sizes
        super().__init__()
        self.num_groups = num_groups
        self.group_dim = group_dim
        self.unseen = unseen
        self.register_parameter("raw_noise", torch.nn.Parameter(torch.zeros(*batch_shape, num_groups)))
        self.register_constraint("raw_noise", GreaterThan(1e-4) if noise_constraint is None else noise_constraint)
        if noise_prior is not None:
            # methods, not lambdas, so that the module pickles (torch.save(model)), as GPyTorch's noise models do
            self.register_prior("noise_prior", noise_prior, self._noise_param, self._noise_closure)
        # which levels each batch entry has been trained on (saved with the state dict)
        self.register_buffer("observed", torch.zeros(*batch_shape, num_groups, dtype=torch.bool))
        self.register_buffer("train_groups", None, persistent=False)
        # the number of input columns train_groups was read from (None for 1-D ids): the model's training inputs
        # of that many columns are checked against it (:meth:`_check_train_groups`)
        self._train_columns: int | None = None
        # whether the model's inputs' column group_dim held the stored 1-D ids at a call (reset with the ids)
        self._ids_column_seen = False
        if train_inputs is not None:
            self.set_train_inputs(train_inputs)

    # ------------------------------------------------------------------ parameters
    @property
    def noise(self) -> Tensor:
        """The noise variance of every level. # shape: (*batch, num_groups)"""
        return self.raw_noise_constraint.transform(self.raw_noise)

    @noise.setter
    def noise(self, value) -> None:
        self._set_noise(value)

    def _set_noise(self, value) -> None:
        value = _as_variances(value, self.raw_noise, "a number or a tensor of noise variances (one per group)")
        value = value.to(self.raw_noise.dtype)
        # where the module is not strict (GPyTorch's pyro_load_from_samples), samples (*sample_shape, *noise.shape)
        # give the noise that batch, and the flags of the observed levels follow it (each sample observed the levels
        # its entry did), so that the loaded model predicts
        fitted = fit_parameter_shape(self, value, self.raw_noise)
        if fitted is None:
            raise ValueError(
                f"noise of shape {tuple(value.shape)} does not fit the likelihood's noise of shape "
                f"{tuple(self.raw_noise.shape)} (one value per group); pass a scalar or a tensor of that shape."
            )
        value = fitted
        constraint = self.raw_noise_constraint
        inside = (value >= constraint.lower_bound) & (value <= constraint.upper_bound)  # False for NaN
        if constraint.enforced and not bool(inside.all()):
            raise ValueError(
                f"noise holds {value[~inside].reshape(-1)[0].item()!r}, outside the noise constraint {constraint}; "
                "pass noise variances inside it, or build the likelihood with another constraint "
                "(noise_constraint=gpytorch.constraints.GreaterThan(lower_bound))."
            )
        raw = constraint.inverse_transform(value)
        observed = self._buffers["observed"]
        if raw.shape != self.raw_noise.shape:
            observed = observed.expand(*raw.shape[:-1], self.num_groups).clone()
        self.initialize(raw_noise=raw)
        self.observed = observed

    def local_load_samples(self, samples_dict, memo, prefix: str) -> None:
        """GPyTorch's (the noise takes the batch of samples, :meth:`_set_noise`); where the setting closure raises,
        the module is strict again (GPyTorch's leaves it not strict) and the error is raised."""
        try:
            super().local_load_samples(samples_dict, memo, prefix)
        except BaseException:
            self._strict(True)
            raise

    def _noise_param(self, m: GroupNoise) -> Tensor:
        return m.noise

    def _noise_closure(self, m: GroupNoise, v: Tensor) -> None:
        m._set_noise(v)

    # ------------------------------------------------------------------ groups
    def groups_of(self, inputs, name: str = "inputs") -> Tensor:
        """The group ids of ``inputs``: a tensor ``(*batch, n, d)`` (ids in column ``group_dim``), a 1-D tensor
        of ids, or a list or tuple whose first entry is one of these (GPyTorch's ``train_inputs``).
        # shape: (*batch, n)"""
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise ValueError(f"{name} is empty; pass the inputs whose group ids the noise depends on.")
            inputs = inputs[0]
        if not torch.is_tensor(inputs):
            raise TypeError(f"{name} must be a tensor of inputs, got {type(inputs).__name__}.")
        if inputs.dim() == 0:
            raise ValueError(
                f"{name} is a 0-d tensor; pass inputs of shape (*batch, n, d) with the group ids in column "
                f"group_dim={self.group_dim}, or the ids themselves as shape (n,)."
            )
        if inputs.dim() == 1:
            values = inputs
        else:
            d = inputs.shape[-1]
            if not -d <= self.group_dim < d:
                raise ValueError(
                    f"group_dim={self.group_dim} is not a column of {name}, which has {d} column(s) "
                    f"(shape {tuple(inputs.shape)})."
                )
            values = inputs[..., self.group_dim]
            declared = self.__dict__.get("_group_dim_declared", True)  # (an older pickle: no warning)
            if d > 1 and not declared and not self.__dict__.get("_warned_last_column", False):
                # the kernel's ids come from its own active_dims, which do not reach the likelihood: ids first and a
                # small integer covariate last (sleepstudy's Days) gave one noise per covariate value, silently
                self.__dict__["_warned_last_column"] = True
                warnings.warn(
                    f"GroupGaussianLikelihood (GroupNoise) reads the group ids from the last column of {name} "
                    f"({d} columns) because group_dim was not given; a GroupKernel's active_dims do not reach the "
                    "likelihood. Pass "
                    "group_dim=j (the column of the ids, e.g. the first entry of the GroupKernel's active_dims) to "
                    "say which column holds them; this warning is then not given.",
                    UserWarning,
                    stacklevel=caller_stacklevel(),
                )
        return check_group_ids(values, self.num_groups, f"{name}[..., {self.group_dim}]")

    def set_train_inputs(self, train_inputs) -> None:
        """Remember the training points' groups, used when the likelihood is called without inputs in
        training mode (``mll(model(train_x), train_y)``). Call it again after ``model.set_train_data``: an
        :class:`~gpytorch.models.ExactGP` output computed at other inputs (of as many columns) than these raises
        ``ValueError`` instead of taking the old groups."""
        seen = self._store_train_groups(train_inputs)
        with torch.no_grad():
            self.observed |= seen

    def _store_train_groups(self, train_inputs) -> Tensor:
        """Remember the training points' groups (:meth:`set_train_inputs`) without recording their levels as
        observed, as a fantasy model's likelihood takes its fantasy points (conditioning learns no noise); returns
        the levels they hold. # shape: (*batch_shape, num_groups), bool"""
        ids = self.groups_of(train_inputs, "train_inputs")
        seen = self._levels_seen(ids, "train_inputs")  # checked before anything changes
        source = train_inputs[0] if isinstance(train_inputs, (list, tuple)) else train_inputs
        self.train_groups = ids.to(self.raw_noise.device)
        self._train_columns = source.shape[-1] if source.dim() > 1 else None
        self._ids_column_seen = False
        self.__dict__.pop("_ids_inputs", None)  # the model inputs the 1-D ids were first used with
        return seen

    def _stored_groups_of(self, inputs) -> Tensor | None:
        """The stored training groups where ``inputs`` are a model's training inputs as prediction strategies pass
        them (GPyTorch's and bma-gp's call ``likelihood(train_prior, train_inputs)`` with the list of input tensors)
        and the training groups were given as 1-D ids that no input column is known to hold (``group_dim`` not
        given, and no column seen to hold them): the inputs need not hold the groups then. Reading their last column
        instead gave the training points the noise of another column's values, silently where those were whole
        numbers in range (a covariate such as a day count: the posterior mean 0.7467 against 0.7361), or a
        ``ValueError`` about values never passed as ids. None where the column is to be read."""
        if not isinstance(inputs, (list, tuple)) or not inputs or self.train_groups is None:
            return None
        if self._train_columns is not None:  # the stored ids were read from the inputs' own column
            return None
        # getattr: a likelihood pickled by an older version has neither attribute (it read the column)
        if getattr(self, "_group_dim_declared", True) or getattr(self, "_ids_column_seen", False):
            return None
        first = inputs[0]
        if not torch.is_tensor(first) or first.dim() == 0:
            return None
        points = first.shape[-2] if first.dim() > 1 else first.shape[-1]
        self._check_ids_inputs(first, points)
        return self.train_groups

    def _refuse_a_column_known_not_to_hold_ids(self, inputs, model_inputs=None) -> Tensor | None:
        """``ValueError`` where the groups of ``inputs`` passed with a call (``likelihood(model(x), x)``) would be read
        from a column known not to hold group ids: the training groups were given as 1-D ids (no ``group_dim``, no
        column seen to hold them), and the model's training inputs, which the prediction strategy handed over
        (:meth:`_check_ids_inputs`) or a training-mode output was computed at (``model_inputs``), hold other values in
        that column. The same column of ``x`` is then a feature too: its values were taken for ids, silently where
        they were whole numbers in range (sleepstudy's days gave the test points the noise of subjects 2 and 7). Those
        training inputs themselves get the stored ids. A 1-D ``x`` of floating point values is GPyTorch's layout of
        one feature (the model's inputs ``(n, 1)``), not ids; inputs with another number of columns than the training
        inputs are not in the model's layout, and their column is read. None where the column is to be read: without
        that evidence, as before."""
        if not torch.is_tensor(inputs) or inputs.dim() == 0 or self.train_groups is None:
            return None
        if self._train_columns is not None:  # the stored ids were read from the inputs' own column
            return None
        if getattr(self, "_group_dim_declared", True) or getattr(self, "_ids_column_seen", False):
            return None
        ids = self.train_groups
        seen: Tensor | None = self.__dict__.get("_ids_inputs")
        first = model_inputs[0] if model_inputs else None
        if seen is None and torch.is_tensor(first) and first.dim() > 0:
            # a training-mode output's inputs are the model's training inputs (GPyTorch trains on nothing else),
            # remembered as a prediction strategy's are, in its layout ((n,) as (n, 1))
            first = first.unsqueeze(-1) if first.dim() == 1 else first
            if first.shape[-2] == ids.shape[-1]:
                self._check_ids_inputs(first, first.shape[-2])
                seen = self.__dict__.get("_ids_inputs")
        if seen is None or seen.dim() < 2:
            return None
        layout = inputs
        if inputs.dim() == 1:  # ids, unless floating point values where the model's inputs are one feature column
            if not (inputs.is_floating_point() and seen.shape[-1] == 1):
                return None
            layout = inputs.unsqueeze(-1)
        elif inputs.shape[-1] != seen.shape[-1]:  # not the model's inputs: the column is read (as before)
            return None
        if self._column_holds(seen, ids):
            self._ids_column_seen = True  # the column holds the ids after all: read it
            return None
        try:  # the training inputs themselves (likelihood(model(train_x), train_x)): their groups are the stored ids;
            # compared in the inputs' dtype (after model.float() the inputs are the remembered ones rounded)
            if layout is seen or (layout.shape == seen.shape and torch.equal(seen.to(layout), layout)):
                return ids
        except RuntimeError:
            pass
        raise ValueError(
            f"the likelihood's training groups were given as 1-D ids (train_inputs=ids), and column "
            f"group_dim={self.group_dim} of the model's training inputs does not hold them, so that column of these "
            f"inputs (shape {tuple(inputs.shape)}) is not group ids either: pass the points' group ids as groups= "
            "(likelihood(model(x), groups=ids)), or give the inputs a column of ids and pass "
            "GroupGaussianLikelihood(..., group_dim=j)."
        )

    def _column_holds(self, inputs: Tensor, ids: Tensor) -> bool:
        """Whether column ``group_dim`` of ``inputs`` (``(..., n, d)``) holds the group ids ``ids`` (``(..., n)``),
        point for point: as many points, and equal values wherever the batch shapes broadcast. 1-D inputs, a
        column index out of range, another number of points (a column of one point equal to every id broadcast
        against them) or batch shapes that do not broadcast do not hold them."""
        if inputs.dim() < 2 or not -inputs.shape[-1] <= self.group_dim < inputs.shape[-1]:
            return False
        column = inputs[..., self.group_dim]
        if column.shape[-1] != ids.shape[-1]:
            return False
        try:
            return bool((column.to(ids.device) == ids).all())
        except RuntimeError:  # batch shapes that do not broadcast: not the ids
            return False

    def _check_ids_inputs(self, inputs: Tensor, points: int) -> None:
        """``ValueError`` where ``inputs`` (a model's training inputs, which need not hold the groups) are not the
        training inputs the stored 1-D ids were used with (their first use is remembered): after
        ``model.set_train_data(x, y)`` without ``likelihood.set_train_inputs(ids)``, the training points took the old
        points' groups (the posterior mean 0.41 off at the same number of points) or, at another number, the values of
        the inputs' last column (0.012 off), silently."""
        ids = self.train_groups
        assert ids is not None  # (the caller's check)
        stale = points != ids.shape[-1]
        seen: Tensor | None = self.__dict__.get("_ids_inputs")
        if not stale and seen is None:
            self.__dict__["_ids_inputs"] = inputs
            return
        if not stale and seen is not None and seen is not inputs:
            try:
                # in the inputs' dtype: after model.float() they are the remembered double inputs rounded
                stale = seen.shape != inputs.shape or not torch.equal(seen.to(inputs), inputs)
            except RuntimeError:
                stale = True
            if not stale:  # the same points in the model's current dtype and device (model.float(), then .double())
                self.__dict__["_ids_inputs"] = inputs
        if stale:
            raise ValueError(
                f"the model's training inputs ({points} points) are not those the likelihood's training groups, given "
                f"as 1-D ids ({ids.shape[-1]} points, train_inputs=ids), were used with, and hold no column known to "
                "hold the groups: after model.set_train_data(x, y) also call likelihood.set_train_inputs(ids) with "
                "the new points' group ids (one likelihood per model), or give the inputs a column of the ids and "
                "pass GroupGaussianLikelihood(..., group_dim=j). Inputs passed with a call as a list or tuple are "
                "taken for the model's training inputs (prediction strategies pass them so): pass other points' group "
                "ids as groups= (likelihood(model(x), groups=ids))."
            )

    def _check_fantasy_inputs(self, train_inputs) -> None:
        """``ValueError`` before ``model.get_fantasy_model`` of a model whose training groups were given as 1-D ids
        that its inputs (``train_inputs``, the parent's) do not hold (:meth:`_stored_groups_of`): GPyTorch hands the
        likelihood only the fantasy points' inputs, so their groups were read from another column, and the fantasy
        model's training groups re-read from it too (its posterior mean 0.7611 / 0.6579 against 0.7614 / 0.6240 on
        all the points, silently). Where the inputs' column ``group_dim`` holds the stored ids it is marked as the
        ids' column, and the fantasy reads it."""
        ids = self._stored_groups_of(train_inputs)
        if ids is None:
            return
        if self._column_holds(train_inputs[0], ids):
            self._ids_column_seen = True
            return
        raise ValueError(
            "get_fantasy_model: the likelihood's training groups were given as 1-D ids (train_inputs=ids), which the "
            "model's inputs do not hold, and GPyTorch hands the likelihood only the fantasy points' inputs, so their "
            "groups cannot be found. Give the model an input column of group ids and pass its index as "
            "GroupGaussianLikelihood(..., group_dim=j), or condition on all the points instead: "
            "model.set_train_data(x_all, y_all, strict=False) and likelihood.set_train_inputs(ids_all)."
        )

    def _check_train_groups(self, ids: Tensor, model_inputs) -> None:
        """``ValueError`` if ``model_inputs`` (the inputs an :class:`~gpytorch.models.ExactGP` output was computed
        at in training mode) hold other group ids than the stored training groups ``ids``: the model was given new
        training data (``model.set_train_data``) and the likelihood was not. Inputs whose column ``group_dim`` holds
        no valid ids, or of another number of columns than the stored training inputs, are not compared: they are
        not the inputs the groups were read from. 1-D ids given to :meth:`set_train_inputs` are compared with the
        column ``group_dim`` of any inputs that have it (where the likelihood reads the groups of inputs passed with
        a call) only where that column is known to hold the group ids: ``group_dim`` was given to the constructor,
        or the column held these ids at an earlier call. Otherwise the inputs may hold no group column at all (the
        ids given only as 1-D ids), and a last column of whole numbers (a count feature) is not group ids. Without
        the comparison, new training data with other groups trained silently with the old ones."""
        if not model_inputs or not torch.is_tensor(model_inputs[0]):
            return
        inputs = model_inputs[0]
        one_d = self._train_columns is None
        if one_d:  # 1-D ids: the inputs' group column, where they have one
            if inputs.dim() < 2 or not -inputs.shape[-1] <= self.group_dim < inputs.shape[-1]:
                return
        elif inputs.dim() < 2 or inputs.shape[-1] != self._train_columns:
            return
        if self._column_holds(inputs, ids):  # one pass: values equal to the stored (valid) ids are those ids
            if one_d:
                self._ids_column_seen = True  # the column holds the group ids: later inputs are compared
            return
        # getattr: a likelihood pickled by an older version has neither attribute (it compared every such column)
        if one_d and not (getattr(self, "_group_dim_declared", True) or getattr(self, "_ids_column_seen", False)):
            return  # no column was declared or seen to hold the ids: the inputs need not hold the groups
        try:  # validated only when they differ
            current = self.groups_of(inputs)
        except (TypeError, ValueError):  # not group ids in that column: some other layout, nothing to compare
            return
        raise ValueError(
            f"the inputs of the model's output ({current.shape[-1]} points) hold other group ids than the "
            f"training inputs given to the likelihood ({ids.shape[-1]} points): after model.set_train_data(x, y) "
            "also call likelihood.set_train_inputs(x), or pass the inputs with the call, mll(model(x), y, x) or "
            "likelihood(model(x), x)."
        )

    def _levels_seen(self, ids: Tensor, name: str) -> Tensor:
        """Which levels ``ids`` holds for each batch entry of the noise: ids of shape ``(n,)`` count for every
        entry, ids of shape ``(*batch, n)`` for their own (batch dimensions beyond the noise's, or where the noise
        has size 1, are combined). # shape: (*batch_shape, num_groups), bool"""
        batch = self.observed.shape[:-1]
        hit = torch.zeros(*ids.shape[:-1], self.num_groups, dtype=torch.bool, device=ids.device)
        hit.scatter_(-1, ids, True)
        try:
            full = torch.broadcast_shapes(hit.shape[:-1], batch)
        except RuntimeError:  # torch's message names neither the ids nor the fix
            raise ValueError(
                f"{name} has batch shape {tuple(ids.shape[:-1])}, which does not broadcast with the likelihood's "
                f"batch shape {tuple(batch)}; pass inputs of shape (n, d) (the same for every batch entry) or "
                "(*batch_shape, n, d)."
            ) from None
        hit = hit.expand(*full, self.num_groups)
        lead = len(full) - len(batch)
        if lead:
            hit = hit.reshape(-1, *hit.shape[lead:]).any(0)
        for dim, size in enumerate(batch):
            if size == 1 and hit.shape[dim] != 1:
                hit = hit.any(dim, keepdim=True)
        return hit.to(self.observed.device)

    def _mark_observed(self, ids: Tensor) -> None:
        seen = self._levels_seen(ids, "the group ids")
        with torch.no_grad():
            self.observed |= seen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state dict of a version with one flag vector for all batch entries: the flags held for each entry (one of
        # another number of groups is left to torch, whose error names the size mismatch)
        key = prefix + "observed"
        flags = state_dict.get(key)
        if torch.is_tensor(flags) and flags.dim() == 1 and self.observed.dim() > 1 and len(flags) == self.num_groups:
            state_dict[key] = flags.expand_as(self.observed).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _groups(self, params: tuple, groups, shape: torch.Size | None, model_inputs=None) -> Tensor:
        if groups is not None:
            if torch.is_tensor(groups) and groups.device.type == "meta":
                check_group_ids(groups, self.num_groups, "groups")  # says why (copying it below would fail first)
            try:
                groups = torch.as_tensor(_as_array(groups), device=self.raw_noise.device)  # a pandas column too
            except (TypeError, ValueError, RuntimeError):  # names, ragged lists: torch's message names neither
                raise ValueError(
                    f"groups must hold integer group ids 0 .. {self.num_groups - 1} (a tensor, array or list), got "
                    f"{type(groups).__name__} {groups!r:.60}; encode names as ids first, with the same encoding as "
                    "the training inputs (bma_gp.partition_builders.group_partition(names).labels)."
                ) from None
            if groups.dim() == 0:
                raise ValueError(
                    "groups is a single number; pass one group id per point, shape (n,) or (*batch, n) (e.g. "
                    "torch.full((n,), g) for n points of one group)."
                )
            if groups.dim() == 2 and groups.shape[-1] == 1 and shape is not None and groups.shape[0] == shape[-1] != 1:
                groups = groups.squeeze(-1)  # an (n, 1) column of ids (df[["g"]]), as group_partition takes it
            ids = check_group_ids(groups, self.num_groups, "groups")
        elif params and params[0] is not None:
            stored = self._stored_groups_of(params[0])
            if stored is None:
                stored = self._refuse_a_column_known_not_to_hold_ids(params[0], model_inputs)
            ids = self.groups_of(params[0]) if stored is None else stored
        elif self.training and self.train_groups is not None:
            ids = self.train_groups
            self._check_train_groups(ids, model_inputs)
        else:
            where = (
                "pass the training inputs once (GroupGaussianLikelihood(..., train_inputs=train_x) or "
                "likelihood.set_train_inputs(train_x)), or "
                if self.training
                else ""
            )
            loss_terms = (
                " An exact GP's added loss terms (the trace term of an inducing-point kernel) get the inputs of "
                "mll(output, y, x) but not its groups=, so with such a kernel pass x or the training inputs."
                if self.training
                else ""
            )
            raise ValueError(
                "GroupGaussianLikelihood needs the group of every point: "
                f"{where}pass the inputs with the call: likelihood(model(x), x), mll(model(x), y, x), or their group "
                f"ids as groups= (a variational ELBO takes only that: elbo(output, y, groups=ids)).{loss_terms}"
            )
        if shape is not None and ids.shape[-1] != shape[-1]:
            raise ValueError(
                f"the group ids hold {ids.shape[-1]} points but the distribution has {shape[-1]}; pass the inputs of "
                "these points (likelihood(model(x), x)) or their group ids (groups=ids; for a minibatch of a "
                "variational ELBO, elbo(output, y_batch, groups=ids_batch)), or update the training inputs "
                "(set_train_inputs)."
            )
        return ids

    def _per_point(self, ids: Tensor, batch: torch.Size) -> Tensor:
        """:math:`\\sigma^2_{g_a}` for every point, with the policy for unseen levels. # shape: (*batch, n)"""
        noise = self.noise
        n = ids.shape[-1]
        ids = ids.expand(*batch, n)
        values = noise.expand(*batch, self.num_groups).gather(-1, ids)
        observed = self.observed  # (*nb, num_groups): each batch entry's own levels
        if self.training:
            return values
        untrained = ~observed.any(-1, keepdim=True)  # (*nb, 1): an entry that observed nothing uses every level
        if bool(untrained.all()):
            return values
        seen = observed.expand(*batch, self.num_groups).gather(-1, ids) | untrained.expand(*batch, 1)
        if bool(seen.all()):
            return values
        if self.unseen == "error":
            where = (~seen).nonzero()[0]
            entry = f" of batch entry {tuple(where[:-1].tolist())}" if observed.dim() > 1 else ""
            raise ValueError(
                f"group {int(ids[tuple(where)])} was not in the training data{entry}, so its noise was never "
                "learned; pass unseen='mean' to use the mean noise of the trained levels for it, or, with its noise "
                f"set by hand, mark it trained (likelihood.observed[..., {int(ids[tuple(where)])}] = True)."
            )
        weights = observed.to(noise.dtype)
        mean = (noise * weights).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp_min(1)  # (*nb, 1)
        return torch.where(seen, values, mean.expand(*batch, 1))

    def _explicit_noise(self, noise, shape: torch.Size | None) -> Tensor:
        """GPyTorch's ``noise=`` keyword: one variance per point (a number or one value per batch entry stands for
        all points), checked against the distribution's shape. # shape: (*batch, n)"""
        noise = _as_variances(noise, self.raw_noise, "a tensor of noise variances, one per point")
        if shape is None:
            return noise if noise.dim() else noise.reshape(1)
        n, batch = shape[-1], torch.broadcast_shapes(shape[:-1], self.raw_noise.shape[:-1])
        given = tuple(noise.shape)
        if noise.dim() == 0 or noise.shape[-1] == 1:
            noise = noise.expand(*noise.shape[:-1], n)
        try:
            fits = noise.shape[-1] == n and torch.broadcast_shapes(noise.shape[:-1], batch) == batch
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"noise of shape {given} does not fit the distribution's {n} points (batch shape "
                f"{tuple(batch)}); pass one noise variance per point, shape (n,) or (*batch, n) (the diagonal, not an "
                "n x n matrix), or leave noise out to use the noise of each point's group."
            )
        return noise

    def forward(
        self,
        *params: Any,
        shape: torch.Size | None = None,
        groups: Tensor | None = None,
        noise: Tensor | None = None,
        model_inputs: tuple | None = None,
        **kwargs: Any,
    ) -> DiagLinearOperator:
        if noise is not None:  # GPyTorch's convention: an explicit noise is used as it is
            return DiagLinearOperator(self._explicit_noise(noise, shape))
        ids = self._groups(params, groups, shape, model_inputs)
        shape_batch = shape[:-1] if shape is not None else torch.Size()
        try:
            batch = torch.broadcast_shapes(shape_batch, ids.shape[:-1], self.raw_noise.shape[:-1])
        except RuntimeError:  # torch's message names neither the ids nor the fix
            raise ValueError(
                f"the group ids have batch shape {tuple(ids.shape[:-1])}, which does not broadcast with the "
                f"distribution's {tuple(shape_batch)} and the noise's {tuple(self.raw_noise.shape[:-1])}; pass the "
                "ids of shape (n,) (the same for every batch entry) or (*batch, n), or inputs of that batch shape."
            ) from None
        if self.training:  # after the checks: refused ids are not recorded as trained
            self._mark_observed(ids)
        return DiagLinearOperator(self._per_point(ids, batch))


class GroupGaussianLikelihood(_GaussianLikelihoodBase):
    r"""Gaussian observation noise with one learned variance per group: :math:`y_a = f(x_a) + \epsilon_a`,
    :math:`\epsilon_a \sim N(0, \sigma^2_{g_a})`.

    The noisy training covariance is :math:`K + \operatorname{diag}(\sigma^2_{g})`, a per-point diagonal: with
    :class:`~bma_gp.GroupKernel` (and its sums, random slopes, SGPR) it stays in the closed forms of
    :class:`~bma_gp.BlockMeanSumLinearOperator`; no CG, Lanczos or :math:`n \times n` factorisation.

    **Where the groups come from.** A point's group is column ``group_dim`` of its inputs (the same
    column a :class:`~bma_gp.GroupKernel` reads through ``active_dims``). The likelihood finds the ids,
    in this order, from:

    1. the ``groups=`` keyword (a tensor of ids, ``(*batch, n)``; ``ExactMarginalLogLikelihood`` hands it to the
       likelihood but not to added loss terms, such as an inducing-point kernel's trace term: there use 2 or 3);
    2. the inputs passed after the distribution: ``likelihood(model(x), x)``, ``mll(model(x), y, x)``
       (GPyTorch's prediction strategies pass the training inputs this way themselves);
    3. in training mode only, the training inputs given once to the constructor (``train_inputs=``) or to
       :meth:`set_train_inputs`: this is what makes GPyTorch's usual ``mll(model(train_x), train_y)`` work,
       since :class:`~gpytorch.mlls.ExactMarginalLogLikelihood` passes the likelihood no inputs. After
       ``model.set_train_data(x, y)`` call ``likelihood.set_train_inputs(x)`` too: an
       :class:`~gpytorch.models.ExactGP`'s training-mode output remembers its inputs, and one whose group column
       holds other ids than the stored ones raises ``ValueError`` instead of taking the old groups. Training groups
       given as 1-D ids (the inputs need not hold them) are checked so only against a column known to hold the
       ids: ``group_dim`` passed explicitly, or a column that held these ids at an earlier call. Without such a
       column they are the training points' groups in prediction too (the strategies pass the training inputs),
       and the new points' groups go as ``groups=``; a fantasy model of such a model raises ``ValueError``, and so
       does a prediction after ``model.set_train_data`` with other inputs and no ``set_train_inputs(ids)``.

    Without any of them it raises ``ValueError``; in eval mode the inputs must be passed, so the
    training groups are never used silently for test points. GPyTorch's ``noise=`` keyword (one variance per
    point, shape ``(n,)`` or ``(*batch, n)``; a number for all points) replaces the group noises for that call.

    **Unseen levels.** Every level in ``[0, num_groups)`` has a parameter, but only the levels in the
    training data are learned (the others get no gradient from the data, only from a ``noise_prior``).
    The likelihood records them (buffer ``observed``, saved in the state dict, one flag per level for each batch
    entry, ``(*batch_shape, num_groups)``): the levels of ``train_inputs`` and of every call in training mode,
    ids of shape ``(n,)`` for every batch entry and ids of shape ``(*batch_shape, n)`` for their own. In eval mode
    a point of a level its batch entry never observed gets, with ``unseen="mean"`` (the default), the mean noise
    variance of that entry's observed levels, and with ``unseen="error"`` a ``ValueError``. Before an entry has
    observed any level, every level uses its own noise. Conditioning learns no noise, so it records nothing: the
    points of an unrecorded level in new training data used in eval mode (``model.set_train_data``) or in a
    fantasy model (``model.get_fantasy_model``) take the same policy, and a fantasy model predicts as the model
    given all its points (its likelihood's stored training inputs are the fantasy model's, so it also trains on
    them after ``fantasy.train()``, which records their levels). A level whose noise is known can be marked by hand:
    ``likelihood.observed[..., j] = True``.

    Args:
        num_groups: number of possible ids; ids must be integers in ``[0, num_groups)``.
        group_dim: the input column that holds the group id (default: -1, the last one). Given (also as -1), it
            declares that column to hold the ids, against which 1-D ``train_inputs`` ids are checked (see above).
        train_inputs: the training inputs (optional, see above).
        noise_prior: optional prior on the noise variances.
        noise_constraint: constraint on the noise variances (default ``GreaterThan(1e-4)``, as GPyTorch's).
        batch_shape: batch shape of the noise parameter (default ``torch.Size()``).
        unseen: ``"mean"`` or ``"error"``, the policy for levels absent from training (see above).

    Example:
        >>> import gpytorch
        >>> likelihood = GroupGaussianLikelihood(18, group_dim=1)
        >>> likelihood.noise.shape
        torch.Size([18])
        >>> x = torch.tensor([[0.5, 3.0], [1.5, 0.0]])
        >>> f = gpytorch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> likelihood.noise = torch.linspace(0.1, 1.8, 18)
        >>> likelihood(f, x).variance.detach()
        tensor([1.4000, 1.1000])
    """

    def __init__(
        self,
        num_groups: int,
        group_dim: int | None = None,
        train_inputs: Tensor | None = None,
        noise_prior: Prior | None = None,
        noise_constraint: Interval | None = None,
        batch_shape: torch.Size = _NO_BATCH,
        unseen: str = "mean",
    ):
        noise_covar = GroupNoise(
            num_groups,
            group_dim=group_dim,
            noise_prior=noise_prior,
            noise_constraint=noise_constraint,
            batch_shape=batch_shape,
            unseen=unseen,
            train_inputs=train_inputs,
        )
        super().__init__(noise_covar=noise_covar)

    @property
    def num_groups(self) -> int:
        return self.noise_covar.num_groups

    @property
    def group_dim(self) -> int:
        return self.noise_covar.group_dim

    @property
    def noise(self) -> Tensor:
        """The noise variance of every level. # shape: (*batch, num_groups)"""
        return self.noise_covar.noise

    @noise.setter
    def noise(self, value) -> None:
        self.noise_covar.noise = value

    @property
    def raw_noise(self) -> Tensor:
        return self.noise_covar.raw_noise

    @raw_noise.setter
    def raw_noise(self, value: Tensor) -> None:  # as GaussianLikelihood's: likelihood.initialize(raw_noise=...) too
        self.noise_covar.initialize(raw_noise=value)

    @property
    def observed(self) -> Tensor:
        """Which levels each batch entry has seen in training. # shape: (*batch_shape, num_groups), bool"""
        return self.noise_covar.observed

    def set_train_inputs(self, train_inputs) -> None:
        """See :meth:`GroupNoise.set_train_inputs`."""
        self.noise_covar.set_train_inputs(train_inputs)

    def marginal(self, function_dist: MultivariateNormal, *params: Any, **kwargs: Any) -> MultivariateNormal:
        """GPyTorch's marginal :math:`p(y)`; an :class:`~gpytorch.models.ExactGP` output of training mode also
        hands on the inputs it was computed at, against which the stored training groups are checked."""
        if isinstance(function_dist, MultitaskMultivariateNormal):
            n, t = function_dist.event_shape
            raise ValueError(
                f"GroupGaussianLikelihood takes a MultivariateNormal with one output per point, got a "
                f"MultitaskMultivariateNormal of {n} points and {t} tasks (its noise would be read per task, not per "
                "point). For a batch-independent multi-output model leave out MultitaskMultivariateNormal."
                f"from_batch_mvn: return the batch MultivariateNormal and use GroupGaussianLikelihood(num_groups, "
                f"batch_shape=torch.Size([{t}])) with targets of shape ({t}, {n})."
            )
        inputs = getattr(function_dist, "_bma_gp_inputs", None)
        if inputs is not None and kwargs.get("groups") is None and kwargs.get("noise") is None:
            kwargs = {**kwargs, "model_inputs": inputs}
        return super().marginal(function_dist, *params, **kwargs)
