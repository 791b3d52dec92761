"""Several losses from one block mean sum, each with its own backward pass, as linear_operator's sums allow.

A sum folds its block offsets ``lam`` into the per-point diagonal when it is built (``P lam``); that node is shared by
every loss taken from the operator, and torch's ``index_select`` freed its saved index after the first backward pass,
so the second raised "Trying to backward through the graph a second time".
"""

from __future__ import annotations

import pytest
import torch
from linear_operator.operators import DiagLinearOperator, LowRankRootLinearOperator

from bma_gp import BlockMeanLinearOperator, Partition

DT = torch.float64
LABELS = torch.tensor([2, 0, 1, 0, 3, 1, 1, 0, 2, 4, 1])  # block 3 and 4 singletons, scattered


def _leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    k, n = int(LABELS.max()) + 1, LABELS.numel()
    lam = (torch.rand(k, dtype=DT, generator=g) + 0.5).requires_grad_()
    A = torch.randn(k, k, dtype=DT, generator=g)
    B = (A @ A.mT / k + 0.1 * torch.eye(k, dtype=DT)).requires_grad_()
    d = (torch.rand(n, dtype=DT, generator=g) + 0.3).requires_grad_()
    U = (0.3 * torch.randn(n, 2, dtype=DT, generator=g)).requires_grad_()
    return lam, B, d, U


def _build(kind, lam, B, d, U):
    M = BlockMeanLinearOperator(lam, B, Partition.from_labels(LABELS))
    if kind == "plus_diag":
        return DiagLinearOperator(d) + M
    if kind == "add_diagonal":
        return M.add_diagonal(d)
    return M + LowRankRootLinearOperator(U) + DiagLinearOperator(d)


def _dense(kind, lam, B, d, U):
    P = torch.nn.functional.one_hot(LABELS).to(DT)
    B = (B + B.mT) / 2  # a symmetric operator's B gets the symmetric part of its gradient
    M = P @ B @ P.mT + torch.diag(lam[LABELS])
    extra = U @ U.mT if kind == "low_rank" else 0
    return M + torch.diag(d) + extra


LOSSES = {
    "matmul": lambda S, x: (S @ x).sum(),
    "solve": lambda S, x: S.solve(x).sum(),
    "logdet": lambda S, x: S.logdet(),
    "inv_quad": lambda S, x: S.inv_quad(x),
    "diagonal": lambda S, x: S.diagonal().sum(),
}


@pytest.mark.parametrize("kind", ["plus_diag", "add_diagonal", "low_rank"])
@pytest.mark.parametrize(("first", "second"), [("matmul", "solve"), ("solve", "logdet"), ("diagonal", "inv_quad")])
def test_two_losses_from_one_sum_backward_separately(kind, first, second):
    x = torch.randn(LABELS.numel(), 2, dtype=DT, generator=torch.Generator().manual_seed(5))
    leaves = _leaves()
    S = _build(kind, *leaves)
    LOSSES[first](S, x).backward()
    LOSSES[second](S, x).backward()  # raised before: the fold's saved index was freed
    got = [t.grad.clone() for t in leaves if t.grad is not None]
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    dense = _dense(kind, *ref)
    from linear_operator.operators import DenseLinearOperator

    D = DenseLinearOperator(dense)
    (LOSSES[first](D, x) + LOSSES[second](D, x)).backward()
    want = [t.grad for t, leaf in zip(ref, leaves) if leaf.grad is not None]
    assert len(got) == len(want) >= 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_fold_keeps_forward_mode_and_second_derivatives():
    import torch.autograd.forward_ad as fwAD

    lam, B, d, _ = (t.detach() for t in _leaves())
    tangent = torch.randn_like(lam)
    with fwAD.dual_level():
        S = DiagLinearOperator(d) + BlockMeanLinearOperator(
            fwAD.make_dual(lam, tangent), B, Partition.from_labels(LABELS)
        )
        got = fwAD.unpack_dual(S.diagonal()).tangent
    torch.testing.assert_close(got, tangent[LABELS])
    lam = lam.clone().requires_grad_()
    (g,) = torch.autograd.grad(
        (DiagLinearOperator(d) + BlockMeanLinearOperator(lam, B, Partition.from_labels(LABELS)))
        .diagonal()
        .pow(2)
        .sum(),
        lam,
        create_graph=True,
    )
    (h,) = torch.autograd.grad(g.sum(), lam)
    counts = torch.bincount(LABELS).to(DT)
    torch.testing.assert_close(h, 2 * counts)  # d/dlam_j of sum_i 2 (d_i + lam_{c_i} + B_{c_i c_i}) [c_i = j]
