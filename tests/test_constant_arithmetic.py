"""A number added to or subtracted from an operator, and negation, as a user of dense tensors writes them.

``M + c`` kept the block mean type, but a sum ``S + 0.3`` raised linear_operator's "All arguments of a
SumLinearOperator should be LinearOperators or Tensors", ``M - 0.3`` and ``S - 0.3`` raised ``AttributeError: 'float'
object has no attribute 'mul'`` (linear_operator's ``__sub__`` calls ``other.mul(-1)``), ``c - S`` linear_operator's
"All arguments of a SumLinearOperator ..." again, and ``-M`` a ``TypeError``.
Now a constant added to a sum is a one-block term of rank one, in closed form, and every result matches dense.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from linear_operator.operators import DiagLinearOperator

from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, Partition
from bma_gp._composition import FallbackScaledLinearOperator

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = torch.tensor([0, 1, 0, 2, 1, 2, 2])
GROUPS = torch.tensor([0, 0, 1, 1, 1, 0, 1])


def _operators(dtype, batch=()):
    g = torch.Generator().manual_seed(0)
    part, groups = Partition.from_labels(LABELS), Partition.from_labels(GROUPS)
    A = torch.randn(*batch, 3, 3, generator=g, dtype=dtype)
    M = BlockMeanLinearOperator(torch.rand(*batch, 3, generator=g, dtype=dtype) + 0.5, A @ A.mT / 3, part)
    G = BlockMeanLinearOperator(
        torch.zeros(*batch, 2, dtype=dtype), torch.full((*batch, 2), 0.5, dtype=dtype), groups, diagonal=True
    )
    S = M + G + DiagLinearOperator(torch.rand(*batch, 7, generator=g, dtype=dtype) + 0.1)
    return M, S


CASES = {
    "S + c": lambda M, S, c: (S + c, S.to_dense() + c),
    "c + S": lambda M, S, c: (c + S, c + S.to_dense()),
    "S - c": lambda M, S, c: (S - c, S.to_dense() - c),
    "M - c": lambda M, S, c: (M - c, M.to_dense() - c),
    "c - S": lambda M, S, c: (c - S, c - S.to_dense()),
    "(M @ M) - c": lambda M, S, c: ((M @ M) - c, M.to_dense() @ M.to_dense() - c),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("constant", ["float", "tensor_0d", "tensor_1x1"])
def test_a_constant_plus_or_minus_an_operator_stays_closed_form_and_matches_dense(case, constant, dtype):
    M, S = _operators(dtype)
    c = {"float": 0.3, "tensor_0d": torch.tensor(0.3, dtype=dtype), "tensor_1x1": torch.tensor([[0.3]], dtype=dtype)}
    result, dense = CASES[case](M, S, c[constant])
    assert isinstance(result, (BlockMeanLinearOperator, BlockMeanSumLinearOperator, FallbackScaledLinearOperator))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(result.to_dense(), dense, **tol)
    rhs = torch.linspace(-1, 1, 14, dtype=dtype).view(7, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # closed form: no fallback warning
        solved = result.solve(rhs)
        logdet = result.logdet() if torch.det(dense.double()) > 0 else None
    torch.testing.assert_close(solved, torch.linalg.solve(dense.double(), rhs.double()).to(dtype), **tol)
    if logdet is not None:
        torch.testing.assert_close(logdet, torch.logdet(dense.double()).to(dtype), **tol)


def test_a_batch_of_constants_and_its_gradient():
    M, S = _operators(torch.float64, batch=(2,))
    c = torch.tensor([0.3, 0.5], dtype=torch.float64).view(2, 1, 1).requires_grad_(True)
    result = S + c
    assert isinstance(result, BlockMeanSumLinearOperator)
    result.logdet().sum().backward()
    c_dense = c.detach().clone().requires_grad_(True)
    torch.logdet(S.to_dense() + c_dense).sum().backward()
    torch.testing.assert_close(c.grad, c_dense.grad)


@pytest.mark.parametrize("which", ["M", "S", "M @ M"])
def test_negation(which):
    M, S = _operators(torch.float64)
    op = {"M": M, "S": S, "M @ M": M @ M}[which]
    torch.testing.assert_close((-op).to_dense(), -op.to_dense())
