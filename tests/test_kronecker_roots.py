"""Closed-form roots of Kronecker sums with a block mean factor, ``M (x) K + I_n (x) D`` (``MultitaskKernel`` around a
``BlockMeanKernel`` or ``GroupKernel`` under ``MultitaskGaussianLikelihood`` of any rank), session 28.

``root_decomposition`` (draws) and ``root_inv_decomposition`` (``fast_pred_var``) went through linear_operator: a
dense Cholesky up to ``max_cholesky_size``, every factor's eigendecomposition above it (an explicit ``n x n``
eigenvector matrix of ``M``), whose inverse root was wrong (``fast_pred_var`` variances 100% off under ``rank=0``,
15x under ``rank=1``), and a root of the wrong width under ``rank >= 1`` (``rsample(base_samples=...)`` failed). Each
test failed on the code before."""

from __future__ import annotations

import textwrap
import warnings

import gpytorch
import pytest
import torch
from linear_operator import settings as lo_settings
from linear_operator.operators import DenseLinearOperator, DiagLinearOperator, KroneckerProductLinearOperator

import test_kronecker_block_mean as rank0
import test_kronecker_task_noise as rank1
from bma_gp import BlockMeanLinearOperator, ClosedFormFallbackWarning
from bma_gp._composition import BlockMeanKroneckerAddedDiagLinearOperator, BlockMeanSumKroneckerLinearOperator
from closed_form_guard import closed_forms_only
from kronecker_reference import MULTITASK_MODEL_SOURCE
from largest_tensor import LargestTensor
from peak_memory import peak_memory_increase

pytestmark = pytest.mark.usefixtures("one_thread")

N = rank0.N  # 40 points, 6 blocks (two singletons), 3 tasks
T = rank0.T


def _operator(noise: str, batch, dtype, diagonal: bool, data_first: bool):
    """The Kronecker sum and its dense matrix: ``rank0`` a per-task noise (``KroneckerProductAddedDiag``), ``rank1``
    ``F F^T`` plus a global noise (``SumKronecker``)."""
    if noise == "rank0":
        leaves = rank0._inputs(batch, dtype, diagonal)
        op, M, K = rank0._build(*leaves, rank0._partition(), diagonal=diagonal, data_first=data_first)
        dense = rank0._dense(op, M, K, data_first)
        assert isinstance(op, BlockMeanKroneckerAddedDiagLinearOperator)
    else:
        leaves = rank1._inputs(batch, dtype, diagonal)
        op, M, K, Sigma = rank1._build(*leaves, rank1._partition(), diagonal=diagonal, data_first=data_first)
        dense = rank1._dense(M, K, Sigma, data_first)
        assert isinstance(op, BlockMeanSumKroneckerLinearOperator)
    return op, dense, leaves


CASES = [
    pytest.param(noise, batch, dtype, diagonal, data_first, id=f"{noise}-b{len(batch)}-{dtype}-{d}B-{o}")
    for noise in ("rank0", "rank1")
    for batch in ((), (2,))
    for dtype in (torch.float64, torch.float32)
    for diagonal, d in ((False, "dense"), (True, "diag"))
    for data_first, o in ((True, "MK"), (False, "KM"))
]


@pytest.mark.parametrize(("noise", "batch", "dtype", "diagonal", "data_first"), CASES)
@pytest.mark.parametrize("max_cholesky", [800, 0])
def test_roots_match_dense(noise, batch, dtype, diagonal, data_first, max_cholesky):
    """``R R^T = A`` and ``R R^T = A^{-1}`` for the two roots (square, ``n t`` wide), with their transposes and the
    closed-form diagonals of ``R R^T``, at every ``max_cholesky_size``, without a warning, CG, Lanczos or a dense
    factorisation of ``N`` rows or more. linear_operator's inverse root of the per-task sum was wrong (a relative
    error of 1) and the rest took a dense Cholesky or ``M``'s eigenvectors."""
    op, dense, _ = _operator(noise, batch, dtype, diagonal, data_first)
    A = dense.detach().double()
    A_inv = torch.linalg.inv(A)
    with lo_settings.max_cholesky_size(max_cholesky), closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        root = op.root_decomposition()
        inv_root = op.root_inv_decomposition()
        R, R_t = root.root.to_dense(), root.root.mT.to_dense()
        S, S_t = inv_root.root.to_dense(), inv_root.root.mT.to_dense()
        diag, inv_diag = root.diagonal(), inv_root.diagonal()
    nt = N * T
    assert R.shape == S.shape == (*batch, nt, nt) and R.dtype == S.dtype == dtype
    with torch.no_grad():  # formed in place, a block of columns at a time, without autograd
        assert torch.allclose(root.root.to_dense(), R.detach(), rtol=0, atol=0)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    R, R_t, S, S_t = (x.detach().double() for x in (R, R_t, S, S_t))
    assert ((R @ R.mT - A).abs().max() / A.abs().max()) < tol
    assert ((S @ S.mT - A_inv).abs().max() / A_inv.abs().max()) < tol
    assert torch.allclose(R_t, R.mT, rtol=0, atol=tol * R.abs().max())
    assert torch.allclose(S_t, S.mT, rtol=0, atol=tol * S.abs().max())
    assert torch.allclose(diag.detach().double(), A.diagonal(dim1=-2, dim2=-1), rtol=tol, atol=0)
    assert torch.allclose(inv_diag.detach().double(), A_inv.diagonal(dim1=-2, dim2=-1), rtol=10 * tol, atol=0)


@pytest.mark.parametrize("noise", ["rank0", "rank1"])
def test_root_products_form_nothing_n_by_n(noise):
    """A draw's product with the root (and the inverse root) allocates ``O(n t)``: the largest tensor is far below
    ``n^2`` (linear_operator formed ``M``'s ``n x n`` eigenvectors, or the ``n t x n t`` Cholesky factor)."""
    n, k = 1500, 20
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, k, (n,), generator=gen)
    labels[:k] = torch.arange(k)
    partition = rank0.Partition.from_labels(labels)
    lam, B = torch.rand(k, generator=gen, dtype=torch.float64) + 0.3, torch.rand(k, generator=gen) + 0.1
    M = BlockMeanLinearOperator(lam, B.double(), partition, diagonal=True)
    K = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    kron = KroneckerProductLinearOperator(M, DenseLinearOperator(K))
    if noise == "rank0":
        op = kron.add_diagonal(torch.tensor(0.1, dtype=torch.float64))
    else:
        from linear_operator.operators import ConstantDiagLinearOperator, RootLinearOperator

        Sigma = RootLinearOperator(torch.tensor([[0.3], [0.2]], dtype=torch.float64)) + ConstantDiagLinearOperator(
            torch.tensor([0.1], dtype=torch.float64), diag_shape=2
        )
        op = kron + KroneckerProductLinearOperator(
            ConstantDiagLinearOperator(torch.ones(1, dtype=torch.float64), diag_shape=n), Sigma
        )
    base = torch.randn(2 * n, 3, generator=gen, dtype=torch.float64)
    with LargestTensor() as seen, warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        draws = op.root_decomposition().root.matmul(base)
        whitened = op.root_inv_decomposition().root.mT.matmul(draws)
    assert seen.largest < 20 * n, (seen.largest, seen.where)
    with torch.no_grad():  # to_dense a block of columns at a time (5 here) equals the product with the identity
        R = op.root_decomposition().root
        assert torch.allclose(R.to_dense(), R.matmul(torch.eye(2 * n, dtype=torch.float64)), rtol=0, atol=1e-12)
    # S S^T = A^{-1}: A S S^T (R base) gives the draws back
    back = op.matmul(op.root_inv_decomposition().root.matmul(whitened))
    assert torch.allclose(back, draws, rtol=1e-9, atol=1e-9)


def test_root_gradients_match_dense():
    """Gradients through the root: ``<W, R R^T>`` has the gradients of ``<W, A>`` for every hyperparameter (autograd
    through the small factorisations, which the root reads from its operator at each product), past
    max_cholesky_size without Lanczos (linear_operator's path for this sum)."""
    op, dense, leaves = _operator("rank1", (), torch.float64, False, True)
    W = torch.randn(N * T, N * T, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = torch.autograd.grad((W * dense).sum(), leaves, retain_graph=True)  # (dense shares the operator's K)
    with lo_settings.max_cholesky_size(0), closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        dense_root = op.root_decomposition().root.to_dense()  # products with the identity, through autograd
        got = torch.autograd.grad((W * (dense_root @ dense_root.mT)).sum(), leaves)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * b.abs().max())


def test_no_closed_form_root_warns():
    """A per-point noise has no closed form: its root decompositions take linear_operator's path and say so (they
    were silent above max_cholesky_size)."""
    lam, B, factor, variances, _ = rank0._inputs()
    M = BlockMeanLinearOperator(lam.detach(), B.detach(), rank0._partition())
    K = (factor @ factor.mT + torch.diag_embed(variances)).detach()
    d = torch.rand(N * T, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    op = KroneckerProductLinearOperator(M, DenseLinearOperator(K)) + DiagLinearOperator(d)
    for call in (lambda: op.root_decomposition(), lambda: op.root_inv_decomposition()):
        with lo_settings.max_cholesky_size(10), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        ours = [str(w.message) for w in caught if issubclass(w.category, ClosedFormFallbackWarning)]
        assert len(ours) == 1 and "per-point" in ours[0], ours


@pytest.mark.parametrize("kind", ["block_mean", "group"])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("max_cholesky", [800, 0])
def test_model_fast_pred_var_and_draws(kind, rank, max_cholesky):
    """An ExactGP with ``MultitaskKernel(BlockMeanKernel or GroupKernel, num_tasks=3, rank=1)`` and
    ``MultitaskGaussianLikelihood(rank)``: ``fast_pred_var`` predictions equal the exact ones (variances to 1e-8
    relative) and draws of ``likelihood(model(x))`` (also from ``base_samples``) take the closed-form root, without
    a dense factorisation, CG or Lanczos. Before: the variances 100% off (``rank=0``) or 15x (``rank=1``) under
    ``max_cholesky_size(0)``, a dense ``n t x n t`` Cholesky below it, and ``rsample(base_samples=...)`` failed on
    the ``rank=1`` root's width."""
    model, x, y = rank1._model(kind, rank)
    n = x.shape[0]
    xt = x[:9] + torch.tensor([0.05, 0.0], dtype=x.dtype)
    model.eval()
    with torch.no_grad(), lo_settings.max_cholesky_size(max_cholesky):
        exact = model(xt)
        want_mean, want_var = exact.mean, exact.variance
    model.prediction_strategy = None
    with (
        torch.no_grad(),
        lo_settings.max_cholesky_size(max_cholesky),
        gpytorch.settings.fast_pred_var(),
        closed_forms_only(n),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        fast = model(xt)
        mean, var = fast.mean, fast.variance
    assert torch.allclose(mean, want_mean, rtol=1e-10, atol=1e-12)
    assert ((var - want_var).abs() / want_var).max() < 1e-8
    model.train()
    base = torch.randn(2, n, T, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    with torch.no_grad(), lo_settings.max_cholesky_size(max_cholesky), closed_forms_only(n), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        out = model.likelihood(model(x))
        draws = out.rsample(torch.Size([3]))
        from_base = out.rsample(base_samples=base)
        R = out.lazy_covariance_matrix.root_decomposition().root
    A = out.lazy_covariance_matrix.to_dense()
    assert draws.shape == (3, n, T) and from_base.shape == (2, n, T)
    Rd = R.to_dense()
    assert ((Rd @ Rd.mT - A).abs().max() / A.abs().max()) < 1e-12
    want = out.mean + (Rd @ base.reshape(2, n * T, 1)).reshape(2, n, T)
    assert torch.allclose(from_base, want, rtol=1e-12, atol=1e-12)


def test_draws_memory_is_linear_in_n():
    """Draws of ``likelihood(model(x))`` for ``MultitaskKernel(BlockMeanKernel)`` under
    ``MultitaskGaussianLikelihood(rank=0)`` and ``rank=1`` (``t = 2``) past max_cholesky_size: ``O(n t)`` memory.
    linear_operator formed ``M``'s ``n x n`` eigenvectors (``rank=0``) or whitened and eigendecomposed the dense sum
    (``rank=1``): n^2 memory."""
    setup = MULTITASK_MODEL_SOURCE + textwrap.dedent("""
    def model(n, rank):
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 1, generator=g, dtype=torch.float64)
        y = torch.randn(n, 2, generator=g, dtype=torch.float64)
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, rank=rank).double()
        return MT(x, y, lik).double(), x

    def draw(m, x):
        with torch.no_grad():
            s = m.likelihood(m(x)).rsample(torch.Size([4]))
        assert s.shape == (4, x.shape[0], 2)

    draw(*model(300, 1))  # imports, compiled kernels
    models = [model({n}, rank) for rank in (0, 1)]
    with torch.no_grad():
        for m, x in models:
            m.likelihood(m(x)).lazy_covariance_matrix  # the kernel's own evaluation
    """)
    # both ranks in one process per size (the peak is the larger of the two draws'); a child per rank and size spent
    # 20 s of the suite's time on imports
    small, large = 3000, 6000
    peaks = [peak_memory_increase(setup.format(n=n), "for m, x in models:\n    draw(m, x)") for n in (small, large)]
    per_index = (peaks[1] - peaks[0]) / (large - small)
    # measured: +1.9 MB at n = 5000 and +6.9 MB at n = 20,000 (340 bytes per index); linear_operator's n x n
    # eigenvectors were n^2
    assert per_index < 4_000, f"{per_index:.0f} bytes per index (peaks {peaks})"
    assert peaks[1] < 50e6, f"peaks {peaks}"
