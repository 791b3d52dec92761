"""Log-determinants and validation of indefinite, singular and nearly singular block mean operators, sums and
products, against torch.logdet / torch.linalg.slogdet of the dense matrix."""

from __future__ import annotations

import pytest
import torch

from bma_gp import BlockMeanLinearOperator, Partition, settings

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
