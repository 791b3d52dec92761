"""Monte Carlo acquisition with two equal candidates in a q-batch (a batched optimiser of qEI moves candidates
together): the joint posterior covariance is singular, its Cholesky fails and the draw's root is the symmetric
square root of one eigendecomposition. Its square root had an infinite derivative at the zero eigenvalue, so the
gradient with respect to the candidates was NaN for the whole batch entry (and Adam then made the candidates NaN
for good); GPyTorch's dense path adds jitter and gives finite gradients. The root now treats eigenvalues that are 0
within rounding as 0 with derivative 0."""

from __future__ import annotations

import contextlib
import copy

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, GroupKernel, Partition
from gp_reference import GP

DTYPE = torch.float64


def model(kind: str) -> GP:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(40, 2, generator=generator, dtype=DTYPE)
    ids = (torch.arange(40) % 5).to(DTYPE).unsqueeze(-1)
    X = torch.cat([x, ids], -1)
    y = torch.sin(4 * x[:, 0]) + 0.3 * ids[:, 0] + 0.05 * torch.randn(40, generator=generator, dtype=DTYPE)
    cell = (x[:, 0] * 3).floor().clamp(max=2) * 3 + (x[:, 1] * 3).floor().clamp(max=2)
    labels = torch.unique(cell, return_inverse=True)[1]
    smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2, active_dims=[0, 1]))
    kernel = BlockMeanKernel(smooth, X, Partition.from_labels(labels))
    if kind == "plus groups":
        kernel = kernel + GroupKernel(6, active_dims=[2])
        likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=torch.full((40,), 0.02, dtype=DTYPE))
    else:
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
    out = GP(X, y, likelihood, kernel).to(DTYPE)
    return out.eval()


@pytest.mark.parametrize("kind", ["block mean", "plus groups"])
@pytest.mark.parametrize("gap", [0.0, 1e-9])
def test_draws_at_equal_candidates_have_finite_gradients(kind, gap):
    gp = model(kind)
    base = torch.randn(4, 1, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    X = torch.tensor([[[0.3, 0.6, 0.0], [0.3 + gap, 0.6, 0.0]]], dtype=DTYPE).requires_grad_(True)
    draws = gp(X).rsample(torch.Size([4]), base_samples=base)
    assert torch.isfinite(draws).all()
    draws.amax(-1).mean().backward()
    assert X.grad is not None and torch.isfinite(X.grad).all(), X.grad
    assert X.grad[..., :2].abs().sum() > 0  # the draws do depend on the candidates


# ---------------------------------------------------------------------------- approximate GPs with group kernels
class _SVGP(gpytorch.models.ApproximateGP):
    def __init__(self, inducing, kernel, learn=False):
        distribution = gpytorch.variational.CholeskyVariationalDistribution(inducing.shape[0])
        strategy = gpytorch.variational.VariationalStrategy(
            self, inducing, distribution, learn_inducing_locations=learn
        )
        super().__init__(strategy)
        self.mean_module, self.covar_module = gpytorch.means.ConstantMean(), kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@pytest.mark.parametrize("which", ["rbf + group", "group(slope) + rbf", "scale(group + rbf)"])
def test_approximate_gp_with_a_group_kernel_beside_a_dense_one_forms_no_n_by_n_matrix(which, monkeypatch):
    """An approximate GP asks for ``data_data_covar.add_jitter()`` and then only its diagonal; the package evaluated
    the lazy kernel tensor there, and a summand outside the family (RBF) formed the dense ``n x n`` matrix (10 GB at
    n = 50,000), without a warning. The values equal the same model's with the kernel's own diagonal."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n, m, groups = 600, 20, 12
    generator = torch.Generator().manual_seed(0)
    X = torch.stack(
        [torch.randint(0, groups, (n,), generator=generator).double(), torch.rand(n, generator=generator, dtype=DTYPE)],
        -1,
    )
    y = (torch.rand(n, generator=generator) < 0.5).double()
    rbf = gpytorch.kernels.RBFKernel(active_dims=[1])
    kernel = {
        "rbf + group": lambda: rbf + GroupKernel(groups, active_dims=[0]),
        "group(slope) + rbf": lambda: GroupKernel(groups, slope=True, active_dims=[0, 1]) + rbf,
        "scale(group + rbf)": lambda: gpytorch.kernels.ScaleKernel(GroupKernel(groups, active_dims=[0]) + rbf),
    }[which]()
    model = _SVGP(X[:m].clone(), kernel).to(DTYPE)

    class Squares(TorchDispatchMode):
        found = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if torch.is_tensor(out) and out.dim() >= 2 and tuple(out.shape[-2:]) == (n, n):
                Squares.found = True
            return out

    def run(model, detect: bool):
        torch.manual_seed(0)  # the variational distribution's first call initialises it with random noise
        model.train()
        model.zero_grad()
        elbo = gpytorch.mlls.VariationalELBO(gpytorch.likelihoods.BernoulliLikelihood(), model, num_data=n)
        with Squares() if detect else contextlib.nullcontext():
            value = elbo(model(X), y)
            value.backward()
            model.eval()
            with torch.no_grad():
                variance = model(X).variance
        grads = [p.grad.clone() for p in model.covar_module.parameters()]
        return value.detach(), variance, grads

    reference = copy.deepcopy(model)
    value, variance, grads = run(model, detect=True)
    assert not Squares.found
    import bma_gp._composition as composition

    monkeypatch.setattr(composition, "_has_dense_summand", lambda kernel: False)
    ref_value, ref_variance, ref_grads = run(reference, detect=True)
    assert Squares.found  # the evaluated kernel formed it
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(variance, ref_variance, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_fractional_group_id_names_the_inducing_points():
    kernel = GroupKernel(5)
    with pytest.raises(ValueError, match="inducing points"):
        kernel(torch.tensor([[3.998], [1.0]], dtype=DTYPE)).to_dense()
