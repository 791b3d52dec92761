"""The SGPR trace term and marginal likelihood of ``ChunkedInducingPointKernel(ScaleKernel(RBFKernel()), Z, ...)`` with
close inducing points (0.2 and 0.21: ``cond(K_ZZ)`` ~ 1e18, ``|L^{-T}|`` ~ 7e7 in float64).

The closed-form Gram products' backward pass (``bma_gp.kernels._rbf_gram._RBFGram``) applied ``A H A^T`` to ``K``
(``A = s L^{-T}``): terms of size ``|k| |A|^2`` cancelled down to ``U``'s size, and the trace term's gradients were
off in size and sign (noise +25.07 against +6e-6 in a user trial; a model's noise gradient -3.20 against +1.92).

Reference: GPyTorch's own ``InducingPointKernel`` with the same parameters (the same ``psd_safe_cholesky`` factor of
``K_ZZ``, jittered or not), and for float32 a float64 evaluation of GPyTorch's formula with the float32 model's
jitter. Tolerances are relative to the size of the terms that cancel (``sum_i k_ii / sigma_i^2``).
"""

from __future__ import annotations

import re
import warnings

import gpytorch
import pytest
import torch

from bma_gp import ChunkedInducingPointKernel, GroupKernel

D64 = torch.float64
ILL = [-1.0, -0.6, -0.2, 0.2, 0.21, 0.6, 1.0, -0.8, 0.4, 0.8, -0.4]
WELL = [-1.0, -0.5, 0.0, 0.5, 1.0]


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def data(dtype, n=200):
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(n, 1, generator=gen, dtype=D64) * 2 - 1
    groups = torch.randint(5, (n, 1), generator=gen).to(D64)
    y = torch.sin(3 * s[:, 0]) + 0.1 * torch.randn(n, generator=gen, dtype=D64)
    return torch.cat([s, groups], -1).to(dtype), y.to(dtype)


def build(cls, inducing, dtype, noise="gaussian", extra=None, batch=None):
    x, y = data(dtype)
    n = x.shape[0]
    if noise == "fixed":  # per-point noise plus a learned one
        lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(
            torch.linspace(0.05, 0.2, n, dtype=dtype), learn_additional_noise=True
        )
    else:
        lik = gpytorch.likelihoods.GaussianLikelihood()
        lik.noise = 0.1
    kw = {} if batch is None else {"batch_shape": torch.Size([batch])}
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(**kw), **kw)
    base.base_kernel.lengthscale = 1.2
    base.outputscale = 1.3
    sgpr = cls(base, torch.tensor(inducing, dtype=dtype).unsqueeze(-1), lik, active_dims=[0])
    if extra == "groups":  # closed form: the trace term reads the marginal likelihood's Gram matrix
        covar = sgpr + GroupKernel(5, active_dims=[1])
    elif extra == "rbf":  # not closed form: the trace term forms its own Gram matrix (the user trial's model)
        rbf = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0]))
        rbf.base_kernel.lengthscale = 0.3
        covar = sgpr + rbf
    else:
        covar = sgpr
    return GP(x, y, lik, covar).to(dtype).train(), sgpr, x, y


def pair(inducing, dtype=D64, **kw):
    ref, ref_sgpr, x, y = build(gpytorch.kernels.InducingPointKernel, inducing, dtype, **kw)
    ours, sgpr, _, _ = build(ChunkedInducingPointKernel, inducing, dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return (ref, ref_sgpr), (ours, sgpr), x, y


def trace_term(model, sgpr, x):
    model(x).lazy_covariance_matrix.evaluate_kernel()  # registers the added loss term
    (term,) = list(sgpr.added_loss_terms())
    value = term.loss()
    return value.sum() if value.dim() else value


def mll(model, x, y):
    value = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
    return value.sum() if value.dim() else value


def value_and_grads(fn, model, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the jitter warning of an ill-conditioned K_ZZ
        value = fn(model, *args)
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return value.detach(), {k: (torch.zeros_like(p) if g is None else g) for k, p, g in zip(names, params, grads)}


def terms_size(model, sgpr):
    """``sum_i k_ii / sigma_i^2``: the size of the two sums that the trace term is the difference of."""
    noise = model.likelihood._shaped_noise_covar(torch.Size([200])).diagonal(dim1=-1, dim2=-2)
    return float((sgpr.base_kernel.outputscale.detach().reshape(-1, 1) / noise.detach()).sum(-1).max())


def assert_close(ours, ref, atol, what):
    (v, g), (rv, rg) = ours, ref
    assert abs(float(v - rv)) <= atol, f"{what} value: {float(v):.6e} against {float(rv):.6e}"
    assert g.keys() == rg.keys()
    for k in rg:
        err = float((g[k] - rg[k]).abs().max())
        assert err <= atol, f"{what} d/d{k}: {g[k].flatten()[0]:+.6e} against {rg[k].flatten()[0]:+.6e} (err {err:.1e})"


@pytest.mark.parametrize("noise", ["gaussian", "fixed"])
@pytest.mark.parametrize("inducing", [ILL, WELL], ids=["close_inducing_points", "well_separated"])
def test_trace_term_matches_gpytorch(inducing, noise):
    (ref, ref_sgpr), (ours, sgpr), x, _ = pair(inducing, noise=noise)
    atol = 1e-9 * terms_size(ref, ref_sgpr)  # 2.6e-6 of 2600 (Gaussian noise 0.1, outputscale 1.3, n = 200)
    expected = value_and_grads(trace_term, ref, ref_sgpr, x)
    assert_close(value_and_grads(trace_term, ours, sgpr, x), expected, atol, "trace term")


@pytest.mark.parametrize("extra", ["rbf", "groups"])
def test_marginal_likelihood_matches_gpytorch(extra):
    (ref, ref_sgpr), (ours, sgpr), x, y = pair(ILL, extra=extra)
    atol = 1e-9 * terms_size(ref, ref_sgpr) / x.shape[0]  # the marginal likelihood is divided by n
    assert_close(value_and_grads(mll, ours, x, y), value_and_grads(mll, ref, x, y), atol, f"mll ({extra})")


def test_batched_kernel_matches_gpytorch():
    (ref, ref_sgpr), (ours, sgpr), x, y = pair(ILL, batch=2)
    atol = 1e-9 * terms_size(ref, ref_sgpr)
    assert_close(value_and_grads(trace_term, ours, sgpr, x), value_and_grads(trace_term, ref, ref_sgpr, x), atol, "")
    assert_close(value_and_grads(mll, ours, x, y), value_and_grads(mll, ref, x, y), atol / x.shape[0], "mll")


def float64_truth(model, inducing, x, jitter):
    """GPyTorch's trace term in float64 for the float32 model's parameters (the same model built in float64, the
    float32 values loaded exactly), with the float32 model's jitter on ``K_ZZ``."""
    ref, sgpr, _, _ = build(gpytorch.kernels.InducingPointKernel, inducing, D64)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    base, z, xs = sgpr.base_kernel, sgpr.inducing_points, x.double()[:, :1]
    kzz = base(z).to_dense() + jitter * torch.eye(z.shape[0], dtype=D64)
    v = torch.linalg.solve_triangular(torch.linalg.cholesky(kzz), base(z, xs).to_dense(), upper=False)
    noise = ref.likelihood._shaped_noise_covar(torch.Size([x.shape[0]])).diagonal(dim1=-1, dim2=-2)
    value = -0.5 * ((base(xs, diag=True) - v.square().sum(-2)) / noise).sum()
    names, params = zip(*ref.named_parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return value.detach(), {k: (torch.zeros_like(p) if g is None else g) for k, p, g in zip(names, params, grads)}


@pytest.mark.parametrize("inducing", [ILL, WELL], ids=["close_inducing_points", "well_separated"])
def test_float32_trace_term_as_accurate_as_gpytorch(inducing):
    (ref, ref_sgpr), (ours, sgpr), x, _ = pair(inducing, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref(x).lazy_covariance_matrix.evaluate_kernel()
    found = [re.search(r"jitter of ([0-9.e+-]+)", str(w.message)) for w in caught]
    jitter = [float(f.group(1)) for f in found if f is not None]
    truth_v, truth_g = float64_truth(ref, inducing, x, jitter[-1] if jitter else 0.0)
    size = terms_size(ref, ref_sgpr)
    gpy_v, gpy_g = value_and_grads(trace_term, ref, ref_sgpr, x)
    v, g = value_and_grads(trace_term, ours, sgpr, x)
    # float32 rounds the two sums of size 2600 to 2.4e-4; the gradients within 4x GPyTorch's own float32 error
    assert abs(float(v) - float(truth_v)) <= 4 * abs(float(gpy_v) - float(truth_v)) + 1e-6 * size
    for k in truth_g:
        err = float((g[k].double() - truth_g[k]).abs().max())
        gpy_err = float((gpy_g[k].double() - truth_g[k]).abs().max())
        assert err <= 4 * gpy_err + 1e-6 * size, f"d/d{k}: error {err:.2e}, GPyTorch's float32 error {gpy_err:.2e}"
