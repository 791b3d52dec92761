"""The inverse root of a sum has no rounding band: an eigenvalue of I + F G F at or below 0 raises (as the sum's
log-determinant does), where clamping it to eps returned a root 1e14 times too large, silently."""

import pytest
import torch
from linear_operator.operators import DiagLinearOperator

from bma_gp import BlockMeanLinearOperator, Partition, settings


def _rounded_indefinite(dtype, constant=False):
    """diag(d) + P B P^T with B of rank 2, positive semidefinite before its float32 rounding, and d ~ 1e-6: the
    float32 entries make the matrix indefinite (smallest eigenvalue about -5e-6)."""
    g = torch.Generator().manual_seed(0)
    n, k = 400, 20
    part = Partition.from_labels(torch.arange(n) % k)
    X = torch.randn(k, 2, generator=g, dtype=torch.float64)
    B = (X @ X.T).float().to(dtype)
    d = (1e-6 * (1 + torch.rand(n, generator=g, dtype=torch.float64))).float().to(dtype)
    if constant:  # one constant: the symmetric inverse square root (sqrt_inv_matmul) has a closed form
        d = torch.full_like(d, 1e-6)
    return BlockMeanLinearOperator(torch.zeros(k, dtype=dtype), B, part) + DiagLinearOperator(d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_root_of_an_indefinite_sum_raises_like_logdet(dtype):
    op = _rounded_indefinite(dtype)
    assert float(torch.linalg.eigvalsh(op.to_dense().double())[0]) < 0  # the matrix as given is indefinite
    with pytest.raises(ValueError, match="not positive definite"):
        op.logdet()
    with pytest.raises(ValueError, match="not positive definite.*no inverse square root"):
        op.root_inv_decomposition()
    # a constant diagonal and a second partition: a sum whose symmetric inverse root is closed form
    base = _rounded_indefinite(dtype, constant=True)
    other = BlockMeanLinearOperator(
        torch.zeros(7, dtype=dtype), torch.eye(7, dtype=dtype), Partition.from_labels(torch.arange(400) % 7)
    )
    op = base + other
    assert type(op).__name__ == "BlockMeanSumLinearOperator"
    assert float(torch.linalg.eigvalsh(op.to_dense().double())[0]) < 0
    with pytest.raises(ValueError, match="not positive definite"):
        op.sqrt_inv_matmul(torch.ones(op.shape[-1], dtype=dtype))


def test_inverse_root_without_validation_is_nan_not_huge():
    op = _rounded_indefinite(torch.float32)
    with settings.validate(False):
        R = op.root_inv_decomposition().root.to_dense()
    assert not bool(torch.isfinite(R).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_root_of_a_positive_definite_sum_is_exact(dtype):
    """The same low-rank B with a diagonal well above its rounding: positive definite, and R R^T = M^{-1}."""
    g = torch.Generator().manual_seed(1)
    n, k = 400, 20
    part = Partition.from_labels(torch.arange(n) % k)
    X = torch.randn(k, 2, generator=g, dtype=torch.float64)
    op = BlockMeanLinearOperator(torch.zeros(k, dtype=dtype), (X @ X.T).to(dtype), part) + DiagLinearOperator(
        torch.full((n,), 1e-2, dtype=dtype)
    )
    R = op.root_inv_decomposition().root.to_dense().double()
    M = op.to_dense().double()
    tol = 1e-9 if dtype == torch.float64 else 2e-4  # condition number about 4e4
    torch.testing.assert_close(R @ R.T @ M, torch.eye(n, dtype=torch.float64), rtol=tol, atol=tol)
