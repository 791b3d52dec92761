"""Gradients of the closed forms against dense references, and second derivatives: right or refused in words."""

from __future__ import annotations

import pytest
import torch

from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, Partition

DT = torch.float64


def _spd(k: int) -> torch.Tensor:
    A = torch.randn(k, k, dtype=DT) * 0.3
    return (A @ A.mT + 0.5 * torch.eye(k, dtype=DT)).requires_grad_()


def _block_mean():
    torch.manual_seed(0)
    p = Partition.from_labels(torch.tensor([0, 1, 2, 0, 1, 0, 2, 2, 0, 1, 3, 0, 4]))
    lam = (torch.rand(p.num_blocks, dtype=DT) + 1.0).requires_grad_()
    return p, lam, _spd(p.num_blocks)


def _sum(root: bool):
    torch.manual_seed(0)
    p1 = Partition.from_labels(torch.tensor([0, 1, 2, 0, 1, 0, 2, 2, 0, 1, 3, 0, 4, 1]))
    p2 = Partition.from_labels(torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2, 2, 0]))
    d = (torch.rand(14, dtype=DT) + 0.5).requires_grad_()
    B1, B2 = _spd(p1.num_blocks), _spd(p2.num_blocks)
    U = (torch.randn(14, 2, dtype=DT) * 0.5).requires_grad_() if root else None
    return BlockMeanSumLinearOperator(d, B1, B2, partitions=[p1, p2], root=U), (d, B1, B2)


def test_block_mean_gradients_match_dense():
    p, lam, B = _block_mean()
    rhs = torch.randn(len(p), 2, dtype=DT, requires_grad=True)
    P = torch.nn.functional.one_hot(p.labels, p.num_blocks).to(DT)
    ours = BlockMeanLinearOperator(lam, B, p).inv_quad_logdet(rhs, logdet=True)
    dense = torch.diag(lam[p.labels]) + P @ ((B + B.mT) / 2) @ P.T
    ref = (rhs * torch.linalg.solve(dense, rhs)).sum(), torch.logdet(dense)
    g1 = torch.autograd.grad(ours[0] + ours[1], (lam, B, rhs))
    g2 = torch.autograd.grad(ref[0] + ref[1], (lam, B, rhs))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("root", [False, True])
@pytest.mark.parametrize("what", ["logdet", "solve"])
def test_sum_second_derivatives_are_refused_not_wrong(root, what):
    # create_graph=True went through the capacitance's first-order backward and treated its factors as
    # constants: a Hessian-vector product of the log-determinant came back wrong without a word (no root), or
    # failed inside index_select (root)
    M, (d, B1, B2) = _sum(root)
    rhs = torch.randn(14, 2, dtype=DT)
    out = M.logdet() if what == "logdet" else M.solve(rhs).sum()
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(out, (d, B1, B2), create_graph=True)


@pytest.mark.parametrize(
    "fn",
    [
        lambda M: M.root_decomposition().root.to_dense().sum(),
        lambda M: M.root_inv_decomposition().root.to_dense().sum(),
        lambda M: M.sqrt_inv_matmul(torch.ones(M.shape[-1], 1, dtype=DT)).sum(),
        lambda M: M.matrix_sqrt().to_dense().sum(),
    ],
)
def test_matrix_function_second_derivatives_are_refused_not_wrong(fn):
    # the eigendecomposition's backward used its eigenvalues and vectors as constants: gradgradcheck failed
    # (a wrong Hessian) with no error
    p, lam, B = _block_mean()
    out = fn(BlockMeanLinearOperator(lam, B, p))
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(out, (lam, B), create_graph=True)


def test_block_mean_second_derivatives_stay_exact():
    # inv_quad_logdet and solve of the block mean operator are plain torch operations: twice differentiable,
    # so a Hessian-vector product matches the dense one
    p, lam, B = _block_mean()
    rhs = torch.randn(len(p), 2, dtype=DT, requires_grad=True)
    P = torch.nn.functional.one_hot(p.labels, p.num_blocks).to(DT)

    def ours():
        M = BlockMeanLinearOperator(lam, B, p)
        inv_quad, logdet = M.inv_quad_logdet(rhs, logdet=True)
        return inv_quad + logdet + M.solve(rhs).sum()

    def dense():
        M = torch.diag(lam[p.labels]) + P @ ((B + B.mT) / 2) @ P.T
        return (rhs * torch.linalg.solve(M, rhs)).sum() + torch.logdet(M) + torch.linalg.solve(M, rhs).sum()

    hvps = []
    for loss in (ours, dense):
        grads = torch.autograd.grad(loss(), (lam, B, rhs), create_graph=True)
        hvps.append(torch.autograd.grad(sum((g * g).sum() for g in grads), (lam, B, rhs)))
    for a, b in zip(*hvps):
        torch.testing.assert_close(a, b)


def test_sum_first_derivatives_match_dense():
    M, (d, B1, B2) = _sum(True)
    U = M.root
    assert U is not None
    rhs = torch.randn(14, 2, dtype=DT, requires_grad=True)
    P1, P2 = (torch.nn.functional.one_hot(q.labels, q.num_blocks).to(DT) for q in M.partitions)
    dense = torch.diag(d) + P1 @ ((B1 + B1.mT) / 2) @ P1.T + P2 @ ((B2 + B2.mT) / 2) @ P2.T + U @ U.mT
    inv_quad, logdet = M.inv_quad_logdet(rhs, logdet=True)
    ref = (rhs * torch.linalg.solve(dense, rhs)).sum() + torch.logdet(dense)
    inputs = (d, B1, B2, U, rhs)
    for a, b in zip(torch.autograd.grad(inv_quad + logdet, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(a, b)


def _dense_block_mean(K: torch.Tensor, p: Partition) -> torch.Tensor:
    """The Frobenius-nearest block mean matrix of ``K``, formed densely (SPEC section 2)."""
    P = torch.nn.functional.one_hot(p.labels, p.num_blocks).to(K.dtype)
    s = P.sum(0)
    T, d = P.T @ K @ P, P.T @ torch.diagonal(K)
    within = s * (s - 1)
    B_ii = torch.where(within > 0, (torch.diagonal(T) - d) / within.clamp_min(1), torch.diagonal(T))
    B = T / (s[:, None] * s[None, :])
    B = B - torch.diag(torch.diagonal(B)) + torch.diag(B_ii)
    lam = d / s - B_ii
    return torch.diag(lam[p.labels]) + P @ B @ P.T


@pytest.mark.parametrize("fused", [None, False])
def test_kernel_block_mean_under_functional_call_differentiates_the_bound_parameters(fused):
    # the generic engine's backward evaluated the kernel again with the module's own parameters: under
    # torch.func.functional_call the tensors passed in got a gradient of 0 (and the values were another kernel's)
    import gpytorch

    from bma_gp import kernel_block_mean

    p = Partition.from_labels(torch.tensor([0, 1, 2, 0, 1, 0, 2, 2, 0, 1, 3, 0, 4, 1, 2]))
    x = torch.rand(15, 1, dtype=DT, generator=torch.Generator().manual_seed(3))
    r = torch.randn(15, 2, dtype=DT, generator=torch.Generator().manual_seed(4))

    class Loss(torch.nn.Module):
        def __init__(self, dense: bool):
            super().__init__()
            self.kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.PeriodicKernel()).to(DT)
            self.dense = dense

        def forward(self, x):
            if self.dense:
                M = _dense_block_mean(self.kernel(x).to_dense(), p)
            else:
                M = kernel_block_mean(self.kernel, x, p, fused=fused).to_dense()
            return (M @ r).pow(2).sum()

    names = [name for name, _ in Loss(False).named_parameters()]
    values = {name: torch.rand((), dtype=DT) + 0.5 for name in names}
    grads = []
    for dense in (False, True):
        bound = {name: values[name].expand_as(q).clone().requires_grad_() for name, q in Loss(dense).named_parameters()}
        loss = torch.func.functional_call(Loss(dense), bound, (x,))
        grads.append(torch.autograd.grad(loss, list(bound.values())))
    for a, b in zip(*grads):
        assert b.abs().max() > 1e-6
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("root", [False, True])
def test_sum_row_weight_gradients_are_right(root):
    # the root's products (_RootGram) took the row weights (random-slope covariates) as constants: with a root,
    # the weights' gradient was off by about half its size, silently; then it was refused (NotImplementedError), which
    # also refused a trainable task kernel times a sum with a root (its Cholesky rows are row weights); now the root's
    # products with differentiated weights are plain torch operations
    torch.manual_seed(0)
    p1 = Partition.from_labels(torch.tensor([0, 1, 2, 0, 1, 0, 2, 2, 0, 1, 3, 0, 4, 1]))
    p2 = Partition.from_labels(torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2, 2, 0]))
    d = torch.rand(14, dtype=DT) + 0.5
    B1, B2 = torch.eye(5, dtype=DT) * 0.7, torch.eye(3, dtype=DT) * 0.4 + 0.1
    w = (torch.rand(14, dtype=DT) + 0.5).requires_grad_()
    U = torch.randn(14, 2, dtype=DT) * 0.3 if root else None
    r = torch.randn(14, 2, dtype=DT)
    M = BlockMeanSumLinearOperator(d, B1, B2, partitions=[p1, p2], weights=[None, w], root=U)
    inv_quad, logdet = M.inv_quad_logdet(r, logdet=True)
    P1, P2 = (torch.nn.functional.one_hot(q.labels, q.num_blocks).to(DT) for q in (p1, p2))
    W2 = w[:, None] * P2
    dense = torch.diag(d) + P1 @ B1 @ P1.T + W2 @ B2 @ W2.T
    if U is not None:
        dense = dense + U @ U.T
    ref = (r * torch.linalg.solve(dense, r)).sum() + torch.logdet(dense)
    torch.testing.assert_close(torch.autograd.grad(inv_quad + logdet, w)[0], torch.autograd.grad(ref, w)[0])
