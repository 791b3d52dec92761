"""Kronecker sums with a block mean factor plus a dense matrix or a diagonal of another size (session 29's attack).

1. ``SumLinearOperator(op, dense)`` around a rank-0 Kronecker sum (``M (x) K + I (x) diag(sigma)``, a
   ``BlockMeanKroneckerAddedDiagLinearOperator``) is now routed to ``op + dense``, which linear_operator's
   ``AddedDiagLinearOperator.__add__`` turned into the same class around ``Sum(M (x) K, dense)``: its log-determinant
   past ``max_cholesky_size`` crashed ("Incompatible dimensions for matmul", linear_operator's Kronecker path read
   the sum as a Kronecker product). Before the session ``SumLinearOperator(op, dense)`` was linear_operator's (CG), so
   this was a new crash; ``op + dense`` crashed before too.
2. A ``ConstantDiagLinearOperator`` of the wrong size added to a rank >= 1 Kronecker sum was folded into its noise
   silently (as if it were of the right size, solved in closed form); before the session the sum raised a shape
   error when used."""

from __future__ import annotations

import warnings

import pytest
import torch
from linear_operator import settings as lo_settings
from linear_operator.operators import (
    AddedDiagLinearOperator,
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    SumLinearOperator,
)

from bma_gp import ClosedFormFallbackWarning
from test_kronecker_added_diagonal import _rank_zero
from test_kronecker_block_mean import N, T, _partition
from test_kronecker_task_noise import _build, _dense, _inputs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("how", ["sum_built_directly", "plus", "plus_itself"])
def test_rank_zero_sum_plus_a_dense_matrix_is_a_warned_fallback_that_solves(how):
    op, dense = _rank_zero()
    E = 0.3 * torch.eye(N * T, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)
        if how == "sum_built_directly":
            added, want = SumLinearOperator(op, DenseLinearOperator(E)), dense + E
        elif how == "plus":
            added, want = op + DenseLinearOperator(E), dense + E
        else:
            added, want = SumLinearOperator(op, op), 2 * dense
        with lo_settings.max_cholesky_size(10_000):  # a dense Cholesky: exact
            logdet = added.logdet()
    assert torch.allclose(logdet, torch.logdet(want), rtol=1e-10)
    with lo_settings.max_cholesky_size(0), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        added.logdet()  # CG and Lanczos: approximate, announced (it raised)
    assert any(issubclass(w.category, ClosedFormFallbackWarning) for w in caught)


@pytest.mark.parametrize("how", ["plus", "constant_plus", "sum_built_directly", "added_diag_built_directly"])
def test_a_constant_diagonal_of_another_size_is_refused(how):
    leaves = [x.detach() for x in _inputs()]
    op, M, K, Sigma = _build(*leaves, _partition())
    assert torch.allclose(op.to_dense(), _dense(M, K, Sigma))
    wrong = ConstantDiagLinearOperator(torch.tensor([0.3], dtype=torch.float64), diag_shape=5)
    make = {
        "plus": lambda: op + wrong,
        "constant_plus": lambda: wrong + op,
        "sum_built_directly": lambda: SumLinearOperator(op, wrong),
        "added_diag_built_directly": lambda: AddedDiagLinearOperator(op, wrong),
    }[how]
    with pytest.raises(RuntimeError):  # at construction or at first use, as linear_operator's own sum
        make().to_dense()
