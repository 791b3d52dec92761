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

from bma_gp import BlockMeanSumLinearOperator, ClosedFormFallbackWarning
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


def _block_mean(n: int = 40, k: int = 6, seed: int = 0):
    from bma_gp import BlockMeanLinearOperator, Partition

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=gen)
    labels[:k] = torch.arange(k)  # every block occupied
    W = torch.randn(k, k, generator=gen, dtype=torch.float64)
    lam = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    return BlockMeanLinearOperator(lam, W @ W.T / k, Partition.from_labels(labels))


class TestOwnRootPlusMore:
    """``M.root_decomposition()`` (``RootLinearOperator(M^{1/2})``, equal to ``M``) plus a diagonal was
    linear_operator's ``AddedDiagLinearOperator``: CG and Lanczos past ``max_cholesky_size`` without a word (16% off at
    n = 2,000), a dense Cholesky below it; plus a block mean operator its root was formed densely (a capacitance of size
    ``n + k``). It is now ``M`` in each, and so is a sum's root."""

    @pytest.mark.parametrize(
        ("make", "scale"),
        [
            (lambda R, D: R + D, 1.0),
            (lambda R, D: D + R, 1.0),
            (lambda R, D: R.add_diagonal(D.diagonal()), 1.0),
            (lambda R, D: AddedDiagLinearOperator(R, D), 1.0),
            (lambda R, D: R * 2.0 + D, 2.0),
        ],
        ids=["R + D", "D + R", "R.add_diagonal", "AddedDiagLinearOperator(R, D)", "R * 2 + D"],
    )
    def test_block_mean_root_plus_diagonal(self, make, scale):
        M = _block_mean()
        n = M.shape[-1]
        d = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 1e-2 + 1e-3
        op = make(M.root_decomposition(), DiagLinearOperator(d))
        assert isinstance(op, BlockMeanSumLinearOperator), type(op).__name__
        dense = scale * M.to_dense() + torch.diag(d)
        rhs = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        with closed_forms_only(n):
            x = op.solve(rhs)
            logdet = op.logdet()
        torch.testing.assert_close(x, torch.linalg.solve(dense, rhs), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(logdet, torch.logdet(dense), rtol=1e-10, atol=1e-9)

    def test_block_mean_root_plus_block_mean_stays_small(self):
        from bma_gp import BlockMeanLinearOperator

        M = _block_mean()
        op = M.root_decomposition() + M
        assert isinstance(op, BlockMeanLinearOperator)  # 2 M over the same partition, not a sum with an n x n root
        torch.testing.assert_close(op.to_dense(), 2 * M.to_dense())

    def test_sum_root_plus_diagonal(self):
        M = _block_mean()
        S = M + _block_mean(seed=1) + DiagLinearOperator(torch.full((M.shape[-1],), 0.5, dtype=torch.float64))
        assert isinstance(S, BlockMeanSumLinearOperator)
        n = S.shape[-1]
        d = torch.full((n,), 0.25, dtype=torch.float64)
        op = S.root_decomposition() + DiagLinearOperator(d)
        assert isinstance(op, BlockMeanSumLinearOperator), type(op).__name__
        dense = S.to_dense() + torch.diag(d)
        rhs = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        with closed_forms_only(n):
            x = op.solve(rhs)
        torch.testing.assert_close(x, torch.linalg.solve(dense, rhs), rtol=1e-9, atol=1e-9)


class TestStoredNonsymmetricSummands:
    """A block mean operator plus, or elementwise times, one of linear_operator's operators that stores a matrix that
    is not symmetric (``TriangularLinearOperator``, ``DenseLinearOperator``) was a fallback solved by a Cholesky factor
    of one triangle (1-10% off, with a warning that promised the generic path); now LU, and the warning says why."""

    @pytest.mark.parametrize("how", ["+", "*"])
    @pytest.mark.parametrize("kind", ["triangular", "dense"])
    def test_solve_and_logdet(self, how, kind):
        from linear_operator.operators import DenseLinearOperator, TriangularLinearOperator

        M = _block_mean(n=30)
        n = M.shape[-1]
        gen = torch.Generator().manual_seed(8)
        if kind == "triangular":
            other = TriangularLinearOperator(
                torch.tril(torch.rand(n, n, generator=gen, dtype=torch.float64))
                + n * 0.2 * torch.eye(n, dtype=torch.float64)
            )
        else:
            other = DenseLinearOperator(
                torch.randn(n, n, generator=gen, dtype=torch.float64) + n * torch.eye(n, dtype=torch.float64)
            )
        op = M + other if how == "+" else M * other
        dense = op.to_dense()
        assert not torch.allclose(dense, dense.mT)
        rhs = torch.randn(n, 2, dtype=torch.float64, generator=gen)
        with pytest.warns(ClosedFormFallbackWarning, match="not symmetric"):
            x = op.solve(rhs)
        torch.testing.assert_close(x, torch.linalg.solve(dense, rhs), rtol=1e-9, atol=1e-9)
        with pytest.warns(ClosedFormFallbackWarning):
            logdet = op.logdet()
        sign, logabs = torch.linalg.slogdet(dense)
        expected = logabs if sign > 0 else torch.tensor(float("nan"), dtype=torch.float64)
        torch.testing.assert_close(logdet, expected, rtol=1e-9, atol=1e-9, equal_nan=True)

    def test_symmetric_dense_summand_keeps_cholesky(self):
        # a dense summand symmetric to rounding (a kernel matrix evaluated densely) is still solved as symmetric
        from linear_operator.operators import DenseLinearOperator

        M = _block_mean(n=30)
        n = M.shape[-1]
        A = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        K = A @ A.mT / n + torch.eye(n, dtype=torch.float64)
        K = K + 1e-14 * torch.triu(torch.ones_like(K), 1)  # rounding-size asymmetry
        op = M + DenseLinearOperator(K)
        assert not op._nonsymmetric()


class TestLowRankRootsEdgeCases:
    """What an attack on the routing of low-rank roots plus diagonals found: a batch of roots plus an unbatched
    diagonal became linear_operator's sum first and this package's sum when linear_operator rebuilt it
    (``AttributeError`` in ``logdet``); a tiny positive entry of the diagonal made the Woodbury form lose it (1e-40:
    a solve 7e22 off, silently)."""

    @pytest.mark.parametrize("batched", ["roots", "diagonal"])
    def test_broadcast_batches(self, batched):
        U1, U2, d = _roots(30, batch=(3,))
        if batched == "diagonal":
            U1, U2 = U1[0], U2[0]
        else:
            d = d[0]
        op = LowRankRootLinearOperator(U1) + LowRankRootLinearOperator(U2) + DiagLinearOperator(d)
        dense = _dense(U1, U2, d)
        rebuilt = op.representation_tree()(*op.representation())
        assert type(rebuilt) is type(op)
        torch.testing.assert_close(op.logdet(), torch.logdet(dense), rtol=1e-10, atol=1e-9)
        root = op.root_decomposition().root.to_dense()
        torch.testing.assert_close(root @ root.mT, dense, rtol=1e-9, atol=1e-9)

    @pytest.mark.parametrize("tiny", [1e-12, 1e-20, 1e-40, 1e-300])
    def test_tiny_diagonal_entry_keeps_a_dense_factorisation(self, tiny):
        n = 50
        U1, U2, d = _roots(n)
        d = d.index_fill(0, torch.tensor([3]), tiny)
        op = LowRankRootLinearOperator(U1) + LowRankRootLinearOperator(U2) + DiagLinearOperator(d)
        assert not isinstance(op, BlockMeanSumLinearOperator)
        dense = _dense(U1, U2, d)
        rhs = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
        expected = torch.linalg.solve(dense, rhs)
        torch.testing.assert_close(op.solve(rhs), expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item())
