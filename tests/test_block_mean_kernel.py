"""BlockMeanKernel on its own: input cases, diag, batches, active_dims, compositions, bad input."""

from __future__ import annotations

import pickle
import unittest

import gpytorch
import pytest
import torch
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase
from linear_operator.operators import ConstantDiagLinearOperator
from linear_operator.test.linear_operator_test_case import RectangularLinearOperatorTestCase

from bma_gp import BlockMeanLinearOperator, Partition
from bma_gp.kernels import BlockCrossLinearOperator, BlockMeanKernel
from test_gp_inference import dense_block_mean, dense_cross

DTYPE = torch.float64


def setup(n=30, d=3, k=5, seed=0, base=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=DTYPE)
    labels = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=g)])
    partition = Partition.from_labels(labels[torch.randperm(n, generator=g)])
    base = base if base is not None else gpytorch.kernels.RBFKernel().to(DTYPE)
    return x, partition, base, BlockMeanKernel(base, x, partition)


def dense(base, a, b):
    with gpytorch.settings.lazily_evaluate_kernels(False):
        return base(a, b).to_dense()


# ---------------------------------------------------------------------------- input cases
def test_train_train_is_block_mean_operator_of_base_kernel():
    x, partition, base, kernel = setup()
    K = kernel(x, x).evaluate_kernel()
    assert isinstance(K, BlockMeanLinearOperator)
    torch.testing.assert_close(K.to_dense(), dense_block_mean(dense(base, x, x), partition.labels))
    # an equal copy (not the same tensor) is the training data too
    assert isinstance(kernel(x.clone()).evaluate_kernel(), BlockMeanLinearOperator)


def test_cross_covariance_is_block_cross_operator_of_block_means():
    x, partition, base, kernel = setup()
    xt = torch.rand(7, 3, dtype=DTYPE)
    cross = kernel(xt, x).evaluate_kernel()
    assert isinstance(cross, BlockCrossLinearOperator) and cross.shape == (7, 30)
    ref = dense_cross(dense(base, xt, x), partition.labels)
    torch.testing.assert_close(cross.to_dense(), ref)
    torch.testing.assert_close(kernel(x, xt).evaluate_kernel().to_dense(), ref.T)


def test_new_points_use_base_kernel_exactly():
    x, partition, base, kernel = setup()
    a, b = torch.rand(6, 3, dtype=DTYPE), torch.rand(4, 3, dtype=DTYPE)
    torch.testing.assert_close(kernel(a, b).to_dense(), dense(base, a, b))
    torch.testing.assert_close(kernel(a, diag=True), torch.ones(6, dtype=DTYPE))


def test_train_followed_by_new_points_is_joint_block_mean_operator():
    x, partition, base, kernel = setup()
    xt = torch.rand(5, 3, dtype=DTYPE)
    full = torch.cat([x, xt])
    joint = kernel(full).evaluate_kernel()
    assert isinstance(joint, BlockMeanLinearOperator) and joint.partition.num_blocks == 5 + 5
    K = dense(base, full, full)
    ref = torch.cat(
        [
            torch.cat(
                [dense_block_mean(K[:30, :30], partition.labels), dense_cross(K[30:, :30], partition.labels).T], -1
            ),
            torch.cat([dense_cross(K[30:, :30], partition.labels), K[30:, 30:]], -1),
        ],
        -2,
    )
    torch.testing.assert_close(joint.to_dense(), ref)
    # positive semidefinite: the block-exchangeable joint is a covariance
    assert float(torch.linalg.eigvalsh(ref).min()) > -1e-10
    # ExactGP's slices agree with the joint
    lazy = kernel(full)
    torch.testing.assert_close(lazy[..., 30:, :30].evaluate_kernel().to_dense(), ref[30:, :30])
    torch.testing.assert_close(lazy[..., 30:, 30:].evaluate_kernel().to_dense(), ref[30:, 30:])
    torch.testing.assert_close(kernel(full, diag=True), ref.diagonal())


def test_mixed_inputs_fall_back_to_dense_assembly():
    x, partition, base, kernel = setup()
    a, b = torch.rand(3, 3, dtype=DTYPE), torch.rand(2, 3, dtype=DTYPE)
    res = kernel(torch.cat([x, a]), torch.cat([x, b])).to_dense()
    K = dense(base, torch.cat([x, a, b]), torch.cat([x, a, b]))
    torch.testing.assert_close(res[:30, :30], dense_block_mean(K[:30, :30], partition.labels))
    torch.testing.assert_close(res[30:, :30], dense_cross(K[30:33, :30], partition.labels))
    torch.testing.assert_close(res[:30, 30:], dense_cross(K[33:, :30], partition.labels).T)
    torch.testing.assert_close(res[30:, 30:], K[30:33, 33:])


def test_diag_on_training_inputs_is_blockwise_mean_of_base_diagonal():
    x, partition, base, kernel = setup(base=gpytorch.kernels.PolynomialKernel(2).to(DTYPE))
    ref = dense_block_mean(dense(base, x, x), partition.labels).diagonal()
    torch.testing.assert_close(kernel(x, diag=True), ref)


def test_active_dims_of_base_kernel_are_respected():
    x, partition, _, _ = setup(d=4)
    base = gpytorch.kernels.RBFKernel(active_dims=[1, 3]).to(DTYPE)
    kernel = BlockMeanKernel(base, x, partition)
    ref = dense_block_mean(dense(gpytorch.kernels.RBFKernel().to(DTYPE), x[:, [1, 3]], x[:, [1, 3]]), partition.labels)
    torch.testing.assert_close(kernel(x).to_dense(), ref)
    xt = torch.rand(3, 4, dtype=DTYPE)
    ref_cross = dense_cross(
        dense(gpytorch.kernels.RBFKernel().to(DTYPE), xt[:, [1, 3]], x[:, [1, 3]]), partition.labels
    )
    torch.testing.assert_close(kernel(xt, x).to_dense(), ref_cross)


def test_batch_base_kernel_and_batched_inputs():
    x, partition, _, _ = setup()
    base = gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2])).to(DTYPE)
    base.lengthscale = torch.tensor([[[0.3]], [[0.8]]], dtype=DTYPE)
    kernel = BlockMeanKernel(base, x, partition)
    K = kernel(x).evaluate_kernel()
    assert isinstance(K, BlockMeanLinearOperator) and K.shape == (2, 30, 30)
    for b in range(2):
        torch.testing.assert_close(K.to_dense()[b], dense_block_mean(dense(base, x, x)[b], partition.labels))
    # inputs with a batch dimension whose entries are all the training inputs
    xb = x.expand(2, 30, 3)
    torch.testing.assert_close(kernel(xb).to_dense(), K.to_dense())
    torch.testing.assert_close(kernel(xb, diag=True), K.to_dense().diagonal(dim1=-2, dim2=-1))
    xt = torch.rand(2, 4, 3, dtype=DTYPE)
    cross = kernel(xt, x).to_dense()
    assert cross.shape == (2, 4, 30)
    torch.testing.assert_close(cross[1], dense_cross(dense(base, xt, x)[1], partition.labels))


# ---------------------------------------------------------------------------- compositions
def test_scale_kernel_keeps_block_mean_type():
    x, partition, base, kernel = setup()
    scaled = gpytorch.kernels.ScaleKernel(kernel).to(DTYPE)
    scaled.outputscale = 2.5
    K = scaled(x).evaluate_kernel()
    assert isinstance(K, BlockMeanLinearOperator)
    torch.testing.assert_close(K.to_dense(), 2.5 * dense_block_mean(dense(base, x, x), partition.labels))
    cross = scaled(torch.rand(3, 3, dtype=DTYPE), x).evaluate_kernel()
    assert isinstance(cross, BlockCrossLinearOperator)


def test_block_mean_plus_constant_diagonal_stays_block_mean():
    x, partition, base, kernel = setup()
    K = kernel(x).evaluate_kernel()
    noisy = K + ConstantDiagLinearOperator(torch.tensor([0.3], dtype=DTYPE), diag_shape=30)
    assert isinstance(noisy, BlockMeanLinearOperator)
    lazy_noisy = kernel(x) + ConstantDiagLinearOperator(torch.tensor([0.3], dtype=DTYPE), diag_shape=30)
    assert isinstance(lazy_noisy.evaluate_kernel(), BlockMeanLinearOperator)
    torch.testing.assert_close(lazy_noisy.evaluate_kernel().to_dense(), K.to_dense() + 0.3 * torch.eye(30))


# ---------------------------------------------------------------------------- state and bad input
def test_set_train_data_and_set_partition_leave_nothing_stale():
    x, partition, base, kernel = setup()
    K_old = kernel(x).to_dense()
    x2 = torch.rand(20, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(7))
    p2 = Partition.from_sizes([5, 15])
    kernel.set_train_data(x2, p2)
    assert isinstance(kernel(x2).evaluate_kernel(), BlockMeanLinearOperator)
    torch.testing.assert_close(kernel(x2).to_dense(), dense_block_mean(dense(base, x2, x2), p2.labels))
    assert not isinstance(kernel(x).evaluate_kernel(), BlockMeanLinearOperator)  # old data are new points now
    # rows that start with the new training inputs are training + new points (joint: 2 + 10 blocks)
    joint = kernel(torch.cat([x2, x[:10]])).evaluate_kernel()
    assert isinstance(joint, BlockMeanLinearOperator) and joint.partition.num_blocks == 12
    p3 = Partition.from_sizes([10, 10])
    kernel.set_partition(p3)
    torch.testing.assert_close(kernel(x2).to_dense(), dense_block_mean(dense(base, x2, x2), p3.labels))
    # in-place change of the bound tensor is seen (no cached block sums)
    kernel.set_train_data(x, partition)
    x.mul_(0.5)
    torch.testing.assert_close(kernel(x).to_dense(), dense_block_mean(dense(base, x, x), partition.labels))
    assert not torch.allclose(kernel(x).to_dense(), K_old)


def test_dtype_conversion_moves_bound_inputs():
    x, partition, base, kernel = setup()
    kernel32 = kernel.float()
    assert kernel32.train_x.dtype == torch.float32
    assert isinstance(kernel32(x.float()).evaluate_kernel(), BlockMeanLinearOperator)


@pytest.mark.parametrize(
    "bad_x, error",
    [
        (torch.rand(()), ValueError),
        (torch.rand(30, 0), ValueError),
        (torch.arange(30).view(30, 1), ValueError),
        ([[0.0]] * 30, TypeError),
    ],
)
def test_bad_train_x(bad_x, error):
    _, partition, base, _ = setup()
    with pytest.raises(error, match="train_x"):
        BlockMeanKernel(base, bad_x, partition)


def test_bad_partition():
    x, _, base, _ = setup()
    with pytest.raises(ValueError, match="partition has 29 indices"):
        BlockMeanKernel(base, x, Partition.from_sizes([10, 19]))
    with pytest.raises(TypeError, match="Partition"):
        BlockMeanKernel(base, x, torch.zeros(30, dtype=torch.long))
    kernel = BlockMeanKernel(base, x, Partition.from_sizes([10, 20]))
    with pytest.raises(ValueError, match="partition"):
        kernel.set_partition(Partition.from_sizes([3]))
    with pytest.raises(ValueError, match="partition"):
        kernel.set_train_data(torch.rand(12, 3, dtype=DTYPE))  # old partition has 30 labels
    with pytest.raises(TypeError, match="base_kernel"):
        BlockMeanKernel(lambda a, b: a @ b.T, x, Partition.from_sizes([30]))
    with pytest.raises(ValueError, match="active_dims"):
        BlockMeanKernel(base, x, Partition.from_sizes([30]), active_dims=[0])


def test_pickle_round_trip_keeps_binding():
    x, partition, base, kernel = setup()
    clone = pickle.loads(pickle.dumps(kernel))
    torch.testing.assert_close(clone(clone.train_x).to_dense(), kernel(x).to_dense())
    assert isinstance(clone(clone.train_x).evaluate_kernel(), BlockMeanLinearOperator)


# ---------------------------------------------------------------------------- gpytorch's kernel suite
class TestBlockMeanKernelBaseSuite(BaseKernelTestCase, unittest.TestCase):
    """gpytorch's kernel checks. Their inputs are random, i.e. new points: the kernel must behave
    exactly like its base kernel there (batching, diag, active_dims, getitem, pickling, dtype)."""

    def create_kernel_no_ard(self, **kwargs):
        train_x = torch.rand(6, 10)
        return BlockMeanKernel(gpytorch.kernels.RBFKernel(**kwargs), train_x, Partition.from_sizes([2, 4]))

    def create_kernel_ard(self, num_dims, **kwargs):
        train_x = torch.rand(6, num_dims)
        return BlockMeanKernel(
            gpytorch.kernels.RBFKernel(ard_num_dims=num_dims, **kwargs), train_x, Partition.from_sizes([2, 4])
        )


# ---------------------------------------------------------------------------- the cross operator
class TestBlockCrossLinearOperator(RectangularLinearOperatorTestCase, unittest.TestCase):
    seed = 0

    def create_linear_op(self):
        partition = Partition.from_labels(torch.tensor([0, 2, 1, 0, 2, 2, 1]))
        return BlockCrossLinearOperator(torch.randn(2, 4, 3, requires_grad=True), partition)

    def evaluate_linear_op(self, linear_op):
        return linear_op.values[..., linear_op.partition.labels]


class TestBlockCrossLinearOperatorTransposed(RectangularLinearOperatorTestCase, unittest.TestCase):
    seed = 1

    def create_linear_op(self):
        partition = Partition.from_sizes([2, 3, 1])
        return BlockCrossLinearOperator(torch.randn(5, 3, requires_grad=True), partition, transposed=True)

    def evaluate_linear_op(self, linear_op):
        return linear_op.values[..., linear_op.partition.labels].mT


def test_block_cross_operator_validates():
    with pytest.raises(ValueError, match="one column per block"):
        BlockCrossLinearOperator(torch.randn(3, 4), Partition.from_sizes([2, 2]))
    with pytest.raises(TypeError, match="Partition"):
        BlockCrossLinearOperator(torch.randn(3, 2), [0, 1])
