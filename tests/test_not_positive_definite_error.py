"""Closed forms that find a matrix not positive definite raise :class:`bma_gp.NotPositiveDefiniteError`: a
``ValueError`` (the package's refusals of bad input) and linear_operator's ``NotPSDError`` (what its dense Cholesky
raises for the same matrix), so that GPyTorch code that catches ``NotPSDError`` catches it. They raised a plain
``ValueError``, which such code let through."""

from __future__ import annotations

import pytest
import torch
from linear_operator.operators import DiagLinearOperator, LowRankRootLinearOperator
from linear_operator.utils.errors import NotPSDError

import bma_gp
from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, NotPositiveDefiniteError, Partition

DT = torch.float64


def _indefinite_operator() -> BlockMeanLinearOperator:
    # B has eigenvalues of both signs: the core matrix C is indefinite
    return BlockMeanLinearOperator(
        torch.tensor([1.0, 1.0], dtype=DT),
        torch.tensor([[0.5, 4.0], [4.0, 3.0]], dtype=DT),
        Partition.from_labels(torch.tensor([0, 0, 1])),
    )


def _negative_lam_operator() -> BlockMeanLinearOperator:
    # lam = -1 is an eigenvalue of multiplicity 2 (block 0 has 3 points)
    return BlockMeanLinearOperator(
        torch.tensor([-1.0, 1.0], dtype=DT),
        torch.tensor([[5.0, 0.0], [0.0, 1.0]], dtype=DT),
        Partition.from_labels(torch.tensor([0, 0, 0, 1])),
    )


def _indefinite_sum() -> BlockMeanSumLinearOperator:
    parts = [Partition.from_labels(torch.tensor([0, 0, 1, 1, 2])), Partition.from_labels(torch.tensor([0, 1, 0, 1, 0]))]
    return BlockMeanSumLinearOperator(
        torch.full((5,), 0.1, dtype=DT),
        -torch.eye(3, dtype=DT),
        torch.eye(2, dtype=DT),
        partitions=parts,
    )


_CASES = {
    "operator logdet (indefinite core)": lambda: _indefinite_operator().logdet(),
    "operator root (indefinite core)": lambda: _indefinite_operator().root_decomposition().root.to_dense(),
    "operator logdet (negative lam)": lambda: _negative_lam_operator().logdet(),
    "operator inverse root (negative lam)": lambda: _negative_lam_operator().root_inv_decomposition().root.to_dense(),
    "sum logdet": lambda: _indefinite_sum().logdet(),
    "sum inv_quad_logdet": lambda: _indefinite_sum().inv_quad_logdet(torch.ones(5, dtype=DT), logdet=True),
    "sum root": lambda: _indefinite_sum().root_decomposition().root.to_dense(),
    "sum inverse root": lambda: _indefinite_sum().root_inv_decomposition().root.to_dense(),
}


@pytest.mark.parametrize("name", list(_CASES))
def test_not_positive_definite_is_both_errors(name):
    with pytest.raises(NotPSDError) as info:
        _CASES[name]()
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, NotPositiveDefiniteError)
    assert "positive" in str(info.value)


def test_public_name():
    assert "NotPositiveDefiniteError" in bma_gp.__all__
    assert issubclass(NotPositiveDefiniteError, ValueError) and issubclass(NotPositiveDefiniteError, NotPSDError)


def test_caught_as_linear_operators_error_in_a_training_loop():
    # a loop that retries on NotPSDError, as GPyTorch-based fitting code does, sees this package's refusal the same
    # way it sees linear_operator's for the same (indefinite) matrix
    U = torch.randn(6, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    dense_generic = LowRankRootLinearOperator(U) + DiagLinearOperator(torch.full((6,), -1.0, dtype=DT))
    caught = []
    for make in (lambda: dense_generic, _indefinite_sum):
        try:
            make().inv_quad_logdet(torch.ones(6 if make is not _indefinite_sum else 5, dtype=DT), logdet=True)
        except NotPSDError as err:
            caught.append(type(err))
    assert len(caught) == 2
