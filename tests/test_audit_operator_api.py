"""Audit of the three block mean operators against linear_operator's public LinearOperator API.

Each check compares a public method with the same computation on the dense matrix (float64, a partition with a
singleton and unequal blocks) and, where the docs promise a closed form, runs it inside the closed-form guard.
"""

import pytest
import torch

import bma_gp
from bma_gp import BlockMeanLinearOperator, Partition

LABELS = [0, 1, 0, 2, 1, 1, 3, 0, 2, 1, 0, 2]  # unequal blocks, block 3 a singleton
LABELS2 = [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 4, 4]
N = len(LABELS)
BATCHES = [(), (2,), (2, 1)]


def _block_mean(labels, batch_shape=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    partition = Partition.from_labels(torch.tensor(labels))
    k = partition.num_blocks
    root = torch.randn(*batch_shape, k, k, generator=gen, dtype=torch.float64)
    B = root @ root.mT / k + 0.1
    lam = torch.rand(*batch_shape, k, generator=gen, dtype=torch.float64) + 1.0
    return BlockMeanLinearOperator(lam, B, partition)


def _product(batch_shape=()):
    return _block_mean(LABELS, batch_shape, 1) @ _block_mean(LABELS2, batch_shape, 2)


def _nonsymmetric_fallbacks(batch_shape):
    """Operators without a closed form that are known not to be symmetric (they hold a product over two partitions)."""
    P = _product(batch_shape)
    M, N2 = _block_mean(LABELS, batch_shape, 3), _block_mean(LABELS2, batch_shape, 4)
    return {
        "product + diagonal": P.add_diagonal(torch.tensor(0.3, dtype=torch.float64)),
        "rows of a product": P[..., torch.tensor([0, 1, 2, 5, 9]), :][..., torch.tensor([0, 1, 2, 5, 9])],
        "product of a block mean and a sum": M @ (M + N2),
    }


# ---------------------------------------------------------------------------- non-symmetric fallbacks
@pytest.mark.parametrize("batch_shape", BATCHES)
@pytest.mark.parametrize("which", ["product + diagonal", "rows of a product", "product of a block mean and a sum"])
def test_nonsymmetric_fallback_inv_quad_is_b_solve_b(which, batch_shape):
    # was: linear_operator's inv_quad Cholesky-factorised one triangle of the matrix: a wrong value, silently
    op = _nonsymmetric_fallbacks(batch_shape)[which]
    dense = op.to_dense()
    assert not torch.allclose(dense, dense.mT)
    rhs = torch.randn(*op.batch_shape, op.shape[-1], 3, dtype=torch.float64)
    want = (rhs * torch.linalg.solve(dense, rhs)).sum(-2)
    with pytest.warns(bma_gp.ClosedFormFallbackWarning, match="not symmetric.*LU"):
        got = op.inv_quad(rhs, reduce_inv_quad=False)
    torch.testing.assert_close(got, want)
    with pytest.warns(bma_gp.ClosedFormFallbackWarning):
        torch.testing.assert_close(op.inv_quad(rhs), want.sum(-1))
    if not batch_shape:
        v = rhs[..., 0]
        with pytest.warns(bma_gp.ClosedFormFallbackWarning):
            torch.testing.assert_close(op.inv_quad(v), v @ torch.linalg.solve(dense, v))


@pytest.mark.parametrize("which", ["product + diagonal", "rows of a product", "product of a block mean and a sum"])
def test_nonsymmetric_fallback_refuses_symmetric_factorisations(which):
    # was: cholesky, sqrt_inv_matmul and eigvalsh / eigh read one triangle and returned the factor or the spectrum
    # of another matrix (eigvalsh with a warning, the others silently)
    op = _nonsymmetric_fallbacks(())[which]
    rhs = torch.randn(op.shape[-1], 2, dtype=torch.float64)
    for call in (
        lambda: op.cholesky(),
        lambda: op.sqrt_inv_matmul(rhs),
        lambda: op.eigvalsh(),
        lambda: op.eigh(),
        lambda: op.diagonalization(),
    ):
        with pytest.raises(ValueError, match="not symmetric"):
            call()


@pytest.mark.parametrize("batch_shape", BATCHES)
@pytest.mark.parametrize("which", ["product + diagonal", "rows of a product", "product of a block mean and a sum"])
def test_nonsymmetric_fallback_svd_is_the_dense_svd(which, batch_shape):
    # was: linear_operator's svd is built from the symmetric eigendecomposition (of one triangle)
    op = _nonsymmetric_fallbacks(batch_shape)[which]
    dense = op.to_dense()
    with pytest.warns(bma_gp.ClosedFormFallbackWarning, match="svd"):
        U, S, V = op.svd()
    torch.testing.assert_close(S.sort(-1).values, torch.linalg.svdvals(dense).sort(-1).values)
    torch.testing.assert_close((U.to_dense() * S.unsqueeze(-2)) @ V.to_dense().mT, dense)


# ---------------------------------------------------------------------------- sums with a non-symmetric operator
def _nonsymmetric_block_mean(batch_shape):
    M = _block_mean(LABELS, batch_shape, 5)
    gen = torch.Generator().manual_seed(6)
    skew = 0.2 * torch.randn(*batch_shape, 4, 4, generator=gen, dtype=torch.float64)
    return BlockMeanLinearOperator(M.lam, M.B + skew, M.partition, symmetric=False)


@pytest.mark.parametrize("batch_shape", BATCHES)
@pytest.mark.parametrize("make", [_nonsymmetric_block_mean, _product], ids=["symmetric=False", "product"])
def test_nonsymmetric_add_diagonal_and_add_low_rank_are_fallback_sums(make, batch_shape):
    # was: add_diagonal(d) of a symmetric=False operator raised "expected ... (*batch, 12), got (12,)", and
    # add_low_rank(U) of either raised about root_decomposition, where `op + DiagLinearOperator(d)` and
    # `op + LowRankRootLinearOperator(U)` give the documented fallback sums (solved by LU, with a warning)
    op = make(batch_shape)
    gen = torch.Generator().manual_seed(7)
    d = torch.rand(*batch_shape, N, generator=gen, dtype=torch.float64) + 0.2
    U = torch.randn(*batch_shape, N, 2, generator=gen, dtype=torch.float64)
    rhs = torch.randn(*batch_shape, N, 2, generator=gen, dtype=torch.float64)
    for res, want in (
        (op.add_diagonal(d), op.to_dense() + torch.diag_embed(d)),
        (op.add_low_rank(U), op.to_dense() + U @ U.mT),
    ):
        assert isinstance(res, bma_gp.FallbackSumLinearOperator)
        torch.testing.assert_close(res.to_dense(), want)
        with pytest.warns(bma_gp.ClosedFormFallbackWarning, match="not symmetric"):
            torch.testing.assert_close(res.solve(rhs), torch.linalg.solve(want, rhs))
        with pytest.warns(bma_gp.ClosedFormFallbackWarning, match="not symmetric"):
            torch.testing.assert_close(res.logdet(), torch.logdet(want))
    with pytest.raises(ValueError, match="add_diagonal"):
        _nonsymmetric_block_mean(batch_shape).add_diagonal(torch.ones(N + 1, dtype=torch.float64))
