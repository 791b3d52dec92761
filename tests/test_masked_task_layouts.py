"""Missing targets (``gpytorch.settings.observation_nan_policy("mask")``) in a batch-independent multi-output model
over group kernels: GPyTorch masks the ``t n x t n`` task layout (``MaskedLinearOperator``), whose solves and
log-determinant took a dense Cholesky up to ``max_cholesky_size`` and CG and Lanczos beyond without a word (a user
trial: at 300 points and 3 tasks the loss per point was -1.46812 against the exact -1.46807). The tasks are now one
operator over their blocks side by side, whose principal submatrix is closed form; the loss and prediction match the
dense per-task reference.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import GroupKernel
from closed_form_guard import closed_forms_only

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
N, T, LEVELS = 40, 3, 6


def _data():
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, LEVELS, (N,), generator=g)
    x = torch.stack([torch.rand(N, generator=g, dtype=DT), ids.to(DT)], -1)
    y = (torch.randn(T, N, generator=g, dtype=DT) + 0.3 * ids).T.contiguous()
    y[3, 0] = y[5, 1] = y[6, 1] = y[7, 2] = float("nan")
    return x, y


class _BatchIndependent(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, interleaved):
        super().__init__(x, y, likelihood)
        self.interleaved = interleaved
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=torch.Size([T]))
        self.covar_module = GroupKernel(LEVELS, batch_shape=torch.Size([T]), active_dims=[1])

    def forward(self, x):
        mvn = gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))
        return (
            gpytorch.distributions.MultitaskMultivariateNormal.from_batch_mvn(mvn, task_dim=-1)
            if self.interleaved
            else gpytorch.distributions.MultitaskMultivariateNormal.from_batch_mvn(mvn, task_dim=0)
        )


def _model(interleaved):
    x, y = _data()
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=T, rank=0, has_global_noise=False)
    model = _BatchIndependent(x, y, likelihood, interleaved).to(DT)
    with torch.no_grad():
        model.covar_module.var = torch.tensor([[0.3], [0.6], [1.0]], dtype=DT)
        likelihood.task_noises = torch.tensor([0.05, 0.1, 0.2], dtype=DT)
        model.mean_module.constant.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=DT))
    return model, x, y


def _dense_loss(model, x, y):
    """The masked Gaussian log-density task by task, over all ``n t`` values (GPyTorch's normalisation)."""
    total = 0.0
    same = (x[:, 1:2] == x[:, 1].unsqueeze(0)).to(DT)
    for j in range(T):
        seen = ~torch.isnan(y[:, j])
        K = model.covar_module.var[j, 0] * same + model.likelihood.task_noises[j] * torch.eye(N, dtype=DT)
        mean = model.mean_module.constant[j].expand(N)
        K, mean, target = K[seen][:, seen], mean[seen], y[seen, j]
        total = total + torch.distributions.MultivariateNormal(mean, K).log_prob(target)
    return total / (N * T)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "block_diagonal"])
@pytest.mark.parametrize("grad", [True, False], ids=["sums", "single_operators"])
def test_missing_targets_in_a_batch_independent_model_stay_closed_form(interleaved, grad):
    model, x, y = _model(interleaved)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with warnings.catch_warnings(), gpytorch.settings.observation_nan_policy("mask"), closed_forms_only(N):
        warnings.simplefilter("error")
        with torch.set_grad_enabled(grad):
            loss = mll(model(x), y)
    with torch.no_grad():
        expected = _dense_loss(model, x, y)
    torch.testing.assert_close(loss.detach(), expected)
    if grad:
        loss.backward()
        dense_model, _, _ = _model(interleaved)
        _dense_loss(dense_model, x, y).backward()
        torch.testing.assert_close(model.covar_module.raw_var.grad, dense_model.covar_module.raw_var.grad)


@pytest.mark.parametrize("layout", ["interleaved", "block_diagonal"])
def test_tasks_side_by_side_are_the_same_matrix_with_weights_and_a_root(layout):
    """The one operator of the tasks (``_tasks_as_one``) has the layout's entries, for a batch of sums with a dense
    and a diagonal ``B``, a random slope's weights and a low-rank root, and its masked principal submatrix solves as
    the dense one does."""
    from bma_gp import BlockMeanSumLinearOperator, Partition
    from bma_gp._composition import BlockMeanBlockDiagLinearOperator, BlockMeanInterleavedLinearOperator, _tasks_as_one

    g = torch.Generator().manual_seed(3)
    n = 12
    first, second = Partition.from_labels(torch.arange(n) % 3), Partition.from_labels(torch.arange(n) // 4)
    A = torch.randn(T, 3, 3, generator=g, dtype=DT)
    sums = BlockMeanSumLinearOperator(
        torch.rand(T, n, generator=g, dtype=DT) + 0.5,
        A @ A.mT / 3,
        torch.rand(T, 3, generator=g, dtype=DT),
        partitions=[first, second],
        root=torch.randn(T, n, 2, generator=g, dtype=DT),
        weights=[None, torch.linspace(-1, 1, n, dtype=DT)],
        diagonal=[False, True],
    )
    cls = BlockMeanInterleavedLinearOperator if layout == "interleaved" else BlockMeanBlockDiagLinearOperator
    tasks = cls(sums)
    one = _tasks_as_one(tasks)
    assert isinstance(one, BlockMeanSumLinearOperator)
    torch.testing.assert_close(one.to_dense(), tasks.to_dense())
    mask = torch.ones(T * n, dtype=torch.bool)
    mask[[1, 5, 17, 30]] = False
    principal = one._principal(mask)
    rhs = torch.randn(int(mask.sum()), 2, generator=g, dtype=DT)
    dense = tasks.to_dense()[mask][:, mask]
    torch.testing.assert_close(principal.solve(rhs), torch.linalg.solve(dense, rhs))
    torch.testing.assert_close(principal.logdet(), torch.logdet(dense))
