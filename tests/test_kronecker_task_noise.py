"""Kronecker sums with a block mean factor and a noise that couples the tasks, ``M (x) K + I (x) D`` with a full
``t x t`` ``D`` (``MultitaskKernel(BlockMeanKernel or GroupKernel)`` under ``MultitaskGaussianLikelihood(rank >= 1)``:
linear_operator's ``SumKroneckerLinearOperator``), in closed form (session 28).

linear_operator factorised the dense ``n t x n t`` matrix up to ``max_cholesky_size`` (warned) and beyond it whitened
the sum by an inverse root of ``D``, taken by Lanczos where ``t > max_cholesky_size`` (``max_cholesky_size(0)``: the
marginal log-likelihood 16-19% off at n = 3000-6000, t = 3, silently; an IndexError for a singular ``D``). Each
test failed on the code before."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from linear_operator import settings as lo_settings
from linear_operator.operators import (
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    KroneckerProductLinearOperator,
    RootLinearOperator,
)

from bma_gp import BlockMeanLinearOperator, ClosedFormFallbackWarning, Partition
from bma_gp._composition import BlockMeanSumKroneckerLinearOperator
from closed_form_guard import closed_forms_only
from kronecker_reference import (
    assert_prediction_matches_dense,
    assert_training_matches_dense,
    block_values,
    multitask_model,
)
from kronecker_reference import rhs as random_rhs
from test_kronecker_block_mean import K_BLOCKS, N, T, _partition

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(batch=(), dtype=torch.float64, diagonal=False, seed=0):
    """Leaves: ``lam``, ``B`` (or its diagonal), the task factor and variances, the noise factor ``F`` (``t x 1``)
    and the global noise."""
    gen = torch.Generator().manual_seed(seed)
    lam, B = block_values(gen, batch, dtype, diagonal, K_BLOCKS)
    factor = torch.randn(*batch, T, 2, generator=gen, dtype=dtype)
    variances = torch.rand(*batch, T, generator=gen, dtype=dtype) + 0.2
    noise_factor = torch.randn(*batch, T, 1, generator=gen, dtype=dtype)
    global_noise = torch.rand(*batch, 1, generator=gen, dtype=dtype) + 0.05
    return [x.requires_grad_() for x in (lam, B, factor, variances, noise_factor, global_noise)]


def _build(lam, B, factor, variances, noise_factor, global_noise, partition, *, diagonal=False, data_first=True,
           noise_first=False, with_global=True, scale=1.0):  # fmt: skip
    """``Kron(M, K) + Kron(c I_n, F F^T [+ g I_t])`` as ``MultitaskGaussianLikelihood(rank=1)`` builds it (the factors
    swapped with ``data_first=False``, the terms with ``noise_first``)."""
    M = BlockMeanLinearOperator(lam, B, partition, diagonal=diagonal)
    K = factor @ factor.mT + torch.diag_embed(variances)
    n, batch = partition.n, lam.shape[:-1]
    Sigma = RootLinearOperator(noise_factor)
    if with_global:
        Sigma = Sigma + ConstantDiagLinearOperator(global_noise, diag_shape=T)
    eye = ConstantDiagLinearOperator(torch.full((*batch, 1), scale, dtype=lam.dtype), diag_shape=n)
    kron = (
        KroneckerProductLinearOperator(M, DenseLinearOperator(K))
        if data_first
        else KroneckerProductLinearOperator(DenseLinearOperator(K), M)
    )
    noise = KroneckerProductLinearOperator(eye, Sigma) if data_first else KroneckerProductLinearOperator(Sigma, eye)
    op = noise + kron if noise_first else kron + noise
    return op, M, K, Sigma.to_dense() * scale


def _dense(M, K, Sigma, data_first=True):
    Md = M.to_dense()
    n = Md.shape[-1]
    eye = torch.eye(n, dtype=Md.dtype)
    if data_first:
        A = Md[..., :, None, :, None] * K[..., None, :, None, :] + eye[:, None, :, None] * Sigma[..., None, :, None, :]
    else:
        A = K[..., :, None, :, None] * Md[..., None, :, None, :] + Sigma[..., :, None, :, None] * eye[None, :, None, :]
    return A.reshape(*A.shape[:-4], n * T, n * T)


CASES = [
    pytest.param(
        batch,
        dtype,
        diagonal,
        data_first,
        noise_first,
        with_global,
        id=f"{dtype}-b{len(batch)}-{'diag' if diagonal else 'dense'}B-{'MK' if data_first else 'KM'}"
        f"-{'noise+kron' if noise_first else 'kron+noise'}-{'FF+g' if with_global else 'FF'}",
    )
    for batch in ((), (2,))
    for dtype in (torch.float64, torch.float32)
    for diagonal in (False, True)
    for data_first in (True, False)
    for noise_first in (False, True)
    for with_global in (True, False)
]


@pytest.mark.parametrize(("batch", "dtype", "diagonal", "data_first", "noise_first", "with_global"), CASES)
@pytest.mark.parametrize("max_cholesky", [800, 0])
def test_closed_form_matches_dense(batch, dtype, diagonal, data_first, noise_first, with_global, max_cholesky):
    """solve, inv_quad, inv_quad_logdet and logdet equal the dense matrix's at every max_cholesky_size, without a
    warning, CG, Lanczos or a dense factorisation of N (data points) rows or more; also for a singular noise
    ``F F^T`` (rank 1, no global noise), which linear_operator's whitening cannot invert."""
    partition = _partition()
    leaves = _inputs(batch, dtype, diagonal)
    op, M, K, Sigma = _build(
        *leaves, partition, diagonal=diagonal, data_first=data_first, noise_first=noise_first, with_global=with_global
    )
    assert isinstance(op, BlockMeanSumKroneckerLinearOperator)
    rhs = random_rhs(op)
    with lo_settings.max_cholesky_size(max_cholesky), closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        solved = op.solve(rhs)
        inv_quad, logdet = op.inv_quad_logdet(rhs, logdet=True)
        quad = op.inv_quad(rhs)
        alone = op.logdet()
    A = _dense(M, K, Sigma, data_first).detach().double()
    ref = torch.linalg.solve(A, rhs.double())
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert solved.dtype == dtype and solved.shape == rhs.shape
    assert (solved.double() - ref).abs().max() <= tol * ref.abs().max()
    ref_logdet = torch.logdet(A)
    assert torch.allclose(logdet.double(), ref_logdet, rtol=tol, atol=tol * ref_logdet.abs().max())
    assert torch.allclose(alone.double(), ref_logdet, rtol=tol, atol=tol * ref_logdet.abs().max())
    ref_quad = (rhs.double() * ref).sum((-2, -1))
    assert torch.allclose(inv_quad.double(), ref_quad, rtol=tol)
    assert torch.allclose(quad.double(), ref_quad, rtol=tol)


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("with_global", [True, False])
def test_gradients_match_dense_autograd(diagonal, batch, with_global):
    """Gradients of inv_quad + logdet reach lam, B, the task matrix's factors, the noise factor F and the global
    noise, and equal dense autograd's."""
    partition = _partition()
    leaves = _inputs(batch, torch.float64, diagonal)
    op, M, K, Sigma = _build(*leaves, partition, diagonal=diagonal, with_global=with_global, scale=1.5)
    rhs = random_rhs(op)
    with lo_settings.max_cholesky_size(0), closed_forms_only(N):
        inv_quad, logdet = op.inv_quad_logdet(rhs, logdet=True)
        used = leaves if with_global else leaves[:-1]
        got = torch.autograd.grad((inv_quad + logdet).sum(), used)
    op, M, K, Sigma = _build(*leaves, partition, diagonal=diagonal, with_global=with_global, scale=1.5)
    A = _dense(M, K, Sigma)
    ref_value = (rhs * torch.linalg.solve(A, rhs)).sum((-2, -1)) + torch.logdet(A)
    want = torch.autograd.grad(ref_value.sum(), used)
    assert torch.allclose(inv_quad + logdet, ref_value, rtol=1e-10)
    for name, a, b in zip(("lam", "B", "factor", "variances", "noise_factor", "global_noise"), got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10 * b.abs().max()), name


def test_other_sums_warn():
    """A second term whose data factor is not a multiple of the identity has no closed form here: linear_operator's
    whitening runs, announced with the reason."""
    lam, B, factor, variances, noise_factor, _ = (x.detach() for x in _inputs())
    M = BlockMeanLinearOperator(lam, B, _partition())
    K = factor @ factor.mT + torch.diag_embed(variances)
    d = torch.rand(N, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    op = KroneckerProductLinearOperator(M, DenseLinearOperator(K)) + KroneckerProductLinearOperator(
        DiagLinearOperator(d), DenseLinearOperator(noise_factor @ noise_factor.mT + 0.1 * torch.eye(T))
    )
    assert isinstance(op, BlockMeanSumKroneckerLinearOperator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op.inv_quad_logdet(random_rhs(op), logdet=True)
    ours = [str(w.message) for w in caught if issubclass(w.category, ClosedFormFallbackWarning)]
    # (the whitened factor's dense eigendecomposition then warns on its own)
    assert ours and "no closed form" in ours[0] and "Kron(M, K) + Kron(c I_n, D)" in ours[0], ours


def test_singular_matrix_is_refused_with_the_reason():
    """A GroupKernel (lam = 0) under rank=1 without the global noise is singular (the deviations within a group see
    only F F^T): a ValueError that says so, not linear_operator's IndexError from Lanczos on a rank-one matrix."""
    lam, B, factor, variances, noise_factor, global_noise = (x.detach() for x in _inputs(diagonal=True))
    op, *_ = _build(
        torch.zeros_like(lam), B, factor, variances, noise_factor, global_noise, _partition(), diagonal=True,
        with_global=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"rank >= 1\) without its global noise"):
        op.logdet()


# ---------------------------------------------------------------------------- models
def _model(kind: str, rank: int, n: int = 50, dtype=torch.float64):
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=T, rank=rank)
    model, x, y = multitask_model(kind, T, likelihood, seed=rank, n=n)
    return model.to(dtype), x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("kind", ["block_mean", "group"])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("max_cholesky", [800, 0])
def test_multitask_model_matches_dense_twin(kind, rank, max_cholesky):
    """ExactMarginalLogLikelihood and the gradient of every raw hyperparameter (the noise factor's too) equal a dense
    twin's to 1e-10, at every max_cholesky_size, and so do the predictive means and variances; no dense n x n
    factorisation, CG or Lanczos runs, and nothing warns. linear_operator's value was 10-19% off under
    max_cholesky_size(0) (Lanczos on the noise factor)."""
    model, x, y = _model(kind, rank)
    assert_training_matches_dense(model, x, y, BlockMeanSumKroneckerLinearOperator, max_cholesky)
    assert_prediction_matches_dense(model, x, y, max_cholesky)


def test_float32_model_matches_float64_dense():
    """A float32 model's marginal log-likelihood, computed in float64 inside, is within float32 rounding of the
    float64 dense value, under max_cholesky_size(0) too."""
    model, x, y = _model("block_mean", 1, dtype=torch.float32)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with lo_settings.max_cholesky_size(0), closed_forms_only(x.shape[0]), torch.no_grad():
        value = mll(model(x), y)
    assert value.dtype == torch.float32
    with torch.no_grad():
        out = model.likelihood(model(x))
        cov = out.lazy_covariance_matrix.to_dense().double()
        ref = (
            torch.distributions.MultivariateNormal(out.mean.reshape(-1).double(), cov).log_prob(y.reshape(-1).double())
            / y.numel()
        )
    assert abs(value.double() - ref) <= 1e-5 * abs(ref)


def test_singular_sum_raises_not_positive_definite_error():
    # GPyTorch code that retries on NotPSDError caught linear_operator's dense Cholesky failure for this matrix; the
    # closed form's refusal is one too
    from linear_operator.operators import DiagLinearOperator, KroneckerProductLinearOperator
    from linear_operator.utils.errors import NotPSDError

    from bma_gp import BlockMeanLinearOperator

    M = BlockMeanLinearOperator(
        torch.tensor([1.0, 1.0], dtype=torch.float64),
        torch.eye(2, dtype=torch.float64),
        Partition.from_labels(torch.tensor([0, 0, 1, 1])),
    )
    K = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # indefinite task matrix
    op = KroneckerProductLinearOperator(M, DenseLinearOperator(K)) + DiagLinearOperator(
        torch.full((8,), 1e-3, dtype=torch.float64)
    )
    with pytest.raises(NotPSDError, match="positive definite"):
        op.logdet()
