"""Audit of BlockMeanKernel / kernel_block_mean with the base kernels GPyTorch users wrap: regressions found."""

from unittest import mock

import gpytorch
import pytest
import torch
from gpytorch.kernels import LinearKernel, RBFKernel, ScaleKernel

from bma_gp import Partition, block_mean
from bma_gp.kernel_block_mean import kernel_block_mean


def _no_cholesky(*args, **kwargs):
    raise AssertionError("a dense Cholesky factorisation was run")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_generic_engine_does_not_factorise_a_sum_with_a_linear_kernel(dtype):
    """With one chunk of all the rows the generic engine evaluated ``kernel(x, x)``: ``LinearKernel`` returns a root
    there, and linear_operator adds a dense matrix and a root by a root decomposition of the dense one, an ``n x n``
    Cholesky (with jitter; ``NotPSDError`` in float32 for a smooth RBF part)."""
    n = 300
    x = torch.rand(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    partition = Partition.from_labels(torch.randint(10, (n,), generator=torch.Generator().manual_seed(1)))
    kernel = (ScaleKernel(RBFKernel()) + LinearKernel()).to(dtype)
    smooth, linear = kernel.kernels
    smooth.base_kernel.lengthscale = 3.0
    smooth.outputscale = 1e4
    with (
        mock.patch.object(torch.linalg, "cholesky", _no_cholesky),
        mock.patch.object(torch.linalg, "cholesky_ex", _no_cholesky),
    ):
        op = kernel_block_mean(kernel, x, partition)
        op.B.sum().backward()
    xd = x.double()
    with gpytorch.settings.lazily_evaluate_kernels(False), torch.no_grad():
        dense = smooth.double()(xd, xd).to_dense() + linear.variance.double() * (xd @ xd.mT)
    ref = block_mean(dense, partition)
    torch.testing.assert_close(op.B.double(), ref.B, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    assert linear.raw_variance.grad is not None and smooth.raw_outputscale.grad is not None
