"""A batch kernel over unbatched inputs of exactly batch-size rows: GPyTorch's ``Kernel.__call__(diag=True)`` takes
its ``(b, t)`` result for a ``t x t`` matrix when ``b == t`` and returns the wrong diagonal. The package's own
diagonal evaluations (the generic engine's exact diagonal per chunk, BlockMeanKernel's diagonal at new points, the
SGPR correction) expand the inputs to the batch first."""

import pytest
import torch
from gpytorch.kernels import LinearKernel, RBFKernel, ScaleKernel

from bma_gp import Partition, kernel_block_mean
from bma_gp._kernel_sums.generic import kernel_diagonal
from bma_gp.kernels import BlockMeanKernel

BATCH = torch.Size([2])


def _scaled(base):
    kernel = ScaleKernel(base, batch_shape=BATCH).double()
    with torch.no_grad():
        kernel.outputscale = torch.tensor([1.0, 3.0], dtype=torch.float64)
    return kernel


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5])
def test_generic_engine_with_a_chunk_of_batch_size_rows(chunk_size):
    kernel = _scaled(RBFKernel(batch_shape=BATCH))
    x = torch.randn(6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    partition = Partition.from_labels(torch.arange(6))  # singletons: lam is the diagonal of K
    op = kernel_block_mean(kernel, x, partition, chunk_size=chunk_size, fused=False)  # chunk 4: a last chunk of 2
    K = kernel(x, x).to_dense().detach()
    torch.testing.assert_close(op.to_dense().detach(), K)
    # and the gradients of the outputscale, which the diagonal carries
    (g,) = torch.autograd.grad(op.lam.sum(), kernel.raw_outputscale)
    (g_ref,) = torch.autograd.grad(kernel(x, x).to_dense().diagonal(dim1=-2, dim2=-1).sum(), kernel.raw_outputscale)
    torch.testing.assert_close(g, g_ref)


def test_block_mean_kernel_diagonal_at_batch_size_new_points():
    base = _scaled(RBFKernel(batch_shape=BATCH) + LinearKernel(batch_shape=BATCH))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 1, dtype=torch.float64, generator=g)
    kernel = BlockMeanKernel(base, x, Partition.from_labels(torch.arange(10) % 3))
    t = torch.randn(2, 1, dtype=torch.float64, generator=g)
    full = torch.cat([x, t])
    want = base(t, t).to_dense().diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(kernel(full, full, diag=True)[..., -2:], want)


def test_kernel_diagonal_helper():
    kernel = _scaled(RBFKernel(batch_shape=BATCH))
    t = torch.randn(2, 1, dtype=torch.float64)
    want = kernel(t, t).to_dense().diagonal(dim1=-2, dim2=-1)
    assert want.shape == (2, 2)
    torch.testing.assert_close(kernel_diagonal(kernel, t, t), want)
    torch.testing.assert_close(kernel_diagonal(kernel, t, t, BATCH), want)
    assert kernel_diagonal(kernel, t[:0], t[:0]).shape[-1] == 0
