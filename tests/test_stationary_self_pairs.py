"""The stationary engine's torch reduction leaves a diagonal tile's self pairs out of its lengthscale derivative sums.

The derivative sums are :math:`\\sum w_{pj} (z_{pa} - z_{ja})^2`, formed by one GEMM with the row features
:math:`[1, z_p, z_p^2]` as :math:`z_j^2 \\sum w - 2 z_j \\sum w z_p + \\sum w z_p^2`. For a self pair (:math:`p = j`)
the exact term is 0, but the expanded form adds and cancels :math:`w_{jj} z_j^2`: in float32 with unit-scale inputs
and a lengthscale of ``1e-4`` (:math:`z^2 \\sim 10^8`) that left a lengthscale gradient of about 0.2 where every
off-diagonal kernel value underflows to 0 and the true gradient is exactly 0 (the numba path and the generic engine
gave 0). The torch path is the CPU default for small ``n`` and the only one on CUDA; these tests force it.

Each case is checked against the float64 dense reference: the exact kernel matrix (from the differences, not the
expanded form) averaged over each block pair by hand (checked against :func:`test_kernel_block_mean._dense_reference`
at an ordinary lengthscale), with the derivative sums kept from forward and evaluated again in backward (rows
spanning one block and several, so both ways ``_tile_gradient`` applies the incoming gradient).
"""

import importlib

import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel

from bma_gp import Partition
from bma_gp.kernel_block_mean import kernel_block_mean
from test_kernel_block_mean import _dense_reference

stationary = importlib.import_module("bma_gp._kernel_sums.stationary")
jit = importlib.import_module("bma_gp._kernel_sums.jit")

pytestmark = pytest.mark.usefixtures("one_thread")

N, D = 96, 2

KERNELS = {
    "rbf": lambda **kw: RBFKernel(**kw),
    "matern05": lambda **kw: MaternKernel(nu=0.5, **kw),
    "matern15": lambda **kw: MaternKernel(nu=1.5, **kw),
    "matern25": lambda **kw: MaternKernel(nu=2.5, **kw),
}

# where backward gets the derivative sums: kept from forward (rows of few blocks), or every tile evaluated again
DERIVATIVES = {
    "kept": {},
    "evaluated_again": {"KEPT_DERIVATIVE_BYTES": 0, "KEPT_BYTES_PER_BLOCK_PAIR": 0},
}

# with tiles of 40 rows: blocks of 12 rows (tiles cut them, every tile's rows span several); two blocks of 48 (the
# first and last row groups lie in one block: backward applies G to H); scattered labels (7 row blocks per tile)
PARTITIONS = {
    "contiguous": lambda: Partition.from_labels(torch.arange(N) // 12),
    "two_blocks": lambda: Partition.from_labels(torch.arange(N) // 48),
    "scattered": lambda: Partition.from_labels(torch.randint(7, (N,), generator=torch.Generator().manual_seed(1))),
}


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """The torch reduction path (as on CUDA, and on CPU below ``jit.MIN_ENTRIES``); asserts numba never ran."""
    monkeypatch.setattr(jit, "BACKEND", "torch")
    monkeypatch.setattr(jit, "tile_sums", lambda *a, **k: pytest.fail("the numba reduction ran"))


def _x(dtype=torch.float64, seed=0):
    return torch.randn(N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _kernel(name, lengthscale, dtype, ard=False):
    kernel = ScaleKernel(KERNELS[name](**({"ard_num_dims": D} if ard else {}))).to(dtype)
    with torch.no_grad():
        ls = torch.full_like(kernel.base_kernel.lengthscale, lengthscale)
        if ard:  # different lengthscales per dimension
            ls = ls * torch.linspace(1.0, 1.5, D, dtype=ls.dtype)
        kernel.base_kernel.lengthscale = ls
        kernel.outputscale = 1.3
    return kernel


def _loss(lam, B):  # every entry of lam and B, with different weights
    k = B.shape[-1]
    w = torch.linspace(-1, 2, k, dtype=torch.float64)
    wB = torch.cos(torch.arange(k * k, dtype=torch.float64)).view(k, k)
    return (lam.double() * w).sum() + (B.double() * wB).sum()


def _fused(name, lengthscale, dtype, partition, ard=False, chunk_size=40):
    """Values and the raw lengthscale's gradient by the stationary engine (torch path) in ``dtype``."""
    kernel = _kernel(name, lengthscale, dtype, ard)
    op = kernel_block_mean(kernel, _x(dtype), partition, chunk_size=chunk_size, fused=True)
    (g,) = torch.autograd.grad(_loss(op.lam, op.B), kernel.base_kernel.raw_lengthscale)
    return op.lam.detach(), op.B.detach(), g


def _exact_kernel_matrix(name, kernel, x):
    r"""The float64 kernel matrix from the differences themselves (not :math:`|a|^2 + |b|^2 - 2 a \cdot b`, which
    gpytorch uses and which at :math:`|z| \sim 10^4` puts :math:`\sim 10^{-4}` on Matern's diagonal); the diagonal
    is exactly the outputscale, with no lengthscale dependence (and no 0/0 in the square root's gradient)."""
    diff = (x.unsqueeze(-2) - x.unsqueeze(-3)) / kernel.base_kernel.lengthscale
    eye = torch.eye(x.shape[-2], dtype=torch.bool)
    r2 = torch.where(eye, 1.0, diff.square().sum(-1))  # 1 on the diagonal: a finite placeholder, replaced below
    if name == "rbf":
        f = torch.exp(-0.5 * r2)
    else:
        nu = {"matern05": 0.5, "matern15": 1.5, "matern25": 2.5}[name]
        r = torch.sqrt(2 * nu * r2)
        poly = {0.5: 1.0, 1.5: 1.0 + r, 2.5: 1.0 + r + r.square() / 3.0}[nu]
        f = poly * torch.exp(-r)
    return kernel.outputscale * torch.where(eye, 1.0, f)


def _reference(name, lengthscale, partition, ard=False):
    r"""Values and the raw lengthscale's gradient of the float64 dense block means: the exact kernel matrix
    (:func:`_exact_kernel_matrix`) averaged over each block pair by hand, the diagonal left out of a block's own
    mean (:math:`B_{ii}`, 0 for a singleton) and :math:`\lambda_i = \sigma^2 - B_{ii}`."""
    kernel = _kernel(name, lengthscale, torch.float64, ard)
    K = _exact_kernel_matrix(name, kernel, _x())
    P = torch.nn.functional.one_hot(partition.labels, partition.num_blocks).to(K.dtype)
    s = P.sum(0)
    T = P.T @ K @ P
    B = T / torch.outer(s, s)
    within = s * (s - 1)
    b_ii = torch.where(within > 0, (T.diagonal() - s * kernel.outputscale) / within.clamp_min(1), 0.0)
    B = B - torch.diag(B.diagonal()) + torch.diag(b_ii)
    lam = kernel.outputscale - b_ii
    (g,) = torch.autograd.grad(_loss(lam, B), kernel.base_kernel.raw_lengthscale)
    return lam.detach(), B.detach(), g


@pytest.mark.parametrize("partition_name", list(PARTITIONS))
@pytest.mark.parametrize("name", list(KERNELS))
def test_the_reference_is_the_dense_block_mean(name, partition_name):
    """At an ordinary lengthscale the hand-made reference is the dense block mean of gpytorch's kernel matrix."""
    partition = PARTITIONS[partition_name]()
    lam, B, g = _reference(name, 0.7, partition, ard=True)
    kernel = _kernel(name, 0.7, torch.float64, ard=True)
    ref = _dense_reference(kernel, _x(), partition)
    (g_ref,) = torch.autograd.grad(_loss(ref.lam, ref.B), kernel.base_kernel.raw_lengthscale)
    # gpytorch's diagonal distances are sqrt(rounding noise), ~1e-8: Matern's diagonal (and so lam) is off by as much
    torch.testing.assert_close(lam, ref.lam.detach(), rtol=0, atol=1e-7)
    torch.testing.assert_close(B, ref.B.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-12)  # and the diagonal has a gradient there


def _set(monkeypatch, derivatives):
    for attr, value in DERIVATIVES[derivatives].items():
        monkeypatch.setattr(stationary, attr, value)


@pytest.mark.parametrize("derivatives", list(DERIVATIVES))
@pytest.mark.parametrize("partition_name", list(PARTITIONS))
@pytest.mark.parametrize("ard", [False, True])
@pytest.mark.parametrize("name", list(KERNELS))
def test_float32_lengthscale_gradient_is_zero_when_every_pair_underflows(
    name, ard, partition_name, derivatives, monkeypatch
):
    """Lengthscale 1e-4 on unit-scale inputs: the kernel matrix is the outputscale times the identity to float32's
    and float64's precision (the nearest pairs are about 400 lengthscales apart: every
    off-diagonal value is below 1e-170), and the lengthscale gradient is 0 (the float64 dense one is at most 1e-14)."""
    _set(monkeypatch, derivatives)
    partition = PARTITIONS[partition_name]()
    lam_ref, B_ref, g_ref = _reference(name, 1e-4, partition, ard)
    assert g_ref.abs().max().item() <= 1e-12, g_ref
    lam, B, g = _fused(name, 1e-4, torch.float32, partition, ard)
    torch.testing.assert_close(lam.double(), lam_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(B.double(), B_ref, rtol=0, atol=1e-12)
    # was about 0.2 for RBF and Matern 3/2, 5/2: the self pairs' rounding error, of the order of eps * z^2 ~ 10
    assert g.abs().max().item() <= 1e-6, g


def test_float32_lengthscale_gradient_is_zero_with_a_batch_of_lengthscales():
    batch = torch.Size([2])
    partition = PARTITIONS["scattered"]()
    kernel = ScaleKernel(RBFKernel(ard_num_dims=D, batch_shape=batch), batch_shape=batch).float()
    with torch.no_grad():
        kernel.base_kernel.lengthscale = torch.tensor([[[1e-4, 2e-4]], [[3e-4, 1e-4]]])
    op = kernel_block_mean(kernel, _x(torch.float32), partition, chunk_size=40, fused=True)
    assert op.B.shape == (2, partition.num_blocks, partition.num_blocks)
    # not lam.sum() + B.sum(): its gradient on a block's own sum is 0, and so the self pairs' weight
    (g,) = torch.autograd.grad(_loss(op.lam, op.B), kernel.base_kernel.raw_lengthscale)
    assert g.abs().max().item() <= 1e-6, g


# ordinary lengthscales: the float32 lengthscale gradient's largest error against float64, relative to the largest
# gradient. Measured on these cases (2 cores, one thread): at most 5.6e-7 (RBF), 2.9e-6 (Matern 1/2, which had no
# self pairs in its sums: its weight is 0 at distance 0), 1.3e-6 (3/2), 7.1e-7 (5/2) with the fix, against 1.2e-6,
# 2.9e-6, 1.1e-5 and 5.2e-6 with the self pairs kept in
ORDINARY_RTOL = {"rbf": 3e-6, "matern05": 6e-6, "matern15": 3e-6, "matern25": 3e-6}
LENGTHSCALES = [0.3, 1.0, 3.0]


@pytest.mark.parametrize("derivatives", list(DERIVATIVES))
@pytest.mark.parametrize("partition_name", list(PARTITIONS))
@pytest.mark.parametrize("lengthscale", LENGTHSCALES)
@pytest.mark.parametrize("name", list(KERNELS))
def test_float32_gradients_at_ordinary_lengthscales(name, lengthscale, partition_name, derivatives, monkeypatch):
    _set(monkeypatch, derivatives)
    partition = PARTITIONS[partition_name]()
    lam_ref, B_ref, g_ref = _reference(name, lengthscale, partition, ard=True)
    lam, B, g = _fused(name, lengthscale, torch.float32, partition, ard=True)
    torch.testing.assert_close(lam.double(), lam_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B.double(), B_ref, rtol=1e-5, atol=1e-6)
    scale = g_ref.abs().max().item()
    assert (g.double() - g_ref).abs().max().item() <= ORDINARY_RTOL[name] * scale, (g, g_ref)


def _gradient_error(name, lengthscale, partition):
    g_ref = _reference(name, lengthscale, partition, ard=True)[2]
    g = _fused(name, lengthscale, torch.float32, partition, ard=True)[2]
    return ((g.double() - g_ref).abs().max() / g_ref.abs().max()).item()


@pytest.mark.parametrize("name", list(KERNELS))
def test_float32_gradient_errors_are_no_larger_than_with_the_self_pairs_kept(name, monkeypatch):
    """Summed over the ordinary cases above, the float32 gradients' errors with the self pairs left out are at most
    those with them kept in (``_without_self_pairs`` made to do nothing: the code before the fix). Case by case the
    two differ by rounding noise either way; the self pairs' cancellation only adds error."""
    errors = {"left_out": 0.0, "kept_in": 0.0}
    for attrs in DERIVATIVES.values():
        with monkeypatch.context() as patch:
            for attr, value in attrs.items():
                patch.setattr(stationary, attr, value)
            for lengthscale in LENGTHSCALES:
                for make in PARTITIONS.values():
                    errors["left_out"] += _gradient_error(name, lengthscale, make())
                    with monkeypatch.context() as before:
                        before.setattr(stationary, "_without_self_pairs", lambda weights, tile: weights)
                        errors["kept_in"] += _gradient_error(name, lengthscale, make())
    # 10% to spare for another BLAS's summation order (RBF's margin here is 1.3x, Matern's 2-5x)
    assert errors["left_out"] <= 1.1 * errors["kept_in"], errors


@pytest.mark.parametrize("derivatives", list(DERIVATIVES))
@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_do_not_change_and_float64_gradients_match_dense(name, dtype, derivatives, monkeypatch):
    """The value sums still read every self pair (RBF's derivative weights are its values: the self pairs are
    zeroed only after the value sums), bit for bit what they were with the self pairs kept in the derivative sums."""
    _set(monkeypatch, derivatives)
    partition = PARTITIONS["contiguous"]()
    lam, B, g = _fused(name, 0.7, dtype, partition, ard=True)
    monkeypatch.setattr(stationary, "_without_self_pairs", lambda weights, tile: weights)  # as before the fix
    lam_kept, B_kept, _ = _fused(name, 0.7, dtype, partition, ard=True)
    assert torch.equal(lam, lam_kept) and torch.equal(B, B_kept)
    if dtype == torch.float64:
        lam_ref, B_ref, g_ref = _reference(name, 0.7, partition, ard=True)
        torch.testing.assert_close(B, B_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lam, lam_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


def test_only_diagonal_tiles_lose_their_self_pairs():
    Tile = stationary.Tile
    w = torch.ones(2, 3, 3)
    stationary._without_self_pairs(w, Tile(0, 3, 0, 3, False, 0, 1, 0, 1))
    assert torch.equal(w, (1 - torch.eye(3)).expand(2, 3, 3))
    w = torch.ones(2, 3, 4)
    stationary._without_self_pairs(w, Tile(0, 3, 3, 7, True, 0, 1, 0, 1))  # right of the diagonal: no self pairs
    assert torch.equal(w, torch.ones(2, 3, 4))
