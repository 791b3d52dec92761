"""A sum's slope weights are part of its linear_operator representation (trial 20): the generic autograd functions
(``Matmul``, ``InvQuadLogdet``, ...) of a linear_operator sum that holds a ``BlockMeanSumLinearOperator``
differentiate the representation only, and the row weights were a plain keyword argument: the posterior covariance
of ``BlockMeanKernel + GroupKernel(slope=True)`` at new inputs had a zero gradient with respect to the test points'
covariate (the dense reference: 1.66)."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from linear_operator.operators import DenseLinearOperator

from bma_gp import BlockMeanKernel, BlockMeanSumLinearOperator, GroupKernel
from bma_gp.partition_builders import kmeans_partition
from gp_reference import GP, dense_copy

DTYPE = torch.float64


def _slope_points(requires_grad=True):
    xs = torch.tensor([[6.0, 0.3], [6.0, 0.9], [2.0, 0.5]], dtype=DTYPE)
    return xs.requires_grad_(requires_grad)


@pytest.mark.parametrize("how", ["matmul", "to_dense", "inv_quad"])
def test_a_linear_operator_sum_holding_slope_terms_passes_the_covariate_gradient(how):
    kernel = GroupKernel(8, slope=True).to(DTYPE)
    A = 2.0 * torch.eye(3, dtype=DTYPE)
    grads = []
    for dense in (False, True):
        xs = _slope_points()
        covar = kernel(xs).evaluate_kernel()
        op = DenseLinearOperator(A) + (DenseLinearOperator(covar.to_dense()) if dense else covar)
        if how == "matmul":
            out = (op @ torch.eye(3, dtype=DTYPE)).sum()
        elif how == "to_dense":
            out = op.to_dense().sum()
        else:
            with gpytorch.settings.max_cholesky_size(0), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = op.inv_quad(torch.ones(3, dtype=DTYPE))
        (grad,) = torch.autograd.grad(out, xs)
        grads.append(grad)
    assert float(grads[1][:, 1].abs().max()) > 0.1
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)


def test_the_representation_tree_rebuilds_the_sum():
    kernel = GroupKernel(8, slope=True).to(DTYPE)
    op = kernel(_slope_points(False)).evaluate_kernel()
    assert isinstance(op, BlockMeanSumLinearOperator)
    rep = op.representation()
    held = [w for w in op.weights if w is not None]
    assert held and all(any(r is w for r in rep) for w in held)
    rebuilt = op.representation_tree()(*rep)
    assert isinstance(rebuilt, BlockMeanSumLinearOperator)
    torch.testing.assert_close(rebuilt.to_dense(), op.to_dense(), rtol=0, atol=0)
    # new weights go to their partitions' places
    doubled = op.representation_tree()(*rep[: len(rep) - len(held)], *(2 * w for w in held))
    for w_new, w_old in zip(doubled.weights, op.weights):
        assert (w_new is None) == (w_old is None)
        if w_old is not None:
            torch.testing.assert_close(w_new, 2 * w_old)


def test_posterior_covariance_gradient_with_a_block_mean_kernel_beside_a_slope():
    g = torch.Generator().manual_seed(0)
    n = 120
    x = torch.cat([torch.rand(n, 1, generator=g, dtype=DTYPE), torch.randint(0, 6, (n, 1), generator=g).to(DTYPE)], -1)
    x = torch.cat([x, torch.randn(n, 1, generator=g, dtype=DTYPE)], -1)  # columns: feature, group, covariate
    y = torch.sin(5 * x[:, 0]) + 0.2 * torch.randn(n, generator=g, dtype=DTYPE)
    torch.manual_seed(0)
    base = gpytorch.kernels.RBFKernel(active_dims=[0])
    kernel = BlockMeanKernel(base, x, kmeans_partition(x[:, :1], 10)) + GroupKernel(7, slope=True, active_dims=[1, 2])
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).to(DTYPE)
    ref = dense_copy(model)
    model.eval()
    ref.eval()
    grads = []
    for m in (model, ref):
        xt = torch.tensor([[0.2, 3.0, 0.3], [0.7, 3.0, 0.9]], dtype=DTYPE, requires_grad=True)
        with gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            post = m(xt)
            out = post.covariance_matrix[0, 1] + (post.lazy_covariance_matrix @ torch.ones(2, dtype=DTYPE)).sum()
        grads.append(torch.autograd.grad(out, xt)[0])
    assert float(grads[1][:, 2].abs().max()) > 0.05
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)
