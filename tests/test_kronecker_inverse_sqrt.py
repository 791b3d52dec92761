"""Kronecker compositions with a block mean factor, session 37 user trial: ``sqrt_inv_matmul`` in closed form, and the
Kronecker sums built directly with linear_operator's constructors.

``sqrt_inv_matmul`` of ``Kron(M, K)``, ``Kron(M, K).add_diagonal(c)`` and the noisy Kronecker sums ran linear_operator's
contour-integral quadrature (CG and MINRES) without a word: 1.3e-5 to 2.5e-4 off by default, 0.4-0.63 under
``max_cg_iterations(1)``. ``KroneckerProductAddedDiagLinearOperator(Kron(M, K), DiagLinearOperator(d))`` built directly
(not by ``+``) kept linear_operator's class, which solved a per-point noise by CG silently (21% off). Each test failed
on the code before."""

from __future__ import annotations

import warnings

import pytest
import torch
from linear_operator import settings as lo_settings
from linear_operator.operators import (
    DenseLinearOperator,
    DiagLinearOperator,
    KroneckerProductAddedDiagLinearOperator,
    KroneckerProductLinearOperator,
    SumKroneckerLinearOperator,
)

import test_kronecker_block_mean as rank0
import test_kronecker_roots as roots
from bma_gp import BlockMeanLinearOperator, ClosedFormFallbackWarning
from bma_gp._composition import BlockMeanKroneckerAddedDiagLinearOperator, BlockMeanSumKroneckerLinearOperator
from closed_form_guard import closed_forms_only

pytestmark = pytest.mark.usefixtures("one_thread")

N, T = roots.N, roots.T


def _inverse_sqrt(A: torch.Tensor) -> torch.Tensor:
    e, V = torch.linalg.eigh(A)
    return (V * e.rsqrt().unsqueeze(-2)) @ V.mT


def _tolerance(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-4


@pytest.mark.parametrize(("noise", "batch", "dtype", "diagonal", "data_first"), roots.CASES)
def test_sqrt_inv_matmul_of_noisy_kronecker_sums_matches_dense(noise, batch, dtype, diagonal, data_first):
    """``A^{-1/2} R`` with the symmetric root, and with ``lhs`` (``L A^{-1/2} R``, ``diag(L A^{-1} L^T)``), for both
    noises (per-task, task-coupling), both factor orders, diagonal and dense ``B``, batches and float32, without CG,
    MINRES, Lanczos, a dense factorisation of ``N`` rows or a warning, even with one CG iteration allowed."""
    op, dense, _ = roots._operator(noise, batch, dtype, diagonal, data_first)
    A = dense.detach().double()
    root = _inverse_sqrt(A)
    gen = torch.Generator().manual_seed(1)
    rhs = torch.randn(*batch, N * T, 3, generator=gen, dtype=dtype)
    lhs = torch.randn(*batch, 2, N * T, generator=gen, dtype=dtype)
    with lo_settings.max_cg_iterations(1), closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        res = op.sqrt_inv_matmul(rhs)
        both, quad = op.sqrt_inv_matmul(rhs, lhs)
        v = rhs[0, :, 0] if batch else rhs[:, 0]  # a vector: no batch dimensions (broadcast over the batch)
        vector = op.sqrt_inv_matmul(v)
    assert res.dtype == dtype and res.shape == rhs.shape and vector.shape == (*batch, N * T)
    expected = root @ rhs.double()
    scale = expected.abs().max()
    tol = _tolerance(dtype)
    assert (res.double() - expected).abs().max() <= tol * scale
    assert (vector.double() - root @ v.double()).abs().max() <= tol * scale
    expected_both = lhs.double() @ expected
    assert (both.double() - expected_both).abs().max() <= tol * expected_both.abs().max()
    expected_quad = (lhs.double() @ torch.linalg.solve(A, lhs.double().mT)).diagonal(dim1=-2, dim2=-1)
    assert (quad.double() - expected_quad).abs().max() <= tol * expected_quad.abs().max()


def test_sqrt_inv_matmul_gradients_match_finite_differences():
    """Gradients of ``A^{-1/2} R`` with respect to ``lam``, ``B``, the task factor, the task variances and the noise
    pass ``gradcheck`` (the dense matrix's ``eigh`` has repeated eigenvalues, whose backward pass is NaN)."""
    leaves = rank0._inputs()
    partition = rank0._partition()
    rhs = torch.randn(N * T, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def f(*xs):
        op, _, _ = rank0._build(*xs, partition)
        return op.sqrt_inv_matmul(rhs)

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("data_first", [True, False])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sqrt_inv_matmul_of_a_bare_kronecker_product_is_closed_form(data_first, batch, dtype):
    """``(M (x) K)^{-1/2} R`` for a positive definite ``M`` and ``K``: the same split with no noise."""
    lam, B, factor, variances, _ = (x.detach() for x in rank0._inputs(batch, dtype, False))
    M = BlockMeanLinearOperator(lam, B, rank0._partition())
    K = factor @ factor.mT + torch.diag_embed(variances)
    kron = (
        KroneckerProductLinearOperator(M, DenseLinearOperator(K))
        if data_first
        else KroneckerProductLinearOperator(DenseLinearOperator(K), M)
    )
    A = kron.to_dense().double()
    assert bool((torch.linalg.eigvalsh(A) > 0).all())
    rhs = torch.randn(*batch, N * T, 2, generator=torch.Generator().manual_seed(3), dtype=dtype)
    with lo_settings.max_cg_iterations(1), closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        res = kron.sqrt_inv_matmul(rhs)
    expected = _inverse_sqrt(A) @ rhs.double()
    assert res.dtype == dtype
    assert (res.double() - expected).abs().max() <= _tolerance(dtype) * expected.abs().max()


def test_sqrt_inv_matmul_without_a_closed_form_is_announced():
    """A per-point noise has no closed form: linear_operator's quadrature still runs, with a warning that says so."""
    lam, B, factor, variances, _ = (x.detach() for x in rank0._inputs())
    M = BlockMeanLinearOperator(lam, B, rank0._partition())
    K = factor @ factor.mT + torch.diag_embed(variances)
    d = torch.rand(N * T, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.1
    op = KroneckerProductLinearOperator(M, DenseLinearOperator(K)) + DiagLinearOperator(d)
    with pytest.warns(ClosedFormFallbackWarning, match="sqrt_inv_matmul of a BlockMeanKroneckerAddedDiag"):
        op.sqrt_inv_matmul(torch.ones(N * T, 1, dtype=torch.float64))


@pytest.mark.parametrize("per_point", [False, True])
def test_kronecker_added_diag_built_directly_is_ours(per_point):
    """``KroneckerProductAddedDiagLinearOperator(Kron(M, K), diagonal)`` built directly is the operator ``+`` builds: a
    per-task noise in closed form (without CG even at ``max_cholesky_size(0)``), a per-point one announced."""
    leaves = [x.detach() for x in rank0._inputs()]
    lam, B, factor, variances, noise = leaves
    M = BlockMeanLinearOperator(lam, B, rank0._partition())
    K = factor @ factor.mT + torch.diag_embed(variances)
    kron = KroneckerProductLinearOperator(M, DenseLinearOperator(K))
    values = (
        torch.rand(N * T, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.1
        if per_point
        else noise.repeat(N)  # point-major: the task noises at every point
    )
    op = KroneckerProductAddedDiagLinearOperator(kron, DiagLinearOperator(values))
    assert type(op) is BlockMeanKroneckerAddedDiagLinearOperator
    A = kron.to_dense() + torch.diag(values)
    rhs = torch.randn(N * T, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    if per_point:
        with pytest.warns(ClosedFormFallbackWarning, match="not the same for every data point"):
            op.solve(rhs)
        return
    with lo_settings.max_cholesky_size(0), closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        x = op.solve(rhs)
        logdet = op.logdet()
    assert (x - torch.linalg.solve(A, rhs)).abs().max() <= 1e-10 * x.abs().max()
    assert abs(float(logdet) - float(torch.logdet(A))) <= 1e-9 * abs(float(torch.logdet(A)))


def test_sum_kronecker_built_directly_is_ours():
    """``SumKroneckerLinearOperator(Kron(M, K), Kron(I, D))`` built directly is the closed-form task-coupling sum."""
    op, dense, _ = roots._operator("rank1", (), torch.float64, False, True)
    direct = SumKroneckerLinearOperator(*op.linear_ops)
    assert type(direct) is BlockMeanSumKroneckerLinearOperator
    rhs = torch.randn(N * T, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with lo_settings.max_cholesky_size(0), closed_forms_only(N):
        x = direct.solve(rhs)
    expected = torch.linalg.solve(dense.detach(), rhs)
    assert (x - expected).abs().max() <= 1e-10 * expected.abs().max()
