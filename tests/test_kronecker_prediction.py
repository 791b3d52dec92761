"""Closed-form prediction of ``MultitaskKernel(BlockMeanKernel or GroupKernel)`` models under a
``MultitaskGaussianLikelihood`` of any rank, ``fast_pred_var`` (LOVE) included (session 29).

GPyTorch gives these models its ``DefaultPredictionStrategy``, which under ``fast_pred_var`` formed the ``n t x n t``
inverse root of the training covariance densely (``(n t)^2`` memory: +0.24 GB at ``n = 2000``, +0.98 GB at
``n = 5000``, ``t = 2``), and without it the ``n_* t x n t`` cross covariance.
:class:`~bma_gp.kernels.kronecker_prediction_strategy.KroneckerPredictionStrategy` predicts at new inputs from the
``k t x k t`` core of the closed form. Each test failed on the code before."""

from __future__ import annotations

import contextlib
import textwrap
import warnings

import gpytorch
import pytest
import torch

from bma_gp import ClosedFormFallbackWarning
from bma_gp._kronecker import KroneckerBlockMean
from closed_form_guard import closed_forms_only
from kronecker_reference import MULTITASK_MODEL_SOURCE, dense_posterior, multitask_model
from largest_tensor import LargestTensor
from peak_memory import peak_memory_increase

pytestmark = pytest.mark.usefixtures("one_thread")

N = 60  # training points: 8 groups, one a singleton


def _model(kind: str, rank: int, tasks: int, seed: int = 0):
    """A multitask model (:func:`kronecker_reference.multitask_model`; a ``GroupKernel`` of 9 groups, one of them
    missing from the data) with ``MultitaskGaussianLikelihood(rank)``, and 9 new points: the first training inputs
    moved, the last one of the ``GroupKernel``'s unseen group."""
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=tasks, rank=rank).double()
    model, x, y = multitask_model(kind, tasks, likelihood, seed, n=N, num_groups=9)
    xt = x[:9] + torch.tensor([0.05, 0.0], dtype=x.dtype)
    if kind == "group":
        xt[-1, 1] = 8  # a group the training data lack: its cross covariance row is 0
    return model, x, y, xt


def _noise(model, points: int) -> torch.Tensor:
    """The likelihood's dense ``points t x points t`` noise covariance."""
    return model.likelihood._shaped_noise_covar((points, points)).to_dense().detach()


def _counting(monkeypatch) -> dict[str, int]:
    """Count the closed form's factorisations and solves of the training covariance."""
    calls = {"factors": 0, "solve": 0}
    for name in calls:
        original = getattr(KroneckerBlockMean, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(KroneckerBlockMean, name, counted)
    return calls


@contextlib.contextmanager
def _closed_prediction(fast: bool):
    """Predictions without gradients under ``fast_pred_var(fast)``, where CG, Lanczos, a dense factorisation of ``N``
    rows or more and a ``ClosedFormFallbackWarning`` raise; yields the tracker of the largest tensor made."""
    with (
        torch.no_grad(),
        gpytorch.settings.fast_pred_var(fast),
        closed_forms_only(N),
        warnings.catch_warnings(),
        LargestTensor(storage=True) as largest,
    ):
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        yield largest


@pytest.mark.parametrize("fast", [True, False], ids=["fast_pred_var", "exact"])
@pytest.mark.parametrize("tasks", [2, 3])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("kind", ["block_mean", "group"])
def test_new_inputs_match_dense_without_training_sized_matrices(kind, rank, tasks, fast, monkeypatch):
    """Means, variances, the covariance at the new points and ``likelihood(model(xt))`` equal the dense posterior's
    (1e-10 relative), with no matrix larger than the base kernel's ``n_* x n`` cross covariance, no dense
    factorisation of size ``n``, CG or Lanczos, and no warning; a second call reuses the caches (no factorisation or
    solve of the training covariance). Before: ``fast_pred_var`` formed the ``n t x n t`` inverse root, and the exact
    path the ``n_* t x n t`` cross covariance."""
    model, x, y, xt = _model(kind, rank, tasks)
    with torch.no_grad():
        want_mean, want_covar = dense_posterior(model, x, y, xt)
        other = xt[:4] + torch.tensor([0.1, 0.0], dtype=x.dtype)
        want_other, other_covar = dense_posterior(model, x, y, other)
    model.eval()
    with torch.no_grad(), gpytorch.settings.skip_posterior_variances():
        model(xt).mean  # noqa: B018  (the strategy and its training covariance, built outside the measurement)
    calls = _counting(monkeypatch)
    with _closed_prediction(fast) as largest:
        pred = model(xt)
        mean, variance, covar = pred.mean.reshape(-1), pred.variance.reshape(-1), pred.covariance_matrix
        noisy = model.likelihood(pred)
        noisy_variance, noisy_covar = noisy.variance.reshape(-1), noisy.covariance_matrix
        first = dict(calls)
        again = model(other)
        again_mean, again_variance = again.mean.reshape(-1), again.variance.reshape(-1)
    scale = want_covar.abs().max()
    assert torch.allclose(mean, want_mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(covar, want_covar, rtol=1e-10, atol=1e-12 * scale)
    assert torch.allclose(variance, want_covar.diagonal(), rtol=1e-10, atol=1e-12 * scale)
    want_noisy = want_covar + _noise(model, xt.shape[0])
    assert torch.allclose(noisy_covar, want_noisy, rtol=1e-10, atol=1e-12 * scale)
    assert torch.allclose(noisy_variance, want_noisy.diagonal(), rtol=1e-10, atol=1e-12 * scale)
    assert torch.allclose(again_mean, want_other, rtol=1e-10, atol=1e-12)
    assert torch.allclose(again_variance, other_covar.diagonal(), rtol=1e-10, atol=1e-12 * scale)
    assert first["factors"] >= 1  # the core's factor, once
    assert calls == first, (first, calls)  # the second call: the caches only
    # the base kernel's 9 x n cross covariance, or the 9 t x 9 t predictive covariance, is the largest matrix
    # (GPyTorch's: the n t x n t inverse root, or the 9 t x n t cross covariance of the tasks)
    bound = max(xt.shape[0] * N, (xt.shape[0] * tasks) ** 2)
    assert largest.largest <= bound, (largest.largest, largest.where)
    assert type(model.prediction_strategy).__name__ == "KroneckerPredictionStrategy"


@pytest.mark.parametrize("fast", [True, False], ids=["fast_pred_var", "exact"])
@pytest.mark.parametrize("wraps", [1, 2])
@pytest.mark.parametrize("kind", ["block_mean", "group"])
def test_scaled_multitask_kernel_predicts_in_closed_form(kind, wraps, fast):
    """``ScaleKernel(MultitaskKernel(...))`` (once or twice) takes the same closed form: it took GPyTorch's default
    strategy, whose ``fast_pred_var`` formed the ``n t x n t`` inverse root without a word (session 29's attack)."""
    model, x, y, xt = _model(kind, 1, 2)
    for i in range(wraps):
        scaled = gpytorch.kernels.ScaleKernel(model.covar_module).double()
        scaled.outputscale = 0.7 + 0.5 * i
        model.covar_module = scaled
    with torch.no_grad():
        want_mean, want_covar = dense_posterior(model, x, y, xt)
    model.eval()
    with torch.no_grad(), gpytorch.settings.skip_posterior_variances():
        model(xt).mean  # noqa: B018  (the strategy and its training covariance, built outside the measurement)
    with _closed_prediction(fast) as largest:
        pred = model(xt)
        mean, covar = pred.mean.reshape(-1), pred.covariance_matrix
    assert type(model.prediction_strategy).__name__ == "KroneckerPredictionStrategy"
    assert torch.allclose(mean, want_mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(covar, want_covar, rtol=1e-10, atol=1e-12 * want_covar.abs().max())
    assert largest.largest <= max(xt.shape[0] * N, (xt.shape[0] * 2) ** 2), (largest.largest, largest.where)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("kind", ["block_mean", "group"])
def test_scaled_multitask_kernel_trains_in_closed_form(kind, rank):
    """The training covariance of ``ScaleKernel(MultitaskKernel(...))`` plus the likelihood's noise is the Kronecker sum
    ``M (x) (c K) + I (x) D`` with its closed forms; linear_operator's ``ConstantMulLinearOperator`` of the product made
    it an ``AddedDiagLinearOperator`` / ``SumLinearOperator`` solved by CG and Lanczos without a word past
    ``max_cholesky_size`` (log-determinant 0.75 and 11 nats off at n = 300 for ranks 0 and 1)."""
    model, x, y, _ = _model(kind, rank, 2)
    model.covar_module = gpytorch.kernels.ScaleKernel(model.covar_module).double()
    model.covar_module.outputscale = 1.7
    model.train()
    covariance = model.likelihood(model(x)).lazy_covariance_matrix
    rhs = y.reshape(-1, 1)
    with gpytorch.settings.max_cholesky_size(0), closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        inv_quad, logdet = covariance.inv_quad_logdet(rhs, logdet=True)
        grads = torch.autograd.grad(inv_quad + logdet, [model.covar_module.raw_outputscale])
    dense = model.likelihood(model(x)).lazy_covariance_matrix.to_dense()  # a graph of its own
    want = (rhs * torch.linalg.solve(dense, rhs)).sum() + torch.logdet(dense)
    (want_grad,) = torch.autograd.grad(want, [model.covar_module.raw_outputscale])
    assert torch.allclose(inv_quad + logdet, want, rtol=1e-10)
    assert torch.allclose(grads[0], want_grad, rtol=1e-8)


def test_float32_model_predicts_in_the_working_precision():
    """A float32 model's predictions come from float64 caches: their error is the float32 rounding of the model's
    kernel values, not of the solves (means and variances within 1e-4 of the float64 model's dense posterior)."""
    model, x, y, xt = _model("block_mean", 1, 2)
    with torch.no_grad():
        want_mean, want_covar = dense_posterior(model, x, y, xt)
    model = model.float()
    model.eval()
    with torch.no_grad(), gpytorch.settings.skip_posterior_variances():
        model(xt.float()).mean  # noqa: B018  (the strategy, built outside the measurement)
    with torch.no_grad(), gpytorch.settings.fast_pred_var(), closed_forms_only(N), LargestTensor() as largest:
        pred = model(xt.float())
        mean, variance = pred.mean.reshape(-1), pred.variance.reshape(-1)
    assert mean.dtype == torch.float32
    assert (mean.double() - want_mean).abs().max() < 1e-4 * want_mean.abs().max()
    assert ((variance.double() - want_covar.diagonal()).abs() / want_covar.diagonal()).max() < 1e-4
    assert largest.largest <= max(xt.shape[0] * N, (xt.shape[0] * 2) ** 2), (largest.largest, largest.where)
    assert type(model.prediction_strategy).__name__ == "KroneckerPredictionStrategy"


def _dense_at_training_inputs(model, x, y):
    """The posterior mean and covariance at the training inputs themselves, from the dense prior ``K`` there
    (``K - K (K + noise)^{-1} K``; a ``BlockMeanKernel`` takes the points of ``cat(x, x)`` past ``n`` for new points, so
    :func:`kronecker_reference.dense_posterior` does not give it), with the graph of the model's parameters."""
    model.train()
    prior = model.covar_module(x).to_dense()
    train = prior + model.likelihood._shaped_noise_covar((N, N)).to_dense()
    residual = y.reshape(-1) - model.mean_module(x).reshape(-1)
    mean = model.mean_module(x).reshape(-1) + prior @ torch.linalg.solve(train, residual)
    return mean, prior - prior @ torch.linalg.solve(train, prior)


@pytest.mark.parametrize("fast", [True, False], ids=["fast_pred_var", "exact"])
@pytest.mark.parametrize("tasks", [2, 3])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("kind", ["block_mean", "group"])
def test_training_inputs_match_dense_in_closed_form(kind, rank, tasks, fast):
    """At the training inputs (``model(train_x)`` in eval mode) the posterior covariance is of the closed form's split:
    ``V_i`` within each block, ``Q`` on the block means. Means, variances, the covariance, ``likelihood(model(x))``
    (variances, draws through its root, ``log_prob``) equal the dense ones (1e-10), with nothing larger than ``O(n t)``
    (draws: 4 n t), no dense factorisation of size ``n``, CG or Lanczos and no warning. Before: the ``n t x n t``
    cross covariance densely, and under ``fast_pred_var`` the ``n t x n t`` inverse root."""
    model, x, y, _ = _model(kind, rank, tasks)
    with torch.no_grad():
        want_mean, want_covar = _dense_at_training_inputs(model, x, y)
        want_noisy = want_covar + _noise(model, N)
        want_log_prob = torch.distributions.MultivariateNormal(want_mean, want_noisy).log_prob(y.reshape(-1))
    model.eval()
    with torch.no_grad(), gpytorch.settings.skip_posterior_variances(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)  # "matches the training data"
        model(x).mean  # noqa: B018  (the strategy, built outside the measurement)
    base = torch.randn(4, N, tasks, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    with _closed_prediction(fast) as largest:
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
        pred = model(x)
        mean, variance = pred.mean.reshape(-1), pred.variance.reshape(-1)
        noisy = model.likelihood(pred)
        noisy_variance = noisy.variance.reshape(-1)
        draws = noisy.rsample(base_samples=base)
        log_prob = noisy.log_prob(y)
        root = noisy.lazy_covariance_matrix.root_decomposition().root
    covar = pred.lazy_covariance_matrix.to_dense()
    scale = want_covar.abs().max()
    assert torch.allclose(mean, want_mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(covar, want_covar, rtol=1e-10, atol=1e-12 * scale)
    assert torch.allclose(variance, want_covar.diagonal(), rtol=1e-10, atol=1e-12 * scale)
    assert torch.allclose(noisy_variance, want_noisy.diagonal(), rtol=1e-10, atol=1e-12 * scale)
    assert torch.allclose(log_prob, want_log_prob, rtol=1e-10)
    R = root.to_dense()
    assert torch.allclose(R @ R.mT, want_noisy, rtol=1e-10, atol=1e-12 * scale)
    want_draws = (noisy.mean.reshape(-1) + (R @ base.reshape(4, -1, 1)).squeeze(-1)).reshape(draws.shape)
    assert torch.allclose(draws, want_draws, rtol=1e-10, atol=1e-12)
    assert largest.largest <= 4 * N * tasks, (largest.largest, largest.where)
    assert type(model.prediction_strategy).__name__ == "KroneckerPredictionStrategy"


@pytest.mark.parametrize("where", ["new", "training"])
@pytest.mark.parametrize("kind", ["block_mean", "group"])
def test_gradients_match_dense(kind, where):
    """With ``detach_test_caches(False)`` the gradients of the predictive means and variances with respect to every
    hyperparameter (and to the new inputs) equal the dense posterior's (1e-9), through the closed form's caches."""
    model, x, y, xt = _model(kind, 1, 2)
    names, params = zip(*model.named_parameters())
    if where == "training":
        xt = x
        want_mean, want_covar = _dense_at_training_inputs(model, x, y)
    else:
        xt = xt.clone().requires_grad_(kind == "block_mean")
        want_mean, want_covar = dense_posterior(model, x, y, xt)
    weights = torch.randn(2, xt.shape[0] * 2, generator=torch.Generator().manual_seed(5), dtype=x.dtype)

    def loss(mean, variance):
        return (weights[0] * mean).sum() + (weights[1] * variance).sum()

    wrt = [*params, xt] if xt.requires_grad else list(params)
    want = torch.autograd.grad(loss(want_mean, want_covar.diagonal()), wrt)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
        with gpytorch.settings.detach_test_caches(False), gpytorch.settings.skip_posterior_variances():
            model(xt).mean  # noqa: B018  (the strategy, built outside the measurement)
        with (
            gpytorch.settings.detach_test_caches(False),
            gpytorch.settings.fast_pred_var(),
            closed_forms_only(N),
            LargestTensor(storage=True) as largest,
        ):
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            pred = model(xt)
            got = torch.autograd.grad(loss(pred.mean.reshape(-1), pred.variance.reshape(-1)), wrt)
    for name, a, b in zip([*names, "xt"], got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * b.abs().max()), name
    assert largest.largest <= max(xt.shape[0] * N, (xt.shape[0] * 2) ** 2), (largest.largest, largest.where)
    assert type(model.prediction_strategy).__name__ == "KroneckerPredictionStrategy"


def test_training_and_new_inputs_together_warn_under_fast_pred_var():
    """At ``cat(train_x, new_x)`` a ``BlockMeanKernel``'s test-by-training covariance is the leading rows of the joint
    covariance, neither form above: GPyTorch's strategy predicts there (exactly), and under ``fast_pred_var`` its
    dense ``n t x n t`` inverse root is announced with a :class:`~bma_gp.ClosedFormFallbackWarning` (it was silent)."""
    model, x, y, xt = _model("block_mean", 0, 2)
    model.eval()
    with torch.no_grad():
        exact = model(torch.cat([x, xt]))
        want_mean, want_variance = exact.mean, exact.variance
    model.prediction_strategy = None
    with torch.no_grad(), gpytorch.settings.fast_pred_var(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pred = model(torch.cat([x, xt]))
        mean, variance = pred.mean, pred.variance
    ours = [str(w.message) for w in caught if issubclass(w.category, ClosedFormFallbackWarning)]
    assert len(ours) == 1 and "inverse root" in ours[0] and "fast_pred_var off" in ours[0], ours
    assert torch.allclose(mean, want_mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(variance, want_variance, rtol=1e-8, atol=1e-12)


def test_fast_pred_var_memory_is_linear_in_n():
    """``fast_pred_var`` prediction at 50 new points of ``MultitaskKernel(BlockMeanKernel)`` under
    ``MultitaskGaussianLikelihood(rank=0)`` and ``rank=1`` (``t = 2``): ``O(n t)`` memory. GPyTorch's strategy formed
    the ``n t x n t`` inverse root: 0.98 GB at ``n = 5000``."""
    setup = MULTITASK_MODEL_SOURCE + textwrap.dedent("""
    def model(n, rank):
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 1, generator=g, dtype=torch.float64)
        y = torch.randn(n, 2, generator=g, dtype=torch.float64)
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, rank=rank).double()
        m = MT(x, y, lik).double()
        m.eval()
        return m, torch.rand(50, 1, generator=g, dtype=torch.float64)

    def predict(m, xt):
        with torch.no_grad(), gpytorch.settings.fast_pred_var():
            p = m(xt)
            v = m.likelihood(p).variance
        assert v.shape == (xt.shape[0], 2)

    predict(*model(300, 1))  # imports, compiled kernels
    models = [model({n}, rank) for rank in (0, 1)]
    with torch.no_grad(), gpytorch.settings.skip_posterior_variances():
        for m, xt in models:
            m(xt).mean  # the strategy: the kernel's own evaluation of the training covariance, the mean cache
    """)
    # both ranks in one process per size (the peak is the larger of the two predictions'); a child per rank and size
    # spent 20 s of the suite's time on imports
    small, large = 3000, 6000
    work = "for m, xt in models:\n    predict(m, xt)"
    peaks = [peak_memory_increase(setup.format(n=n), work) for n in (small, large)]
    per_index = (peaks[1] - peaks[0]) / (large - small)
    assert per_index < 4_000, f"{per_index:.0f} bytes per index (peaks {peaks})"
    assert peaks[1] < 50e6, f"peaks {peaks}"
