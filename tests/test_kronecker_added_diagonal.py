"""A diagonal added to a Kronecker sum with a block mean factor and a task-coupling noise, ``M (x) K + I (x) D``
(``MultitaskGaussianLikelihood(rank >= 1)``'s training covariance): ``add_jitter``, ``add_diagonal`` and ``+`` a
diagonal that is the same at every point within a task fold into ``D`` and keep the closed form (session 29).

Before, ``add_jitter`` and ``add_diagonal`` returned linear_operator's ``AddedDiagLinearOperator`` around the sum,
whose solves and log-determinant ran CG and Lanczos silently past ``max_cholesky_size`` (log-determinant 1.3-5.8
nats off, solves 3% off at n t = 120 under ``max_cholesky_size(0)``), and ``+ DiagLinearOperator`` a warned
fallback. A diagonal that differs from point to point has no closed form: it is announced with a
``ClosedFormFallbackWarning``, never silent. Each test failed on the code before."""

from __future__ import annotations

import warnings

import pytest
import torch
from linear_operator import settings as lo_settings
from linear_operator.operators import (
    AddedDiagLinearOperator,
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    KroneckerProductDiagLinearOperator,
    KroneckerProductLinearOperator,
    SumLinearOperator,
)

from bma_gp import BlockMeanLinearOperator, ClosedFormFallbackWarning
from bma_gp._composition import BlockMeanKroneckerAddedDiagLinearOperator, BlockMeanSumKroneckerLinearOperator
from closed_form_guard import closed_forms_only
from kronecker_reference import rhs as random_rhs
from test_kronecker_block_mean import N, T, _partition
from test_kronecker_task_noise import _build, _dense, _inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _task_repeated(values: torch.Tensor, data_first: bool) -> torch.Tensor:
    """The ``n t`` diagonal that holds ``values[j]`` at every point of task ``j``, in the operator's layout."""
    ones = torch.ones(*values.shape[:-1], N, dtype=values.dtype)
    grid = ones.unsqueeze(-1) * values.unsqueeze(-2) if data_first else values.unsqueeze(-1) * ones.unsqueeze(-2)
    return grid.flatten(-2)


ADDITIONS = [
    "jitter",
    "scalar",
    "scalar_batch",
    "per_task",
    "plus_constant_diag",
    "plus_per_task_diag",
    "constant_diag_plus",
    "per_task_diag_plus",
    "sum_built_directly",
    "added_diag_built_directly",
]


def _add(op, how: str, data_first: bool, batch, dtype):
    """``op`` plus a diagonal in one of the ways a user or GPyTorch adds one; returns the sum and the added diagonal
    as a dense ``(*batch, n t)`` tensor (the jitter's value is linear_operator's default for the dtype)."""
    gen = torch.Generator().manual_seed(7)
    size = op.shape[-1]
    if how == "jitter":
        res = op.add_jitter(1e-3)
        return res, torch.full((*batch, size), 1e-3, dtype=dtype)
    if how == "scalar":
        c = torch.tensor(0.3, dtype=dtype)
        return op.add_diagonal(c), c.expand(*batch, size)
    if how == "scalar_batch":
        c = torch.rand(*batch, 1, generator=gen, dtype=dtype) + 0.1
        return op.add_diagonal(c), c.expand(*batch, size)
    values = torch.rand(*batch, T, generator=gen, dtype=dtype) + 0.1
    diag = _task_repeated(values, data_first)
    if how == "per_task":
        return op.add_diagonal(diag), diag
    if how in ("plus_constant_diag", "constant_diag_plus"):
        c = torch.rand(*batch, 1, generator=gen, dtype=dtype) + 0.1
        constant = ConstantDiagLinearOperator(c, diag_shape=size)
        return (op + constant if how == "plus_constant_diag" else constant + op), c.expand(*batch, size)
    made = {
        "plus_per_task_diag": lambda: op + DiagLinearOperator(diag),
        "per_task_diag_plus": lambda: DiagLinearOperator(diag) + op,
        "sum_built_directly": lambda: SumLinearOperator(op, DiagLinearOperator(diag)),
        "added_diag_built_directly": lambda: AddedDiagLinearOperator(op, DiagLinearOperator(diag)),
    }
    return made[how](), diag


@pytest.mark.parametrize("how", ADDITIONS)
@pytest.mark.parametrize("data_first", [True, False])
@pytest.mark.parametrize("noise_first", [False, True])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_task_constant_diagonal_keeps_the_closed_form(how, data_first, noise_first, batch, dtype):
    leaves = [x.detach() for x in _inputs(batch, dtype)]
    op, M, K, Sigma = _build(*leaves, _partition(), data_first=data_first, noise_first=noise_first)
    added, diag = _add(op, how, data_first, batch, dtype)
    assert isinstance(added, BlockMeanSumKroneckerLinearOperator), type(added)
    rhs = random_rhs(added)
    with lo_settings.max_cholesky_size(0), closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        solved = added.solve(rhs)
        inv_quad, logdet = added.inv_quad_logdet(rhs, logdet=True)
    A = (_dense(M, K, Sigma, data_first) + torch.diag_embed(diag)).double()
    ref = torch.linalg.solve(A, rhs.double())
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert (solved.double() - ref).abs().max() <= tol * ref.abs().max()
    assert torch.allclose(logdet.double(), torch.logdet(A), rtol=tol)
    assert torch.allclose(inv_quad.double(), (rhs.double() * ref).sum((-2, -1)), rtol=tol)
    assert torch.allclose(added.to_dense().double(), A, rtol=tol, atol=tol)
    # the operator it was added to is unchanged
    assert torch.allclose(op.to_dense().double(), _dense(M, K, Sigma, data_first).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("how", ["scalar_batch", "plus_constant_diag"])
def test_gradients_reach_the_added_diagonal(how):
    """Gradients of inv_quad + logdet reach the sum's leaves and a scalar added with gradients, as dense autograd's."""
    batch, dtype = (2,), torch.float64
    leaves = _inputs(batch, dtype)
    c = (torch.rand(*batch, 1, generator=torch.Generator().manual_seed(5), dtype=dtype) + 0.1).requires_grad_()
    op, *_ = _build(*leaves, _partition())
    added = op.add_diagonal(c) if how == "scalar_batch" else op + ConstantDiagLinearOperator(c, diag_shape=N * T)
    assert isinstance(added, BlockMeanSumKroneckerLinearOperator)
    rhs = random_rhs(added)
    with lo_settings.max_cholesky_size(0), closed_forms_only(N):
        value = sum(added.inv_quad_logdet(rhs, logdet=True)).sum()
        got = torch.autograd.grad(value, [*leaves, c])
    _, M, K, Sigma = _build(*leaves, _partition())
    A = _dense(M, K, Sigma) + c.unsqueeze(-1) * torch.eye(N * T, dtype=dtype)
    ref = ((rhs * torch.linalg.solve(A, rhs)).sum((-2, -1)) + torch.logdet(A)).sum()
    want = torch.autograd.grad(ref, [*leaves, c])
    assert torch.allclose(value, ref, rtol=1e-10)
    for name, a, b in zip(("lam", "B", "factor", "variances", "noise_factor", "global_noise", "c"), got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10 * b.abs().max()), name


@pytest.mark.parametrize("how", ["add_diagonal", "plus"])
def test_per_point_diagonal_is_announced(how):
    """A diagonal that differs between the points of a task has no closed form here: linear_operator's path runs,
    with a ClosedFormFallbackWarning (it was silent CG and Lanczos under add_diagonal), and its answer is right
    where that path is exact (a dense Cholesky below max_cholesky_size)."""
    leaves = [x.detach() for x in _inputs()]
    op, M, K, Sigma = _build(*leaves, _partition())
    d = torch.rand(N * T, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    added = op.add_diagonal(d) if how == "add_diagonal" else op + DiagLinearOperator(d)
    rhs = random_rhs(added)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solved = added.solve(rhs)
    assert any(issubclass(w.category, ClosedFormFallbackWarning) for w in caught), [str(w.message) for w in caught]
    A = _dense(M, K, Sigma) + torch.diag_embed(d)
    assert torch.allclose(solved, torch.linalg.solve(A, rhs), rtol=1e-8, atol=1e-10)


def _rank_zero(batch=(), dtype=torch.float64):
    """``M (x) K + I_n (x) diag(sigma)`` (``MultitaskGaussianLikelihood(rank=0)``): a
    ``BlockMeanKroneckerAddedDiagLinearOperator``, and its dense matrix."""
    lam, B, factor, variances, *_ = (x.detach() for x in _inputs(batch, dtype))
    M = BlockMeanLinearOperator(lam, B, _partition())
    K = factor @ factor.mT + torch.diag_embed(variances)
    sigma = torch.rand(*batch, T, generator=torch.Generator().manual_seed(11), dtype=dtype) + 0.1
    eye = ConstantDiagLinearOperator(torch.ones(*batch, 1, dtype=dtype), diag_shape=N)
    op = KroneckerProductLinearOperator(M, DenseLinearOperator(K)) + KroneckerProductDiagLinearOperator(
        eye, DiagLinearOperator(sigma)
    )
    dense = M.to_dense()[..., :, None, :, None] * K[..., None, :, None, :]
    dense = dense.reshape(*batch, N * T, N * T) + torch.diag_embed(_task_repeated(sigma, True))
    return op, dense


@pytest.mark.parametrize("how", ["per_task_diag_plus", "sum_built_directly", "added_diag_built_directly"])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_rank_zero_sum_built_or_added_either_way_keeps_the_closed_form(how, batch):
    """The same for a per-task noise (rank 0): a diagonal in front, or the sum built directly, was linear_operator's
    SumLinearOperator / AddedDiagLinearOperator around it (silent CG and Lanczos; the routed construction was
    initialised a second time with the generic class's arguments and lost its structure)."""
    op, dense = _rank_zero(batch)
    assert isinstance(op, BlockMeanKroneckerAddedDiagLinearOperator)
    added, diag = _add(op, how, True, batch, torch.float64)
    assert isinstance(added, BlockMeanKroneckerAddedDiagLinearOperator), type(added)
    rhs = random_rhs(added)
    with lo_settings.max_cholesky_size(0), closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        solved = added.solve(rhs)
        logdet = added.logdet()
    A = dense + torch.diag_embed(diag)
    assert torch.allclose(solved, torch.linalg.solve(A, rhs), rtol=1e-10, atol=1e-12)
    assert torch.allclose(logdet, torch.logdet(A), rtol=1e-10)
