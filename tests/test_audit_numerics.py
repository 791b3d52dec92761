"""Numerical robustness of the closed forms against dense float64 references built from the same entries.

``inv_quad`` (the data-fit term of every GP marginal log likelihood) was ``r^T (M^{-1} r)``: the entries of
``M^{-1} r`` are of size ``r / lam`` and cancel within each block, so with a small noise ``lam`` and data off zero
the float32 result was off by several times itself (noise 1e-6 relative to the block variances, an offset of 10:
relative error 3.5, where a dense float32 Cholesky solve of the same matrix gives 5e-3)."""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch
from torch import Tensor

from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, GroupGaussianLikelihood, GroupKernel, Partition

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


def _sum_problem(noise: float):
    """A random intercept over 40 groups of a float32 per-point noise diagonal, data with an offset of 10."""
    gen = torch.Generator().manual_seed(1)
    n, k = 3000, 40
    labels = torch.randint(0, k, (n,), generator=gen)
    effects = torch.randn(k, generator=gen, dtype=torch.float64)
    y = 10 + effects[labels] + math.sqrt(noise) * torch.randn(n, generator=gen, dtype=torch.float64)
    b = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    return torch.full((n,), noise).float(), b.float(), y.float(), labels


@pytest.mark.parametrize("with_root", [False, True])
def test_float32_sum_inv_quad_logdet_gradients_with_a_small_noise_match_float64(with_root):
    d, b, y, labels = _sum_problem(1e-6)
    part = Partition.from_labels(labels, num_blocks=40)
    root = 0.3 * torch.randn(len(labels), 3, generator=torch.Generator().manual_seed(2))
    grads = {}
    for dtype in (torch.float32, torch.float64):
        d_, b_, y_ = (t.to(dtype).clone().requires_grad_() for t in (d, b, y))
        op = BlockMeanSumLinearOperator(
            d_, b_, partitions=[part], diagonal=[True], root=root.to(dtype) if with_root else None
        )
        inv_quad, logdet = op.inv_quad_logdet(y_.unsqueeze(-1), logdet=True)
        grads[dtype] = [g.double() for g in torch.autograd.grad(inv_quad + logdet, [d_, b_, y_])]
    # the root's products differentiate in the root's precision (documented in _RootGram): 5e-5 through them
    tolerance = 1e-4 if with_root else 1e-5
    for name, g32, g64 in zip("dby", grads[torch.float32], grads[torch.float64]):
        # before: d and b off by 1.3 and 1.8 relative (the float32 gradients of two casts of d, of size
        # y^2 / d^2 = 1e14 each, summed after rounding), y by 2e-4
        assert torch.linalg.norm(g32 - g64) < tolerance * torch.linalg.norm(g64), name


def test_float32_group_noise_gradients_with_a_small_noise_match_float64():
    d, _, y, labels = _sum_problem(1e-6)
    x = labels.double().unsqueeze(-1)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        likelihood = GroupGaussianLikelihood(
            40, train_inputs=x.to(dtype), noise_constraint=gpytorch.constraints.GreaterThan(1e-10)
        ).to(dtype)
        likelihood.noise = 1e-6
        kernel = GroupKernel(40).to(dtype)
        prior = gpytorch.distributions.MultivariateNormal(torch.zeros(len(labels), dtype=dtype), kernel(x.to(dtype)))
        likelihood.train()
        likelihood(prior, x.to(dtype)).log_prob(y.to(dtype)).backward()
        grads[dtype] = likelihood.raw_noise.grad.double()
    # before: off by 8.9 relative (some groups' gradients 0 or of the wrong sign)
    assert torch.linalg.norm(grads[torch.float32] - grads[torch.float64]) < 1e-5 * torch.linalg.norm(
        grads[torch.float64]
    )
