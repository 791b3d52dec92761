"""Fixes from session 26 (user trials and known gaps), each checked against dense float64."""

from __future__ import annotations

import pytest
import torch

from bma_gp import settings
from largest_tensor import LargestTensor
from test_sum_inverse_diagonal_elimination import build, dense_inverse_diagonal

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------ root_inv_decomposition forms its q x q core only when applied
def test_inverse_root_diagonal_needs_only_the_eliminated_rest():
    """``root_inv_decomposition().diagonal()`` of a sum past ``max_capacitance_size`` in q but not in the rest after
    elimination: the closed-form diagonal (it built the root's q x q eigendecomposition first, and raised)."""
    op, dense, _ = build(sizes=(30, 4), root=2)
    assert op.capacitance_size > 20 >= 4 + 2
    with settings.max_capacitance_size(20):
        root = op.root_inv_decomposition()
        got = root.diagonal()
        with pytest.raises(ValueError, match="max_capacitance_size"):  # the products need the q x q core
            root.root @ torch.ones(op.shape[-1], 1, dtype=op.dtype)
    torch.testing.assert_close(got, dense_inverse_diagonal(dense()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch", [(), (2,)])
def test_lazy_inverse_root_products_match_the_dense_inverse(batch):
    op, dense, _ = build(batch=batch, root=2)
    M = dense()
    R = op.root_inv_decomposition().root
    assert R.shape == M.shape
    eye = torch.eye(M.shape[-1], dtype=M.dtype).expand_as(M)
    R_dense = R @ eye
    torch.testing.assert_close(R_dense @ R_dense.mT, torch.cholesky_inverse(torch.linalg.cholesky(M)), atol=1e-10,
                               rtol=1e-9)  # fmt: skip
    torch.testing.assert_close(R.mT @ eye, R_dense.mT)  # the transposed root is the transposed matrix
    torch.testing.assert_close(R.to_dense(), R_dense)


def test_inverse_root_diagonal_allocates_nothing_q_by_q():
    """Two crossed intercepts of 3,000 and 10 levels: reading the inverse root's diagonal allocates nothing of
    q^2 = 9 million entries (the root's core was q x q)."""
    from bma_gp import BlockMeanSumLinearOperator, Partition

    n, k1, k2 = 12000, 3000, 10
    gen = torch.Generator().manual_seed(0)
    l1, l2 = torch.randint(0, k1, (n,), generator=gen), torch.randint(0, k2, (n,), generator=gen)
    l1[:k1] = torch.arange(k1)
    op = BlockMeanSumLinearOperator(
        torch.full((n,), 0.5, dtype=torch.float64),
        torch.rand(k1, generator=gen, dtype=torch.float64) + 0.1,
        torch.rand(k2, generator=gen, dtype=torch.float64) + 0.1,
        partitions=[Partition.from_labels(l1), Partition.from_labels(l2)],
        diagonal=[True, True],
    )
    with LargestTensor() as largest:
        diag = op.root_inv_decomposition().diagonal()
    assert largest.largest < (k1 + k2) ** 2 // 4, (largest.largest, largest.where)
    torch.testing.assert_close(diag, op._inverse_diagonal())
    assert bool((diag > 0).all()) and bool((diag < 2).all())  # 1/d = 2 minus a positive correction
