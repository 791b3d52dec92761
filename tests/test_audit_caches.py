"""Audit of the library's caches: stale results after a user changes what they were computed from, results of
another object after an id or address is reused, and module-level caches that keep objects alive."""

from __future__ import annotations

import gc
import weakref

import gpytorch
import pytest
import torch

import bma_gp.kernels._rbf_gram as rbf_gram
from bma_gp import ChunkedInducingPointKernel, GroupKernel, Partition
from bma_gp.kernels import BlockMeanKernel
from gp_reference import GP

DTYPE = torch.float64


def _data(n=40, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=DTYPE)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=DTYPE)
    return x, y, Partition.from_labels(torch.arange(n) % k)


# ---------------------------------------------------------------------------- BlockMeanKernel's block sums
@pytest.mark.parametrize(
    "make, change",
    [
        (lambda: gpytorch.kernels.MaternKernel(nu=2.5), lambda b: setattr(b, "nu", 0.5)),
        (lambda: gpytorch.kernels.PolynomialKernel(power=2), lambda b: setattr(b, "power", 3)),
        (
            lambda: gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()),
            lambda b: setattr(b, "base_kernel", gpytorch.kernels.MaternKernel(nu=0.5).to(DTYPE)),
        ),
    ],
    ids=["matern-nu", "polynomial-power", "inner-kernel-replaced"],
)
def test_block_sums_follow_kernel_settings_that_are_not_parameters(make, change):
    # the kept block sums were keyed by the base kernel's parameters and buffers only: a Matern kernel's nu, a
    # polynomial kernel's power or an inner kernel replaced by one with the same parameter names and values
    # returned the old kernel's block means
    x, _, partition = _data()
    base = make().to(DTYPE)
    kernel = BlockMeanKernel(base, x, partition)
    with torch.no_grad():
        before = kernel(x, x).to_dense().clone()
        change(base)
        after = kernel(x, x).to_dense()
        fresh = BlockMeanKernel(base, x, partition)(x, x).to_dense()
    assert not torch.allclose(before, fresh)
    torch.testing.assert_close(after, fresh)


def test_prediction_after_train_eval_follows_changed_nu():
    # GPyTorch drops its prediction caches in train(); the block sums outlived it and the next prediction used the
    # old nu's training covariance
    x, y, partition = _data()
    lik = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    base = gpytorch.kernels.MaternKernel(nu=2.5).to(DTYPE)
    model = GP(x, y, lik, BlockMeanKernel(base, x, partition)).eval()
    xt = torch.rand(6, 2, dtype=DTYPE)
    with torch.no_grad():
        first = model(xt).mean
        model.train()
        base.nu = 0.5
        model.eval()
        got = model(xt).mean
        ref_model = GP(x, y, lik, BlockMeanKernel(gpytorch.kernels.MaternKernel(nu=0.5).to(DTYPE), x, partition))
        ref_model.covar_module.base_kernel.load_state_dict(base.state_dict())
        ref = ref_model.eval()(xt).mean
    assert not torch.allclose(first, ref)
    torch.testing.assert_close(got, ref)


# ---------------------------------------------------------------------------- the RBF root's Gram matrices
def test_rbf_gram_registry_frees_losses_without_backward():
    # _GRAMS kept the Gram matrices of each L^{-T} until the tensor died, but their graphs hold L^{-T}: a training
    # loss computed without a backward pass (a loss logged, a forward that raised) stayed in the module for good,
    # with its n-vectors and its graph back to the model's parameters
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(60, 2, generator=g, dtype=DTYPE), torch.randint(4, (60, 1), generator=g).to(DTYPE)], -1)
    y = torch.sin(5 * x[:, 0])
    gc.collect()  # garbage of earlier tests (reference cycles) freed now, not during the count below
    before = len(rbf_gram._GRAMS)
    losses = []
    for _ in range(3):
        lik = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        covar = ChunkedInducingPointKernel(base, x[:5, :2].clone(), lik, active_dims=(0, 1))
        model = GP(x, y, lik, covar + GroupKernel(4, active_dims=[2])).to(DTYPE).train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
        loss = -mll(model(x), y)
        assert loss.requires_grad and len(rbf_gram._GRAMS) > before  # the closed form with the RBF factor ran
        losses.append(weakref.ref(loss))
        del lik, base, covar, model, mll, loss
    gc.collect()
    assert all(ref() is None for ref in losses)
    assert len(rbf_gram._GRAMS) == before
