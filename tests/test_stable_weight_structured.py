"""Random slopes and ``GroupKernel(k, rank=r)`` at new inputs: the stable weight in the structured form (trial 53).

Where every term of a sum takes the stable form (:func:`~bma_gp.kernels.sum_prediction_strategy._stable_terms`) and
the eliminated grouping has at most ``_DENSE_WEIGHT_MAX_ELIMINATED`` levels, the weight is :math:`G - \\Sigma` as
products (``_ImplicitWeight(M, stable=True)``). The predictive covariance refused the structured forms for it, so
the variances at ``t`` new points took ``t x q`` row chunks of :math:`F` and products with :math:`G - \\Sigma`:
:math:`O(t q)`, 162 ms for a slope over 1024 levels at 1000 new points (n = 10^5, a first prediction) against
5 ms with 1025 levels. They now come from :class:`~bma_gp.kernels.sum_prediction_strategy._Structured` with the
blocks of :math:`G - \\Sigma` (``stable=True``; 8 ms there): the products' values to rounding, and those of the path
past the threshold and of a dense Cholesky where the sum is well conditioned.
"""

from __future__ import annotations

import copy
import warnings

import gpytorch
import pytest
import torch

from bma_gp import ClosedFormFallbackWarning, GroupKernel
from bma_gp.kernels import group_kernel
from bma_gp.kernels import sum_prediction_strategy as sps
from closed_form_guard import closed_forms_only
from gp_reference import GP, dense_copy

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _no_fallback(monkeypatch):
    # GroupKernel(k, rank=r) takes its factor form (a diagonal term and a root) at every k, as past 256 groups
    monkeypatch.setattr(group_kernel, "FACTOR_DENSE_MAX_GROUPS", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        yield


def _likelihood(noise: float):
    likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-10))
    likelihood.noise = noise
    return likelihood


def _model(case: str, k: int = 40, noise: float = 0.3):
    """``(model, x, xs)``: ``k`` levels (id ``k`` spare), a covariate, a second grouping of 3 levels (id 3 spare);
    test points at training rows, at seen levels (several at one level) and at the unseen ones."""
    g = torch.Generator().manual_seed(4)
    n = 12 * k
    ids = torch.arange(n) % k
    covariate = torch.randn(n, generator=g, dtype=DTYPE)
    if case == "slope_year":
        covariate = 2000 + torch.randint(0, 20, (n,), generator=g).to(DTYPE)
    other = torch.randint(0, 3, (n,), generator=g)
    x = torch.stack([ids.to(DTYPE), covariate, other.to(DTYPE)], -1)
    effect = torch.randn(k + 1, generator=g, dtype=DTYPE)
    y = effect[ids] + 0.01 * covariate + 0.5 * torch.randn(n, generator=g, dtype=DTYPE)
    torch.manual_seed(0)
    if case in ("slope", "slope_year"):
        kernel = GroupKernel(k + 1, slope=True, active_dims=[0, 1])
    elif case == "rank":
        kernel = GroupKernel(k + 1, rank=2, active_dims=[0])
    elif case == "slope_crossed":
        kernel = GroupKernel(k + 1, slope=True, active_dims=[0, 1]) + GroupKernel(4, active_dims=[2])
    elif case == "rank_crossed":
        kernel = GroupKernel(k + 1, rank=2, active_dims=[0]) + GroupKernel(4, active_dims=[2])
    else:
        raise AssertionError(case)
    model = GP(x, y, _likelihood(noise), kernel).to(DTYPE)
    test_ids = torch.tensor([3, 3, 3, 7, k - 1, k, k, 0], dtype=DTYPE)
    shift = 2010.0 if case == "slope_year" else 0.0
    test_cov = shift + torch.randn(test_ids.shape[0], generator=g, dtype=DTYPE)
    test_other = torch.tensor([0, 1, 2, 3, 0, 1, 3, 2], dtype=DTYPE)
    xs = torch.cat([x[:3], torch.stack([test_ids, test_cov, test_other], -1)])
    return model, x, xs


CASES = ["slope", "rank", "slope_crossed", "rank_crossed"]


def _prediction(model, xs, n: int):
    """Variance, dense covariance, two entries and a product at ``xs`` in closed form (no gradients)."""
    model.eval()
    with torch.no_grad(), closed_forms_only(n), gpytorch.settings.max_cholesky_size(0):
        post = model(xs)
        op = post.lazy_covariance_matrix
        probe = torch.linspace(-1, 1, xs.shape[0], dtype=xs.dtype).unsqueeze(-1)
        return {
            "variance": post.variance.double(),
            "covariance": op.to_dense().double(),
            "entries": torch.stack([op[..., 3, 4], op[..., 3, 7]]).double(),
            "product": (op @ probe).double(),
        }


def _dense(model, xs):
    ref = dense_copy(model)
    ref.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref(xs)
        return want.variance, want.covariance_matrix


def _weight(model):
    found = sps._new_input_weight(model.prediction_strategy)
    assert found is not None
    return found[1]


def _spy(monkeypatch) -> list[str]:
    """Record the products with :math:`G - \\Sigma` and the chunked diagonal of the products path."""
    calls: list[str] = []
    matmul = sps._stable_weight_matmul
    chunked = sps.PredictiveCovarianceLinearOperator._implicit_quadratic_diagonal

    def stable_weight_matmul(M, X):
        calls.append("matmul")
        return matmul(M, X)

    def implicit_quadratic_diagonal(self):
        calls.append("chunks")
        return chunked(self)

    monkeypatch.setattr(sps, "_stable_weight_matmul", stable_weight_matmul)
    monkeypatch.setattr(
        sps.PredictiveCovarianceLinearOperator, "_implicit_quadratic_diagonal", implicit_quadratic_diagonal
    )
    return calls


def _products_only(monkeypatch) -> None:
    """The path before: no structured form for the stable weight."""
    build = sps._Structured.build

    def no_stable_build(M, blocks, t, stable=False):
        return None if stable else build(M, blocks, t, stable)

    monkeypatch.setattr(sps._Structured, "build", staticmethod(no_stable_build))


def _assert_agree(got: dict, want: dict, rtol: float) -> None:
    for name, value in got.items():
        scale = float(want[name].abs().max())
        torch.testing.assert_close(value, want[name], rtol=0, atol=rtol * scale, msg=f"{name} differs")
    torch.testing.assert_close(got["variance"], want["variance"], rtol=rtol, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_the_stable_weight_takes_the_structured_form(case, monkeypatch):
    """Variances, entries, products and the dense covariance without one product with G - Sigma (and no t x q row
    chunk): before, every one of them went through the products."""
    model, x, xs = _model(case)
    calls = _spy(monkeypatch)
    _prediction(model, xs, x.shape[0])
    W = _weight(model)
    assert isinstance(W, sps._ImplicitWeight) and W.stable
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_values_match_the_products_the_other_side_of_the_threshold_and_a_dense_cholesky(case, dtype, monkeypatch):
    model, x, xs = _model(case)
    ref_var, ref_cov = _dense(model, xs)
    low = dtype != DTYPE
    if low:
        model, x, xs = model.to(dtype), x.to(dtype), xs.to(dtype)
        model.set_train_data(x, model.train_targets.to(dtype), strict=False)
    products, past = copy.deepcopy(model), copy.deepcopy(model)
    got = _prediction(model, xs, x.shape[0])
    with monkeypatch.context() as m:
        _products_only(m)
        before = _prediction(products, xs, x.shape[0])
        assert isinstance(_weight(products), sps._ImplicitWeight) and _weight(products).stable
    with monkeypatch.context() as m:
        m.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)  # W as products, the structured forms of W
        m.setattr(sps, "_stable_past_threshold", lambda M: False)  # (G - Sigma there too by default: session 37)
        other = _prediction(past, xs, x.shape[0])
        assert isinstance(_weight(past), sps._ImplicitWeight) and not _weight(past).stable
    # the same values as the products (the path before), to rounding
    _assert_agree(got, before, 1e-6 if low else 1e-12)
    # and as the structured forms of W past the threshold, and a dense Cholesky in float64
    _assert_agree(got, other, 1e-5 if low else 1e-11)
    torch.testing.assert_close(got["variance"], ref_var, rtol=1e-5 if low else 1e-11, atol=0)
    scale = float(ref_cov.abs().max())
    torch.testing.assert_close(got["covariance"], ref_cov, rtol=0, atol=(1e-5 if low else 1e-11) * scale)


@pytest.mark.parametrize(("noise", "scale"), [(1e-2, 1.0), (1e-4, 1.0), (1e-4, 5.0)])
def test_a_raw_covariate_keeps_the_rounding_of_the_products(noise, scale, monkeypatch):
    """A correlated slope on calendar years (and five times that) at small noise, where the variances are only as
    accurate as the conditioning allows (against 40-digit arithmetic at noise 1e-4: 4e-5 relative for G - Sigma,
    4e-3 for F W F^T, the structured form of W past the threshold): the structured G - Sigma solves each row's
    right-hand side as the products do, so it rounds as they do (a formed per-level G_E - Delta^-1 G_E was up to
    twice as far from the exact values)."""
    model, x, xs = _model("slope_year", noise=noise)
    with torch.no_grad():
        x[:, 1] *= scale
        xs[:, 1] *= scale
    model.set_train_data(x, model.train_targets, strict=False)
    ref_var, _ = _dense(model, xs)
    products = copy.deepcopy(model)
    calls = _spy(monkeypatch)
    got = _prediction(model, xs, x.shape[0])
    assert calls == []
    with monkeypatch.context() as m:
        _products_only(m)
        before = _prediction(products, xs, x.shape[0])
    _assert_agree(got, before, 1e-12)


@pytest.mark.parametrize("case", ["slope", "rank"])
def test_variance_gradients_match_the_products(case, monkeypatch):
    """Gradients of ``variance.sum()`` with respect to the hyperparameters through the structured pieces."""
    model, x, xs = _model(case)
    products = copy.deepcopy(model)
    grads = []
    for twin, force in ((model, False), (products, True)):
        twin.eval()
        with monkeypatch.context() as m, gpytorch.settings.detach_test_caches(False):
            calls = _spy(m)
            if force:
                _products_only(m)
            with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
                twin(xs).variance.sum().backward()
            assert bool(calls) == force  # the structured pieces with gradients; the products for the twin
        grads.append({name: p.grad.clone() for name, p in twin.named_parameters() if p.grad is not None})
    assert len(grads[0]) >= 2 and grads[0].keys() == grads[1].keys()
    for name, value in grads[0].items():
        torch.testing.assert_close(value, grads[1][name], rtol=1e-8, atol=1e-12, msg=name)


def test_many_other_columns_keep_the_products(monkeypatch):
    """Crossed intercepts whose other grouping is wide (R^2 > q): its K G_r (R^3) and O(R^2) per variance would
    cost more than the products, which form G - Sigma once q columns have been asked for."""
    g = torch.Generator().manual_seed(5)
    n, k, k2 = 600, 40, 30
    a, b = torch.arange(n) % k, torch.randint(0, k2, (n,), generator=g)
    x = torch.stack([a.to(DTYPE), b.to(DTYPE)], -1)
    y = torch.randn(n, generator=g, dtype=DTYPE)
    kernel = GroupKernel(k + 1, active_dims=[0]) + GroupKernel(k2 + 1, active_dims=[1])
    model = GP(x, y, _likelihood(0.3), kernel).to(DTYPE)
    xs = torch.tensor([[0, 1], [5, 30], [40, 2], [5, 3], [5, 30], [1, 1], [2, 0], [40, 30]], dtype=DTYPE)
    calls = _spy(monkeypatch)
    got = _prediction(model, xs, n)
    assert isinstance(_weight(model), sps._ImplicitWeight) and _weight(model).stable
    assert "matmul" in calls
    ref_var, _ = _dense(model, xs)
    torch.testing.assert_close(got["variance"], ref_var, rtol=1e-11, atol=0)
