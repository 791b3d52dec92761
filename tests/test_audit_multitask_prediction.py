"""Prediction of GPyTorch's batch-independent multi-output models (``MultitaskMultivariateNormal.from_batch_mvn`` with a
``MultitaskGaussianLikelihood(rank=0)``) on block mean and group kernels, and indexing / batch sums of the layout
operators their covariances are.

The posterior is compared with a dense reference computed here, task by task, from the model's own kernel matrices.
"""

from __future__ import annotations

import copy
import warnings

import gpytorch
import pytest
import torch
from linear_operator.operators import BlockDiagLinearOperator, BlockInterleavedLinearOperator, DiagLinearOperator
from torch.utils._python_dispatch import TorchDispatchMode

from bma_gp import BlockMeanKernel, BlockMeanLinearOperator, ClosedFormFallbackWarning, GroupKernel, Partition
from bma_gp._composition import (
    BlockMeanBlockDiagLinearOperator,
    BlockMeanInterleavedLinearOperator,
    FallbackIndexedLinearOperator,
)
from bma_gp.kernels.task_prediction_strategy import TaskPredictionStrategy
from closed_form_guard import closed_forms_only

DTYPE = torch.float64
N, T = 40, 3
TASKS = torch.Size([T])


class BatchGP(gpytorch.models.ExactGP):
    """GPyTorch's batch-independent multi-output model, as its tutorial builds it."""

    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=TASKS)
        self.covar_module = kernel

    def forward(self, x):
        mvn = gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))
        return gpytorch.distributions.MultitaskMultivariateNormal.from_batch_mvn(mvn)


def make_model(kind: str, dtype=DTYPE):
    """A model on a ``BlockMeanKernel`` (``kind="block"``) or ``GroupKernel`` (``"group"``), its training inputs and
    new inputs."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(N, 1, generator=generator, dtype=DTYPE)
    ids = torch.randint(0, 6, (N, 1), generator=generator).to(DTYPE)
    y = torch.randn(N, T, generator=generator, dtype=DTYPE)
    if kind == "block":
        rbf = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(batch_shape=TASKS), batch_shape=TASKS)
        rbf.outputscale = torch.tensor([0.5, 1.0, 2.0])
        rbf.base_kernel.lengthscale = torch.tensor([0.2, 0.5, 1.0]).view(T, 1, 1)
        partition = Partition.from_labels((x[:, 0] * 5).long().clamp(max=4))
        kernel, inputs, new = BlockMeanKernel(rbf, x, partition), x, torch.rand(7, 1, generator=generator, dtype=DTYPE)
    else:
        kernel = gpytorch.kernels.ScaleKernel(GroupKernel(6, batch_shape=TASKS), batch_shape=TASKS)
        kernel.outputscale = torch.tensor([0.5, 1.0, 2.0])
        inputs, new = ids, torch.tensor([[0.0], [1.0], [5.0], [2.0]], dtype=DTYPE)
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=T, rank=0)
    likelihood.task_noises = torch.tensor([0.1, 0.2, 0.3])
    model = BatchGP(inputs, y, likelihood, kernel).to(dtype).eval()
    return model, inputs.to(dtype), new.to(dtype)


def dense_posterior(model, new, observed=None):
    """The posterior mean ``(t, T)`` and interleaved covariance ``(t T, t T)`` at ``new``, by dense solves per task
    on the model's kernel matrices, in float64; ``observed`` ``(n, T)``: each task conditioned on its rows there."""
    model = copy.deepcopy(model).double()
    x = model.train_inputs[0].to(DTYPE)
    new = new.to(DTYPE)
    n = x.shape[-2]
    with torch.no_grad():
        full = torch.cat([x, new], -2)
        if torch.equal(new, x):  # a BlockMeanKernel would take the second copy for new points
            full = x
        C = model.covar_module(full).to_dense()  # (T, n + t, n + t)
        if torch.equal(new, x):
            C = C.repeat(1, 2, 2)
        m = model.mean_module(torch.cat([x, new], -2))  # (T, n + t)
        noise = model.likelihood.task_noises + model.likelihood.noise
    K = C[:, :n, :n] + torch.diag_embed(noise.unsqueeze(-1).expand(T, n))
    cross = C[:, n:, :n]
    residual = model.train_targets.to(DTYPE).mT - m[:, :n]
    if observed is None:
        mean = m[:, n:] + (cross @ torch.linalg.solve(K, residual.unsqueeze(-1))).squeeze(-1)
        covar = C[:, n:, n:] - cross @ torch.linalg.solve(K, cross.mT)
        return mean.mT, BlockInterleavedLinearOperator(covar).to_dense()
    means, covars = [], []
    for task in range(T):
        kept = observed[:, task]
        A, Kt = cross[task][:, kept], K[task][kept][:, kept]
        means.append(m[task, n:] + A @ torch.linalg.solve(Kt, residual[task, kept]))
        covars.append(C[task, n:, n:] - A @ torch.linalg.solve(Kt, A.mT))
    return torch.stack(means, -1), BlockInterleavedLinearOperator(torch.stack(covars)).to_dense()


class WideMatrices(TorchDispatchMode):
    """Records every operation that returns an interleaved covariance with the training points: a matrix with
    ``n T`` rows or columns and ``n T`` or ``t T`` on the other side."""

    def __init__(self, n: int, t: int):
        super().__init__()
        self.n, self.t, self.found = n * T, t * T, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(value) and value.dim() >= 2:
                rows, cols = value.shape[-2:]
                if (rows == self.n and cols in (self.n, self.t)) or (cols == self.n and rows in (self.n, self.t)):
                    self.found.append(f"{func} {tuple(value.shape)}")
        return out


@pytest.mark.parametrize("kind", ["block", "group"])
def test_from_batch_mvn_predicts_task_by_task_in_closed_form(kind):
    # GPyTorch's DefaultPredictionStrategy formed the (t T) x (n T) cross covariance densely and, at the training
    # inputs, a dense (n T) x (n T) posterior that sampling factorised by a dense Cholesky, without a warning
    model, x, new = make_model(kind)
    for inputs in [new, x]:
        ref_mean, ref_covar = dense_posterior(model, inputs)
        for fast in [False, True]:
            model.prediction_strategy = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)  # at the training inputs
                with (
                    torch.no_grad(),
                    closed_forms_only(N),
                    gpytorch.settings.fast_pred_var(fast),
                    WideMatrices(N, inputs.shape[-2]) as wide,
                ):
                    f = model(inputs)
                    mean, variance = f.mean, f.variance
                    noisy_variance = model.likelihood(f).variance
            assert isinstance(model.prediction_strategy, TaskPredictionStrategy)
            assert isinstance(f.lazy_covariance_matrix, BlockMeanInterleavedLinearOperator)
            assert wide.found == []
            torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-9)
            torch.testing.assert_close(variance, ref_covar.diagonal().view(-1, T), rtol=1e-8, atol=1e-9)
            noise = model.likelihood.task_noises + model.likelihood.noise
            torch.testing.assert_close(noisy_variance, variance + noise, rtol=1e-8, atol=1e-9)
            torch.testing.assert_close(f.covariance_matrix, ref_covar, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kind", ["block", "group"])
def test_from_batch_mvn_samples_at_the_training_inputs_in_closed_form(kind):
    model, x, _ = make_model(kind)
    ref_mean, ref_covar = dense_posterior(model, x)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
        with torch.no_grad(), closed_forms_only(N), WideMatrices(N, N) as wide:
            f = model(x)
            root = f.lazy_covariance_matrix.root_decomposition().root
            samples = f.rsample(torch.Size([20000]))
    assert wide.found == []
    root = root.to_dense()
    torch.testing.assert_close(root @ root.mT, ref_covar, rtol=1e-7, atol=1e-9)
    assert samples.shape == (20000, N, T)
    std = ref_covar.diagonal().view(N, T).sqrt()
    assert ((samples.mean(0) - ref_mean).abs() <= 0.05 * std + 1e-6).all()
    torch.testing.assert_close(samples.var(0), std**2, rtol=0.08, atol=1e-6)


def test_from_batch_mvn_with_batch_test_inputs():
    model, _, new = make_model("block")
    inputs = torch.stack([new, new.flip(0)]).unsqueeze(1)  # (2, 1, t, 1): a batch of test sets
    with torch.no_grad(), closed_forms_only(N):
        f = model(inputs)
        mean, variance = f.mean, f.variance
    assert isinstance(model.prediction_strategy, TaskPredictionStrategy)
    assert mean.shape == (2, new.shape[0], T)
    for b in range(2):
        ref_mean, ref_covar = dense_posterior(model, inputs[b, 0])
        torch.testing.assert_close(mean[b], ref_mean, rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(variance[b], ref_covar.diagonal().view(-1, T), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kind", ["block", "group"])
def test_from_batch_mvn_in_float32_and_with_skipped_variances(kind):
    model, _, new = make_model(kind, dtype=torch.float32)
    ref_mean, ref_covar = dense_posterior(model, new)
    with torch.no_grad(), closed_forms_only(N):
        f = model(new)
        mean, variance = f.mean, f.variance
    assert isinstance(model.prediction_strategy, TaskPredictionStrategy)
    assert mean.dtype == variance.dtype == torch.float32
    torch.testing.assert_close(mean, ref_mean.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(variance, ref_covar.diagonal().view(-1, T).float(), rtol=1e-4, atol=1e-5)
    model, _, new = make_model(kind)
    with torch.no_grad(), closed_forms_only(N), gpytorch.settings.skip_posterior_variances(True):
        f = model(new)
        mean = f.mean
    torch.testing.assert_close(mean, dense_posterior(model, new)[0], rtol=1e-8, atol=1e-9)
    assert f.lazy_covariance_matrix.dtype == DTYPE


def test_from_batch_mvn_masks_each_missing_observation_alone():
    # the tasks' batch under GPyTorch's "mask" policy dropped a point from every task when one task missed it
    model, _, new = make_model("block")
    y = model.train_targets.clone()
    y[3, 1] = y[10, 0] = float("nan")
    model.set_train_data(targets=y, strict=False)
    with torch.no_grad(), gpytorch.settings.observation_nan_policy("mask"):
        mean = model(new).mean
    # each task conditioned on its own observations (GPyTorch's variances need the model to mask the test covariance:
    # its docs, _get_test_prior_mean_and_covariances)
    torch.testing.assert_close(mean, dense_posterior(model, new, observed=~torch.isnan(y))[0], rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------- indexing and batch sums of the layout operators
def layout_operators():
    generator = torch.Generator().manual_seed(2)
    partition = Partition.from_labels(torch.arange(12) % 4)
    W = torch.randn(2, T, 4, 4, generator=generator, dtype=DTYPE)
    tasks = BlockMeanLinearOperator(torch.rand(2, T, 4, generator=generator, dtype=DTYPE), W @ W.mT, partition)
    d = torch.rand(2, T * 12, generator=generator, dtype=DTYPE) + 0.5
    with closed_forms_only(12):
        return [
            layout(tasks) + DiagLinearOperator(d)
            for layout in (BlockDiagLinearOperator, BlockInterleavedLinearOperator)
        ]


def test_layout_operator_slices_are_right_and_say_when_they_leave_the_closed_form():
    # linear_operator's BlockLinearOperator read the slices of a block-diagonal layout as the interleaved layout's
    # points (wrong entries), and gave other indices a silent generic operator
    rhs = torch.randn(2, 6, 1, dtype=DTYPE)
    for op in layout_operators():
        dense = op.to_dense()
        cls = type(op)
        assert cls in (BlockMeanBlockDiagLinearOperator, BlockMeanInterleavedLinearOperator)
        # whole points (interleaved) or whole tasks (block-diagonal): the layout and its closed forms
        whole = slice(0, 6) if cls is BlockMeanInterleavedLinearOperator else slice(12, 36)
        kept = op[:, whole, whole]
        assert type(kept) is cls
        torch.testing.assert_close(kept.to_dense(), dense[:, whole, whole])
        with closed_forms_only(12):
            kept.logdet()
        # no rows (mvn[..., a:a]): the 0 x 0 matrix, whatever the slice's alignment
        for empty in [op[:, 3:3, 3:3], op[1, 5:5, 5:5]]:
            assert empty.shape[-2:] == (0, 0)
            torch.testing.assert_close(empty.logdet(), torch.zeros(empty.batch_shape, dtype=DTYPE))
        # anything else: the right entries, and a warning when factorised
        idx = torch.tensor([0, 5, 7, 13, 20, 30])
        for part, expected in [
            (op[:, 2:8, 2:8] if cls is BlockMeanInterleavedLinearOperator else op[:, :6, :6], None),
            (op[..., idx, :][..., idx], dense[..., idx, :][..., idx]),
        ]:
            if expected is None:
                expected = dense[:, 2:8, 2:8] if cls is BlockMeanInterleavedLinearOperator else dense[:, :6, :6]
            assert isinstance(part, FallbackIndexedLinearOperator)
            torch.testing.assert_close(part.to_dense(), expected)
            with pytest.warns(ClosedFormFallbackWarning, match="other than one principal slice"):
                part.solve(rhs)


def test_layout_operator_batch_sum_stays_in_closed_form():
    # linear_operator's SumBatchLinearOperator solved it by CG / a dense Cholesky, without a warning
    rhs = torch.randn(T * 12, 2, dtype=DTYPE)
    for op in layout_operators():
        dense = op.to_dense()
        for dim in [0, -3]:
            summed = op.sum(dim)
            assert type(summed) is type(op)
            torch.testing.assert_close(summed.to_dense(), dense.sum(0))
            with closed_forms_only(12):
                solved = summed.solve(rhs)
            torch.testing.assert_close(solved, torch.linalg.solve(dense.sum(0), rhs))
