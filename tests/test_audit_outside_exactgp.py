"""Audit: the package's kernels used outside the plain ExactGP of docs/gp.md (approximate GPs, compositions with
GPyTorch's kernels, other inputs than the training inputs, GPyTorch's settings), against dense references built
from the same hyperparameters."""

import gpytorch
import pytest
import torch
from linear_operator import to_dense

from bma_gp import BlockMeanKernel, ChunkedInducingPointKernel, GroupKernel, Partition, block_mean
from closed_form_guard import closed_forms_only
from gp_reference import GP as _ExactGP

DTYPE = torch.float64


class _SVGP(gpytorch.models.ApproximateGP):
    def __init__(self, inducing, covar_module, learn_inducing_locations=True):
        distribution = gpytorch.variational.CholeskyVariationalDistribution(inducing.shape[-2])
        strategy = gpytorch.variational.VariationalStrategy(
            self, inducing, distribution, learn_inducing_locations=learn_inducing_locations
        )
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class _DenseGroups(gpytorch.kernels.Kernel):
    """``v [g == g']`` over the ids in column 0, densely: the reference for ``GroupKernel``."""

    def __init__(self, var, **kwargs):
        super().__init__(**kwargs)
        self.var = var

    def forward(self, x1, x2, diag=False, **params):
        covar = self.var * (x1[..., :, 0:1] == x2[..., :, 0].unsqueeze(-2)).to(x1.dtype)
        return covar.diagonal(dim1=-2, dim2=-1) if diag else covar


def _line(n=48, blocks=8):
    x = torch.linspace(0, 1, n, dtype=DTYPE).unsqueeze(-1)
    return x, torch.sin(6 * x[:, 0]), Partition.from_labels(torch.arange(n) * blocks // n)


@pytest.mark.parametrize("inducing", ["subset", "train_x"])
@pytest.mark.parametrize("mll", [gpytorch.mlls.VariationalELBO, gpytorch.mlls.PredictiveLogLikelihood])
def test_block_mean_kernel_in_an_approximate_gp_is_refused(inducing, mll):
    """The variational strategy evaluates the kernel on ``cat(inducing_points, x)``, which the kernel took for new
    points (or, with the inducing points equal to ``train_x``, for its training points followed by new points): the
    ELBO was silently the base kernel's, not the block mean approximation's, with no error and no warning."""
    x, y, partition = _line()
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).to(DTYPE)
    z = x[::6].clone() if inducing == "subset" else x.clone()
    model = _SVGP(z, BlockMeanKernel(base, x, partition)).to(DTYPE)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    objective = mll(likelihood, model, num_data=x.shape[0])
    with pytest.raises(NotImplementedError, match=r"not supported in an ApproximateGP.*Use the base kernel itself"):
        objective(model(x), y)
    model.eval()
    with pytest.raises(NotImplementedError, match="ApproximateGP"):
        model(x[:5])
    # the prior is the kernel's at the given inputs: the block mean matrix at the training inputs
    prior = model(x, prior=True).covariance_matrix
    expected = block_mean(to_dense(base(x, x)), partition).to_dense()
    torch.testing.assert_close(prior, expected, rtol=1e-10, atol=1e-12)


def test_group_kernel_in_an_approximate_gp_matches_a_dense_reference():
    """``GroupKernel`` is a kernel of the ids alone, so it works in an ApproximateGP (inducing points of any ids):
    the ELBO and the predictions equal those with the same covariance written densely."""
    torch.manual_seed(0)
    n = 40
    x = torch.stack([torch.rand(n, dtype=DTYPE), torch.randint(0, 5, (n,)).to(DTYPE)], -1)
    y = torch.randn(n, dtype=DTYPE)
    z = torch.stack([torch.linspace(0, 1, 5, dtype=DTYPE), torch.arange(5).to(DTYPE)], -1)
    group = GroupKernel(5, active_dims=[1]).to(DTYPE)
    group.var = 0.7
    smooth = gpytorch.kernels.RBFKernel(active_dims=[0]).to(DTYPE)
    ours = _SVGP(z, smooth + group, learn_inducing_locations=False).to(DTYPE)
    reference = _SVGP(z, smooth + _DenseGroups(group.var.detach(), active_dims=[1]), False).to(DTYPE)
    with torch.no_grad():
        ours.variational_strategy._variational_distribution.variational_mean.normal_()
    ours.variational_strategy.variational_params_initialized.fill_(1)  # else the first call redraws the mean
    reference.variational_strategy.load_state_dict(ours.variational_strategy.state_dict())
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    for mll in (gpytorch.mlls.VariationalELBO, gpytorch.mlls.PredictiveLogLikelihood):
        values = [mll(likelihood, model, num_data=n)(model(x), y) for model in (ours, reference)]
        torch.testing.assert_close(values[0], values[1], rtol=1e-10, atol=1e-12)
    ours.eval(), reference.eval()
    with torch.no_grad():
        got, expected = ours(x[:7]), reference(x[:7])
    torch.testing.assert_close(got.mean, expected.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.covariance_matrix, expected.covariance_matrix, rtol=1e-10, atol=1e-12)


def test_chunked_inducing_point_kernel_in_an_approximate_gp_is_refused_in_words():
    """In training mode the SGPR kernel is defined between equal inputs only; the variational strategy evaluates it
    between the inducing points and the data, which failed with GPyTorch's "x1 should equal x2 in training mode"
    although the model never passes two inputs: now an error that names the kernel and what to use instead."""
    x, y, _ = _line()
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    model = _SVGP(x[::6].clone(), ChunkedInducingPointKernel(base, x[::12].clone(), likelihood)).to(DTYPE)
    elbo = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=x.shape[0])
    with pytest.raises(NotImplementedError, match=r"ChunkedInducingPointKernel.*use the base kernel itself"):
        elbo(model(x), y)


@pytest.mark.parametrize("kind", ["block mean", "two groupings"])
def test_nan_mask_policy_keeps_the_closed_forms(kind):
    """Under ``gpytorch.settings.observation_nan_policy("mask")`` GPyTorch wraps the noisy training covariance in a
    ``MaskedLinearOperator`` (the rows and columns of the observed targets), which has no structure: the marginal
    likelihood and the posterior mean's solve took a dense Cholesky (CG and Lanczos past max_cholesky_size) without
    a word. The principal submatrix at the observed points is again a block mean operator (or sum): closed form, the
    same value and gradients as the dense likelihood of the observed points."""
    torch.manual_seed(0)
    n = 60
    ids = [torch.randint(0, k, (n,)).to(DTYPE) for k in (6, 4)]
    x = torch.stack([torch.rand(n, dtype=DTYPE), *ids], -1)
    y = torch.sin(5 * x[:, 0]) + 0.1 * torch.randn(n, dtype=DTYPE)
    y[[3, 17, 40]] = float("nan")
    observed = ~torch.isnan(y)
    if kind == "block mean":
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0]))
        covar_module = BlockMeanKernel(base, x, Partition.from_labels(torch.arange(n) // 6))
    else:
        covar_module = GroupKernel(6, per_group_variance=True, active_dims=[1]) + GroupKernel(4, active_dims=[2])
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    model = _ExactGP(x, y, likelihood, covar_module).to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    with gpytorch.settings.observation_nan_policy("mask"), closed_forms_only(n - 10):
        value = mll(model(x), y)
        grads = torch.autograd.grad(value, list(model.parameters()))

    with gpytorch.settings.lazily_evaluate_kernels(False):
        covar = to_dense(covar_module(x, x)) + likelihood.noise * torch.eye(n, dtype=DTYPE)
    mean = model.mean_module(x)[observed]
    reference = torch.distributions.MultivariateNormal(mean, covar[observed][:, observed]).log_prob(y[observed]) / n
    expected = torch.autograd.grad(reference, list(model.parameters()))
    torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)

    model.eval()
    test_x = x[:9] + torch.tensor([0.01, 0.0, 0.0], dtype=DTYPE)
    with torch.no_grad(), gpytorch.settings.observation_nan_policy("mask"), closed_forms_only(n - 10):
        pred_mean = model(test_x).mean
    with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False):
        cross = to_dense(covar_module(test_x, x))[:, observed]
        alpha = torch.linalg.solve(covar[observed][:, observed], y[observed] - mean)
    torch.testing.assert_close(pred_mean, model.mean_module(test_x) + cross @ alpha, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "structure", [gpytorch.kernels.AdditiveStructureKernel, gpytorch.kernels.ProductStructureKernel]
)
def test_chunked_inducing_point_kernel_refuses_last_dim_is_batch_in_words(structure):
    """A structure kernel evaluates its base kernel with ``last_dim_is_batch=True``, which GPyTorch's forward ignores:
    one ``n x n`` matrix came back where a batch over the columns was expected, and the structure kernel failed with
    a shape error ("base_linear_op must be a batch matrix"). Like ``BlockMeanKernel`` and ``GroupKernel``, the kernel
    now refuses the mode in words; the structure kernel inside it works and equals GPyTorch's."""
    torch.manual_seed(0)
    x, z = torch.rand(20, 2, dtype=DTYPE), torch.rand(4, 2, dtype=DTYPE)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    kernel = structure(ChunkedInducingPointKernel(gpytorch.kernels.RBFKernel(), z, likelihood), num_dims=2)
    with pytest.raises(NotImplementedError, match=r"last_dim_is_batch.*Put the structure kernel inside it"):
        to_dense(kernel.to(DTYPE)(x, x))
    inner = gpytorch.kernels.AdditiveStructureKernel(gpytorch.kernels.RBFKernel(), num_dims=2)
    ours = ChunkedInducingPointKernel(inner, z, likelihood).to(DTYPE)
    theirs = gpytorch.kernels.InducingPointKernel(inner, z, likelihood).to(DTYPE)
    torch.testing.assert_close(to_dense(ours(x, x)), to_dense(theirs(x, x)), rtol=1e-10, atol=1e-12)


_SETTINGS = {
    "fast_pred_var": gpytorch.settings.fast_pred_var,
    "fast_pred_samples": gpytorch.settings.fast_pred_samples,
    "skip_logdet_forward": gpytorch.settings.skip_logdet_forward,
    "max_cholesky_size(0)": lambda: gpytorch.settings.max_cholesky_size(0),
    "max_cholesky_size(10**6)": lambda: gpytorch.settings.max_cholesky_size(10**6),
    "cholesky_jitter": lambda: gpytorch.settings.cholesky_jitter(1e-2, 1e-2),
    "debug": lambda: gpytorch.settings.debug(True),
    "deterministic_probes": gpytorch.settings.deterministic_probes,
}


@pytest.mark.parametrize("setting", list(_SETTINGS))
def test_gpytorch_settings_change_neither_path_nor_values(setting):
    """No GPyTorch setting sends a block mean model to CG, Lanczos or a dense factorisation, or changes its numbers:
    the marginal likelihood (``skip_logdet_forward`` included: the closed-form log-determinant costs nothing, as
    GPyTorch's own Cholesky path below ``max_cholesky_size`` also computes it), the predictive mean and variance and a
    posterior draw's root equal the dense computation from the same hyperparameters."""
    x, y, partition = _line(n=60, blocks=10)
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    model = _ExactGP(x, y, likelihood, BlockMeanKernel(base, x, partition)).to(DTYPE)
    test_x = torch.linspace(0.05, 0.95, 7, dtype=DTYPE).unsqueeze(-1)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    with _SETTINGS[setting](), closed_forms_only(50):
        value = mll(model(x), y)
        model.eval()
        with torch.no_grad():
            pred = model(test_x)
            mean, covar = pred.mean, pred.covariance_matrix
            root = pred.lazy_covariance_matrix.root_decomposition().root.to_dense()

    joint = torch.cat([x, test_x])
    labels = torch.cat([partition.labels, torch.arange(10, 17)])
    dense = block_mean(to_dense(base(joint, joint)), Partition.from_labels(labels)).to_dense().detach()
    noisy = dense[:60, :60] + likelihood.noise.detach() * torch.eye(60, dtype=DTYPE)
    prior_mean = model.mean_module.constant.detach()
    reference = torch.distributions.MultivariateNormal(prior_mean.expand(60), noisy).log_prob(y) / 60
    torch.testing.assert_close(value.detach(), reference, rtol=1e-10, atol=1e-12)
    cross = dense[60:, :60]
    torch.testing.assert_close(mean, prior_mean + cross @ torch.linalg.solve(noisy, y - prior_mean))
    expected = dense[60:, 60:] - cross @ torch.linalg.solve(noisy, cross.mT)
    torch.testing.assert_close(covar, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(root @ root.mT, expected, rtol=1e-8, atol=1e-10)


def test_active_dims_around_a_block_mean_kernel_are_named_in_the_error():
    """``ScaleKernel(BlockMeanKernel(base, x, partition), active_dims=[0])`` hands the kernel one column of the
    model's two, which it never takes for its training inputs: the refusal said "After model.set_train_data(x, y),
    also call kernel.set_train_data", wrong advice for a model whose data never changed. It now names the columns and
    active_dims; bound to the column it is given, the same model trains on the block mean approximation."""
    torch.manual_seed(0)
    x = torch.rand(40, 2, dtype=DTYPE)
    y = torch.sin(5 * x[:, 0])
    partition = Partition.from_labels(torch.arange(40) // 5)
    for bound, raises in [(x, True), (x[:, [0]], False)]:
        kernel = gpytorch.kernels.ScaleKernel(
            BlockMeanKernel(gpytorch.kernels.RBFKernel(), bound, partition), active_dims=[0]
        )
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = _ExactGP(x, y, likelihood, kernel).to(DTYPE)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        if raises:
            with pytest.raises(ValueError, match=r"train_x with 2 columns but is given inputs with 1 .*active_dims"):
                mll(model(x), y)
        else:
            output = model(x)
            assert (
                type(likelihood(output).lazy_covariance_matrix.evaluate_kernel()).__name__ == "BlockMeanLinearOperator"
            )
            assert torch.isfinite(mll(output, y))
