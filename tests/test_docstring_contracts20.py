"""Contracts a docstring trial found unkept (twentieth session): errors in words where raw torch errors came out,
``matrix_function`` refusing a function undefined on the spectrum instead of returning NaN silently, and
evaluating the function only on the spectrum (a singleton block's ``lam`` is no eigenvalue)."""

from __future__ import annotations

import warnings

import pytest
import torch
from linear_operator.operators import DiagLinearOperator

from bma_gp import BlockMeanLinearOperator, Partition, settings
from bma_gp._composition import closed_form

DTYPE = torch.float64


def _op(batch=(), diagonal=False, labels=(0, 0, 1, 2, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    p = Partition(torch.tensor(labels))
    k = p.num_blocks
    lam = 1.0 + torch.rand(*batch, k, generator=g, dtype=DTYPE)
    if diagonal:
        B = torch.diag_embed(1.0 + torch.rand(*batch, k, generator=g, dtype=DTYPE))
    else:
        X = torch.randn(*batch, k, k, generator=g, dtype=DTYPE)
        B = X @ X.mT / k + torch.eye(k, dtype=DTYPE)
    return BlockMeanLinearOperator(lam, B, p)


def _dense_function(M, fn):
    e, V = torch.linalg.eigh(M.to_dense())
    return V @ torch.diag_embed(fn(e)) @ V.mT


def test_schur_complement_with_batches_that_do_not_broadcast():
    M, A, N = _op((2,)), _op((2,), seed=1), _op((3,), seed=2)
    shapes = r"batch shapes of self \(2,\), cross \(2,\) and other \(3,\) do not broadcast"
    with pytest.raises(ValueError, match=shapes):
        M.schur_complement(A, N)
    # broadcastable batches still work, against the dense Schur complement
    N1 = _op((1,), seed=2)
    res = M.schur_complement(A, N1).to_dense()
    Ad = A.to_dense()
    want = M.to_dense() - Ad @ torch.linalg.solve(N1.to_dense(), Ad.mT)
    torch.testing.assert_close(res, want)


def test_from_core_with_a_dtype_that_is_not_a_torch_dtype():
    M = _op()
    lam, C = M.core()
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        BlockMeanLinearOperator.from_core(lam, C, M.partition, dtype="float64")
    res = BlockMeanLinearOperator.from_core(lam, C, M.partition, dtype=torch.float32)
    assert res.dtype == torch.float32


@pytest.mark.parametrize("bad", [None, 3.0, "S"])
def test_closed_form_of_something_that_is_not_an_operator(bad):
    with pytest.raises(TypeError, match="closed_form needs a LinearOperator"):
        closed_form(bad)


@pytest.mark.parametrize("diagonal", [False, True])
def test_matrix_function_undefined_on_the_spectrum_is_refused(diagonal):
    M = _op(diagonal=diagonal)
    low = float(torch.linalg.eigvalsh(M.to_dense()).max())  # fn undefined below the largest eigenvalue
    fn = lambda e: torch.sqrt(e - low + 1e-3)  # noqa: E731
    with pytest.raises(ValueError, match="fn must be defined .finite. on the whole spectrum"):
        M.matrix_function(fn)
    # check=False and validation off skip the host synchronisation, as documented (and give NaN)
    assert bool(M.matrix_function(fn, check=False).to_dense().isnan().any())
    with settings.validate(False):
        assert bool(M.matrix_function(fn).to_dense().isnan().any())


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_matrix_function_is_not_evaluated_at_a_singleton_blocks_lam(diagonal, batch):
    """A singleton block's lam is no eigenvalue of M (its one entry is C_ii): fn with a pole there gave an operator
    of NaN and inf; fn is now evaluated on the spectrum only."""
    M = _op(batch, diagonal=diagonal)
    lam, C = M.core()
    pole = torch.diagonal(C, dim1=-2, dim2=-1)[(0,) * len(batch) + (1,)]  # block 1 is a singleton
    spectrum = torch.linalg.eigvalsh(M.to_dense())
    assert float((spectrum - pole).abs().min()) > 1e-3 or diagonal  # diagonal: C_ii is an eigenvalue
    if diagonal:  # there C_ii is on the spectrum: take a pole at the singleton's raw lam instead (no eigenvalue)
        pole = M.lam[(0,) * len(batch) + (1,)]
        assert float((spectrum - pole).abs().min()) > 1e-3
    fn = lambda e: 1.0 / (e - pole)  # noqa: E731
    res = M.matrix_function(fn)
    torch.testing.assert_close(res.to_dense(), _dense_function(M, fn), rtol=1e-9, atol=1e-9)
    assert bool((res.B.diagonal(dim1=-2, dim2=-1)[..., 1] == 0).all())  # B_ii = 0: from_core's convention


def test_matrix_function_gradients_with_singleton_blocks():
    M = _op()
    lam = M.lam.detach().clone().requires_grad_()
    B = M.B.detach().clone().requires_grad_()
    BlockMeanLinearOperator(lam, B, M.partition).matrix_function(torch.exp).to_dense().sum().backward()
    lam2 = M.lam.detach().clone().requires_grad_()
    B2 = M.B.detach().clone().requires_grad_()
    torch.linalg.matrix_exp(BlockMeanLinearOperator(lam2, B2, M.partition).to_dense()).sum().backward()
    torch.testing.assert_close(lam.grad, lam2.grad)
    torch.testing.assert_close(B.grad, B2.grad)


def test_sum_solve_with_a_negative_diagonal_says_why():
    """-M + D is invertible but has d < 0: refused, in words that name the cause (the advice was 'add noise')."""
    M = _op()
    d = 0.2 + torch.rand(6, generator=torch.Generator().manual_seed(3), dtype=DTYPE)  # per point: a sum
    S = closed_form(M * (-1.0) + DiagLinearOperator(d))
    assert type(S).__name__ == "BlockMeanSumLinearOperator"
    with pytest.raises(ValueError, match=r"negative multiple or a difference of operators .*need every d > 0"):
        S.solve(torch.ones(6, dtype=DTYPE))


def test_domain_errors_with_gradients_say_only_their_words():
    """The error for an eigenvalue outside a matrix function's domain read the value from a tensor with a graph:
    torch's 'Converting a tensor with requires_grad=True to a scalar' warning came with it (trial 20)."""
    M = _op()
    lam = M.lam.detach().clone()
    lam[0] = 0.0  # block 0 has two indices: lam_0 is an eigenvalue, log is undefined there
    bad = BlockMeanLinearOperator(lam.requires_grad_(), M.B.detach().clone().requires_grad_(), M.partition)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="lam\\[0\\]"):
            bad.matrix_log()
