"""ChunkedInducingPointKernel: GPyTorch's SGPR kernel with a row-chunked, checkpointed root.

Every number (marginal likelihood with the SGPR trace term, every gradient, posterior mean and variance)
must equal GPyTorch's ``InducingPointKernel`` on the same parameters, alone and summed with group kernels;
the autograd graph must hold ``U`` but not the base kernel's ``n x m`` intermediates.
"""

from __future__ import annotations

import copy

import gpytorch
import pytest
import torch

from bma_gp import ChunkedInducingPointKernel, GroupKernel
from closed_form_guard import closed_forms_only

DTYPE = torch.float64


class Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel_cls, groups: bool, chunk_rows=None):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2))
        gen = torch.Generator().manual_seed(3)
        inducing = x[torch.randperm(x.shape[0], generator=gen)[:12], :2].clone()
        kwargs = {} if kernel_cls is gpytorch.kernels.InducingPointKernel else {"chunk_rows": chunk_rows}
        covar = kernel_cls(smooth, inducing, likelihood, active_dims=(0, 1), **kwargs)
        if groups:
            covar = covar + GroupKernel(7, active_dims=[2]) + GroupKernel(4, active_dims=[3])
        self.covar_module = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def data(n=150, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(n, 2, generator=gen, dtype=DTYPE)
    g1, g2 = torch.randint(7, (n,), generator=gen), torch.randint(4, (n,), generator=gen)
    y = (
        torch.sin(5 * s[:, 0])
        + 0.5 * torch.randn(7, generator=gen, dtype=DTYPE)[g1]
        + 0.1 * torch.randn(n, generator=gen, dtype=DTYPE)
    )
    x = torch.cat([s, g1.to(DTYPE).unsqueeze(-1), g2.to(DTYPE).unsqueeze(-1)], -1)
    return x, y


def pair(groups: bool, chunk_rows: int):
    x, y = data()
    models = []
    for cls in (gpytorch.kernels.InducingPointKernel, ChunkedInducingPointKernel):
        torch.manual_seed(0)
        likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
        model = Model(x, y, likelihood, cls, groups, chunk_rows).to(DTYPE)
        models.append(model)
    models[1].load_state_dict(models[0].state_dict())
    return x, y, models


@pytest.mark.parametrize("groups", [False, True], ids=["sgpr", "sgpr+groups"])
@pytest.mark.parametrize("chunk_rows", [1, 40, 1000], ids=["rows1", "rows40", "onechunk"])
def test_training_matches_gpytorch(groups, chunk_rows):
    x, y, models = pair(groups, chunk_rows)
    losses, grads = [], []
    for model in models:
        model.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        with gpytorch.settings.max_cholesky_size(0) if groups else gpytorch.settings.max_cholesky_size(10_000):
            loss = -mll(model(x), y)
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    # in training the RBF root is never formed: U^T D^-1 U = A^T (K^T D^-1 K) A rounds differently (~1e-11)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-9, atol=0)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-9, atol=1e-12, msg=name)
    assert any("inducing_points" in name for name in grads[0]), "the inducing points must get a gradient"


def test_closed_form_with_groups():
    """Summed with group kernels it reaches the same closed-form operator: no CG, Lanczos or n x n factorisation."""
    x, y, (_, model) = pair(True, 40)
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(0):
        loss = -mll(model(x), y)
        loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("groups", [False, True], ids=["sgpr", "sgpr+groups"])
def test_predictions_match_gpytorch(groups):
    x, y, models = pair(groups, 40)
    gen = torch.Generator().manual_seed(9)
    xt = torch.cat(
        [
            torch.rand(30, 2, generator=gen, dtype=DTYPE),
            torch.randint(7, (30, 1), generator=gen).to(DTYPE),
            torch.randint(4, (30, 1), generator=gen).to(DTYPE),
        ],
        -1,
    )
    out = []
    for model in models:
        model.eval()
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(10_000):
            pred = model.likelihood(model(xt))
            at_train = model(x)
            out.append((pred.mean, pred.variance, at_train.mean, at_train.variance))
    for a, b in zip(out[1], out[0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert bool((out[1][1] > 0).all())


def _saved_bytes(model, x, y, at_least: int) -> int:
    """Bytes of the distinct tensors of at least ``at_least`` entries that the autograd graph of one training loss
    keeps for its backward pass."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.numel() >= at_least:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), gpytorch.settings.max_cholesky_size(0):
        loss = -mll(model(x), y)
    loss.backward()
    return sum(seen.values())


def test_graph_keeps_no_n_by_m_intermediates():
    n, m = 4000, 12
    x, y = data(n, seed=1)
    root_bytes = n * m * 8
    saved = {}
    for cls in (gpytorch.kernels.InducingPointKernel, ChunkedInducingPointKernel):
        torch.manual_seed(0)
        likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
        kwargs = {"chunk_rows": 500} if cls is ChunkedInducingPointKernel else {}
        model = Model(x, y, likelihood, gpytorch.kernels.InducingPointKernel, True).to(DTYPE)
        if cls is ChunkedInducingPointKernel:
            old = model.covar_module.kernels[0]
            model.covar_module.kernels[0] = ChunkedInducingPointKernel(
                old.base_kernel, old.inducing_points.detach().clone(), likelihood, active_dims=(0, 1), **kwargs
            ).to(DTYPE)
        saved[cls.__name__] = _saved_bytes(model, x, y, at_least=n * m // 2)
    # GPyTorch keeps several n x m tensors (distances, the kernel matrix, the root); the chunked (RBF) kernel in
    # training keeps none: the closed-form sum asks its root for U^T D^-1 U and the rest, formed block by block
    assert saved["InducingPointKernel"] >= 3 * root_bytes, saved
    assert saved["ChunkedInducingPointKernel"] == 0, saved


def test_deepcopy_and_arguments():
    x, y, (_, model) = pair(False, 40)
    kernel = model.covar_module
    assert copy.deepcopy(kernel).chunk_rows == 40
    kernel.analytic_rbf = False  # the generic (recomputed under autograd) path survives a copy too
    assert copy.deepcopy(kernel).analytic_rbf is False and copy.deepcopy(kernel).chunk_rows == 40
    smooth = gpytorch.kernels.RBFKernel()
    with pytest.raises(ValueError, match="chunk_rows"):
        ChunkedInducingPointKernel(smooth, torch.rand(3, 1), gpytorch.likelihoods.GaussianLikelihood(), chunk_rows=0)
    with pytest.raises(TypeError, match="chunk_rows"):
        ChunkedInducingPointKernel(smooth, torch.rand(3, 1), gpytorch.likelihoods.GaussianLikelihood(), chunk_rows=2.5)
