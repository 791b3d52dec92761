"""Batches of independent covariances concatenated along a batch dimension, solved member by member.

``MultitaskMultivariateNormal.from_independent_mvns`` (and BoTorch's ``ModelListGP`` posterior, which calls it)
builds ``BlockDiagLinearOperator(CatLinearOperator(*[C_i.unsqueeze(0)], dim=0))``. linear_operator's block-diagonal
operator hands its solves, log-determinant and roots to the concatenation, whose own are the generic ones: a dense
Cholesky up to ``max_cholesky_size`` and CG, stochastic Lanczos quadrature and a Lanczos root of rank
``max_root_decomposition_size`` beyond (a user trial: ``log_prob`` 22 nats off at two tasks of 1,000 points, and
samples of rank 100). When every member has its own exact solves (a block mean operator or sum, a predictive
covariance of a block mean model, or a fallback that warns), :func:`install` makes the concatenation an
:class:`IndependentCatLinearOperator`, whose solves, log-determinants and roots are the members' own.
"""

from __future__ import annotations

import functools

import torch
from linear_operator.operators import (
    CatLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    LinearOperator,
    RootLinearOperator,
)
from torch import Tensor

__all__ = ["IndependentCatLinearOperator", "install"]


def _exact_member(op) -> bool:
    """Whether ``op`` has solves, log-determinants and roots of its own that are exact (or say where they are not)."""
    from bma_gp._composition import _is_ours, _WarnsWhenFactorised
    from bma_gp.kernels.sum_prediction_strategy import _DenseFactorSolves

    if isinstance(op, _DenseFactorSolves):
        return op._is_symmetric()
    return _is_ours(op) or isinstance(op, _WarnsWhenFactorised)


def _batch_cat(linear_ops, dim: int) -> bool:
    """Whether ``CatLinearOperator(*linear_ops, dim=dim)`` joins square members of exact ones along a batch
    dimension."""
    if len(linear_ops) < 2 or not all(isinstance(op, LinearOperator) for op in linear_ops):
        return False
    ndim = linear_ops[0].dim()
    if not isinstance(dim, int) or ndim < 3:
        return False
    negative = dim - ndim if dim >= 0 else dim
    if negative > -3 or negative < -ndim:
        return False
    return all(op.dim() == ndim and op.shape[-1] == op.shape[-2] and _exact_member(op) for op in linear_ops)


class IndependentCatLinearOperator(CatLinearOperator):
    """linear_operator's ``CatLinearOperator`` along a batch dimension whose members have exact solves: ``solve``,
    ``inv_quad_logdet`` and the roots split the right-hand side along that dimension and ask each member (its closed
    form), then join the results; a diagonal added keeps the members apart. Products, entries and indexing are
    linear_operator's."""

    def _sizes(self) -> list[int]:
        return [op.shape[self.cat_dim] for op in self.linear_ops]

    def _split(self, rhs: Tensor) -> tuple[Tensor, ...]:
        batch = torch.broadcast_shapes(self.batch_shape, rhs.shape[:-2])
        return rhs.expand(*batch, *rhs.shape[-2:]).split(self._sizes(), dim=self.cat_dim)

    def _members_exact(self) -> bool:
        return all(_exact_member(op) for op in self.linear_ops)

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        if not self._members_exact():
            return super().solve(right_tensor, left_tensor)
        vector = right_tensor.dim() == 1
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        res = torch.cat([op.solve(part) for op, part in zip(self.linear_ops, self._split(rhs))], dim=self.cat_dim)
        if left_tensor is not None:
            res = left_tensor @ res
        return res.squeeze(-1) if vector else res

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int | None = 0):
        if num_tridiag or not self._members_exact():
            return super()._solve(rhs, preconditioner, num_tridiag=num_tridiag)
        return self.solve(rhs)

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True):
        if not self._members_exact():
            return super().inv_quad_logdet(inv_quad_rhs, logdet, reduce_inv_quad)
        if inv_quad_rhs is None and not logdet:
            raise RuntimeError("Either `inv_quad_rhs` or `logdet` must be specified.")
        parts: list[Tensor | None] = [None] * len(self.linear_ops)
        if inv_quad_rhs is not None:
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
            parts = list(self._split(rhs))
        results = [
            op.inv_quad_logdet(part, logdet=logdet, reduce_inv_quad=reduce_inv_quad)
            for op, part in zip(self.linear_ops, parts)
        ]
        # the results carry the batch dimensions (and, unreduced, one per column): the cat dimension counted from the
        # end of the operator's batch shape
        quad_dim = self.cat_dim + (2 if reduce_inv_quad else 1)
        quad = results[0][0] if inv_quad_rhs is None else torch.cat([r[0] for r in results], dim=quad_dim)
        det = torch.cat([r[1] for r in results], dim=self.cat_dim + 2) if logdet else results[0][1]
        return quad, det

    def _joined_roots(self, roots: list[LinearOperator]) -> LinearOperator:
        """The members' roots joined along the cat dimension (zero columns pad the narrower ones)."""
        width = max(root.shape[-1] for root in roots)
        if all(root.shape[-1] == width for root in roots):
            return CatLinearOperator(*roots, dim=self.cat_dim, output_device=self.device)
        dense = [torch.nn.functional.pad(root.to_dense(), (0, width - root.shape[-1])) for root in roots]
        return DenseLinearOperator(torch.cat(dense, dim=self.cat_dim))

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        if not self._members_exact():
            return super().root_decomposition(method=method)
        return RootLinearOperator(self._root_decomposition(method))

    def _root_decomposition(self, method: str | None = None):
        if not self._members_exact():
            return super()._root_decomposition()
        return self._joined_roots([op.root_decomposition(method=method).root for op in self.linear_ops])

    def root_inv_decomposition(self, initial_vectors=None, test_vectors=None, method: str | None = None):
        if not self._members_exact():
            return super().root_inv_decomposition(initial_vectors, test_vectors, method=method)
        return RootLinearOperator(self._root_inv_decomposition())

    def _root_inv_decomposition(self, initial_vectors=None, test_vectors=None):
        if not self._members_exact():
            return super()._root_inv_decomposition(initial_vectors, test_vectors)
        return self._joined_roots([op.root_inv_decomposition().root for op in self.linear_ops])

    #: ``D + cat`` is ``cat + D`` (:func:`bma_gp._composition.adds_exactly`), and a constant per batch entry scales
    #: lazily (``_mul_constant``)
    _adds_exactly = True

    def _mul_constant(self, other) -> LinearOperator:
        """``c`` times each member (one constant, or one per batch entry split along the cat dimension): the members'
        own multiples, which keep their closed forms (linear_operator's ``ConstantMulLinearOperator`` of the
        concatenation took CG and stochastic Lanczos)."""
        if not self._members_exact():
            return super()._mul_constant(other)
        c = other if torch.is_tensor(other) else torch.tensor(other, dtype=self.dtype, device=self.device)
        if c.dim() == 0:
            pieces = [c] * len(self.linear_ops)
        else:
            c = c.expand(self.batch_shape)
            pieces = list(c.split(self._sizes(), dim=self.cat_dim + 2))
        members = [op._mul_constant(piece) for op, piece in zip(self.linear_ops, pieces)]
        return CatLinearOperator(*members, dim=self.cat_dim, output_device=self.device)

    def __add__(self, other):
        """A diagonal (a likelihood's noise) added member by member, so that the sum keeps the members' closed
        forms."""
        from bma_gp._composition import fallback_sum

        if not self._members_exact() or not isinstance(other, (LinearOperator, Tensor)):
            return super().__add__(other)
        try:
            shape = torch.broadcast_shapes(self.shape, other.shape)
        except RuntimeError:
            shape = None
        if isinstance(other, DiagLinearOperator) and shape is not None and shape[-2:] == self.shape[-2:]:
            if shape != self.shape:  # a diagonal with more batch dimensions: this concatenation expanded first
                expanded = self._expand_batch(shape[:-2])
                if isinstance(expanded, IndependentCatLinearOperator):
                    return expanded + other
            else:
                d = other.diagonal(dim1=-2, dim2=-1).expand(*self.batch_shape, self.shape[-1])
                pieces = d.split(self._sizes(), dim=self.cat_dim + 1)
                members = [op + DiagLinearOperator(p) for op, p in zip(self.linear_ops, pieces)]
                return CatLinearOperator(*members, dim=self.cat_dim, output_device=self.device)
        if (
            isinstance(other, IndependentCatLinearOperator)
            and other.shape == self.shape
            and other.cat_dim == self.cat_dim
            and other._sizes() == self._sizes()
        ):  # two concatenations over the same members' sizes: member by member
            members = [a + b for a, b in zip(self.linear_ops, other.linear_ops)]
            return CatLinearOperator(*members, dim=self.cat_dim, output_device=self.device)
        # anything else has no member-by-member form: a sum that says so where it is solved (linear_operator's took
        # CG and stochastic Lanczos without a word: a user trial's log-determinants 8-27 nats off)
        fallback = fallback_sum(self, other)
        return fallback if fallback is not None else super().__add__(other)

    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        diag = diag if torch.is_tensor(diag) else torch.tensor(diag, dtype=self.dtype, device=self.device)
        if diag.dim() == 0 or diag.shape[-1] == 1:
            diag = diag.expand(*diag.shape[:-1] if diag.dim() else (), self.shape[-1])
        return self + DiagLinearOperator(diag.expand(*self.batch_shape, self.shape[-1]))


def _hooked_cat_new(original):
    """``CatLinearOperator.__new__``: an :class:`IndependentCatLinearOperator` for a batch concatenation of exact
    members (Python then runs ``CatLinearOperator.__init__`` on it)."""

    @functools.wraps(original)
    def __new__(cls, *linear_ops, dim=0, output_device=None):
        if cls is CatLinearOperator and _batch_cat(linear_ops, dim):
            cls = IndependentCatLinearOperator
        return (
            original(cls)
            if original is object.__new__
            else original(cls, *linear_ops, dim=dim, output_device=output_device)
        )

    __new__._bma_gp_original = original
    return __new__


def install() -> None:
    original = CatLinearOperator.__dict__.get("__new__", object.__new__)
    if not hasattr(original, "_bma_gp_original"):
        CatLinearOperator.__new__ = _hooked_cat_new(original)
