"""Entry points found wanting by a conformance review against SPEC.md: ``block_mean``'s ``B`` for a non-symmetric
``A``, ``block_mean`` of a lazily evaluated kernel matrix, the message for a float32 core indefinite by rounding, and
size mismatches in ``M @ other`` and ``M + other``."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanLinearOperator, GroupKernel, Partition, block_mean


def _attrs_dense(M):
    P = torch.nn.functional.one_hot(M.partition.labels, M.partition.num_blocks).to(M.dtype)
    return torch.diag_embed(M.lam[..., M.partition.labels]) + P @ M.B @ P.mT


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_mean_of_a_nonsymmetric_matrix_stores_the_symmetric_B(dtype):
    gen = torch.Generator().manual_seed(3)
    p = Partition.from_labels(torch.tensor([0, 1, 1, 2, 2, 2, 1, 3, 2, 0]))
    A = torch.randn(2, 10, 10, generator=gen, dtype=dtype)
    M = block_mean(A, p)  # symmetric=True: the block means of (A + A^T) / 2
    torch.testing.assert_close(M.B, M.B.mT, rtol=0, atol=0)
    torch.testing.assert_close(_attrs_dense(M), M.to_dense())
    torch.testing.assert_close(M.to_dense(), block_mean((A + A.mT) / 2, p).to_dense())
    general = block_mean(A, p, symmetric=False)  # SPEC's nearest block mean matrix of any A
    torch.testing.assert_close(_attrs_dense(general), general.to_dense())
    # the symmetric part of a non-symmetric block mean operator, as for a tensor
    again = block_mean(general, p)
    torch.testing.assert_close(again.B, again.B.mT, rtol=0, atol=0)
    torch.testing.assert_close(again.to_dense(), M.to_dense())


class _ShapeSpy:
    """Records the (rows, columns) of every evaluation of a kernel's ``forward``."""

    def __init__(self, kernel):
        self.calls: list[tuple[int, int]] = []
        original = kernel.forward

        def forward(x1, x2, *args, **kwargs):
            self.calls.append((x1.shape[-2], x2.shape[-2]))
            return original(x1, x2, *args, **kwargs)

        kernel.forward = forward


def test_block_mean_of_a_lazy_dense_kernel_matrix_sums_tiles():
    n = 1500
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    p = Partition.from_labels(torch.randint(0, 9, (n,), generator=gen))
    base = gpytorch.kernels.RBFKernel().double()
    kernel = gpytorch.kernels.ScaleKernel(base).double()
    reference = block_mean(kernel(x, x).to_dense(), p)
    spy = _ShapeSpy(base)
    M = block_mean(kernel(x, x), p)
    assert (n, n) not in spy.calls  # the whole matrix was never evaluated (it was, through the products, before)
    assert isinstance(M, BlockMeanLinearOperator)
    torch.testing.assert_close(M.to_dense(), reference.to_dense(), rtol=1e-10, atol=1e-12)


def test_block_mean_of_a_lazy_kernel_with_active_dims_warns_that_it_evaluates_everything():
    x = torch.randn(40, 3, dtype=torch.float64)
    p = Partition.from_labels(torch.arange(40) % 4)
    kernel = gpytorch.kernels.RBFKernel(active_dims=[0, 2]).double()
    with pytest.warns(UserWarning, match=r"evaluates all n x n = 40 x 40 kernel values.*kernel_block_mean"):
        M = block_mean(kernel(x, x), p)
    torch.testing.assert_close(M.to_dense(), block_mean(kernel(x, x).to_dense(), p).to_dense())


def test_block_mean_of_a_lazy_structured_kernel_keeps_its_products_silently():
    x = torch.randint(0, 5, (60, 1)).double()
    p = Partition.from_labels(torch.arange(60) % 7)
    kernel = GroupKernel(5).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M = block_mean(kernel(x, x), p)
    torch.testing.assert_close(M.to_dense(), block_mean(kernel(x, x).to_dense(), p).to_dense())


def test_float32_core_indefinite_by_rounding_names_the_precision():
    # a block whose entries are all 1 (a long lengthscale) plus noise 1e-9: exact in float64, lost in float32
    p = Partition.from_sizes([50, 50])
    lam = torch.full((2,), 1e-9)
    B = torch.tensor([[1.0, 1.0], [1.0, 1.0]]) - 3e-8 * torch.eye(2)  # C's smallest eigenvalue rounds below zero
    M = BlockMeanLinearOperator(lam, B, p)
    with pytest.raises(ValueError, match=r"within torch.float32's rounding.*Use float64"):
        M.inv_quad_logdet(torch.ones(100, 1), logdet=True)
    M32 = BlockMeanLinearOperator(lam, torch.tensor([[1.0, 2.0], [2.0, 1.0]]), p)  # indefinite beyond rounding
    with pytest.raises(ValueError, match="has eigenvalue") as info:
        M32.inv_quad_logdet(torch.ones(100, 1), logdet=True)
    assert "rounding" not in str(info.value)
    M64 = BlockMeanLinearOperator(lam.double(), torch.tensor([[1.0, 2.0], [2.0, 1.0]]).double(), p)  # C: -50
    with pytest.raises(ValueError, match="has eigenvalue") as info:  # float64: no such hint
        M64.inv_quad_logdet(torch.ones(100, 1, dtype=torch.float64), logdet=True)
    assert "rounding" not in str(info.value)


def test_size_mismatches_are_named():
    dt = torch.float64
    M = BlockMeanLinearOperator(torch.ones(2, dtype=dt), torch.eye(2, dtype=dt), Partition.from_sizes([2, 3]))
    N = BlockMeanLinearOperator(torch.ones(2, dtype=dt), torch.eye(2, dtype=dt), Partition.from_sizes([2, 2]))
    with pytest.raises(ValueError, match=r"other of shape \(4, 1\) does not match the operator of shape \(5, 5\)"):
        M @ torch.ones(4, 1, dtype=dt)
    with pytest.raises(ValueError, match=r"has 5 columns but other has shape \(4, 4\), 4 rows"):
        M @ N
    with pytest.raises(ValueError, match=r"shapes \(5, 5\) and \(4, 4\), which do not broadcast"):
        M + N
    # matching sizes over other partitions still work
    S = M + BlockMeanLinearOperator(torch.ones(5, dtype=dt), torch.eye(5, dtype=dt), Partition.from_sizes([1] * 5))
    torch.testing.assert_close(S.to_dense(), M.to_dense() + torch.eye(5, dtype=dt) * 2)


def test_block_mean_of_a_lazy_block_mean_kernel_matrix_keeps_its_own_matrix():
    # BlockMeanKernel(x, x) is structured at its bound inputs but dense at two of them: a probe at two inputs took it
    # for a dense kernel and summed the base kernel's tiles (0.094 off)
    from bma_gp import BlockMeanKernel

    n = 40
    x = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kernel = BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, Partition.from_labels(torch.arange(n) % 3)).double()
    other = Partition.from_labels(torch.arange(n) % 6)
    lazy = kernel(x, x)
    torch.testing.assert_close(block_mean(lazy, other).to_dense(), block_mean(lazy.to_dense(), other).to_dense())


def test_block_mean_of_a_lazy_kernel_matrix_with_symmetric_false_keeps_it():
    class Skewed(gpytorch.kernels.Kernel):  # k(a, b) != k(b, a)
        def forward(self, x1, x2, diag=False, **params):
            K = torch.exp(-((x1[..., :, None, 0] - x2[..., None, :, 0]) ** 2)) * (1 + x1[..., :, None, 0])
            return K.diagonal(dim1=-2, dim2=-1) if diag else K

    # float32: a kernel without parameters reports the default dtype (GPyTorch's lazy tensor reads the kernel's)
    x = torch.randn(30, 1, generator=torch.Generator().manual_seed(1))
    p = Partition.from_labels(torch.arange(30) % 4)
    kernel = Skewed()
    with pytest.warns(UserWarning, match="with symmetric=False"):
        M = block_mean(kernel(x, x), p, symmetric=False)
    reference = block_mean(kernel(x, x).to_dense(), p, symmetric=False)
    assert not M.symmetric
    torch.testing.assert_close(M.B, reference.B)
    torch.testing.assert_close(M.to_dense(), reference.to_dense())


def test_sums_with_tensors_and_batched_products_check_sizes():
    dt = torch.float64
    M = BlockMeanLinearOperator(
        torch.ones(3, 2, dtype=dt), torch.eye(2, dtype=dt).expand(3, 2, 2), Partition.from_sizes([2, 3])
    )
    with pytest.raises(ValueError, match=r"shapes \(3, 5, 5\) and \(6, 6\), which do not broadcast"):
        M + torch.ones(6, 6, dtype=dt)
    with pytest.raises(ValueError, match=r"batch shapes of the operator \(3,\) and of other \(4,\) do not broadcast"):
        M @ torch.ones(4, 5, 2, dtype=dt)
    torch.testing.assert_close((M + torch.eye(5, dtype=dt)).to_dense(), M.to_dense() + torch.eye(5, dtype=dt))
    torch.testing.assert_close(M @ torch.ones(1, 5, 2, dtype=dt), M.to_dense() @ torch.ones(5, 2, dtype=dt))
