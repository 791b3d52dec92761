"""Definiteness of ``BlockMeanSumLinearOperator`` with indefinite block matrices, against dense float64.

An audit found that, with validation on, a sum ``diag(d) + sum_j P_j B_j P_j^T + U U^T`` made indefinite by the
negative eigenvalues of a ``B_j`` was refused only when its capacitance had an odd number of negative eigenvalues
(a negative determinant): with two negative directions (a positive determinant) ``solve``, ``logdet`` and
``inv_quad_logdet`` returned numbers for a matrix that is not positive definite. The same held, level by level,
for diagonal terms eliminated together over one grouping (a random intercept and slope). The check counts the
sum's negative eigenvalues with Haynsworth's inertia formula, only where some ``B_j`` has a negative eigenvalue.
"""

from __future__ import annotations

import pytest
import torch
from linear_operator.operators import DiagLinearOperator

import bma_gp
from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, Partition
from closed_form_guard import closed_forms_only

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems

N = 36
DTYPE = torch.float64


def _block(k: int, eigenvalues: list[float], seed: int) -> torch.Tensor:
    """A symmetric ``k x k`` matrix with the given eigenvalues in a random basis (float64)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=DTYPE))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=DTYPE)) @ Q.mT


def _sum(negative: list[float], structure: str, dtype=DTYPE, batch: tuple[int, ...] = ()):
    """A sum whose first ``B`` has the eigenvalues ``negative`` below 0 (one list per batch entry when batched)."""
    gen = torch.Generator().manual_seed(1)
    first = Partition.from_labels(torch.arange(N) % 4)
    second = Partition.from_labels((torch.arange(N) // 3) % 3)
    lists = negative if batch else [negative]
    B1 = torch.stack([_block(4, [*neg, *[1.0, 2.0, 0.5][: 4 - len(neg)]], seed=2) for neg in lists])
    B1 = B1.reshape(*batch, 4, 4)
    d = 0.5 + torch.rand(N, generator=gen, dtype=DTYPE)
    if structure == "one partition":
        op = BlockMeanSumLinearOperator(d, B1, partitions=[first])
    elif structure == "second partition and root":
        B2 = _block(3, [0.3, 1.0, 2.0], seed=3)
        U = torch.randn(N, 2, generator=gen, dtype=DTYPE) / 3
        op = BlockMeanSumLinearOperator(d, B1, B2, partitions=[first, second], root=U)
    else:  # a diagonal second grouping, eliminated first
        g = torch.tensor([0.4, 0.7, 1.1], dtype=DTYPE)
        op = BlockMeanSumLinearOperator(d, B1, g, partitions=[first, second], diagonal=[False, True])
    return op.to(dtype)


def _dense_negatives(op) -> torch.Tensor:
    return (torch.linalg.eigvalsh(op.to_dense().double()) < 0).sum(-1)


STRUCTURES = ["one partition", "second partition and root", "eliminated diagonal grouping"]


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("negative", [[-4.0], [-4.0, -3.0]], ids=["one negative", "two negatives"])
def test_indefinite_sums_are_refused_whatever_the_sign_of_their_determinant(structure, dtype, negative):
    op = _sum(negative, structure, dtype)
    count = int(_dense_negatives(op))
    assert count == len(negative), "the test needs as many negative directions in the sum as in B_1"
    b = torch.randn(N, 2, dtype=dtype)
    for call in (op.logdet, lambda: op.inv_quad_logdet(b, logdet=True)):
        with pytest.raises(ValueError, match="not positive definite") as info:
            call()
        if count == 2:  # the determinant is positive: the new check names the count
            assert "it has 2 negative eigenvalues" in str(info.value)
            assert "blocks[0]" in str(info.value)
    # solve needs an invertible sum only, as a single operator's (tests/test_audit_root_messages.py)
    tol = dict(rtol=1e-8, atol=1e-8) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(op.solve(b).double(), torch.linalg.solve(op.to_dense().double(), b.double()), **tol)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_indefinite_blocks_of_a_positive_definite_sum_are_accepted_with_exact_values(structure, dtype):
    op = _sum([-0.02, -0.01], structure, dtype)
    dense = op.to_dense().double()
    assert float(torch.linalg.eigvalsh(dense)[0]) > 0.1, "the sum must be positive definite"
    assert float(torch.linalg.eigvalsh(op.blocks[0].double())[0]) < -0.01, "the test needs an indefinite B_1"
    b = torch.randn(N, 3, dtype=DTYPE)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    with closed_forms_only(N):
        logdet = op.logdet()
        solved = op.solve(b.to(dtype))
        quad, logdet2 = op.inv_quad_logdet(b.to(dtype), logdet=True)
    torch.testing.assert_close(logdet.double(), torch.logdet(dense), **tol)
    torch.testing.assert_close(solved.double(), torch.linalg.solve(dense, b), **tol)
    torch.testing.assert_close(quad.double(), (b * torch.linalg.solve(dense, b)).sum(), **tol)
    torch.testing.assert_close(logdet2.double(), torch.logdet(dense), **tol)


def test_a_batch_is_refused_naming_the_entry_and_accepted_entries_are_exact():
    op = _sum([[-0.02, -0.01], [-4.0, -3.0]], "second partition and root", batch=(2,))
    assert _dense_negatives(op).tolist() == [0, 2]
    with pytest.raises(ValueError, match=r"not positive definite \(batch index \(1,\)\): it has 2 negative"):
        op.logdet()
    good = op[:1]
    dense = good.to_dense()
    torch.testing.assert_close(good.logdet(), torch.logdet(dense), rtol=1e-10, atol=1e-10)


def test_a_sum_built_from_operators_by_a_user_is_refused():
    # a block mean operator with an indefinite B (its lam too small to make up for it) plus per-point noise
    part = Partition.from_labels(torch.arange(N) % 4)
    B = _block(4, [-4.0, -3.0, 1.0, 2.0], seed=5)
    noise = torch.linspace(0.5, 1.0, N, dtype=DTYPE)
    op = BlockMeanLinearOperator(torch.full((4,), 0.1, dtype=DTYPE), B, part) + DiagLinearOperator(noise)
    assert isinstance(op, BlockMeanSumLinearOperator)
    assert int(_dense_negatives(op)) == 2 and float(torch.linalg.det(op.to_dense())) > 0
    with pytest.raises(ValueError, match="it has 2 negative eigenvalues"):
        op.inv_quad_logdet(torch.ones(N, 1, dtype=DTYPE), logdet=True)


def _slope_sum(g0: torch.Tensor, g1: torch.Tensor, compensate: float | None = None):
    """A random intercept ``g0`` and slope ``g1`` (diagonal terms over one grouping, eliminated together), and with
    ``compensate`` two dense positive definite terms over the same grouping (indicator and slope) scaled by it."""
    gen = torch.Generator().manual_seed(7)
    part = Partition.from_labels(torch.arange(24) % 3)
    x = torch.randn(24, generator=gen, dtype=DTYPE)
    blocks, weights, flags = [g0, g1], [None, x], [True, True]
    if compensate is not None:
        B = compensate * (10 * torch.eye(3, dtype=DTYPE) + torch.ones(3, 3, dtype=DTYPE))
        blocks += [B, B]
        weights += [None, x]
        flags += [False, False]
    return BlockMeanSumLinearOperator(
        torch.ones(24, dtype=DTYPE), *blocks, partitions=[part] * len(blocks), weights=weights, diagonal=flags
    )


def test_jointly_eliminated_terms_negative_in_two_directions_at_a_level_are_refused():
    op = _slope_sum(torch.tensor([-2.0, 0.5, 0.5], dtype=DTYPE), torch.tensor([-2.0, 0.3, 0.3], dtype=DTYPE))
    assert int(_dense_negatives(op)) == 2 and float(torch.linalg.det(op.to_dense())) > 0
    with pytest.raises(ValueError, match=r"blocks\[0\], blocks\[1\] have a negative diagonal entry") as info:
        op.logdet()
    assert "(2 negative eigenvalues)" in str(info.value)


@pytest.mark.parametrize("scale", [10.0, 0.3])
def test_jointly_eliminated_negative_terms_made_up_for_by_the_others_are_accepted(scale):
    g0, g1 = torch.tensor([-2.0, 0.5, 0.5], dtype=DTYPE), torch.tensor([-2.0, 0.3, 0.3], dtype=DTYPE)
    op = _slope_sum(g0, g1, compensate=scale)
    dense = op.to_dense()
    assert float(torch.linalg.eigvalsh(dense)[0]) > 0.5
    b = torch.randn(24, 2, dtype=DTYPE)
    torch.testing.assert_close(op.logdet(), torch.logdet(dense), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(op.solve(b), torch.linalg.solve(dense, b), rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="it has 2 negative eigenvalues"):
        _slope_sum(g0, g1, compensate=0.1).logdet()


def test_without_validation_nothing_is_checked_and_a_later_validated_call_checks():
    op = _sum([-4.0, -3.0], "one partition")
    dense = op.to_dense()
    with bma_gp.settings.validate(False):  # documented: torch.logdet of the dense matrix (positive determinant)
        torch.testing.assert_close(op.logdet(), torch.logdet(dense), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="it has 2 negative eigenvalues"):
        op.logdet()


def test_positive_semidefinite_blocks_take_no_eigenvalue_problem_of_the_capacitance(monkeypatch):
    # the inertia check costs nothing beyond a test of each B_j (a Cholesky attempt, the eigenvalues of a singular
    # one) when none has a negative eigenvalue: no eigenvalue problem of the capacitance's size
    sizes = []
    for name in ("eigvalsh", "eigh"):
        original = getattr(torch.linalg, name)

        def spy(A, *args, _original=original, **kwargs):
            sizes.append(A.shape[-1])
            return _original(A, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, spy)
    op = _sum([0.0], "second partition and root")  # B_1 singular positive semidefinite; q = 4 + 3 + 2
    op.logdet()
    op = _sum([0.2], "eliminated diagonal grouping")
    op.solve(torch.ones(N, 1, dtype=DTYPE))
    assert all(size <= 4 for size in sizes), sizes


def test_gradients_through_an_accepted_indefinite_sum_match_the_dense_ones():
    part1 = Partition.from_labels(torch.arange(N) % 4)
    part2 = Partition.from_labels((torch.arange(N) // 3) % 3)
    B1 = _block(4, [-0.02, 1.0, 2.0, 0.5], seed=2).requires_grad_()
    B2 = _block(3, [0.3, 1.0, -0.01], seed=3).requires_grad_()
    d = torch.linspace(0.5, 1.5, N, dtype=DTYPE).requires_grad_()
    b = torch.randn(N, 1, dtype=DTYPE)
    op = BlockMeanSumLinearOperator(d, B1, B2, partitions=[part1, part2])
    quad, logdet = op.inv_quad_logdet(b, logdet=True)
    ours = torch.autograd.grad(quad + logdet, (B1, B2, d))
    P1, P2 = (torch.nn.functional.one_hot(p.labels, p.num_blocks).to(DTYPE) for p in (part1, part2))
    dense = torch.diag(d) + P1 @ B1 @ P1.mT + P2 @ B2 @ P2.mT
    ref = (b * torch.linalg.solve(dense, b)).sum() + torch.logdet(dense)
    for got, want in zip(ours, torch.autograd.grad(ref, (B1, B2, d))):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------- eliminated groupings made up for
def _negative_intercept_sum(compensate: float):
    """A diagonal ``B_2`` with a negative entry (the largest diagonal grouping, eliminated first before the fix)
    plus a dense positive definite ``B_1`` over the same grouping, scaled by ``compensate``."""
    part = Partition.from_labels(torch.arange(24) % 6)
    g = torch.tensor([-0.3, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=DTYPE)
    B1 = compensate * (3.0 * torch.eye(6, dtype=DTYPE) + 0.5 * torch.ones(6, 6, dtype=DTYPE))
    return BlockMeanSumLinearOperator(
        torch.ones(24, dtype=DTYPE), B1, g, partitions=[part, part], diagonal=[False, True]
    )


def test_a_negative_diagonal_entry_that_other_terms_make_up_for_is_accepted():
    # 1 + g a = 1 - 0.3 * 4 < 0 at the first level: the eliminated block's own log-determinant is not defined,
    # which was reported as "not positive definite" although the sum is
    op = _negative_intercept_sum(1.0)
    dense = op.to_dense()
    assert float(torch.linalg.eigvalsh(dense)[0]) > 0.5
    b = torch.randn(24, 2, dtype=DTYPE)
    with closed_forms_only(24):
        logdet = op.logdet()
        solved = op.solve(b)
    torch.testing.assert_close(logdet, torch.logdet(dense), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(solved, torch.linalg.solve(dense, b), rtol=1e-9, atol=1e-10)
    op = _negative_intercept_sum(0.01)
    assert int(_dense_negatives(op)) == 1
    with pytest.raises(ValueError, match="not positive definite"):
        op.logdet()


def test_jointly_eliminated_terms_negative_at_a_level_made_up_for_by_the_others_are_accepted():
    # one negative direction at the first level (the level's determinant is negative), made up for by dense terms
    # over the same grouping: refused before as "a non-positive determinant at some level"
    op = _slope_sum(torch.tensor([-0.5, 0.5, 0.5], dtype=DTYPE), torch.tensor([0.2, 0.3, 0.3], dtype=DTYPE), 1.0)
    dense = op.to_dense()
    assert float(torch.linalg.eigvalsh(dense)[0]) > 0.1
    torch.testing.assert_close(op.logdet(), torch.logdet(dense), rtol=1e-10, atol=1e-10)
    b = torch.randn(24, 2, dtype=DTYPE)
    torch.testing.assert_close(op.solve(b), torch.linalg.solve(dense, b), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("low", [-3.0, -0.05])
def test_a_capacitance_factorised_with_the_root_eliminated_first_is_checked_too(low):
    # r = 400 + 8 >= NESTED_MIN_SIZE: the root's block of the capacitance is eliminated before the LU
    gen = torch.Generator().manual_seed(11)
    n, k = 800, 400
    part = Partition.from_labels(torch.arange(n) % k)
    eigenvalues = torch.rand(k, generator=gen, dtype=DTYPE)
    eigenvalues[:2] = low
    B = _block(k, eigenvalues.tolist(), seed=12)
    U = torch.randn(n, 8, generator=gen, dtype=DTYPE) / 10
    op = BlockMeanSumLinearOperator(torch.ones(n, dtype=DTYPE), B, partitions=[part], root=U)
    dense = op.to_dense()
    if low < -1:  # 1 + 2 low < 0: two negative directions
        assert int(_dense_negatives(op)) == 2
        with pytest.raises(ValueError, match="it has 2 negative eigenvalues"):
            op.logdet()
    else:
        torch.testing.assert_close(op.logdet(), torch.logdet(dense), rtol=1e-10, atol=1e-9)
