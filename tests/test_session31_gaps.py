"""Known gaps left open by session 30, closed in session 31. Each test failed before its fix and compares with dense
float64 linear algebra or with the same model evaluated lazily (GPyTorch's default), which session 30 checked."""

from __future__ import annotations

import copy
import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, GroupKernel, Partition
from test_lcm_attack import T, _BatchMultitaskGP  # the same multitask model (T = 2 tasks)

pytestmark = pytest.mark.usefixtures("one_thread")

N = 16
DTYPE = torch.float64
UNBATCHED = torch.Size()
COLUMNS = r"bound to train_x with 2 columns but is given inputs with 1"
MISMATCH = r"training inputs do not match BlockMeanKernel\.train_x"


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=y.shape[:-1])
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _data(batch: torch.Size = UNBATCHED):
    gen = torch.Generator().manual_seed(11)
    groups = torch.randint(0, 4, (N,), generator=gen)
    x = torch.stack([torch.rand(N, generator=gen, dtype=DTYPE), groups.to(DTYPE)], -1)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(*batch, N, generator=gen, dtype=DTYPE)
    return x, y, Partition.from_labels(groups)


def _rbf(**kwargs):
    return gpytorch.kernels.RBFKernel(**kwargs)


def _model(container: str, bound_columns: list[int] | None, batch: torch.Size = UNBATCHED):
    """A model whose ``BlockMeanKernel`` sits in ``container`` and is bound to ``bound_columns`` of the two input
    columns (None: all of them); the containers around it select column 0, so all-column kernels are mis-bound."""
    x, y, part = _data(batch)
    bound = x if bound_columns is None else x[:, bound_columns]

    def bmk(base=None):
        return BlockMeanKernel(base if base is not None else _rbf(batch_shape=batch), bound, part)

    if container in ("lcm", "multitask"):
        if container == "lcm":
            kernel = gpytorch.kernels.LCMKernel([bmk(), bmk(gpytorch.kernels.MaternKernel(batch_shape=batch))], T, 1)
        else:
            kernel = gpytorch.kernels.MultitaskKernel(bmk(), num_tasks=T, rank=1)
        kernel.active_dims = torch.tensor([0])
        likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=T, batch_shape=batch)
        ys = torch.stack([y, y.flip(-1)], -1)
        return _BatchMultitaskGP(x.expand(*batch, N, 2), ys, likelihood, kernel, batch).double(), x, ys
    if container == "scale":
        kernel = gpytorch.kernels.ScaleKernel(bmk(), active_dims=[0])
    elif container == "sum":  # the block mean kernel selects column 0 in the sum, the other summand reads both
        inner = bmk()
        inner.active_dims = torch.tensor([0])
        kernel = inner + GroupKernel(4, batch_shape=batch, active_dims=[1])
    elif container == "nested":  # active_dims at two levels: the sum picks columns (1, 0), the scale the second (0)
        inner = gpytorch.kernels.ScaleKernel(bmk(), active_dims=[1])
        kernel = gpytorch.kernels.AdditiveKernel(inner, GroupKernel(4, batch_shape=batch, active_dims=[0]))
        kernel.active_dims = torch.tensor([1, 0])
    else:
        raise AssertionError(container)
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch)
    return _GP(x.expand(*batch, N, 2), y, likelihood, kernel).double(), x, y


def _mll_and_mean(model, x, y, lazy: bool):
    """The marginal log-likelihood (training mode) and the predictive mean at three inputs (eval mode)."""
    model.train()
    model.prediction_strategy = None
    test_x = model.train_inputs[0][..., :3, :].clone()
    test_x[..., 0] += 0.01  # new points (the group column, if any, kept)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with gpytorch.settings.lazily_evaluate_kernels(lazy):
        value = mll(model(model.train_inputs[0]), model.train_targets).detach()
        model.eval()
        with torch.no_grad(), pytest.warns() if not lazy else _nothing():
            mean = model(test_x).mean
    model.train()
    return value, mean


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("container", ["scale", "sum", "nested", "lcm", "multitask"])
def test_eager_evaluation_refuses_a_block_mean_kernel_given_other_columns(container):
    """Under ``gpytorch.settings.lazily_evaluate_kernels(False)`` a ``BlockMeanKernel`` bound to both input columns,
    which a kernel around it hands one column, trained and predicted on its exact base kernel without a word (the
    check read the lazily evaluated prior, which eager evaluation does not give): it now raises the lazy mode's
    ``ValueError`` in training and in eval mode, and the model keeps no prediction strategy."""
    model, x, y = _model(container, None)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    for lazy in (True, False):
        model.train()
        with gpytorch.settings.lazily_evaluate_kernels(lazy):
            with pytest.raises(ValueError, match=COLUMNS):
                mll(model(x), y)
            model.eval()
            with pytest.raises(ValueError, match=COLUMNS), torch.no_grad():
                model(x[:3])
            assert model.prediction_strategy is None


@pytest.mark.parametrize("container", ["scale", "lcm"])
def test_eager_evaluation_refuses_training_inputs_the_kernel_is_not_bound_to(container):
    """``model.set_train_data(new_x, y)`` without ``kernel.set_train_data``: the eager model trained on the base kernel
    at the new inputs, silently; it now raises the lazy mode's ``ValueError``. After ``kernel.set_train_data`` both
    modes agree (values of the marginal log-likelihood and of the predictive mean)."""
    model, x, y = _model(container, [0])
    new_x = x.clone()
    new_x[:, 0] = torch.rand(N, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    model.set_train_data(new_x, y, strict=False)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    for lazy in (True, False):
        model.train()
        with gpytorch.settings.lazily_evaluate_kernels(lazy), pytest.raises(ValueError, match=MISMATCH):
            mll(model(new_x), y)
    for module in model.modules():
        if isinstance(module, BlockMeanKernel):
            module.set_train_data(new_x[:, [0]])
    lazy_value, lazy_mean = _mll_and_mean(model, new_x, y, lazy=True)
    eager_value, eager_mean = _mll_and_mean(model, new_x, y, lazy=False)
    torch.testing.assert_close(eager_value, lazy_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(eager_mean, lazy_mean, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "container, bound, batch",
    [
        ("scale", [0], torch.Size()),
        ("sum", [0], torch.Size()),
        ("nested", [0], torch.Size()),
        ("lcm", [0], torch.Size()),
        ("multitask", [0], torch.Size([2])),
        ("scale", [0], torch.Size([2])),
    ],
)
def test_eager_evaluation_accepts_correctly_bound_kernels(container, bound, batch):
    """No false positives: kernels bound to the columns they are given (active_dims on a ScaleKernel, in a sum, at two
    levels, on an LCMKernel / MultitaskKernel; batched models), after ``load_state_dict`` into a copy and after
    ``.float()``, train and predict eagerly as lazily (the same marginal log-likelihood and predictive mean)."""
    model, x, y = _model(container, bound, batch)
    lazy_value, lazy_mean = _mll_and_mean(model, x, y, lazy=True)
    eager_value, eager_mean = _mll_and_mean(model, x, y, lazy=False)
    torch.testing.assert_close(eager_value, lazy_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(eager_mean, lazy_mean, rtol=1e-8, atol=1e-10)
    twin = copy.deepcopy(model)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(_mll_and_mean(twin, x, y, lazy=False)[0], eager_value)
    value32, _ = _mll_and_mean(model.float(), x, y, lazy=False)
    torch.testing.assert_close(value32.double(), lazy_value, rtol=1e-3, atol=1e-4)


def test_eager_evaluation_accepts_one_dimensional_inputs_and_fantasy_models():
    """No false positives: 1-D training inputs (GPyTorch gives the kernel ``(n, 1)``), a model whose training inputs
    were replaced together with the kernel's, and a fantasy model (whose training inputs extend the kernel's)."""
    x, y, part = _data()
    x1 = x[:, 0]
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = _GP(x1, y, likelihood, BlockMeanKernel(_rbf(), x1, part)).double()
    lazy = _mll_and_mean(model, x1, y, lazy=True)
    eager = _mll_and_mean(model, x1, y, lazy=False)
    torch.testing.assert_close(eager[0], lazy[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(eager[1], lazy[1], rtol=1e-8, atol=1e-10)
    model.eval()
    with gpytorch.settings.lazily_evaluate_kernels(False), torch.no_grad(), pytest.warns():
        model(x1[:2])
        fantasy = model.get_fantasy_model(torch.tensor([0.25, 0.75], dtype=DTYPE), torch.zeros(2, dtype=DTYPE))
        assert fantasy(x1[:3]).mean.shape == (3,)


# ---------------------------------------------------------------- constants times a noisy Kronecker sum


def _noisy_kronecker(kind: str, rank: int, batch: torch.Size = UNBATCHED, tasks: int = T, detach: bool = True):
    """The noisy training covariance ``likelihood(prior)`` of a ``MultitaskKernel`` around a ``BlockMeanKernel`` or of
    an ``LCMKernel`` of two (``N`` points, ``tasks`` tasks): a closed-form Kronecker sum (with the parameters it was
    built from where not ``detach``)."""
    x, _, part = _data()
    if kind == "multitask":
        kernel = gpytorch.kernels.MultitaskKernel(
            BlockMeanKernel(_rbf(batch_shape=batch), x, part), num_tasks=tasks, rank=1
        )
    else:
        members = [
            BlockMeanKernel(_rbf(batch_shape=batch), x, part),
            BlockMeanKernel(gpytorch.kernels.MaternKernel(batch_shape=batch), x, part),
        ]
        kernel = gpytorch.kernels.LCMKernel(members, num_tasks=tasks, rank=1)
    kernel = kernel.double()
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=tasks, rank=rank, batch_shape=batch)
    likelihood = likelihood.double()
    with torch.no_grad():
        for p in [*kernel.parameters(), *likelihood.parameters()]:
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    prior = gpytorch.distributions.MultitaskMultivariateNormal(
        torch.zeros(*batch, N, tasks, dtype=DTYPE), kernel(x.expand(*batch, N, 2))
    )
    covariance = likelihood(prior).lazy_covariance_matrix
    if detach:
        return covariance.detach()
    return covariance, [*kernel.parameters(), *likelihood.parameters()]


def _reference(scaled_dense, rhs):
    solved = torch.linalg.solve(scaled_dense, rhs)
    return solved, (rhs * solved).sum((-2, -1)), torch.logdet(scaled_dense)


KINDS = [("multitask", 0), ("multitask", 1), ("lcm", 0), ("lcm", 1)]


@pytest.mark.parametrize("kind, rank", KINDS)
@pytest.mark.parametrize(
    "sum_batch, c_batch", [(UNBATCHED, (3,)), (torch.Size([3]), (2, 3)), (torch.Size([3]), (2, 1))]
)
def test_a_batch_of_constants_broader_than_the_kronecker_sum_keeps_the_closed_form(kind, rank, sum_batch, c_batch):
    """``A * c`` with one positive constant per entry of a batch broader than the noisy Kronecker sum's
    (``c`` of shape ``(3, 1, 1)`` for an unbatched sum): linear_operator's ``mul`` handed it to ``_mul_matrix``, which
    formed the dense ``n t x n t`` matrix of every entry without a word (a ``DenseLinearOperator``). The sum is now
    expanded to the broadcast batch (views) and scaled in closed form: values, solves, the log-determinant and the
    gradients w.r.t. the constants equal the dense ones."""
    from bma_gp import ClosedFormFallbackWarning
    from closed_form_guard import closed_forms_only

    A = _noisy_kronecker(kind, rank, sum_batch)
    dense = A.to_dense()
    values = torch.tensor([2.0, 3.0, 0.5, 1.5, 0.25, 4.0], dtype=DTYPE)[: torch.Size(c_batch).numel()]
    c = values.view(*c_batch, 1, 1).requires_grad_()
    scaled = A * c
    assert type(scaled) is type(A), type(scaled).__name__
    assert scaled.shape == torch.broadcast_shapes(dense.shape, c.shape)
    rhs = torch.randn(*scaled.shape[:-1], 1, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    with closed_forms_only(N * T), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        solved = scaled.solve(rhs)
        inv_quad, logdet = scaled.inv_quad_logdet(rhs, logdet=True)
    c_ref = c.detach().clone().requires_grad_()
    ref_solved, ref_inv_quad, ref_logdet = _reference(dense * c_ref, rhs)
    torch.testing.assert_close(scaled.to_dense(), (dense * c_ref).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(solved, ref_solved.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(inv_quad, ref_inv_quad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(logdet, ref_logdet, rtol=1e-10, atol=1e-10)
    (inv_quad + logdet).sum().backward()
    (ref_inv_quad + ref_logdet).sum().backward()
    torch.testing.assert_close(c.grad, c_ref.grad, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("kind, rank", KINDS)
def test_a_negative_multiple_of_a_kronecker_sum_solves_through_the_sum(kind, rank):
    """``c A`` with ``c < 0`` (also one entry of a batch of constants): linear_operator's multiple, whose solves
    raised ``NotPSDError`` (a jittered Cholesky of a negative definite matrix) or the closed form's "core not positive
    definite" error, neither naming ``c``. Now the sum's closed forms divided by ``c`` (equal to the dense solve and
    log-determinant), and a root raises a ``ValueError`` that says ``c < 0``."""
    A = _noisy_kronecker(kind, rank)
    dense = A.to_dense()
    rhs = torch.randn(N * T, 2, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    for c in (torch.tensor(-2.5, dtype=DTYPE), torch.tensor([-2.5, 0.5], dtype=DTYPE).view(2, 1, 1)):
        scaled = A * c
        ref_solved, ref_inv_quad, ref_logdet = _reference(dense * c, rhs)
        torch.testing.assert_close(scaled.solve(rhs), ref_solved, rtol=1e-9, atol=1e-10)
        inv_quad, logdet = scaled.inv_quad_logdet(rhs, logdet=True)
        torch.testing.assert_close(inv_quad, ref_inv_quad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(logdet, ref_logdet, rtol=1e-10, atol=1e-10)
        with pytest.raises(ValueError, match=r"negative multiple c S \(c < 0\)"):
            scaled.root_decomposition()


@pytest.mark.parametrize("kind, rank", KINDS)
@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_a_zero_multiple_of_a_kronecker_sum_names_the_constant(kind, rank, value):
    """``c A`` with ``c = 0`` (or NaN, alone or in a batch of constants): a ``NotPositiveDefiniteError`` about the
    core, an ``AttributeError`` inside linear_operator's Kronecker sum, or a warned fallback, none naming ``c``. Now a
    ``ValueError`` that names the constant, says the closed form needs ``c > 0`` and what to do."""
    A = _noisy_kronecker(kind, rank)
    word = "zero" if value == 0 else "NaN"
    for c in (torch.tensor(value, dtype=DTYPE), torch.tensor([2.0, value], dtype=DTYPE).view(2, 1, 1)):
        with pytest.raises(ValueError, match=rf"constant c {word}.*needs c > 0.*Multiply by a positive constant"):
            (A * c).solve(torch.ones(*A.shape[:-1], 1, dtype=DTYPE))


# ---------------------------------------------------------------- whole tasks of a noisy multitask covariance


@pytest.mark.parametrize(
    "kind, rank, batch",
    [
        ("multitask", 0, UNBATCHED),
        ("multitask", 1, torch.Size([2])),
        ("lcm", 0, torch.Size([2])),
        ("lcm", 1, UNBATCHED),
    ],
)
def test_one_task_of_a_noisy_multitask_covariance_is_a_block_mean_operator(kind, rank, batch):
    """``mvn[..., j]`` for the noisy multitask output of a closed-form Kronecker sum: its covariance, every point of
    task ``j``, is :math:`\\sum_q K_q[j, j] M_q + D_{jj} I`, a block mean operator over the shared partition, but was
    linear_operator's indexed sum with a ``ClosedFormFallbackWarning`` (its solves took the generic path). Now that
    block mean operator: entries, solves, log-determinant and the gradients w.r.t. the model's parameters equal the
    dense ones, with no fallback."""
    from bma_gp import BlockMeanLinearOperator, ClosedFormFallbackWarning
    from closed_form_guard import closed_forms_only

    tasks = 3
    A, params = _noisy_kronecker(kind, rank, batch, tasks=tasks, detach=False)
    mvn = gpytorch.distributions.MultitaskMultivariateNormal(torch.zeros(*batch, N, tasks, dtype=DTYPE), A)
    rhs = torch.randn(*batch, N, 1, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    dense = A.to_dense()
    for j in range(tasks):
        with closed_forms_only(N), warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            sub = mvn[..., j].lazy_covariance_matrix
            assert isinstance(sub, BlockMeanLinearOperator), type(sub).__name__
            solved = sub.solve(rhs)
            inv_quad, logdet = sub.inv_quad_logdet(rhs, logdet=True)
        ref = dense[..., j::tasks, j::tasks]
        ref_solved = torch.linalg.solve(ref, rhs)
        ref_value = ((rhs * ref_solved).sum((-2, -1)) + torch.logdet(ref)).sum()
        torch.testing.assert_close(sub.to_dense(), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(solved, ref_solved, rtol=1e-9, atol=1e-10)
        value = (inv_quad + logdet).sum()
        torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-10)
        if j != 1:
            continue  # the gradients for one task (the middle one)
        got = torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)
        want = torch.autograd.grad(ref_value, params, allow_unused=True, retain_graph=True)
        for a, b in zip(got, want, strict=True):
            if b is None:
                assert a is None or not bool(a.abs().max() > 0)
            else:
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kind, rank", KINDS)
@pytest.mark.parametrize("tasks_index", [[2, 0], [1, 2], slice(0, 2)], ids=["2,0", "1,2", "0:2"])
def test_a_set_of_whole_tasks_of_a_noisy_multitask_covariance_keeps_the_closed_form(kind, rank, tasks_index):
    """``mvn[..., S]`` for a set of whole tasks ``S`` (a list, a slice): the Kronecker sum with the task factors
    :math:`K_q[S, S]` and the noise :math:`D[S, S]`, solved in closed form (it was the warned indexed fallback);
    other submatrices (a slice of points) keep the warned fallback."""
    from bma_gp import ClosedFormFallbackWarning
    from closed_form_guard import closed_forms_only

    tasks = 3
    A = _noisy_kronecker(kind, rank, tasks=tasks)
    mvn = gpytorch.distributions.MultitaskMultivariateNormal(torch.zeros(N, tasks, dtype=DTYPE), A)
    index = torch.tensor(tasks_index) if isinstance(tasks_index, list) else tasks_index
    sub = mvn[..., index].lazy_covariance_matrix
    S = torch.arange(tasks)[index]
    positions = (torch.arange(N)[:, None] * tasks + S[None, :]).reshape(-1)
    ref = A.to_dense()[positions][:, positions]
    rhs = torch.randn(positions.numel(), 2, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    with closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        solved = sub.solve(rhs)
        logdet = sub.logdet()
    torch.testing.assert_close(sub.to_dense(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(solved, torch.linalg.solve(ref, rhs), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(logdet, torch.logdet(ref), rtol=1e-10, atol=1e-10)
    points = mvn[2:9, :].lazy_covariance_matrix  # not whole tasks: still the fallback, announced
    with pytest.warns(ClosedFormFallbackWarning):
        points.solve(torch.ones(points.shape[-1], 1, dtype=DTYPE))
