"""Audit: GPyTorch's and linear_operator's settings around the package's kernels composed as a GPyTorch user builds
them (``GroupKernel`` sums with ``GroupGaussianLikelihood``, ``ChunkedInducingPointKernel`` plus a group or block
mean kernel, ``ScaleKernel`` / ``AdditiveKernel`` nesting). Each model trains one step and predicts under the
setting, inside :func:`closed_forms_only` with :class:`~bma_gp.ClosedFormFallbackWarning` an error, and gives the
numbers it gives without the setting (or GPyTorch's dense path's, where the setting changes them).

* Under ``observation_nan_policy("mask")`` (also ``"fill"``) the kernel-sum strategy left the posterior covariance
  to GPyTorch: at the training inputs a dense ``n x n`` matrix, sampled by a dense Cholesky (Lanczos past
  ``max_cholesky_size``), and at new inputs the dense ``t x n`` cross covariance, both without a word. The
  covariance does not depend on the targets (GPyTorch's, too, conditions on all training points): it is now the
  closed form under every policy, the mean GPyTorch's from the observed targets.
* Under ``ciq_samples(True)`` every draw (prior, likelihood, posterior) ran linear_operator's contour integral
  quadrature, Lanczos and MINRES, silently; the draws now take the closed-form root whatever the setting.
"""

from __future__ import annotations

import contextlib
import warnings

import gpytorch
import linear_operator
import pytest
import torch
from gpytorch.kernels import AdditiveKernel, RBFKernel, ScaleKernel

from bma_gp import (
    BlockMeanKernel,
    ChunkedInducingPointKernel,
    ClosedFormFallbackWarning,
    GroupGaussianLikelihood,
    GroupKernel,
    Partition,
)
from closed_form_guard import closed_forms_only
from gp_reference import GP, dense_copy, grouped_data

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:The input matches the stored training data"),
]

DTYPE = torch.float64
N = 60


def data():
    """Inputs ``(x0, x1, group id)`` (5 ids of 7 levels in training), targets and test inputs with a new id (6)."""
    inputs, y, xt, _ = grouped_data(n=N, dtype=DTYPE)
    return inputs, y, xt


def _gaussian(inputs):
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 0.05
    return likelihood


def _per_group(inputs):
    return GroupGaussianLikelihood(7, group_dim=2, train_inputs=inputs)


def _sgpr(likelihood):
    inducing = torch.linspace(-2, 2, 5, dtype=DTYPE).unsqueeze(-1)
    return ChunkedInducingPointKernel(ScaleKernel(RBFKernel()), inducing, likelihood, active_dims=[0])


def _block_mean(inputs):
    return BlockMeanKernel(
        ScaleKernel(RBFKernel(active_dims=[0, 1])), inputs, Partition.from_labels(torch.arange(N) % 6)
    )


MODELS = {
    "GroupKernel + ScaleKernel(GroupKernel), GroupGaussianLikelihood": (
        _per_group,
        lambda inputs, likelihood: (
            GroupKernel(7, active_dims=[2]) + ScaleKernel(GroupKernel(7, per_group_variance=True, active_dims=[2]))
        ),
    ),
    "ChunkedInducingPointKernel + GroupKernel, GroupGaussianLikelihood": (
        _per_group,
        lambda inputs, likelihood: _sgpr(likelihood) + GroupKernel(7, active_dims=[2]),
    ),
    "ChunkedInducingPointKernel + BlockMeanKernel": (
        _gaussian,
        lambda inputs, likelihood: _sgpr(likelihood) + _block_mean(inputs),
    ),
    "ScaleKernel(AdditiveKernel(GroupKernel, ScaleKernel(BlockMeanKernel)))": (
        _gaussian,
        lambda inputs, likelihood: ScaleKernel(
            AdditiveKernel(GroupKernel(7, active_dims=[2]), ScaleKernel(_block_mean(inputs)))
        ),
    ),
}


def model_of(name: str, y: torch.Tensor | None = None) -> GP:
    inputs, y0, _ = data()
    make_likelihood, make_kernel = MODELS[name]
    likelihood = make_likelihood(inputs)
    return GP(inputs, y0 if y is None else y, likelihood, make_kernel(inputs, likelihood)).to(DTYPE)


@contextlib.contextmanager
def closed_form_and_silent():
    with closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        yield


@contextlib.contextmanager
def dense_and_quiet():
    """For the dense reference: GPyTorch's Cholesky path, whose solves and roots warn."""
    with gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)
        yield


# ---------------------------------------------------------------------------- 1. observation_nan_policy
@pytest.mark.parametrize("name", list(MODELS))
def test_masked_targets_keep_the_posterior_covariance_closed_form(name):
    inputs, y, xt = data()
    y = y.clone()
    y[[3, 17, 40]] = float("nan")
    model = model_of(name, y)
    model.eval()
    reference = dense_copy(model)  # GPyTorch's dense path: the mean from the observed targets, the covariance
    reference.eval()  # conditioned on all training points
    for x in (inputs, xt):
        with torch.no_grad(), gpytorch.settings.observation_nan_policy("mask"):
            with closed_form_and_silent():  # at the training inputs: a dense n x n Cholesky for the draws
                pred = model(x)
                mean, covar = pred.mean, pred.covariance_matrix
                draws = model.likelihood(pred, x).rsample(torch.Size([2, 3]))
            with dense_and_quiet():
                ref = reference(x)
                ref_mean, ref_covar = ref.mean, ref.covariance_matrix
        assert draws.shape == (2, 3, x.shape[0]) and bool(torch.isfinite(draws).all())
        assert bool(torch.isfinite(mean).all())
        torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(covar, ref_covar, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------- 2. ciq_samples
def _draws(model: GP, x: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(0)
    pred = model(x)
    return [pred.rsample(torch.Size([2])), model.likelihood(pred, x).rsample(torch.Size([2, 3]))]


@pytest.mark.parametrize("name", list(MODELS))
def test_ciq_samples_draw_through_the_closed_form_root(name):
    """``gpytorch.settings.ciq_samples(True)`` asks linear_operator for draws by contour integral quadrature (Lanczos
    and MINRES on the operator's products), an approximation of the draws the closed-form root gives exactly. Every
    draw of these models ran it, silently: the prior's and the likelihood's in training, the posterior's at the
    training and at new inputs. They now take the root whatever the setting: the same draws as without it."""
    inputs, _, xt = data()
    model = model_of(name)
    for mode, x in (("train", inputs), ("eval", inputs), ("eval", xt)):
        model.train(mode == "train")
        with torch.no_grad():
            expected = _draws(model, x)
            with gpytorch.settings.ciq_samples(True), closed_form_and_silent():
                got = _draws(model, x)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- 3. settings that change nothing
_SETTINGS = {
    "cholesky_max_tries(0)": lambda: gpytorch.settings.cholesky_max_tries(0),
    "fast_computations(covar_root_decomposition=False)": lambda: linear_operator.settings.fast_computations(
        covar_root_decomposition=False
    ),
    "fast_computations(solves=False)": lambda: linear_operator.settings.fast_computations(solves=False),
    "detach_test_caches(False)": lambda: gpytorch.settings.detach_test_caches(False),
    "trace_mode": lambda: gpytorch.settings.trace_mode(True),
    "num_trace_samples(3)": lambda: gpytorch.settings.num_trace_samples(3),
    "max_eager_kernel_size(0)": lambda: gpytorch.settings.max_eager_kernel_size(0),
    "max_eager_kernel_size(10**6)": lambda: gpytorch.settings.max_eager_kernel_size(10**6),
    "use_toeplitz(False)": lambda: gpytorch.settings.use_toeplitz(False),
    "memory_efficient": lambda: gpytorch.settings.memory_efficient(True),
    "fast_pred_samples + max_cholesky_size(0)": lambda: _both(
        gpytorch.settings.fast_pred_samples(True), gpytorch.settings.max_cholesky_size(0)
    ),
}


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def _step_and_predict(model: GP, setting) -> dict[str, torch.Tensor]:
    inputs, y, xt = data()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    out = {}
    with setting():
        loss = -mll(model(inputs), y)
        loss.backward()
        out["loss"] = loss.detach()
        out["grads"] = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        model.eval()
        with torch.no_grad():
            for key, x in (("new", xt), ("train", inputs)):
                pred = model(x)
                out[f"{key} mean"], out[f"{key} variance"] = pred.mean, pred.variance
                torch.manual_seed(0)
                draws = model.likelihood(pred, x).rsample(torch.Size([2, 3]))
                assert draws.shape == (2, 3, x.shape[0]) and bool(torch.isfinite(draws).all())
    return out


@pytest.mark.parametrize("setting", list(_SETTINGS))
@pytest.mark.parametrize(
    "name",
    [
        "GroupKernel + ScaleKernel(GroupKernel), GroupGaussianLikelihood",
        "ScaleKernel(AdditiveKernel(GroupKernel, ScaleKernel(BlockMeanKernel)))",
    ],
)
def test_settings_change_neither_path_nor_values(name, setting):
    expected = _step_and_predict(model_of(name), contextlib.nullcontext)
    with closed_form_and_silent():
        got = _step_and_predict(model_of(name), _SETTINGS[setting])
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-11, msg=key)


@pytest.mark.parametrize("name", list(MODELS))
def test_prior_mode_predicts_the_prior_in_closed_form(name):
    """``prior_mode(True)`` makes an eval-mode model return its prior: the kernel's own covariance, at new inputs
    and at the training inputs, whose draws (the likelihood's too) stay closed form for the group kernels."""
    inputs, _, xt = data()
    model = model_of(name)
    model.eval()
    reference = dense_copy(model)
    reference.eval()
    with torch.no_grad(), gpytorch.settings.prior_mode(True):
        for x in (inputs, xt):
            pred, ref = model(x), reference(x)
            torch.testing.assert_close(pred.mean, ref.mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(pred.covariance_matrix, ref.covariance_matrix, rtol=1e-12, atol=1e-12)
        with closed_form_and_silent():  # at new inputs a block mean kernel's prior is the base kernel's, dense
            assert model.likelihood(model(inputs), inputs).rsample(torch.Size([2])).shape == (2, N)


@pytest.mark.parametrize(
    "setting", ["ciq_samples", "fast_pred_samples", "fast_pred_var", "observation_nan_policy('mask')"]
)
@pytest.mark.parametrize(
    "name",
    ["GroupKernel + ScaleKernel(GroupKernel), GroupGaussianLikelihood", "ChunkedInducingPointKernel + BlockMeanKernel"],
)
def test_fantasy_model_under_sampling_settings(name, setting):
    """A fantasy model's prediction and draws at new inputs and at all its training points, under the settings that
    change how GPyTorch draws or predicts: closed form, and the numbers of GPyTorch's dense path."""
    inputs, y, xt = data()
    if setting.startswith("observation"):
        y = y.clone()
        y[[3, 17]] = float("nan")
    contexts = {
        "ciq_samples": lambda: gpytorch.settings.ciq_samples(True),
        "fast_pred_samples": lambda: gpytorch.settings.fast_pred_samples(True),
        "fast_pred_var": lambda: gpytorch.settings.fast_pred_var(True),
        "observation_nan_policy('mask')": lambda: gpytorch.settings.observation_nan_policy("mask"),
    }
    fantasy_x, fantasy_y = xt[:3], torch.tensor([0.1, -0.2, 0.3], dtype=DTYPE)
    model = model_of(name, y)
    model.eval()
    reference = dense_copy(model)
    reference.eval()
    results = []
    for m, guard in ((model, closed_form_and_silent), (reference, dense_and_quiet)):
        with torch.no_grad(), contexts[setting](), guard():
            m(xt)  # the caches the fantasy model is built from
            fantasy = m.get_fantasy_model(fantasy_x, fantasy_y)
            values = []
            for x in (xt, torch.cat([inputs, fantasy_x])):
                pred = fantasy(x)
                values += [pred.mean, pred.variance]
                draws = fantasy.likelihood(pred, x).rsample(torch.Size([2]))
                assert draws.shape == (2, x.shape[0]) and bool(torch.isfinite(draws).all())
            results.append(values)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
