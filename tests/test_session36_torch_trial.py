"""Session 36 user trial under unusual torch usage: batched gradients through Functions without a batched backward
are refused by name; a partition built under ``torch.inference_mode()`` serves later gradients; an operator whose
``lam`` or ``B`` is edited in place drops the results it stored."""

from __future__ import annotations

import copy

import gpytorch
import pytest
import torch
from linear_operator.operators import DiagLinearOperator, LowRankRootLinearOperator

from bma_gp import BlockMeanLinearOperator, Partition, kernel_block_mean

F64 = torch.float64


def _partition():
    return Partition.from_labels(torch.arange(40) // 5)


def _wrt_x(x):
    return kernel_block_mean(gpytorch.kernels.PeriodicKernel().double(), x, _partition()).logdet().reshape(1)


def _wrt_lengthscale(raw):
    kernel = gpytorch.kernels.RBFKernel().double()
    x = torch.linspace(0, 5, 40, dtype=F64).unsqueeze(-1)
    with torch.nn.utils.stateless._reparametrize_module(kernel, {"raw_lengthscale": raw}):
        return kernel_block_mean(kernel, x, _partition()).logdet().reshape(1)


def _sum_with_root(d):
    gen = torch.Generator().manual_seed(0)
    U, y = torch.randn(40, 2, generator=gen, dtype=F64), torch.randn(40, generator=gen, dtype=F64)
    M = BlockMeanLinearOperator(torch.ones(8, dtype=F64), torch.eye(8, dtype=F64), _partition())
    return (M + DiagLinearOperator(d) + LowRankRootLinearOperator(U)).solve(y)


@pytest.mark.parametrize(
    ("f", "arg", "part"),
    [
        (_wrt_x, lambda: torch.linspace(0, 5, 40, dtype=F64).unsqueeze(-1), "generic engine"),
        (_wrt_lengthscale, lambda: torch.zeros(1, 1, dtype=F64), "stationary engine"),
        (_sum_with_root, lambda: torch.ones(40, dtype=F64), "the root's products"),
    ],
    ids=["generic", "stationary", "root"],
)
def test_vectorized_jacobian_is_refused_by_name_and_the_loop_works(f, arg, part):
    a = arg()
    jac = torch.autograd.functional.jacobian(f, a)
    assert torch.isfinite(jac).all() and bool(jac.abs().sum() > 0)
    with pytest.raises(
        NotImplementedError, match=rf"batched gradients are not implemented for .*{part}.*vectorize=False"
    ):
        torch.autograd.functional.jacobian(f, a, vectorize=True)


def test_vectorized_jacobian_through_a_single_operator_still_works():
    p = _partition()
    B = torch.eye(8, dtype=F64) + 0.1

    def f(lam):
        return BlockMeanLinearOperator(lam, B, p).logdet().reshape(1)

    lam = torch.full((8,), 2.0, dtype=F64)
    torch.testing.assert_close(
        torch.autograd.functional.jacobian(f, lam, vectorize=True), torch.autograd.functional.jacobian(f, lam)
    )


@pytest.mark.parametrize("build", ["labels", "sizes"])
def test_a_partition_built_under_inference_mode_serves_gradients(build):
    with torch.inference_mode():
        p = Partition.from_labels(torch.tensor([0, 0, 1, 1, 1])) if build == "labels" else Partition.from_sizes([2, 3])
        assert p.labels.numel() == 5  # built lazily: under inference mode here
    assert not p.labels.is_inference() and not p.sizes.is_inference()
    M = BlockMeanLinearOperator(torch.ones(2, dtype=F64), torch.eye(2, dtype=F64), p)
    y = torch.randn(5, dtype=F64, requires_grad=True)
    M.inv_quad(y.unsqueeze(-1)).backward()
    torch.testing.assert_close(y.grad, 2 * torch.linalg.solve(M.to_dense(), y.detach()))
    b = torch.ones(2, dtype=F64, requires_grad=True)
    BlockMeanLinearOperator(torch.ones(2, dtype=F64), b, p, diagonal=True).to_dense().sum().backward()
    torch.testing.assert_close(b.grad, torch.tensor([4.0, 9.0], dtype=F64))


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("copied", [False, True])
def test_in_place_edits_of_lam_and_B_drop_the_stored_results(diagonal, copied):
    labels = torch.tensor([0, 2, 0, 1, 1, 2, 2, 0])
    p = Partition.from_labels(labels)
    lam = torch.tensor([1.0, 2.0, 1.5], dtype=F64)
    B = torch.tensor([[1.0, 0.2, 0.1], [0.2, 1.0, 0.3], [0.1, 0.3, 1.0]], dtype=F64)
    B = B.diagonal().clone() if diagonal else B
    x = torch.randn(8, 2, dtype=F64)
    M = BlockMeanLinearOperator(lam, B, p, diagonal=diagonal)
    M.solve(x), M.logdet(), M.to_dense(), M.matrix_inv_sqrt().to_dense(), M.inv_quad_logdet(x, logdet=True)
    M = copy.deepcopy(M) if copied else M
    with torch.no_grad():
        M.lam.mul_(2.0)
        (M._b_diag if diagonal else M.B).mul_(3.0)
    B_now = torch.diag(M._b_diag) if diagonal else M.B
    dense = torch.diag(M.lam[labels]) + B_now[labels][:, labels]
    torch.testing.assert_close(M.to_dense(), dense, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(M.solve(x), torch.linalg.solve(dense, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(M.logdet(), torch.logdet(dense), rtol=1e-12, atol=1e-12)
    e, V = torch.linalg.eigh(dense)
    torch.testing.assert_close(M.matrix_inv_sqrt().to_dense(), V @ torch.diag(e.rsqrt()) @ V.T, rtol=1e-11, atol=1e-11)
    with torch.no_grad():
        M.lam[0] = float("nan")
    with pytest.raises(ValueError, match=r"lam\[0\] = nan"):  # the finiteness check runs again
        M.solve(x)


def test_an_edit_after_a_flag_was_stored_but_before_any_result_is_seen():
    """``B`` diagonal by value when a product first looked (the diagonality flag stored), then edited in place to a
    dense matrix before any solve: the solve follows the edited ``B``."""
    p = Partition.from_labels(torch.tensor([0, 1, 1, 2, 0, 2]))
    lam, B = torch.ones(3, dtype=F64), torch.eye(3, dtype=F64)
    M = BlockMeanLinearOperator(lam, B, p)
    x = torch.randn(6, 1, dtype=F64)
    M @ x  # noqa: B018
    with torch.no_grad():
        B.add_(0.2)
    torch.testing.assert_close(M.solve(x), torch.linalg.solve(M.to_dense(), x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(M.to_dense(), torch.diag(lam[p.labels]) + B[p.labels][:, p.labels], rtol=0, atol=0)
