"""Kronecker sums with a block mean factor, ``M (x) K + I (x) D`` (``MultitaskKernel(BlockMeanKernel or GroupKernel)``
under ``MultitaskGaussianLikelihood(rank=0)``), in closed form (session 28).

linear_operator solved them through every factor's eigendecomposition above ``max_cholesky_size`` (an explicit
``n x n`` eigenvector matrix of ``M``: n^2 memory) and through a dense Cholesky below it, and ran CG and Lanczos on a
per-point diagonal without a word. Each test failed on the code before."""

from __future__ import annotations

import textwrap
import warnings

import gpytorch
import pytest
import torch
from linear_operator import settings as lo_settings
from linear_operator.operators import (
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    KroneckerProductDiagLinearOperator,
    KroneckerProductLinearOperator,
)

import bma_gp
from bma_gp import BlockMeanLinearOperator, ClosedFormFallbackWarning, Partition
from bma_gp._composition import BlockMeanKroneckerAddedDiagLinearOperator
from closed_form_guard import closed_forms_only
from kronecker_reference import (
    MULTITASK_MODEL_SOURCE,
    assert_prediction_matches_dense,
    assert_training_matches_dense,
    block_values,
    multitask_model,
)
from kronecker_reference import rhs as random_rhs
from peak_memory import peak_memory_increase

pytestmark = pytest.mark.usefixtures("one_thread")

N, K_BLOCKS, T = 40, 6, 3


def _partition(n: int = N, k: int = K_BLOCKS, seed: int = 0) -> Partition:
    """Unequal blocks, two singletons, labels neither sorted nor contiguous."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.cat(
        [torch.arange(k - 2), torch.randint(0, k - 2, (n - k,), generator=gen), torch.tensor([k - 2, k - 1])]
    )
    return Partition.from_labels(labels[torch.randperm(n, generator=gen)])


def _inputs(batch=(), dtype=torch.float64, diagonal=False, seed=0, identity_task=False):
    """Leaves: ``lam``, ``B`` (or its diagonal), the task factor and variances, and the task noises."""
    gen = torch.Generator().manual_seed(seed)
    lam, B = block_values(gen, batch, dtype, diagonal, K_BLOCKS)
    factor = (
        torch.zeros(*batch, T, 1, dtype=dtype)
        if identity_task
        else torch.randn(*batch, T, 2, generator=gen, dtype=dtype)
    )
    variances = (
        torch.ones(*batch, T, dtype=dtype) if identity_task else torch.rand(*batch, T, generator=gen, dtype=dtype) + 0.2
    )
    noise = torch.rand(*batch, T, generator=gen, dtype=dtype) + 0.05
    return [x.requires_grad_() for x in (lam, B, factor, variances, noise)]


def _build(lam, B, factor, variances, noise, partition, *, diagonal=False, data_first=True, layout="task"):
    """``Kron(M, K) + noise`` (``Kron(K, M)`` with ``data_first=False``), the noise as ``layout`` spells it."""
    M = BlockMeanLinearOperator(lam, B, partition, diagonal=diagonal)
    K = factor @ factor.mT + torch.diag_embed(variances)
    n, batch = partition.n, lam.shape[:-1]
    kron = (
        KroneckerProductLinearOperator(M, DenseLinearOperator(K))
        if data_first
        else KroneckerProductLinearOperator(DenseLinearOperator(K), M)
    )
    ones = ConstantDiagLinearOperator(torch.ones(*batch, 1, dtype=lam.dtype), diag_shape=n)
    if layout == "task":  # MultitaskGaussianLikelihood(rank=0)
        parts = (ones, DiagLinearOperator(noise)) if data_first else (DiagLinearOperator(noise), ones)
        op = kron + KroneckerProductDiagLinearOperator(*parts)
    elif layout == "task+global":  # has_global_noise: the global noise moved into the task factor
        task = DiagLinearOperator(noise) + ConstantDiagLinearOperator(noise[..., :1] * 0 + 0.1, diag_shape=T)
        parts = (ones, task) if data_first else (task, ones)
        op = kron + KroneckerProductDiagLinearOperator(*parts)
    elif layout == "constant":
        op = kron + ConstantDiagLinearOperator(noise[..., :1], diag_shape=n * T)
    elif layout == "add_diagonal":
        op = kron.add_diagonal(noise[..., :1])
    else:
        raise AssertionError(layout)
    return op, M, K


def _dense(op, M, K, data_first=True):
    """The same matrix, densely: ``kron(M, K) + noise`` from the operators' dense forms."""
    Md = M.to_dense()
    A = (
        (Md[..., :, None, :, None] * K[..., None, :, None, :])
        if data_first
        else (K[..., :, None, :, None] * Md[..., None, :, None, :])
    )
    nt = Md.shape[-1] * K.shape[-1]
    A = A.reshape(*A.shape[:-4], nt, nt)
    return A + torch.diag_embed(op.diag_tensor.diagonal())


CASES = [
    pytest.param(
        batch,
        dtype,
        diagonal,
        data_first,
        layout,
        id=f"{dtype}-b{len(batch)}-{'diag' if diagonal else 'dense'}B-{'MK' if data_first else 'KM'}-{layout}",
    )
    for batch in ((), (2,))
    for dtype in (torch.float64, torch.float32)
    for diagonal in (False, True)
    for data_first in (True, False)
    for layout in ("task", "task+global", "constant", "add_diagonal")
]


@pytest.mark.parametrize(("batch", "dtype", "diagonal", "data_first", "layout"), CASES)
def test_closed_form_matches_dense(batch, dtype, diagonal, data_first, layout):
    """solve, inv_quad_logdet and logdet equal the dense matrix's, without a warning, without CG or Lanczos and
    without a dense factorisation of a matrix of N (data points) rows or more: the old path factorised the
    N T x N T matrix densely (below max_cholesky_size) with a ClosedFormFallbackWarning."""
    partition = _partition()
    leaves = _inputs(batch, dtype, diagonal)
    op, M, K = _build(*leaves, partition, diagonal=diagonal, data_first=data_first, layout=layout)
    assert isinstance(op, BlockMeanKroneckerAddedDiagLinearOperator)
    rhs = random_rhs(op)
    with closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        solved = op.solve(rhs)
        inv_quad, logdet = op.inv_quad_logdet(rhs, logdet=True)
        alone = op.logdet()
        vector = op.solve(rhs[..., 0]) if not batch else op.solve(rhs[..., :1])[..., 0]  # (a 2-d rhs is a matrix)
    A = _dense(op, M, K, data_first).detach().double()
    ref = torch.linalg.solve(A, rhs.double())
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert solved.dtype == dtype and solved.shape == rhs.shape
    scale = ref.abs().max()
    assert (solved.double() - ref).abs().max() <= tol * scale
    assert (vector.double() - ref[..., 0]).abs().max() <= tol * scale
    ref_logdet = torch.logdet(A)
    assert torch.allclose(logdet.double(), ref_logdet, rtol=tol, atol=tol * ref_logdet.abs().max())
    assert torch.allclose(alone.double(), ref_logdet, rtol=tol, atol=tol * ref_logdet.abs().max())
    ref_quad = (rhs.double() * ref).sum((-2, -1))
    assert torch.allclose(inv_quad.double(), ref_quad, rtol=tol)


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("identity_task", [False, True])
def test_gradients_match_dense_autograd(diagonal, batch, identity_task):
    """Gradients of inv_quad + logdet reach lam, B, the task matrix's factors and the noise, and equal dense
    autograd's; also at K = I, whose repeated eigenvalues have no eigh derivative."""
    partition = _partition()
    leaves = _inputs(batch, torch.float64, diagonal, identity_task=identity_task)
    op, M, K = _build(*leaves, partition, diagonal=diagonal)
    rhs = random_rhs(op)
    with closed_forms_only(N):
        inv_quad, logdet = op.inv_quad_logdet(rhs, logdet=True)
        got = torch.autograd.grad((inv_quad + logdet).sum(), leaves)
    op, M, K = _build(*leaves, partition, diagonal=diagonal)
    A = _dense(op, M, K)
    ref_value = (rhs * torch.linalg.solve(A, rhs)).sum((-2, -1)) + torch.logdet(A)
    want = torch.autograd.grad(ref_value.sum(), leaves)
    assert torch.allclose(inv_quad + logdet, ref_value, rtol=1e-10)
    for name, a, b in zip(("lam", "B", "factor", "variances", "noise"), got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10 * b.abs().max()), name


def test_no_eigenvectors_of_the_block_mean_factor(monkeypatch):
    """Above max_cholesky_size linear_operator took M's eigendecomposition with its n x n eigenvector matrix."""
    original = BlockMeanLinearOperator._eigen

    def refuse(self, eigenvectors):
        assert not eigenvectors, "an n x n eigenvector matrix of the block mean factor was formed"
        return original(self, eigenvectors)

    monkeypatch.setattr(BlockMeanLinearOperator, "_eigen", refuse)
    op, M, K = _build(*_inputs(), _partition())
    rhs = random_rhs(op)
    with lo_settings.max_cholesky_size(10), closed_forms_only(N):
        op.inv_quad_logdet(rhs, logdet=True)
        op.solve(rhs)
        op.logdet()


def test_capacitance_limit_names_the_setting():
    """k t past bma_gp.settings.max_capacitance_size is refused with a message that names the setting."""
    op, _, _ = _build(*_inputs(), _partition())
    with (
        bma_gp.settings.max_capacitance_size(K_BLOCKS * T - 1),
        pytest.raises(ValueError, match="max_capacitance_size"),
    ):
        op.solve(random_rhs(op))


def test_add_diagonal_is_the_bma_gp_class():
    """Kron(M, K).add_diagonal(c) and add_jitter were linear_operator's plain operator: a silent dense Cholesky."""
    lam, B, factor, variances, _ = _inputs()
    M = BlockMeanLinearOperator(lam, B, _partition())
    kron = KroneckerProductLinearOperator(M, DenseLinearOperator(factor @ factor.mT + torch.diag_embed(variances)))
    for op in (kron.add_diagonal(torch.tensor(0.3, dtype=lam.dtype)), kron.add_jitter(0.3)):
        assert isinstance(op, BlockMeanKroneckerAddedDiagLinearOperator)
        assert isinstance(
            op + ConstantDiagLinearOperator(torch.ones(1, dtype=lam.dtype), N * T),
            BlockMeanKroneckerAddedDiagLinearOperator,
        )
        with closed_forms_only(N):
            op.logdet()


def test_per_point_diagonal_warns_before_cg():
    """A diagonal that is not constant over the points within a task has no closed form here: linear_operator's
    CG and Lanczos run past max_cholesky_size, and they now say so (they were silent)."""
    lam, B, factor, variances, _ = _inputs()
    M = BlockMeanLinearOperator(lam.detach(), B.detach(), _partition())
    K = (factor @ factor.mT + torch.diag_embed(variances)).detach()
    d = torch.rand(N * T, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    op = KroneckerProductLinearOperator(M, DenseLinearOperator(K)) + DiagLinearOperator(d)
    assert isinstance(op, BlockMeanKroneckerAddedDiagLinearOperator)
    rhs = random_rhs(op)
    for call in (lambda: op.inv_quad_logdet(rhs, logdet=True), lambda: op.solve(rhs), lambda: op.logdet()):
        with lo_settings.max_cholesky_size(10), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        ours = [w for w in caught if issubclass(w.category, ClosedFormFallbackWarning)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "CG and Lanczos" in str(ours[0].message) and "per-point" in str(ours[0].message)
    # below max_cholesky_size: one warning (not also the Cholesky's), and the dense result is exact
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solved = op.solve(rhs)
    assert len([w for w in caught if issubclass(w.category, ClosedFormFallbackWarning)]) == 1
    assert torch.allclose(solved, torch.linalg.solve(op.to_dense(), rhs), rtol=1e-8, atol=1e-10)


def test_per_point_diagonal_equal_by_value_is_closed_form():
    """A plain DiagLinearOperator whose values repeat the same t noises at every point (no gradients) is I (x) D."""
    lam, B, factor, variances, noise = (x.detach() for x in _inputs())
    M = BlockMeanLinearOperator(lam, B, _partition())
    K = factor @ factor.mT + torch.diag_embed(variances)
    op = KroneckerProductLinearOperator(M, DenseLinearOperator(K)) + DiagLinearOperator(noise.repeat(N))
    rhs = random_rhs(op)
    with closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        solved = op.solve(rhs)
    assert torch.allclose(solved, torch.linalg.solve(op.to_dense(), rhs), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- models
def _model(kind: str, tasks: int, global_noise: bool, n: int = 50):
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(
        num_tasks=tasks, rank=0, has_global_noise=global_noise
    )
    return multitask_model(kind, tasks, likelihood, seed=tasks + 2 * global_noise, n=n)


@pytest.mark.parametrize("kind", ["block_mean", "group"])
@pytest.mark.parametrize("tasks", [2, 3])
@pytest.mark.parametrize("global_noise", [False, True])
def test_multitask_model_matches_dense_twin(kind, tasks, global_noise):
    """ExactMarginalLogLikelihood and the gradient of every raw hyperparameter equal a dense twin's (the same
    covariance as a dense matrix) to 1e-10, and so do the predictive means and variances; no dense n x n
    factorisation, CG or Lanczos runs, and nothing warns."""
    model, x, y = _model(kind, tasks, global_noise)
    assert_training_matches_dense(model, x, y, BlockMeanKroneckerAddedDiagLinearOperator)
    assert_prediction_matches_dense(model, x, y)


def test_multitask_training_memory_is_linear_in_n():
    """A training step of MultitaskKernel(BlockMeanKernel) + MultitaskGaussianLikelihood(rank=0) past
    max_cholesky_size formed M's n x n eigenvector matrix: +969 MB at n = 6000 (t = 2), growing as n^2."""
    setup = MULTITASK_MODEL_SOURCE + textwrap.dedent("""
    def step(n):
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 1, generator=g, dtype=torch.float64)
        y = torch.randn(n, 2, generator=g, dtype=torch.float64)
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, rank=0).double()
        m = MT(x, y, lik).double()
        (-gpytorch.mlls.ExactMarginalLogLikelihood(lik, m)(m(x), y)).backward()

    step(300)  # imports, compiled kernels
    step({n})
    """)
    work = "step({n})"
    small, large = 3000, 6000
    peaks = [peak_memory_increase(setup.format(n=n), work.format(n=n)) for n in (small, large)]
    per_index = (peaks[1] - peaks[0]) / (large - small)
    # measured: +9.4 MB and +16.1 MB (the kernel's chunk buffers, flat past n = 8000), 2.3 kB per index; the n x n
    # eigenvector matrix was +222 MB and +853 MB, 210 kB per index
    assert per_index < 16_000, f"{per_index:.0f} bytes per index (peaks {peaks})"
