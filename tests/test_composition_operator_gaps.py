"""Gaps in the composition operators: a negative multiple's inv_quad, the task layouts' inv_quad and
inv_quad_logdet for every flag, and the Cholesky factor of the fallback sum and indexed operators."""

import warnings

import gpytorch
import pytest
import torch
from gpytorch.distributions import MultivariateNormal
from linear_operator.operators import (
    BlockDiagLinearOperator,
    BlockInterleavedLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
)

from bma_gp import (
    BlockMeanBlockDiagLinearOperator,
    BlockMeanInterleavedLinearOperator,
    BlockMeanLinearOperator,
    ClosedFormFallbackWarning,
    Partition,
)
from bma_gp._composition import FallbackIndexedLinearOperator, FallbackScaledLinearOperator, FallbackSumLinearOperator

torch.set_num_threads(1)
DT = torch.float64
P1 = Partition.from_labels(torch.tensor([2, 0, 2, 1, 0, 2, 3]))  # blocks 1 and 3 are singletons
P2 = Partition.from_labels(torch.tensor([0, 1, 1, 0, 2, 1, 1]))  # block 2 is a singleton


def _bm(partition, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    k = partition.num_blocks
    lam = torch.rand(*batch, k, dtype=DT, generator=g) + 0.5
    A = torch.randn(*batch, k, k, dtype=DT, generator=g)
    return BlockMeanLinearOperator(lam, A @ A.mT / k + 0.1 * torch.eye(k, dtype=DT), partition)


def _sum(batch=(), seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    noise = DiagLinearOperator(torch.rand(*batch, 7, dtype=DT, generator=g) + 0.3)
    return _bm(P1, batch, seed) + _bm(P2, batch, seed + 1) + noise


def _inv_quad(D, X, reduce=True):
    res = (X * torch.linalg.solve(D, X)).sum(-2)
    return res.sum(-1) if reduce else res


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("c", [-2.0, -0.5])
def test_negative_multiple_inv_quad_closed_form(batch, c):
    S = _sum(batch)
    F = S * c
    assert isinstance(F, FallbackScaledLinearOperator)
    D = F.to_dense()
    X = torch.randn(*batch, 7, 3, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = F.inv_quad(X)
        got_noreduce = F.inv_quad(X, reduce_inv_quad=False)
        from_sum = S.inv_quad(X) / c
    torch.testing.assert_close(got, _inv_quad(D, X))
    torch.testing.assert_close(got, from_sum)
    torch.testing.assert_close(got_noreduce, _inv_quad(D, X, reduce=False))
    torch.testing.assert_close(got, F.inv_quad_logdet(X, logdet=False)[0])
    v = torch.randn(7, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_v = F.inv_quad(v)
    torch.testing.assert_close(got_v, _inv_quad(D, v.expand(*batch, 7).unsqueeze(-1)))


def test_negative_multiple_inv_quad_checks_rhs():
    F = _sum() * -2.0
    with pytest.raises(ValueError, match="does not match"):  # the sum's own check
        F.inv_quad(torch.randn(5, 2, dtype=DT))


_LAYOUTS = [
    (BlockMeanBlockDiagLinearOperator, BlockDiagLinearOperator),
    (BlockMeanInterleavedLinearOperator, BlockInterleavedLinearOperator),
]


@pytest.mark.parametrize("layout", _LAYOUTS, ids=["blockdiag", "interleaved"])
@pytest.mark.parametrize("outer", [(), (2,)])
@pytest.mark.parametrize("base_kind", ["block_mean", "sum"])
@pytest.mark.parametrize("logdet", [False, True])
@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("with_rhs", [True, False])
def test_tasks_inv_quad_logdet_matches_plain(layout, outer, base_kind, logdet, reduce, with_rhs):
    cls, plain_cls = layout
    base = _bm(P1, outer + (3,)) if base_kind == "block_mean" else _sum(outer + (3,))
    op = cls(base)
    plain = plain_cls(DenseLinearOperator(base.to_dense()))
    X = torch.randn(*outer, 21, 2, dtype=DT) if with_rhs else None
    expected = plain.inv_quad_logdet(X, logdet=logdet, reduce_inv_quad=reduce)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = op.inv_quad_logdet(X, logdet=logdet, reduce_inv_quad=reduce)
    assert len(got) == 2
    for g, e in zip(got, expected):
        assert type(g) is type(e)
        if e is not None:
            assert g.shape == e.shape
            torch.testing.assert_close(g, e)
    D = plain.to_dense()
    if with_rhs:
        torch.testing.assert_close(got[0], _inv_quad(D, X, reduce))
    if logdet:
        torch.testing.assert_close(got[1], torch.logdet(D))


@pytest.mark.parametrize("layout", _LAYOUTS, ids=["blockdiag", "interleaved"])
@pytest.mark.parametrize("outer", [(), (2,)])
@pytest.mark.parametrize("base_kind", ["block_mean", "sum"])
def test_tasks_inv_quad_closed_form(layout, outer, base_kind):
    cls, plain_cls = layout
    base = _bm(P1, outer + (3,)) if base_kind == "block_mean" else _sum(outer + (3,))
    op = cls(base)
    D = plain_cls(DenseLinearOperator(base.to_dense())).to_dense()
    X = torch.randn(*outer, 21, 2, dtype=DT)
    v = torch.randn(21, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dense Cholesky of a task
        got = op.inv_quad(X)
        got_noreduce = op.inv_quad(X, reduce_inv_quad=False)
        got_v = op.inv_quad(v, reduce_inv_quad=False)
    torch.testing.assert_close(got, _inv_quad(D, X))
    torch.testing.assert_close(got_noreduce, _inv_quad(D, X, reduce=False))
    torch.testing.assert_close(got_v, _inv_quad(D, v.expand(*outer, 21).unsqueeze(-1), reduce=False))
    assert got_v.shape == outer + (1,)


def test_tasks_inv_quad_gradients_match_dense():
    lam = (torch.rand(3, 4, dtype=DT) + 0.5).requires_grad_()
    B = torch.eye(4, dtype=DT) * 0.7
    X = torch.randn(21, 2, dtype=DT)
    op = BlockMeanBlockDiagLinearOperator(BlockMeanLinearOperator(lam, B.expand(3, 4, 4), P1))
    iq, ld = op.inv_quad_logdet(X, logdet=True)
    (g,) = torch.autograd.grad(iq + ld, lam)
    lam2 = lam.detach().clone().requires_grad_()
    D = torch.block_diag(*BlockMeanLinearOperator(lam2, B.expand(3, 4, 4), P1).to_dense().unbind(0))
    (g2,) = torch.autograd.grad(_inv_quad(D, X) + torch.logdet(D), lam2)
    torch.testing.assert_close(g, g2)


def test_tasks_inv_quad_rejects_wrong_rhs():
    op = BlockMeanBlockDiagLinearOperator(_bm(P1, (3,)))
    with pytest.raises(RuntimeError):
        op.inv_quad(torch.randn(20, 2, dtype=DT))


def _fallbacks():
    M = _bm(P1)
    A = torch.randn(7, 7, dtype=DT, generator=torch.Generator().manual_seed(9))
    A = A @ A.mT + 7 * torch.eye(7, dtype=DT)
    idx = torch.tensor([3, 0, 5, 6])
    # the indexed fallbacks built directly over the same points on both sides: indexing (M[idx][:, idx]) now gives
    # the principal submatrix in the family, and other square indexings are singular or not symmetric
    return [M + DenseLinearOperator(A), _indexed_fallback(M, idx), _indexed_fallback(_sum(), idx)]


def _indexed_fallback(op, idx):
    rows = idx.view(-1, 1)
    ones = torch.ones(idx.numel(), 1, dtype=op.dtype)
    return FallbackIndexedLinearOperator(op, rows, ones, rows, ones)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["sum", "indexed", "indexed_sum"])
def test_fallback_cholesky_warns(which):
    op = _fallbacks()[which]
    assert isinstance(op, (FallbackSumLinearOperator, FallbackIndexedLinearOperator))
    D = op.to_dense()
    with pytest.warns(ClosedFormFallbackWarning, match="cholesky"):
        L = op.cholesky().to_dense()
    torch.testing.assert_close(L, torch.linalg.cholesky(D))
    with pytest.warns(ClosedFormFallbackWarning, match="cholesky"):
        op.cholesky()  # every factor asked for says so, as solve does


@pytest.mark.parametrize("which", [0, 1, 2], ids=["sum", "indexed", "indexed_sum"])
def test_fallback_log_prob_without_fast_computations_warns(which):
    op = _fallbacks()[which]
    m = op.shape[-1]
    y = torch.linspace(-1, 1, m, dtype=DT)
    D = op.to_dense()
    with gpytorch.settings.fast_computations(log_prob=False), pytest.warns(ClosedFormFallbackWarning):
        got = MultivariateNormal(torch.zeros(m, dtype=DT), op).log_prob(y)
    expected = torch.distributions.MultivariateNormal(torch.zeros(m, dtype=DT), D).log_prob(y)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["sum", "indexed", "indexed_sum"])
def test_fallback_solve_warns_once(which):
    # the Cholesky factor the generic solve takes is part of the solve's warning, not a second one
    op = _fallbacks()[which]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op.solve(torch.ones(op.shape[-1], 1, dtype=DT))
        op.inv_quad_logdet(torch.ones(op.shape[-1], 1, dtype=DT), logdet=True)
    assert sum(issubclass(w.category, ClosedFormFallbackWarning) for w in caught) == 2


def test_fallback_product_stays_silent():
    op = _fallbacks()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op @ torch.ones(7, 1, dtype=DT)
        op.diagonal()
