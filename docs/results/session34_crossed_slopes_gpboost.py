"""``y ~ x + (1 + x || user) + (1 | item)`` on synthetic crossed data (n = 60,000; 3,000 users with uncorrelated
random intercepts and slopes, 400 items with Zipf-like popularity): the GP's maximum-likelihood fit, whose users'
intercept and slope are eliminated jointly with the items' table held as cells (checked: the fallback warning is an
error and the cells path is recorded), against gpboost's exact (``cholesky``) fit of the same model. Run from a
checkout:

    PYTHONPATH=. python docs/results/session34_crossed_slopes_gpboost.py
"""

import time
import warnings

import gpytorch
import numpy as np
import torch

import bma_gp.block_mean_sum_linear_operator as bms
from bma_gp import GroupKernel
from bma_gp._warnings import ClosedFormFallbackWarning

warnings.simplefilter("error", ClosedFormFallbackWarning)
torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
n, users, items = 60000, 3000, 400
u = torch.cat([torch.arange(users), torch.randint(users, (n - users,))])
pop = 1.0 / torch.arange(1, items + 1).double() ** 0.8
it = torch.cat([torch.arange(items), torch.multinomial(pop, n - items, replacement=True)])
xc = torch.rand(n)
b0, b1, c = 0.7 * torch.randn(users), 0.4 * torch.randn(users), 0.5 * torch.randn(items)
y = 1.0 + 0.5 * xc + b0[u] + b1[u] * xc + c[it] + 0.8 * torch.randn(n)
x = torch.stack([xc, u.double(), it.double()], -1)


class M(gpytorch.models.ExactGP):
    def __init__(s):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        s.mean_module = gpytorch.means.LinearMean(1)
        s.covar_module = GroupKernel(users, slope=True, correlated=False, active_dims=[1, 0]) + GroupKernel(
            items, active_dims=[2]
        )

    def forward(s, x):
        return gpytorch.distributions.MultivariateNormal(s.mean_module(x[..., :1]), s.covar_module(x))


used = []
orig = bms.BlockMeanSumLinearOperator._joint_cross
bms.BlockMeanSumLinearOperator._joint_cross = lambda self, *a: (lambda r: used.append(r is not None) or r)(
    orig(self, *a)
)
m = M()
m.train()
mll = gpytorch.mlls.ExactMarginalLogLikelihood(m.likelihood, m)
opt = torch.optim.LBFGS(
    m.parameters(), line_search_fn="strong_wolfe", max_iter=300, tolerance_grad=1e-9, tolerance_change=1e-13
)
calls = []


def closure():
    opt.zero_grad()
    l = -mll(m(x), y)
    l.backward()
    calls.append(1)
    return l


t = time.perf_counter()
opt.step(closure)
gp_s = time.perf_counter() - t
with torch.no_grad():
    ll = mll(m(x), y).item() * n
print(f"GP: {gp_s:.1f} s, {len(calls)} calls, cells path used: {any(used)}; loglik {ll:.4f}")
import gpboost as gpb

t = time.perf_counter()
g = gpb.GPModel(
    group_data=np.column_stack([u.numpy(), it.numpy()]),
    group_rand_coef_data=xc.numpy()[:, None],
    ind_effect_group_rand_coef=[1],
    likelihood="gaussian",
    matrix_inversion_method="cholesky",
)
g.fit(y=y.numpy(), X=np.column_stack([np.ones(n), xc.numpy()]), params={"trace": False})
print(
    f"gpboost (cholesky): {time.perf_counter() - t:.1f} s; loglik {-g.get_current_neg_log_likelihood():.4f}; cov pars {np.asarray(g.get_cov_pars()).ravel()}"
)
print(f"GP noise variance {m.likelihood.noise.item():.6f} (gpboost: the first of its cov pars)")
