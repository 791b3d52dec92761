"""A covariance over integer group ids: a block mean matrix exactly, with no approximation."""

from __future__ import annotations

import torch
from gpytorch.constraints import Interval, Positive
from gpytorch.kernels import Kernel
from gpytorch.priors import Prior
from linear_operator import to_linear_operator
from linear_operator.operators import LinearOperator
from torch import Tensor

from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator
from bma_gp.kernels.block_cross_linear_operator import BlockCrossLinearOperator
from bma_gp.kernels.prediction_strategy import BlockMeanPredictionStrategy
from bma_gp.partition import Partition

__all__ = ["GroupKernel"]


def _shared_ids(ids: Tensor) -> Tensor | None:
    """The id vector if every batch entry of ``ids`` (*batch, n) holds the same ids, else None."""
    if ids.dim() == 1:
        return ids
    flat = ids.reshape(-1, ids.shape[-1])
    first = flat[0]
    return first if bool((flat == first).all()) else None


def _present_partition(ids: Tensor) -> tuple[Tensor, Partition]:
    """The ids that occur (sorted) and the partition of the positions by id, relabelled ``0 .. k-1``."""
    present, labels = torch.unique(ids, sorted=True, return_inverse=True)
    return present, Partition.from_labels(labels, num_blocks=present.numel())


def _gather_pairs(C: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``C[..., rows[..., i], cols[..., j]]`` with batch broadcasting. # shape: (*batch, n1, n2)"""
    G = C.shape[-1]
    index = rows.unsqueeze(-1) * G + cols.unsqueeze(-2)
    batch = torch.broadcast_shapes(C.shape[:-2], index.shape[:-2])
    flat = C.reshape(*C.shape[:-2], G * G).expand(*batch, G * G)
    index = index.expand(*batch, *index.shape[-2:])
    return flat.gather(-1, index.reshape(*batch, -1)).reshape(index.shape)


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
      like :class:`gpytorch.kernels.IndexKernel`; :math:`W` starts random).

    On one set of inputs the covariance is constant over every pair of groups, so it is returned
    as a :class:`~bma_gp.BlockMeanLinearOperator` with :math:`\lambda = 0` over the partition
    of the inputs by group id (only the ids that occur, relabelled ``0 .. k-1`` in increasing id
    order; :math:`B` is :math:`C` restricted to them, built in :math:`O(k^2)` without forming
    :math:`C`). With ``rank=0``, :math:`B` is exactly diagonal (its off-diagonal entries are
    zeros), so code that receives the operator can see that the effects are independent.
    Nothing is approximated. Against other inputs (e.g. test points) the result is a
    :class:`~bma_gp.kernels.BlockCrossLinearOperator` of size ``t x k``; an id that does not
    occur in training has covariance 0 with the training groups (with ``rank=0``), so its
    predicted effect is 0 with its prior variance.

    A block mean matrix with :math:`\lambda = 0` is singular wherever a group holds more than
    one input; the likelihood's noise (a constant diagonal) makes it positive definite, and
    the sum stays a block mean operator, so an :class:`~gpytorch.models.ExactGP` with a
    :class:`~gpytorch.likelihoods.GaussianLikelihood` trains and predicts in
    :math:`O(n + k^3)`, without CG, Lanczos or an :math:`n \times n` matrix.

    Args:
        num_groups: number of possible ids; inputs must be integers in ``[0, num_groups)``.
        rank: columns of :math:`W` (default 0: no cross-group part).
        per_group_variance: one variance per group instead of one shared variance (default False).
        prior: optional prior on :math:`C` (forms the ``num_groups x num_groups`` matrix).
        var_constraint: constraint on :math:`v` (default ``Positive()``).
        **kwargs: ``batch_shape``, ``active_dims`` (select the id column) and the rest of
            :class:`~gpytorch.kernels.Kernel`'s arguments.

    Inputs have shape ``(*batch, n, 1)`` (one id column; floating point holding whole numbers,
    or an integer dtype). Ids that are not integers in ``[0, num_groups)`` raise ``ValueError``.

    Example:
        >>> kernel = GroupKernel(18)                      # (1 | Subject)
        >>> kernel.var.shape
        torch.Size([1])
        >>> GroupKernel(18, rank=2, per_group_variance=True).var.shape
        torch.Size([18])
    """

    has_lengthscale = False

    def __init__(
        self,
        num_groups: int,
        rank: int = 0,
        per_group_variance: bool = False,
        prior: Prior | None = None,
        var_constraint: Interval | None = None,
        **kwargs,
    ):
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}.")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= num_groups:
            raise ValueError(f"rank must be an int in [0, num_groups={num_groups}], got {rank!r}.")
        if not isinstance(per_group_variance, bool):
            raise TypeError(f"per_group_variance must be True or False, got {per_group_variance!r}.")
        if prior is not None and not isinstance(prior, Prior):
            raise TypeError(f"prior must be a gpytorch.priors.Prior, got {type(prior).__name__}.")
        super().__init__(**kwargs)
        self.num_groups = num_groups
        self.rank = rank
        self.per_group_variance = per_group_variance
        if var_constraint is None:
            var_constraint = Positive()
        if rank > 0:
            self.register_parameter(
                "covar_factor", torch.nn.Parameter(torch.randn(*self.batch_shape, num_groups, rank))
            )
        else:
            self.register_parameter("covar_factor", None)
        num_vars = num_groups if per_group_variance else 1
        self.register_parameter("raw_var", torch.nn.Parameter(torch.zeros(*self.batch_shape, num_vars)))
        self.register_constraint("raw_var", var_constraint)
        if prior is not None:
            self.register_prior("GroupKernelPrior", prior, lambda m: m.covar_matrix)

    # ------------------------------------------------------------------ parameters
    @property
    def var(self) -> Tensor:
        """The variance :math:`v`: shape ``(*batch, 1)`` when shared (the default), ``(*batch, num_groups)``
        with ``per_group_variance=True``."""
        return self.raw_var_constraint.transform(self.raw_var)

    @var.setter
    def var(self, value) -> None:
        value = torch.as_tensor(value).to(self.raw_var)
        if value.dim() == 0:
            value = value.expand_as(self.raw_var)
        try:
            value = value.expand_as(self.raw_var)
        except RuntimeError:
            raise ValueError(
                f"var of shape {tuple(value.shape)} does not fit the kernel's variance of shape "
                f"{tuple(self.raw_var.shape)} (per_group_variance={self.per_group_variance}); pass a "
                "scalar or a tensor of that shape."
            ) from None
        self.initialize(raw_var=self.raw_var_constraint.inverse_transform(value))

    @property
    def covar_matrix(self) -> Tensor:
        r""":math:`C = W W^\top + \operatorname{diag}(v)`. # shape: (*batch, num_groups, num_groups)"""
        return self._covar_between(None, None)

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
        if self.per_group_variance:
            v_rows = var.expand(*var.shape[:-1], G).index_select(-1, rows)
        else:
            v_rows = var.expand(*var.shape[:-1], rows.shape[-1])
        if rows is cols:  # the training covariance: exactly diag(v) over the present ids
            out = torch.diag_embed(v_rows)
        else:
            out = v_rows.unsqueeze(-1) * (rows.unsqueeze(-1) == cols.unsqueeze(-2)).to(var.dtype)
        if W is not None:
            out = out + W.index_select(-2, rows) @ W.index_select(-2, cols).mT
        return out

    # ------------------------------------------------------------------ inputs
    def group_ids(self, x: Tensor, name: str = "x") -> Tensor:
        """Validate ``x`` (*batch, n, 1) and return its ids as a LongTensor (*batch, n)."""
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a tensor of group ids, got {type(x).__name__}.")
        if x.dim() < 2 or x.shape[-1] != 1:
            raise ValueError(
                f"{name} must hold one column of group ids, shape (*batch, n, 1), got {tuple(x.shape)}; "
                "select the id column with active_dims=[j]."
            )
        values = x[..., 0]
        if x.dtype == torch.bool or x.dtype.is_complex:
            raise ValueError(f"{name} must hold integer group ids, got dtype {x.dtype}.")
        if values.numel() == 0:
            return values.long()
        bad = (values < 0) | (values >= self.num_groups)
        if values.dtype.is_floating_point:
            bad = bad | (values != values.round())
        if bool(bad.any()):
            value = values[bad].reshape(-1)[0].item()
            raise ValueError(
                f"{name} holds {value!r}, which is not an integer group id in [0, {self.num_groups}); "
                f"group ids must be whole numbers 0 .. num_groups - 1 = {self.num_groups - 1}."
            )
        return values.long()

    # ------------------------------------------------------------------ kernel interface
    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params
    ) -> Tensor | LinearOperator:
        if last_dim_is_batch:
            raise NotImplementedError("GroupKernel does not support the deprecated last_dim_is_batch mode.")
        ids1 = self.group_ids(x1, "x1")
        ids2 = ids1 if x2 is x1 else self.group_ids(x2, "x2")
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
            present, partition = _present_partition(shared1)
            k = present.numel()
            B = self._covar_between(present, present).expand(*batch, k, k)
            return BlockMeanLinearOperator(torch.zeros_like(B[..., 0]), B, partition)
        if shared2 is not None:
            return self._cross(ids1, shared2, batch)
        if shared1 is not None:
            return self._cross(ids2, shared1, batch).mT
        # ids that differ across batch entries: no shared partition; assemble densely
        return to_linear_operator(
            _gather_pairs(self.covar_matrix, ids1, ids2).expand(*batch, ids1.shape[-1], ids2.shape[-1])
        )

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
        present, partition = _present_partition(column_ids)
        k = present.numel()
        if rows.dim() == 1:
            values = self._covar_between(rows, present)
        else:
            by_block = self._covar_between(None, present).expand(*batch, self.num_groups, k)  # (*batch, G, k)
            values = by_block.gather(
                -2, rows.expand(*batch, rows.shape[-1]).unsqueeze(-1).expand(*batch, rows.shape[-1], k)
            )
        return BlockCrossLinearOperator(values.expand(*batch, rows.shape[-1], k), partition)

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return 1

    def prediction_strategy(self, train_inputs, train_prior_dist, train_labels, likelihood):
        return BlockMeanPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)
