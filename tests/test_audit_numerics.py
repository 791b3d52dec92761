"""Numerical robustness of the closed forms against dense float64 references built from the same entries.

``inv_quad`` (the data-fit term of every GP marginal log likelihood) was ``r^T (M^{-1} r)``: the entries of
``M^{-1} r`` are of size ``r / lam`` and cancel within each block, so with a small noise ``lam`` and data off zero
the float32 result was off by several times itself (noise 1e-6 relative to the block variances, an offset of 10:
relative error 3.5, where a dense float32 Cholesky solve of the same matrix gives 5e-3)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from bma_gp import BlockMeanLinearOperator, Partition

pytestmark = pytest.mark.usefixtures("one_thread")  # small problems


def _problem(noise: float, diagonal: bool, offset: float = 10.0):
    """A random-effects covariance ``noise I + P B P^T`` over 20 blocks of 1..59 indices and a draw from it plus an
    offset, everything rounded to float32 once (the references read the same float32 entries in float64)."""
    gen = torch.Generator().manual_seed(0)
    k = 20
    sizes = torch.randint(1, 60, (k,), generator=gen)
    labels = torch.repeat_interleave(torch.arange(k), sizes)
    n = len(labels)
    if diagonal:
        B = torch.diag(torch.rand(k, generator=gen, dtype=torch.float64) + 0.5)
    else:
        W = torch.randn(k, 3, generator=gen, dtype=torch.float64)
        B = W @ W.T + torch.eye(k, dtype=torch.float64)
    effects = torch.linalg.cholesky(B) @ torch.randn(k, generator=gen, dtype=torch.float64)
    y = offset + effects[labels] + math.sqrt(noise) * torch.randn(n, generator=gen, dtype=torch.float64)
    lam = torch.full((k,), noise, dtype=torch.float64)
    return lam.float(), B.float(), y.float(), Partition.from_labels(labels, num_blocks=k)


def _dense(lam: Tensor, B: Tensor, part: Partition) -> Tensor:
    labels = part.labels
    return B.double()[labels][:, labels] + torch.diag(lam.double()[labels])


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("noise", [1e-4, 1e-6, 1e-8])
def test_float32_inv_quad_with_a_small_noise_matches_float64_of_the_same_entries(noise, diagonal):
    lam, B, y, part = _problem(noise, diagonal)
    M = _dense(lam, B, part)
    reference = float(y.double() @ torch.cholesky_solve(y.double().unsqueeze(-1), torch.linalg.cholesky(M)))
    for dtype in (torch.float32, torch.float64):
        op = BlockMeanLinearOperator(lam.to(dtype), B.to(dtype), part)
        inv_quad, logdet = op.inv_quad_logdet(y.to(dtype).unsqueeze(-1), logdet=True)
        # before: float32 relative errors 3e-3 (noise 1e-4), 3.5 (1e-6) and 12 (1e-8); float64 1e-6 at 1e-8
        assert abs(float(inv_quad) - reference) < 1e-5 * reference, (dtype, float(inv_quad), reference)
        assert float(op.inv_quad(y.to(dtype))) == pytest.approx(float(inv_quad), rel=1e-6)


def test_float32_inv_quad_gradients_with_a_small_noise_match_float64():
    lam, B, y, part = _problem(1e-6, diagonal=False)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        lam_ = lam.to(dtype).clone().requires_grad_()
        B_ = B.to(dtype).clone().requires_grad_()
        y_ = y.to(dtype).clone().requires_grad_()
        BlockMeanLinearOperator(lam_, B_, part).inv_quad(y_).backward()
        grads[dtype] = [t.grad.double() for t in (lam_, B_, y_)]
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        # before: the float32 gradients were off by 1e-3 to 1 relative
        assert torch.linalg.norm(g32 - g64) < 1e-4 * torch.linalg.norm(g64)
