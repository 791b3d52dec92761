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
    r"""A low-rank-plus-diagonal covariance over integer group ids.

    .. math::

        k(g, g') = C_{g g'}, \qquad C = W W^\top + \operatorname{diag}(v),

    with :math:`W` of shape ``(num_groups, rank)`` and :math:`v > 0` (like
    :class:`gpytorch.kernels.IndexKernel`). On one set of inputs the covariance is
    constant over every pair of groups, so it is returned as a
    :class:`~bma_gp.BlockMeanLinearOperator` with :math:`\lambda = 0` over the partition of
    the inputs by group id (only the ids that occur, relabelled ``0 .. k-1`` in increasing
    id order; :math:`B` is :math:`C` restricted to them). Nothing is approximated.
    Against other inputs (e.g. test points) the result is a
    :class:`~bma_gp.kernels.BlockCrossLinearOperator` of size ``t x k``.

    A block mean matrix with :math:`\lambda = 0` is singular wherever a group holds more than
    one input; the likelihood's noise (a constant diagonal) makes it positive definite, and
    the sum stays a block mean operator, so an :class:`~gpytorch.models.ExactGP` with a
    :class:`~gpytorch.likelihoods.GaussianLikelihood` trains and predicts in
    :math:`O(n + k^3)`, without CG, Lanczos or an :math:`n \times n` matrix. A sum with
    another kernel (``GroupKernel(...) + RBFKernel()``) is a generic
    :class:`~linear_operator.operators.SumLinearOperator`: correct, but solved by GPyTorch's
    generic path (dense Cholesky up to ``max_cholesky_size``, CG and Lanczos beyond), with
    the other kernel's full cost.

    Args:
        num_groups: number of possible ids; inputs must be integers in ``[0, num_groups)``.
        rank: columns of :math:`W` (0 gives independent group effects, a random intercept).
        prior: optional prior on :math:`C`.
        var_constraint: constraint on :math:`v` (default ``Positive()``).
        **kwargs: ``batch_shape``, ``active_dims`` (select the id column) and the rest of
            :class:`~gpytorch.kernels.Kernel`'s arguments.

    Inputs have shape ``(*batch, n, 1)`` (one id column; floating point holding whole numbers,
    or an integer dtype). Ids that are not integers in ``[0, num_groups)`` raise ``ValueError``.
    """

    has_lengthscale = False

    def __init__(self, num_groups: int, rank: int = 1, prior: Prior | None = None,
                 var_constraint: Interval | None = None, **kwargs):
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}.")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= num_groups:
            raise ValueError(f"rank must be an int in [0, num_groups={num_groups}], got {rank!r}.")
        super().__init__(**kwargs)
        self.num_groups = num_groups
        self.rank = rank
        if var_constraint is None:
            var_constraint = Positive()
        self.register_parameter("covar_factor", torch.nn.Parameter(torch.randn(*self.batch_shape, num_groups, rank)))
        self.register_parameter("raw_var", torch.nn.Parameter(torch.zeros(*self.batch_shape, num_groups)))
        self.register_constraint("raw_var", var_constraint)
        if prior is not None:
            if not isinstance(prior, Prior):
                raise TypeError(f"prior must be a gpytorch.priors.Prior, got {type(prior).__name__}.")
            self.register_prior("GroupKernelPrior", prior, lambda m: m.covar_matrix)

    # ------------------------------------------------------------------ parameters
    @property
    def var(self) -> Tensor:
        """The per-group variance :math:`v`. # shape: (*batch, num_groups)"""
        return self.raw_var_constraint.transform(self.raw_var)

    @var.setter
    def var(self, value) -> None:
        if not torch.is_tensor(value):
            value = torch.as_tensor(value).to(self.raw_var)
        self.initialize(raw_var=self.raw_var_constraint.inverse_transform(value))

    @property
    def covar_matrix(self) -> Tensor:
        """:math:`C = W W^\\top + \\operatorname{diag}(v)`. # shape: (*batch, num_groups, num_groups)"""
        W = self.covar_factor
        return W @ W.mT + torch.diag_embed(self.var)

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
    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False,
                **params) -> Tensor | LinearOperator:
        if last_dim_is_batch:
            raise NotImplementedError("GroupKernel does not support the deprecated last_dim_is_batch mode.")
        ids1 = self.group_ids(x1, "x1")
        ids2 = ids1 if x2 is x1 else self.group_ids(x2, "x2")
        C = self.covar_matrix
        batch = torch.broadcast_shapes(ids1.shape[:-1], ids2.shape[:-1], C.shape[:-2])
        if diag:
            if ids1.shape[-1] != ids2.shape[-1]:
                raise ValueError(f"diag=True needs x1 and x2 of the same length, got {ids1.shape[-1]} and "
                                 f"{ids2.shape[-1]}.")
            G = self.num_groups
            index = (ids1 * G + ids2).expand(*batch, ids1.shape[-1])
            return C.reshape(*C.shape[:-2], G * G).expand(*batch, G * G).gather(-1, index)

        shared1, shared2 = _shared_ids(ids1), _shared_ids(ids2)
        same = ids1 is ids2 or (ids1.shape == ids2.shape and torch.equal(ids1, ids2))
        if same and shared1 is not None:
            present, partition = _present_partition(shared1)
            B = C.index_select(-2, present).index_select(-1, present).expand(*batch, present.numel(),
                                                                               present.numel())
            return BlockMeanLinearOperator(torch.zeros_like(B[..., 0]), B, partition)
        if shared2 is not None:
            return self._cross(C, ids1, shared2, batch)
        if shared1 is not None:
            return self._cross(C, ids2, shared1, batch).mT
        # ids that differ across batch entries: no shared partition; assemble densely
        return to_linear_operator(_gather_pairs(C, ids1, ids2).expand(*batch, ids1.shape[-1], ids2.shape[-1]))

    def _cross(self, C: Tensor, rows: Tensor, column_ids: Tensor, batch: torch.Size) -> BlockCrossLinearOperator:
        """``C[rows, column_ids]`` as :math:`A P^\\top` over the partition of ``column_ids``."""
        present, partition = _present_partition(column_ids)
        by_block = C.index_select(-1, present)  # (*bc, G, k)
        k = present.numel()
        if rows.dim() == 1:
            values = by_block.index_select(-2, rows)
        else:
            by_block = by_block.expand(*batch, self.num_groups, k)
            values = by_block.gather(-2, rows.expand(*batch, rows.shape[-1]).unsqueeze(-1).expand(*batch,
                                                                                                  rows.shape[-1], k))
        return BlockCrossLinearOperator(values.expand(*batch, rows.shape[-1], k), partition)

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return 1

    def prediction_strategy(self, train_inputs, train_prior_dist, train_labels, likelihood):
        return BlockMeanPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)
