"""Matrix products with no closed form are a :class:`~bma_gp.FallbackMatmulLinearOperator`, never a silent
``MatmulLinearOperator``.

linear_operator's ``MatmulLinearOperator`` solves with a dense Cholesky or CG, which assume symmetry: a product over a
third partition, ``M @ S`` for a sum ``S``, or a block mean operator times a dense or other generic operator (either
side) got wrong solves (or a ``NotPSDError``) with no warning. The fallback multiplies exactly and silently, solves and
takes log-determinants by a dense LU with a :class:`~bma_gp.ClosedFormFallbackWarning`, and refuses roots.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from linear_operator.operators import DenseLinearOperator, DiagLinearOperator, MatmulLinearOperator

from bma_gp import (
    BlockMeanSumLinearOperator,
    ClosedFormFallbackWarning,
    FallbackMatmulLinearOperator,
    FallbackSumLinearOperator,
    Partition,
)
from test_block_mean_products import close, operator, partitions

pytestmark = pytest.mark.usefixtures("one_thread")

N = 9


def factors():
    p1, p2 = partitions("scattered")
    p3 = Partition.from_labels(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3]))
    M1, M2, M3 = operator(p1), operator(p2, seed=1), operator(p3, seed=2)
    S, S2 = M1 + M2, M3 + operator(p1, seed=5)
    assert isinstance(S, BlockMeanSumLinearOperator) and isinstance(S2, BlockMeanSumLinearOperator)
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(N, N, generator=gen, dtype=torch.float64) + 3 * torch.eye(N, dtype=torch.float64)
    d = torch.rand(N, generator=gen, dtype=torch.float64) + 0.5
    return M1, M2, M3, S, S2, DenseLinearOperator(A), DiagLinearOperator(d)


CASES = {
    "third partition, right": lambda M1, M2, M3, S, S2, A, D: (M1 @ M2) @ M3,
    "third partition, left": lambda M1, M2, M3, S, S2, A, D: M3 @ (M1 @ M2),
    "M @ S": lambda M1, M2, M3, S, S2, A, D: M3 @ S,
    "S @ M": lambda M1, M2, M3, S, S2, A, D: S @ M3,
    "S @ S2": lambda M1, M2, M3, S, S2, A, D: S @ S2,
    "M @ dense": lambda M1, M2, M3, S, S2, A, D: M1 @ A,
    "dense @ M": lambda M1, M2, M3, S, S2, A, D: A @ M1,
    "M @ diag": lambda M1, M2, M3, S, S2, A, D: M1 @ D,
    "diag @ M": lambda M1, M2, M3, S, S2, A, D: D @ M1,
    "product @ dense": lambda M1, M2, M3, S, S2, A, D: (M1 @ M2) @ A,
    "dense @ product": lambda M1, M2, M3, S, S2, A, D: A @ (M1 @ M2),
    "dense @ S": lambda M1, M2, M3, S, S2, A, D: A @ S,
    "S @ dense": lambda M1, M2, M3, S, S2, A, D: S @ A,
}


def dense_of(name):
    """The operator of case ``name`` and its dense float64 matrix (from the factors' dense matrices)."""
    ops = factors()
    P = CASES[name](*ops)
    dense = CASES[name](*(op.to_dense() for op in ops))
    return P, dense


@pytest.mark.parametrize("name", list(CASES))
def test_products_without_closed_form_are_the_named_fallback(name):
    P, dense = dense_of(name)
    assert type(P) is FallbackMatmulLinearOperator
    assert not torch.allclose(dense, dense.mT)  # not symmetric: linear_operator's solvers would be wrong


@pytest.mark.parametrize("name", list(CASES))
def test_fallback_products_are_exact_and_silent(name):
    P, dense = dense_of(name)
    b = torch.randn(N, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert isinstance(P, FallbackMatmulLinearOperator)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        close(P @ b, dense @ b)
        close(P.matmul(b[:, 0]), dense @ b[:, 0])
        close(P.to_dense(), dense)
        close(P.diagonal(), dense.diagonal())
        close(P.mT @ b, dense.mT @ b)


# a block mean operator times a diagonal solves factor by factor (tests/test_session38_trials.py)
CLOSED_FACTORS = ("M @ diag", "diag @ M")


@pytest.mark.parametrize("name", [name for name in CASES if name not in CLOSED_FACTORS])
def test_fallback_solves_and_logdets_use_lu_and_warn(name):
    P, dense = dense_of(name)
    b = torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    left = torch.randn(3, N, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with pytest.warns(ClosedFormFallbackWarning, match="not symmetric.*LU"):
        close(P.solve(b), torch.linalg.solve(dense, b))
    with pytest.warns(ClosedFormFallbackWarning, match="LU"):
        close(P.solve(b, left), left @ torch.linalg.solve(dense, b))
    with pytest.warns(ClosedFormFallbackWarning, match="LU"):
        close(P.logdet(), torch.logdet(dense))
    with pytest.warns(ClosedFormFallbackWarning, match="LU"):
        inv_quad, logdet = P.inv_quad_logdet(b, logdet=True)
    close(inv_quad, (b * torch.linalg.solve(dense, b)).sum())
    close(logdet, torch.logdet(dense))


@pytest.mark.parametrize("name", CLOSED_FACTORS)
def test_products_with_a_diagonal_solve_factor_by_factor_without_a_warning(name):
    P, dense = dense_of(name)
    b = torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    left = torch.randn(3, N, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        close(P.solve(b), torch.linalg.solve(dense, b))
        close(P.solve(b, left), left @ torch.linalg.solve(dense, b))
        close(P.logdet(), torch.logdet(dense))
        inv_quad, logdet = P.inv_quad_logdet(b, logdet=True)
    close(inv_quad, (b * torch.linalg.solve(dense, b)).sum())
    close(logdet, torch.logdet(dense))


@pytest.mark.parametrize("name", list(CASES))
def test_fallback_roots_raise(name):
    P, _ = dense_of(name)
    with pytest.raises(ValueError, match="not symmetric.*no such root"):
        P.root_decomposition()
    with pytest.raises(ValueError, match="not symmetric.*no such root"):
        P.root_inv_decomposition()


def test_sums_with_a_fallback_product_stay_fallbacks():
    """``P + noise`` (either order, or ``add_diagonal``) is a fallback sum that knows it is not symmetric."""
    P, dense = dense_of("M @ S")
    d = torch.rand(N, dtype=torch.float64) + 1
    b = torch.randn(N, 2, dtype=torch.float64)
    for T in (P + DiagLinearOperator(d), DiagLinearOperator(d) + P, P.add_diagonal(d)):
        assert isinstance(T, FallbackSumLinearOperator)
        with pytest.warns(ClosedFormFallbackWarning, match="not symmetric.*LU"):
            close(T.solve(b), torch.linalg.solve(dense + torch.diag(d), b))


def test_products_of_other_operators_are_unaffected():
    """Products that involve none of this package's operators are linear_operator's own."""
    A = DenseLinearOperator(torch.randn(4, 4, dtype=torch.float64))
    B = DenseLinearOperator(torch.randn(4, 4, dtype=torch.float64))
    assert type(A @ B) is MatmulLinearOperator
    assert type(DiagLinearOperator(torch.rand(4, dtype=torch.float64)) @ A) is DenseLinearOperator


def test_gp_models_emit_no_fallback_warnings():
    """Training and prediction of a GPyTorch model with a block mean kernel build no fallback product: no warning."""
    from test_gp_inference import build_model, make_data, make_partition

    x, y = make_data()
    model, likelihood, _ = build_model(x, y, make_partition(x.shape[0], 7, contiguous=False), scale=True)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        model.train()
        likelihood.train()
        (-mll(model(x), y)).backward()
        model.eval()
        likelihood.eval()
        xt = torch.rand(5, 2, dtype=torch.float64)
        for fast in (False, True):
            with gpytorch.settings.fast_pred_var(fast):
                pred = likelihood(model(xt))
                assert bool(torch.isfinite(pred.covariance_matrix).all() & torch.isfinite(pred.mean).all())
