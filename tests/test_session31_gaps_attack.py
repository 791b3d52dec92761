"""Attack on session 31's gap fixes (the eager-mode bound-inputs check, constants times noisy Kronecker sums, whole
tasks of them). Each test failed before its fix and compares with the lazily evaluated model (GPyTorch's default,
which the check leaves alone) or with dense float64 linear algebra."""

from __future__ import annotations

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, Partition

pytestmark = pytest.mark.usefixtures("one_thread")

N = 16
DTYPE = torch.float64


def _data():
    gen = torch.Generator().manual_seed(11)
    groups = torch.randint(0, 4, (N,), generator=gen)
    x = torch.rand(N, 1, generator=gen, dtype=DTYPE)
    y = torch.sin(6 * x[:, 0])
    test_x = torch.rand(5, 1, generator=gen, dtype=DTYPE)
    return x, y, Partition.from_labels(groups), test_x


class _Reflect(gpytorch.kernels.Kernel):
    """``k(x, x') + k(1 - x, x')``: a custom wrapper that evaluates its base kernel at points of its own."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x1, x2, diag=False, **params):
        return self.base(x1, x2, diag=diag) + self.base(1 - x1, x2, diag=diag)


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, kernel, reflect_in_forward=False):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel
        self.reflect_in_forward = reflect_in_forward

    def forward(self, x):
        covar = self.covar_module(x)
        if self.reflect_in_forward:  # the same reflection, composed in the model's forward
            covar = covar + self.covar_module(1 - x, x)
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), covar)


def _value_and_mean(model, x, y, test_x, lazy):
    model.train()
    model.prediction_strategy = None
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with gpytorch.settings.lazily_evaluate_kernels(lazy):
        value = mll(model(x), y).detach()
        model.eval()
        with torch.no_grad():
            mean = model(test_x).mean
    model.train()
    return value, mean


@pytest.mark.parametrize("where", ["wrapper kernel", "model forward"])
def test_eager_check_leaves_a_block_mean_kernel_given_points_of_its_own(where):
    """A ``BlockMeanKernel`` that a custom kernel (or the model's ``forward``) evaluates at points of its own (here
    ``1 - x``, new points for it) trained and predicted eagerly as lazily before session 31; the eager check took
    those points for the model's training inputs and raised the ``set_train_data`` ``ValueError``. The check now
    reads only inputs whose columns are the model's training inputs: both modes agree again."""
    x, y, part, test_x = _data()
    base = BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, part)
    if where == "wrapper kernel":
        model = _GP(x, y, _Reflect(base)).double()
    else:
        model = _GP(x, y, base, reflect_in_forward=True).double()
    lazy_value, lazy_mean = _value_and_mean(model, x, y, test_x, lazy=True)
    eager_value, eager_mean = _value_and_mean(model, x, y, test_x, lazy=False)
    torch.testing.assert_close(eager_value, lazy_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(eager_mean, lazy_mean, rtol=1e-8, atol=1e-10)


def test_eager_check_still_refuses_the_models_inputs_the_kernel_is_not_bound_to():
    """The narrowed check keeps its true positives: ``model.set_train_data`` without ``kernel.set_train_data`` under
    ``lazily_evaluate_kernels(False)`` raises, in training and in eval mode, also inside the wrapper."""
    x, y, part, test_x = _data()
    model = _GP(x, y, _Reflect(BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, part))).double()
    model.set_train_data(x.flip(0), y.flip(0), strict=False)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        with pytest.raises(ValueError, match=r"training inputs do not match BlockMeanKernel\.train_x"):
            mll(model(x.flip(0)), y.flip(0))
        model.eval()
        with pytest.raises(ValueError, match=r"training inputs do not match BlockMeanKernel\.train_x"):
            model(test_x)


# ---------------------------------------------------------------- whole tasks in the task-major layout


@pytest.mark.parametrize("interleaved", [True, False])
def test_whole_tasks_match_gpytorchs_dense_twin_in_both_layouts(interleaved):
    """Guard (held under attack): ``mvn[..., j]`` and ``mvn[..., S]`` of a noisy Kronecker sum in the point-major
    (``interleaved=True``, ``M (x) K``) and the task-major layout (``interleaved=False``, ``K (x) M``) keep the closed
    form and equal GPyTorch's own indexing of the dense matrix (log-probabilities, covariances, variances)."""
    import warnings

    from linear_operator.operators import DenseLinearOperator

    from bma_gp import BlockMeanLinearOperator, ClosedFormFallbackWarning
    from bma_gp._composition import BlockMeanLCMLinearOperator
    from test_kronecker_block_mean import N as POINTS
    from test_kronecker_block_mean import T as TASKS
    from test_kronecker_block_mean import _build, _inputs, _partition

    op, _, _ = _build(*_inputs(()), _partition(), data_first=interleaved)
    op = op.detach()
    gen = torch.Generator().manual_seed(4)
    mean = torch.randn(POINTS, TASKS, generator=gen, dtype=DTYPE)
    y = torch.randn(POINTS, TASKS, generator=gen, dtype=DTYPE)
    mvn = gpytorch.distributions.MultitaskMultivariateNormal(mean, op, interleaved=interleaved)
    twin = gpytorch.distributions.MultitaskMultivariateNormal(
        mean, DenseLinearOperator(op.to_dense()), interleaved=interleaved
    )
    for index in (1, -1, torch.tensor([2, 0]), slice(0, 3, 2)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            sub = mvn[..., index]
            assert isinstance(sub.lazy_covariance_matrix, (BlockMeanLinearOperator, BlockMeanLCMLinearOperator))
            got = sub.log_prob(y[..., index].contiguous())
        ref = twin[..., index]
        with gpytorch.settings.max_cholesky_size(10**9):
            want = ref.log_prob(y[..., index].contiguous())
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sub.covariance_matrix, ref.covariance_matrix, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sub.variance, ref.variance, rtol=1e-12, atol=1e-12)
