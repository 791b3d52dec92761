"""A sum of block mean terms times a block mean operator, elementwise, in closed form.

``(BlockMeanKernel + GroupKernel) * IndexKernel`` (a multitask model whose per-task covariance is a sum) multiplied
the sum through linear_operator's roots: a jittered Cholesky root of the sum (entries 1.7e-8 off in float64, a
log-density 2e-3 nats off at noise 1e-2), with a warning. The product distributes over the sum's terms, each of which
stays in the family: a diagonal term becomes ``k_X`` weighted diagonal terms over its own grouping (eliminated
together by the capacitance), a dense one a term over the intersection of the partitions, the root a root of rank
``m k_X``. References: the dense product in float64.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from linear_operator.operators import ConstantMulLinearOperator, DiagLinearOperator

from bma_gp import BlockMeanKernel, BlockMeanLinearOperator, BlockMeanSumLinearOperator, ClosedFormFallbackWarning
from bma_gp import Partition
from bma_gp.kernels import GroupKernel
from closed_form_guard import closed_forms_only
from gp_reference import GP, assert_gradients_like_dense, dense_copy, dense_prediction

pytestmark = pytest.mark.usefixtures("one_thread")

N = 90


def _labels(k, gen, n=N):
    labels = torch.randint(0, k, (n,), generator=gen)
    labels[:k] = torch.randperm(k, generator=gen)
    return labels


def _sum(gen, dtype, root=0, slope=False, batch=(), diagonal=(True, False), leaves=None):
    parts = [Partition.from_labels(_labels(7, gen)), Partition.from_labels(_labels(4, gen))]
    blocks = []
    for p, diag in zip(parts, diagonal):
        k = p.num_blocks
        if diag:
            blocks.append(torch.rand(*batch, k, generator=gen, dtype=torch.float64) + 0.2)
        else:
            W = torch.randn(*batch, k, k, generator=gen, dtype=torch.float64)
            blocks.append(W @ W.mT / k + 0.1 * torch.eye(k, dtype=torch.float64))
    d = torch.rand(*batch, N, generator=gen, dtype=torch.float64) + 0.3
    U = torch.randn(*batch, N, root, generator=gen, dtype=torch.float64) / 2 if root else None
    weights = [torch.randn(N, generator=gen, dtype=torch.float64) if slope else None, None]
    tensors = [d, *blocks] + ([U] if U is not None else [])
    if leaves is not None:
        tensors = [t.requires_grad_(True) for t in tensors]
        leaves.extend(tensors)
    return BlockMeanSumLinearOperator(
        tensors[0].to(dtype),
        *(b.to(dtype) for b in tensors[1:3]),
        partitions=parts,
        root=None if U is None else tensors[3].to(dtype),
        weights=[None if w is None else w.to(dtype) for w in weights],
        diagonal=list(diagonal),
    )


def _task(gen, dtype, k=3, batch=(), lam=False, leaves=None):
    W = torch.randn(*batch, k, 2, generator=gen, dtype=torch.float64)
    C = W @ W.mT + torch.diag_embed(torch.rand(*batch, k, generator=gen, dtype=torch.float64) + 0.1)
    lam_values = (torch.rand(*batch, k, generator=gen, dtype=torch.float64) if lam else torch.zeros(*batch, k)).double()
    if leaves is not None:
        C = C.requires_grad_(True)
        leaves.append(C)
    return BlockMeanLinearOperator(lam_values.to(dtype), C.to(dtype), Partition.from_labels(_labels(k, gen)))


CASES = {
    "diagonal and dense terms": {},
    "a random slope": {"sum": {"slope": True}},
    "a root": {"sum": {"root": 3}},
    "a task operator with lam": {"task": {"lam": True}, "sum": {"root": 2}},
    "both dense": {"sum": {"diagonal": (False, False)}},
    "batch sum": {"sum": {"batch": (2,), "root": 2}},
    "batch task operator": {"task": {"batch": (2,)}},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_product_is_a_sum_with_the_dense_entries_and_closed_forms(case, dtype):
    gen = torch.Generator().manual_seed(0)
    S = _sum(gen, dtype, **CASES[case].get("sum", {}))
    X = _task(gen, dtype, **CASES[case].get("task", {}))
    want = S.to_dense().double() * X.to_dense().double()
    for product in (S * X, X * S, S._mul_matrix(X)):
        assert isinstance(product, BlockMeanSumLinearOperator)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(product.to_dense().double(), want, **tol)
    noisy = product.add_diagonal(torch.tensor(0.05, dtype=dtype))
    rhs = torch.randn(*want.shape[:-1], 2, generator=gen, dtype=torch.float64)
    with closed_forms_only(N):
        solved, logdet = noisy.solve(rhs.to(dtype)), noisy.logdet()
    factor = torch.linalg.cholesky(want + 0.05 * torch.eye(N, dtype=torch.float64))
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(solved.double(), torch.cholesky_solve(rhs, factor), **tol)
    torch.testing.assert_close(logdet.double(), 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1), **tol)


def test_diagonal_terms_stay_eliminated():
    """A diagonal term times a task operator of 3 tasks is 3 weighted diagonal terms over the same grouping, which
    the capacitance eliminates together (no dense matrix over the intersection of the partitions)."""
    gen = torch.Generator().manual_seed(1)
    S = _sum(gen, torch.float64, diagonal=(True, True))
    product = (S * _task(gen, torch.float64)).add_diagonal(torch.tensor(0.1, dtype=torch.float64))
    assert product.num_blocks == (7, 7, 7, 4, 4, 4)
    assert all(product.diagonal_blocks)
    assert len(product._elimination_terms()) == 3


def test_gradients_match_the_dense_product():
    gen = torch.Generator().manual_seed(2)
    leaves: list[torch.Tensor] = []
    S = _sum(gen, torch.float64, root=2, leaves=leaves)
    X = _task(gen, torch.float64, leaves=leaves)
    noise = torch.tensor(0.1, dtype=torch.float64)
    rhs = torch.randn(N, generator=gen, dtype=torch.float64)
    noisy = (S * X).add_diagonal(noise)
    got = torch.autograd.grad(noisy.inv_quad_logdet(rhs.unsqueeze(-1), logdet=True)[1] + noisy.inv_quad(rhs), leaves)
    dense = S.to_dense() * X.to_dense() + noise * torch.eye(N, dtype=torch.float64)
    want = torch.autograd.grad(torch.logdet(dense) + rhs @ torch.linalg.solve(dense, rhs), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_a_scaled_factor_and_an_indefinite_task_matrix():
    """``S * (c X)`` is ``c (S * X)``; with a root and a task matrix that is not positive definite there is no
    root of rank ``m k_X``: the generic product, with its warning, as before."""
    gen = torch.Generator().manual_seed(3)
    S = _sum(gen, torch.float64, root=2)
    X = _task(gen, torch.float64)
    scaled = S * ConstantMulLinearOperator(X, torch.tensor(1.7, dtype=torch.float64))
    assert isinstance(scaled, BlockMeanSumLinearOperator)
    torch.testing.assert_close(scaled.to_dense(), 1.7 * S.to_dense() * X.to_dense(), rtol=1e-12, atol=1e-12)
    bad = BlockMeanLinearOperator(X.lam, X.B - 5 * torch.eye(3, dtype=torch.float64), X.partition)
    with pytest.warns(ClosedFormFallbackWarning, match="elementwise product"):
        with pytest.raises(ValueError, match="positive semidefinite"):  # the generic product's root of the factor
            S * bad
    plain = _sum(gen, torch.float64)  # without a root, any symmetric task matrix is distributed
    torch.testing.assert_close((plain * bad).to_dense(), plain.to_dense() * bad.to_dense(), rtol=1e-12, atol=1e-12)
    assert isinstance(S * DiagLinearOperator(torch.ones(N, dtype=torch.float64)), DiagLinearOperator)


# ------------------------------------------------------------------ the multitask model
def _model(form: str):
    g = torch.Generator().manual_seed(1)
    n, tasks, levels = 150, 3, 6
    x = torch.stack(
        [
            torch.rand(n, generator=g, dtype=torch.float64),
            torch.randint(0, levels, (n,), generator=g).double(),
            torch.randint(0, tasks, (n,), generator=g).double(),
        ],
        -1,
    )
    y = torch.sin(6 * x[:, 0]) + 0.3 * x[:, 1] - 0.2 * x[:, 2] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    group = GroupKernel(levels, active_dims=[1])
    bmk = BlockMeanKernel(gpytorch.kernels.RBFKernel(active_dims=[0]), x, Partition.from_labels((x[:, 0] * 8).long()))
    task = gpytorch.kernels.IndexKernel(num_tasks=tasks, rank=1, active_dims=[2])
    first = gpytorch.kernels.ScaleKernel(bmk + group)
    kernel = first * task if form == "sum first" else task * first
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    xt = torch.stack(
        [
            torch.rand(7, generator=g, dtype=torch.float64),
            torch.randint(0, levels, (7,), generator=g).double(),
            torch.randint(0, tasks, (7,), generator=g).double(),
        ],
        -1,
    )
    return model, x, y, xt


@pytest.mark.parametrize("form", ["sum first", "task first"])
def test_multitask_model_trains_in_closed_form(form):
    """``ScaleKernel(BlockMeanKernel + GroupKernel) * IndexKernel``: the marginal log likelihood and its gradients
    in closed form, equal to the dense model's; predictions exact (through the exact t x n path, with its warning)."""
    model, x, y, xt = _model(form)
    reference = dense_copy(model)
    for m in (model, reference):
        m.train()
    with closed_forms_only(x.shape[0]), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
        loss.backward()
    with warnings.catch_warnings(), gpytorch.settings.max_cholesky_size(10**6):
        warnings.simplefilter("ignore")
        ref = -gpytorch.mlls.ExactMarginalLogLikelihood(reference.likelihood, reference)(reference(x), y)
        ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    assert_gradients_like_dense(model, reference, rtol=1e-8, minimum=4)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pred = model(xt)
        mean, var = pred.mean, pred.variance
    # one warning, the exact t x n path's; the test-by-test covariance is formed densely without a word in either
    # order of the factors, as GPyTorch's own product forms it
    assert [str(w.message)[:26] for w in seen] == ["prediction at new inputs: "], [str(w.message) for w in seen]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_mean, ref_var = dense_prediction(reference, xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(var, ref_var, rtol=1e-10, atol=1e-10)
