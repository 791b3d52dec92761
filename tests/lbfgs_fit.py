"""The LBFGS maximum-likelihood fit several tests share: an optimizer over a GP's parameters and its closure."""

from __future__ import annotations

import gpytorch
import torch

#: Tight tolerances for matching another package's optimum (statsmodels, lme4) to 1e-6 and better.
TIGHT = {"max_iter": 500, "history_size": 20, "tolerance_grad": 1e-12, "tolerance_change": 1e-16}


def lbfgs(model, x, y, **options):
    """``(optimizer, closure)``: LBFGS with a strong Wolfe line search on ``-ExactMarginalLogLikelihood / n``.
    ``closure()`` returns that loss (and leaves its gradients on the parameters)."""
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe", **options)

    def closure():
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        return loss

    return optimizer, closure
