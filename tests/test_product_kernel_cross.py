"""Products of block mean kernels predict at new inputs in closed form.

GPyTorch's ``ProductKernel`` multiplies its factors' covariances between different inputs as dense ``t x n``
matrices, so ``GroupKernel(k1) * GroupKernel(k2)`` (lme4's ``(1 | g1:g2)`` with variance ``v1 v2``) trained in
closed form but predicted at new inputs from the dense cross covariance, with a ``ClosedFormFallbackWarning``. Its
cross covariance is now a ``BlockCrossLinearOperator`` over the intersection of the factors' partitions, the
partition of the training covariance's product, and the prediction stays closed form. References: the dense joint
covariance of training and new points.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel

from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning, GroupKernel, Partition
from bma_gp.kernels import BlockCrossLinearOperator

pytestmark = pytest.mark.usefixtures("one_thread")

N, K1, K2 = 240, 6, 5


class Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    g1, g2 = torch.randint(0, K1, (N,), generator=gen), torch.randint(0, K2, (N,), generator=gen)
    # no training point at the pair (0, 0): a new point there has seen levels but an unseen pair
    g2[(g1 == 0) & (g2 == 0)] = 1
    x = torch.rand(N, generator=gen, dtype=torch.float64)
    g3 = torch.randint(0, 3, (N,), generator=gen)
    X = torch.stack([g1.double(), g2.double(), x, g3.double()], -1)
    y = torch.randn(N, generator=gen, dtype=torch.float64)
    t1 = torch.tensor([0, 1, 2, 3, 5, 0, 4])
    t2 = torch.tensor([0, 1, 2, 4, 3, 3, 2])
    t3 = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    Xt = torch.stack([t1.double(), t2.double(), torch.rand(7, generator=gen, dtype=torch.float64), t3.double()], -1)
    return X, y, Xt


def fitted(covar, X, y):
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 0.3
    model = Model(X, y, likelihood, covar).double()
    model.eval()
    return model


def reference(model, X, y, Xt):
    """Posterior mean and variance at ``Xt`` from the dense joint covariance."""
    n = X.shape[0]
    with gpytorch.settings.lazily_evaluate_kernels(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        K = model.covar_module(torch.cat([X, Xt])).to_dense().detach()
    noise = model.likelihood.noise.detach()
    Kxx = K[:n, :n] + noise * torch.eye(n, dtype=K.dtype)
    mean_x, mean_t = model.mean_module(X).detach(), model.mean_module(Xt).detach()
    mean = mean_t + K[n:, :n] @ torch.linalg.solve(Kxx, y - mean_x)
    var = K[n:, n:].diagonal() - (K[n:, :n] @ torch.linalg.solve(Kxx, K[:n, n:])).diagonal()
    return mean, var


def predict_quietly(model, Xt):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)  # the dense cross covariance warned
        out = model(Xt)
        return out.mean, out.variance.detach()


def group(k, dim, scale=False, value=None):
    kernel = GroupKernel(k, active_dims=[dim])
    if value is not None:
        kernel.var = value
    return ScaleKernel(kernel) if scale else kernel


@pytest.mark.parametrize(
    "make",
    [
        lambda X: group(K1, 0, value=1.3) * group(K2, 1, value=0.7),
        lambda X: ScaleKernel(group(K1, 0) * group(K2, 1, scale=True)),
        lambda X: group(K1, 0) * group(K2, 1) + group(K1, 0, value=0.4),  # (1 | g1) + (1 | g1:g2)
        lambda X: group(K1, 0) * group(K2, 1) * group(3, 3),  # three factors
        lambda X: group(K1, 0, value=1.3) * group(K1, 0, value=0.5),  # the same partition twice
    ],
    ids=["crossed", "scaled", "in_a_sum", "three", "same_partition"],
)
def test_group_products_predict_in_closed_form(make):
    X, y, Xt = data()
    model = fitted(make(X), X, y)
    mean, var = predict_quietly(model, Xt)
    ref_mean, ref_var = reference(model, X, y, Xt)
    mean = mean.detach()
    assert torch.allclose(mean, ref_mean, rtol=1e-10, atol=1e-10)
    assert torch.allclose(var, ref_var, rtol=1e-10, atol=1e-10)


def test_cross_is_one_hot_over_the_intersection():
    X, y, Xt = data()
    kernel = (group(K1, 0, value=1.3) * group(K2, 1, value=0.7)).double()
    kernel.eval()
    cross = kernel(Xt, X).evaluate_kernel()
    assert isinstance(cross, BlockCrossLinearOperator) and cross.is_one_hot
    pairs = torch.unique(X[:, 0].long() * K2 + X[:, 1].long())
    assert cross.partition.num_blocks == pairs.numel()
    assert cross.columns[0].item() == -1  # the pair (0, 0) has no training point: a zero row
    dense = 1.3 * 0.7 * ((Xt[:, :1] == X[:, 0]) & (Xt[:, 1:2] == X[:, 1])).double()
    assert torch.allclose(cross.to_dense(), dense)
    # the other order (training by new points) as well: blocks of the new points' pairs
    back = kernel(X, Xt).evaluate_kernel()
    assert isinstance(back, BlockCrossLinearOperator)
    assert torch.allclose(back.to_dense(), dense.mT)
    assert torch.allclose(cross.mT.to_dense(), dense.mT)


def test_block_mean_kernel_times_group_kernel():
    """A dense-valued factor (a ``BlockMeanKernel``'s cross covariance) times a one-hot one: ``t x k`` values over
    the intersection."""
    X, y, Xt = data(1)
    blocks = Partition.from_labels((X[:, 2] * 8).long().clamp(max=7))
    bm = BlockMeanKernel(ScaleKernel(RBFKernel(active_dims=[2])), X, blocks)
    model = fitted(bm * group(K2, 1, value=0.9), X, y)
    mean, var = predict_quietly(model, Xt)
    ref_mean, ref_var = reference(model, X, y, Xt)
    mean = mean.detach()
    assert torch.allclose(mean, ref_mean, rtol=1e-9, atol=1e-10)
    assert torch.allclose(var, ref_var, rtol=1e-9, atol=1e-10)
    cross = model.covar_module(Xt, X).evaluate_kernel()
    assert isinstance(cross, BlockCrossLinearOperator) and not cross.is_one_hot


def test_other_factors_keep_gpytorch_path():
    """A factor outside the family (an exact RBF kernel) leaves the product to GPyTorch: dense, exact, and its
    solves say so."""
    X, y, Xt = data(2)
    model = fitted(group(K1, 0) * RBFKernel(active_dims=[2]), X, y)
    with pytest.warns(ClosedFormFallbackWarning, match="no closed form"):
        out = model(Xt)
        mean, var = out.mean.detach(), out.variance.detach()
    ref_mean, ref_var = reference(model, X, y, Xt)
    assert torch.allclose(mean, ref_mean, rtol=1e-9, atol=1e-10)
    assert torch.allclose(var, ref_var, rtol=1e-9, atol=1e-10)


def test_gradients_through_the_structured_cross():
    """The predictive mean's gradient with respect to the factors' variances equals the dense reference's."""
    X, y, Xt = data(3)
    k1, k2 = group(K1, 0, value=1.1), group(K2, 1, value=0.6)
    model = fitted(k1 * k2, X, y)
    with gpytorch.settings.detach_test_caches(False):
        mean, _ = predict_quietly(model, Xt)
    got = torch.autograd.grad(mean.sum(), [k1.raw_var, k2.raw_var])
    model.prediction_strategy = None
    ref_mean, _ = reference(model, X, y, Xt)
    n = X.shape[0]
    with gpytorch.settings.lazily_evaluate_kernels(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        K = model.covar_module(torch.cat([X, Xt])).to_dense()
    Kxx = K[:n, :n] + model.likelihood.noise.detach() * torch.eye(n, dtype=K.dtype)
    dense_mean = K[n:, :n] @ torch.linalg.solve(Kxx, y - model.mean_module(X).detach())
    want = torch.autograd.grad(dense_mean.sum(), [k1.raw_var, k2.raw_var])
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
