"""Roots, inverse roots and solves of block mean operators that are not positive definite, against dense float64.

An audit found that the errors of ``root_decomposition`` / ``root_inv_decomposition`` / ``sqrt_inv_matmul`` of a
single operator named the internal ``matrix_sqrt`` / ``matrix_inv_sqrt``; that with validation off a sum's roots
raised where a single operator's clamp; that with validation on an invertible indefinite sum refused ``solve``
where a single operator solves it; and that a float32 model predicted float64 inputs from float32 caches.
"""

from __future__ import annotations

import pytest
import torch

from bma_gp import BlockMeanLinearOperator, Partition

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems

N = 12
DTYPE = torch.float64


def _indefinite_B() -> torch.Tensor:
    return torch.tensor([[-2.0, 0.1, 0.0], [0.1, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=DTYPE)


def _single(dtype=DTYPE) -> BlockMeanLinearOperator:
    """``diag(1) + P B P^T`` with one negative eigenvalue (about -7)."""
    part = Partition.from_labels(torch.arange(N) % 3)
    return BlockMeanLinearOperator(torch.ones(3, dtype=DTYPE), _indefinite_B(), part).to(dtype)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda op: op.root_decomposition(), "root_decomposition"),
        (lambda op: op.root_inv_decomposition(), "root_inv_decomposition"),
        (lambda op: op.sqrt_inv_matmul(torch.ones(N, 2, dtype=op.dtype)), "sqrt_inv_matmul"),
    ],
)
def test_single_operator_root_errors_name_the_call(call, name):
    op = _single()
    assert float(torch.linalg.eigvalsh(op.to_dense()).min()) < -1
    with pytest.raises(ValueError, match=rf"^{name} needs a positive (semi)?definite matrix.*Add a diagonal"):
        call(op)
    with pytest.raises(ValueError, match=r"^matrix_sqrt needs a positive semidefinite"):  # the direct call
        op.matrix_sqrt()
