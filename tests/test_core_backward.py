"""The core's log-determinant and solves differentiate in closed form (bma_gp/_core_backward.py): gradients and
second derivatives agree with dense linear algebra, and the factorisation's own backward is not in the graph."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from autograd_graph import graph_nodes
from bma_gp import BlockMeanLinearOperator, Partition

LAYOUTS = {
    "singletons_unequal_scattered": torch.tensor([0, 2, 1, 1, 3, 0, 2, 2, 4, 1, 0, 5]),
    "contiguous_unequal": torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3]),
    "all_singletons": torch.arange(5),
}


def _inputs(labels, dtype, batch=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = Partition.from_labels(labels)
    k, n = p.num_blocks, len(p)
    lam = (torch.rand(*batch, k, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    A = torch.randn(*batch, k, k, generator=gen, dtype=torch.float64)
    B = (A @ A.mT / k).to(dtype)
    rhs = torch.randn(n, 3, generator=gen, dtype=torch.float64).to(dtype)
    return p, lam, B, rhs


def _differentiates_the_factor(t):
    """Whether the graph of ``t`` runs torch's own Cholesky or Cholesky-solve backward."""
    names = {type(node).__name__ for node in graph_nodes(t)}
    return bool(names & {"LinalgCholeskyExBackward0", "LinalgCholeskyBackward0", "CholeskySolveBackward0"})


def _closed(p, lam, B, rhs):
    q, ld = BlockMeanLinearOperator(lam, B, p).inv_quad_logdet(rhs, logdet=True)
    return q.sum() + ld.sum()


def _dense(p, lam, B, rhs):
    M = BlockMeanLinearOperator(lam, B, p).to_dense()
    return (rhs * torch.linalg.solve(M, rhs)).sum() + torch.logdet(M).sum()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_inv_quad_logdet_gradients_match_dense(layout, dtype, batch):
    p, *values = _inputs(LAYOUTS[layout], dtype, batch)
    leaves = [v.clone().requires_grad_() for v in values]
    closed = _closed(p, *leaves)
    assert not _differentiates_the_factor(closed)
    got = torch.autograd.grad(closed, leaves)
    dense = [v.double().requires_grad_() for v in values]
    want = torch.autograd.grad(_dense(p, *dense), dense)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_solve_inverse_and_logdet_gradients_match_dense(layout):
    p, *values = _inputs(LAYOUTS[layout], torch.float64, (2,), seed=1)
    leaves = [v.clone().requires_grad_() for v in values]
    lam, B, rhs = leaves

    def closed():
        M = BlockMeanLinearOperator(lam, B, p)
        return (M.solve(rhs) * rhs.cos()).sum() + M.logdet().sum() + M.inverse().to_dense().square().sum()

    def dense():
        M = BlockMeanLinearOperator(lam, B, p).to_dense()
        return (torch.linalg.solve(M, rhs) * rhs.cos()).sum() + torch.logdet(M).sum() + M.inverse().square().sum()

    out = closed()
    assert not _differentiates_the_factor(out)
    for g, w in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(dense(), leaves)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_second_derivatives_match_dense():
    p, *values = _inputs(LAYOUTS["singletons_unequal_scattered"], torch.float64, seed=2)
    leaves = [v.clone().requires_grad_() for v in values]
    results = []
    for f in (_closed, _dense):
        grads = torch.autograd.grad(f(p, *leaves), leaves, create_graph=True)
        penalty = sum(
            (g * torch.linspace(0.5, 1.5, g.numel(), dtype=g.dtype).view(g.shape)).square().sum() for g in grads
        )
        results.append(torch.autograd.grad(penalty, leaves))
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    lam, B, rhs = leaves
    assert torch.autograd.gradgradcheck(lambda a, b, c: _closed(p, a, b, c), (lam, B, rhs))


def test_rhs_batch_broadcasts_against_an_unbatched_operator():
    p, lam, B, _ = _inputs(LAYOUTS["contiguous_unequal"], torch.float64, seed=3)
    rhs = torch.randn(4, len(p), 2, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (lam, B, rhs)]
    got = torch.autograd.grad(_closed(p, *leaves), leaves)
    want = torch.autograd.grad(_dense(p, *leaves), leaves)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_forward_mode_still_differentiates_the_factorisation():
    # a dual tensor takes the factorisation's own derivatives (the closed-form backward is reverse mode only)
    p, lam, B, rhs = _inputs(LAYOUTS["singletons_unequal_scattered"], torch.float64, seed=4)
    tangent = torch.randn_like(B)
    tangent = tangent + tangent.mT
    with fwAD.dual_level():
        dual = fwAD.make_dual(B, tangent)
        got = fwAD.unpack_dual(BlockMeanLinearOperator(lam, dual, p).logdet()).tangent
    want = torch.func.jvp(lambda b: torch.logdet(BlockMeanLinearOperator(lam, b, p).to_dense()), (B,), (tangent,))[1]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_vmap_over_right_hand_sides_with_parameters_that_require_grad():
    # torch refuses a Function without setup_context under any torch.func transform: vmap takes the factor's path
    p, lam, B, rhs = _inputs(LAYOUTS["singletons_unequal_scattered"], torch.float64, seed=5)
    lam, B = lam.requires_grad_(), B.requires_grad_()
    cols = rhs.mT.contiguous()  # (3, n)

    def objective(r):
        q, ld = BlockMeanLinearOperator(lam, B, p).inv_quad_logdet(r.unsqueeze(-1), logdet=True)
        return q.sum() + ld

    got = torch.func.vmap(objective)(cols)
    want = torch.stack([objective(r) for r in cols])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got.sum(), (lam, B))
    for g, w in zip(grads, torch.autograd.grad(want.sum(), (lam, B))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_second_derivatives_on_a_partition_of_large_contiguous_blocks():
    # the block sums of such a partition took segment_reduce, whose backward has no derivative
    labels = torch.repeat_interleave(torch.arange(12), torch.arange(16, 28))  # more runs than reshaped sums take
    p, *values = _inputs(labels, torch.float64, seed=6)
    leaves = [v.clone().requires_grad_() for v in values]
    results = []
    for f in (_closed, _dense):
        grads = torch.autograd.grad(f(p, *leaves), leaves, create_graph=True)
        results.append(torch.autograd.grad(sum(g.square().sum() for g in grads), leaves))
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)
