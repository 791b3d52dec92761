"""Kernels that the block sums handled wrongly, found by a run over every GPyTorch kernel class: a kernel holding a
``BlockMeanKernel`` (evaluated on chunks it takes for new points), a ``BlockMeanKernel`` whose base kernel keeps a
setting in a plain attribute (a stale cache), KISS-GP's grid that follows each call's inputs (the diagonal), and an
eval-mode ``InducingPointKernel`` whose cached root is shared by the chunks' graphs (backward raised)."""

from __future__ import annotations

import gpytorch
import pytest
import torch
from gpytorch import kernels as K

from bma_gp import BlockMeanKernel, Partition, block_mean, kernel_block_mean


def _dense_block_mean(kernel, x, partition):
    with gpytorch.settings.lazily_evaluate_kernels(False):
        return block_mean(kernel(x, x).to_dense(), partition)


def test_kernels_holding_a_block_mean_kernel_are_refused():
    n = 40
    x = torch.rand(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    inner = BlockMeanKernel(K.RBFKernel(), x, Partition.from_labels(torch.arange(n) % 4)).double()
    other = Partition.from_labels(torch.arange(n) // 10)
    for kernel in (inner, inner + K.RBFKernel().double()):
        with pytest.raises(
            ValueError, match="kernel contains a BlockMeanKernel.*block_mean\\(kernel\\(x, x\\), partition"
        ):
            kernel_block_mean(kernel, x, other)
    with pytest.raises(ValueError, match="base_kernel contains a BlockMeanKernel"):
        BlockMeanKernel(inner, x, other)
    # what the message points to gives the block means of the block mean kernel's own matrix
    torch.testing.assert_close(block_mean(inner(x, x), other).to_dense(), _dense_block_mean(inner, x, other).to_dense())


class _Weighted(K.RBFKernel):
    """An RBF kernel of reweighted columns, the weights a plain tensor attribute (not a buffer)."""

    def __init__(self):
        super().__init__()
        self.weights = torch.tensor([1.0, 1.0])
        self.transform = None
        self.options = {"scale": 1.0}
        self.shifts = [torch.zeros(2)]

    def forward(self, x1, x2, **params):
        if self.transform is not None:
            x1, x2 = self.transform(x1), self.transform(x2)
        w = self.weights * self.options["scale"]
        return super().forward(x1 * w + self.shifts[0], x2 * w + self.shifts[0], **params)


def test_block_mean_kernel_cache_sees_plain_attributes():
    n = 30
    x = torch.rand(n, 2, generator=torch.Generator().manual_seed(1))
    part = Partition.from_labels(torch.arange(n) % 3)
    kernel = BlockMeanKernel(_Weighted(), x, part)
    with torch.no_grad():
        kernel(x).to_dense()
        kernel.base_kernel.weights = torch.tensor([5.0, 0.0])  # a new tensor
        torch.testing.assert_close(kernel(x).to_dense(), _dense_block_mean(kernel.base_kernel, x, part).to_dense())
        kernel.base_kernel.weights.mul_(0.5)  # the same tensor changed in place
        torch.testing.assert_close(kernel(x).to_dense(), _dense_block_mean(kernel.base_kernel, x, part).to_dense())
        kernel.base_kernel.transform = torch.sin  # a function set on the kernel
        torch.testing.assert_close(kernel(x).to_dense(), _dense_block_mean(kernel.base_kernel, x, part).to_dense())
        kernel.base_kernel.options["scale"] = 3.0  # a dict changed in place
        torch.testing.assert_close(kernel(x).to_dense(), _dense_block_mean(kernel.base_kernel, x, part).to_dense())
        kernel.base_kernel.shifts[0].add_(torch.tensor([0.5, -2.0]))  # a tensor in a list changed in place
        torch.testing.assert_close(kernel(x).to_dense(), _dense_block_mean(kernel.base_kernel, x, part).to_dense())
        key = kernel._block_sums_key(x)
        assert kernel._block_sums_key(x) is not None
        from bma_gp.kernels.block_mean_kernel import _same_key

        assert _same_key(key, kernel._block_sums_key(x))  # unchanged: the cache is used again


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_grid_interpolation_kernel_diagonal_is_the_matrix_diagonal(chunk_size):
    # KISS-GP refits its grid to each call's inputs: diag=True on a chunk's rows alone was 2.6e-5 off the diagonal
    n = 50
    x = torch.rand(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    part = Partition.from_labels(torch.arange(n) % 7)
    kernel = K.GridInterpolationKernel(K.RBFKernel(), grid_size=20, num_dims=2).double()
    reference = _dense_block_mean(kernel, x, part)
    op = kernel_block_mean(kernel, x, part, chunk_size=chunk_size)
    torch.testing.assert_close(op.lam, reference.lam, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(op.B, reference.B, rtol=1e-12, atol=1e-13)


def test_eval_mode_inducing_point_kernel_gradients_through_the_chunks():
    n = 40
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 2, dtype=torch.float64, generator=gen)
    part = Partition.from_labels(torch.arange(n) % 5)

    def make():
        inducing = torch.rand(6, 2, generator=torch.Generator().manual_seed(2))
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        return K.InducingPointKernel(K.ScaleKernel(K.RBFKernel()), inducing, likelihood).double().eval()

    kernel, reference_kernel = make(), make()
    op = kernel_block_mean(kernel, x, part, chunk_size=9)  # five chunks share the cached root's graph
    (op.B.sum() + op.lam.square().sum()).backward()  # raised "backward through the graph a second time"
    reference = _dense_block_mean(reference_kernel, x, part)
    (reference.B.sum() + reference.lam.square().sum()).backward()
    for p, q in zip(kernel.parameters(), reference_kernel.parameters()):  # (an unused one: None or zeros)
        expected = torch.zeros_like(q) if q.grad is None else q.grad
        torch.testing.assert_close(torch.zeros_like(p) if p.grad is None else p.grad, expected, rtol=1e-9, atol=1e-12)
    assert kernel.inducing_points.grad.abs().sum() > 0
