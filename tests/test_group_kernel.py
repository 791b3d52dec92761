"""GroupKernel: exact block mean structure over group ids, validation, gpytorch's kernel suite."""

from __future__ import annotations

import unittest

import gpytorch
import pytest
import torch
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase

from bma_gp import BlockMeanLinearOperator
from bma_gp.kernels import BlockCrossLinearOperator, GroupKernel

DTYPE = torch.float64


def kernel_and_ids(num_groups=9, rank=2, n=40, seed=0):
    torch.manual_seed(seed)
    kernel = GroupKernel(num_groups, rank=rank).to(DTYPE)
    ids = torch.randint(0, num_groups - 3, (n,)).to(DTYPE).unsqueeze(-1)
    return kernel, ids


def test_covariance_is_block_mean_over_present_ids_with_zero_lam():
    kernel, ids = kernel_and_ids()
    K = kernel(ids).evaluate_kernel()
    assert isinstance(K, BlockMeanLinearOperator)
    present = torch.unique(ids.long())
    assert K.partition.num_blocks == present.numel()
    torch.testing.assert_close(K.lam, torch.zeros_like(K.lam))
    C = kernel.covar_matrix
    torch.testing.assert_close(K.B, C[present][:, present])
    il = ids[:, 0].long()
    torch.testing.assert_close(K.to_dense(), C[il][:, il])
    torch.testing.assert_close(kernel(ids, diag=True), C[il, il])


def test_covar_matrix_is_low_rank_plus_positive_diagonal():
    kernel, _ = kernel_and_ids()
    kernel.raw_var.data.fill_(-30.0)
    W = kernel.covar_factor
    torch.testing.assert_close(kernel.covar_matrix, W @ W.T + torch.diag(kernel.var))
    assert bool((kernel.var > 0).all())
    kernel.var = torch.full((9,), 0.25, dtype=DTYPE)
    torch.testing.assert_close(kernel.var, torch.full((9,), 0.25, dtype=DTYPE))


def test_cross_covariance_with_new_ids_is_exact():
    kernel, ids = kernel_and_ids()
    new = torch.tensor([[8.0], [0.0], [7.0]], dtype=DTYPE)  # 7 and 8 are absent from the training ids
    cross = kernel(new, ids).evaluate_kernel()
    assert isinstance(cross, BlockCrossLinearOperator)
    C = kernel.covar_matrix
    torch.testing.assert_close(cross.to_dense(), C[new[:, 0].long()][:, ids[:, 0].long()])
    torch.testing.assert_close(kernel(ids, new).to_dense(), C[ids[:, 0].long()][:, new[:, 0].long()])


def test_singular_without_noise_positive_definite_with_noise():
    kernel, ids = kernel_and_ids(n=30)
    K = kernel(ids).evaluate_kernel()
    with pytest.raises(ValueError, match="singular"):
        K.solve(torch.randn(30, 1, dtype=DTYPE))
    noisy = K.add_diagonal(torch.tensor(0.1, dtype=DTYPE))
    assert isinstance(noisy, BlockMeanLinearOperator)
    torch.testing.assert_close(noisy.logdet(), torch.linalg.slogdet(noisy.to_dense())[1])


def test_marginal_likelihood_equals_dense():
    kernel, ids = kernel_and_ids(n=60)
    y = torch.randn(60, dtype=DTYPE)
    K = kernel(ids).evaluate_kernel().add_diagonal(torch.tensor(0.2, dtype=DTYPE))
    dist = gpytorch.distributions.MultivariateNormal(torch.zeros(60, dtype=DTYPE), K)
    dense = torch.distributions.MultivariateNormal(torch.zeros(60, dtype=DTYPE), K.to_dense())
    torch.testing.assert_close(dist.log_prob(y), dense.log_prob(y))


def test_batch_shapes():
    kernel = GroupKernel(5, rank=1, batch_shape=torch.Size([3])).to(DTYPE)
    ids = torch.tensor([[0.0], [2.0], [2.0], [4.0]], dtype=DTYPE)
    K = kernel(ids).evaluate_kernel()
    assert isinstance(K, BlockMeanLinearOperator) and K.shape == (3, 4, 4)
    il = ids[:, 0].long()
    for b in range(3):
        torch.testing.assert_close(K.to_dense()[b], kernel.covar_matrix[b][il][:, il])
    # ids that differ across the batch: exact dense fallback
    ids_b = torch.stack([ids, ids.flip(0), ids * 0 + 1])
    Kb = kernel(ids_b).to_dense()
    for b in range(3):
        ib = ids_b[b, :, 0].long()
        torch.testing.assert_close(Kb[b], kernel.covar_matrix[b][ib][:, ib])
    # shared ids across an input batch keep the structure
    assert isinstance(kernel(ids.expand(3, 4, 1)).evaluate_kernel(), BlockMeanLinearOperator)


def test_active_dims_selects_id_column():
    kernel = GroupKernel(4, active_dims=[1]).to(DTYPE)
    x = torch.tensor([[0.3, 1.0], [0.7, 3.0], [0.1, 1.0]], dtype=DTYPE)
    C = kernel.covar_matrix
    torch.testing.assert_close(kernel(x).to_dense(), C[[1, 3, 1]][:, [1, 3, 1]])


@pytest.mark.parametrize("bad", [
    torch.tensor([[0.0], [1.5]]),
    torch.tensor([[0.0], [-1.0]]),
    torch.tensor([[0.0], [9.0]]),
    torch.tensor([[0.0], [float("nan")]]),
    torch.tensor([[0.0], [float("inf")]]),
])
def test_bad_ids(bad):
    kernel = GroupKernel(9)
    with pytest.raises(ValueError, match="group id"):
        kernel(bad).to_dense()


def test_bad_shape_and_arguments():
    kernel = GroupKernel(3)
    with pytest.raises(ValueError, match="one column"):
        kernel(torch.zeros(4, 2)).to_dense()
    with pytest.raises(ValueError, match="num_groups"):
        GroupKernel(0)
    with pytest.raises(ValueError, match="rank"):
        GroupKernel(3, rank=4)
    with pytest.raises(TypeError, match="prior"):
        GroupKernel(3, prior="wide")


class TestGroupKernelBaseSuite(BaseKernelTestCase, unittest.TestCase):
    """gpytorch's kernel checks on integer id data (one id column; active_dims picks it)."""

    def create_kernel_no_ard(self, **kwargs):
        return GroupKernel(6, rank=2, **kwargs)

    def create_data_no_batch(self):
        return torch.randint(0, 6, (50, 10)).float()

    def create_data_single_batch(self):
        return torch.randint(0, 6, (2, 3, 1)).float()

    def create_data_double_batch(self):
        return torch.randint(0, 6, (3, 2, 50, 1)).float()

    def test_active_dims_list(self):
        kernel = self.create_kernel_no_ard(active_dims=[4])
        x = self.create_data_no_batch()
        torch.manual_seed(0)
        kernel_basic = self.create_kernel_no_ard()
        kernel_basic.load_state_dict(kernel.state_dict(), strict=False)
        self.assertAllClose(kernel(x).to_dense(), kernel_basic(x[:, [4]]).to_dense())

    def test_active_dims_range(self):
        kernel = self.create_kernel_no_ard(active_dims=torch.tensor([7]))
        x = self.create_data_no_batch()
        kernel_basic = self.create_kernel_no_ard()
        kernel_basic.load_state_dict(kernel.state_dict(), strict=False)
        self.assertAllClose(kernel(x).to_dense(), kernel_basic(x[:, [7]]).to_dense())
