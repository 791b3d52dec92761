"""Audit of the three block mean operators against linear_operator's public LinearOperator API.

Each check compares a public method with the same computation on the dense matrix (float64, a partition with a
singleton and unequal blocks) and, where the docs promise a closed form, runs it inside the closed-form guard.
"""

import pytest
import torch
from linear_operator.operators import (
    ConstantDiagLinearOperator,
    DiagLinearOperator,
    IdentityLinearOperator,
    LowRankRootLinearOperator,
)

import bma_gp
from bma_gp import BlockMeanLinearOperator, Partition
from closed_form_guard import closed_forms_only

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


# ---------------------------------------------------------------------------- repeat
def _sum(batch_shape=()):
    gen = torch.Generator().manual_seed(8)
    d = torch.rand(*batch_shape, N, generator=gen, dtype=torch.float64) + 0.5
    U = torch.randn(*batch_shape, N, 2, generator=gen, dtype=torch.float64)
    M, M2 = _block_mean(LABELS, batch_shape, 1), _block_mean(LABELS2, batch_shape, 2)
    return M + M2 + LowRankRootLinearOperator(U) + DiagLinearOperator(d)


@pytest.mark.parametrize("batch_shape", BATCHES)
@pytest.mark.parametrize("make", [_block_mean, _sum, _product], ids=["block mean", "sum", "product"])
def test_repeat_stays_closed_form(make, batch_shape):
    # was: linear_operator's BatchRepeatLinearOperator, whose solve, inv_quad and roots Cholesky-factorise the dense
    # n x n matrix (a ClosedFormFallbackWarning for the block mean operator and the sum, a ValueError for the product)
    op = make(LABELS, batch_shape, 1) if make is _block_mean else make(batch_shape)
    sizes = (2, 3, *[1] * len(batch_shape), 1, 1)
    res = op.repeat(*sizes)
    assert type(res) is type(op)
    want = op.to_dense().repeat(*sizes)
    rhs = torch.randn(*res.shape[:-1], 2, dtype=torch.float64)
    torch.testing.assert_close(res.to_dense(), want)
    with closed_forms_only(N):
        got = res.solve(rhs), res.logdet(), res.inv_quad(rhs, reduce_inv_quad=False)
    torch.testing.assert_close(got[0], torch.linalg.solve(want, rhs))
    torch.testing.assert_close(got[1], torch.logdet(want))
    torch.testing.assert_close(got[2], (rhs * torch.linalg.solve(want, rhs)).sum(-2))
    if batch_shape:  # repeating the batch dimensions themselves
        sizes = (*[2] * len(batch_shape), 1, 1)
        torch.testing.assert_close(op.repeat(*sizes).to_dense(), op.to_dense().repeat(*sizes))
    with pytest.raises(RuntimeError, match="Invalid repeat"):
        op.repeat(2, 2, 1)


def test_repeat_keeps_gradients():
    lam = (torch.rand(4, dtype=torch.float64) + 1).requires_grad_()
    B = torch.eye(4, dtype=torch.float64).requires_grad_()
    op = BlockMeanLinearOperator(lam, B, Partition.from_labels(torch.tensor(LABELS)))
    op.repeat(3, 1, 1).logdet().sum().backward()
    grads = lam.grad.clone(), B.grad.clone()
    lam.grad, B.grad = None, None
    (3 * op.logdet()).backward()
    torch.testing.assert_close(grads, (lam.grad, B.grad))


# ---------------------------------------------------------------------------- elementwise product with the identity
@pytest.mark.parametrize("batch_shape", BATCHES)
@pytest.mark.parametrize("make", [_block_mean, _sum, _product], ids=["block mean", "sum", "product"])
def test_elementwise_product_with_identity_is_the_diagonal(make, batch_shape):
    # was: op * IdentityLinearOperator(n) returned op itself (IdentityLinearOperator._mul_matrix(op) is op)
    op = make(LABELS, batch_shape, 1) if make is _block_mean else make(batch_shape)
    eye = torch.eye(N, dtype=torch.float64)
    for other in (
        IdentityLinearOperator(N, dtype=torch.float64),
        IdentityLinearOperator(N, batch_shape=torch.Size([3, *batch_shape]), dtype=torch.float64),
        ConstantDiagLinearOperator(torch.full((1,), 2.0, dtype=torch.float64), N),
    ):
        res = op * other
        assert isinstance(res, DiagLinearOperator)
        torch.testing.assert_close(res.to_dense(), op.to_dense() * other.to_dense())
    torch.testing.assert_close((op * IdentityLinearOperator(N, dtype=torch.float64)).to_dense(), op.to_dense() * eye)


@pytest.mark.parametrize("batch_shape", BATCHES)
def test_product_times_a_batch_of_constants_stays_a_product(batch_shape):
    # was: a (3, *batch, 1, 1) tensor (other batch dimensions than the product's) became the dense elementwise
    # product, a DenseLinearOperator of a non-symmetric matrix, whose solve and logdet took a Cholesky factor
    op = _product(batch_shape)
    c = torch.rand(3, *[1] * len(batch_shape), 1, 1, dtype=torch.float64) + 0.5
    res = op * c
    assert isinstance(res, bma_gp.BlockMeanProductLinearOperator)
    want = op.to_dense() * c
    rhs = torch.randn(*want.shape[:-1], 2, dtype=torch.float64)
    torch.testing.assert_close(res.to_dense(), want)
    with closed_forms_only(N):
        got = res.solve(rhs), res.logdet()
    torch.testing.assert_close(got[0], torch.linalg.solve(want, rhs))
    torch.testing.assert_close(got[1], torch.logdet(want))


# ---------------------------------------------------------------------------- requires_grad_ after cached results
def _grad_calls(rhs):
    return {
        "logdet": lambda op: op.logdet().sum(),
        "solve": lambda op: op.solve(rhs).sum(),
        "inv_quad_logdet": lambda op: sum(t.sum() for t in op.inv_quad_logdet(rhs, logdet=True)),
        "root_decomposition": lambda op: op.root_decomposition().root.to_dense().pow(2).sum(),
        "root_inv_decomposition": lambda op: op.root_inv_decomposition().root.to_dense().pow(2).sum(),
    }


_CASES = [(make, call) for make in (_block_mean, _sum) for call in _grad_calls(None)]
_CASES += [(_product, call) for call in ("logdet", "solve", "inv_quad_logdet")]  # a product has no root


@pytest.mark.parametrize(("make", "call"), _CASES, ids=[f"{make.__name__}-{call}" for make, call in _CASES])
def test_requires_grad_after_a_cached_result_gives_gradients(make, call):
    # was: a result computed (and stored) before op.requires_grad_(True) was returned again afterwards, without a
    # graph: backward raised (block mean operator, product) or silently left some tensors without a gradient (sum)
    op = make(LABELS, (2,), 1) if make is _block_mean else make((2,))
    rhs = torch.randn(2, N, 2, dtype=torch.float64)
    fn = _grad_calls(rhs)[call]
    before = fn(op)  # stored: no tensor requires gradients yet
    assert op.requires_grad_(True) is op
    again = fn(op)
    torch.testing.assert_close(again.detach(), before)
    again.backward()
    twin = (make(LABELS, (2,), 1) if make is _block_mean else make((2,))).requires_grad_(True)
    fn(twin).backward()  # a fresh operator, nothing stored
    for arg, ref in zip(op.representation(), twin.representation()):
        assert arg.grad is not None
        torch.testing.assert_close(arg.grad, ref.grad)


def test_a_product_fallback_that_is_symmetric_after_all_gives_its_spectrum_and_cholesky():
    """linear_operator whitens Kronecker factors as ``L^{-1} A L^{-T}`` (a MultitaskKernel around a BlockMeanKernel):
    a product that is symmetric. The non-symmetric fallbacks refused its eigendecomposition outright; they now read
    the dense matrix, which they factorise anyway, and refuse only a matrix that is not symmetric."""
    from linear_operator.operators import DenseLinearOperator

    from bma_gp._composition import FallbackMatmulLinearOperator

    M = _block_mean(LABELS)
    L = torch.linalg.cholesky(_block_mean(LABELS2).to_dense())
    whitened = FallbackMatmulLinearOperator(DenseLinearOperator(L.mT), M @ DenseLinearOperator(L))  # L^T M L
    dense = L.mT @ M.to_dense() @ L
    with pytest.warns(bma_gp.ClosedFormFallbackWarning):
        evals, _ = whitened._symeig(eigenvectors=True)
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(dense), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(whitened.cholesky().to_dense(), torch.linalg.cholesky(dense), rtol=1e-8, atol=1e-10)
    skewed = FallbackMatmulLinearOperator(DenseLinearOperator(L), M @ DenseLinearOperator(L))  # L M L: not symmetric
    with pytest.raises(ValueError, match="not symmetric"):
        skewed._symeig(eigenvectors=True)
