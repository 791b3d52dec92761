"""Audit of the memory promise at large n: no public path of the block mean operators allocates ``n x n`` (or
``t x n`` for a ``t``-sized result) unless the caller asks for that dense matrix."""

import warnings

import gpytorch
import pytest
import torch
from linear_operator.operators import DiagLinearOperator, LowRankRootLinearOperator

from bma_gp import (
    BlockMeanLinearOperator,
    ChunkedInducingPointKernel,
    ClosedFormFallbackWarning,
    GroupKernel,
    Partition,
)
from gp_reference import GP
from largest_tensor import LargestTensor

N = 100_000
K = 40


def _operators(n: int = N):
    """A block mean operator, a sum (noise, a second diagonal grouping, a low-rank root) and a product over two
    partitions, all of size ``n``."""
    gen = torch.Generator().manual_seed(0)
    dt = torch.float64
    labels = torch.arange(n) % K
    W = torch.randn(K, K, dtype=dt, generator=gen)
    M = BlockMeanLinearOperator(torch.rand(K, dtype=dt, generator=gen) + 1, W @ W.T / K, Partition.from_labels(labels))
    second = Partition.from_labels(torch.arange(n) % 7)
    M2 = BlockMeanLinearOperator(torch.zeros(7, dtype=dt), torch.ones(7, dtype=dt), second, diagonal=True)
    noise = DiagLinearOperator(torch.rand(n, dtype=dt, generator=gen) + 0.1)
    S = noise + M + M2 + LowRankRootLinearOperator(torch.randn(n, 3, dtype=dt, generator=gen) / 10)
    P = M.matmul(BlockMeanLinearOperator(torch.rand(7, dtype=dt, generator=gen) + 1, torch.eye(7, dtype=dt), second))
    return {"block mean": M, "sum": S, "product": P}


def _entries(op, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Reference entries ``op[rows[a], cols[b]]``, one column of ``op`` at a time (``op @ e_j``): no ``n x n``."""
    cols_dense = torch.zeros(op.shape[-1], cols.numel(), dtype=op.dtype)
    cols_dense[cols, torch.arange(cols.numel())] = 1
    return (op @ cols_dense)[rows]


@pytest.mark.parametrize("name", ["block mean", "sum", "product"])
def test_dense_off_diagonal_submatrix_reads_only_its_entries(name):
    # M[a:b, c:d].to_dense() (and M[idx][:, idx2]) went through linear_operator's default to_dense, a product with
    # an identity of the smaller side: an n x (d - c) intermediate, 80 GB for a 1000 x 1000 block at n = 10^7.
    op = _operators()[name]
    rows, cols = torch.arange(5_000, 5_150), torch.arange(100, 220)
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:150]
    for sub, r, c in [(op[5_000:5_150, 100:220], rows, cols), (op[idx][:, cols], idx, cols)]:
        with LargestTensor() as probe:
            dense = sub.to_dense()
        assert probe.largest <= 4 * N, (probe.largest, probe.where)  # O(n): the root, the pairs of blocks
        torch.testing.assert_close(dense, _entries(op, r, c), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["block mean", "sum", "product"])
def test_solve_of_indexed_principal_submatrix_is_its_size(name):
    # M[idx][:, idx] has no closed form (it warns); its dense Cholesky factorised the submatrix read through an
    # n x |idx| product with the base operator.
    op = _operators()[name]
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(2))[:200]
    sub = op[idx][:, idx]
    rhs = torch.randn(200, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)
        with LargestTensor() as probe:
            x = sub.solve(rhs)
    assert probe.largest <= 4 * N, (probe.largest, probe.where)  # O(n): the root, the pairs of blocks
    torch.testing.assert_close(_entries(op, idx, idx) @ x, rhs, rtol=1e-8, atol=1e-8)


def test_sgpr_prediction_with_gradients_after_one_without_stays_closed_form():
    # After a prediction under no_grad, a prediction with gradients (optimising test inputs) formed K_ZZ again on
    # autograd's path, which rounds differently in the last bit; the ill-conditioned K_ZZ magnified that, the cross
    # covariance's root no longer matched the kept training root, and the prediction warned and formed the t x n
    # cross covariance (11 s at n = 10^5).
    dt, n, t = torch.float64, 2_000, 100
    torch.manual_seed(0)
    x = torch.cat([torch.rand(n, 2, dtype=dt), torch.randint(0, 50, (n, 1)).to(dt)], -1)
    y = torch.randn(n, dtype=dt)
    x_test = torch.cat([torch.rand(t, 2, dtype=dt), torch.randint(0, 50, (t, 1)).to(dt)], -1)
    torch.manual_seed(1)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2)).double()
    inducing = torch.rand(32, 2, dtype=dt)
    covar = (
        ChunkedInducingPointKernel(smooth, inducing, likelihood, active_dims=(0, 1))
        + GroupKernel(50, active_dims=[2]).double()
    )
    model = GP(x, y, likelihood, covar).double().eval()
    likelihood.eval()
    with torch.no_grad():
        expected = likelihood(model(x_test)).mean
    test_x = x_test.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with LargestTensor() as probe:
            pred = likelihood(model(test_x))
            (pred.mean.sum() + pred.variance.sum()).backward()
    assert probe.largest < t * n, (probe.largest, probe.where)
    torch.testing.assert_close(pred.mean.detach(), expected, rtol=1e-8, atol=1e-8)
    assert test_x.grad is not None and bool(test_x.grad.isfinite().all())


def test_small_block_of_a_million_point_operator_is_read_from_its_entries():
    # n = 10^6: the 20 x 30 block came through a 10^6 x 20 product (160 MB; 80 GB for a 1000 x 1000 block at 10^7)
    n, k = 1_000_000, 200
    dt = torch.float64
    B = torch.full((k, k), 0.1, dtype=dt) + torch.eye(k, dtype=dt)
    M = BlockMeanLinearOperator(torch.linspace(1, 2, k, dtype=dt), B, Partition.from_labels(torch.arange(n) % k))
    with LargestTensor() as probe:
        block = M[123_456:123_476, 900_000:900_030].to_dense()
    assert probe.largest <= n, (probe.largest, probe.where)  # the index vectors of the indexed operator, O(n)
    rows, cols = torch.arange(123_456, 123_476) % k, torch.arange(900_000, 900_030) % k
    torch.testing.assert_close(block, B[rows][:, cols])  # no diagonal entry of M in this block
