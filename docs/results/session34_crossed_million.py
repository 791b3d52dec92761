"""Crossed random intercepts at n = 10^6 as in a recommender: ``GroupKernel(users) + GroupKernel(items)`` with every
user and item present, items drawn with a Zipf-like popularity (weight ``rank^-0.8``), a Gaussian likelihood,
float64. With ``--slopes``, ``(1 + x | user) + (1 | item)``: ``GroupKernel(users, slope=True)`` on a covariate ``x``
uniform on [0, 1] (the users' intercept and slope are eliminated jointly). Prints three training evaluations
(forward and backward of the exact marginal log-likelihood) and the process's peak RSS. Run from a checkout, with
n, users and items:

    PYTHONPATH=. python docs/results/session34_crossed_million.py 1000000 20000 2000 [--slopes]
"""

import resource
import sys
import time

import gpytorch
import torch

from bma_gp import GroupKernel


class Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, users, items, slopes=False):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        user = GroupKernel(users, slope=True, active_dims=[0, 2]) if slopes else GroupKernel(users, active_dims=[0])
        self.covar_module = user + GroupKernel(items, active_dims=[1])

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def crossed_ids(n: int, users: int, items: int):
    """The training rows' user and item ids (every user and item present, items by popularity ``rank^-0.8``) and the
    popularity, from torch's global generator."""
    u = torch.cat([torch.arange(users), torch.randint(users, (n - users,))])
    popularity = 1.0 / torch.arange(1, items + 1).double() ** 0.8
    it = torch.cat([torch.arange(items), torch.multinomial(popularity, n - items, replacement=True)])
    return u, it, popularity


def new_pairs(t: int, users: int, popularity):
    """``t`` new (user, item) pairs as model inputs, drawn as the training rows are."""
    return torch.stack(
        [torch.randint(users, (t,)).double(), torch.multinomial(popularity, t, replacement=True).double()], -1
    )


def main() -> None:
    torch.manual_seed(0)
    n, users, items = (int(a) for a in sys.argv[1:4])
    u, it, popularity = crossed_ids(n, users, items)
    slopes = "--slopes" in sys.argv
    columns = [u.double(), it.double()] + ([torch.rand(n, dtype=torch.float64)] if slopes else [])
    y = torch.randn(n, dtype=torch.float64)
    x = torch.stack(columns, -1)
    model = Model(x, y, users, items, slopes=slopes).double()
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    for _ in range(3):
        model.zero_grad()
        start = time.perf_counter()
        loss = -mll(model(x), y)
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"forward {middle - start:.2f} s, backward {end - middle:.2f} s, peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
