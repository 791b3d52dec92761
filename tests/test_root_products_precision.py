"""A float32 low-rank root's products in a sum are formed in float64 (``bma_gp.settings.fast_root_products`` off).

``BlockMeanSumLinearOperator`` needs ``U^T D^{-1} U`` and the block sums ``P_j^T D^{-1} U``. Formed in float32 (each
entry of ``U d^{-1}`` rounded, then a float32 GEMM), their rounding reached the nearly null directions of a root
with close inducing points, and the log-determinant of a float32 sum was off by 2.7 to 45 at condition numbers of
10^7 to 10^9, with no error. The reference here is the same operator in float64 built from the float32 entries: the
float32 answer should differ from it by the rounding of its own output only.
"""

from __future__ import annotations

import pytest
import torch

import bma_gp
from bma_gp import BlockMeanSumLinearOperator, Partition

pytestmark = pytest.mark.usefixtures("one_thread")

N, M = 1500, 24


def sgpr_root(lengthscale: float, n: int = N, m: int = M, seed: int = 0) -> torch.Tensor:
    """``K_xz L^{-T}`` of an RBF kernel with ``m`` evenly spaced inducing points on [0, 1]: close points make its
    columns nearly collinear. Rounded to float32 values, returned in float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=gen, dtype=torch.float64)
    z = torch.linspace(0, 1, m, dtype=torch.float64).unsqueeze(-1)

    def k(a, b):
        return torch.exp(-0.5 * torch.cdist(a, b) ** 2 / lengthscale**2)

    L = torch.linalg.cholesky(k(z, z) + 1e-6 * torch.eye(m, dtype=torch.float64))
    return torch.linalg.solve_triangular(L, k(z, x), upper=False).mT.float().double()


def pieces(noise: float, lengthscale: float = 0.3, weighted: bool = False, seed: int = 0):
    """A float64 sum over two crossed partitions (scattered labels, a singleton level) plus an SGPR root, every
    input exactly representable in float32, and its float32 twin."""
    gen = torch.Generator().manual_seed(seed + 1)
    labels = [torch.randint(0, k, (N,), generator=gen) for k in (40, 15)]
    labels[0][7] = 40  # a level with one row
    parts = [Partition.from_labels(lab) for lab in labels]
    blocks = []
    for k in (41, 15):
        W = torch.randn(k, k, generator=gen, dtype=torch.float64)
        blocks.append((W @ W.mT / k + 0.5 * torch.eye(k, dtype=torch.float64)).float().double())
    d = (noise * (torch.rand(N, generator=gen, dtype=torch.float64) + 0.5)).float().double()
    weights = [None, torch.randn(N, generator=gen, dtype=torch.float64).float().double() if weighted else None]
    U = sgpr_root(lengthscale, seed=seed)
    y = torch.randn(N, 2, generator=gen, dtype=torch.float64).float().double()
    op64 = BlockMeanSumLinearOperator(d, *blocks, partitions=parts, root=U, weights=weights)
    op32 = BlockMeanSumLinearOperator(
        d.float(),
        *(b.float() for b in blocks),
        partitions=parts,
        root=U.float(),
        weights=[None if w is None else w.float() for w in weights],
    )
    return op64, op32, y


def errors(op64, op32, y):
    """Absolute log-determinant error and relative inverse-quadratic-form error of the float32 operator."""
    iq64, ld64 = op64.inv_quad_logdet(y, logdet=True)
    iq32, ld32 = op32.inv_quad_logdet(y.float(), logdet=True)
    return abs(ld32.item() - ld64.item()), abs(iq32.item() - iq64.item()) / iq64.item(), ld64.item()


@pytest.mark.parametrize("noise", [1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize("lengthscale", [0.1, 0.3])
def test_float32_logdet_is_that_of_its_entries(noise, lengthscale):
    op64, op32, y = pieces(noise, lengthscale)
    cond = torch.linalg.cond(op64.to_dense()).item()
    assert cond > 1e3 / noise  # ill-conditioned on purpose: 10^5 to 10^9
    ld_err, iq_err, ld = errors(op64, op32, y)
    # the float32 output's own rounding: a few ulps of |logdet| (~0.004 at |logdet| ~ 5e4), nothing more
    assert ld_err < 8 * abs(ld) * 2.0**-24 + 1e-3
    assert iq_err < 1e-5


def test_fast_root_products_trade_accuracy_for_time():
    """The switch brings back the float32 products, and with them the error this precision fixes."""
    op64, _, y = pieces(1e-4, 0.3)
    exact = errors(op64, pieces(1e-4, 0.3)[1], y)[0]
    with bma_gp.settings.fast_root_products(True):
        fast = errors(op64, pieces(1e-4, 0.3)[1], y)[0]
    assert bma_gp.settings.fast_root_products.on() is False
    assert fast > 10 * exact and fast > 1e-2


def test_weighted_partition_and_gradients():
    """A random slope's weighted block sums are formed in float64 too; gradients (formed in float32) agree with the
    float64 operator's at a moderate condition number."""
    op64, op32, y = pieces(1e-2, 0.3, weighted=True)
    ld_err, iq_err, ld = errors(op64, op32, y)
    assert ld_err < 8 * abs(ld) * 2.0**-24 + 1e-3 and iq_err < 1e-5

    def grads(op, dtype):
        d = op.diag_values.detach().clone().requires_grad_(True)
        U = op.root.detach().clone().requires_grad_(True)
        B = op.blocks[0].detach().clone().requires_grad_(True)
        again = BlockMeanSumLinearOperator(d, B, op.blocks[1], partitions=op.partitions, root=U, weights=op.weights)
        iq, ld = again.inv_quad_logdet(y.to(dtype), logdet=True)
        (iq + ld).backward()
        return [t.grad.double() for t in (d, U, B)]

    for g32, g64 in zip(grads(op32, torch.float32), grads(op64, torch.float64)):
        assert torch.allclose(g32, g64, rtol=2e-3, atol=2e-3 * g64.abs().max().item())


def test_batched_root():
    parts = [Partition.from_labels(torch.arange(N) % 7)]
    U = torch.stack([sgpr_root(0.3, seed=s) for s in (0, 1)])
    d = torch.full((2, N), 1e-4, dtype=torch.float64)
    B = torch.eye(7, dtype=torch.float64).expand(2, 7, 7)
    op64 = BlockMeanSumLinearOperator(d, B, partitions=parts, root=U)
    op32 = BlockMeanSumLinearOperator(d.float(), B.float(), partitions=parts, root=U.float())
    ld64, ld32 = op64.logdet(), op32.logdet()
    assert ld32.shape == (2,)
    assert torch.allclose(ld32.double(), ld64, rtol=8 * 2.0**-24, atol=1e-3)


def test_float64_roots_are_untouched():
    op64, _, y = pieces(1e-4)
    plain = op64.inv_quad_logdet(y, logdet=True)
    with bma_gp.settings.fast_root_products(True):
        again = BlockMeanSumLinearOperator(
            op64.diag_values, *op64.blocks, partitions=op64.partitions, root=op64.root
        ).inv_quad_logdet(y, logdet=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, again))


def test_setting_takes_a_bool_and_nests():
    with pytest.raises(TypeError, match="fast_root_products takes True or False"):
        bma_gp.settings.fast_root_products("false")
    switch = bma_gp.settings.fast_root_products(True)
    with switch:
        with bma_gp.settings.fast_root_products(False):
            assert not bma_gp.settings.fast_root_products.on()
        with switch:
            assert bma_gp.settings.fast_root_products.on()
        assert bma_gp.settings.fast_root_products.on()
    assert not bma_gp.settings.fast_root_products.on()
