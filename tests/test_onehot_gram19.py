"""Draws and dense covariances at new inputs of a single ``GroupKernel`` with many levels.

The term a random intercept's prediction subtracts, ``F F^T`` with one nonzero per row of ``F`` (``_OneHotGram``),
was made dense by a product with the ``t x t`` identity, whose column sums are a ``k x t`` matrix: with 10^5 levels
one draw at 1000 points took 1.6 GB more (8 GB at 5000 points), where the variances took nothing. Products with many
columns now go through the ``t x t`` matrix."""

from __future__ import annotations

import gpytorch
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bma_gp import GroupKernel
from bma_gp.kernels.prediction_strategy import _OneHotGram
from gp_reference import GP, dense_copy

DTYPE = torch.float64


def test_one_hot_gram_dense_and_products_equal_the_explicit_matrix():
    generator = torch.Generator().manual_seed(0)
    t, k = 30, 7
    columns = torch.randint(-1, k, (t,), generator=generator)
    f = torch.randn(2, t, generator=generator, dtype=DTYPE)
    gram = _OneHotGram(f, columns, k)
    F = torch.zeros(2, t, k, dtype=DTYPE)
    rows = (columns >= 0).nonzero().squeeze(-1)
    F[:, rows, columns[rows]] = f[:, rows]
    expected = F @ F.mT
    torch.testing.assert_close(gram.to_dense(), expected, rtol=0, atol=1e-15)
    for c in (1, 3, 40):  # few columns: the column sums; many: the t x t matrix
        x = torch.randn(t, c, generator=generator, dtype=DTYPE)
        torch.testing.assert_close(gram @ x, expected @ x, rtol=1e-12, atol=1e-12)
    v = torch.randn(t, generator=generator, dtype=DTYPE)
    torch.testing.assert_close(gram @ v, expected @ v, rtol=1e-12, atol=1e-12)


def test_draws_at_new_inputs_form_no_levels_by_points_matrix():
    levels, t = 1500, 40
    ids = torch.arange(levels).repeat_interleave(2)
    X = ids.to(DTYPE).unsqueeze(-1)
    y = torch.randn(X.shape[0], generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    model = GP(X, y, gpytorch.likelihoods.GaussianLikelihood(), GroupKernel(levels + 1)).to(DTYPE).eval()
    xt = torch.cat([X[: t - 5], torch.full((5, 1), float(levels), dtype=DTYPE)])  # seen levels and a new one

    class Wide(TorchDispatchMode):
        found = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if torch.is_tensor(out) and out.dim() >= 2 and out.shape[-2] >= levels and out.shape[-1] >= t:
                Wide.found = True
            return out

    with torch.no_grad():
        _ = model(X[:3]).mean  # the caches
        pred = model(xt)
        with Wide():
            covariance = pred.covariance_matrix
            draws = pred.rsample(torch.Size([4]))
    assert not Wide.found
    assert draws.shape == (4, t)
    reference = dense_copy(model).eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6):
        expected = reference(xt).covariance_matrix
    torch.testing.assert_close(covariance, expected, rtol=1e-9, atol=1e-9)
