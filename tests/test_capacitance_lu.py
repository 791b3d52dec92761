"""The capacitance's LU solve and log-determinant with hand-written gradients (``_LUSolve``, ``_LULogAbsDet``).

Their backward passes replace differentiation through ``torch.linalg.lu_factor``; they are checked here against
that reference and ``gradcheck``, including broadcasting between the factors and the right-hand sides.
"""

from __future__ import annotations

import pytest
import torch

from bma_gp.block_mean_sum_linear_operator import _LULogAbsDet, _LUSolve


def _matrix(*batch: int, r: int = 6, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # non-symmetric, well conditioned, with a negative determinant in some batches (pivoting exercised)
    S = torch.randn(*batch, r, r, generator=gen, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    return S[..., torch.randperm(r, generator=gen), :].requires_grad_(True)


def _ours(S: torch.Tensor, rhs: torch.Tensor):
    LU, pivots = torch.linalg.lu_factor(S.detach())
    return _LUSolve.apply(S, LU, pivots, rhs), _LULogAbsDet.apply(S, LU, pivots)


def _reference(S: torch.Tensor, rhs: torch.Tensor):
    LU, pivots = torch.linalg.lu_factor(S)
    batch = torch.broadcast_shapes(S.shape[:-2], rhs.shape[:-2])
    x = torch.linalg.lu_solve(
        LU.expand(*batch, *LU.shape[-2:]), pivots.expand(*batch, pivots.shape[-1]), rhs.expand(*batch, *rhs.shape[-2:])
    )
    return x, torch.linalg.slogdet(S)[1]


@pytest.mark.parametrize(
    "s_batch, rhs_batch",
    [((), ()), ((3,), ()), ((), (2,)), ((2, 3), (3,)), ((3,), (2, 1)), ((1,), (4,))],
    ids=["plain", "batched-factors", "batched-rhs", "both", "rhs-broadcast", "singleton-factor"],
)
def test_values_and_gradients_match_differentiating_through_lu(s_batch, rhs_batch):
    S = _matrix(*s_batch)
    rhs = torch.randn(*rhs_batch, S.shape[-1], 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(torch.broadcast_shapes(S.shape[:-2], rhs.shape[:-2]) + (S.shape[-1], 3), dtype=torch.float64)
    outs = []
    for fn in (_ours, _reference):
        x, logabs = fn(S, rhs)
        loss = (x * weights).sum() + (logabs * torch.arange(1, logabs.numel() + 1).reshape(logabs.shape)).sum()
        outs.append((x.detach(), logabs.detach(), *torch.autograd.grad(loss, (S, rhs))))
    for got, want in zip(*outs):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    S = _matrix(2, r=4, seed=1)
    rhs = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)

    def fn(S, rhs):
        LU, pivots = torch.linalg.lu_factor(S.detach())
        return _LUSolve.apply(S, LU, pivots, rhs), _LULogAbsDet.apply(S, LU, pivots)

    assert torch.autograd.gradcheck(fn, (S, rhs))


def test_second_derivatives_are_refused():
    S = _matrix(r=4)
    rhs = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
    x, logabs = _ours(S, rhs)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(x.sum() + logabs, S, create_graph=True)
