"""The guard itself: every path it claims to close raises inside it, and nothing stays patched."""

import linear_operator
import pytest
import torch
from linear_operator.operators import DenseLinearOperator

from closed_form_guard import ForbiddenPath, closed_forms_only


def spd(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    root = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return root @ root.T / n + torch.eye(n, dtype=torch.float64)


def test_cg_is_refused_where_linear_operator_looks_it_up():
    A, b = DenseLinearOperator(spd(30)), torch.ones(30, 1, dtype=torch.float64)
    with linear_operator.settings.max_cholesky_size(0), closed_forms_only(1000):
        with pytest.raises(ForbiddenPath, match="linear_cg"):
            A.solve(b)


def test_library_cholesky_is_refused_although_imported_by_value():
    # _linear_operator.py holds its own reference (from ... import psd_safe_cholesky): patching the
    # defining module alone would let this solve through
    A, b = DenseLinearOperator(spd(30)), torch.ones(30, 1, dtype=torch.float64)
    with linear_operator.settings.max_cholesky_size(10_000), closed_forms_only(30):
        with pytest.raises(ForbiddenPath, match="psd_safe_cholesky"):
            A.solve(b)


def test_small_library_cholesky_is_allowed():
    # SGPR factorises its m x m inducing-point kernel with psd_safe_cholesky: below n that is no n x n path
    A = spd(10)
    with closed_forms_only(30):
        L = linear_operator.utils.cholesky.psd_safe_cholesky(A)
    assert torch.allclose(L @ L.mT, A)


def test_lanczos_and_stochastic_logdet_are_refused():
    A = DenseLinearOperator(spd(30))
    with linear_operator.settings.max_cholesky_size(0), closed_forms_only(1000):
        with pytest.raises(ForbiddenPath, match="lanczos_tridiag|linear_cg"):
            A.root_decomposition(method="lanczos").root.to_dense()
        with pytest.raises(ForbiddenPath, match="lanczos_tridiag|linear_cg"):
            A.logdet()


def test_contour_integral_quadrature_is_refused():
    A, b = DenseLinearOperator(spd(30)), torch.ones(30, 1, dtype=torch.float64)
    with linear_operator.settings.max_cholesky_size(0), closed_forms_only(1000):
        with pytest.raises(ForbiddenPath, match="contour_integral_quad|linear_cg|minres"):
            A.sqrt_inv_matmul(b)


@pytest.mark.parametrize(
    "module,name",
    [
        (torch.linalg, "cholesky"),
        (torch.linalg, "eigh"),
        (torch.linalg, "inv"),
        (torch.linalg, "slogdet"),
        (torch, "logdet"),
    ],
)
def test_dense_factorisations_are_refused_from_size_n_on(module, name):
    with closed_forms_only(5):
        fn = getattr(module, name)  # looked up inside, as the code under test does
        fn(spd(4))  # a k x k core problem below the limit stays allowed
        with pytest.raises(ForbiddenPath, match=r"\(5, 5\)"):
            fn(spd(5))


def test_cholesky_solve_checks_the_factor_not_the_right_hand_side():
    L = torch.linalg.cholesky(spd(6))
    with closed_forms_only(6):
        with pytest.raises(ForbiddenPath):
            torch.cholesky_solve(torch.ones(6, 1, dtype=torch.float64), L)


def test_everything_is_restored_on_exit():
    import linear_operator.operators._linear_operator as lo

    before = (linear_operator.utils.linear_cg, lo.psd_safe_cholesky, torch.linalg.cholesky)
    with closed_forms_only(3):
        assert lo.psd_safe_cholesky is not before[1]
    assert (linear_operator.utils.linear_cg, lo.psd_safe_cholesky, torch.linalg.cholesky) == before
    A, b = DenseLinearOperator(spd(30)), torch.ones(30, 1, dtype=torch.float64)
    torch.testing.assert_close(A.solve(b), torch.linalg.solve(spd(30), b))


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_limit_is_a_value_error(n):
    with pytest.raises(ValueError, match="n must be a positive int"):
        with closed_forms_only(n):
            pass
