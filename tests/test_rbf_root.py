"""The hand-written RBF root of ChunkedInducingPointKernel against autograd through GPyTorch's own kernel.

``U = s exp(-D / 2) L^{-T}`` and ``rowsum(U**2)`` with every gradient (inputs, inducing points, ``L^{-T}``,
lengthscale, outputscale) in float64 to 1e-10, over shared and ARD lengthscales, with and without the
ScaleKernel, one or many row blocks; float32 against float64; the kernels it does not cover are
recognised and take the generic (recomputed under autograd) path.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

from bma_gp import ChunkedInducingPointKernel, GroupKernel
from bma_gp.kernels._rbf_root import rbf_parts, rbf_root


def kernel(ard: int | None, scaled: bool, dtype=torch.float64):
    base = gpytorch.kernels.RBFKernel(ard_num_dims=ard).to(dtype)
    base.lengthscale = torch.linspace(0.4, 1.3, ard or 1, dtype=dtype).unsqueeze(0)
    if not scaled:
        return base
    k = gpytorch.kernels.ScaleKernel(base).to(dtype)
    k.outputscale = 1.7
    return k


def inputs(n=47, m=9, d=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    z = torch.randn(m, d, generator=gen, dtype=dtype)
    a = torch.randn(m, m, generator=gen, dtype=dtype) / m
    return x, z, a


def reference(k, x, z, a):
    u = k(x, z).to_dense() @ a
    return u, u.square().sum(-1)


@pytest.mark.parametrize("ard", [None, 3], ids=["shared", "ard"])
@pytest.mark.parametrize("scaled", [True, False], ids=["scale", "noscale"])
@pytest.mark.parametrize("rows", [1, 13, 1000], ids=["rows1", "rows13", "onechunk"])
@pytest.mark.parametrize("outputs", ["both", "root", "diag"])
def test_values_and_gradients_match_autograd(ard, scaled, rows, outputs):
    k = kernel(ard, scaled)
    x, z, a = inputs()
    leaves = [x.requires_grad_(), z.requires_grad_(), a.requires_grad_(), *k.parameters()]
    gen = torch.Generator().manual_seed(5)
    g_root = torch.randn(x.shape[0], a.shape[-1], generator=gen, dtype=x.dtype)
    g_diag = torch.randn(x.shape[0], generator=gen, dtype=x.dtype)
    results = []
    for u, diag in (rbf_root(rows, x, z, a, *rbf_parts(k, x, z)), reference(k, x, z, a)):
        loss = 0.0
        if outputs in ("both", "root"):
            loss = loss + (u * g_root).sum()
        if outputs in ("both", "diag"):
            loss = loss + (diag * g_diag).sum()
        results.append((u.detach(), diag.detach(), torch.autograd.grad(loss, leaves)))
    (u1, d1, g1), (u2, d2, g2) = results
    torch.testing.assert_close(u1, u2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d1, d2, rtol=1e-12, atol=1e-14)
    for i, (a1, a2) in enumerate(zip(g1, g2)):
        torch.testing.assert_close(a1, a2, rtol=1e-10, atol=1e-12, msg=f"gradient {i}")


def test_gradcheck():
    k = kernel(2, True)
    x, z, a = inputs(n=11, m=4, d=2)
    ls, s = (t.detach().clone().requires_grad_() for t in rbf_parts(k, x, z))
    args = (x.requires_grad_(), z.requires_grad_(), a.requires_grad_(), ls, s)
    assert torch.autograd.gradcheck(lambda *t: rbf_root(5, *t), args)


def test_float32_agrees_with_float64():
    k64, k32 = kernel(3, True), kernel(3, True, torch.float32)
    x, z, a = inputs(n=3000, m=32)
    g = torch.randn(x.shape[0], a.shape[-1], dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    grads = []
    for k, dt in ((k64, torch.float64), (k32, torch.float32)):
        leaves = [z.to(dt).requires_grad_(), a.to(dt).requires_grad_(), *k.parameters()]
        xd = x.to(dt)
        u, diag = rbf_root(700, xd, leaves[0], leaves[1], *rbf_parts(k, xd, leaves[0]))
        loss = (u * g.to(dt)).sum() + diag.sum()
        grads.append([t.double() for t in torch.autograd.grad(loss, leaves)])
    for i, (a64, a32) in enumerate(zip(*grads)):
        assert (a32 - a64).norm() <= 1e-4 * a64.norm(), f"gradient {i}"


@pytest.mark.parametrize(
    "make",
    [
        lambda: gpytorch.kernels.MaternKernel(),
        lambda: gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel()),
        lambda: gpytorch.kernels.RBFKernel(active_dims=[0, 1, 2]),
        lambda: gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(), active_dims=[0, 1, 2]),
        lambda: gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2])),
        lambda: type("MyRBF", (gpytorch.kernels.RBFKernel,), {})(),
        lambda: gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()) + gpytorch.kernels.RBFKernel(),
    ],
    ids=["matern", "scale-matern", "rbf-active-dims", "scale-active-dims", "batch", "subclass", "sum"],
)
def test_other_kernels_are_not_taken_for_rbf(make):
    x, z, _ = inputs()
    assert rbf_parts(make().double(), x, z) is None


class Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, base, analytic: bool):
        likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        inducing = x[:10, :2].clone()
        sgpr = ChunkedInducingPointKernel(base, inducing, likelihood, active_dims=(0, 1), chunk_rows=17)
        sgpr.analytic_rbf = analytic
        self.covar_module = sgpr + GroupKernel(5, active_dims=[2])

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@pytest.mark.parametrize("base", ["rbf", "scale-rbf-ard", "scale-matern"])
def test_model_gradients_equal_with_and_without_the_analytic_root(base, monkeypatch):
    import bma_gp.kernels.chunked_inducing_point_kernel as chunked

    calls = []
    factor = chunked.RBFRootFactor
    # in training the analytic path keeps the root as its inputs (RBFRootFactor); rbf_root forms it elsewhere
    monkeypatch.setattr(chunked, "RBFRootFactor", lambda *a: calls.append(1) or factor(*a))
    gen = torch.Generator().manual_seed(2)
    n = 90
    s = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    g = torch.randint(5, (n, 1), generator=gen).double()
    x = torch.cat([s, g], -1)
    y = torch.sin(4 * s[:, 0]) + torch.randn(n, generator=gen, dtype=torch.float64) * 0.1
    results = []
    for analytic in (True, False):
        kernels = {
            "rbf": lambda: gpytorch.kernels.RBFKernel(),
            "scale-rbf-ard": lambda: gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2)),
            "scale-matern": lambda: gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=1.5)),
        }
        torch.manual_seed(0)
        model = Model(x, y, kernels[base](), analytic).double()
        model.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        loss = -mll(model(x), y)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = results
    assert bool(calls) == (base != "scale-matern"), "the analytic root is taken for RBF kernels only, when enabled"
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=0)
    assert g1.keys() == g2.keys() and any("lengthscale" in k for k in g1)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-9, atol=1e-12, msg=name)
