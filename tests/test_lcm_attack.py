"""Bugs found by attacking the session-30 ``LCMKernel`` closed form (tests/test_lcm_block_mean.py) and the single
``MultitaskKernel`` path it was rewritten from. Each test failed at 3a41b96 and compares with dense float64 linear
algebra on the same model."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import ClosedFormFallbackWarning, GroupKernel
from closed_form_guard import closed_forms_only

pytestmark = pytest.mark.usefixtures("one_thread")

T = 2  # tasks


class _BatchMultitaskGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel, batch_shape: torch.Size):
        super().__init__(x, y, likelihood)
        mean = gpytorch.means.ConstantMean(batch_shape=batch_shape)
        self.mean_module = gpytorch.means.MultitaskMean(mean, num_tasks=T)
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))


def _dense_posterior(model, x, y, xt):
    """Posterior mean ``(*batch, m t)`` and covariance at ``xt`` from the dense joint covariance (train mode)."""
    model.train()
    n, m = x.shape[-2], xt.shape[-2]
    joint = model.covar_module(torch.cat([x, xt], -2)).to_dense()
    nt = n * T
    noise = model.likelihood._shaped_noise_covar((*x.shape[:-2], n, n)).to_dense()
    train = joint[..., :nt, :nt] + noise
    cross = joint[..., nt:, :nt]
    residual = (y - model.mean_module(x)).reshape(*y.shape[:-2], nt, 1)
    mean = model.mean_module(xt).reshape(*xt.shape[:-2], m * T) + (cross @ torch.linalg.solve(train, residual))[..., 0]
    return mean, joint[..., nt:, nt:] - cross @ torch.linalg.solve(train, cross.mT)


def _one_group_model(kind: str, batch_shape: torch.Size, rank: int):
    """A model whose training data all lie in group 0 of a ``GroupKernel`` (one block, ``k = 1``, a diagonal core):
    a ``MultitaskKernel`` around it or an ``LCMKernel`` of two; the test points hold group 0 and group 1 (absent from
    the training data)."""
    gen = torch.Generator().manual_seed(4)
    n = 9
    x = torch.cat([torch.rand(n, 1, generator=gen, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)], -1)
    x = x.expand(*batch_shape, n, 2)
    y = torch.randn(*batch_shape, n, T, generator=gen, dtype=torch.float64)
    if kind == "multitask":
        kernel = gpytorch.kernels.MultitaskKernel(GroupKernel(3), num_tasks=T, rank=1, active_dims=[1])
    else:
        kernel = gpytorch.kernels.LCMKernel(
            [GroupKernel(3, batch_shape=batch_shape), GroupKernel(3, batch_shape=batch_shape)], num_tasks=T, rank=1
        )
        kernel.active_dims = torch.tensor([1])
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=T, rank=rank, batch_shape=batch_shape)
    model = _BatchMultitaskGP(x, y, likelihood, kernel, batch_shape).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    xt = torch.tensor([[0.1, 0.0], [0.5, 1.0], [0.9, 0.0]], dtype=torch.float64).expand(*batch_shape, 3, 2)
    return model, x, y, xt


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast_pred_var"])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize(
    "kind,batch_shape",
    [("multitask", torch.Size()), ("lcm", torch.Size()), ("lcm", torch.Size([2]))],
    ids=["multitask", "lcm", "lcm_batch2"],
)
def test_one_training_group_predicts_with_the_model_shape(kind, batch_shape, rank, fast):
    """Group kernels whose training data lie in one group (``k = 1``): the Kronecker strategy held the core factor as
    its ``k`` diagonal blocks, ``(1, t, t)``, and told the two forms apart by the last dimension, ``t = k t`` here, so
    the block dimension became a batch dimension: predictions of shape ``(1, m, t)`` (a ``(b, b, m, t)`` batch of
    mixed-up entries for a batched model) and an ``expand`` error at the training inputs of a batched model. Now the
    shapes are the model's and the means, variances and covariances equal the dense posterior's (1e-10), in closed
    form, at new inputs and at the training inputs."""
    model, x, y, xt = _one_group_model(kind, batch_shape, rank)
    with torch.no_grad():
        want_mean, want_covar = _dense_posterior(model, x, y, xt)
        model.train()
        prior = model.covar_module(x).to_dense()
        noise = model.likelihood._shaped_noise_covar((*batch_shape, x.shape[-2], x.shape[-2])).to_dense()
        residual = (y - model.mean_module(x)).reshape(*batch_shape, -1, 1)
        train_mean = (
            model.mean_module(x).reshape(*batch_shape, -1)
            + (prior @ torch.linalg.solve(prior + noise, residual))[..., 0]
        )
        train_covar = prior - prior @ torch.linalg.solve(prior + noise, prior)
    model.eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(fast), closed_forms_only(x.shape[-2]):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
            pred = model(xt)
            mean, variance, covar = pred.mean, pred.variance, pred.covariance_matrix
            at_train = model(x)
            t_mean, t_variance = at_train.mean, at_train.variance
    assert type(model.prediction_strategy).__name__ == "KroneckerPredictionStrategy"
    assert mean.shape == variance.shape == (*batch_shape, 3, T)
    assert covar.shape == (*batch_shape, 3 * T, 3 * T)
    assert t_mean.shape == t_variance.shape == (*batch_shape, x.shape[-2], T)
    scale = want_covar.abs().max()
    torch.testing.assert_close(mean.reshape(*batch_shape, -1), want_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(covar, want_covar, rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(
        variance.reshape(*batch_shape, -1), want_covar.diagonal(dim1=-2, dim2=-1), rtol=1e-10, atol=1e-12 * scale
    )
    torch.testing.assert_close(t_mean.reshape(*batch_shape, -1), train_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        t_variance.reshape(*batch_shape, -1), train_covar.diagonal(dim1=-2, dim2=-1), rtol=1e-9, atol=1e-11 * scale
    )


def _additive_model(rank: int):
    """``MultitaskKernel(BlockMeanKernel) + ScaleKernel(MultitaskKernel(GroupKernel))`` over the same 6 groups
    (an ``LCMKernel`` written out as a sum), 40 points, one group a singleton."""
    from bma_gp import BlockMeanKernel, Partition

    gen = torch.Generator().manual_seed(8)
    n = 40
    groups = torch.randint(0, 5, (n,), generator=gen)
    groups[:5] = torch.tensor([3, 0, 4, 1, 2])
    groups[-1] = 5
    x = torch.cat([torch.rand(n, 1, generator=gen, dtype=torch.float64), groups.unsqueeze(-1).double()], -1)
    y = torch.randn(n, T, generator=gen, dtype=torch.float64)
    multitask = gpytorch.kernels.MultitaskKernel
    block_mean = BlockMeanKernel(gpytorch.kernels.RBFKernel(active_dims=[0]), x, Partition.from_labels(groups))
    kernel = multitask(block_mean, num_tasks=T, rank=1) + gpytorch.kernels.ScaleKernel(
        multitask(GroupKernel(6), num_tasks=T, rank=1, active_dims=[1])
    )
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=T, rank=rank)
    model = _BatchMultitaskGP(x, y, likelihood, kernel, torch.Size()).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, x, y


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast_pred_var"])
@pytest.mark.parametrize("rank", [0, 1])
def test_sum_of_multitask_kernels_predicts_without_nt_by_nt_matrices(rank, fast):
    """``MultitaskKernel(a) + MultitaskKernel(b)`` over one partition trains in closed form since the LCM change (its
    training covariance is a ``BlockMeanLCMLinearOperator``), but its ``AdditiveKernel`` asked for the package's
    ``SumPredictionStrategy``, which took the closed form's root densely: an ``n t x n t`` matrix under
    ``fast_pred_var`` and at the training inputs, without a warning. Now the Kronecker strategy predicts it as an
    ``LCMKernel``: means, variances and covariances equal the dense posterior's (1e-10), nothing ``n t x n t``."""
    from largest_tensor import LargestTensor

    model, x, y = _additive_model(rank)
    n = x.shape[0]
    xt = x[:9] + torch.tensor([0.05, 0.0], dtype=x.dtype)
    with torch.no_grad():
        want_mean, want_covar = _dense_posterior(model, x, y, xt)
        prior = model.covar_module(x).to_dense()
        noise = model.likelihood._shaped_noise_covar((n, n)).to_dense()
        residual = (y - model.mean_module(x)).reshape(-1, 1)
        train_mean = model.mean_module(x).reshape(-1) + (prior @ torch.linalg.solve(prior + noise, residual))[:, 0]
        train_covar = prior - prior @ torch.linalg.solve(prior + noise, prior)
    model.eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(fast), closed_forms_only(n), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
        with LargestTensor(storage=True) as largest:
            pred = model(xt)
            mean, variance, covar = pred.mean.reshape(-1), pred.variance.reshape(-1), pred.covariance_matrix
        with LargestTensor(storage=True) as largest_train:
            at_train = model(x)
            t_mean, t_variance = at_train.mean.reshape(-1), at_train.variance.reshape(-1)
    scale = want_covar.abs().max()
    torch.testing.assert_close(mean, want_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(covar, want_covar, rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(variance, want_covar.diagonal(), rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(t_mean, train_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t_variance, train_covar.diagonal(), rtol=1e-9, atol=1e-11 * scale)
    k = 6
    assert largest.largest <= max(9 * n, (9 * T) ** 2, (k * T) ** 2), (largest.largest, largest.where)
    assert largest_train.largest <= max(4 * n * T, (k * T) ** 2), (largest_train.largest, largest_train.where)


def _noisy_covariance(kind: str, rank: int):
    """The noisy training covariance of a ``MultitaskKernel(BlockMeanKernel)`` (``"multitask"``) or of an
    ``LCMKernel`` of two ``BlockMeanKernel``\\ s over one partition (``"lcm"``), 24 points in 5 blocks, with the
    parameters' graph; and the covariance's parameters."""
    from bma_gp import BlockMeanKernel, Partition

    gen = torch.Generator().manual_seed(11)
    n = 24
    labels = torch.tensor([3, 0, 4, 1, 2] + [int(v) for v in torch.randint(0, 4, (n - 6,), generator=gen)] + [4])
    x = torch.rand(n, 1, generator=gen, dtype=torch.float64)
    y = torch.randn(n, T, generator=gen, dtype=torch.float64)
    part = Partition.from_labels(labels)
    rbf, matern = gpytorch.kernels.RBFKernel(), gpytorch.kernels.MaternKernel(nu=1.5)
    if kind == "multitask":
        kernel = gpytorch.kernels.MultitaskKernel(BlockMeanKernel(rbf, x, part), num_tasks=T, rank=1)
    else:
        kernel = gpytorch.kernels.LCMKernel([BlockMeanKernel(rbf, x, part), BlockMeanKernel(matern, x, part)], T, 1)
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=T, rank=rank)
    model = _BatchMultitaskGP(x, y, likelihood, kernel, torch.Size()).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    params = [p for name, p in model.named_parameters() if not name.startswith("mean_module")]
    return likelihood(model(x)).lazy_covariance_matrix, params, y.reshape(-1)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("kind", ["multitask", "lcm"])
def test_positive_multiple_of_the_noisy_covariance_keeps_the_closed_form(kind, rank):
    """``c A`` for the noisy training covariance ``A`` of a multitask model on block mean kernels (what
    ``MultivariateNormal * c`` gives its covariance): linear_operator wrapped the likelihood's noise term
    ``I_n (x) D`` in a ``ConstantMulLinearOperator``, which the closed form did not read, so ``MultitaskKernel``
    under ``rank >= 1`` crashed in linear_operator's Kronecker sum (``AttributeError: 'ConstantMulLinearOperator'
    object has no attribute 'linear_ops'``) and the ``LCMKernel`` (and ``rank = 0`` with gradients) took the warned
    fallback (CG past ``max_cholesky_size``). Now the constant goes into the noise's identity factor: the solve,
    log-determinant and their gradients equal the dense ones (1e-10), in closed form."""
    from linear_operator import settings as lo_settings

    A, params, y = _noisy_covariance(kind, rank)
    c = 2.5
    with lo_settings.max_cholesky_size(0), closed_forms_only(A.shape[-1] // T), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        scaled = A * c
        quad, logdet = scaled.inv_quad_logdet(y.unsqueeze(-1), logdet=True)
        got = torch.autograd.grad(quad + logdet, params, retain_graph=True)
    dense = c * A.to_dense()
    want_value = y @ torch.linalg.solve(dense, y) + torch.logdet(dense)
    want = torch.autograd.grad(want_value, params)
    torch.testing.assert_close(quad + logdet, want_value, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10 * b.abs().max())


def test_group_kernel_in_an_lcm_names_the_lcm_fix():
    """A ``GroupKernel`` with its own ``active_dims`` inside an ``LCMKernel`` gets every input column (the LCMKernel's
    MultitaskKernels call its ``forward`` directly): the ``ValueError`` named only ``MultitaskKernel(...,
    active_dims=[j])``, which an ``LCMKernel`` does not take; it now names the ``LCMKernel``'s attribute."""
    x = torch.cat([torch.rand(6, 1, dtype=torch.float64), torch.tensor([[0.0], [1.0], [0.0], [2.0], [1.0], [0.0]])], -1)
    kernel = gpytorch.kernels.LCMKernel([GroupKernel(3, active_dims=[1]), GroupKernel(3, active_dims=[1])], T, 1)
    with pytest.raises(ValueError, match=r"LCMKernel.*lcm\.active_dims = torch\.tensor\(\[j\]\)"):
        kernel(x).to_dense()
    kernel.active_dims = torch.tensor([1])  # the fix the message names
    assert kernel(x).to_dense().shape == (6 * T, 6 * T)


@pytest.mark.parametrize("container", ["lcm", "multitask"])
def test_block_mean_kernel_given_other_columns_by_a_multitask_container_is_refused(container):
    """A ``BlockMeanKernel`` bound to both input columns inside an ``LCMKernel`` or ``MultitaskKernel`` whose
    ``active_dims`` select one column gets one-column inputs (both call their members' ``forward``): it took them for
    new points, so the model trained and predicted on the exact base kernel, silently (linear_operator's CG past
    ``max_cholesky_size``). Refused by name, as inside a sum or a ``ScaleKernel``, in training and in eval mode."""
    from bma_gp import BlockMeanKernel, Partition

    gen = torch.Generator().manual_seed(5)
    n = 40
    groups = torch.randint(0, 5, (n,), generator=gen)
    x = torch.stack([torch.rand(n, generator=gen, dtype=torch.float64), groups.double()], -1)
    y = torch.randn(n, T, generator=gen, dtype=torch.float64)
    part = Partition.from_labels(groups)
    if container == "lcm":
        members = [BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, part) for _ in range(2)]
        kernel = gpytorch.kernels.LCMKernel(members, num_tasks=T, rank=1)
    else:
        base = BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, part)
        kernel = gpytorch.kernels.MultitaskKernel(base, num_tasks=T, rank=1)
    kernel.active_dims = torch.tensor([0])
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=T)
    model = _BatchMultitaskGP(x, y, likelihood, kernel, torch.Size()).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    message = r"bound to train_x with 2 columns but is given inputs with 1"
    with pytest.raises(ValueError, match=message):
        mll(model(x), y)
    model.eval()
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(x[:3])


@pytest.mark.parametrize("kind", ["multitask", "lcm"])
@pytest.mark.parametrize("rank", [0, 1])
def test_indexing_the_noisy_kronecker_sum(kind, rank):
    """Rows and columns taken out of the noisy training covariance of a ``MultitaskKernel(BlockMeanKernel)`` or an
    ``LCMKernel`` (``A[:n, :n]``) were linear_operator's plain sum of the indexed terms, solved by CG past
    ``max_cholesky_size`` without a word: now an indexed fallback whose solve warns and is exact below
    ``max_cholesky_size``. Indexing a batch keeps the closed form (each entry equals the unbatched sum's solve)."""
    from bma_gp import BlockMeanKernel, Partition

    gen = torch.Generator().manual_seed(7)
    n = 30
    groups = torch.randint(0, 5, (n,), generator=gen)
    x = torch.rand(n, 1, generator=gen, dtype=torch.float64)
    part = Partition.from_labels(groups)
    rbf = gpytorch.kernels.RBFKernel
    if kind == "multitask":
        kernel = gpytorch.kernels.MultitaskKernel(BlockMeanKernel(rbf(), x, part), num_tasks=T, rank=1)
    else:
        members = [BlockMeanKernel(rbf(), x, part), BlockMeanKernel(gpytorch.kernels.MaternKernel(), x, part)]
        kernel = gpytorch.kernels.LCMKernel(members, num_tasks=T, rank=1)
    kernel = kernel.double()
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=T, rank=rank).double()
    prior = gpytorch.distributions.MultitaskMultivariateNormal(torch.zeros(n, T, dtype=torch.float64), kernel(x))
    A = likelihood(prior).lazy_covariance_matrix
    rhs = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    sub = A[:n, :n]
    with pytest.warns(ClosedFormFallbackWarning):
        solved = sub.solve(rhs)
    torch.testing.assert_close(solved, torch.linalg.solve(A.to_dense()[:n, :n], rhs), rtol=1e-9, atol=1e-10)
    # a batch of two (the same sum twice), indexed back to one entry: still closed form
    batched = A.expand(2, *A.shape)
    entry = batched[1]
    full_rhs = torch.randn(n * T, 1, generator=gen, dtype=torch.float64)
    with closed_forms_only(n * T), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        got = entry.solve(full_rhs)
    torch.testing.assert_close(got, torch.linalg.solve(A.to_dense(), full_rhs), rtol=1e-9, atol=1e-10)
