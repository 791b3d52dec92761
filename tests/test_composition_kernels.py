"""Kernel outputs reach the closed-form sums whether or not GPyTorch evaluates kernels lazily.

``kernel(x)`` is a lazily evaluated kernel tensor by default; ``kernel(x).add_diagonal(v)`` and sums
with a diagonal in either order must still solve in closed form (no CG, no Lanczos, no n x n
factorisation), and agree with dense linear algebra.
"""

import warnings

import gpytorch
import linear_operator
import pytest
import torch
from gpytorch.lazy import LazyEvaluatedKernelTensor
from linear_operator.operators import DiagLinearOperator

import bma_gp
from bma_gp import BlockMeanKernel, BlockMeanLinearOperator, BlockMeanSumLinearOperator, GroupKernel, Partition
from closed_form_guard import closed_forms_only

N = 120


def _kernels():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, 2, generator=gen, dtype=torch.float64)
    labels = torch.randperm(N, generator=gen) % 9
    ids = torch.stack([labels, torch.randperm(N, generator=gen) % 5], -1).double()
    part = Partition.from_labels(labels)
    bm = BlockMeanKernel(gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), x, part).double()
    return {
        "block_mean": (bm, x),
        "scaled_block_mean": (gpytorch.kernels.ScaleKernel(bm).double(), x),
        "group": (GroupKernel(9, active_dims=[0]).double(), ids),
        "crossed_groups": ((GroupKernel(9, active_dims=[0]) + GroupKernel(5, active_dims=[1])).double(), ids),
    }


@pytest.mark.parametrize("max_chol", [0, 10**6])
@pytest.mark.parametrize("name", ["block_mean", "scaled_block_mean", "group", "crossed_groups"])
@pytest.mark.parametrize("how", ["add_diagonal", "plus_diag", "diag_plus"])
def test_lazy_kernel_sums_solve_in_closed_form(name, how, max_chol):
    kernel, x = _kernels()[name]
    v = torch.rand(N, dtype=torch.float64) + 0.1
    b = torch.randn(N, 2, dtype=torch.float64)
    with gpytorch.settings.lazily_evaluate_kernels(True):
        K = kernel(x)
    assert isinstance(K, LazyEvaluatedKernelTensor)
    with (
        closed_forms_only(N),
        gpytorch.settings.max_cholesky_size(max_chol),
        linear_operator.settings.max_cholesky_size(max_chol),
    ):
        A = {
            "add_diagonal": lambda: K.add_diagonal(v),
            "plus_diag": lambda: K + DiagLinearOperator(v),
            "diag_plus": lambda: DiagLinearOperator(v) + K,
        }[how]()
        assert isinstance(A, (BlockMeanSumLinearOperator, BlockMeanLinearOperator))
        x_sol = A.solve(b)
        quad, logdet = A.inv_quad_logdet(b, logdet=True)
    dense = K.to_dense() + torch.diag(v)
    torch.testing.assert_close(x_sol, torch.linalg.solve(dense, b), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(logdet, torch.logdet(dense), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(quad, (b * torch.linalg.solve(dense, b)).sum(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("max_chol", [0, 10**6])
@pytest.mark.parametrize("name", ["block_mean", "scaled_block_mean", "group", "crossed_groups"])
def test_lazy_kernel_roots_are_closed_form(name, max_chol):
    # kernel(x).root_decomposition() (what MultivariateNormal.rsample of a prior calls) on the lazily evaluated
    # tensor: before, linear_operator's default ran Lanczos on its products, a rank-limited root (for 300 groups
    # R R^T reproduced 3% of K, silently); now the evaluated operator's closed-form root, exact.
    kernel, x = _kernels()[name]
    with gpytorch.settings.lazily_evaluate_kernels(True):
        K = kernel(x)
    assert isinstance(K, LazyEvaluatedKernelTensor)
    probe = torch.randn(N, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with (
        closed_forms_only(N),
        gpytorch.settings.max_cholesky_size(max_chol),
        linear_operator.settings.max_cholesky_size(max_chol),
    ):
        R = K.root_decomposition().root
        via_root = R @ (R.mT @ probe)
        noisy = K.add_diagonal(torch.tensor(0.5, dtype=torch.float64))  # positive definite: its inverse root too
        R_inv = noisy.root_inv_decomposition().root
        via_inv_root = R_inv @ (R_inv.mT @ probe)
    dense = K.to_dense()
    torch.testing.assert_close(via_root, dense @ probe, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        via_inv_root, torch.linalg.solve(dense + 0.5 * torch.eye(N), probe), rtol=1e-8, atol=1e-10
    )


def test_sum_with_an_exact_kernel_warns_and_takes_the_generic_path():
    kernel, x = _kernels()["group"]
    rbf = gpytorch.kernels.RBFKernel().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # building (and multiplying) the sum is silent
        total = kernel(x).evaluate_kernel() + rbf(x[:, :1]).evaluate_kernel()
        total @ torch.ones(N, 1, dtype=torch.float64)
    assert isinstance(total, bma_gp.FallbackSumLinearOperator)
    with pytest.warns(bma_gp.ClosedFormFallbackWarning, match="no closed form"):
        total.add_diagonal(torch.tensor(1.0, dtype=torch.float64)).logdet()


def test_plain_linear_operator_sums_are_untouched():
    d = torch.rand(N, dtype=torch.float64) + 0.1
    U = torch.randn(N, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low_rank = linear_operator.operators.LowRankRootLinearOperator(U)
        first, second = DiagLinearOperator(d) + low_rank, low_rank + DiagLinearOperator(d)
    # what linear_operator builds on its own, hooks or not
    assert type(first).__name__ == "AddedDiagLinearOperator"
    assert type(second).__name__ == "LowRankRootAddedDiagLinearOperator"
