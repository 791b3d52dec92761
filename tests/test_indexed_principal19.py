"""``M[idx][:, idx]``: rows, then the same columns, of a block mean operator or a sum of them.

The principal slice ``M[a:b, a:b]`` stayed in the family, but the same submatrix written with positions (a
permutation, a subset, as ``M[perm][:, perm]`` or ``M[..., idx, :][..., :, idx]``) went through linear_operator's
interpolated operator and took the generic path (with a ``ClosedFormFallbackWarning``) for its solves and
log-determinant. Rows and columns that are the same distinct points in the same order are now the principal
submatrix of the base: the labels restricted (and permuted) to those points."""

from __future__ import annotations

import warnings

import pytest
import torch

from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, ClosedFormFallbackWarning, Partition
from bma_gp._composition import FallbackIndexedLinearOperator

N, K = 14, 4


def labels(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out = torch.randint(0, K, (N,), generator=generator)
    out[:K] = torch.arange(K)  # every block used
    return out[torch.randperm(N, generator=generator)]


def spd(k: int, dtype, batch=(), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, k, k, generator=generator, dtype=dtype)
    return A @ A.mT / k + 0.1 * torch.eye(k, dtype=dtype)


def operators(dtype, batch):
    first, second = Partition(labels(1), num_blocks=K), Partition(labels(2), num_blocks=K)
    lam = torch.rand(*batch, K, generator=torch.Generator().manual_seed(3), dtype=dtype) + 1.0
    M = BlockMeanLinearOperator(lam, spd(K, dtype, batch), first)
    d = torch.linspace(0.5, 1.0, N, dtype=dtype).expand(*batch, N)
    return {
        "block mean": M,
        "diagonal B": BlockMeanLinearOperator(lam, lam.flip(-1), first, diagonal=True),
        "not symmetric": BlockMeanLinearOperator(
            lam, spd(K, dtype, batch) + 0.05 * torch.ones(K, K, dtype=dtype).triu(), first, symmetric=False
        ),
        "sum": M.add_diagonal(d),
        "two partitions": BlockMeanSumLinearOperator(
            d, spd(K, dtype, batch, seed=4), spd(K, dtype, batch, seed=5), partitions=[first, second]
        ),
    }


INDICES = {
    "permutation": torch.randperm(N, generator=torch.Generator().manual_seed(7)),
    "subset": torch.tensor([9, 2, 11, 5]),
    "one point": torch.tensor([3]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("kind", ["block mean", "diagonal B", "not symmetric", "sum", "two partitions"])
@pytest.mark.parametrize("which", list(INDICES))
def test_rows_then_the_same_columns_are_the_principal_submatrix_in_closed_form(dtype, batch, kind, which):
    op = operators(dtype, batch)[kind]
    idx = INDICES[which]
    dense = op.to_dense()[..., idx, :][..., :, idx]
    rhs = torch.randn(*batch, idx.numel(), 2, generator=torch.Generator().manual_seed(8), dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        for sub in (op[..., idx, :][..., :, idx], op[idx][:, idx] if not batch else op[0][idx][:, idx]):
            reference = dense if not (batch and sub.dim() == 2) else dense[0]
            b = rhs if sub.dim() == rhs.dim() else rhs[0]
            assert not isinstance(sub, FallbackIndexedLinearOperator)
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(sub.to_dense(), reference, rtol=0, atol=0)
            torch.testing.assert_close(sub.solve(b), torch.linalg.solve(reference, b), **tol)
            if kind != "not symmetric":
                torch.testing.assert_close(sub.logdet(), torch.logdet(reference), **tol)


def test_gradients_through_the_principal_submatrix_equal_dense():
    dtype = torch.float64
    first = Partition(labels(1), num_blocks=K)
    lam = (torch.rand(K, dtype=dtype) + 1.0).requires_grad_(True)
    B = spd(K, dtype).requires_grad_(True)
    idx = INDICES["permutation"][:9]
    M = BlockMeanLinearOperator(lam, B, first)
    rhs = torch.randn(9, dtype=dtype)
    value = M[idx][:, idx].inv_quad_logdet(rhs.unsqueeze(-1), logdet=True)
    grads = torch.autograd.grad(sum(value), (lam, B))
    dense = M.to_dense()[idx][:, idx]
    expected_value = (rhs @ torch.linalg.solve(dense, rhs), torch.logdet(dense))
    expected = torch.autograd.grad(sum(expected_value), (lam, B))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_repeated_or_different_points_stay_the_indexed_fallback():
    """Repeated points (whose pair's diagonal entry is not ``lam``) and columns in another order are no principal
    submatrix: they keep linear_operator's interpolated operator (which warns when it factorises)."""
    M = operators(torch.float64, ())["block mean"]
    dense = M.to_dense()
    for rows, cols in ((torch.tensor([1, 1, 4]),) * 2, (torch.tensor([1, 2, 4]), torch.tensor([1, 4, 2]))):
        sub = M[rows][:, cols]
        assert isinstance(sub, FallbackIndexedLinearOperator)
        torch.testing.assert_close(sub.to_dense(), dense[rows][:, cols], rtol=0, atol=0)
