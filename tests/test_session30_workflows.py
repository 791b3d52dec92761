"""Whole user workflows of multitask and structured-sum models (session 30), against dense float64 linear algebra.

A workflow trains a model with Adam on the exact marginal log-likelihood beside a twin that takes the same steps on
the dense covariance, predicts in eval mode at new inputs and at the training inputs (``fast_pred_var`` on and
off) in closed form, changes a hyperparameter in eval mode and predicts again, and loads the state into a fresh
model. Each regression test below failed on the code before its fix."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning, GroupKernel, Partition
from closed_form_guard import closed_forms_only

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = 3


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _data(dtype=torch.float64, n: int = 48):
    """Columns: a smooth input, a group id (ids 0..5 plus a singleton 6 and a non-contiguous 8; unseen test ids 7
    and 10), a task id, a second grouping. New inputs and fantasy points follow the same layout."""
    gen = torch.Generator().manual_seed(3)
    x = 4 * torch.rand(n, 1, generator=gen, dtype=dtype)
    ids = torch.randint(0, 6, (n,), generator=gen)
    ids[0], ids[1] = 6, 8
    tasks = torch.randint(0, TASKS, (n,), generator=gen)
    second = torch.arange(n) % 4
    X = torch.stack([x[:, 0], ids.to(dtype), tasks.to(dtype), second.to(dtype)], -1)
    y = torch.sin(2 * x[:, 0]) + 0.3 * tasks.to(dtype) + 0.1 * torch.randn(n, generator=gen, dtype=dtype)
    new = torch.tensor([[0.5, 0, 0, 0], [1.5, 1, 1, 1], [2.5, 3, 2, 2], [3.0, 7, 1, 3], [0.2, 10, 0, 5]], dtype=dtype)
    fantasy = torch.tensor([[1.0, 2, 2, 1], [2.0, 10, 0, 5]], dtype=dtype)
    return X, y, ids, new, fantasy


def _partition(ids):
    return Partition.from_labels(torch.unique(ids, return_inverse=True)[1])


def _dense_mll(model, X, y):
    out = model.likelihood(model(X))
    dense = torch.distributions.MultivariateNormal(out.mean, out.lazy_covariance_matrix.to_dense())
    return dense.log_prob(y) / y.numel()


def _dense_posterior(model, X, y, new):
    """Mean and variance at ``new`` from the dense joint prior covariance of ``cat(X, new)`` (the model in eval mode,
    as GPyTorch evaluates it), solved by ``torch.linalg``."""
    model.eval()
    n = X.shape[0]
    with torch.no_grad():
        prior = model.forward(X)
        noise = model.likelihood(prior).lazy_covariance_matrix.to_dense() - prior.lazy_covariance_matrix.to_dense()
        joint = model.forward(torch.cat([X, new]))
        K = joint.lazy_covariance_matrix.to_dense()
        train, cross = K[:n, :n] + noise, K[n:, :n]
        mean = joint.mean[n:] + cross @ torch.linalg.solve(train, y - prior.mean)
        variance = K[n:, n:].diagonal() - (cross * torch.linalg.solve(train, cross.mT).mT).sum(-1)
    return mean, variance


def _assert_test_set_batch(model, X, y, new):
    """``model`` (in eval mode) asked for the batch of test sets ``new`` and ``new`` reversed predicts each set as the
    dense posterior does, in closed form and without a fallback warning."""
    batch = torch.stack([new, new.flip(0)])
    with torch.no_grad(), closed_forms_only(X.shape[0]), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        pred = model(batch)
        mean, variance = pred.mean, pred.variance
    for i in range(2):
        want_mean, want_variance = _dense_posterior(model, X, y, batch[i])
        torch.testing.assert_close(mean[i], want_mean, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(variance[i], want_variance, rtol=1e-8, atol=1e-10)


def _train_beside_dense(build, X, y, steps: int = 20):
    """A model trained ``steps`` Adam steps in closed form (no CG, Lanczos or dense factorisation, no fallback
    warning), and a twin trained on the dense marginal log-likelihood: they track to 1e-9."""
    model, twin = build(), build()
    twin.load_state_dict(model.state_dict())
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    opt, twin_opt = torch.optim.Adam(model.parameters(), lr=0.05), torch.optim.Adam(twin.parameters(), lr=0.05)
    model.train()
    twin.train()
    for _ in range(steps):
        opt.zero_grad()
        twin_opt.zero_grad()
        with closed_forms_only(X.shape[0]), warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            loss = -mll(model(X), y)
            loss.backward()
        twin_loss = -_dense_mll(twin, X, y)
        twin_loss.backward()
        torch.testing.assert_close(loss, twin_loss, rtol=1e-9, atol=0)
        opt.step()
        twin_opt.step()
    twin_params = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, twin_params[name], rtol=1e-8, atol=1e-10)
    return model


def _assert_predicts_like_dense(model, X, y, new, rtol: float = 1e-9):
    """Means and variances at ``new`` in closed form, without a fallback warning, with ``fast_pred_var`` on and
    off (and ``max_cholesky_size(0)``), equal to the dense posterior's to ``rtol``."""
    want_mean, want_variance = _dense_posterior(model, X, y, new)
    model.eval()
    for fast in (False, True):
        with torch.no_grad(), gpytorch.settings.fast_pred_var(fast), gpytorch.settings.max_cholesky_size(0):
            with closed_forms_only(X.shape[0]), warnings.catch_warnings():
                warnings.simplefilter("error", ClosedFormFallbackWarning)
                pred = model(new)
                mean, variance = pred.mean, pred.variance
        torch.testing.assert_close(mean, want_mean, rtol=rtol, atol=rtol / 10)
        torch.testing.assert_close(variance, want_variance, rtol=10 * rtol, atol=rtol / 10)


# ------------------------------------------------------------------ one grouping twice in a sum times a task kernel
def _same_blocks_model(kind: str, dtype=torch.float64):
    X, y, ids, new, fantasy = _data(dtype)
    task = gpytorch.kernels.IndexKernel(TASKS, rank=1, active_dims=[2])

    def build():
        if kind == "block mean + group":  # a smooth part averaged over the groups plus a random intercept on them
            smooth = BlockMeanKernel(gpytorch.kernels.RBFKernel(active_dims=[0]), X, _partition(ids))
            kernel = gpytorch.kernels.ScaleKernel(smooth + GroupKernel(12, active_dims=[1])) * task
        elif kind == "group + group":  # one grouping with a shared and a per-level variance
            group = GroupKernel(12, active_dims=[1]) + GroupKernel(12, per_group_variance=True, active_dims=[1])
            kernel = group * task
        else:  # "group + block mean + crossed group", the task factor first
            smooth = BlockMeanKernel(gpytorch.kernels.RBFKernel(active_dims=[0]), X, _partition(ids))
            kernel = task * (GroupKernel(6, active_dims=[3]) + smooth + GroupKernel(12, active_dims=[1]))
        return GP(X, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).to(dtype)

    return build, X, y, new, fantasy


@pytest.mark.parametrize("kind", ["block mean + group", "group + group", "crossed, task factor first"])
def test_sum_over_one_grouping_times_task_kernel_predicts_in_closed_form(kind):
    """``(BlockMeanKernel + GroupKernel) * IndexKernel`` with the block mean kernel's blocks the group kernel's ids
    (and two group kernels over one id column): the training covariance adds the two terms into one block mean
    matrix before the product (one term over the intersection of the partitions), while the prediction read the
    group kernel's cross covariance as a diagonal term weighted by the task factor, did not match the training
    columns and fell back to GPyTorch's path with a ``ClosedFormFallbackWarning`` (forming the ``t x n`` cross
    covariance), against the documented closed form."""
    build, X, y, new, fantasy = _same_blocks_model(kind)
    model = _train_beside_dense(build, X, y)
    _assert_predicts_like_dense(model, X, y, new)
    with torch.no_grad():  # a hyperparameter changed in eval mode: the strategy is rebuilt
        model.likelihood.noise = 0.2
    _assert_predicts_like_dense(model, X, y, new)
    fresh = build()
    fresh.load_state_dict(model.state_dict())
    _assert_predicts_like_dense(fresh, X, y, new)
    targets = torch.tensor([0.3, -0.2], dtype=X.dtype)
    fantasy_model = model.get_fantasy_model(fantasy, targets)  # GPyTorch's update of the caches: 4e-9 here
    _assert_predicts_like_dense(fantasy_model, torch.cat([X, fantasy]), torch.cat([y, targets]), new, rtol=1e-7)


def test_sum_over_one_grouping_times_task_kernel_batch_of_test_sets():
    """The same model asked for a batch of test sets (the documented closed form for test batches of the one-kernel
    product) gives each set's own prediction."""
    build, X, y, new, _ = _same_blocks_model("block mean + group")
    model = build()
    model.eval()
    _assert_test_set_batch(model, X, y, new)


# ------------------------------------------------------------------ multitask predictive densities with task noise
class MultitaskGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=TASKS)
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))


@pytest.mark.parametrize("options", [{"rank": 1}, {"rank": TASKS, "has_global_noise": False}])
@pytest.mark.parametrize("kind", ["group", "block mean"])
def test_multitask_predictive_density_with_correlated_task_noise_is_exact(kind, options):
    """``likelihood(model(new_x)).log_prob(y)`` (what ``negative_log_predictive_density`` evaluates) of a
    ``MultitaskKernel`` model with a ``MultitaskGaussianLikelihood(rank >= 1)``: the predictive covariance plus the
    likelihood's Kronecker noise was linear_operator's generic sum, with a ``ClosedFormFallbackWarning``, solved by
    CG and stochastic Lanczos past ``max_cholesky_size`` (0.7 % off, 6.6 nats, at 300 points and 3 tasks), against
    the documented exact factorisation of the ``t x t`` predictive covariance (as for ``rank=0``)."""
    X, y, ids, new, _ = _data()
    Y = torch.stack([y, -y, 0.5 * y], -1)
    if kind == "group":
        kernel = gpytorch.kernels.MultitaskKernel(GroupKernel(12), num_tasks=TASKS, rank=1, active_dims=[1])
    else:
        smooth = BlockMeanKernel(gpytorch.kernels.RBFKernel(active_dims=[0]), X, _partition(ids))
        kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MultitaskKernel(smooth, num_tasks=TASKS, rank=1))
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=TASKS, **options)
    model = MultitaskGP(X, Y, likelihood, kernel).double()
    model.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        pred = likelihood(model(new))
        targets = pred.mean + 0.3 * torch.randn(pred.mean.shape, generator=gen, dtype=pred.mean.dtype)
        with closed_forms_only(X.shape[0]):
            value = pred.log_prob(targets)
            nlpd = gpytorch.metrics.negative_log_predictive_density(pred, targets)
            draws = pred.rsample(torch.Size([2]))
        dense = pred.lazy_covariance_matrix.to_dense()
    want = torch.distributions.MultivariateNormal(pred.mean.reshape(-1), dense).log_prob(targets.reshape(-1))
    torch.testing.assert_close(value, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(nlpd, -want / targets.shape[-2], rtol=1e-10, atol=0)  # per point
    assert draws.shape == (2, *pred.mean.shape)


@pytest.mark.parametrize("rank", [0, 1])
def test_multitask_model_with_missing_targets_says_it_leaves_the_closed_form(rank):
    """Training a ``MultitaskKernel(GroupKernel)`` model with missing targets (``observation_nan_policy("mask")``):
    GPyTorch masks the Kronecker sum with linear_operator's ``MaskedLinearOperator``, which has no closed form here;
    its solves and log-determinant took CG and stochastic Lanczos past ``max_cholesky_size`` without a word (the
    marginal log-likelihood 1.5 % off at ``rank=0``, 0.5 % at ``rank=1``). It warns now, and within
    ``max_cholesky_size`` equals the dense value."""
    X, y, _, _, _ = _data()
    Y = torch.stack([y, -y, 0.5 * y], -1)
    Y[3, 1] = Y[7, 0] = float("nan")
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=TASKS, rank=rank)
    kernel = gpytorch.kernels.MultitaskKernel(GroupKernel(12), num_tasks=TASKS, rank=1, active_dims=[1])
    model = MultitaskGP(X, Y, likelihood, kernel).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    with gpytorch.settings.observation_nan_policy("mask"):
        for size in (0, 10**4):
            with gpytorch.settings.max_cholesky_size(size), pytest.warns(ClosedFormFallbackWarning, match="mask"):
                value = mll(model(X), Y)
    out = likelihood(model(X))
    observed = ~torch.isnan(Y.reshape(-1))
    covariance = out.lazy_covariance_matrix.to_dense()[observed][:, observed]
    dense = torch.distributions.MultivariateNormal(out.mean.reshape(-1)[observed], covariance)
    torch.testing.assert_close(value, dense.log_prob(Y.reshape(-1)[observed]) / Y.numel(), rtol=1e-10, atol=0)


# ------------------------------------------------------------------ a batch of fantasy targets for a task product
@pytest.mark.parametrize("kind", ["crossed groups", "slope", "two factors"])
def test_batch_of_fantasy_targets_for_a_task_product_predicts_in_closed_form(kind):
    """``get_fantasy_model`` with a batch of fantasy targets at the same points (the documented closed form, as in
    BoTorch's knowledge gradient) for ``(GroupKernel + GroupKernel) * IndexKernel``: the fantasy model's inputs are
    copied across the batch, so its task matrix was a batch of equal copies, which the training product split into
    one dense term per (level, task) pair while the prediction's cross covariance, read on one copy of the training
    inputs, split each intercept into weighted terms; the columns did not match and every fantasy prediction fell
    back to GPyTorch's path with a ``ClosedFormFallbackWarning``. (96 points: the capacitance of the two-factor
    product has 75 columns, which the guard would refuse at fewer points.)"""
    X, y, _, new, fantasy = _data(n=96)
    task = gpytorch.kernels.IndexKernel(TASKS, rank=1, active_dims=[2])
    if kind == "crossed groups":
        groups = GroupKernel(12, active_dims=[1]) + GroupKernel(6, active_dims=[3])
    elif kind == "slope":
        groups = GroupKernel(12, slope=True, active_dims=[1, 0]) + GroupKernel(6, active_dims=[3])
    else:  # a second factor, a group kernel over the crossed grouping (its variances copied across the batch)
        groups = (GroupKernel(12, active_dims=[1]) + GroupKernel(6, active_dims=[3])) * GroupKernel(6, active_dims=[3])
    model = GP(X, y, gpytorch.likelihoods.GaussianLikelihood(), groups * task).double()
    model.eval()
    targets = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=X.dtype)
    with torch.no_grad():
        model(new)
        fantasy_model = model.get_fantasy_model(fantasy, targets)
        with closed_forms_only(X.shape[0]), warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            pred = fantasy_model(new)
            mean, variance = pred.mean, pred.variance
    assert mean.shape == (2, new.shape[0])
    for b in range(2):
        want_mean, want_variance = _dense_posterior(model, torch.cat([X, fantasy]), torch.cat([y, targets[b]]), new)
        torch.testing.assert_close(mean[b], want_mean, rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(variance[b], want_variance, rtol=1e-7, atol=1e-8)


def test_multitask_kernel_around_a_sum_over_one_grouping_predicts_in_closed_form():
    """``MultitaskKernel(BlockMeanKernel + GroupKernel)`` with the block mean kernel's blocks the group ids: the
    training covariance is one block mean factor (the two terms add) and trains in closed form, but its cross
    covariance at new inputs, a sum of the two kernels' block cross covariances, was not read as one, so the model
    predicted through GPyTorch's default strategy (``n t``-sized cross covariances; under ``fast_pred_var`` the dense
    ``n t x n t`` inverse root, with a ``ClosedFormFallbackWarning``)."""
    X, y, ids, new, _ = _data()
    Y = torch.stack([y, -y, 0.5 * y], -1)

    def build():
        smooth = BlockMeanKernel(gpytorch.kernels.RBFKernel(active_dims=[0]), X, _partition(ids))
        data = gpytorch.kernels.ScaleKernel(smooth) + GroupKernel(12, active_dims=[1])
        kernel = gpytorch.kernels.MultitaskKernel(data, num_tasks=TASKS, rank=1)
        likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=TASKS, rank=1)
        return MultitaskGP(X, Y, likelihood, kernel).double()

    model = build()
    with torch.no_grad():
        for p in model.parameters():  # away from the defaults
            p.add_(0.2)
    model.eval()
    n = X.shape[0]
    with torch.no_grad():
        model.train()
        joint = model.forward(torch.cat([X, new])).lazy_covariance_matrix.to_dense()
        noisy = model.likelihood(model.forward(X)).lazy_covariance_matrix.to_dense()
        model.eval()
        nt = n * TASKS
        cross = joint[nt:, :nt]
        residual = (Y - model.mean_module(X)).reshape(-1)
        want_mean = model.mean_module(new).reshape(-1) + cross @ torch.linalg.solve(noisy, residual)
        want_variance = joint[nt:, nt:].diagonal() - (cross * torch.linalg.solve(noisy, cross.mT).mT).sum(-1)
    for fast in (False, True):
        model.train()
        model.eval()
        with torch.no_grad(), gpytorch.settings.fast_pred_var(fast), gpytorch.settings.max_cholesky_size(0):
            with closed_forms_only(n), warnings.catch_warnings():
                warnings.simplefilter("error", ClosedFormFallbackWarning)
                pred = model(new)
                mean, variance = pred.mean.reshape(-1), pred.variance.reshape(-1)
            assert type(model.prediction_strategy).__name__ == "KroneckerPredictionStrategy"
        torch.testing.assert_close(mean, want_mean, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(variance, want_variance, rtol=1e-8, atol=1e-10)


def test_multitask_kernel_around_a_group_factor_over_many_groups_is_closed_form():
    """``MultitaskKernel(GroupKernel(k, rank=r))`` with more than ``FACTOR_DENSE_MAX_GROUPS`` (256) groups present:
    the group kernel returned its covariance as a diagonal term plus the low-rank root ``P W`` (a sum, the form the
    sums' capacitance eliminates cheaply), which is no block mean factor of the Kronecker closed form: training took
    linear_operator's path with an ``n x n`` eigendecomposition (a ``ClosedFormFallbackWarning``) and prediction
    GPyTorch's strategy. Inside a ``MultitaskKernel`` it is the one block mean matrix ``P (diag(v) + W W^T) P^T``
    again (while ``k t`` fits ``max_capacitance_size``)."""
    gen = torch.Generator().manual_seed(1)
    n, tasks, groups = 700, 2, 300
    ids = torch.cat([torch.arange(groups), torch.randint(0, groups, (n - groups,), generator=gen)]).double()
    X = ids.unsqueeze(-1)
    Y = torch.randn(n, tasks, generator=gen, dtype=torch.float64)
    new = torch.tensor([[3.0], [299.0], [305.0]], dtype=torch.float64)  # seen ids and an unseen one
    kernel = gpytorch.kernels.MultitaskKernel(GroupKernel(310, rank=2), num_tasks=tasks, rank=1)
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=tasks, rank=1)

    class Model(MultitaskGP):
        def __init__(self):
            gpytorch.models.ExactGP.__init__(self, X, Y, likelihood)
            self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=tasks)
            self.covar_module = kernel

    model = Model().double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    params = list(model.parameters())
    with gpytorch.settings.max_cholesky_size(0), closed_forms_only(n), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        value = mll(model(X), Y)
        grads = torch.autograd.grad(value, params)
    out = likelihood(model(X))
    dense = torch.distributions.MultivariateNormal(out.mean.reshape(-1), out.lazy_covariance_matrix.to_dense())
    want = dense.log_prob(Y.reshape(-1)) / Y.numel()
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(value, want, rtol=1e-10, atol=0)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)
    model.eval()
    with torch.no_grad():
        model.train()
        joint = model.forward(torch.cat([X, new])).lazy_covariance_matrix.to_dense()
        noisy = likelihood(model.forward(X)).lazy_covariance_matrix.to_dense()
        model.eval()
        nt = n * tasks
        cross = joint[nt:, :nt]
        want_mean = model.mean_module(new).reshape(-1) + cross @ torch.linalg.solve(
            noisy, (Y - model.mean_module(X)).reshape(-1)
        )
        want_variance = joint[nt:, nt:].diagonal() - (cross * torch.linalg.solve(noisy, cross.mT).mT).sum(-1)
        for fast in (False, True):
            with gpytorch.settings.fast_pred_var(fast), gpytorch.settings.max_cholesky_size(0):
                with closed_forms_only(n), warnings.catch_warnings():
                    warnings.simplefilter("error", ClosedFormFallbackWarning)
                    pred = model(new)
                    mean, variance = pred.mean.reshape(-1), pred.variance.reshape(-1)
            torch.testing.assert_close(mean, want_mean, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(variance, want_variance, rtol=1e-8, atol=1e-10)


def _many_groups_data():
    """700 points over 300 groups (each present), a task column; new points at seen ids and an unseen one."""
    gen = torch.Generator().manual_seed(2)
    n = 700
    ids = torch.cat([torch.arange(300), torch.randint(0, 300, (n - 300,), generator=gen)])
    tasks = torch.randint(0, TASKS, (n,), generator=gen)
    X = torch.stack([ids.double(), tasks.double()], -1)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    new = torch.tensor([[3.0, 0], [299.0, 1], [305.0, 2]], dtype=torch.float64)
    return X, y, new


def test_group_factor_over_many_groups_times_task_kernel_predicts_in_closed_form():
    """``GroupKernel(k, rank=r) * IndexKernel`` with more than 256 groups present: the group kernel's covariance is a
    diagonal term plus the low-rank root ``P W``, and the training product distributes over both (weighted diagonal
    terms and a root of rank ``r k_X``), in closed form; its cross covariance (``A P^T + W_rows (P W)^T``) was not read
    as those columns, so prediction at new inputs fell back to GPyTorch's path with a ``ClosedFormFallbackWarning``
    (under ``fast_pred_var`` an eigendecomposition of a matrix larger than ``n``)."""
    X, y, new = _many_groups_data()
    factor = gpytorch.kernels.ScaleKernel(GroupKernel(310, rank=2, active_dims=[0]))
    kernel = factor * gpytorch.kernels.IndexKernel(TASKS, rank=1, active_dims=[1]) + GroupKernel(310, active_dims=[0])
    model = GP(X, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    with torch.no_grad():
        for p in model.parameters():  # away from the defaults
            p.add_(0.2)
    _assert_predicts_like_dense(model, X, y, new)


def test_group_factor_over_many_groups_times_task_kernel_batch_of_test_sets():
    """The same model asked for a batch of test sets whose group ids differ across the batch: the group kernel's
    cross covariance was one dense block (``C[rows, present]``), no longer the diagonal term plus the root the
    training product holds, and prediction fell back to GPyTorch's path with a ``ClosedFormFallbackWarning``."""
    X, y, new = _many_groups_data()
    kernel = GroupKernel(310, rank=2, per_group_variance=True, active_dims=[0]) * gpytorch.kernels.IndexKernel(
        TASKS, rank=1, active_dims=[1]
    )
    model = GP(X, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    model.eval()
    _assert_test_set_batch(model, X, y, new)
