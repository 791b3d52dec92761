"""The diagonal of a sum's inverse through the capacitance's elimination.

``diag(M^{-1})`` (GPyTorch's leave-one-out objective reads it, and ``root_inv_decomposition().diagonal()``) solved
one dense ``q x q`` system over every level of every grouping: O(q^3) where the solves and the log-determinant
eliminate a diagonal grouping first and factorise only the rest (a session-24 trial: 5.7 s against 0.34 s for the
marginal log likelihood at two crossed intercepts of 2,500 and 100 levels). It now reads the blocks of ``C^{-1} G``
from that same factorisation. References: the dense inverse in float64 (Cholesky).
"""

from __future__ import annotations

import pytest
import torch

from bma_gp import BlockMeanSumLinearOperator, Partition, settings
from largest_tensor import LargestTensor

pytestmark = pytest.mark.usefixtures("one_thread")


def build(
    dtype=torch.float64, seed=0, n=60, sizes=(9, 4), diagonal=(True, False), root=0, slope=False, joint=False,
    batch=(), grad=False,
):  # fmt: skip
    """A sum over ``len(sizes)`` crossed groupings (``diagonal[j]``: B_j given by its diagonal); with ``joint`` a
    random slope over the first grouping's partition too (intercept and slope eliminated together); ``root``
    columns of a low-rank root; ``slope``: a row weight on the last grouping."""
    gen = torch.Generator().manual_seed(seed)
    parts, blocks, flags, weights = [], [], [], []
    for j, (k, diag) in enumerate(zip(sizes, diagonal)):
        labels = torch.randint(0, k, (n,), generator=gen)
        labels[:k] = torch.randperm(k, generator=gen)  # every level occupied
        if j == 0:
            labels[k] = k  # a singleton level
            k += 1
        parts.append(Partition.from_labels(labels))
        if diag:
            blocks.append(torch.rand(*batch, k, generator=gen, dtype=torch.float64) + 0.2)
        else:
            W = torch.randn(*batch, k, k, generator=gen, dtype=torch.float64)
            blocks.append(W @ W.mT / k + 0.1 * torch.eye(k, dtype=torch.float64))
        flags.append(diag)
        weights.append(None)
    if slope:
        weights[-1] = torch.randn(n, generator=gen, dtype=torch.float64)
    if joint:  # a random slope over the first grouping's levels, diagonal, eliminated with its intercept
        parts.append(parts[0])
        blocks.append(torch.rand(*batch, parts[0].num_blocks, generator=gen, dtype=torch.float64) + 0.1)
        flags.append(True)
        weights.append(torch.randn(n, generator=gen, dtype=torch.float64))
    d = torch.rand(*batch, n, generator=gen, dtype=torch.float64) + 0.3
    U = torch.randn(*batch, n, root, generator=gen, dtype=torch.float64) / 2 if root else None
    leaves = [d, *blocks] + ([U] if U is not None else [])
    if grad:
        leaves = [t.clone().requires_grad_(True) for t in leaves]

    def make(ts, to):
        return BlockMeanSumLinearOperator(
            ts[0].to(to),
            *(b.to(to) for b in ts[1 : 1 + len(blocks)]),
            partitions=parts,
            root=ts[-1].to(to) if U is not None else None,
            weights=[None if w is None else w.to(to) for w in weights],
            diagonal=flags,
        )

    return make(leaves, dtype), (lambda: make(leaves, torch.float64).to_dense()), leaves


def dense_inverse_diagonal(dense):
    factor = torch.linalg.cholesky(dense)
    return torch.cholesky_inverse(factor).diagonal(dim1=-2, dim2=-1)


CASES = {
    "one diagonal grouping": {},
    "two diagonal groupings": {"diagonal": (True, True)},
    "three groupings": {"sizes": (9, 4, 3), "diagonal": (True, False, True)},
    "with a root": {"root": 3},
    "random slope on the rest": {"slope": True, "root": 2},
    "intercept and slope eliminated jointly": {"joint": True, "root": 2},
    "batch": {"batch": (2,), "root": 2},
    "batch, joint": {"batch": (3,), "joint": True},
    "nothing eliminated": {"diagonal": (False, False), "root": 2},
}


@pytest.mark.parametrize("case", CASES)
def test_inverse_diagonal_matches_the_dense_inverse(case):
    op, dense, _ = build(**CASES[case])
    eliminated = op._elimination_terms()
    assert bool(eliminated) == (case != "nothing eliminated")
    if "jointly" in case or case == "batch, joint":
        assert len(eliminated) == 2
    want = dense_inverse_diagonal(dense())
    torch.testing.assert_close(op._inverse_diagonal(), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.root_inv_decomposition().diagonal(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["one diagonal grouping", "intercept and slope eliminated jointly"])
def test_float32(case):
    op, dense, _ = build(torch.float32, **CASES[case])
    got = op._inverse_diagonal()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), dense_inverse_diagonal(dense()), rtol=2e-5, atol=0)


@pytest.mark.parametrize("case", ["with a root", "intercept and slope eliminated jointly", "nothing eliminated"])
def test_gradients_match_the_dense_inverse(case):
    """Gradients of a weighted sum of the inverse diagonal with respect to d, every B_j and the root."""
    op, dense, leaves = build(grad=True, **CASES[case])
    weights = torch.linspace(0.5, 1.5, op.shape[-1], dtype=torch.float64)
    got = torch.autograd.grad((op._inverse_diagonal() * weights).sum(), leaves)
    want = torch.autograd.grad((dense_inverse_diagonal(dense()) * weights).sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_only_the_rest_counts_against_the_capacitance_limit():
    """Past ``max_capacitance_size`` in q but not in the rest after elimination: the closed form runs (it raised,
    naming a q x q system); a sum that eliminates nothing still names the inverse diagonal's q x q system."""
    op, dense, _ = build(sizes=(30, 4), root=2)
    assert op.capacitance_size > 20 >= 4 + 2
    with settings.max_capacitance_size(20):
        got = op._inverse_diagonal()
    torch.testing.assert_close(got, dense_inverse_diagonal(dense()), rtol=1e-10, atol=1e-12)
    plain, _, _ = build(diagonal=(False, False))
    with settings.max_capacitance_size(5), pytest.raises(ValueError, match="diagonal of the inverse .* q x q system"):
        plain._inverse_diagonal()


def test_no_q_by_q_matrix_at_many_levels():
    """Two crossed intercepts of 4,000 and 20 levels: nothing of the size q x q (16 million entries) is allocated,
    and the result matches the inverse diagonal computed level by level from the dense Woodbury identity of the
    20-level rest (checked on a sample of rows)."""
    n, k1, k2 = 20000, 4000, 20
    gen = torch.Generator().manual_seed(3)
    l1, l2 = torch.randint(0, k1, (n,), generator=gen), torch.randint(0, k2, (n,), generator=gen)
    l1[:k1] = torch.arange(k1)
    parts = [Partition.from_labels(l1), Partition.from_labels(l2)]
    g1 = torch.rand(k1, generator=gen, dtype=torch.float64) + 0.5
    g2 = torch.rand(k2, generator=gen, dtype=torch.float64) + 0.5
    d = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    op = BlockMeanSumLinearOperator(d, g1, g2, partitions=parts, diagonal=[True, True])
    with LargestTensor() as seen:
        got = op._inverse_diagonal()
    assert seen.largest < (k1 + k2) ** 2 // 4, seen.where
    # reference: M = D' + P2 G2 P2^T with D' = D + P1 G1 P1^T (block diagonal by the first grouping's levels);
    # diag(M^{-1}) = diag(D'^{-1}) - diag(D'^{-1} P2 (G2^{-1} + P2^T D'^{-1} P2)^{-1} P2^T D'^{-1}), formed densely
    # for the rows of a few levels of the first grouping only
    dense_rows = torch.zeros(n, k2, dtype=torch.float64)  # P2^T D'^{-1} columns, one row per point
    a = torch.zeros(k1, dtype=torch.float64).index_add_(0, l1, 1 / d)  # 1^T D^{-1} 1 per level
    c = g1 / (1 + g1 * a)
    # D'^{-1} = D^{-1} - D^{-1} P1 diag(c) P1^T D^{-1}
    onehot2 = torch.nn.functional.one_hot(l2, k2).double()
    s = torch.zeros(k1, k2, dtype=torch.float64).index_add_(0, l1, onehot2 / d.unsqueeze(-1))  # P1^T D^-1 P2
    dense_rows = onehot2 / d.unsqueeze(-1) - (c[l1] / d).unsqueeze(-1) * s[l1]  # rows of D'^{-1} P2
    cap = torch.diag(1 / g2) + onehot2.T @ (onehot2 / d.unsqueeze(-1)) - s.T @ (c.unsqueeze(-1) * s)
    quad = (dense_rows @ torch.linalg.inv(cap) * dense_rows).sum(-1)
    want = 1 / d - c[l1] / d**2 - quad
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
