"""GroupGaussianLikelihood / GroupNoise as a GPyTorch user drives them: GPyTorch's keywords and setters, bad
arguments and inputs (a ValueError or TypeError that names the argument and the fix, nothing half-changed)."""

from __future__ import annotations

import gpytorch
import numpy as np
import pytest
import torch

from bma_gp import GroupGaussianLikelihood, GroupKernel
from gp_reference import GP

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64
NOISE = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DTYPE)


def likelihood_and_prior(n=3, batch=()):
    """A likelihood with noises NOISE over 4 levels, a standard normal prior f over n points (batch ``batch``)
    and inputs whose column 1 holds the levels 0, 1, 2, ..."""
    likelihood = GroupGaussianLikelihood(4, group_dim=1).to(DTYPE)
    likelihood.noise = NOISE
    f = gpytorch.distributions.MultivariateNormal(
        torch.zeros(*batch, n, dtype=DTYPE), torch.eye(n, dtype=DTYPE).expand(*batch, n, n)
    )
    x = torch.stack([torch.zeros(n, dtype=DTYPE), torch.arange(n, dtype=DTYPE) % 4], -1)
    return likelihood, f, x


# ---------------------------------------------------------------------------- GPyTorch's noise= keyword
def test_explicit_noise_keyword_is_one_variance_per_point():
    """``likelihood(f, x, noise=...)``: an ``n x n`` matrix silently turned the distribution into a batch of ``n``;
    a number or a list crashed with "'float' object has no attribute 'shape'"."""
    likelihood, f, x = likelihood_and_prior()
    with torch.no_grad():
        for noise in (0.5, [0.5, 0.5, 0.5], torch.tensor([0.5], dtype=DTYPE), torch.full((3,), 0.5, dtype=DTYPE)):
            variance = likelihood(f, x, noise=noise).variance
            assert variance.shape == (3,)
            torch.testing.assert_close(variance, torch.full((3,), 1.5, dtype=DTYPE))
        torch.testing.assert_close(
            likelihood(f, x, noise=torch.tensor([1, 2, 3])).variance, torch.tensor([2.0, 3.0, 4.0], dtype=DTYPE)
        )
        # a Python number is taken in the likelihood's dtype, not rounded to float32 first
        torch.testing.assert_close(
            likelihood(f, x, noise=0.1).variance, torch.full((3,), 1.1, dtype=DTYPE), rtol=1e-15, atol=0
        )
        for bad in (torch.eye(3, dtype=DTYPE), torch.ones(5, dtype=DTYPE), torch.ones(2, 3, dtype=DTYPE)):
            with pytest.raises(ValueError, match=r"noise of shape .* one noise variance per point"):
                likelihood(f, x, noise=bad)
        with pytest.raises(TypeError, match="noise must"):
            likelihood(f, x, noise="0.5")
        # a batch of distributions takes one row of noises per batch entry
        likelihood, fb, x = likelihood_and_prior(batch=(2,))
        rows = torch.tensor([[0.5, 0.5, 0.5], [1.0, 2.0, 3.0]], dtype=DTYPE)
        torch.testing.assert_close(likelihood(fb, x, noise=rows).variance, 1.0 + rows)


# ---------------------------------------------------------------------------- the noise setter
@pytest.mark.parametrize("bad", [-1.0, 1e-5, float("nan")], ids=["negative", "below-bound", "nan"])
def test_noise_outside_the_constraint_raises_value_error_and_changes_nothing(bad):
    """``likelihood.noise = ...`` below the constraint was GPyTorch's RuntimeError telling the user to build a
    ``GaussianLikelihood``; it is a ValueError that names the noise, the constraint and noise_constraint=."""
    likelihood, _, _ = likelihood_and_prior()
    with pytest.raises(ValueError, match=r"noise holds .* outside the noise constraint GreaterThan.*noise_constraint="):
        likelihood.noise = torch.tensor([0.1, bad, 0.3, 0.4])
    torch.testing.assert_close(likelihood.noise.detach(), NOISE)  # nothing half-changed
    loose = GroupGaussianLikelihood(4, noise_constraint=gpytorch.constraints.GreaterThan(1e-8)).to(DTYPE)
    loose.noise = 1e-5
    torch.testing.assert_close(loose.noise.detach(), torch.full((4,), 1e-5, dtype=DTYPE))


def test_noise_setter_types():
    """Strings and complex numbers named neither the argument nor the fix (complex lost its imaginary part with only
    torch's warning); Python numbers and lists are taken in the likelihood's dtype, not rounded to float32 first."""
    likelihood, _, _ = likelihood_and_prior()
    for bad, match in (("0.1", "noise must be a number or a tensor"), (torch.ones(4, dtype=torch.complex64), "real")):
        with pytest.raises(TypeError, match=match):
            likelihood.noise = bad
    torch.testing.assert_close(likelihood.noise.detach(), NOISE)
    likelihood.noise = [0.1, 0.2, 0.3, 0.4]
    torch.testing.assert_close(likelihood.noise.detach(), NOISE, rtol=1e-14, atol=0)


def test_raw_noise_is_settable_as_for_gaussian_likelihood():
    """``likelihood.raw_noise = t`` and ``likelihood.initialize(raw_noise=t)`` (GaussianLikelihood has both) failed
    with "property 'raw_noise' ... has no setter"."""
    likelihood, _, _ = likelihood_and_prior()
    raw = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=DTYPE)
    expected = torch.nn.functional.softplus(raw) + 1e-4
    likelihood.raw_noise = raw
    torch.testing.assert_close(likelihood.noise.detach(), expected)
    likelihood.noise = NOISE
    likelihood.initialize(raw_noise=raw)
    torch.testing.assert_close(likelihood.noise.detach(), expected)
    assert [name for name, _ in likelihood.named_parameters()] == ["noise_covar.raw_noise"]


# ---------------------------------------------------------------------------- group ids
def test_group_ids_of_another_batch_shape_say_so():
    """Ids of batch shape (3,) for a batch of 2 distributions failed with torch's "Attempting to broadcast a
    dimension of length 3"; shapes that broadcast keep working."""
    likelihood, fb, x = likelihood_and_prior(batch=(2,))
    with pytest.raises(ValueError, match=r"group ids have batch shape \(3,\).*distribution's \(2,\)"):
        likelihood(fb, groups=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"group ids have batch shape \(3,\)"):
        likelihood(fb, torch.zeros(3, 3, 2, dtype=DTYPE))
    assert not bool(likelihood.observed.any())  # the refused ids were not recorded as trained (training mode)
    ids = torch.tensor([[0, 1, 2], [3, 3, 3]])
    with torch.no_grad():
        torch.testing.assert_close(likelihood(fb, groups=ids).variance, 1.0 + NOISE[ids])
        torch.testing.assert_close(likelihood(fb, x).variance, (1.0 + NOISE[[0, 1, 2]]).expand(2, 3))


# ---------------------------------------------------------------------------- constructor arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise_constraint": 1e-3}, r"noise_constraint must be a gpytorch\.constraints\.Interval.*GreaterThan"),
        ({"batch_shape": 2}, r"batch_shape must be a torch\.Size .*torch\.Size\(\[b\]\)"),
    ],
    ids=["constraint-number", "batch-int"],
)
def test_constructor_arguments_named(kwargs, match):
    """A number as noise_constraint failed with "float is not a Module subclass", an int batch_shape with "Value
    after * must be an iterable"; neither named the argument."""
    with pytest.raises(TypeError, match=match):
        GroupGaussianLikelihood(3, **kwargs)
    with pytest.raises(ValueError, match="batch_shape must hold sizes of 0 or more"):
        GroupGaussianLikelihood(3, batch_shape=(-1,))


def test_group_dim_takes_any_integer_like_num_groups():
    """``num_groups`` took NumPy integers, ``group_dim`` refused them (``df.columns.get_indexer(...)[0]``)."""
    likelihood = GroupGaussianLikelihood(np.int64(4), group_dim=np.int64(1), batch_shape=[2]).to(DTYPE)
    assert likelihood.group_dim == 1 and type(likelihood.group_dim) is int and likelihood.noise.shape == (2, 4)
    for bad in (1.0, True):
        with pytest.raises(TypeError, match="group_dim must be an int"):
            GroupGaussianLikelihood(4, group_dim=bad)


# ---------------------------------------------------------------------------- SGPR's trace term and groups=
def test_sgpr_trace_term_without_groups_says_why():
    """``mll(output, y, groups=ids)`` with an inducing-point kernel: ExactMarginalLogLikelihood hands groups= to the
    likelihood but not to the kernel's trace term, which then asked for "their group ids as groups=" - what the user
    had just passed. The message now says why and what works; the inputs, or train_inputs, give the same value."""
    x = torch.stack([torch.linspace(0, 1, 30, dtype=DTYPE), (torch.arange(30) % 4).to(DTYPE)], -1)
    y = torch.sin(6 * x[:, 0])

    def mll_value(likelihood, *args, **kwargs):
        sgpr = gpytorch.kernels.InducingPointKernel(
            gpytorch.kernels.RBFKernel(), x[:5, :1].clone(), likelihood=likelihood, active_dims=[0]
        )
        model = GP(x, y, likelihood, sgpr).to(DTYPE)
        likelihood.noise = NOISE
        model.train()
        return gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y, *args, **kwargs)

    with pytest.raises(ValueError, match=r"added loss terms .*inducing-point kernel.*not its groups="):
        mll_value(GroupGaussianLikelihood(4, group_dim=1), groups=x[:, 1].long())
    with_inputs = mll_value(GroupGaussianLikelihood(4, group_dim=1), x)
    stored = mll_value(GroupGaussianLikelihood(4, group_dim=1, train_inputs=x), groups=x[:, 1].long())
    torch.testing.assert_close(stored, with_inputs)


# ---------------------------------------------------------------------------- unseen levels (docs/mixed.md)
@pytest.mark.parametrize("prior", [False, True], ids=["no-prior", "gamma-prior"])
def test_unseen_level_is_moved_only_by_a_noise_prior(prior):
    """docs/mixed.md said an absent level "keeps its initial, unlearned noise parameter"; with a noise prior the
    prior's gradient moves it. The data's gradient for it is exactly 0 either way; the seen levels match a dense
    reference built by hand (K + diag(sigma^2[g]) and the prior's log density, per data point)."""
    n = 24
    g = torch.arange(n) % 3  # levels 0, 1, 2; level 3 is never seen
    x = torch.stack([torch.linspace(0, 1, n, dtype=DTYPE), g.to(DTYPE)], -1)
    y = torch.cos(5 * x[:, 0]) + 0.1 * g
    noise_prior = gpytorch.priors.GammaPrior(2.0, 4.0) if prior else None
    likelihood = GroupGaussianLikelihood(4, group_dim=1, train_inputs=x, noise_prior=noise_prior).to(DTYPE)
    model = GP(x, y, likelihood, GroupKernel(4, active_dims=[1])).to(DTYPE)
    likelihood.noise = NOISE
    model.train()
    loss = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
    (grad,) = torch.autograd.grad(loss, likelihood.raw_noise)
    raw = likelihood.raw_noise.detach().clone().requires_grad_(True)
    noise = likelihood.noise_covar.raw_noise_constraint.transform(raw)
    var = model.covar_module.var.detach()[0]
    covar = var * (g[:, None] == g[None, :]).to(DTYPE) + torch.diag(noise[g])
    mean = model.mean_module.constant.detach().expand(n)
    ref = torch.distributions.MultivariateNormal(mean, covar).log_prob(y)
    if prior:
        ref = ref + noise_prior.log_prob(noise).sum()
    (ref_grad,) = torch.autograd.grad(ref / n, raw)
    torch.testing.assert_close(loss.detach(), (ref / n).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert (grad[3] != 0) == prior


def test_stored_one_d_ids_are_checked_against_new_training_data():
    """1-D training ids were never compared with the model's inputs: after ``model.set_train_data`` with other
    groups the marginal likelihood silently used the old groups (2-D stored inputs raised)."""
    g = torch.Generator().manual_seed(0)
    n = 40

    def data():
        ids = torch.randint(0, 4, (n,), generator=g)
        x = torch.stack([torch.randn(n, dtype=torch.float64, generator=g), ids.double()], -1)
        return x, torch.randn(n, dtype=torch.float64, generator=g), ids

    X, y, ids = data()
    X2, y2, ids2 = data()
    likelihood = GroupGaussianLikelihood(4, group_dim=1, train_inputs=ids).double()

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(X, y, likelihood)
            self.covar = GroupKernel(4, active_dims=[1])

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(torch.zeros_like(x[..., 0]), self.covar(x))

    model = Model().double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    mll(model(X), y)  # the stored ids are these inputs' column: no complaint
    model.set_train_data(X2, y2, strict=False)
    with pytest.raises(ValueError, match="hold other group ids than the training inputs given to the likelihood"):
        mll(model(X2), y2)
    likelihood.set_train_inputs(ids2)  # the documented fix, with 1-D ids again
    mll(model(X2), y2)


def test_zero_d_groups_and_inputs_are_named():
    likelihood = GroupGaussianLikelihood(3)
    f = gpytorch.distributions.MultivariateNormal(torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="groups is a single number"):
        likelihood(f, groups=torch.tensor(1))
    with pytest.raises(ValueError, match="groups is a single number"):
        likelihood(f, groups=1)
    with pytest.raises(ValueError, match="inputs is a 0-d tensor"):
        likelihood(f, torch.tensor(1.0))
    with pytest.raises(ValueError, match="train_inputs is a 0-d tensor"):
        GroupGaussianLikelihood(3, train_inputs=torch.tensor(1.0))
    with pytest.raises(ValueError, match="train_inputs is a 0-d tensor"):
        likelihood.set_train_inputs(torch.tensor(1.0))
