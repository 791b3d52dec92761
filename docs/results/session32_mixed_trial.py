"""Session 32 mixed-effects trial on lme4's sleepstudy: the GP random-intercept model against statsmodels' MixedLM
(ML), then the session's new compositions. Prints the side-by-side numbers of docs/results/session32_mixed_trial.md.

    PYTHONPATH=. python docs/results/session32_mixed_trial.py
"""

from __future__ import annotations

import math
import warnings

import gpytorch
import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
import torch

from bma_gp import GroupKernel
from bma_gp.datasets import load_sleepstudy

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)  # LinearMean starts at random weights
data = load_sleepstudy()
days, ids, y = data.x[:, 0], data.groups[:, 0], data.y
k = data.num_groups[0]
# hold out day 9 of every subject: new observations of seen groups
train = days < 9
test = ~train
x_all = torch.stack([days, ids.double()], -1)


class RandomIntercept(gpytorch.models.ExactGP):
    def __init__(self, x, y):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.LinearMean(1)
        self.covar_module = GroupKernel(k + 1, active_dims=[1])  # level k: never seen

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x[..., :1]), self.covar_module(x))


def fit(model, x, y, rounds=3):
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    opt = torch.optim.LBFGS(
        model.parameters(),
        line_search_fn="strong_wolfe",
        max_iter=500,
        history_size=20,
        tolerance_grad=1e-12,
        tolerance_change=1e-16,
    )

    def closure():
        opt.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        return loss

    model.train()
    for _ in range(rounds):
        opt.step(closure)
    return -closure().item() * len(y)


# standardise y for the fit (report on the original scale)
x_tr, y_tr = x_all[train], y[train]
mu, sd = y_tr.mean(), y_tr.std()
gp = RandomIntercept(x_tr, (y_tr - mu) / sd)
ll = fit(gp, x_tr, (y_tr - mu) / sd) - len(y_tr) * math.log(sd)
gp.eval()
with torch.no_grad():
    pred = gp(x_all[test]).mean * sd + mu
    seen = torch.stack([torch.zeros(k), torch.arange(k).double()], -1)
    unseen = torch.stack([torch.zeros(k), torch.full((k,), float(k))], -1)
    blup = (gp(seen).mean - gp(unseen).mean) * sd
    blup_sd = gp(seen).variance.sqrt() * sd  # the mean function is fixed at its ML value: var(u_g | y)
    beta1 = gp.mean_module.weights[0, 0] * sd
    beta0 = gp.mean_module.bias[0] * sd + mu

frame = pd.DataFrame({"y": y_tr.numpy(), "x": days[train].numpy(), "g": ids[train].numpy()})
res = smf.mixedlm("y ~ x", frame, groups=frame["g"]).fit(reml=False)
sm_blup = np.array([res.random_effects[g].iloc[0] for g in range(k)])
sm_pred = res.fe_params["Intercept"] + res.fe_params["x"] * days[test].numpy() + sm_blup[ids[test].numpy()]
print("== random intercept, sleepstudy days 0-8 (162 rows), ML")
print(f"loglik           GP {ll:.8f}   MixedLM {res.llf:.8f}")
print(f"subject var      GP {gp.covar_module.var.item() * sd.item() ** 2:.4f}   MixedLM {res.cov_re.iloc[0, 0]:.4f}")
print(f"residual var     GP {gp.likelihood.noise.item() * sd.item() ** 2:.4f}   MixedLM {res.scale:.4f}")
print(f"intercept        GP {beta0.item():.5f}   MixedLM {res.fe_params['Intercept']:.5f}")
print(f"slope (Days)     GP {beta1.item():.5f}   MixedLM {res.fe_params['x']:.5f}")
print(f"BLUPs max |diff| {np.abs(blup.numpy() - sm_blup).max():.2e} (range {sm_blup.min():.2f}..{sm_blup.max():.2f})")
sm_blup_sd = np.sqrt([res.random_effects_cov[g].iloc[0, 0] for g in range(k)])
print(
    f"BLUP sd          GP {blup_sd[0]:.4f}   MixedLM {sm_blup_sd[0]:.4f} (subject 0; max |diff| "
    f"{np.abs(blup_sd.numpy() - sm_blup_sd).max():.2e})"
)
print(
    f"day-9 pred max |diff| {np.abs(pred.numpy() - sm_pred).max():.2e}; RMSE GP "
    f"{(pred - y[test]).pow(2).mean().sqrt():.4f} MixedLM {np.sqrt(((sm_pred - y[test].numpy()) ** 2).mean()):.4f}"
)

# ---------------------------------------------------------------------------- 2. the session's compositions
import sys  # noqa: E402

sys.path.insert(0, "tests")
from bma_gp import ClosedFormFallbackWarning, GroupGaussianLikelihood  # noqa: E402
from closed_form_guard import closed_forms_only  # noqa: E402


class Composed(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.LinearMean(1)
        self.covar_module = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x[..., :1]), self.covar_module(x))


def composed(smooth: bool, group_noise: bool):
    covar = gpytorch.kernels.ScaleKernel(gpytorch.kernels.ConstantKernel()) + GroupKernel(k + 1, active_dims=[1])
    if smooth:
        covar = covar + gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0]))
    if group_noise:
        likelihood = GroupGaussianLikelihood(k + 1, group_dim=1, train_inputs=ids[train])  # 1-D ids
    else:
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
    return Composed(x_tr, (y_tr - mu) / sd, likelihood, covar)


def dense_loglik(model):
    """The same model's log-likelihood (original scale) from a dense covariance formed from its parameters."""
    with torch.no_grad():
        scaled, groups = model.covar_module.kernels[:2]
        g = ids[train]
        K = scaled.outputscale * scaled.base_kernel.constant + groups.var * (g.unsqueeze(-1) == g).double()
        if len(model.covar_module.kernels) > 2:
            rbf = model.covar_module.kernels[2]
            d = days[train]
            K = K + rbf.outputscale * torch.exp(-0.5 * (d.unsqueeze(-1) - d) ** 2 / rbf.base_kernel.lengthscale**2)
        noise = model.likelihood.noise.reshape(-1)
        noise = noise[g] if noise.numel() > 1 else noise.expand(len(g))
        m = model.mean_module(x_tr[:, :1])
        mvn = torch.distributions.MultivariateNormal(m, K + torch.diag(noise))
        return (mvn.log_prob((y_tr - mu) / sd) - len(g) * math.log(sd)).item()


print("\n== the session's compositions, same rows, ML (L-BFGS)")
for smooth, group_noise in [(False, False), (False, True), (True, False)]:
    model = composed(smooth, group_noise)
    n = len(y_tr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if smooth:
            ll_c = fit(model, x_tr, (y_tr - mu) / sd) - n * math.log(sd)
        else:
            with closed_forms_only(n), gpytorch.settings.max_cholesky_size(0):
                ll_c = fit(model, x_tr, (y_tr - mu) / sd) - n * math.log(sd)
    fallback = sum(issubclass(w.category, ClosedFormFallbackWarning) for w in caught)
    scaled, groups = model.covar_module.kernels[:2]
    name = "ScaleKernel(ConstantKernel()) + GroupKernel" + (" + ScaleKernel(RBF(Days))" if smooth else "")
    name += " + GroupGaussianLikelihood(1-D ids)" if group_noise else " + GaussianLikelihood"
    print(
        f"{name}\n    loglik {ll_c:.8f}  dense {dense_loglik(model):.8f}  "
        f"{'closed form (guard)' if not smooth else 'generic path'}  fallback warnings: {fallback}"
    )
    c = (scaled.outputscale * scaled.base_kernel.constant).item() * sd.item() ** 2
    print(
        f"    intercept var {c:.4g}  subject var {groups.var.item() * sd.item() ** 2:.4f}  "
        f"noise var {(model.likelihood.noise.detach().reshape(-1)[:k] * sd**2).mean():.4f} (mean over subjects)"
        + (f"  RBF var {model.covar_module.kernels[2].outputscale.item() * sd.item() ** 2:.4g}" if smooth else "")
    )
    if group_noise:
        noise = model.likelihood.noise.detach()[:k] * sd**2
        print(f"    per-subject noise var: min {noise.min():.1f}, max {noise.max():.1f}")
