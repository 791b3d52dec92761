"""Block mean kernels composed inside GPyTorch models as a GPyTorch user builds them (SGPR plus groupings, fixed
per-point noise, ScaleKernel / AdditiveKernel nesting), through a model's lifecycle: moving it to another dtype,
GPyTorch's settings, fantasy models. References are dense float64 posteriors computed by hand from the kernel's
joint matrix."""

from __future__ import annotations

import copy
import warnings

import gpytorch
import pytest
import torch
from gpytorch.kernels import AdditiveKernel, RBFKernel, ScaleKernel

from bma_gp import BlockMeanKernel, ChunkedInducingPointKernel, ClosedFormFallbackWarning, GroupKernel, Partition
from closed_form_guard import closed_forms_only
from gp_reference import GP, grouped_data

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:The input matches the stored training data"),
]

DTYPE = torch.float64
N = 60


def data():
    """Inputs ``(x0, x1, group id)``, targets, per-point noise, a partition and test inputs with a new id (6)."""
    inputs, y, xt, generator = grouped_data(n=N, dtype=DTYPE)
    noise = 0.01 + 0.05 * torch.rand(N, generator=generator, dtype=DTYPE)
    return inputs, y, noise, Partition.from_labels(torch.arange(N) % 6), xt


def likelihood_of(kind: str, noise: torch.Tensor):
    if kind == "gaussian":
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        likelihood.noise = 0.05
        return likelihood
    likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise.clone(), learn_additional_noise=True)
    likelihood.second_noise = 0.02
    return likelihood


def sgpr(likelihood):
    inducing = torch.linspace(-2, 2, 5, dtype=DTYPE).unsqueeze(-1)
    return ChunkedInducingPointKernel(ScaleKernel(RBFKernel()), inducing, likelihood, active_dims=[0])


def block_mean(inputs, partition):
    return BlockMeanKernel(ScaleKernel(RBFKernel(active_dims=[0, 1])), inputs, partition)


KERNELS = {
    "ScaleKernel(BlockMeanKernel)": lambda inputs, partition, likelihood: ScaleKernel(block_mean(inputs, partition)),
    "GroupKernel": lambda inputs, partition, likelihood: GroupKernel(7, active_dims=[2]),
    "ChunkedInducingPointKernel + GroupKernel": lambda inputs, partition, likelihood: (
        sgpr(likelihood) + GroupKernel(7, active_dims=[2])
    ),
    "ChunkedInducingPointKernel + BlockMeanKernel": lambda inputs, partition, likelihood: (
        sgpr(likelihood) + block_mean(inputs, partition)
    ),
    "ScaleKernel(AdditiveKernel(GroupKernel, ScaleKernel(BlockMeanKernel)))": lambda inputs, partition, likelihood: (
        ScaleKernel(AdditiveKernel(GroupKernel(7, active_dims=[2]), ScaleKernel(block_mean(inputs, partition))))
    ),
}


def model_of(name: str, noise_kind: str) -> GP:
    inputs, y, noise, partition, _ = data()
    likelihood = likelihood_of(noise_kind, noise)
    return GP(inputs, y, likelihood, KERNELS[name](inputs, partition, likelihood)).to(DTYPE)


def predict(model: GP, x: torch.Tensor):
    with torch.no_grad():
        pred = model(x)
        return pred.mean, pred.variance


# ---------------------------------------------------------------------------- moving a model to another dtype
@pytest.mark.parametrize("noise_kind", ["gaussian", "fixed"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_model_moved_to_float64_after_predicting_in_float32_predicts_in_float64(name, noise_kind):
    """``model.double()`` after a float32 prediction: ExactGP._apply converts the data and the parameters but keeps
    the cached prediction strategy. The block mean strategies then promoted their float32 solves into float64
    results with float32 accuracy (errors 1e-7, silently), and ChunkedInducingPointKernel's cached inverse root of
    K_ZZ failed with "expected m1 and m2 to have the same dtype"."""
    _, _, _, _, xt = data()
    model = model_of(name, noise_kind).float()
    model.eval()
    predict(model, xt.float())
    model.double()
    mean, variance = predict(model, xt)
    assert mean.dtype == variance.dtype == DTYPE

    reference = copy.deepcopy(model)  # the same float64 model, its caches built afresh
    reference.train()
    reference.eval()
    ref_mean, ref_variance = predict(reference, xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(variance, ref_variance, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "name", ["ChunkedInducingPointKernel + GroupKernel", "ChunkedInducingPointKernel + BlockMeanKernel"]
)
def test_sgpr_model_moved_to_float32_after_predicting_predicts_in_float32(name):
    _, _, _, _, xt = data()
    model = model_of(name, "fixed")
    model.eval()
    ref_mean, ref_variance = predict(model, xt)
    model.float()
    mean, variance = predict(model, xt.float())
    assert mean.dtype == variance.dtype == torch.float32
    torch.testing.assert_close(mean, ref_mean.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(variance, ref_variance.float(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- gpytorch.settings
@pytest.mark.parametrize("noise_kind", ["gaussian", "fixed"])
def test_dense_cholesky_warning_names_fast_computations_log_prob(noise_kind):
    """``fast_computations(log_prob=False)`` makes GPyTorch's log_prob use torch's, which asks for a Cholesky factor:
    training factorises the dense matrix. It warned about ``cholesky`` / ``MultivariateNormal.entropy`` only, which
    a user who trains never called; the warning names the setting that asked for it."""
    inputs, y, *_ = data()
    model = model_of("ChunkedInducingPointKernel + GroupKernel", noise_kind)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with gpytorch.settings.fast_computations(log_prob=False):
        with pytest.warns(ClosedFormFallbackWarning, match=r"fast_computations\(log_prob=False\)"):
            dense_loss = -mll(model(inputs), y)
    with closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        closed_loss = -mll(model(inputs), y)
    torch.testing.assert_close(dense_loss, closed_loss, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- training data the kernel is not bound to
@pytest.mark.parametrize(
    "name",
    [
        "ScaleKernel(BlockMeanKernel)",
        "ChunkedInducingPointKernel + BlockMeanKernel",
        "ScaleKernel(AdditiveKernel(GroupKernel, ScaleKernel(BlockMeanKernel)))",
    ],
)
def test_training_on_inputs_the_block_mean_kernel_is_not_bound_to_is_refused(name):
    """After ``model.set_train_data`` without the kernel's ``set_train_data`` the BlockMeanKernel takes the training
    inputs for new points: the training covariance was the exact base kernel's dense n x n matrix, trained by dense
    Cholesky with only a warning that the sum has no closed form. Eval mode raised; training now raises the same."""
    inputs, y, *_ = data()
    model = model_of(name, "gaussian")
    shifted = inputs[:40].clone()
    shifted[:, 0] += 0.5
    model.set_train_data(shifted, y[:40], strict=False)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with pytest.raises(ValueError, match=r"kernel\.set_train_data\(x, partition\)"):
        mll(model(shifted), y[:40])

    (kernel,) = [m for m in model.modules() if isinstance(m, BlockMeanKernel)]
    kernel.set_train_data(shifted, Partition.from_labels(torch.arange(40) % 4))  # what the message says
    with closed_forms_only(40), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        (-mll(model(shifted), y[:40])).backward()
    with gpytorch.settings.debug(False):  # the prior elsewhere, in training mode, is still the model's to give
        model(shifted[:5] + 1.0)


# ---------------------------------------------------------------------------- docs/gp.md's composition table
def test_fixed_noise_constant_in_every_block_keeps_one_block_mean_operator_in_training():
    """docs/gp.md: ``FixedNoiseGaussianLikelihood`` with a noise constant in every block (and needing no gradient)
    gives a ``BlockMeanLinearOperator``. In training it gave a ``BlockMeanSumLinearOperator``: the kernel's own
    ``lam`` (which needs gradients) was merged with the noise into one per-point diagonal, and a diagonal that needs
    gradients is not folded. The operator's ``lam`` is constant in its blocks by construction and is folded whatever
    needs gradients; the marginal likelihood and its gradient are the dense ones."""
    import math

    from bma_gp import BlockMeanLinearOperator

    inputs, y, _, partition, _ = data()
    noise = 0.01 * (1 + partition.labels.to(DTYPE))  # one value per block of the BlockMeanKernel's partition
    likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise, learn_additional_noise=False)
    model = GP(inputs, y, likelihood, ScaleKernel(block_mean(inputs, partition))).to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    k = partition.num_blocks
    with closed_forms_only(k + 1):  # nothing larger than the k x k core is factorised
        covariance = likelihood(model(inputs)).lazy_covariance_matrix
        assert isinstance(covariance, BlockMeanLinearOperator)
        loss = -mll(model(inputs), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))

    prior = model(inputs)
    dense = prior.lazy_covariance_matrix.to_dense() + torch.diag(noise)
    residual = y - prior.mean
    log_likelihood = -0.5 * (
        residual @ torch.linalg.solve(dense, residual) + torch.logdet(dense) + N * math.log(2 * math.pi)
    )
    ref_loss = -log_likelihood / N
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------- fantasy models
@pytest.mark.parametrize("noise_kind", ["gaussian", "fixed"])
def test_fantasy_model_of_sgpr_plus_groups_equals_the_dense_posterior_on_the_joint_data(noise_kind):
    """docs/gp.md, section 4: sums take GPyTorch's fantasy update (with ChunkedInducingPointKernel; GPyTorch's own
    InducingPointKernel copies itself into training mode). The fantasy model's prediction is the dense posterior on
    the training and fantasy points together, and nothing of the size of the data is factorised."""
    inputs, y, _, _, xt = data()
    model = model_of("ChunkedInducingPointKernel + GroupKernel", noise_kind)
    model.eval()
    new_x = torch.tensor([[0.3, -0.2, 1.0], [1.1, 0.4, 6.0], [-0.7, 0.0, 2.0]], dtype=DTYPE)
    new_y = torch.tensor([0.5, -1.0, 0.2], dtype=DTYPE)
    new_noise = torch.full((3,), 0.03, dtype=DTYPE)
    kwargs = {} if noise_kind == "gaussian" else {"noise": new_noise}
    with torch.no_grad(), closed_forms_only(N):
        model(xt)
        fantasy = model.get_fantasy_model(new_x, new_y, **kwargs)
        pred = fantasy(xt)
        mean, covariance = pred.mean, pred.covariance_matrix

    with torch.no_grad():
        joint = torch.cat([inputs, new_x, xt])
        prior = model.covar_module(joint).to_dense()
        prior_mean = model.mean_module(joint)
        noise = model.likelihood.noise.expand(N)
        if noise_kind == "gaussian":
            noise = torch.cat([noise, noise[:3]])
        else:  # the given fixed noise plus the learned second noise
            noise = torch.cat([noise, new_noise + model.likelihood.second_noise])
    m = N + 3
    train = prior[:m, :m] + torch.diag(noise)
    cross = prior[m:, :m]
    ref_mean = prior_mean[m:] + cross @ torch.linalg.solve(train, torch.cat([y, new_y]) - prior_mean[:m])
    ref_covariance = prior[m:, m:] - cross @ torch.linalg.solve(train, cross.mT)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(covariance, ref_covariance, rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------------------- multitask
class MultitaskGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=2)
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))


def test_group_kernel_in_a_multitask_kernel_says_where_its_active_dims_go():
    """GPyTorch's MultitaskKernel calls its data kernel's forward, which skips active_dims: a GroupKernel given
    active_dims=[2] received all three columns and asked for "active_dims=[j]", which the user had set. The message
    says the setting was bypassed and where it goes; with it there, the model predicts as the dense reference."""
    inputs, y, _, _, xt = data()
    targets = torch.stack([y, torch.cos(inputs[:, 0])], -1)

    def model_with(kernel):
        likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, rank=0)
        return MultitaskGP(inputs, targets, likelihood, kernel).to(DTYPE)

    model = model_with(gpytorch.kernels.MultitaskKernel(GroupKernel(7, active_dims=[2]), num_tasks=2))
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with pytest.raises(ValueError, match=r"active_dims=\[2\] were not applied.*MultitaskKernel\(GroupKernel"):
        mll(model(inputs), targets)

    model = model_with(gpytorch.kernels.MultitaskKernel(GroupKernel(7), num_tasks=2, active_dims=[2]))
    model.eval()
    with torch.no_grad():
        pred = model(xt)
        mean, variance = pred.mean.reshape(-1), pred.variance.reshape(-1)
        joint = torch.cat([inputs, xt])
        prior = model.covar_module(joint).to_dense()  # interleaved: (point, task)
        prior_mean = model.mean_module(joint)
        noise = model.likelihood._shaped_noise_covar((N, 2)).to_dense()
    m = 2 * N
    train = prior[:m, :m] + noise
    cross = prior[m:, :m]
    ref_mean = prior_mean[N:].reshape(-1) + cross @ torch.linalg.solve(train, (targets - prior_mean[:N]).reshape(-1))
    ref_variance = prior[m:, m:].diagonal() - (cross * torch.linalg.solve(train, cross.mT).mT).sum(-1)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(variance, ref_variance, rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------------------- gradients of repeated predictions
@pytest.mark.parametrize(
    ("name", "noise_kind"),
    [
        ("ScaleKernel(BlockMeanKernel)", "fixed"),
        ("ChunkedInducingPointKernel + GroupKernel", "gaussian"),
        ("ChunkedInducingPointKernel + BlockMeanKernel", "fixed"),
    ],
)
def test_repeated_predictions_differentiate_with_respect_to_the_test_inputs(name, noise_kind):
    """An acquisition function is optimised by predicting and differentiating with respect to the test inputs again
    and again (eval mode, ``detach_test_caches`` on, GPyTorch's default). The sums' weight ``W`` was rebuilt per call
    from GPyTorch's memoised training covariance, and ChunkedInducingPointKernel kept the inverse root of ``K_ZZ``
    with its graph: the second backward pass failed with "Trying to backward through the graph a second time". The
    gradients equal those of GPyTorch's dense path on the same model."""
    from gp_reference import dense_copy

    _, _, _, _, xt = data()
    model = model_of(name, noise_kind)
    model.eval()
    reference = dense_copy(model)
    for step in range(3):
        grads = []
        for m in (model, reference):
            x = torch.cat([xt[:, :2] + 0.1 * step, xt[:, 2:]], -1).requires_grad_(True)  # new smooth inputs
            with warnings.catch_warnings(), gpytorch.settings.max_cholesky_size(10**6):
                warnings.simplefilter("ignore", ClosedFormFallbackWarning)  # the reference's dense solves
                pred = m(x)
                (pred.mean.sum() + pred.variance.sqrt().sum()).backward()
            grads.append(x.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)
