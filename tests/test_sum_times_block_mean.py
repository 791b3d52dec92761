"""A sum of block mean terms times a block mean operator, elementwise, in closed form.

``(BlockMeanKernel + GroupKernel) * IndexKernel`` (a multitask model whose per-task covariance is a sum) multiplied
the sum through linear_operator's roots: a jittered Cholesky root of the sum (entries 1.7e-8 off in float64, a
log-density 2e-3 nats off at noise 1e-2), with a warning. The product distributes over the sum's terms, each of which
stays in the family: a diagonal term becomes ``k_X`` weighted diagonal terms over its own grouping (eliminated
together by the capacitance), a dense one a term over the intersection of the partitions, the root a root of rank
``m k_X``. References: the dense product in float64.
"""

from __future__ import annotations

import contextlib
import warnings

import gpytorch
import pytest
import torch
from linear_operator.operators import ConstantMulLinearOperator, DiagLinearOperator

from bma_gp import (
    BlockMeanKernel,
    BlockMeanLinearOperator,
    BlockMeanSumLinearOperator,
    ClosedFormFallbackWarning,
    Partition,
)
from bma_gp.kernels import ChunkedInducingPointKernel, GroupKernel
from closed_form_guard import closed_forms_only
from gp_reference import GP, assert_gradients_like_dense, dense_copy, dense_prediction, objective_like_dense

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
    root of rank ``m k_X``: the dense product, exact, with its warning."""
    gen = torch.Generator().manual_seed(3)
    S = _sum(gen, torch.float64, root=2)
    X = _task(gen, torch.float64)
    scaled = S * ConstantMulLinearOperator(X, torch.tensor(1.7, dtype=torch.float64))
    assert isinstance(scaled, BlockMeanSumLinearOperator)
    torch.testing.assert_close(scaled.to_dense(), 1.7 * S.to_dense() * X.to_dense(), rtol=1e-12, atol=1e-12)
    bad = BlockMeanLinearOperator(X.lam, X.B - 5 * torch.eye(3, dtype=torch.float64), X.partition)
    with pytest.warns(ClosedFormFallbackWarning, match="elementwise product .* formed densely"):
        generic = S * bad  # (linear_operator's product raised for the root of the indefinite factor)
    assert not isinstance(generic, BlockMeanSumLinearOperator)
    torch.testing.assert_close(generic.to_dense(), S.to_dense() * bad.to_dense(), rtol=0, atol=0)
    plain = _sum(gen, torch.float64)  # without a root, any symmetric task matrix is distributed
    torch.testing.assert_close((plain * bad).to_dense(), plain.to_dense() * bad.to_dense(), rtol=1e-12, atol=1e-12)
    assert isinstance(S * DiagLinearOperator(torch.ones(N, dtype=torch.float64)), DiagLinearOperator)


# ------------------------------------------------------------------ the multitask model
def _model(form: str, sum_kind: str = "block mean + group", task_kind: str = "index"):
    g = torch.Generator().manual_seed(1)
    n, tasks, levels = 150, 3, 6
    x = torch.stack(
        [
            torch.rand(n, generator=g, dtype=torch.float64),
            torch.randint(0, levels, (n,), generator=g).double(),
            torch.randint(0, tasks, (n,), generator=g).double(),
            torch.randn(n, generator=g, dtype=torch.float64),
        ],
        -1,
    )
    y = torch.sin(6 * x[:, 0]) + 0.3 * x[:, 1] - 0.2 * x[:, 2] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    group = GroupKernel(levels, active_dims=[1])
    if sum_kind == "block mean + group":
        parts = BlockMeanKernel(
            gpytorch.kernels.RBFKernel(active_dims=[0]), x, Partition.from_labels((x[:, 0] * 8).long())
        )
    elif sum_kind == "slope + group":  # a random slope on column 3 over the levels of column 1, and a crossed grouping
        parts = GroupKernel(levels, slope=True, active_dims=[1, 3])
        group = GroupKernel(tasks + 1, active_dims=[2])
    else:  # "inducing points + group": a root
        inducing = torch.linspace(0, 1, 5, dtype=torch.float64).unsqueeze(-1)
        parts = ChunkedInducingPointKernel(gpytorch.kernels.RBFKernel(), inducing, likelihood, active_dims=[0])
    if task_kind == "index":
        task = gpytorch.kernels.IndexKernel(num_tasks=tasks + 1, rank=1, active_dims=[2])
    elif task_kind == "scaled index":
        task = gpytorch.kernels.ScaleKernel(gpytorch.kernels.IndexKernel(num_tasks=tasks + 1, rank=1, active_dims=[2]))
        task.outputscale = 1.7
    else:  # a second grouping, of rank 1 (dense B)
        task = GroupKernel(tasks + 1, rank=1, active_dims=[2])
    first = gpytorch.kernels.ScaleKernel(parts + group)
    kernel = first * task if form == "sum first" else task * first
    model = GP(x, y, likelihood, kernel).double()
    xt = torch.stack(
        [
            torch.rand(7, generator=g, dtype=torch.float64),
            torch.tensor([0.0, 1, 2, 3, 4, 5, 7], dtype=torch.float64).clamp_max(levels - 1),
            torch.tensor([0.0, 1, 2, 3, 0, 1, 2], dtype=torch.float64),  # task 3 is never seen in training
            torch.randn(7, generator=g, dtype=torch.float64),
        ],
        -1,
    )
    return model, x, y, xt


def _train_and_predict(model, x, y, xt):
    @contextlib.contextmanager
    def strictly():
        with closed_forms_only(x.shape[0]), warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            yield

    reference, _ = objective_like_dense(model, gpytorch.mlls.ExactMarginalLogLikelihood, x, y, strictly)
    assert_gradients_like_dense(model, reference, rtol=1e-8, minimum=3)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pred = model(xt)
        mean, var, covar = pred.mean, pred.variance, pred.covariance_matrix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_mean, ref_var = dense_prediction(reference, xt)
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6):
            ref_covar = reference(xt).covariance_matrix
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(var, ref_var, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(covar, ref_covar, rtol=1e-10, atol=1e-10)
    return [str(w.message) for w in seen if issubclass(w.category, ClosedFormFallbackWarning)]


@pytest.mark.parametrize("task_kind", ["index", "scaled index", "group kernel"])
@pytest.mark.parametrize("form", ["sum first", "task first"])
def test_multitask_model_trains_and_predicts_in_closed_form(form, task_kind):
    """``ScaleKernel(BlockMeanKernel + GroupKernel) * IndexKernel``: the marginal log likelihood and its gradients in
    closed form, equal to the dense model's; the prediction at new inputs (a task id never seen in training among
    them) reads the cross covariance as the product's columns, without a warning, with the dense model's numbers."""
    model, x, y, xt = _model(form, task_kind=task_kind)
    assert _train_and_predict(model, x, y, xt) == []


@pytest.mark.parametrize("sum_kind", ["slope + group", "inducing points + group"])
def test_multitask_model_with_slopes_or_a_root(sum_kind):
    """Random slopes (three diagonal terms over one grouping, weighted) and an inducing-point kernel's root times a
    task kernel: closed form in training and prediction, the root's product of rank ``m k_X``."""
    model, x, y, xt = _model("sum first", sum_kind=sum_kind)
    assert _train_and_predict(model, x, y, xt) == []


def test_cross_covariance_is_not_formed():
    """The prediction's test-by-training covariance is the product's columns (``t x k`` blocks), not ``t x n``."""
    from bma_gp.kernels.sum_prediction_strategy import _cross_pieces

    model, x, y, xt = _model("sum first")
    model.eval()
    with torch.no_grad():
        cross = model.covar_module(xt, x)
        cross = cross.evaluate_kernel() if hasattr(cross, "evaluate_kernel") else cross
    pieces: list = []
    assert _cross_pieces(cross, pieces)
    assert all(p[0] == "term" for p in pieces) and max(p[1].shape[-1] for p in pieces) < x.shape[0] // 4


@pytest.mark.parametrize("sum_kind", ["block mean + group", "inducing points + group"])
def test_prediction_gradients_match_the_dense_model(sum_kind):
    """Gradients of the predictive mean and variance in every hyperparameter (``detach_test_caches(False)``)."""
    model, x, y, xt = _model("sum first", sum_kind=sum_kind)
    reference = dense_copy(model)
    for m in (model, reference):
        m.eval()
        with warnings.catch_warnings(), gpytorch.settings.detach_test_caches(False):
            warnings.simplefilter("error" if m is model else "ignore", ClosedFormFallbackWarning)
            with gpytorch.settings.max_cholesky_size(10**6 if m is reference else 0):
                pred = m(xt)
                (pred.mean.sum() + pred.variance.sum()).backward()
    assert_gradients_like_dense(model, reference, rtol=1e-7, minimum=4)


@pytest.mark.parametrize("sum_kind", ["block mean + group", "slope + group", "inducing points + group"])
def test_a_batch_of_test_sets_predicts_in_closed_form(sum_kind):
    """A batch of test sets whose group ids differ across the batch: the group kernel's cross covariance is dense
    there (one column per row still), GPyTorch copies the training inputs across the batch, and the product's
    columns are read all the same, without a warning and with the dense model's numbers."""
    model, x, y, xt = _model("sum first", sum_kind=sum_kind)
    reference = dense_copy(model)
    model.eval()
    batch = torch.stack([xt, xt.flip(0)])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        pred = model(batch)
        mean, var = pred.mean, pred.variance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_mean, ref_var = dense_prediction(reference, batch)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(var, ref_var, rtol=1e-10, atol=1e-10)


def test_hadamard_model_over_a_sum_trains_in_closed_form_and_names_the_product_kernel():
    """GPyTorch's Hadamard multitask model whose data kernel is a sum, ``covar_module(x).mul(task_covar(i))``: the
    marginal log likelihood is closed form and equal to the dense model's; its prediction (GPyTorch's default
    strategy, exact here) warns once and names the one-kernel product that predicts in closed form."""
    from linear_operator import to_linear_operator

    g = torch.Generator().manual_seed(1)
    n, tasks, levels = 150, 3, 6
    x = torch.stack(
        [torch.rand(n, generator=g, dtype=torch.float64), torch.randint(0, levels, (n,), generator=g).double()], -1
    )
    ids = torch.randint(0, tasks, (n, 1), generator=g)
    y = torch.sin(6 * x[:, 0]) + 0.3 * x[:, 1] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)

    class Hadamard(gpytorch.models.ExactGP):
        def __init__(self, dense: bool = False):
            super().__init__((x, ids), y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean()
            partition = Partition.from_labels((x[:, 0] * 8).long())
            self.covar_module = BlockMeanKernel(
                gpytorch.kernels.RBFKernel(active_dims=[0]), x, partition
            ) + GroupKernel(levels, active_dims=[1])
            self.task_covar_module = gpytorch.kernels.IndexKernel(num_tasks=tasks, rank=1)
            self.dense = dense

        def forward(self, inputs, task_ids):
            covar, task = self.covar_module(inputs), self.task_covar_module(task_ids)
            if self.dense:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    covar, task = to_linear_operator(covar.to_dense()), to_linear_operator(task.to_dense())
            return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), covar.mul(task))

    model = Hadamard().double()
    reference = Hadamard(dense=True).double()
    reference.load_state_dict(model.state_dict())
    with closed_forms_only(n), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x, ids), y)
    with gpytorch.settings.max_cholesky_size(10**6):
        ref = -gpytorch.mlls.ExactMarginalLogLikelihood(reference.likelihood, reference)(reference(x, ids), y)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    model.eval()
    reference.eval()
    xt, it = x[:6].clone(), torch.tensor([[0], [1], [2], [0], [1], [2]])
    xt[:, 0] += 0.01
    with torch.no_grad():
        with pytest.warns(ClosedFormFallbackWarning, match=r"\(BlockMeanKernel\(\.\.\.\) \+ GroupKernel"):
            pred = model(xt, it)
        with gpytorch.settings.max_cholesky_size(10**6):
            want = reference(xt, it)
    torch.testing.assert_close(pred.mean, want.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pred.variance, want.variance, rtol=1e-10, atol=1e-10)


_MORE = {
    "constant + group": lambda: (
        (gpytorch.kernels.ConstantKernel() + GroupKernel(6, active_dims=[0]))
        * gpytorch.kernels.IndexKernel(4, rank=1, active_dims=[1])
    ),
    "two task factors": lambda: (
        (GroupKernel(6, active_dims=[0]) + GroupKernel(5, active_dims=[2]))
        * gpytorch.kernels.IndexKernel(4, rank=1, active_dims=[1])
        * GroupKernel(5, rank=1, active_dims=[2])
    ),
    "a batched scale": lambda: (
        gpytorch.kernels.ScaleKernel(
            GroupKernel(6, active_dims=[0]) + GroupKernel(5, active_dims=[2]), batch_shape=torch.Size([2])
        )
        * gpytorch.kernels.IndexKernel(4, rank=1, active_dims=[1])
    ),
    "a batched scale on the task factor": lambda: (
        (GroupKernel(6, active_dims=[0]) + GroupKernel(5, active_dims=[2]))
        * gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.IndexKernel(4, rank=1, active_dims=[1]), batch_shape=torch.Size([2])
        )
    ),
}


@pytest.mark.parametrize("kind", _MORE)
def test_more_products_predict_in_closed_form(kind):
    """A constant in the sum (a one-block term, split by the task factor as a diagonal term is), a sum times two
    task factors (multiplied in turn, as the training covariance is) and a batched scale around the sum: each
    predicted through the exact t x n path with a warning that blamed the test inputs. A batched scale around the
    task factor made GPyTorch form that factor densely (n x n), and the product with it, in training too."""
    g = torch.Generator().manual_seed(0)
    n = 200
    x = torch.stack(
        [
            torch.randint(0, 5, (n,), generator=g).double(),
            torch.randint(0, 3, (n,), generator=g).double(),
            torch.randint(0, 4, (n,), generator=g).double(),
        ],
        -1,
    )
    batch = torch.Size([2]) if "batched" in kind else torch.Size()
    y = torch.randn(*batch, n, generator=g, dtype=torch.float64)
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch)
    model = GP(x, y, likelihood, _MORE[kind](), batch_shape=batch).double()
    if "batched" in kind:
        scaled = 0 if kind == "a batched scale" else 1
        model.covar_module.kernels[scaled].outputscale = torch.tensor([0.7, 1.3])
    xt = torch.tensor([[0.0, 0, 1], [5, 1, 4], [2, 3, 0], [4, 2, 3], [1, 0, 2]], dtype=torch.float64)  # new ids too
    assert _train_and_predict(model, x, y, xt) == []


def test_a_constant_in_the_sum_predicts_one_new_point_in_closed_form():
    """GPyTorch's ``ConstantKernel`` between one new point and the training points has strides ``(1, 0)``, not
    ``(0, 0)``: it was not read as the constant term's cross covariance, and the prediction formed ``1 x n``."""
    _, x, y, xt = _model("sum first", task_kind="index")
    for t in (1, 2):
        kernel = (gpytorch.kernels.ConstantKernel() + GroupKernel(6, active_dims=[1])) * gpytorch.kernels.IndexKernel(
            4, rank=1, active_dims=[2]
        )
        model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
        assert _train_and_predict(model, x, y, xt[:t]) == []


def test_a_batch_of_test_sets_forms_no_q_by_q_weight():
    """Two crossed intercepts of 1,500 and 40 levels: a batch of test sets (dense cross covariance blocks, each
    entry its own columns) formed the q x q posterior weight (a user trial: 25-35x the time of one set); each entry
    is now structured as one set is, and equals that set's prediction."""
    from largest_tensor import LargestTensor

    g = torch.Generator().manual_seed(5)
    n, k1, k2 = 6000, 1500, 40
    x = torch.stack([torch.randint(0, k1, (n,), generator=g), torch.randint(0, k2, (n,), generator=g)], -1).double()
    y = torch.randn(n, generator=g, dtype=torch.float64)
    kernel = GroupKernel(k1 + 1, active_dims=[0]) + GroupKernel(k2 + 1, active_dims=[1])
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    model.eval()
    sets = torch.stack([x[:50], x[50:100].flip(0)])
    sets[1, :5, 0] = k1  # a new level in one entry only
    with torch.no_grad():
        model(sets[0])  # the training side's caches, outside the measurement
        with LargestTensor(storage=True) as seen:
            batched = model(sets).variance
        single = torch.stack([model(s).variance for s in sets])
    assert seen.largest < (k1 + k2) ** 2 // 4, seen.where
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("groups", [False, True], ids=["alone", "plus a grouping"])
def test_inducing_points_times_a_task_kernel(groups):
    """``ChunkedInducingPointKernel * IndexKernel (+ GroupKernel)``, a multitask SGPR with groups: the product of the
    inducing points' ``U U^T`` with the task matrix is a low-rank root of rank ``m k_X`` (training) and GPyTorch's
    ``U U^T + diag(c)`` times it in eval mode; it went through linear_operator's jittered product of roots (a dense
    fallback sum with groups, predictions 1e-8 off). Training, gradients (the task kernel's too) and prediction
    against the dense model."""
    _, x, y, xt = _model("sum first")
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    inducing = torch.linspace(0, 1, 6, dtype=torch.float64).unsqueeze(-1)
    kernel = ChunkedInducingPointKernel(
        gpytorch.kernels.RBFKernel(), inducing, likelihood, active_dims=[0]
    ) * gpytorch.kernels.IndexKernel(4, rank=1, active_dims=[2])
    if groups:
        kernel = kernel + GroupKernel(6, active_dims=[1])
    model = GP(x, y, likelihood, kernel).double()
    assert _train_and_predict(model, x, y, xt) == []


def test_a_trainable_task_kernel_times_a_sum_with_a_root_keeps_the_weighted_terms():
    """With a root in the sum and a task kernel that is trained, each grouping became one dense term over its
    (level, task) pairs (a user trial: 62.8 s and 5.1 GB per step against 2.6 s frozen, then a ValueError past
    max_capacitance_size): the root's products now differentiate the task factor's row weights."""
    model, x, y, xt = _model("sum first", sum_kind="inducing points + group")
    model.train()
    covar = model.likelihood(model(x)).lazy_covariance_matrix
    covar = covar.evaluate_kernel() if hasattr(covar, "evaluate_kernel") else covar
    assert isinstance(covar, BlockMeanSumLinearOperator) and covar.root is not None
    assert all(covar.diagonal_blocks)  # weighted diagonal terms, none over (level, task) pairs
    assert max(covar.num_blocks) <= 7


def _multitask_sgpr(task, n=150, groups=False):
    g = torch.Generator().manual_seed(7)
    x = torch.stack(
        [torch.rand(n, generator=g, dtype=torch.float64), torch.randint(0, 17, (n,), generator=g).double()], -1
    )
    x[:17, 1] = torch.arange(17).double()  # every task present
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    inducing = torch.linspace(0, 1, 5, dtype=torch.float64).unsqueeze(-1)
    kernel = ChunkedInducingPointKernel(gpytorch.kernels.RBFKernel(), inducing, likelihood, active_dims=[0]) * task
    return GP(x, y, likelihood, kernel).double(), x, y


@pytest.mark.parametrize(
    "task",
    [
        lambda: gpytorch.kernels.IndexKernel(17, rank=2, active_dims=[1]),  # more than 16 tasks: still one root
        lambda: GroupKernel(17, rank=2, active_dims=[1]),  # a group kernel as the task factor (it went dense)
    ],
    ids=["17 tasks", "group kernel factor"],
)
def test_multitask_sgpr_more_tasks_and_group_factors(task):
    model, x, y = _multitask_sgpr(task())
    xt = x[:6].clone()
    xt[:, 0] += 0.01
    assert _train_and_predict(model, x, y, xt) == []


def test_multitask_sgpr_predicts_batches_of_test_sets_exactly():
    """A batch of test sets with different task ids: the test-by-test product has no root (the ids differ across the
    batch), and linear_operator's product ran Lanczos without a word (variances up to 99% off at 1,000 points per
    set); it is formed densely with exact entries."""
    import linear_operator

    model, x, y = _multitask_sgpr(gpytorch.kernels.IndexKernel(17, rank=1, active_dims=[1]))
    model.eval()
    rows = x.repeat(12, 1)[:1800]  # past max_cholesky_size per set, where the generic product took Lanczos roots
    sets = torch.stack([rows[:900], rows[900:].flip(0)])
    sets[..., 0] += 0.01
    calls = []
    original = linear_operator.utils.lanczos.lanczos_tridiag

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        linear_operator.utils.lanczos.lanczos_tridiag = counted
        try:
            batched = model(sets).variance
        finally:
            linear_operator.utils.lanczos.lanczos_tridiag = original
        single = torch.stack([model(s).variance for s in sets])
    assert not calls
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-12)


def test_a_batched_scale_around_gpytorchs_inducing_point_kernel_times_a_task_kernel_trains():
    """Plain GPyTorch (no bma_gp kernel): ``ScaleKernel(InducingPointKernel, batch_shape=(2,)) * IndexKernel`` raised
    linear_operator's "MulLinearOperator expects two LinearOperators of the same size" once bma_gp was imported (its
    batched scaling of the low-rank root met an unbatched factor): the factors broadcast to one batch first."""
    g = torch.Generator().manual_seed(0)
    n = 50
    x = torch.stack([torch.rand(n, generator=g, dtype=torch.float64), (torch.arange(n) % 3).double()], -1)
    y = torch.sin(6 * x[:, 0]).expand(2, n)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    inducing = torch.linspace(0, 1, 5, dtype=torch.float64).unsqueeze(-1)
    kernel = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.InducingPointKernel(gpytorch.kernels.RBFKernel(), inducing, likelihood, active_dims=[0]),
        batch_shape=torch.Size([2]),
    ) * gpytorch.kernels.IndexKernel(3, rank=1, active_dims=[1])
    model = GP(x, y, likelihood, kernel).double()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
    assert loss.shape == (2,) and bool(torch.isfinite(loss).all())
    torch.testing.assert_close(loss[0], torch.tensor(1.0947670914287, dtype=torch.float64), rtol=1e-6, atol=0)
