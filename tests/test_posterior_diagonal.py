"""The variances of the posterior at the training inputs without the ``q x q`` weight ``H``.

``_posterior_quadratic_diagonal`` reads :math:`z_a^\top H z_a` from the blocks of the capacitance factorisation
(the eliminated grouping's level blocks, :math:`T Q` and :math:`Q`); the reference forms :math:`H = C^{-1} G` by
``q`` solves and gathers its entries. Compared in value and gradient over the shapes the factorisation takes: one
eliminated grouping with a dense or a sparse (nonzero cells) crossed grouping, a low-rank root, jointly eliminated
terms (correlated random slopes), batches, float32.
"""

from __future__ import annotations

import pytest
import torch

import bma_gp
from bma_gp import BlockMeanSumLinearOperator, Partition
from bma_gp.block_mean_sum_linear_operator import SPARSE_CELLS_DENSITY, _Cells
from bma_gp.kernels.sum_prediction_strategy import (
    _posterior_quadratic_diagonal,
    _quadratic_diagonal,
    _training_weight,
)


def labels(n, k, gen):
    return torch.unique(torch.randint(0, k, (n,), generator=gen), return_inverse=True)[1]


def build(case, batch=(), dtype=torch.float64, seed=0):
    """``(M, leaves)`` for one shape of the capacitance factorisation."""
    gen = torch.Generator().manual_seed(seed)
    n = 400
    big = Partition.from_labels(labels(n, 120, gen))  # the eliminated grouping (most levels, diagonal)
    k_big = big.num_blocks
    d = (torch.rand(*batch, n, generator=gen, dtype=torch.float64) + 0.3).to(dtype).requires_grad_(True)
    v = (torch.rand(*batch, k_big, generator=gen, dtype=torch.float64) + 0.2).to(dtype).requires_grad_(True)
    leaves = [d, v]
    blocks, partitions, diagonal, weights = [v], [big], [True], [None]
    root = None
    if case in ("dense_cross", "cells_cross", "root", "everything"):
        k2 = 100 if case == "cells_cross" else 7
        p2 = Partition.from_labels(labels(n, k2, gen))
        W = torch.randn(*batch, p2.num_blocks, p2.num_blocks, generator=gen, dtype=torch.float64)
        B2 = (W @ W.mT / p2.num_blocks + 0.1 * torch.eye(p2.num_blocks, dtype=torch.float64)).to(dtype)
        B2.requires_grad_(True)
        blocks.append(B2)
        partitions.append(p2)
        diagonal.append(False)
        weights.append(None)
        leaves.append(B2)
    if case in ("root", "everything", "slopes_root"):
        root = (torch.randn(*batch, n, 3, generator=gen, dtype=torch.float64) / 2).to(dtype).requires_grad_(True)
        leaves.append(root)
    if case.startswith("slopes") or case == "everything":
        x = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
        for w in (x, 1 + 0.5 * x):  # the slope and correlation terms of GroupKernel(slope=True)
            b = (torch.rand(*batch, k_big, generator=gen, dtype=torch.float64) + 0.1).to(dtype).requires_grad_(True)
            blocks.append(b)
            partitions.append(big)
            diagonal.append(True)
            weights.append(w)
            leaves.append(b)
    M = BlockMeanSumLinearOperator(d, *blocks, partitions=partitions, root=root, weights=weights, diagonal=diagonal)
    return M, leaves


CASES = ["alone", "dense_cross", "cells_cross", "root", "slopes", "slopes_root", "everything"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("case", CASES)
def test_structured_diagonal_matches_the_formed_weight(case, batch, dtype):
    M, leaves = build(case, batch, dtype)
    cap = M._capacitance()
    assert cap.elim is not None or cap.joint is not None
    if case == "cells_cross":  # the crossed grouping's table is held as its nonzero cells
        assert not torch.is_tensor(cap.A_re.pieces[0])
    got = _posterior_quadratic_diagonal(M)
    want = _quadratic_diagonal(M, _training_weight(M), M._sizes())
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got, want, **tol)
    assert bool((got > 0).all())
    w = torch.randn(got.shape, dtype=got.dtype)
    got_g = torch.autograd.grad((got * w).sum(), leaves)
    want_g = torch.autograd.grad((want * w).sum(), leaves)
    for g, ref in zip(got_g, want_g):
        torch.testing.assert_close(g, ref, **tol)


def test_cells_case_is_sparse_by_the_density_rule():
    M, _ = build("cells_cross")
    n, k_e, k_t = M.shape[-1], M.num_blocks[0], M.num_blocks[1]
    assert n <= SPARSE_CELLS_DENSITY * k_t * k_e
    assert _Cells.build(M.partitions[1], M.partitions[0]).count < k_t * k_e


def test_variances_past_the_capacitance_limit_need_no_q_by_q_matrix():
    """A sum whose q passes max_capacitance_size while its factorisation (after the elimination) fits: the
    variances, products and draws of its training posterior are closed form; a root names q."""
    from bma_gp.kernels.sum_prediction_strategy import TrainingPosteriorLinearOperator

    M, _ = build("everything")
    with torch.no_grad():
        ref = _quadratic_diagonal(M, _training_weight(M), M._sizes())
        n = M.shape[-1]
        s = torch.zeros(n, dtype=M.dtype)
        beta = torch.ones(n, dtype=M.dtype)
        full = TrainingPosteriorLinearOperator(s, beta, M)
        probe = torch.randn(n, 2, dtype=M.dtype)
        want_product = full @ probe
        rest = sum(M._sizes()) - 3 * M.num_blocks[0]
        with bma_gp.settings.max_capacitance_size(rest):
            post = TrainingPosteriorLinearOperator(s, beta, M)
            torch.testing.assert_close(post.diagonal(dim1=-2, dim2=-1), ref.clamp_min(0), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(post @ probe, want_product, rtol=1e-10, atol=1e-12)
            assert post.zero_mean_mvn_samples(2).shape == (2, n)
            with pytest.raises(ValueError, match=r"a root .* needs a \d+ x \d+ matrix"):
                post.root_decomposition().root.to_dense()


def test_draws_and_variances_are_differentiable():
    """The draw map (conditioned prior draws, fixed noise) and the variances of the training posterior, against
    finite differences (``torch.autograd.gradcheck``) in every input: a diagonal grouping, a dense crossed one, a
    root, and the two slope terms over the eliminated grouping."""
    from bma_gp.kernels.sum_prediction_strategy import TrainingPosteriorLinearOperator

    gen = torch.Generator().manual_seed(7)
    n = 30
    big = Partition.from_labels(labels(n, 9, gen))
    p2 = Partition.from_labels(labels(n, 3, gen))
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    k1, k2 = big.num_blocks, p2.num_blocks
    W = torch.randn(k2, k2, generator=gen, dtype=torch.float64)
    inputs = (
        torch.rand(n, generator=gen, dtype=torch.float64) + 0.3,  # d
        torch.rand(k1, generator=gen, dtype=torch.float64) + 0.2,  # intercept variances
        W @ W.mT / k2 + 0.2 * torch.eye(k2, dtype=torch.float64),  # B_2
        torch.rand(k1, generator=gen, dtype=torch.float64) + 0.1,  # slope
        torch.rand(k1, generator=gen, dtype=torch.float64) + 0.1,  # correlation term
        torch.randn(n, 2, generator=gen, dtype=torch.float64) / 2,  # root
    )
    inputs = tuple(t.requires_grad_(True) for t in inputs)
    noise = torch.randn(k1 * 3 + k2 + 2 + 2 * n, 2, generator=gen, dtype=torch.float64)

    def posterior(d, v, B2, slope, corr, root):
        M = BlockMeanSumLinearOperator(
            d,
            v,
            0.5 * (B2 + B2.mT),
            slope,
            corr,
            partitions=[big, p2, big, big],
            root=root,
            weights=[None, None, x, 1 + 0.5 * x],
            diagonal=[True, False, True, True],
        )
        return TrainingPosteriorLinearOperator(0.3 * d, torch.ones_like(d) * 0.8, M)

    assert torch.autograd.gradcheck(lambda *a: posterior(*a)._pathwise(noise), inputs, fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: posterior(*a).diagonal(dim1=-2, dim2=-1), inputs, fast_mode=True)
