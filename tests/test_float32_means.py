"""float32 posterior means of group models against float64: the mean sums ``M^{-1} r``, whose entries (size
``r / noise``) cancel within each group, so both prediction strategies apply it in the working precision.

Before: a random intercept's group means were off by up to 33 posterior standard deviations in float32 (the
single-grouping strategy), and the training-input means of crossed groupings by 0.12 sd (the sum strategy)."""

from __future__ import annotations

import gpytorch
import pytest
import torch

from bma_gp import GroupKernel

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, kernel):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _model(kind: str, dtype: torch.dtype):
    """``y = 10 + u[g] (+ w[h]) + e`` with small noise, so that ``M^{-1} r`` is large and cancels per group."""
    gen = torch.Generator().manual_seed(0)
    n, k1, k2 = 2000, 40, 7
    g = torch.randint(0, k1, (n,), generator=gen)
    h = torch.randint(0, k2, (n,), generator=gen)
    y = 10 + torch.randn(k1, generator=gen, dtype=torch.float64)[g] + 0.03 * torch.randn(n, generator=gen).double()
    if kind == "intercept":
        x = g.double().unsqueeze(-1)
        kernel = GroupKernel(k1)
    elif kind == "scaled_intercept":
        x = g.double().unsqueeze(-1)
        kernel = gpytorch.kernels.ScaleKernel(GroupKernel(k1))
    else:  # two crossed groupings: the sum strategy
        y = y + torch.randn(k2, generator=gen, dtype=torch.float64)[h]
        x = torch.stack([g.double(), h.double()], -1)
        kernel = GroupKernel(k1, active_dims=[0]) + GroupKernel(k2, active_dims=[1])
    model = _GP(x.to(dtype), y.to(dtype), kernel).to(dtype)
    with torch.no_grad():
        model.likelihood.noise = 1e-3
        model.mean_module.constant.fill_(10.0)
    return model.eval(), x.to(dtype)


@pytest.mark.parametrize("kind", ["intercept", "scaled_intercept", "crossed"])
def test_float32_means_at_training_and_new_inputs_match_float64(kind):
    means = {}
    for dtype in (torch.float64, torch.float32):
        model, x = _model(kind, dtype)
        new = x[:50] + 0  # the same points as new inputs (another tensor: not the training data)
        new = torch.cat([new, new[:1]])
        with torch.no_grad():
            at_train = model(x)
            means[dtype] = (at_train.mean.double(), model(new).mean[:-1].double(), at_train.variance.double().sqrt())
    ref_train, ref_new, sd = means[torch.float64]
    train32, new32, _ = means[torch.float32]
    # float32 rounding of the data alone moves the mean by about 1e-6 here; before the fix: 1e-2 to 1e-1
    assert float(((train32 - ref_train).abs() / sd).max()) < 0.01
    assert float(((new32 - ref_new).abs() / sd[:50]).max()) < 0.01
    assert float((train32 - ref_train).abs().max()) < 2e-5
