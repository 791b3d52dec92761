"""Mixed-effects GPs that need the closed-form sums (docs/math.md section 4), against dense references.

* crossed groupings: two ``GroupKernel`` on their own id columns, summed with ``+``;
* SGPR (``InducingPointKernel``) plus group kernels: low rank plus block mean;
* per-point noise (``FixedNoiseGaussianLikelihood``) with group kernels.

The models run at ``max_cholesky_size`` 0 inside ``closed_forms_only(n)``: CG, Lanczos and every
factorisation of an ``n x n`` matrix raise. The references assemble every covariance entry by
entry from the hyperparameters (nothing from the package) and condition with dense solves.
"""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch

from bma_gp import GroupKernel
from closed_form_guard import closed_forms_only
from gp_reference import GP

DTYPE = torch.float64
K1, K2 = 7, 4  # levels of the two groupings


# ---------------------------------------------------------------------------- data and models
def crossed_data(n=90, seed=0):
    """Columns: t (smooth input), id of grouping 1, id of grouping 2. The last level of each grouping never occurs."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=DTYPE)
    a = torch.randint(0, K1 - 1, (n,), generator=g)
    b = torch.randint(0, K2 - 1, (n,), generator=g)
    ea, eb = torch.randn(K1, generator=g, dtype=DTYPE), 0.5 * torch.randn(K2, generator=g, dtype=DTYPE)
    y = torch.sin(6 * t) + ea[a] + eb[b] + 0.2 * torch.randn(n, generator=g, dtype=DTYPE)
    x = torch.stack([t, a.to(DTYPE), b.to(DTYPE)], -1)
    noise = 0.02 + 0.1 * torch.rand(n, generator=g, dtype=DTYPE)
    return x, y, noise


def new_inputs():
    """Seen and unseen levels (6 of grouping 1, 3 of grouping 2) at new smooth inputs."""
    return torch.tensor(
        [[0.1, 0.0, 1.0], [0.5, 6.0, 2.0], [0.9, 3.0, 3.0], [0.3, 6.0, 3.0], [0.7, 2.0, 0.0]], dtype=DTYPE
    )


def group_kernels(per_group_variance=False):
    ka = GroupKernel(K1, active_dims=[1], per_group_variance=per_group_variance)
    kb = GroupKernel(K2, active_dims=[2], per_group_variance=per_group_variance)
    ka.var = torch.linspace(0.5, 1.5, K1) if per_group_variance else 0.8
    kb.var = torch.linspace(0.2, 0.4, K2) if per_group_variance else 0.3
    return ka, kb


def sgpr_kernel(likelihood, m=6):
    smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    smooth.outputscale = 1.3
    smooth.base_kernel.lengthscale = 0.25
    inducing = torch.linspace(0.05, 0.95, m, dtype=DTYPE).unsqueeze(-1)
    return gpytorch.kernels.InducingPointKernel(smooth, inducing, likelihood, active_dims=(0,))


# ---------------------------------------------------------------------------- dense references
def dense_group(kernel, ids_a, ids_b):
    v = kernel.var.expand(kernel.num_groups)
    return (ids_a.unsqueeze(-1) == ids_b.unsqueeze(-2)).to(DTYPE) * v[ids_a].unsqueeze(-1)


def dense_rbf(smooth, ta, tb):
    ls = smooth.base_kernel.lengthscale.reshape(())
    return smooth.outputscale * torch.exp(-0.5 * (ta.unsqueeze(-1) - tb.unsqueeze(-2)) ** 2 / ls**2)


def dense_nystrom(ipk, ta, tb):
    """Q(a, b) = K(a, Z) K(Z, Z)^{-1} K(Z, b) with a dense solve."""
    z = ipk.inducing_points[:, 0]
    return dense_rbf(ipk.base_kernel, ta, z) @ torch.linalg.solve(
        dense_rbf(ipk.base_kernel, z, z), dense_rbf(ipk.base_kernel, z, tb)
    )


def dense_prior(kernels, xa, xb):
    """Sum of the parts' covariances between the rows of xa and xb."""
    out = 0
    for kernel in kernels:
        if isinstance(kernel, GroupKernel):
            col = kernel.active_dims.item()
            out = out + dense_group(kernel, xa[:, col].long(), xb[:, col].long())
        else:
            out = out + dense_nystrom(kernel, xa[:, 0], xb[:, 0])
    return out


def dense_mll(model, kernels, x, y, noise_diag):
    """ExactMarginalLogLikelihood / n, with SGPR's trace term when an InducingPointKernel is present."""
    n = y.shape[0]
    K = dense_prior(kernels, x, x) + torch.diag(noise_diag)
    r = y - model.mean_module.constant
    L = torch.linalg.cholesky(K)
    alpha = torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
    loglik = -0.5 * (r @ alpha) - torch.log(torch.diagonal(L)).sum() - 0.5 * n * math.log(2 * math.pi)
    for kernel in kernels:
        if isinstance(kernel, gpytorch.kernels.InducingPointKernel):
            t = x[:, 0]
            kxx = kernel.base_kernel.outputscale.expand(n)
            qxx = torch.diagonal(dense_nystrom(kernel, t, t))
            loglik = loglik - 0.5 * ((kxx - qxx) / noise_diag).sum()
    return loglik / n


def dense_posterior(model, kernels, x, y, noise_diag, xt, diag_correction, test_kernels=None):
    """Latent posterior mean and covariance at xt; SGPR's eval-mode diagonal correction where gpytorch applies it.

    ``test_kernels`` (default ``kernels``): the parts whose sum is predicted (its covariances with the data and
    at xt); the data's covariance always sums all ``kernels``. When xt is x itself, gpytorch's InducingPointKernel
    sees equal inputs for the test-by-training covariance too, so the correction is on its diagonal as well."""
    test_kernels = kernels if test_kernels is None else test_kernels
    K = dense_prior(kernels, x, x) + torch.diag(noise_diag)
    Kt = dense_prior(test_kernels, xt, xt)
    Kx = dense_prior(test_kernels, xt, x)
    at_training = xt.shape == x.shape and torch.equal(xt, x)
    if diag_correction:
        for kernel in kernels:
            if isinstance(kernel, gpytorch.kernels.InducingPointKernel):
                mats = ((x, K), (xt, Kt), *(((x, Kx),) if at_training else ())) if kernel in test_kernels else ((x, K),)
                for inputs, mat in mats:
                    t = inputs[:, 0]
                    corr = kernel.base_kernel.outputscale - torch.diagonal(dense_nystrom(kernel, t, t))
                    mat += torch.diag(corr.clamp_min(0))
    mean = model.mean_module.constant
    mu = mean + Kx @ torch.linalg.solve(K, y - mean)
    cov = Kt - Kx @ torch.linalg.solve(K, Kx.mT)
    return mu, cov


# ---------------------------------------------------------------------------- the cases
def build(case):
    x, y, noise = crossed_data()
    if case.endswith("fixed_noise"):
        likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise)
    else:
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        likelihood.noise = 0.05
    ka, kb = group_kernels(per_group_variance="per_group" in case)
    if case.startswith("crossed"):
        kernels = [ka, kb]
    elif case.startswith("sgpr"):
        kernels = [sgpr_kernel(likelihood), ka, kb]
    else:  # one grouping
        kernels = [ka]
    covar = kernels[0]
    for kernel in kernels[1:]:
        covar = covar + kernel
    model = GP(x, y, likelihood, covar).to(DTYPE)
    model.mean_module.constant.data.fill_(0.1)
    noise_diag = noise if case.endswith("fixed_noise") else likelihood.noise.expand(y.shape[0])
    return model, kernels, x, y, noise_diag


CASES = [
    "crossed",
    "crossed_per_group",
    "crossed_fixed_noise",
    "one_group_fixed_noise",
    "sgpr_crossed",
    "sgpr_crossed_fixed_noise",
]


@pytest.mark.parametrize("case", CASES)
def test_marginal_likelihood_and_gradients_match_dense(case):
    model, kernels, x, y, noise_diag = build(case)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
        loss = mll(model(x), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref = dense_mll(
        model, kernels, x, y, noise_diag if case.endswith("fixed_noise") else model.likelihood.noise.expand(y.shape[0])
    )
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    for (name, _), g, r in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], grads, ref_grads):
        g = torch.zeros_like(_) if g is None else g
        r = torch.zeros_like(_) if r is None else r
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10, msg=f"gradient of {name}")


@pytest.mark.parametrize("case", CASES)
def test_prediction_matches_dense_posterior(case):
    model, kernels, x, y, noise_diag = build(case)
    xt = new_inputs()
    model.eval()
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
        post = model(xt)
        mean, cov = post.mean, post.covariance_matrix
    with torch.no_grad():
        ref_mean, ref_cov = dense_posterior(model, kernels, x, y, noise_diag, xt, diag_correction=True)
    torch.testing.assert_close(mean, ref_mean.detach(), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-7, atol=1e-9)
    assert bool((post.variance >= 0).all())


@pytest.mark.parametrize("case", ["crossed", "sgpr_crossed_fixed_noise"])
def test_unseen_levels_predict_zero_effect_with_prior_variance(case):
    """Grouping 1's level 6 never occurs in training: its effect is 0 with its prior variance, independent of the rest.

    So the prediction equals the posterior of the other parts (conditioned on all the data) plus that variance."""
    model, kernels, x, y, noise_diag = build(case)
    model.eval()
    xt = new_inputs()[[1, 3]]  # both at level 6 of grouping 1
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
        post = model(xt)
        mean, var = post.mean, post.variance
    ka = kernels[-2]
    with torch.no_grad():
        others = [k for k in kernels if k is not ka]
        ref_mean, ref_cov = dense_posterior(
            model, kernels, x, y, noise_diag, xt, diag_correction=True, test_kernels=others
        )
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(var, torch.diagonal(ref_cov) + ka.var.detach(), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("case", ["crossed", "sgpr_crossed"])
def test_rsample_at_new_inputs(case):
    """A few test points: their t x t posterior covariance may be factorised densely (t < n)."""
    model, kernels, x, y, noise_diag = build(case)
    model.eval()
    torch.manual_seed(1)
    with closed_forms_only(x.shape[0]), torch.no_grad():
        draws = model.likelihood(model(new_inputs())).rsample(torch.Size([4000]))
    with torch.no_grad():
        ref_mean, ref_cov = dense_posterior(model, kernels, x, y, noise_diag, new_inputs(), diag_correction=True)
    # 4000 draws: the sample mean is within 5 standard errors of the posterior mean
    sd = (torch.diagonal(ref_cov) + model.likelihood.noise).sqrt()
    assert bool(((draws.mean(0) - ref_mean).abs() < 5 * sd / math.sqrt(4000)).all())


@pytest.mark.parametrize("case", ["crossed", "sgpr_crossed"])
def test_rsample_at_training_inputs(case):
    """The n x n posterior covariance at the training inputs has a structured root (tests/test_mixed_posterior.py):
    no Lanczos, no n x n Cholesky."""
    model, kernels, x, y, noise_diag = build(case)
    model.eval()
    torch.manual_seed(1)
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
        draws = model(x).rsample(torch.Size([3000]))
    assert draws.shape == (3000, x.shape[0]) and bool(torch.isfinite(draws).all())
    with torch.no_grad():
        ref_mean, ref_cov = dense_posterior(model, kernels, x, y, noise_diag, x, diag_correction=True)
    sd = torch.diagonal(ref_cov).clamp_min(0).sqrt()
    assert bool(((draws.mean(0) - ref_mean).abs() <= 5 * sd / math.sqrt(3000) + 1e-9).all())
