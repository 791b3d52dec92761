"""Regression tests for what session 28 fixed.

Each test failed on the code before its fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from linear_operator.operators import (
    AddedDiagLinearOperator,
    ConstantDiagLinearOperator,
    DiagLinearOperator,
    LowRankRootAddedDiagLinearOperator,
    LowRankRootLinearOperator,
    SumLinearOperator,
)

from bma_gp import BlockMeanSumLinearOperator
from closed_form_guard import closed_forms_only


def _roots(n: int, batch=(), dtype=torch.float64, requires_grad=False):
    gen = torch.Generator().manual_seed(n)
    U1 = torch.randn(*batch, n, 3, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    U2 = torch.randn(*batch, n, 4, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    d = (torch.rand(*batch, n, generator=gen, dtype=dtype) + 0.5).requires_grad_(requires_grad)
    return U1, U2, d


def _dense(U1, U2, d):
    return U1 @ U1.mT + U2 @ U2.mT + torch.diag_embed(d)


# every way linear_operator spells two low-rank roots plus a diagonal
_SUMS = {
    "(R1 + R2) + D": lambda R1, R2, D: (R1 + R2) + D,
    "D + (R1 + R2)": lambda R1, R2, D: D + (R1 + R2),
    "(R1 + R2).add_diagonal": lambda R1, R2, D: (R1 + R2).add_diagonal(D.diagonal()),
    "R1 + (R2 + D)": lambda R1, R2, D: R1 + (R2 + D),
    "(R1 + D) + R2": lambda R1, R2, D: (R1 + D) + R2,
    "AddedDiagLinearOperator(R1 + R2, D)": lambda R1, R2, D: AddedDiagLinearOperator(R1 + R2, D),
    "SumLinearOperator(R1, R2, D)": lambda R1, R2, D: SumLinearOperator(R1, R2, D),
    "SumLinearOperator(R1, R2 + D)": lambda R1, R2, D: SumLinearOperator(R1, R2 + D),
    "(R1 + R2).add_jitter + rest": lambda R1, R2, D: (R1 + R2).add_jitter(0.25) + (D - 0.25 * _eye_like(D)),
    "(R1 + R2) + c I + rest": lambda R1, R2, D: (
        (R1 + R2)
        + ConstantDiagLinearOperator(torch.full((*D.batch_shape, 1), 0.25, dtype=D.dtype), D.shape[-1])
        + DiagLinearOperator(D.diagonal() - 0.25)
    ),
}


def _eye_like(D):
    return DiagLinearOperator(torch.ones_like(D.diagonal()))


class TestLowRankRootsPlusDiagonal:
    """Two low-rank roots plus a diagonal, built from linear_operator's own operators, were an
    ``AddedDiagLinearOperator`` / ``SumLinearOperator``: a dense ``n x n`` Cholesky, CG and Lanczos past
    ``max_cholesky_size``, without a word (the one-root case is linear_operator's Woodbury operator). They are now
    the sum with the roots side by side, in closed form."""

    @pytest.mark.parametrize("name", list(_SUMS))
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    @pytest.mark.parametrize("batch", [(), (2,)])
    def test_closed_form_and_values(self, name, dtype, batch):
        n = 60
        U1, U2, d = _roots(n, batch, dtype)
        op = _SUMS[name](LowRankRootLinearOperator(U1), LowRankRootLinearOperator(U2), DiagLinearOperator(d))
        assert isinstance(op, BlockMeanSumLinearOperator), type(op).__name__
        dense = _dense(U1, U2, d).double()
        rhs = torch.randn(*batch, n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning either
            with closed_forms_only(n):
                x = op.solve(rhs.to(dtype))
                inv_quad, logdet = op.inv_quad_logdet(rhs.to(dtype), logdet=True)
        tol = 1e-10 if dtype == torch.float64 else 2e-3
        expected = torch.linalg.solve(dense, rhs)
        torch.testing.assert_close(x.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
        torch.testing.assert_close(logdet.double(), torch.logdet(dense), rtol=tol, atol=tol)
        torch.testing.assert_close(inv_quad.double(), (rhs * expected).sum((-1, -2)), rtol=tol, atol=tol * 10)
        torch.testing.assert_close(op.to_dense().double(), dense, rtol=tol, atol=tol)

    def test_gradients(self):
        n = 40
        U1, U2, d = _roots(n, requires_grad=True)
        rhs = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        op = (LowRankRootLinearOperator(U1) + LowRankRootLinearOperator(U2)) + DiagLinearOperator(d)
        assert isinstance(op, BlockMeanSumLinearOperator)
        inv_quad, logdet = op.inv_quad_logdet(rhs, logdet=True)
        got = torch.autograd.grad(inv_quad + logdet, (U1, U2, d))
        dense = _dense(U1, U2, d)
        expected_value = (rhs * torch.linalg.solve(dense, rhs)).sum() + torch.logdet(dense)
        expected = torch.autograd.grad(expected_value, (U1, U2, d))
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)

    def test_large_n_takes_no_iterative_path(self):
        # past max_cholesky_size linear_operator's sum took CG for the solve and Lanczos for the log-determinant
        n = 3000
        U1, U2, d = _roots(n)
        op = DiagLinearOperator(d) + (LowRankRootLinearOperator(U1) + LowRankRootLinearOperator(U2))
        rhs = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        with closed_forms_only(n):
            inv_quad, logdet = op.inv_quad_logdet(rhs, logdet=True)
        # the Woodbury identity, formed here by hand: U = [U1 U2], K = D + U U^T
        U = torch.cat([U1, U2], -1)
        cap = torch.eye(7, dtype=torch.float64) + U.mT @ (U / d[:, None])
        dinv_b = rhs / d
        expected_quad = rhs @ dinv_b - (U.mT @ dinv_b) @ torch.linalg.solve(cap, U.mT @ dinv_b)
        expected_logdet = torch.log(d).sum() + torch.logdet(cap)
        torch.testing.assert_close(inv_quad, expected_quad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(logdet, expected_logdet, rtol=1e-10, atol=1e-9)

    def test_one_root_stays_linear_operators_woodbury(self):
        U1, _, d = _roots(30)
        op = LowRankRootLinearOperator(U1) + DiagLinearOperator(d)
        assert type(op) is LowRankRootAddedDiagLinearOperator

    @pytest.mark.parametrize("name", ["(R1 + R2) + D", "SumLinearOperator(R1, R2, D)"])
    def test_diagonal_with_a_zero_stays_linear_operators(self, name):
        # the closed form divides by the diagonal: with a zero in it (the roots still make the matrix positive
        # definite) the sum stays linear_operator's, which solves it densely, as before
        n = 20
        U1, U2, d = _roots(n)
        d = d.index_fill(0, torch.tensor([3]), 0.0)
        op = _SUMS[name](LowRankRootLinearOperator(U1), LowRankRootLinearOperator(U2), DiagLinearOperator(d))
        assert not isinstance(op, BlockMeanSumLinearOperator)
        rhs = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(op.solve(rhs), torch.linalg.solve(_dense(U1, U2, d), rhs), rtol=1e-8, atol=1e-8)

    def test_two_roots_alone_stay_a_plain_sum(self):
        U1, U2, _ = _roots(20)
        op = SumLinearOperator(LowRankRootLinearOperator(U1), LowRankRootLinearOperator(U2))
        assert type(op) is SumLinearOperator
