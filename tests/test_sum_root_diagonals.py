"""The diagonals of a sum's roots in closed form.

``BlockMeanSumLinearOperator.root_decomposition()`` and ``root_inv_decomposition()`` return ``R R^T`` for a root
known by its products; linear_operator's ``diagonal()`` of it read the root's entries (about ``n x n`` work, silently).
Now ``root_decomposition().diagonal()`` is the sum's own diagonal and ``root_inv_decomposition().diagonal()`` is
``diag(M^{-1})`` from one ``q x q`` solve. References: the dense matrix and its inverse in float64.
"""

from __future__ import annotations

import pytest
import torch

from bma_gp import BlockMeanSumLinearOperator, Partition
from largest_tensor import LargestTensor

pytestmark = pytest.mark.usefixtures("one_thread")

N = 40


def build(dtype=torch.float64, seed=0, root=True, indefinite=False, weighted=False, zero_diag=False, batch=()):
    gen = torch.Generator().manual_seed(seed)
    labels = [torch.randint(0, 7, (N,), generator=gen), torch.randint(0, 4, (N,), generator=gen)]
    labels[0][3] = 7  # a singleton level
    parts = [Partition.from_labels(lab) for lab in labels]
    blocks = []
    for k in (8, 4):
        W = torch.randn(*batch, k, k, generator=gen, dtype=torch.float64)
        blocks.append(W @ W.mT / k + 0.1 * torch.eye(k, dtype=torch.float64))
    if indefinite:  # an indefinite B_1 whose sum stays positive definite
        blocks[0] = blocks[0] - 0.05 * torch.eye(8, dtype=torch.float64)
        blocks[0][..., 0, 0] -= 0.2
    d = torch.rand(*batch, N, generator=gen, dtype=torch.float64) + 0.5
    if zero_diag:
        d = torch.zeros_like(d)
    U = torch.randn(*batch, N, 3, generator=gen, dtype=torch.float64) / 2 if root else None
    weights = [None, torch.randn(N, generator=gen, dtype=torch.float64) if weighted else None]
    op = BlockMeanSumLinearOperator(
        d.to(dtype),
        *(b.to(dtype) for b in blocks),
        partitions=parts,
        root=None if U is None else U.to(dtype),
        weights=[None if w is None else w.to(dtype) for w in weights],
    )
    dense = BlockMeanSumLinearOperator(d, *blocks, partitions=parts, root=U, weights=weights).to_dense()
    return op, dense


CASES = {
    "crossed_root": {},
    "no_root": {"root": False},
    "indefinite_block": {"indefinite": True},
    "random_slope": {"weighted": True},
    "batch": {"batch": (2,)},
}


@pytest.mark.parametrize("case", CASES)
def test_root_decomposition_diagonal(case):
    op, dense = build(**CASES[case])
    root = op.root_decomposition()
    torch.testing.assert_close(root.diagonal(), dense.diagonal(dim1=-2, dim2=-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(root.to_dense(), dense, rtol=1e-9, atol=1e-10)  # the root itself is unchanged


@pytest.mark.parametrize("case", CASES)
def test_root_inv_decomposition_diagonal(case):
    op, dense = build(**CASES[case])
    inverse = torch.linalg.inv(dense)
    root = op.root_inv_decomposition()
    torch.testing.assert_close(root.diagonal(), inverse.diagonal(dim1=-2, dim2=-1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(root.to_dense(), inverse, rtol=1e-8, atol=1e-10)


def test_zero_diagonal_root():
    """Group kernels without noise: ``R = Z L``, ``n x q``."""
    op, dense = build(zero_diag=True)
    torch.testing.assert_close(op.root_decomposition().diagonal(), dense.diagonal(), rtol=1e-10, atol=1e-12)


def test_float32_and_gradients():
    op, dense = build(torch.float32)
    inverse = torch.linalg.inv(dense)
    torch.testing.assert_close(op.root_inv_decomposition().diagonal().double(), inverse.diagonal(), rtol=1e-4, atol=0)
    # gradients of the inverse diagonal with respect to d, against the dense inverse's
    op64, _ = build()
    d = op64.diag_values.clone().requires_grad_(True)
    again = BlockMeanSumLinearOperator(d, *op64.blocks, partitions=op64.partitions, root=op64.root)
    got = torch.autograd.grad(again.root_inv_decomposition().diagonal().sum(), d)[0]
    d2 = op64.diag_values.clone().requires_grad_(True)
    dense2 = BlockMeanSumLinearOperator(d2, *op64.blocks, partitions=op64.partitions, root=op64.root).to_dense()
    want = torch.autograd.grad(torch.linalg.inv(dense2).diagonal().sum(), d2)[0]
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_no_n_by_n_matrix():
    n = 3000
    labels = torch.arange(n) % 50
    op = BlockMeanSumLinearOperator(
        torch.rand(n, dtype=torch.float64) + 0.5,
        torch.eye(50, dtype=torch.float64),
        partitions=[Partition.from_labels(labels)],
        root=torch.randn(n, 4, dtype=torch.float64),
    )
    with LargestTensor() as seen:
        op.root_decomposition().diagonal()
        op.root_inv_decomposition().diagonal()
    assert seen.largest < 100 * n, seen.where
