"""Costs a user trial at scale found (n to 10^7, k to 5000), each fixed without changing a number.

``M.solve(R)`` with few right-hand sides applies the core's factor to the block sums of ``R`` instead of forming
``M^{-1}`` (a ``k``-column solve with the factor: 11.3 s and 1.1 GB against 2.1 s and 0.24 GB for one column at
``k = 4000``): the direct form against dense linear algebra, its derivatives, and the paths it leaves to the inverse.
``diagonal()`` reads ``B`` without its symmetrised copy; ``GroupKernel`` checks equal inputs once."""

from __future__ import annotations

import pytest
import torch

from bma_gp import BlockMeanLinearOperator, Partition

pytestmark = pytest.mark.usefixtures("one_thread")

K = 12


def _labels(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "scattered":
        return torch.randperm(90, generator=g) % K
    if kind == "contiguous":
        return torch.arange(90) * K // 90
    return torch.cat([torch.arange(6), 6 + torch.randint(0, K - 6, (60,), generator=g)])  # singleton blocks


def _operator(kind: str, dtype, batch=(), symmetric=True):
    g = torch.Generator().manual_seed(2)
    part = Partition.from_labels(_labels(kind))
    A = torch.randn(*batch, K, K, generator=g, dtype=torch.float64)
    B = A @ A.mT / K if symmetric else A / K + torch.eye(K, dtype=torch.float64)
    lam = torch.rand(*batch, K, generator=g, dtype=torch.float64) + 0.2
    return BlockMeanLinearOperator(lam.to(dtype), B.to(dtype), part, symmetric=symmetric)


def _dense(M):
    return M.to_dense().double()


@pytest.mark.parametrize("kind", ["scattered", "contiguous", "singletons"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_direct_solve_matches_dense(kind, dtype, batch):
    M = _operator(kind, dtype, batch)
    assert M._solves_directly(2)
    rhs = torch.randn(*batch, M.shape[-1], 2, generator=torch.Generator().manual_seed(3), dtype=dtype)
    got = M.solve(rhs)
    expected = torch.linalg.solve(_dense(M), rhs.double())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(got.double(), expected, **tol)
    if not batch:
        torch.testing.assert_close(M.solve(rhs[..., 0]).double(), expected[..., 0], **tol)  # a vector


def test_direct_solve_does_not_form_the_inverse_and_uses_a_cached_one():
    M = _operator("scattered", torch.float64)
    rhs = torch.randn(M.shape[-1], 1, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BlockMeanLinearOperator, "inverse", lambda self: (_ for _ in ()).throw(AssertionError("formed")))
        M.solve(rhs)
    inverse = M.inverse()  # cached (no gradients): later solves use it
    assert not M._solves_directly(1)
    torch.testing.assert_close(M.solve(rhs), inverse.matmul(rhs))
    assert not M._solves_directly(K // 4)  # many columns: the inverse is as cheap


def test_a_non_symmetric_operator_solves_directly_through_the_lu():
    M = _operator("scattered", torch.float64, symmetric=False)
    rhs = torch.randn(M.shape[-1], 2, dtype=torch.float64)
    torch.testing.assert_close(M.solve(rhs), torch.linalg.solve(_dense(M), rhs))


def test_direct_solve_gradients_match_dense_to_second_order():
    part = Partition.from_labels(_labels("singletons"))
    g = torch.Generator().manual_seed(4)
    A = torch.randn(K, K, generator=g, dtype=torch.float64)
    lam = (torch.rand(K, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    B = (A @ A.mT / K).requires_grad_(True)
    rhs = torch.randn(len(part), 1, generator=g, dtype=torch.float64, requires_grad=True)

    def f(lam, B, rhs):
        return BlockMeanLinearOperator(lam, B, part).solve(rhs)

    torch.autograd.gradcheck(f, (lam, B, rhs))
    torch.autograd.gradgradcheck(f, (lam, B, rhs))


def test_diagonal_reads_b_without_its_symmetrised_copy():
    """``diagonal()`` formed the symmetrised ``k x k`` copy of ``B`` to read its diagonal (0.7 s and 0.4 GB at
    ``k = 5000``); symmetrising leaves the diagonal as it is."""
    M = _operator("scattered", torch.float64)
    M = BlockMeanLinearOperator(M.lam, M.B + 0.3 * torch.triu(torch.ones(K, K, dtype=torch.float64), 1), M.partition)
    diagonal = M.diagonal()
    assert M._b_sym_cache is None
    torch.testing.assert_close(diagonal, torch.diagonal(_dense(M)))


def test_group_kernel_checks_equal_inputs_once(monkeypatch):
    """GPyTorch selects ``active_dims`` from ``x1`` and ``x2`` apart, so ``GroupKernel(k, active_dims=[j])(x)`` met two
    equal tensors and checked the same ids twice (a few passes and a host read-back each: 10% of a training step with
    three groupings at n = 4e6, a user trial). Equal inputs are now checked once; other inputs still are."""
    from bma_gp import GroupKernel
    from bma_gp.kernels import group_kernel

    calls = []
    original = group_kernel.check_group_ids
    monkeypatch.setattr(group_kernel, "check_group_ids", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.stack([torch.rand(50, dtype=torch.float64), (torch.arange(50) % 5).double()], -1)
    for slope in (False, True):
        kernel = GroupKernel(5, active_dims=[1, 0] if slope else [1], slope=slope).double()
        calls.clear()
        with torch.no_grad():
            dense = kernel(x).to_dense()
        assert len(calls) == 1
        expected = (x[:, 1:2] == x[:, 1]).double()
        if not slope:
            torch.testing.assert_close(dense, kernel.var.detach() * expected)
        calls.clear()
        kernel(x, x.flip(0)).to_dense()
        assert len(calls) == 2
