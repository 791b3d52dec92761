"""Posterior variances of sums with a dense ``B_j`` keep the accuracy of a dense Cholesky (twentieth session).

``GroupKernel(8, rank=2)`` crossed with a ``GroupKernel`` (6 x 4 levels) lost its variances at small noise (17 %
off at noise 1e-6, 53x at 1e-8): the stable form :math:`Z_* (G - \\Sigma) Z_*^\\top` was taken only where every
:math:`G_j` is diagonal, and the rest subtracted :math:`F W F^\\top`, which cancels at :math:`|G A G|`. A dense
:math:`G_j` now takes it too where :math:`F_j G_j^{-1}` is the more accurate (:math:`\\lambda_{\\min}(G_j)
\\max_a A_{aa} > 1`), term by term: a ``BlockMeanKernel``'s ill-conditioned block means keep :math:`W` beside a
grouping that is transformed.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning, GroupKernel
from bma_gp.kernels import sum_prediction_strategy as sps
from bma_gp.partition_builders import kmeans_partition
from gp_reference import GP, dense_copy
from test_sum_variance_accuracy19 import (  # noqa: F401  (_no_fallback: the autouse fixture)
    _closed,
    _dense,
    _no_fallback,
    check_variance_gradients,
    crossed_data,
)

DTYPE = torch.float64


def _likelihood(noise: float):
    likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-12))
    likelihood.noise = noise
    return likelihood


def _rank_model(noise: float, batch: tuple[int, ...] = ()):
    """``GroupKernel(8, rank=2)`` over 6 levels crossed with ``GroupKernel(6)`` over 4; test points at seen and
    unseen levels of both."""
    x, y, xs = crossed_data()
    torch.manual_seed(0)
    kernel = GroupKernel(8, rank=2, active_dims=[1], batch_shape=torch.Size(batch)) + GroupKernel(
        6, active_dims=[2], batch_shape=torch.Size(batch)
    )
    model = GP(x, y, _likelihood(noise), kernel).to(DTYPE)
    if batch:
        with torch.no_grad():
            factor = kernel.kernels[0].covar_factor
            factor.mul_(torch.linspace(0.5, 2.0, batch[0], dtype=DTYPE).view(-1, 1, 1))
    return model, x, xs


def _block_mean_model(noise: float):
    """A ``BlockMeanKernel`` (RBF block means over 20 k-means blocks: ill-conditioned) plus a grouping of 5."""
    g = torch.Generator().manual_seed(2)
    n = 400
    x = torch.rand(n, 2, generator=g, dtype=DTYPE)
    grp = torch.randint(0, 5, (n,), generator=g)
    x = torch.cat([x, grp.to(DTYPE).unsqueeze(-1)], -1)
    y = torch.sin(6 * x[:, 0]) + grp.to(DTYPE) / 5 + 0.1 * torch.randn(n, generator=g, dtype=DTYPE)
    torch.manual_seed(0)
    base = gpytorch.kernels.RBFKernel(active_dims=[0, 1])
    kernel = BlockMeanKernel(base, x, kmeans_partition(x[:, :2], 20)) + GroupKernel(5, active_dims=[2])
    model = GP(x, y, _likelihood(noise), kernel).to(DTYPE)
    xs = torch.cat([x[:5], torch.tensor([[0.3, 0.7, 1.0], [0.9, 0.1, 4.0]], dtype=DTYPE)])
    return model, x, xs


def _predict(model, ref, x, xs):
    model.eval()
    ref.eval()
    with torch.no_grad():
        post = _closed(model, xs, x.shape[0])
        got = post.mean, post.variance, post.covariance_matrix
        with gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dense reference's own fallback warnings
            want = _dense(ref, xs)
            return got, (want.mean, want.variance, want.covariance_matrix)


def _check(model, x, xs, rtol):
    (mean, var, cov), (ref_mean, ref_var, ref_cov) = _predict(model, dense_copy(model), x, xs)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, ref_var, rtol=rtol, atol=0)
    scale = ref_var.sqrt().unsqueeze(-1) * ref_var.sqrt().unsqueeze(-2)
    torch.testing.assert_close(cov / scale, ref_cov / scale, rtol=0, atol=rtol)


def _stable_terms(model):
    strategy = model.prediction_strategy
    found = sps._new_input_weight(strategy)
    assert found is not None
    return found[2]


@pytest.mark.parametrize("noise", [0.1, 1e-4, 1e-6, 1e-8])
def test_a_low_rank_grouping_crossed_with_another_at_small_noise(noise):
    """17 % off at noise 1e-6 and 53x at 1e-8 before; 4e-5 at 1e-4."""
    model, x, xs = _rank_model(noise)
    _check(model, x, xs, rtol=1e-5)
    assert _stable_terms(model) == [True, True]


def test_a_batch_of_low_rank_groupings():
    model, x, xs = _rank_model(1e-6, batch=(3,))
    _check(model, x, xs, rtol=1e-5)


def test_block_means_keep_the_weight_beside_a_transformed_grouping():
    """The block means' G is ill-conditioned (F G^-1 would lose everything): that term keeps W, the grouping's
    rows and columns are transformed, and the cross blocks between the two come from the same solve."""
    for noise in (0.1, 1e-3, 1e-6):
        model, x, xs = _block_mean_model(noise)
        _check(model, x, xs, rtol=1e-5)
        assert _stable_terms(model) == [False, True]


def test_the_weight_forms_agree_where_both_are_accurate():
    """T W T against W, transformed back (F W F^T = (F T^-1) T W T (F T^-1)^T), on a well-conditioned sum."""
    model, x, xs = _rank_model(0.5)
    model.eval()
    with torch.no_grad():
        model(xs)  # builds the strategy
        M = sps._new_input_weight(model.prediction_strategy)[0]
        sizes = M._sizes()
        W = sps._formed_weight(M)
        for stable in ([True, False], [False, True], [True, True]):
            TWT = sps._transformed_weight(M, stable)
            T = torch.block_diag(
                *[
                    M._G(t, torch.eye(k, dtype=DTYPE)) if on else torch.eye(k, dtype=DTYPE)
                    for t, (k, on) in enumerate(zip(sizes, stable))
                ]
            )
            torch.testing.assert_close(TWT, T @ W @ T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["rank", "block_mean"])
def test_variance_gradients_match_the_dense_reference(case):
    model, x, xs = _rank_model(1e-6) if case == "rank" else _block_mean_model(1e-3)
    check_variance_gradients(model, x, xs)


def test_float32_low_rank_grouping():
    model, x, xs = _rank_model(1e-3)
    ref = dense_copy(model)
    model, x, xs = model.float(), x.float(), xs.float()
    model.set_train_data(x, model.train_targets.float(), strict=False)
    (mean, var, _), (_, ref_var, _) = _predict(model, ref, x, xs.double())
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)


def test_float32_prediction_outside_the_closed_form_solves_in_the_working_precision(monkeypatch):
    """``model(cat(train_x, new_x))`` with a ``BlockMeanKernel`` in a sum (the cross covariance is not in the
    family: warned) takes GPyTorch's path with the solves in float64 (``_low_precision_family``); no test reached
    it before (a coverage trial)."""
    model, x, xs = _block_mean_model(1e-3)
    ref = dense_copy(model)
    ref.eval()
    taken = []
    real = sps.SumPredictionStrategy._low_precision_family
    monkeypatch.setattr(
        sps.SumPredictionStrategy,
        "_low_precision_family",
        lambda self: taken.append(1) or real(self),
    )
    base = gpytorch.kernels.RBFKernel(active_dims=[0, 1])
    kernel = BlockMeanKernel(base, x.float(), kmeans_partition(x[:, :2].float(), 20)) + GroupKernel(5, active_dims=[2])
    low = GP(x.float(), model.train_targets.float(), gpytorch.likelihoods.GaussianLikelihood(), kernel)
    low.load_state_dict(model.state_dict())
    low.eval()
    joint = torch.cat([x, xs[-2:]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)  # the t x n cross covariance, said in words
        post = low(joint.float())
        mean, var = post.mean.double(), post.variance.double()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref(joint)
    assert taken  # the working-precision path, not the closed form at new inputs
    sd = want.variance.sqrt()
    assert float(((mean - want.mean) / sd).abs().max()) < 1e-2
    torch.testing.assert_close(var, want.variance, rtol=5e-3, atol=0)
