"""Draws from a ``BlockMeanSumLinearOperator`` without ``base_samples``: ``D^{1/2} e + Z L e'``, no factorisation of
size ``q`` (a prior draw of a random intercept with per-point noise took 26 s at 5,000 levels and was refused past
``max_capacitance_size``)."""

from __future__ import annotations

import pytest
import torch
from linear_operator.operators import DiagLinearOperator, LowRankRootLinearOperator

import bma_gp
from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, Partition


def _sums():
    gen = torch.Generator().manual_seed(4)
    n = 8
    p1 = Partition.from_labels(torch.tensor([0, 1, 0, 2, 1, 2, 0, 3]))
    p2 = Partition.from_labels(torch.tensor([1, 0, 0, 1, 1, 0, 1, 0]))
    d = torch.rand(n, generator=gen, dtype=torch.float64) + 0.2
    W = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    U = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    diag_group = BlockMeanSumLinearOperator(
        d, torch.rand(4, dtype=torch.float64) + 0.5, partitions=[p1], diagonal=[True]
    )
    dense_group = BlockMeanLinearOperator(torch.zeros(4, dtype=torch.float64), W @ W.mT, p1) + DiagLinearOperator(d)
    crossed = diag_group + BlockMeanLinearOperator(
        torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64) * 0.7, p2
    )
    with_root = dense_group + LowRankRootLinearOperator(U)
    return {"diagonal grouping": diag_group, "dense grouping": dense_group, "crossed": crossed, "with root": with_root}


@pytest.mark.parametrize("name", ["diagonal grouping", "dense grouping", "crossed", "with root"])
def test_draws_have_the_sums_covariance(name):
    S = _sums()[name]
    assert isinstance(S, BlockMeanSumLinearOperator), type(S)
    torch.manual_seed(0)
    draws = S.zero_mean_mvn_samples(40000)
    assert draws.shape == (40000, 8) and draws.dtype == torch.float64
    empirical = draws.mT @ draws / draws.shape[0]
    dense = S.to_dense()
    scale = dense.diagonal().max()
    torch.testing.assert_close(empirical, dense, rtol=0, atol=0.05 * float(scale))


def test_draws_need_no_factorisation_past_the_capacitance_limit():
    n, k = 3000, 2000
    labels = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(1))
    labels[:k] = torch.arange(k)
    S = BlockMeanSumLinearOperator(
        torch.full((n,), 0.1), torch.full((k,), 2.0), partitions=[Partition.from_labels(labels)], diagonal=[True]
    )
    with bma_gp.settings.max_capacitance_size(100):  # the square root would need q = 2000
        draws = S.zero_mean_mvn_samples(3)
        assert draws.shape == (3, n) and draws.dtype == torch.float32
        with pytest.raises(ValueError, match="max_capacitance_size"):
            S.root_decomposition().root.to_dense()


def test_draws_are_differentiable_and_batched():
    gen = torch.Generator().manual_seed(2)
    p = Partition.from_labels(torch.tensor([0, 1, 0, 1, 2, 2]))
    v = (torch.rand(3, 3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    d = (torch.rand(3, 6, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    S = BlockMeanSumLinearOperator(d, v, partitions=[p], diagonal=[True])
    draws = S.zero_mean_mvn_samples(5)
    assert draws.shape == (5, 3, 6)
    draws.square().sum().backward()
    assert v.grad is not None and d.grad is not None
    assert bool(torch.isfinite(v.grad).all()) and bool(torch.isfinite(d.grad).all())
