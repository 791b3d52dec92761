"""Roots, inverse roots and solves of block mean operators that are not positive definite, against dense float64.

An audit found that the errors of ``root_decomposition`` / ``root_inv_decomposition`` / ``sqrt_inv_matmul`` of a
single operator named the internal ``matrix_sqrt`` / ``matrix_inv_sqrt``; that with validation off a sum's roots
raised where a single operator's clamp; that with validation on an invertible indefinite sum refused ``solve``
where a single operator solves it; and that a float32 model predicted float64 inputs from float32 caches.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

import bma_gp
from bma_gp import BlockMeanKernel, BlockMeanLinearOperator, BlockMeanSumLinearOperator, GroupKernel, Partition
from gp_reference import GP

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems

N = 12
DTYPE = torch.float64


def _indefinite_B() -> torch.Tensor:
    return torch.tensor([[-2.0, 0.1, 0.0], [0.1, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=DTYPE)


def _single(dtype=DTYPE) -> BlockMeanLinearOperator:
    """``diag(1) + P B P^T`` with one negative eigenvalue (about -7)."""
    part = Partition.from_labels(torch.arange(N) % 3)
    return BlockMeanLinearOperator(torch.ones(3, dtype=DTYPE), _indefinite_B(), part).to(dtype)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda op: op.root_decomposition(), "root_decomposition"),
        (lambda op: op.root_inv_decomposition(), "root_inv_decomposition"),
        (lambda op: op.sqrt_inv_matmul(torch.ones(N, 2, dtype=op.dtype)), "sqrt_inv_matmul"),
    ],
)
def test_single_operator_root_errors_name_the_call(call, name):
    op = _single()
    assert float(torch.linalg.eigvalsh(op.to_dense()).min()) < -1
    with pytest.raises(ValueError, match=rf"^{name} needs a positive (semi)?definite matrix.*Add a diagonal"):
        call(op)
    with pytest.raises(ValueError, match=r"^matrix_sqrt needs a positive semidefinite"):  # the direct call
        op.matrix_sqrt()


def _positive_part(M: torch.Tensor) -> torch.Tensor:
    e, V = torch.linalg.eigh(M)
    return (V * e.clamp_min(0).unsqueeze(-2)) @ V.mT


def _indefinite_sum(d: torch.Tensor, dtype=DTYPE) -> BlockMeanSumLinearOperator:
    """``diag(d) + P_1 B P_1^T + P_2 P_2^T`` with one negative eigenvalue (``B`` indefinite); ``d`` may be batched."""
    first = Partition.from_labels(torch.arange(N) % 3)
    second = Partition.from_labels(torch.arange(N) // 4)
    op = BlockMeanSumLinearOperator(d, _indefinite_B(), torch.eye(3, dtype=DTYPE), partitions=[first, second])
    return op.to(dtype)


def _diagonals() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "constant": torch.full((N,), 0.5, dtype=DTYPE),
        "per point": 0.3 + torch.rand(N, generator=gen, dtype=DTYPE),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("diagonal", ["constant", "per point"])
def test_sum_roots_without_validation_clamp_like_a_single_operator(dtype, diagonal):
    d = _diagonals()[diagonal]
    op = _indefinite_sum(d, dtype)
    M = op.to_dense().double()
    assert float(torch.linalg.eigvalsh(M).min()) < -1
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    with bma_gp.settings.validate(False):
        R = op.root_decomposition().root.to_dense().double()
        R_inv = op.root_inv_decomposition().root.to_dense()
    h = d.sqrt().unsqueeze(-1)
    torch.testing.assert_close(R @ R.mT, h * _positive_part(M / h / h.mT) * h.mT, **tol)
    if diagonal == "constant":  # the positive part of M, as a single operator clamps
        torch.testing.assert_close(R @ R.mT, _positive_part(M), **tol)
    assert bool(R_inv.isnan().any())  # an inverse root of an indefinite matrix: NaN, as a single operator's
    with pytest.raises(ValueError, match="is not positive definite"):  # validation back on: checked again
        op.root_decomposition()
    with pytest.raises(ValueError, match="is not positive definite"):
        op.root_inv_decomposition()


def test_single_operator_root_without_validation_is_the_positive_part():
    op = _single()
    with bma_gp.settings.validate(False):
        R = op.root_decomposition().root.to_dense()
        R_inv = op.root_inv_decomposition().root.to_dense()
    torch.testing.assert_close(R @ R.mT, _positive_part(op.to_dense()), rtol=1e-10, atol=1e-10)
    assert bool(R_inv.isnan().any())


def test_sum_without_diagonal_root_without_validation_is_the_positive_part():
    op = _indefinite_sum(torch.zeros(N, dtype=DTYPE))
    M = op.to_dense()
    with pytest.raises(ValueError, match="is not positive semidefinite"):
        op.root_decomposition()
    with bma_gp.settings.validate(False):
        R = op.root_decomposition().root.to_dense()
    torch.testing.assert_close(R @ R.mT, _positive_part(M), rtol=1e-10, atol=1e-10)


def test_batched_sum_roots_without_validation_clamp_per_entry():
    d = torch.stack([torch.full((N,), 0.5, dtype=DTYPE), torch.full((N,), 9.0, dtype=DTYPE)])  # second: definite
    op = _indefinite_sum(d)
    M = op.to_dense()
    assert float(torch.linalg.eigvalsh(M[1]).min()) > 0 > float(torch.linalg.eigvalsh(M[0]).min())
    with bma_gp.settings.validate(False):
        R = op.root_decomposition().root.to_dense()
        R_inv = op.root_inv_decomposition().root.to_dense()
    torch.testing.assert_close(R @ R.mT, _positive_part(M), rtol=1e-10, atol=1e-10)
    assert bool(R_inv[0].isnan().any())
    torch.testing.assert_close(R_inv[1] @ R_inv[1].mT, torch.linalg.inv(M[1]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_invertible_indefinite_sum_solves_as_a_single_operator_does(dtype):
    d = torch.stack([torch.full((N,), 0.5, dtype=DTYPE), 0.3 + torch.rand(N, dtype=DTYPE)])
    op = _indefinite_sum(d, dtype)
    M = op.to_dense().double()
    assert bool((torch.linalg.eigvalsh(M)[..., 0] < -1).all())
    b = torch.randn(2, N, 3, dtype=DTYPE)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    want = torch.linalg.solve(M, b)
    torch.testing.assert_close(op.solve(b.to(dtype)).double(), want, **tol)
    torch.testing.assert_close(op.inv_quad(b.to(dtype), reduce_inv_quad=False).double(), (b * want).sum(-2), **tol)
    for call in (op.logdet, lambda: op.inv_quad_logdet(b.to(dtype), logdet=True)):  # these need it definite
        with pytest.raises(ValueError, match="is not positive definite"):
            call()
    single = _single(dtype)  # the single operator's behaviour that the sum now matches
    torch.testing.assert_close(
        single.solve(b[0].to(dtype)).double(), torch.linalg.solve(single.to_dense().double(), b[0]), **tol
    )


def test_indefinite_diagonal_grouping_solves_and_a_singular_one_raises():
    part = Partition.from_labels(torch.arange(N) % 3)  # 4 points per level
    d = torch.ones(N, dtype=DTYPE)
    g = torch.tensor([0.5, -2.0, 1.0], dtype=DTYPE)  # level 1: 1 + 4 g = -7, an indefinite invertible sum
    op = BlockMeanSumLinearOperator(d, g, partitions=[part], diagonal=[True])
    b = torch.randn(N, 2, dtype=DTYPE)
    torch.testing.assert_close(op.solve(b), torch.linalg.solve(op.to_dense(), b), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="has a negative diagonal entry large enough"):
        op.logdet()
    singular = BlockMeanSumLinearOperator(
        d, torch.tensor([0.5, -0.25, 1.0], dtype=DTYPE), partitions=[part], diagonal=[True]
    )
    with pytest.raises(ValueError, match="is singular"):
        singular.solve(b)


@pytest.mark.parametrize("kind", ["block mean", "block mean + group"])
def test_float32_model_refuses_float64_test_inputs_in_words(kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, generator=gen)
    ids = (x[:, 0] * 5).long().clamp(max=4)
    part = Partition.from_labels(ids)
    if kind == "block mean":
        kernel = BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, part)
    else:
        x = torch.cat([x, ids.float().unsqueeze(-1)], dim=-1)
        kernel = BlockMeanKernel(gpytorch.kernels.RBFKernel(active_dims=[0]), x, part) + GroupKernel(5, active_dims=[1])
    y = torch.sin(6 * x[:, 0])
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).eval()
    test_x = torch.rand(5, x.shape[-1], generator=gen, dtype=torch.float64)
    test_x[:, 1:] = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]).unsqueeze(-1)  # group ids, where there is a second column
    with torch.no_grad():
        with pytest.raises(TypeError, match=r"torch\.float64 covariance.*is torch\.float32.*model\.double\(\)"):
            model(test_x)
        model32 = model(test_x.float()).mean  # the model's own dtype still predicts
        assert model32.dtype == torch.float32
        model.double()  # the fix the error names: converts the training data too, and predicts in float64
        mean64 = model(test_x).mean
    assert mean64.dtype == torch.float64
    torch.testing.assert_close(mean64.float(), model32, rtol=1e-3, atol=1e-3)


def test_sum_sqrt_inv_matmul_errors_name_the_call():
    part = Partition.from_labels(torch.arange(N) % 3)
    eye = torch.eye(3, dtype=DTYPE)
    op = BlockMeanSumLinearOperator(torch.zeros(N, dtype=DTYPE), eye, partitions=[part])  # d = 0: singular
    with pytest.raises(ValueError, match=r"^sqrt_inv_matmul needs a positive per-point diagonal d, but d\[0\] = 0"):
        op.sqrt_inv_matmul(torch.ones(N, 1, dtype=DTYPE))


@pytest.mark.parametrize("diagonal", ["positive", "zero"])
def test_sum_roots_name_a_non_finite_block_under_validation(diagonal):
    first = Partition.from_labels(torch.arange(N) % 3)
    second = Partition.from_labels(torch.arange(N) // 4)
    B = torch.eye(3, dtype=DTYPE)
    B[0, 1] = B[1, 0] = float("nan")
    d = torch.ones(N, dtype=DTYPE) if diagonal == "positive" else torch.zeros(N, dtype=DTYPE)
    op = BlockMeanSumLinearOperator(d, B, torch.eye(3, dtype=DTYPE), partitions=[first, second])
    calls = [op.root_decomposition] + ([op.root_inv_decomposition] if diagonal == "positive" else [])
    for call in calls:  # torch's LinAlgError from the eigendecomposition before
        with pytest.raises(ValueError, match=r"the sum's input is not finite: blocks\[0\]\[0, 1\] = nan"):
            call()


@pytest.mark.parametrize("case", ["nan in B", "inf in an indefinite B", "zero diagonal, inverse"])
def test_sum_roots_without_validation_give_nan_for_non_finite_input(case):
    first = Partition.from_labels(torch.arange(N) % 3)
    second = Partition.from_labels(torch.arange(N) // 4)
    d, B = torch.ones(N, dtype=DTYPE), torch.eye(3, dtype=DTYPE)
    if case == "nan in B":
        B[0, 1] = B[1, 0] = float("nan")
    elif case == "inf in an indefinite B":
        B = _indefinite_B()
        B[2, 2] = float("inf")
    else:
        d = torch.zeros(N, dtype=DTYPE)
    op = BlockMeanSumLinearOperator(d, B, torch.eye(3, dtype=DTYPE), partitions=[first, second])
    calls = (
        [op.root_inv_decomposition] if case.startswith("zero") else [op.root_decomposition, op.root_inv_decomposition]
    )
    with bma_gp.settings.validate(False):
        for call in calls:  # LAPACK's LinAlgError, or (inf) finite numbers, before
            root = call().root.to_dense()
            assert not bool(torch.isfinite(root).all())


def test_sum_sqrt_inv_matmul_refusal_says_that_d_holds_the_summands_lam():
    """A sum with a constant noise whose block mean summand has a ``lam`` that varies by block (a
    ``BlockMeanKernel``'s operator) was refused with "this operator has a per-point diagonal", which reads as wrong
    to a user who added a constant: the message now says that ``d`` collects each summand's ``lam`` too."""
    from linear_operator.operators import DiagLinearOperator

    pa = Partition.from_labels(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    pb = Partition.from_labels(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    Ma = BlockMeanLinearOperator(torch.tensor([0.2, 0.3, 0.4], dtype=DTYPE), torch.eye(3, dtype=DTYPE), pa)
    Gb = BlockMeanLinearOperator(torch.zeros(4, dtype=DTYPE), torch.ones(4, dtype=DTYPE), pb, diagonal=True)
    S = Ma + Gb + DiagLinearOperator(torch.full((8,), 0.5, dtype=DTYPE))
    with pytest.raises(NotImplementedError, match=r"d varies from point to point.*each block mean summand's lam"):
        S.sqrt_inv_matmul(torch.ones(8, 2, dtype=DTYPE))
