"""The capacitance with the root's block eliminated first (``_NestedLU``, used from ``NESTED_MIN_SIZE`` on) against
dense float64 linear algebra and autograd, at sizes where it is forced on (and, for comparison, off)."""

from __future__ import annotations

import pytest
import torch

import bma_gp.block_mean_sum_linear_operator as bms
from bma_gp import BlockMeanSumLinearOperator, Partition

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems

N = 60


def inputs(batch: tuple[int, ...], dense_second: bool):
    gen = torch.Generator().manual_seed(7)
    p1 = Partition.from_labels(torch.randperm(N, generator=gen) % 7)
    p2 = Partition.from_labels(torch.randperm(N, generator=gen) % 11)
    W = torch.randn(*batch, 7, 7, generator=gen, dtype=torch.float64)
    leaves = {
        "d": torch.rand(*batch, N, generator=gen, dtype=torch.float64) + 0.5,
        "B1": W @ W.mT / 7 + 0.1 * torch.eye(7, dtype=torch.float64),
        "B2": torch.rand(*batch, 11, generator=gen, dtype=torch.float64) + 0.1,
        "U": torch.randn(*batch, N, 5, generator=gen, dtype=torch.float64) / 2,
    }
    if dense_second:  # no diagonal term: nothing eliminated, the root's block still goes first
        leaves["B2"] = torch.diag_embed(leaves["B2"]) + 0.05
    return p1, p2, {k: v.requires_grad_(True) for k, v in leaves.items()}


def build(p1, p2, x, dense_second):
    return BlockMeanSumLinearOperator(
        x["d"], x["B1"], x["B2"], partitions=[p1, p2], root=x["U"], diagonal=[False, not dense_second]
    )


def dense(p1, p2, x, dense_second):
    Z1 = torch.nn.functional.one_hot(p1.labels, 7).to(torch.float64)
    Z2 = torch.nn.functional.one_hot(p2.labels, 11).to(torch.float64)
    B1 = 0.5 * (x["B1"] + x["B1"].mT)
    B2 = 0.5 * (x["B2"] + x["B2"].mT) if dense_second else torch.diag_embed(x["B2"])
    return torch.diag_embed(x["d"]) + Z1 @ B1 @ Z1.T + Z2 @ B2 @ Z2.T + x["U"] @ x["U"].mT


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("dense_second", [False, True])
@pytest.mark.parametrize("nested", [True, False])
def test_inv_quad_logdet_solve_and_gradients(monkeypatch, batch, dense_second, nested):
    monkeypatch.setattr(bms, "NESTED_MIN_SIZE", 0 if nested else 10**9)
    spy = []
    monkeypatch.setattr(bms.BlockMeanSumLinearOperator, "_factorise_nested", _spy(spy))
    p1, p2, x = inputs(batch, dense_second)
    y = torch.randn(*batch, N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    M = build(p1, p2, x, dense_second)
    quad, logdet = M.inv_quad_logdet(y, logdet=True)
    solved = M.solve(y)
    assert bool(spy) == nested
    K = dense(p1, p2, x, dense_second)
    want_quad = (y * torch.linalg.solve(K, y)).sum((-2, -1))
    want_logdet = torch.linalg.slogdet(K)[1]
    torch.testing.assert_close(quad, want_quad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet, want_logdet, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(solved, torch.linalg.solve(K, y), rtol=1e-10, atol=1e-10)
    leaves = list(x.values())
    got = torch.autograd.grad((quad + logdet).sum() + solved.sum(), leaves)
    want = torch.autograd.grad((want_quad + want_logdet).sum() + torch.linalg.solve(K, y).sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_unpacking_forms_the_whole_factors_in_the_capacitance_mode(monkeypatch):
    """``*cap.lu`` (the prediction strategies) gives the LU factors of the whole ``S``, with the graph of the mode
    the capacitance was built in."""
    monkeypatch.setattr(bms, "NESTED_MIN_SIZE", 0)
    p1, p2, x = inputs((), False)
    M = build(p1, p2, x, False)
    cap = M._capacitance()
    assert isinstance(cap.lu, bms._NestedLU)
    rhs = torch.randn(cap.lu.A1R.shape[-2] + 5, 3, dtype=torch.float64)
    with torch.no_grad():
        S, LU, pivots = cap.lu
    assert S.requires_grad  # formed with gradients, as the capacitance was
    torch.testing.assert_close(torch.linalg.lu_solve(LU, pivots, rhs), cap.lu.solve(rhs).detach())


def _spy(calls):
    original = bms.BlockMeanSumLinearOperator._factorise_nested

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    return spy
