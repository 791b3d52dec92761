"""Joint solves and log-densities of predictive distributions: exact, never CG or stochastic Lanczos.

Before, the three covariances of prediction (``_PredictiveDifference`` and ``PredictiveCovarianceLinearOperator`` at
new inputs, ``TrainingPosteriorLinearOperator`` at the training inputs) had no ``solve`` / ``inv_quad_logdet`` of
their own: linear_operator's generic ones took a dense Cholesky up to ``max_cholesky_size`` (800) and CG with
stochastic Lanczos quadrature beyond, without a word. A joint ``log_prob`` of 2500 test points of a random
intercept was off by 3e-4 nats per point, one at the 2000 training inputs of crossed groupings by 0.3 nats.

Now at new inputs one exact Cholesky factorisation of the ``t x t`` matrix in the working precision serves every
size (a ``ValueError`` past ``bma_gp.settings.max_capacitance_size``), and at the training inputs with the
likelihood's noise Woodbury and the determinant lemma through the ``q x q`` capacitance (nothing ``n x n``); without
the noise a dense ``n x n`` factorisation with a ``ClosedFormFallbackWarning``. The tests lower
``max_cholesky_size`` to 10 so that small problems take the path large ones took, run inside ``closed_forms_only``
(CG and Lanczos raise there) and compare with ``torch.distributions.MultivariateNormal`` on the dense covariance of
GPyTorch's dense path, in float64.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from unittest import mock

import gpytorch
import linear_operator
import pytest
import torch
from gpytorch.kernels import InducingPointKernel, RBFKernel, ScaleKernel
from linear_operator.operators import DenseLinearOperator

import bma_gp
from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning, GroupKernel, Partition
from closed_form_guard import ForbiddenPath, closed_forms_only
from gp_reference import GP, DenseKernel

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:The input matches the stored training data"),
]

N, T = 60, 30  # both past the lowered max_cholesky_size
SMALL_CHOLESKY = 10
BATCH = torch.Size([2])


def data(dtype: torch.dtype = torch.float64):
    """Inputs ``(x0, x1, g1, g2)`` (``g1``: 7 ids, ``g2``: 4), targets; new inputs and targets at them."""
    generator = torch.Generator().manual_seed(3)

    def inputs(m: int) -> torch.Tensor:
        x = torch.rand(m, 2, generator=generator, dtype=torch.float64)
        g1 = torch.randint(0, 7, (m, 1), generator=generator).double()
        g2 = torch.randint(0, 4, (m, 1), generator=generator).double()
        return torch.cat([x, g1, g2], -1)

    x, xt = inputs(N), inputs(T)
    y = torch.sin(4 * x[:, 0]) + 0.3 * x[:, 2] - 0.2 * x[:, 3] + 0.1 * torch.randn(N, generator=generator).double()
    yt = torch.sin(4 * xt[:, 0]) + 0.3 * xt[:, 2] - 0.2 * xt[:, 3] + 0.1 * torch.randn(T, generator=generator).double()
    return x.to(dtype), y.to(dtype), xt.to(dtype), yt.to(dtype)


def _block_mean(x, likelihood):
    return BlockMeanKernel(ScaleKernel(RBFKernel(active_dims=[0, 1])), x, Partition.from_labels(torch.arange(N) % 6))


def _sgpr(x, likelihood):
    inducing = torch.linspace(0, 1, 5, dtype=x.dtype).unsqueeze(-1)
    return InducingPointKernel(ScaleKernel(RBFKernel(active_dims=[0])), inducing, likelihood)


#: name -> the kernel, from the training inputs and the likelihood
KERNELS = {
    "GroupKernel": lambda x, lik: GroupKernel(7, active_dims=[2]),
    "GroupKernel(rank=1)": lambda x, lik: GroupKernel(7, rank=1, active_dims=[2]),
    "crossed GroupKernels": lambda x, lik: GroupKernel(7, active_dims=[2]) + GroupKernel(4, active_dims=[3]),
    "BlockMeanKernel": _block_mean,
    "BlockMeanKernel + GroupKernel": lambda x, lik: _block_mean(x, lik) + GroupKernel(7, active_dims=[2]),
    "SGPR + GroupKernel": lambda x, lik: _sgpr(x, lik) + GroupKernel(7, active_dims=[2]),
}
#: the models whose prior at the training inputs is a sum (the posterior there a TrainingPosteriorLinearOperator)
SUMS = ["crossed GroupKernels", "BlockMeanKernel + GroupKernel", "SGPR + GroupKernel"]
NEW_INPUT_OPERATORS = ("_PredictiveDifference", "PredictiveCovarianceLinearOperator")


def model_of(name: str, dtype: torch.dtype = torch.float64, batch: bool = False) -> GP:
    x, y, _, _ = data(dtype)
    if batch:  # a batch of two GPs on the same inputs: other targets, noise and variances per entry
        likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=BATCH)
        likelihood.noise = torch.tensor([[0.05], [0.2]])
        kernel = GroupKernel(7, active_dims=[2], batch_shape=BATCH) + GroupKernel(4, active_dims=[3], batch_shape=BATCH)
        y = torch.stack([y, y.flip(-1)])
        model = GP(x, y, likelihood, kernel, batch_shape=BATCH)
    else:
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        likelihood.noise = 0.05
        model = GP(x, y, likelihood, KERNELS[name](x, likelihood))
    return model.to(dtype).eval()


def dense_reference(model: GP) -> GP:
    """A float64 copy of ``model`` whose kernel is evaluated densely: GPyTorch's dense Cholesky path."""
    reference = copy.deepcopy(model).double()
    reference.covar_module = DenseKernel(reference.covar_module)
    reference.prediction_strategy = None
    return reference.eval()


@contextlib.contextmanager
def dense_and_quiet():
    with gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def closed_form(size: int):
    """CG, Lanczos and dense factorisations of size ``>= size`` raise, and a ``ClosedFormFallbackWarning`` too,
    with linear_operator's Cholesky limit lowered so that these sizes are past it."""
    with closed_forms_only(size), gpytorch.settings.max_cholesky_size(SMALL_CHOLESKY), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        yield


def dense_prediction(reference: GP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and dense covariance of ``likelihood(reference(x))`` by GPyTorch's dense path (``reference``: a
    :func:`dense_reference`)."""
    with dense_and_quiet():
        pred = reference.likelihood(reference(x.double()))
        return pred.mean, pred.covariance_matrix


def dense_log_prob(reference: GP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log N(y; mean, covariance)`` by ``torch.distributions`` on :func:`dense_prediction`."""
    mean, covar = dense_prediction(reference, x)
    return torch.distributions.MultivariateNormal(mean, covar).log_prob(y.double())


def assert_solves_match(solved: torch.Tensor, logdet: torch.Tensor, dense: torch.Tensor, rhs: torch.Tensor, dtype):
    """``solved`` and ``logdet`` against ``torch.linalg`` on the float64 ``dense`` matrix."""
    expected = torch.linalg.solve(dense, rhs.double())
    atol = 1e-9 if dtype == torch.float64 else 1e-4 * float(expected.abs().max())
    torch.testing.assert_close(solved.double(), expected, rtol=TOLERANCE[dtype]["rtol"], atol=atol)
    torch.testing.assert_close(logdet.double(), torch.logdet(dense), **TOLERANCE[dtype])


TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-3)}


# ---------------------------------------------------------------------------- at new inputs
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(KERNELS))
def test_joint_log_prob_at_new_inputs_matches_dense(name, dtype):
    model = model_of(name, dtype)
    _, _, xt, yt = data(dtype)
    with torch.no_grad(), closed_form(T + 1):  # the t x t factorisation, nothing larger, no CG or Lanczos
        pred = model.likelihood(model(xt))
        covar = pred.lazy_covariance_matrix
        assert type(covar).__name__ in NEW_INPUT_OPERATORS
        log_prob = pred.log_prob(yt)
        nlpd = gpytorch.metrics.negative_log_predictive_density(pred, yt)
        rhs = torch.randn(T, 3, dtype=dtype)
        solved = covar.solve(rhs)
        quad, logdet = covar.inv_quad_logdet(rhs, logdet=True, reduce_inv_quad=False)
    assert log_prob.dtype == dtype
    with torch.no_grad():
        reference = dense_reference(model)
        expected = dense_log_prob(reference, xt, yt)
        _, dense = dense_prediction(reference, xt)
    torch.testing.assert_close(log_prob.double(), expected, **TOLERANCE[dtype])
    torch.testing.assert_close(nlpd.double(), -expected / T, **TOLERANCE[dtype])
    assert_solves_match(solved, logdet, dense, rhs, dtype)
    quadratic = (rhs.double() * torch.linalg.solve(dense, rhs.double())).sum(0)
    torch.testing.assert_close(quad.double(), quadratic, **TOLERANCE[dtype])


def test_joint_log_prob_of_a_batch_model_matches_dense():
    model = model_of("crossed GroupKernels", batch=True)
    _, _, xt, yt = data()
    yt = torch.stack([yt, -yt])
    with torch.no_grad(), closed_form(T + 1):
        pred = model.likelihood(model(xt))
        assert type(pred.lazy_covariance_matrix).__name__ in NEW_INPUT_OPERATORS
        log_prob = pred.log_prob(yt)
    assert log_prob.shape == BATCH
    with torch.no_grad():
        expected = dense_log_prob(dense_reference(model), xt, yt)
    torch.testing.assert_close(log_prob, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("where", ["new", "train"])
def test_log_prob_of_a_batch_of_draws(where):
    """``pred.log_prob(draws)`` with draws of shape ``(4, 3, t)``: GPyTorch repeats the covariance over the draws'
    batch (a ``BatchRepeatLinearOperator``), which hands them to the operator's ``inv_quad_logdet`` as columns."""
    model = model_of("crossed GroupKernels")
    x, _, xt, _ = data()
    at = xt if where == "new" else x
    with torch.no_grad(), closed_form(T + 1 if where == "new" else N):
        pred = model.likelihood(model(at))
        draws = pred.rsample(torch.Size([4, 3]))
        log_prob = pred.log_prob(draws)
    with torch.no_grad():
        mean, covar = dense_prediction(dense_reference(model), at)
    assert log_prob.shape == (4, 3)
    expected = torch.distributions.MultivariateNormal(mean, covar).log_prob(draws)
    torch.testing.assert_close(log_prob, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["GroupKernel", "crossed GroupKernels"])
def test_singular_covariance_at_new_inputs_takes_linear_operators_jitter(name):
    """Without the noise, test points of one group have a singular covariance: the factorisation adds
    linear_operator's jitter, as its own Cholesky path does below ``max_cholesky_size``: the same numbers."""
    model = model_of(name)
    _, _, xt, yt = data()
    with torch.no_grad(), closed_forms_only(T + 1), gpytorch.settings.max_cholesky_size(SMALL_CHOLESKY):
        pred = model(xt)
        with pytest.warns(linear_operator.utils.warnings.NumericalWarning, match="jitter"):
            log_prob = pred.log_prob(yt)
    dense = linear_operator.to_linear_operator(pred.covariance_matrix)
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
        warnings.simplefilter("ignore", linear_operator.utils.warnings.NumericalWarning)
        expected = gpytorch.distributions.MultivariateNormal(pred.mean, dense).log_prob(yt)
    assert bool(torch.isfinite(log_prob))
    torch.testing.assert_close(log_prob, expected, rtol=1e-7, atol=1e-6)  # of size 1 / jitter


@pytest.mark.parametrize("name", ["GroupKernel", "crossed GroupKernels"])
def test_one_factorisation_serves_log_prob_and_draws(name):
    """The factor is kept on the operator: a second ``log_prob`` and a draw factorise nothing more."""
    model = model_of(name)
    _, _, xt, yt = data()
    cholesky_ex = torch.linalg.cholesky_ex
    with torch.no_grad(), closed_form(T + 1):
        pred = model.likelihood(model(xt))
        with mock.patch("torch.linalg.cholesky_ex", wraps=cholesky_ex) as factorise:
            first = pred.log_prob(yt)
            second = pred.log_prob(yt)
            draws = pred.rsample(torch.Size([4]))
    assert factorise.call_count == 1
    assert torch.equal(first, second) and draws.shape == (4, T)


# ---------------------------------------------------------------------------- at the training inputs
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", SUMS)
def test_joint_log_prob_at_training_inputs_is_woodbury(name, dtype):
    """``likelihood(model(train_x))``: diag(s) + V V^T with s > 0, solved through the q x q capacitance inside
    ``closed_forms_only(n)``: no n x n factorisation."""
    model = model_of(name, dtype)
    x, y, _, _ = data(dtype)
    with torch.no_grad(), closed_form(N):
        pred = model.likelihood(model(x))
        covar = pred.lazy_covariance_matrix
        assert type(covar).__name__ == "TrainingPosteriorLinearOperator" and covar.diag_kind == "positive"
        log_prob = pred.log_prob(y)
        rhs = torch.randn(N, 2, dtype=dtype)
        solved = covar.solve(rhs)
        logdet = covar.logdet()
    with torch.no_grad():
        reference = dense_reference(model)
        expected = dense_log_prob(reference, x, y)
        _, dense = dense_prediction(reference, x)
    torch.testing.assert_close(log_prob.double(), expected, **TOLERANCE[dtype])
    assert_solves_match(solved, logdet, dense, rhs, dtype)


def test_joint_log_prob_at_training_inputs_of_a_batch_model():
    model = model_of("crossed GroupKernels", batch=True)
    x, _, _, _ = data()
    y = model.train_targets
    with torch.no_grad(), closed_form(N):
        pred = model.likelihood(model(x))
        assert type(pred.lazy_covariance_matrix).__name__ == "TrainingPosteriorLinearOperator"
        log_prob = pred.log_prob(y)
    with torch.no_grad():
        expected = dense_log_prob(dense_reference(model), x, y)
    assert log_prob.shape == BATCH
    torch.testing.assert_close(log_prob, expected, rtol=1e-9, atol=1e-9)


def _indefinite_block_mean_model(n: int = 160) -> tuple[GP, torch.Tensor, torch.Tensor]:
    """A block mean kernel plus a grouping whose block matrix ``B`` is indefinite (``B`` averages the off-diagonal
    entries of each diagonal block; its block mean matrix is positive definite): the posterior's ``H`` has no
    root."""
    g = torch.Generator().manual_seed(6)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 12, (n,), generator=g)
    x = torch.stack([t, ids.double()], -1)
    y = torch.sin(6 * t) + torch.randn(12, generator=g, dtype=torch.float64)[ids] + 0.1 * torch.randn(n, generator=g)
    smooth = ScaleKernel(RBFKernel(active_dims=(0,)))
    smooth.base_kernel.lengthscale = 1.0
    partition = Partition.from_labels((t * 20).long().clamp(max=19))
    kernel = BlockMeanKernel(smooth, x, partition) + GroupKernel(12, active_dims=[1])
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    model.likelihood.noise = 0.05
    return model.eval(), x, y


def test_log_prob_at_training_inputs_with_an_indefinite_block_matrix():
    """Without a root of ``H`` the capacitance is ``I + H A'`` (not symmetric, by LU), still ``q x q``."""
    from bma_gp.kernels.sum_prediction_strategy import _root_of_block, as_sum

    model, x, y = _indefinite_block_mean_model()
    n = x.shape[0]
    with torch.no_grad():
        assert _root_of_block(as_sum(model.covar_module(x).evaluate_kernel()), 0, torch.float64) is None
    with torch.no_grad(), closed_form(n):
        pred = model.likelihood(model(x))
        covar = pred.lazy_covariance_matrix
        assert type(covar).__name__ == "TrainingPosteriorLinearOperator" and not covar.psd
        log_prob = pred.log_prob(y)
    with torch.no_grad():
        expected = dense_log_prob(dense_reference(model), x, y)
    torch.testing.assert_close(log_prob, expected, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    "name, where", [("BlockMeanKernel", "new"), ("crossed GroupKernels", "new"), ("crossed GroupKernels", "train")]
)
def test_log_prob_gradients_match_dense(name, where):
    """Gradients of the joint ``log_prob`` with respect to every hyperparameter, and to the new inputs' continuous
    columns for a block mean kernel, equal the dense path's; also after a ``log_prob`` of the same distribution
    without gradients (whose factor, kept, has no graph: it is made again)."""
    model = model_of(name)
    x, y, xt, yt = data()
    at, target = (xt, yt) if where == "new" else (x, y)
    reference = dense_reference(model)
    with gpytorch.settings.detach_test_caches(False):
        inputs = at.clone().requires_grad_(where == "new")
        dense_log_prob(reference, inputs, target).backward()
        expected = [p.grad for p in reference.parameters()] + [inputs.grad]
        inputs = at.clone().requires_grad_(where == "new")
        with closed_form(T + 1 if where == "new" else N):
            pred = model.likelihood(model(inputs))
            with torch.no_grad():
                before = pred.log_prob(target)
            log_prob = pred.log_prob(target)
            log_prob.backward()
    got = [p.grad for p in model.parameters()] + [inputs.grad]
    torch.testing.assert_close(log_prob.detach(), before, rtol=1e-12, atol=0)
    assert len(got) == len(expected)
    for grad, ref in zip(got, expected):
        if ref is None:
            assert grad is None or not bool(grad.any())
            continue
        assert grad is not None
        torch.testing.assert_close(grad, ref, rtol=1e-7, atol=1e-9)
    if name == "BlockMeanKernel":
        assert bool(expected[-1].abs().sum() > 0)  # the new inputs' gradient is there to compare


# ---------------------------------------------------------------------------- limits and the dense fallback
def test_joint_log_prob_past_max_capacitance_size_raises():
    model = model_of("crossed GroupKernels")
    x, y, xt, yt = data()
    with torch.no_grad(), closed_form(T + 1), bma_gp.settings.max_capacitance_size(T - 1):
        pred = model.likelihood(model(xt))
        assert bool(torch.isfinite(pred.variance).all())  # the marginals need no factorisation
        with pytest.raises(ValueError, match=rf"{T} x {T} predictive covariance.*max_capacitance_size = {T - 1}"):
            pred.log_prob(yt)
        with pytest.raises(ValueError, match="per-point densities"):
            pred.lazy_covariance_matrix.solve(yt)
    with torch.no_grad(), closed_form(N), bma_gp.settings.max_capacitance_size(10):  # q = 7 + 4 = 11 columns
        pred = model.likelihood(model(x))
        with pytest.raises(ValueError, match="11 x 11 matrix.*max_capacitance_size = 10"):
            pred.log_prob(y)


def test_log_prob_without_noise_at_training_inputs_warns_and_is_dense():
    """``model(train_x)`` without the likelihood's noise: diag(s) with s >= 0 (SGPR's correction), no Woodbury;
    the dense n x n factorisation, said in a warning, with the numbers of dense algebra; past
    ``max_capacitance_size`` a ``ValueError``."""
    model = model_of("SGPR + GroupKernel")
    x, y, _, _ = data()
    with torch.no_grad(), closed_forms_only(N + 1), gpytorch.settings.max_cholesky_size(SMALL_CHOLESKY):
        pred = model(x)
        covar = pred.lazy_covariance_matrix
        assert type(covar).__name__ == "TrainingPosteriorLinearOperator" and covar.diag_kind != "positive"
        target = pred.mean + 0.01 * torch.randn(N, dtype=torch.float64)
        with pytest.warns(ClosedFormFallbackWarning, match=rf"dense {N} x {N} matrix, O\(n\^3\)"):
            log_prob = pred.log_prob(target)
        dense = covar.to_dense()
        with bma_gp.settings.max_capacitance_size(N - 1), pytest.raises(ValueError, match="max_capacitance_size"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ClosedFormFallbackWarning)
                model(x).log_prob(target)
    expected = torch.distributions.MultivariateNormal(pred.mean, dense).log_prob(target)
    torch.testing.assert_close(log_prob, expected, rtol=1e-8, atol=1e-6)


def test_guard_sees_the_factorisation():
    """The check the tests above rely on: the ``t x t`` factorisation is refused by ``closed_forms_only(t)``."""
    model = model_of("GroupKernel")
    _, _, xt, yt = data()
    with torch.no_grad(), closed_forms_only(T), gpytorch.settings.max_cholesky_size(SMALL_CHOLESKY):
        pred = model.likelihood(model(xt))
        with pytest.raises(ForbiddenPath, match=rf"cholesky_ex on a \({T}, {T}\) matrix"):
            pred.log_prob(yt)


# ---------------------------------------------------------------------------- indexed distributions
@pytest.mark.parametrize(
    "name, where",  # (a single group kernel at its training inputs is one block mean operator: its own closed forms)
    [("GroupKernel", "new"), ("crossed GroupKernels", "new"), ("crossed GroupKernels", "train")]
    + [("SGPR + GroupKernel", "new"), ("SGPR + GroupKernel", "train")],
)
def test_log_prob_of_an_indexed_distribution_is_exact(name, where):
    """``pred[..., :m]`` and ``pred[..., idx]``: linear_operator's indexed (interpolated) operator took CG and
    stochastic Lanczos past ``max_cholesky_size``, 0.45-1 nat off at 1500 points; the submatrix is now factorised
    exactly as the whole covariance is."""
    model = model_of(name)
    x, y, xt, yt = data()
    at, target = (xt, yt) if where == "new" else (x, y)
    idx = torch.tensor([5, 0, 17, 3, 11, 2, 8, 13, 21, 1, 9, 12, 4, 6])  # unsorted positions, more than 10 of them
    with torch.no_grad():
        reference = dense_reference(model)
        mean, dense = dense_prediction(reference, at)
    with torch.no_grad(), closed_form(len(at) + 1):
        pred = model.likelihood(model(at))
        for index in (slice(None, 20), idx):
            part = pred[..., index]
            assert type(part.lazy_covariance_matrix).__name__ in ("_DenseSubmatrix", "_PredictiveDifference")
            positions = torch.arange(len(at))[index]
            expected = torch.distributions.MultivariateNormal(mean[positions], dense[positions][:, positions])
            torch.testing.assert_close(part.log_prob(target[positions]), expected.log_prob(target[positions].double()))
            torch.testing.assert_close(part.variance, dense[positions, positions])
            sub = part.lazy_covariance_matrix
            rhs = torch.randn(len(positions), 2, dtype=torch.float64)
            torch.testing.assert_close(sub @ rhs, dense[positions][:, positions] @ rhs)
            assert_solves_match(sub.solve(rhs), sub.logdet(), dense[positions][:, positions], rhs, torch.float64)


def test_indexed_covariance_rows_and_columns_that_differ_refuse_solves():
    model = model_of("crossed GroupKernels")
    _, _, xt, _ = data()
    with torch.no_grad():
        covar = model.likelihood(model(xt)).lazy_covariance_matrix
        reference = covar.to_dense()
        block = covar[..., :5, 3:12]
        assert block.shape == (5, 9)
        torch.testing.assert_close(block.to_dense(), reference[:5, 3:12])
        torch.testing.assert_close(block.mT @ torch.ones(5, dtype=torch.float64), reference[:5, 3:12].mT.sum(-1))
        square = covar[..., :6, 1:7]
        with pytest.raises(ValueError, match="only the same rows as columns"):
            square.solve(torch.ones(6, 1, dtype=torch.float64))


def test_gradient_of_an_indexed_log_prob_matches_dense():
    model = model_of("crossed GroupKernels")
    _, _, xt, yt = data()
    idx = torch.tensor([4, 1, 15, 7, 22, 9, 0, 11, 3, 18, 26, 5])
    reference = dense_reference(model)
    with gpytorch.settings.detach_test_caches(False):  # as the unindexed gradients' test
        with closed_form(T + 1):
            model.likelihood(model(xt))[..., idx].log_prob(yt[idx]).backward()
        with dense_and_quiet():
            reference.likelihood(reference(xt))[..., idx].log_prob(yt[idx]).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name)


# ---------------------------------------------------------------------------- the graph of each call
def _single_group_model():
    x, y, _, _ = data()
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 0.05
    return x, y, GP(x, y, likelihood, GroupKernel(7, active_dims=[2])).double().eval()


def _gradients(model, x, y):
    """The gradients of ``log p(y)`` at ``x``, in the order of the parameters (None where there is none)."""
    model.zero_grad()
    model.likelihood(model(x)).log_prob(y).backward()
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _exact_posterior_variance(model, x):
    """``diag(K - K (K + D)^{-1} K)`` at the training inputs, densely, with the graph of every parameter."""
    K = DenseKernel(model.covar_module)(x, x).to_dense()
    prior = gpytorch.distributions.MultivariateNormal(torch.zeros(len(x), dtype=x.dtype), DenseLinearOperator(K))
    N = model.likelihood(prior, x).covariance_matrix
    return (K - K @ torch.linalg.solve(N, K)).diagonal()


@pytest.mark.parametrize("likelihood", ["gaussian", "fixed noise", "group noise"])
@pytest.mark.parametrize("detach", [True, False])
def test_posterior_at_training_inputs_has_each_calls_graph(detach, likelihood):
    """A single group kernel at its training inputs: the noisy training covariance the strategy kept carried the
    graph of its first call, so the gradients depended on the calls before (after a first call under ``no_grad`` the
    kernel's gradient was 151, after a first call with gradients 4.1, and a second such call raised "backward
    through the graph a second time"; a per-point noise folded into the block offsets under ``no_grad`` lost its
    gradient). Now every call gives the gradients of the exact posterior covariance."""
    x, y, model = _single_group_model()
    if likelihood == "fixed noise":
        model.likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(
            noise=torch.full((N,), 0.2, dtype=torch.float64), learn_additional_noise=True
        ).double()
    elif likelihood == "group noise":
        model.likelihood = bma_gp.GroupGaussianLikelihood(7, group_dim=2, train_inputs=x).double()
    model.eval()
    params = list(model.parameters())

    def variance_gradients(first_without_grad: bool):
        model.prediction_strategy = None
        if first_without_grad:
            with torch.no_grad():
                _ = model(x).variance
        grads = torch.autograd.grad(model(x).variance.sum(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]

    with gpytorch.settings.detach_test_caches(detach), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.autograd.grad(_exact_posterior_variance(model, x).sum(), params, allow_unused=True)
        expected = [torch.zeros_like(p) if g is None else g for g, p in zip(expected, params)]
        runs = [variance_gradients(False), variance_gradients(True)]
        runs.append(torch.autograd.grad(model(x).variance.sum(), params, allow_unused=True))  # a second call
    assert sum(bool(g.abs().sum() > 0) for g in expected) >= 2  # the kernel's variance and the noise
    for got in runs:
        for grad, ref in zip(got, expected):
            grad = torch.zeros_like(ref) if grad is None else grad
            torch.testing.assert_close(grad, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("where", ["new", "train"])
@pytest.mark.parametrize("name", ["GroupKernel", "crossed GroupKernels", "SGPR + GroupKernel"])
def test_predictive_covariances_and_their_submatrices_convert_and_reshape(name, where):
    """``.to(torch.float32)`` cast the one-hot columns held among the arguments to floats (index_add then raised),
    and linear_operator's generic unsqueeze gave a submatrix's positions a batch dimension."""
    model = model_of(name)
    x, _, xt, _ = data()
    with torch.no_grad():
        covar = model.likelihood(model(xt if where == "new" else x)).lazy_covariance_matrix
        dense = covar.to_dense()
        sub, ref = covar[..., :10, :10], dense[:10, :10]
        cases = {
            "to(float32)": (covar.to(torch.float32), dense),
            "sub.to(float32)": (sub.to(torch.float32), ref),
            "sub.unsqueeze(0)": (sub.unsqueeze(0), ref.unsqueeze(0)),
            "sub[None]": (sub[None], ref[None]),
            "sub.expand": (sub.expand(3, 10, 10), ref.expand(3, 10, 10)),
            "sub.mT": (sub.mT, ref.mT),
            "sub[2:5, 2:5]": (sub[2:5, 2:5], ref[2:5, 2:5]),
            "positions twice": (covar[torch.tensor([3, 1]), :][:, torch.tensor([3, 1])], dense[[3, 1]][:, [3, 1]]),
        }
        for case, (op, expected) in cases.items():
            got = op.to_dense()
            assert got.shape == expected.shape, case
            tolerance = dict(rtol=1e-5, atol=1e-6) if got.dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(got.double(), expected, **tolerance, msg=case)


def test_noise_added_after_indexing_keeps_the_exact_solves():
    """``likelihood(latent[..., idx])``: the noise added to an indexed latent covariance gave linear_operator's
    ``AddedDiagLinearOperator`` (CG and Lanczos, 3.3 nats off at 1400 points)."""
    model = model_of("crossed GroupKernels")
    _, _, xt, yt = data()
    idx = torch.tensor([7, 2, 19, 4, 11, 0, 23, 15, 9, 28, 13, 6])
    with torch.no_grad():
        reference = dense_reference(model)
        mean, dense = dense_prediction(reference, xt)
        expected = torch.distributions.MultivariateNormal(mean[idx], dense[idx][:, idx]).log_prob(yt[idx])
    with torch.no_grad(), closed_form(T + 1):
        latent = model(xt)
        for part in (model.likelihood(latent[..., idx]), model.likelihood(latent)[..., idx]):
            assert type(part.lazy_covariance_matrix).__name__ == "_DenseSubmatrix"
            torch.testing.assert_close(part.log_prob(yt[idx]), expected)
            torch.testing.assert_close(part.variance, dense[idx, idx])


def test_batch_entry_and_rows_index_keeps_the_exact_solves():
    """``pred[1, :m]`` of a batch model: a batch index beside the rows' gave linear_operator's interpolated operator
    (CG and Lanczos, 1.55 nats off at 1400 points)."""
    model = model_of("crossed GroupKernels", batch=True)
    _, _, xt, yt = data()
    with torch.no_grad():
        mean, dense = dense_prediction(dense_reference(model), xt)
    with torch.no_grad(), closed_form(T + 1):
        pred = model.likelihood(model(xt))
        for entry in (0, 1):
            part = pred[entry, :20]
            assert type(part.lazy_covariance_matrix).__name__ == "_DenseSubmatrix"
            expected = torch.distributions.MultivariateNormal(mean[entry, :20], dense[entry, :20, :20])
            torch.testing.assert_close(part.log_prob(yt[:20]), expected.log_prob(yt[:20]))
