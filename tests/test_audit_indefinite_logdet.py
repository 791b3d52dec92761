"""Log-determinants and validation of indefinite, singular and nearly singular block mean operators, sums and
products, against torch.logdet / torch.linalg.slogdet of the dense matrix."""

from __future__ import annotations

import pytest
import torch

from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, Partition, settings
from test_audit_sum_inertia import _slope_sum

D64 = torch.float64


def _partition() -> Partition:
    return Partition.from_labels(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3]))


def _dense_logdet(op) -> torch.Tensor:
    return torch.logdet(op.to_dense().to(D64))


# ---------------------------------------------------------------------------- a single indefinite operator
# B with two negative core eigenvalues (positive determinant) and with one (negative determinant)
B_TWO_NEGATIVE = torch.tensor(
    [[1.0, 0.1, 0.0, 0.0], [0.1, -2.0, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=D64
)
B_ONE_NEGATIVE = torch.tensor(
    [[1.0, 0.1, 0.0, 0.0], [0.1, -2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=D64
)
LAM = torch.tensor([1.0, 2.0, 1.5, 1.0], dtype=D64)


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize(("B", "positive"), [(B_TWO_NEGATIVE, True), (B_ONE_NEGATIVE, False)])
def test_indefinite_operator_logdet_follows_torch_logdet_with_validation_off(B, positive, diagonal):
    B = torch.diag(torch.diagonal(B)) if diagonal else B
    M = BlockMeanLinearOperator(LAM, torch.diagonal(B) if diagonal else B, _partition(), diagonal=diagonal)
    dense = M.to_dense()
    assert (torch.linalg.eigvalsh(dense) < 0).any()  # indefinite
    sign, logabs = torch.linalg.slogdet(dense)
    assert bool(sign > 0) == positive
    with settings.validate(False):
        ld = M.logdet()
        _, ld2 = M.inv_quad_logdet(torch.ones(10, dtype=D64), logdet=True)
    if positive:  # was NaN: an indefinite matrix of positive determinant has a log-determinant
        torch.testing.assert_close(ld, torch.logdet(dense))
        torch.testing.assert_close(ld2, torch.logdet(dense))
    else:
        assert torch.isnan(ld) and torch.isnan(ld2) and torch.isnan(torch.logdet(dense))
    torch.testing.assert_close(M.slogdet_parts()[0], sign)
    torch.testing.assert_close(M.slogdet_parts()[1], logabs)
    with pytest.raises(ValueError, match="positive definite"):  # validation on: a symmetric M must be
        BlockMeanLinearOperator(LAM, torch.diagonal(B) if diagonal else B, _partition(), diagonal=diagonal).logdet()


@pytest.mark.parametrize("lam0", [-1.0, 1.0])
def test_negative_block_offset_of_even_multiplicity_with_validation_off(lam0):
    # block 0 has 3 indices: lam_0 is an eigenvalue of multiplicity 2, so det M > 0 although lam_0 < 0
    lam = torch.tensor([lam0, 2.0, 1.5, 1.0], dtype=D64)
    M = BlockMeanLinearOperator(lam, 0.5 * torch.eye(4, dtype=D64), _partition())
    with settings.validate(False):
        torch.testing.assert_close(M.logdet(), _dense_logdet(M))
    # block 2 has 4 indices (odd multiplicity): a negative lam_2 makes det M < 0
    lam = torch.tensor([1.0, 2.0, -1.5, 1.0], dtype=D64)
    M = BlockMeanLinearOperator(lam, 0.5 * torch.eye(4, dtype=D64), _partition())
    with settings.validate(False):
        assert torch.isnan(M.logdet()) and torch.isnan(_dense_logdet(M))


def test_negated_operator_logdet_with_validation_off_matches_dense():
    M = BlockMeanLinearOperator(LAM, 0.3 * torch.eye(4, dtype=D64), _partition())
    with settings.validate(False):  # n = 10: det(-M) = det(M) > 0
        torch.testing.assert_close((M * -1).logdet(), torch.logdet(-M.to_dense()))
    with settings.validate(False):  # zero determinant: -inf, as torch.logdet
        Z = BlockMeanLinearOperator(
            torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=D64), torch.eye(4, dtype=D64), _partition()
        )
        assert Z.logdet().item() == float("-inf") == _dense_logdet(Z).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_indefinite_batch_logdet_and_gradient_match_dense(dtype):
    lam = torch.stack([LAM, LAM, torch.tensor([-1.0, 2.0, 1.5, 1.0], dtype=D64)])
    B = torch.stack([0.5 * torch.eye(4, dtype=D64), B_TWO_NEGATIVE, 0.5 * torch.eye(4, dtype=D64)])
    lam1, B1 = lam.clone().to(dtype).requires_grad_(), B.clone().to(dtype).requires_grad_()
    lam2, B2 = lam.clone().requires_grad_(), B.clone().requires_grad_()
    with settings.validate(False):
        ld = BlockMeanLinearOperator(lam1, B1, _partition()).logdet()
    ref = torch.logdet(BlockMeanLinearOperator(lam2, B2, _partition()).to_dense())
    assert torch.isfinite(ref).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(ld.double(), ref, atol=tol, rtol=tol)
    g1 = torch.autograd.grad(ld.sum(), (lam1, B1))
    g2 = torch.autograd.grad(ref.sum(), (lam2, B2))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.double(), b, atol=10 * tol, rtol=10 * tol)


# ---------------------------------------------------------------------------- sums with validation off
def _negative_intercept_sum(compensate: float, dtype=D64, requires_grad: bool = False):
    """A diagonal grouping with a negative entry (eliminated first when nothing is validated) plus a dense positive
    definite block matrix over the same grouping, scaled by ``compensate``; and its two block matrices."""
    part = Partition.from_labels(torch.arange(24) % 6)
    g = torch.tensor([-0.3, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=dtype).requires_grad_(requires_grad)
    B1 = (compensate * (3.0 * torch.eye(6) + 0.5 * torch.ones(6, 6))).to(dtype).requires_grad_(requires_grad)
    op = BlockMeanSumLinearOperator(torch.ones(24, dtype=dtype), B1, g, partitions=[part, part], diagonal=[False, True])
    return op, (g, B1)


def _emulate_accelerator(monkeypatch) -> None:
    """Validation off on an accelerator reads nothing back: the grouping with a negative entry is eliminated."""
    monkeypatch.setattr(BlockMeanSumLinearOperator, "_reads_back", lambda self: settings.validate.on())


@pytest.mark.parametrize("accelerator", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sum_with_a_negative_eliminated_grouping_has_the_dense_logdet_with_validation_off(
    monkeypatch, dtype, accelerator
):
    # 1 + g a = 1 - 0.3 * 4 < 0 at the first level: was NaN (log of that level) for a positive definite sum
    if accelerator:
        _emulate_accelerator(monkeypatch)
    op, params = _negative_intercept_sum(1.0, dtype, requires_grad=True)
    ref_params = [p.detach().double().requires_grad_() for p in params]
    dense = BlockMeanSumLinearOperator(
        torch.ones(24, dtype=D64), ref_params[1], ref_params[0], partitions=op.partitions, diagonal=[False, True]
    ).to_dense()
    assert float(torch.linalg.eigvalsh(dense)[0]) > 0.5
    b = torch.ones(24, dtype=dtype)
    with settings.validate(False):
        ld = op.logdet()
        _, ld2 = op.inv_quad_logdet(b, logdet=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    ref = torch.logdet(dense)
    torch.testing.assert_close(ld.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(ld2.double(), ref, atol=tol, rtol=tol)
    for got, want in zip(torch.autograd.grad(ld, params), torch.autograd.grad(ref, ref_params)):
        torch.testing.assert_close(got.double(), want, atol=10 * tol, rtol=10 * tol)
    torch.testing.assert_close(op.logdet().double(), ref, atol=tol, rtol=tol)  # validated: not eliminated


@pytest.mark.parametrize("accelerator", [False, True])
def test_sum_with_a_negative_eliminated_grouping_both_signs_with_validation_off(monkeypatch, accelerator):
    if accelerator:
        _emulate_accelerator(monkeypatch)
    op, _ = _negative_intercept_sum(0.01)  # too little to make up for it: one negative eigenvalue
    dense = op.to_dense()
    assert int((torch.linalg.eigvalsh(dense) < 0).sum()) == 1
    with settings.validate(False):
        assert torch.isnan(op.logdet()) and torch.isnan(torch.logdet(dense))
    with pytest.raises(ValueError, match="not positive definite"):
        op.logdet()


@pytest.mark.parametrize(
    ("g0", "g1", "compensate"),
    [([-0.5, 0.5, 0.5], [0.2, 0.3, 0.3], 1.0), ([-2.0, 0.5, 0.5], [-2.0, 0.3, 0.3], None)],
    ids=["made up for", "two negative directions"],
)
@pytest.mark.parametrize("accelerator", [False, True])
def test_sum_with_jointly_eliminated_negative_terms_has_the_dense_logdet_with_validation_off(
    monkeypatch, g0, g1, compensate, accelerator
):
    if accelerator:
        _emulate_accelerator(monkeypatch)
    op = _slope_sum(torch.tensor(g0, dtype=D64), torch.tensor(g1, dtype=D64), compensate)
    dense = op.to_dense()
    with settings.validate(False):  # the first was NaN (a level with a negative determinant)
        torch.testing.assert_close(op.logdet(), torch.logdet(dense), rtol=1e-10, atol=1e-10)


def test_sum_with_negative_diagonal_entries_has_the_dense_logdet_with_validation_off():
    part = Partition.from_labels(torch.arange(12) % 6)
    for negative in ([-0.2], [-0.2, -0.3]):  # made up for by the group term: positive definite either way
        d = torch.ones(12, dtype=D64)
        d[: len(negative)] = torch.tensor(negative, dtype=D64)
        op = BlockMeanSumLinearOperator(d, 5 * torch.eye(6, dtype=D64), partitions=[part])
        dense = op.to_dense()
        assert float(torch.linalg.eigvalsh(dense)[0]) > 0
        with settings.validate(False):  # one negative d was NaN (log d_0)
            torch.testing.assert_close(op.logdet(), torch.logdet(dense), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- solves of an indefinite operator
B_DENSE_NEGATIVE = torch.tensor(
    [[1.0, 0.1, 0.0, 0.0], [0.1, -2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.2], [0.0, 0.0, 0.2, 1.0]], dtype=D64
)


def test_indefinite_operator_solves_with_validation_off_as_with_it_on():
    # C has a negative eigenvalue and no Cholesky factor; M is invertible. With validation on the solve takes the LU
    # of C; with it off the (NaN) Cholesky factor was used: solve, inv_quad and inverse() were NaN without a word
    M = BlockMeanLinearOperator(LAM, B_DENSE_NEGATIVE, _partition())
    dense = M.to_dense()
    b = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=D64)
    ref = torch.linalg.solve(dense, b)
    with settings.validate(False):
        M = BlockMeanLinearOperator(LAM, B_DENSE_NEGATIVE, _partition())
        torch.testing.assert_close(M.solve(b), ref)
        torch.testing.assert_close(M.inverse().to_dense(), torch.linalg.inv(dense))
        M = BlockMeanLinearOperator(LAM, B_DENSE_NEGATIVE, _partition())
        quad, ld = M.inv_quad_logdet(b, logdet=True)
        torch.testing.assert_close(quad, (b * ref).sum())
        assert torch.isnan(ld) and torch.isnan(torch.logdet(dense))  # one negative eigenvalue
    torch.testing.assert_close(BlockMeanLinearOperator(LAM, B_DENSE_NEGATIVE, _partition()).solve(b), ref)


@pytest.mark.parametrize("B", [B_TWO_NEGATIVE, B_ONE_NEGATIVE, B_DENSE_NEGATIVE, 0.5 * torch.eye(4, dtype=D64)])
def test_unchecked_accelerator_path_takes_the_lu_of_the_core(monkeypatch, B):
    # on an accelerator with validation off nothing is read back: the LU of C serves definite and indefinite
    # operators alike (emulated on CPU)
    monkeypatch.setattr(BlockMeanLinearOperator, "_unchecked_on_accelerator", lambda self: not settings.validate.on())
    B = B + 0.05 * (torch.ones(4, 4, dtype=D64) - torch.eye(4, dtype=D64))  # dense: not the diagonal closed forms
    lam = LAM.clone().requires_grad_()
    dense = BlockMeanLinearOperator(LAM, B, _partition()).to_dense()
    b = torch.randn(10, 2, generator=torch.Generator().manual_seed(1), dtype=D64)
    with settings.validate(False):
        M = BlockMeanLinearOperator(lam, B, _partition())
        quad, ld = M.inv_quad_logdet(b, logdet=True)
        torch.testing.assert_close(M.solve(b), torch.linalg.solve(dense, b))
    torch.testing.assert_close(quad, (b * torch.linalg.solve(dense, b)).sum())
    ref = torch.logdet(dense)
    if torch.isnan(ref):
        assert torch.isnan(ld)
    else:
        torch.testing.assert_close(ld, ref)
        lam2 = LAM.clone().requires_grad_()
        dense2 = BlockMeanLinearOperator(lam2, B, _partition()).to_dense()
        want = torch.autograd.grad((b * torch.linalg.solve(dense2, b)).sum() + torch.logdet(dense2), lam2)[0]
        torch.testing.assert_close(torch.autograd.grad(quad + ld, lam)[0], want)


def test_sum_with_a_singular_level_of_a_negative_grouping_is_exact_with_validation_off_on_cpu():
    # 1 + g a = 1 - 0.25 * 4 = 0 at the first level of a positive definite sum: with validation off the grouping was
    # eliminated all the same (the level's block singular), and solve and logdet were NaN and -inf. On CPU it is
    # kept in the LU as with validation on (reading back costs nothing there).
    part = Partition.from_labels(torch.arange(24) % 6)
    g = torch.tensor([-0.25, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=D64)
    B1 = 3.0 * torch.eye(6, dtype=D64) + 0.5 * torch.ones(6, 6, dtype=D64)
    op = BlockMeanSumLinearOperator(torch.ones(24, dtype=D64), B1, g, partitions=[part, part], diagonal=[False, True])
    dense = op.to_dense()
    assert float(torch.linalg.eigvalsh(dense)[0]) > 0.5
    b = torch.ones(24, dtype=D64)
    with settings.validate(False):
        torch.testing.assert_close(op.logdet(), torch.logdet(dense), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(op.solve(b), torch.linalg.solve(dense, b), rtol=1e-9, atol=1e-10)


def test_a_batched_sum_with_a_negative_diagonal_entry_names_the_batch_entry():
    part = Partition.from_labels(torch.arange(12) % 6)
    d = torch.ones(3, 12, dtype=D64)
    d[1, 4] = -0.1
    op = BlockMeanSumLinearOperator(d, 5 * torch.eye(6, dtype=D64), partitions=[part])
    with pytest.raises(ValueError, match=r"d\[4\] = -0.1 \(batch index \(1,\)\) is <= 0"):  # named d[4] alone
        op.logdet()
