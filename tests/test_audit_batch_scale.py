"""A batch of output scales, ``ScaleKernel(..., batch_shape=(t,))``, around the SGPR kernels, group kernels, block mean
kernels and their sums: the low-rank roots and block mean operators keep their structure, against dense references."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from gpytorch.kernels import InducingPointKernel, MaternKernel, RBFKernel, ScaleKernel
from linear_operator.operators import (
    DiagLinearOperator,
    LowRankRootAddedDiagLinearOperator,
    LowRankRootLinearOperator,
)

from bma_gp import (
    BlockMeanKernel,
    BlockMeanLinearOperator,
    BlockMeanSumLinearOperator,
    ClosedFormFallbackWarning,
    GroupKernel,
    Partition,
)
from bma_gp.kernels import ChunkedInducingPointKernel
from closed_form_guard import closed_forms_only
from gp_reference import GP, dense_copy, dense_prediction
from largest_tensor import LargestTensor

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64
N, T, M, GROUPS = 90, 3, 6, 5
BATCH = torch.Size([T])
SCALES = torch.tensor([0.5, 1.0, 2.5], dtype=DTYPE)


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.rand(N, 1, generator=gen), torch.randint(0, GROUPS, (N, 1), generator=gen)], -1).to(DTYPE)
    y = torch.randn(T, N, generator=gen, dtype=DTYPE)
    return x, y


def _sgpr(cls, base, x, likelihood):
    return cls(base, x[:M, :1].clone(), likelihood, active_dims=[0])


def _scaled(kernel):
    scaled = ScaleKernel(kernel, batch_shape=BATCH).to(DTYPE)
    scaled.outputscale = SCALES
    return scaled


@pytest.mark.parametrize("cls", [ChunkedInducingPointKernel, InducingPointKernel])
@pytest.mark.parametrize("base", [RBFKernel, MaternKernel])
@pytest.mark.parametrize("training", [True, False])
def test_batch_outputscale_keeps_the_sgpr_root_low_rank(cls, base, training):
    """``ScaleKernel(SGPR kernel, batch_shape=(t,))`` on unbatched inputs: linear_operator took the ``(t, 1, 1)``
    output scales for a matrix and formed the dense ``(t, n, n)`` product; now the root is scaled by their square
    roots (eval mode: with GPyTorch's diagonal correction, scaled too)."""
    x, _ = _data()
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=BATCH).to(DTYPE)
    sgpr = _sgpr(cls, base(), x, likelihood).to(DTYPE)
    kernel = _scaled(sgpr)
    kernel.train(training)
    with torch.no_grad():
        with LargestTensor(square=N) as seen:
            covar = kernel(x).evaluate_kernel()
        assert not seen.squares, seen.squares
        assert seen.largest <= T * N * M
        assert covar.shape == (T, N, N)
        low_rank = covar._linear_op if isinstance(covar, LowRankRootAddedDiagLinearOperator) else covar
        assert isinstance(low_rank, LowRankRootLinearOperator), type(covar)
        assert low_rank.root.shape == (T, N, M)
        expected = SCALES[:, None, None] * sgpr(x).to_dense()
        torch.testing.assert_close(covar.to_dense(), expected)
        torch.testing.assert_close(covar.diagonal(dim1=-1, dim2=-2), expected.diagonal(dim1=-1, dim2=-2))


def test_batch_constant_times_root_with_diagonal_on_batch_inputs():
    """In eval mode GPyTorch's prediction evaluates the test covariance on inputs expanded to the kernel's batch: the
    diagonally corrected root times one constant per entry raised "Boolean value of Tensor with more than one value is
    ambiguous" (linear_operator's ``if other > 0``)."""
    x, _ = _data()
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=BATCH).to(DTYPE)
    sgpr = _sgpr(ChunkedInducingPointKernel, MaternKernel(), x, likelihood).to(DTYPE).eval()
    kernel = _scaled(sgpr).eval()
    xb = x.expand(T, N, 2)
    with torch.no_grad():
        covar = kernel(xb).evaluate_kernel()
        assert isinstance(covar, LowRankRootAddedDiagLinearOperator), type(covar)
        torch.testing.assert_close(covar.to_dense(), SCALES[:, None, None] * sgpr(x).to_dense())


def test_nonpositive_batch_constant_times_a_root_is_linear_operators_product():
    """``U U^T`` cannot carry a negative factor, and the derivative of ``sqrt(c)`` at ``c = 0`` is infinite (a NaN
    gradient where linear_operator's product gives ``U U^T``): such constants take linear_operator's product, as
    without this package, silently (code that never touches a block mean operator got a warning). Positive ones keep
    the low-rank root."""
    root = torch.randn(20, 3, dtype=DTYPE)
    for values in ([2.0, -1.0], [2.0, 0.0]):
        c = torch.tensor(values, dtype=DTYPE).view(2, 1, 1).requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            res = LowRankRootLinearOperator(root).mul(c)
        assert not isinstance(res, LowRankRootLinearOperator)
        dense = res.to_dense()
        torch.testing.assert_close(dense, c * (root @ root.T))
        (grad,) = torch.autograd.grad(dense.sum(), c)
        torch.testing.assert_close(grad.flatten(), (root @ root.T).sum().expand(2))  # finite at c = 0
    c = torch.tensor([2.0, 1.0], dtype=DTYPE).view(2, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        res = LowRankRootLinearOperator(root).mul(c)
    assert isinstance(res, LowRankRootLinearOperator)
    torch.testing.assert_close(res.to_dense(), c * (root @ root.T))
    promoted = LowRankRootLinearOperator(root.float()).mul(c)  # float32 root, float64 constants: float64, as torch
    assert promoted.dtype == torch.float64


def test_batch_constants_under_vmap_take_linear_operators_product():
    root = torch.randn(20, 3, dtype=DTYPE)
    values = torch.tensor([[2.0, 0.5], [3.0, 1.5], [0.25, 4.0]], dtype=DTYPE)
    got = torch.func.vmap(lambda c: LowRankRootLinearOperator(root).mul(c.view(2, 1, 1)).to_dense().sum())(values)
    torch.testing.assert_close(got, values.sum(-1) * (root @ root.T).sum())


def _models(x, y, which):
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=BATCH).to(DTYPE)
    likelihood.noise = torch.tensor([0.3, 0.1, 0.6], dtype=DTYPE)
    if which == "sgpr+group":
        kernel = _scaled(_sgpr(ChunkedInducingPointKernel, RBFKernel(), x, likelihood)) + GroupKernel(
            GROUPS + 1, active_dims=[1]
        )
    elif which == "group":
        kernel = _scaled(GroupKernel(GROUPS + 1, active_dims=[1]))
    else:
        blocks = Partition.from_labels((x[:, 0] * 4).long().clamp(max=3))
        kernel = _scaled(BlockMeanKernel(RBFKernel(active_dims=[0]), x, blocks, chunk_size=16)) + _scaled(
            GroupKernel(GROUPS + 1, active_dims=[1])
        )
    return GP(x, y, likelihood, kernel.to(DTYPE), batch_shape=BATCH).to(DTYPE)


def _gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", ["sgpr+group", "group", "blockmean+group"])
def test_marginal_likelihood_and_gradients_of_a_batch_of_models(which):
    """A batch of ``t`` models with their own output scales and noises: the log marginal likelihood and its gradients
    in closed form (no CG, no dense ``n x n`` factorisation or matrix) equal the dense computation's."""
    x, y = _data(1)
    model = _models(x, y, which)
    reference = dense_copy(model)
    model.train()
    reference.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with closed_forms_only(N), gpytorch.settings.max_cholesky_size(0), LargestTensor(square=N) as seen:
            out = model.likelihood(model(x))
            value = out.log_prob(y)
            value.sum().backward()
    assert not seen.squares, seen.squares
    covar = out.lazy_covariance_matrix.evaluate_kernel()
    assert isinstance(covar, (BlockMeanLinearOperator, BlockMeanSumLinearOperator)), type(covar)
    with warnings.catch_warnings(), gpytorch.settings.max_cholesky_size(10**6):
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)  # the dense reference's own solves
        dense = reference.likelihood(reference(x))
        expected = torch.distributions.MultivariateNormal(dense.mean, dense.covariance_matrix).log_prob(y)
        expected.sum().backward()
    torch.testing.assert_close(value, expected)
    got, want = _gradients(model), _gradients(reference)
    assert got.keys() == {name.replace("covar_module.kernel.", "covar_module.") for name in want}
    for name, grad in want.items():
        torch.testing.assert_close(got[name.replace("covar_module.kernel.", "covar_module.")], grad, msg=name)
    if which == "sgpr+group":  # GPyTorch's SGPR loss (with the trace term) runs in closed form too
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        with closed_forms_only(N), gpytorch.settings.max_cholesky_size(0):
            assert torch.isfinite(mll(model(x), y)).all()


@pytest.mark.parametrize("which", ["sgpr+group", "group", "blockmean+group"])
def test_prediction_of_a_batch_of_models(which):
    """Prediction of a batch of SGPR + group, group and block mean models with batched output scales, in closed form,
    against the dense posterior (one level unseen in training). With an RBF SGPR kernel the training root and the
    cross covariance's right factor were computed by two formulas (GPyTorch's for the inputs copied across the
    batch), which an ill-conditioned ``K_ZZ`` rounded apart: the prediction warned and formed ``t x n``."""
    x, y = _data(2)
    model = _models(x, y, which)
    reference = dense_copy(model)
    gen = torch.Generator().manual_seed(3)
    xt = torch.cat([torch.rand(7, 1, generator=gen), torch.randint(0, GROUPS + 1, (7, 1), generator=gen)], -1)
    xt = xt.to(DTYPE)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with closed_forms_only(N), torch.no_grad(), gpytorch.settings.max_cholesky_size(0):
            pred = model(xt)
            mean, var = pred.mean, pred.variance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)  # the dense reference's own solves
        ref_mean, ref_var = dense_prediction(reference, xt)
    assert mean.shape == (T, 7)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


def test_block_mean_sum_times_batch_constants():
    """``BlockMeanSumLinearOperator * c`` with one constant per batch entry stays a closed-form sum."""
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 4, (N,), generator=gen)
    B = torch.rand(4, 4, generator=gen, dtype=DTYPE)
    block = BlockMeanLinearOperator(torch.rand(4, generator=gen, dtype=DTYPE), B @ B.T, Partition.from_labels(labels))
    root = torch.randn(N, 3, generator=gen, dtype=DTYPE)
    op = block + DiagLinearOperator(torch.rand(N, generator=gen, dtype=DTYPE) + 1) + LowRankRootLinearOperator(root)
    assert isinstance(op, BlockMeanSumLinearOperator)
    c = SCALES.view(T, 1, 1)
    rhs = torch.randn(T, N, 2, generator=gen, dtype=DTYPE)
    for scaled in (op.mul(c), c * op):
        assert isinstance(scaled, BlockMeanSumLinearOperator) and scaled.shape == (T, N, N)
        dense = c * op.to_dense()
        with closed_forms_only(N), gpytorch.settings.max_cholesky_size(0):
            solved, logdet = scaled.solve(rhs), scaled.logdet()
        torch.testing.assert_close(scaled.to_dense(), dense)
        torch.testing.assert_close(solved, torch.linalg.solve(dense, rhs))
        torch.testing.assert_close(logdet, torch.logdet(dense))
