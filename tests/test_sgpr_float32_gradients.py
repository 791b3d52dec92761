"""Float32 SGPR gradients of ChunkedInducingPointKernel's analytic RBF path against GPyTorch's float32 SGPR.

Session 28: with the kernel blocks, ``U = K A`` and the backward pass's products in float32, the analytic path's
gradients were 10-1650x further from GPyTorch's float64 SGPR than GPyTorch's own float32 SGPR was (the
outputscale's, the lengthscale's and the inducing points' gradients, which are differences of terms of size
``|k_a| |A|`` down to ``|u_a|``). Its products now run in float64 from the float32 inputs; each gradient here must
be within 5x of GPyTorch float32's error (both against GPyTorch float64 on the same float32-rounded problem).
"""

import math
import statistics
import warnings

import gpytorch
import pytest
import torch

from bma_gp import ChunkedInducingPointKernel


class _SGPR(gpytorch.models.ExactGP):
    def __init__(self, x, y, lik, inducing, chunked):
        super().__init__(x, y, lik)
        self.mean_module = gpytorch.means.ZeroMean()
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=x.shape[-1]))
        cls = ChunkedInducingPointKernel if chunked else gpytorch.kernels.InducingPointKernel
        self.covar_module = cls(base, inducing.clone(), lik)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _data(n, d, m, noise, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    noise_draw = torch.randn(n, generator=g, dtype=torch.float64)
    y = math.sqrt(scale) * torch.sin(6 * x).sum(-1) + math.sqrt(noise) * noise_draw
    z = x[torch.randperm(n, generator=g)[:m]]
    return x.float().double(), y.float().double(), z.float().double()  # the same float32-rounded problem for all


def _grads(x, y, z, noise, scale, ls, dtype, chunked):
    lik = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-9)).to(dtype)
    model = _SGPR(x.to(dtype), y.to(dtype), lik, z.to(dtype), chunked).to(dtype)
    lik.noise = noise
    model.covar_module.base_kernel.outputscale = scale
    model.covar_module.base_kernel.base_kernel.lengthscale = ls
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    model.train()
    params = [
        lik.noise_covar.raw_noise,
        model.covar_module.base_kernel.raw_outputscale,
        model.covar_module.base_kernel.base_kernel.raw_lengthscale,
        model.covar_module.inducing_points,
    ]
    with gpytorch.settings.max_cholesky_size(10**9), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.autograd.grad(mll(model(x.to(dtype)), y.to(dtype)), params)


def _rel(a, ref):
    return float((a.double() - ref).norm() / ref.norm())


# (n, d, m, lengthscale, noise, outputscale, seed): configurations of the session-28 table at n = 400, where the
# analytic path was 11-480x further off than GPyTorch float32 (and is now within 2.5x)
CASES = [
    (400, 1, 64, 0.3, 1e-2, 1.0, 0),
    (400, 3, 16, 2.0, 1e-4, 1.0, 0),
    (400, 1, 64, 2.0, 1e-1, 1.0, 2),
    (400, 3, 64, 0.3, 1e-1, 1.0, 1),
]

# Each error is the median over the points in their own order and in four shuffled orders (the same problem,
# rounded differently). GPyTorch float32's own error moves by 20x between orders (the noise gradient of the first
# case: 6.7e-5 to 1.5e-3 on an Intel Xeon), and by as much between CPUs in one order: compared order by order, the
# test passed on an AMD EPYC and failed on an Intel Xeon (ours 3.8e-4 against GPyTorch's lucky 6.7e-5) with nothing
# changed but the machine.
ORDERS = 5


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}-d{}-m{}-ls{}-noise{}-scale{}-seed{}".format(*c))
def test_float32_gradients_as_accurate_as_gpytorch_float32(case):
    n, d, m, ls, noise, scale, seed = case
    x, y, z = _data(n, d, m, noise, scale, seed)
    truth = _grads(x, y, z, noise, scale, ls, torch.float64, False)
    errors: dict[str, list[list[float]]] = {"ours": [], "gpytorch": []}
    gen = torch.Generator().manual_seed(100)
    for order in range(ORDERS):
        pts = torch.randperm(n, generator=gen) if order else torch.arange(n)
        ind = torch.randperm(m, generator=gen) if order else torch.arange(m)
        ref = [*truth[:3], truth[3][ind]]  # the inducing points' gradient follows their order
        for who, chunked in (("gpytorch", False), ("ours", True)):
            grads = _grads(x[pts], y[pts], z[ind], noise, scale, ls, torch.float32, chunked)
            errors[who].append([_rel(g, t) for g, t in zip(grads, ref)])
    names = ["noise", "outputscale", "lengthscale", "inducing points"]
    for j, name in enumerate(names):
        ours_err = statistics.median(e[j] for e in errors["ours"])
        gpytorch_err = statistics.median(e[j] for e in errors["gpytorch"])
        # a floor of a few float32 roundings, where GPyTorch's own error is at (or below) that level
        assert ours_err <= 5 * max(gpytorch_err, 1e-6), (name, ours_err, gpytorch_err)


def test_float64_still_matches_gpytorch_float64():
    x, y, z = _data(300, 3, 64, 1e-2, 1.0)
    ref = _grads(x, y, z, 1e-2, 1.0, 0.3, torch.float64, False)
    ours = _grads(x, y, z, 1e-2, 1.0, 0.3, torch.float64, True)
    for t, c in zip(ref, ours):
        assert _rel(c, t) < 1e-10


def test_fast_root_products_keeps_the_float32_products():
    """``bma_gp.settings.fast_root_products(True)`` takes the float32 products back (the old speed)."""
    import bma_gp

    x, y, z = _data(300, 3, 64, 1e-2, 1.0)
    exact = _grads(x, y, z, 1e-2, 1.0, 0.3, torch.float32, True)
    with bma_gp.settings.fast_root_products(True):
        fast = _grads(x, y, z, 1e-2, 1.0, 0.3, torch.float32, True)
    assert all(torch.isfinite(f).all() for f in fast)
    assert any(not torch.equal(e, f) for e, f in zip(exact, fast))
