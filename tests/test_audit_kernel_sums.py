"""Audit of kernel_block_mean's engines: regressions found against dense references."""

import importlib
from unittest import mock

import gpytorch
import pytest
import torch
from gpytorch.kernels import Kernel, MaternKernel, PeriodicKernel, RBFKernel, ScaleKernel

from bma_gp import BlockMeanKernel, Partition, block_mean
from bma_gp.kernel_block_mean import kernel_block_mean

generic = importlib.import_module("bma_gp._kernel_sums.generic")
kbm = importlib.import_module("bma_gp.kernel_block_mean")
jit = importlib.import_module("bma_gp._kernel_sums.jit")
bmk = importlib.import_module("bma_gp.kernels.block_mean_kernel")


def test_generic_default_chunk_counts_the_kernels_batch_shape():
    """The default chunk holds about ``_CHUNK_BYTES`` of kernel values whatever carries the batch: a batch
    kernel on unbatched inputs (4 hyperparameter settings) evaluates 4 ``chunk x n`` matrices per chunk, so the
    chunk must be 4 times shorter than for one kernel. It used to count the batch of ``x`` only, so a batch of
    8 kernels on n = 20,000 points took 8 times the memory (at n = 8,000 and a batch of 4, 5 GB: more than the
    dense batch of kernel matrices)."""
    n, batch = 200, 4
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    partition = Partition.from_labels(torch.arange(n) % 5)
    kernel = ScaleKernel(PeriodicKernel(batch_shape=torch.Size([batch])), batch_shape=torch.Size([batch])).double()
    budget = 20 * n * x.element_size() * batch  # 20 rows of a batch of 4
    largest = []
    evaluate = generic.evaluate

    def recording(kernel, x1, x2):
        values = evaluate(kernel, x1, x2)
        largest.append(values.numel() * values.element_size())
        return values

    with mock.patch.object(kbm, "_CHUNK_BYTES", budget), mock.patch.object(generic, "evaluate", recording):
        op = kernel_block_mean(kernel, x, partition)
        op.B.sum().backward()
    assert op.B.shape == (batch, 5, 5)
    assert max(largest) <= budget


class _Warped(Kernel):
    """An RBF kernel on ``net(x)``, where ``net`` is held without registering it (e.g. shared with the model)."""

    def __init__(self, net):
        super().__init__()
        self.__dict__["net"] = net
        self.inner = RBFKernel()

    def forward(self, x1, x2, diag=False, **params):
        return self.inner.forward(self.net(x1), self.net(x2), diag=diag)


def test_generic_engine_refuses_a_kernel_with_unregistered_tensors_needing_gradients():
    """The generic engine differentiates only ``kernel.parameters()`` and ``x``; a kernel whose values depend on
    another tensor that needs a gradient used to get no gradient for it, silently (the dense kernel gets one)."""
    net = torch.nn.Linear(2, 2).double()
    kernel = _Warped(net).double()
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    partition = Partition.from_labels(torch.arange(40) % 4)
    with pytest.raises(ValueError, match="not one of _Warped's parameters"):
        kernel_block_mean(kernel, x, partition)
    with torch.no_grad():  # nothing to differentiate: allowed
        kernel_block_mean(kernel, x, partition)
    # registered, the same kernel is differentiated like the dense one
    kernel.net = net
    op = kernel_block_mean(kernel, x, partition)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        ref = block_mean(kernel(x, x).to_dense(), partition)
    torch.testing.assert_close(op.B, ref.B, rtol=1e-10, atol=1e-12)
    g = torch.autograd.grad(op.B.square().sum(), [net.weight])[0]
    g_ref = torch.autograd.grad(ref.B.square().sum(), [net.weight])[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_cross_covariance_chunk_counts_the_kernels_batch_shape():
    """``BlockMeanKernel``'s cross-covariance evaluates at most ``_CROSS_CHUNK_ENTRIES`` kernel entries at once;
    with a batch kernel on unbatched inputs it counted one matrix per chunk instead of ``batch`` of them."""
    n, t, batch = 200, 100, 4
    gen = torch.Generator().manual_seed(0)
    x, x_new = (
        torch.randn(n, 2, generator=gen, dtype=torch.float64),
        torch.randn(t, 2, generator=gen, dtype=torch.float64),
    )
    base = ScaleKernel(RBFKernel(batch_shape=torch.Size([batch])), batch_shape=torch.Size([batch])).double()
    kernel = BlockMeanKernel(base, x, Partition.from_labels(torch.arange(n) % 5))
    budget = 10 * n * batch  # entries: 10 rows of a batch of 4
    largest = []
    base_dense = BlockMeanKernel._base_dense

    def recording(self, x1, x2):
        values = base_dense(self, x1, x2)
        largest.append(values.numel())
        return values

    with (
        mock.patch.object(bmk, "_CROSS_CHUNK_ENTRIES", budget),
        mock.patch.object(BlockMeanKernel, "_base_dense", recording),
    ):
        cross = kernel(x_new, x).to_dense()
    assert cross.shape == (batch, t, n)
    assert max(largest) <= budget


def _exact_matern12(kernel, x):
    """``kernel(x, x)`` for ``ScaleKernel(MaternKernel(nu=0.5))`` from exact differences (0 at duplicates)."""
    base = kernel.base_kernel
    r2 = ((x.unsqueeze(-2) - x.unsqueeze(-3)) / base.lengthscale).square().sum(-1)
    r = torch.where(r2 > 0, r2.clamp_min(1e-300).sqrt(), torch.zeros_like(r2))
    return kernel.outputscale * torch.exp(-r)


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("lengthscale", [0.01, 0.001])
def test_matern12_lengthscale_gradient_with_duplicate_points(backend, lengthscale, monkeypatch):
    """Matern-1/2's derivative weight is ``exp(-rho) / rho``. At duplicate points the tiled distance GEMM gives a
    rounding-noise ``rho^2`` instead of 0, so the weight was huge, and torch's route multiplied it by a squared
    difference from the feature GEMM that is noise as well: a spurious gradient, relative error 1e-4 at
    lengthscale 0.01 and 1e13 at 0.001 on data spread over [0, 10] (the numba route takes exact differences)."""
    monkeypatch.setattr(jit, "BACKEND", backend)
    monkeypatch.setattr(jit, "MIN_ENTRIES", 0)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(100, 2, generator=gen, dtype=torch.float64) * 10
    x = torch.cat([x0, x0, x0])  # every point three times
    partition = Partition.from_labels(torch.randint(3, (300,), generator=gen))
    kernel = ScaleKernel(MaternKernel(nu=0.5)).double()
    kernel.base_kernel.lengthscale = lengthscale
    raw = kernel.base_kernel.raw_lengthscale

    def loss(op):
        w = torch.linspace(-1, 2, op.B.shape[-1], dtype=op.B.dtype)
        return (op.lam * w).sin().sum() + (op.B * w).square().sum() + (op.B * w.unsqueeze(-1)).sum()

    g_ref = torch.autograd.grad(loss(block_mean(_exact_matern12(kernel, x), partition)), raw)[0]
    for chunk in (None, 64):
        g = torch.autograd.grad(loss(kernel_block_mean(kernel, x, partition, chunk_size=chunk, fused=True)), raw)[0]
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=0)
