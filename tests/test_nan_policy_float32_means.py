"""Posterior means under GPyTorch's observation NaN policies (``"mask"``, ``"fill"``) in float32.

The mean sums :math:`M_{oo}^{-1} r_o`, whose entries (size ``r / noise``) cancel within each group, so both
prediction strategies apply it in the working precision without NaN targets (``tests/test_float32_means.py``). Under
``observation_nan_policy("mask")`` or ``("fill")`` they handed the mean to GPyTorch's float32 path: a random
intercept's means were off by about a posterior standard deviation (55 at noise 1e-4), a block mean kernel's by up
to 500, crossed groupings' by 0.1. Now the masked mean is the closed form of the observed points in the working
precision: the training covariance with the rows of the dropped points zeroed (their diagonal kept, as GPyTorch's
``"fill"`` keeps it), and the residual zero there.

The reference is dense float64 algebra on the model's own covariances, cast exactly to float64 (a float32 block mean
kernel's block means differ from float64's by their rounding, which moves the posterior by more than the bound
here), with GPyTorch's semantics written out: the mean conditions on the points whose target is not NaN; for the
group kernels also the model without those rows.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel
from linear_operator.operators import LinearOperator

from bma_gp import BlockMeanKernel, GroupKernel, Partition

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:The input matches the stored training data"),
]

N, K1, K2 = 1000, 40, 7
MISSING = [0, 1, 2, *range(100, 110)]


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _data():
    """Inputs ``(g, h, t)`` and targets ``y = 10 + u[g] + w[h] + e``, NaN at :data:`MISSING`."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randint(0, K1, (N,), generator=gen)
    h = torch.randint(0, K2, (N,), generator=gen)
    t = torch.rand(N, generator=gen, dtype=torch.float64)
    y = 10 + torch.randn(K1, generator=gen, dtype=torch.float64)[g] + torch.randn(K2, generator=gen).double()[h]
    y = y + 0.03 * torch.randn(N, generator=gen, dtype=torch.float64)
    y[MISSING] = float("nan")
    noise = 1 + torch.rand(N, generator=gen, dtype=torch.float64)  # per-point noise, relative
    return torch.stack([g.double(), h.double(), t], -1), y, noise


#: kind -> noise level (small enough that GPyTorch's float32 path was off by more than 0.01 sd)
KINDS = {
    "intercept": 1e-3,
    "scaled_intercept": 1e-3,
    "crossed": 1e-4,
    "fixed_noise_intercept": 1e-4,
    "block_mean": 1e-3,
}


def _model(kind: str, dtype: torch.dtype, keep: torch.Tensor | None = None) -> _GP:
    """The model of ``kind`` in ``dtype``; with ``keep``, on those rows only."""
    x, y, noise = _data()
    if keep is not None:
        x, y, noise = x[keep], y[keep], noise[keep]
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    if kind == "intercept":
        kernel = GroupKernel(K1, active_dims=[0])
    elif kind == "scaled_intercept":
        kernel = ScaleKernel(GroupKernel(K1, active_dims=[0]))
    elif kind == "crossed":  # the sum strategy
        kernel = GroupKernel(K1, active_dims=[0]) + GroupKernel(K2, active_dims=[1])
    elif kind == "fixed_noise_intercept":  # per-point noise: a single kernel through the sums' closed forms
        kernel = GroupKernel(K1, active_dims=[0])
        likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood((KINDS[kind] * noise).to(dtype))
    else:
        partition = Partition.from_labels(x[:, 0].long())
        kernel = BlockMeanKernel(ScaleKernel(RBFKernel(active_dims=[2])), x.to(dtype), partition)
    model = _GP(x.to(dtype), y.to(dtype), likelihood, kernel).to(dtype)
    with torch.no_grad():
        if kind != "fixed_noise_intercept":
            model.likelihood.noise = KINDS[kind]
        model.mean_module.constant.fill_(10.0)
    return model.eval()


def _dense64(op) -> torch.Tensor:
    """A covariance of the model, exactly as the model holds it, as a float64 dense matrix."""
    if isinstance(op, LinearOperator):
        return op.evaluate_kernel().to(torch.float64).to_dense()
    return op.double()


def _dense_mean(model: _GP, at: torch.Tensor) -> torch.Tensor:
    """GPyTorch's masked mean :math:`m_* + K_{*o} M_{oo}^{-1} (y_o - m_o)` by float64 dense algebra on ``model``'s
    covariances (``o``: the points whose target is not NaN)."""
    x, y = model.train_inputs[0], model.train_targets
    observed = ~torch.isnan(y)
    with torch.no_grad():
        prior = model.forward(x)
        M = _dense64(model.likelihood(prior, x).lazy_covariance_matrix)[observed][:, observed]
        cross = _dense64(model.covar_module(at, x))[:, observed]
        r = (y.double() - prior.mean.double())[observed]
        return model.mean_module(at).double() + cross @ torch.linalg.solve(M, r)


def _predict(model: _GP, at: torch.Tensor, policy: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's posterior mean and standard deviation at ``at`` under ``policy`` (None: the default)."""
    with torch.no_grad(), gpytorch.settings.observation_nan_policy(policy or "ignore"):
        pred = model(at)
        return pred.mean.double(), pred.variance.double().sqrt()


@pytest.mark.parametrize("policy", ["mask", "fill"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_means_under_a_nan_policy_condition_on_the_observed_points_in_every_dtype(kind, policy):
    x, y, _ = _data()
    new = torch.cat([x[:50] + 0, x[MISSING[:3]] + 0])  # new inputs (other tensors), the missing points among them
    keep = ~torch.isnan(y)
    for dtype in (torch.float64, torch.float32):
        model = _model(kind, dtype)
        for at in (x.to(dtype), new.to(dtype)):  # the training inputs, then new ones
            mean, sd = _predict(model, at, policy)
            expected = _dense_mean(model, at)
            error = float(((mean - expected).abs() / sd).max())
            if dtype == torch.float64:
                assert error < 1e-6, error
                if kind != "block_mean":  # the model of the observed rows alone (a block mean kernel's block means
                    # would change with its training rows)
                    dropped, _ = _predict(_model(kind, dtype, keep), at, None)
                    torch.testing.assert_close(mean, dropped, rtol=1e-9, atol=1e-6 * float(sd.min()))
            else:  # what float32 leaves here is about 1e-4 sd; before: 0.1 to 1000
                assert error < 0.01, error
