"""``LCMKernel`` over block mean and group kernels under a ``MultitaskGaussianLikelihood`` in closed form (session 30).

The training covariance :math:`\\sum_q M_q \\otimes K_q + I_n \\otimes D` of an ``LCMKernel`` whose block mean factors
share one partition splits as a single ``MultitaskKernel``'s does: block :math:`i`'s within-block deviations see
:math:`G_i = \\sum_q \\lambda_{q,i} K_q + D`, the block means :math:`H = \\sum_q C_q \\otimes K_q + I_k \\otimes D`
(:class:`~bma_gp._composition.BlockMeanLCMLinearOperator`, :mod:`bma_gp._kronecker`). Before, linear_operator's
generic sum factorised it densely up to ``max_cholesky_size`` and took CG and Lanczos beyond it (announced for two
terms, silently for three). Every closed form here is compared with dense linear algebra on the same matrix, on
partitions with unequal blocks, a singleton block and non-contiguous labels; each test failed on the code before.
Block mean factors over different partitions, or a term that is not a block mean product, keep the announced
fallback."""

from __future__ import annotations

import contextlib
import math
import warnings

import gpytorch
import pytest
import torch
from linear_operator import settings as lo_settings

from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning, GroupKernel, Partition
from bma_gp._composition import BlockMeanLCMLinearOperator
from closed_form_guard import closed_forms_only
from kronecker_reference import MultitaskGP, assert_training_matches_dense, dense_posterior

pytestmark = pytest.mark.usefixtures("one_thread")

N = 50  # training points: 8 groups with labels 0..7 in random order, unequal sizes, group 7 a singleton


def _data(tasks: int, seed: int, n: int = N, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, 7, (n,), generator=gen)
    groups[:7] = torch.tensor([6, 0, 5, 1, 4, 2, 3])
    groups[-1] = 7  # a singleton group
    x = torch.cat([torch.rand(n, 1, generator=gen, dtype=dtype), groups.unsqueeze(-1).to(dtype)], -1)
    y = torch.randn(n, tasks, generator=gen, dtype=dtype)
    return x, y, groups, gen


def _lcm_model(kind: str, terms: int, tasks: int, rank: int, seed: int = 0, dtype=torch.float64):
    """``(model, x, y)``: an ``LCMKernel`` of ``terms`` kernels over the same groups of column 1, with
    ``MultitaskGaussianLikelihood(rank)``, the parameters moved away from their defaults.

    ``"block_mean"``: ``BlockMeanKernel``s of an RBF / Matern kernel over column 0 (one in a ``ScaleKernel``, the
    third with an equal partition built apart from the others'); ``"group"``: ``GroupKernel``s of 9 groups (one
    missing from the data; one in a ``ScaleKernel``): diagonal cores; ``"mixed"``: a ``GroupKernel``, a
    ``BlockMeanKernel`` of an RBF over the group ids and a scaled ``GroupKernel``. An ``LCMKernel`` calls its
    members' ``forward`` directly, so a ``GroupKernel``'s id column is selected by the ``LCMKernel``'s active_dims."""
    x, y, groups, gen = _data(tasks, seed, dtype=dtype)
    RBF, Matern, Scale = gpytorch.kernels.RBFKernel, gpytorch.kernels.MaternKernel, gpytorch.kernels.ScaleKernel
    if kind == "block_mean":
        part = Partition.from_labels(groups)
        bases = [
            BlockMeanKernel(RBF(active_dims=[0]), x, part),
            Scale(BlockMeanKernel(Matern(nu=1.5, active_dims=[0]), x, part)),
            BlockMeanKernel(RBF(active_dims=[0]), x, Partition.from_labels(groups.clone())),
        ]
    elif kind == "group":
        bases = [GroupKernel(9), Scale(GroupKernel(9)), GroupKernel(9)]
    else:
        ids = x[:, 1:]
        bases = [GroupKernel(8), BlockMeanKernel(RBF(), ids, Partition.from_labels(groups)), Scale(GroupKernel(8))]
    kernel = gpytorch.kernels.LCMKernel(bases[:terms], num_tasks=tasks, rank=1)
    if kind != "block_mean":
        kernel.active_dims = torch.tensor([1])
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=tasks, rank=rank)
    model = MultitaskGP(x, y, likelihood, kernel, tasks).to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # away from the defaults
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return model, x, y


CASES = [(2, 2), (2, 3), (3, 2), (3, 3)]  # (terms Q, tasks t)


@pytest.mark.parametrize("terms,tasks", CASES)
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("kind", ["block_mean", "group", "mixed"])
def test_marginal_likelihood_and_gradients_match_dense(kind, rank, terms, tasks):
    """The exact marginal log-likelihood and the gradient of every hyperparameter equal the dense ones to 1e-10
    under ``max_cholesky_size(0)``, with no CG, Lanczos or dense factorisation of ``n`` rows and no warning. Before:
    a FallbackSumLinearOperator (two terms, warned) or a plain AddedDiagLinearOperator (three, silent), solved by CG
    and Lanczos."""
    model, x, y = _lcm_model(kind, terms, tasks, rank, seed=terms + 10 * tasks)
    assert_training_matches_dense(model, x, y, BlockMeanLCMLinearOperator, max_cholesky=0)


@contextlib.contextmanager
def _closed(n: int):
    with lo_settings.max_cholesky_size(0), closed_forms_only(n), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        yield


@pytest.mark.parametrize("terms,tasks", [(2, 3), (3, 2)])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("kind", ["block_mean", "group", "mixed"])
def test_operator_methods_match_dense(kind, rank, terms, tasks):
    """``solve``, ``inv_quad_logdet``, ``logdet``, ``diagonal`` and both roots of the noisy training covariance, in
    closed form, equal dense linear algebra on its matrix (1e-10); ``add_jitter`` keeps the closed form."""
    model, x, y = _lcm_model(kind, terms, tasks, rank, seed=3 + terms)
    with torch.no_grad():
        A = model.likelihood(model(x)).lazy_covariance_matrix
        assert isinstance(A, BlockMeanLCMLinearOperator)
        dense = A.to_dense()
        size = dense.shape[-1]
        rhs = torch.randn(size, 3, generator=torch.Generator().manual_seed(1), dtype=dense.dtype)
        with _closed(N):
            solved = A.solve(rhs)
            quad, logdet = A.inv_quad_logdet(rhs, logdet=True)
            alone = A.logdet()
            diagonal = A.diagonal()
            root = A.root_decomposition().root
            inv_root = A.root_inv_decomposition().root
            products = (root @ rhs, root.mT @ rhs, inv_root @ rhs, inv_root.mT @ rhs)
            jittered = A.add_jitter(1e-3)
            jitter_logdet = jittered.logdet()
        assert isinstance(jittered, BlockMeanLCMLinearOperator)
        want_logdet = torch.logdet(dense)
        torch.testing.assert_close(solved, torch.linalg.solve(dense, rhs), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(quad, (rhs * torch.linalg.solve(dense, rhs)).sum(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(logdet, want_logdet, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(alone, want_logdet, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(diagonal, dense.diagonal(), rtol=1e-12, atol=1e-12)
        eye = torch.eye(size, dtype=dense.dtype)
        R, Ri = root.to_dense(), inv_root.to_dense()
        torch.testing.assert_close(R @ R.mT, dense, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(Ri @ Ri.mT, torch.linalg.inv(dense), rtol=1e-9, atol=1e-10)
        for got, want in zip(products, (R @ rhs, R.mT @ rhs, Ri @ rhs, Ri.mT @ rhs)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(jitter_logdet, torch.logdet(dense + 1e-3 * eye), rtol=1e-10, atol=1e-10)


def test_operator_gradients_match_dense():
    """Gradients of the closed form's ``inv_quad_logdet`` with respect to every block mean factor's offsets and
    block values, the task matrices and the noise equal those of the dense computation (1e-9): three terms, a
    task-coupling noise, one block mean factor with a diagonal core among full ones."""
    from linear_operator.operators import (
        ConstantDiagLinearOperator,
        DenseLinearOperator,
        KroneckerProductLinearOperator,
    )

    from bma_gp import BlockMeanLinearOperator

    gen = torch.Generator().manual_seed(7)
    labels = torch.tensor([4, 0, 2, 2, 5, 0, 4, 4, 2, 0, 5, 3, 4, 2, 0, 4, 2, 5, 1, 1])  # interleaved; 3 a singleton
    part = Partition.from_labels(labels)
    k, n, t = part.num_blocks, labels.numel(), 3
    leaves = []
    for q in range(3):
        lam = (torch.rand(k, generator=gen, dtype=torch.float64) + 0.2).requires_grad_()
        if q == 1:
            B = (torch.rand(k, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
        else:
            W = torch.randn(k, k, generator=gen, dtype=torch.float64)
            B = (W @ W.T / k).requires_grad_()
        F = torch.randn(t, t, generator=gen, dtype=torch.float64)
        K = (F @ F.T / t + 0.1 * torch.eye(t, dtype=torch.float64)).requires_grad_()
        leaves.append((lam, B, K, q == 1))
    F = torch.randn(t, 2, generator=gen, dtype=torch.float64)
    D = (F @ F.T + 0.2 * torch.eye(t, dtype=torch.float64)).requires_grad_()
    y = torch.randn(n * t, generator=gen, dtype=torch.float64)
    params = [p for lam, B, K, _ in leaves for p in (lam, B, K)] + [D]

    def closed():
        op = None
        for lam, B, K, diagonal in leaves:
            M = BlockMeanLinearOperator(lam, B, part, diagonal=diagonal)
            term = KroneckerProductLinearOperator(M, DenseLinearOperator(K))
            op = term if op is None else op + term
        ident = ConstantDiagLinearOperator(torch.ones(1, dtype=torch.float64), diag_shape=n)  # I_n
        return op + KroneckerProductLinearOperator(ident, DenseLinearOperator(D))

    op = closed()
    assert isinstance(op, BlockMeanLCMLinearOperator)
    with _closed(n):
        quad, logdet = op.inv_quad_logdet(y.unsqueeze(-1), logdet=True)
        got = torch.autograd.grad(quad + logdet, params)
    dense = op.to_dense()
    want_value = y @ torch.linalg.solve(dense, y) + torch.logdet(dense)
    want = torch.autograd.grad(want_value, params)
    torch.testing.assert_close(quad + logdet, want_value, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_float32_model_matches_dense_float64():
    """A float32 model: the marginal log-likelihood, its gradients and the predictive means and variances match the
    dense float64 computation on the same (float32) parameters to float32 accuracy (the small factorisations run in
    float64), in closed form."""
    model, x, y = _lcm_model("block_mean", 3, 2, 1, seed=5, dtype=torch.float32)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    names, params = zip(*model.named_parameters())
    with _closed(N):
        out = model.likelihood(model(x))
        assert isinstance(out.lazy_covariance_matrix, BlockMeanLCMLinearOperator)
        value = mll(model(x), y)
        got = torch.autograd.grad(value, params)
    xt = _prediction_points("block_mean", x)
    model.eval()
    with torch.no_grad(), _closed(N):
        pred = model(xt)
        mean, variance = pred.mean.reshape(-1), pred.variance.reshape(-1)
    assert type(model.prediction_strategy).__name__ == "KroneckerPredictionStrategy"
    assert mean.dtype == variance.dtype == torch.float32
    model.train()
    twin = model.double()  # (the same values, widened)
    params64 = [p for _, p in twin.named_parameters()]
    with torch.no_grad():
        want_mean, want_covar = dense_posterior(twin, x.double(), y.double(), xt.double())
    assert torch.allclose(mean.double(), want_mean, rtol=1e-4, atol=1e-5)
    assert torch.allclose(variance.double(), want_covar.diagonal(), rtol=1e-3, atol=1e-5 * want_covar.abs().max())
    out = twin.likelihood(twin(x.double()))
    dense = torch.distributions.MultivariateNormal(out.mean.reshape(-1), out.lazy_covariance_matrix.to_dense())
    ref = dense.log_prob(y.double().reshape(-1)) / y.numel()
    want = torch.autograd.grad(ref, params64)
    assert value.dtype == torch.float32
    assert abs(value.double().item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    for name, a, b in zip(names, got, want, strict=True):
        assert torch.allclose(a.double(), b, rtol=1e-3, atol=1e-4 * b.abs().max().item()), name


def _dense_at_training_inputs(model, x, y):
    """The posterior mean and covariance at the training inputs from the dense prior ``K`` there,
    ``K - K (K + noise)^{-1} K`` (a ``BlockMeanKernel`` takes the points of ``cat(x, x)`` past ``n`` for new points, so
    :func:`kronecker_reference.dense_posterior` does not give it), with the graph of the model's parameters."""
    model.train()
    n = x.shape[0]
    prior = model.covar_module(x).to_dense()
    train = prior + model.likelihood._shaped_noise_covar((n, n)).to_dense()
    residual = y.reshape(-1) - model.mean_module(x).reshape(-1)
    mean = model.mean_module(x).reshape(-1) + prior @ torch.linalg.solve(train, residual)
    return mean, prior - prior @ torch.linalg.solve(train, prior)


def _prediction_points(kind: str, x):
    """9 new points: the first training inputs moved along column 0; for group kernels the last one in group 8, which
    the training data lack (its cross covariance row is 0)."""
    xt = x[:9] + torch.tensor([0.05, 0.0], dtype=x.dtype)
    if kind == "group":
        xt[-1, 1] = 8
    return xt


@pytest.mark.parametrize("fast", [True, False], ids=["fast_pred_var", "exact"])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("kind", ["block_mean", "group", "mixed"])
def test_prediction_matches_dense(kind, rank, fast):
    """Posterior means, variances and covariances at new inputs and at the training inputs (and with the likelihood's
    noise) equal the dense posterior's (1e-10 relative), through the Kronecker prediction strategy, with no CG,
    Lanczos, dense factorisation of ``n`` rows or warning, with ``fast_pred_var`` on and off; no matrix of ``n t``
    rows and columns is formed at new inputs. Before: GPyTorch's default strategy (an LCMKernel asks for none),
    whose solves were the generic sum's CG and whose ``fast_pred_var`` formed the ``n t x n t`` inverse root."""
    from largest_tensor import LargestTensor

    terms, tasks = (3, 2) if kind != "mixed" else (3, 3)
    model, x, y = _lcm_model(kind, terms, tasks, rank, seed=11)
    xt = _prediction_points(kind, x)
    with torch.no_grad():
        want_mean, want_covar = dense_posterior(model, x, y, xt)
        train_mean, train_covar = _dense_at_training_inputs(model, x, y)
    noise = model.likelihood._shaped_noise_covar((9, 9)).to_dense().detach()
    model.eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(fast), _closed(N):
        with LargestTensor(storage=True) as largest:
            pred = model(xt)
            mean, variance, covar = pred.mean.reshape(-1), pred.variance.reshape(-1), pred.covariance_matrix
            noisy_covar = model.likelihood(pred).covariance_matrix
        with warnings.catch_warnings(), LargestTensor(storage=True) as largest_train:
            warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)  # "matches the training data"
            at_train = model(x)
            t_mean, t_variance = at_train.mean.reshape(-1), at_train.variance.reshape(-1)
            t_covar = at_train.lazy_covariance_matrix
            rhs = torch.randn(N * tasks, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
            t_product = t_covar @ rhs
            noisy = model.likelihood(at_train)
            t_log_prob = noisy.log_prob(y)
    assert type(model.prediction_strategy).__name__ == "KroneckerPredictionStrategy"
    scale = want_covar.abs().max()
    torch.testing.assert_close(mean, want_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(covar, want_covar, rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(variance, want_covar.diagonal(), rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(noisy_covar, want_covar + noise, rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(t_mean, train_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t_variance, train_covar.diagonal(), rtol=1e-9, atol=1e-11 * scale)
    torch.testing.assert_close(t_product, train_covar @ rhs, rtol=1e-9, atol=1e-11 * scale)
    want_noisy = train_covar + model.likelihood._shaped_noise_covar((N, N)).to_dense().detach()
    want_log_prob = torch.distributions.MultivariateNormal(train_mean, want_noisy).log_prob(y.reshape(-1))
    torch.testing.assert_close(t_log_prob, want_log_prob, rtol=1e-10, atol=1e-10)
    # at new inputs: the base kernels' 9 x n cross covariances, the 9 t x 9 t predictive covariance or the core's
    # (k t)^2 are the largest matrices (GPyTorch's: the n t x n t inverse root, the 9 t x n t cross covariance)
    bound = max(9 * N, (9 * tasks) ** 2)
    assert largest.largest <= bound, (largest.largest, largest.where)
    # at the training inputs: O(n t) vectors and the (k t)^2 core (8 blocks), nothing n t x n t
    assert largest_train.largest <= max(4 * N * tasks, (8 * tasks) ** 2), (largest_train.largest, largest_train.where)


def _mixed_partition_model(second: str, terms: int):
    """An LCMKernel of ``terms`` kernels whose second is not over the others' partition (``"partition"``: a
    BlockMeanKernel over other blocks) or not a block mean product (``"exact"``: a plain RBF kernel), with a rank-1
    likelihood."""
    x, y, groups, _ = _data(2, seed=4)
    part = Partition.from_labels(groups)
    RBF = gpytorch.kernels.RBFKernel
    if second == "partition":
        other = BlockMeanKernel(RBF(active_dims=[0]), x, Partition.from_labels(groups % 3))
    else:
        other = RBF(active_dims=[0])
    bases = [BlockMeanKernel(RBF(active_dims=[0]), x, part), other, BlockMeanKernel(RBF(active_dims=[0]), x, part)]
    kernel = gpytorch.kernels.LCMKernel(bases[:terms], num_tasks=2, rank=1)
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, rank=1)
    return MultitaskGP(x, y, likelihood, kernel, 2).double(), x, y


@pytest.mark.parametrize("second", ["partition", "exact"])
def test_other_partitions_or_terms_keep_the_warned_fallback(second):
    """Block mean factors over different partitions, or a term that is not a block mean product, two or three terms:
    no closed form, and the marginal log-likelihood says so with a ClosedFormFallbackWarning naming the reason (and
    equals the dense one below max_cholesky_size). Before: announced for two terms (without the reason for other
    partitions), silent for three (a plain AddedDiagLinearOperator)."""
    for terms in (2, 3):
        model, x, y = _mixed_partition_model(second, terms)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        match = "partition the data differently" if second == "partition" else "no closed form"
        with pytest.warns(ClosedFormFallbackWarning, match=match):
            value = mll(model(x), y)
        with torch.no_grad():
            out = model.likelihood(model(x))
            r = (y - out.mean).reshape(-1)
            D = out.covariance_matrix
        logdet = torch.logdet(D)
        dense = -0.5 * (r @ torch.linalg.solve(D, r) + logdet + r.numel() * math.log(2 * math.pi)) / r.numel()
        torch.testing.assert_close(value.detach(), dense, rtol=1e-8, atol=1e-8)


def test_three_terms_without_noise_warn_where_solved():
    """The prior covariance of three LCM terms alone (no noise, so no closed form): a solve announces its fallback.
    Before: a plain SumLinearOperator, solved by CG without a word past max_cholesky_size."""
    model, x, _ = _lcm_model("block_mean", 3, 2, 0, seed=2)
    with torch.no_grad():
        prior = model.covar_module(x).evaluate_kernel()
        rhs = torch.randn(prior.shape[-1], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        assert isinstance(prior, BlockMeanLCMLinearOperator)
        with pytest.warns(ClosedFormFallbackWarning, match="no noise term"):
            solved = prior.solve(rhs)
    torch.testing.assert_close(solved, torch.linalg.solve(prior.to_dense(), rhs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("where", ["new", "training"])
@pytest.mark.parametrize("kind", ["block_mean", "mixed"])
def test_prediction_gradients_match_dense(kind, where):
    """With ``detach_test_caches(False)`` the gradients of the predictive means and variances with respect to every
    hyperparameter equal the dense posterior's (1e-9), through the closed form's caches, under ``fast_pred_var``."""
    model, x, y = _lcm_model(kind, 2, 2, 1, seed=13)
    names, params = zip(*model.named_parameters())
    if where == "training":
        xt = x
        want_mean, want_covar = _dense_at_training_inputs(model, x, y)
    else:
        xt = _prediction_points(kind, x)
        want_mean, want_covar = dense_posterior(model, x, y, xt)
    weights = torch.randn(2, xt.shape[0] * 2, generator=torch.Generator().manual_seed(5), dtype=x.dtype)

    def loss(mean, variance):
        return (weights[0] * mean).sum() + (weights[1] * variance).sum()

    want = torch.autograd.grad(loss(want_mean, want_covar.diagonal()), params)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
        with gpytorch.settings.detach_test_caches(False), gpytorch.settings.fast_pred_var(), _closed(N):
            pred = model(xt)
            got = torch.autograd.grad(loss(pred.mean.reshape(-1), pred.variance.reshape(-1)), params)
    assert type(model.prediction_strategy).__name__ == "KroneckerPredictionStrategy"
    for name, a, b in zip(names, got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * b.abs().max()), name


@pytest.mark.parametrize("rank", [0, 1])
def test_scaled_lcm_kernel_trains_and_predicts_in_closed_form(rank):
    """``ScaleKernel(LCMKernel(...))``: the outer constant scales every term's task matrix; the marginal
    log-likelihood, its gradients and the prediction at new and at training inputs equal the dense ones, in closed
    form. Before: the generic sum's CG, announced."""
    model, x, y = _lcm_model("block_mean", 2, 2, rank, seed=17)
    model.covar_module = gpytorch.kernels.ScaleKernel(model.covar_module).double()
    with torch.no_grad():
        model.covar_module.raw_outputscale.fill_(0.7)
    assert_training_matches_dense(model, x, y, BlockMeanLCMLinearOperator, max_cholesky=0)
    xt = _prediction_points("block_mean", x)
    with torch.no_grad():
        want_mean, want_covar = dense_posterior(model, x, y, xt)
        train_mean, train_covar = _dense_at_training_inputs(model, x, y)
    model.eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(), _closed(N), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
        pred = model(xt)
        mean, variance = pred.mean.reshape(-1), pred.variance.reshape(-1)
        at_train = model(x)
        t_mean, t_variance = at_train.mean.reshape(-1), at_train.variance.reshape(-1)
    assert type(model.prediction_strategy).__name__ == "KroneckerPredictionStrategy"
    scale = want_covar.abs().max()
    torch.testing.assert_close(mean, want_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(variance, want_covar.diagonal(), rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(t_mean, train_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t_variance, train_covar.diagonal(), rtol=1e-9, atol=1e-11 * scale)


@pytest.mark.parametrize("diagonal", [False, True], ids=["full_core", "diagonal_core"])
def test_batched_operator_matches_dense(diagonal):
    """A batch of three LCM sums (``sum_q M_q (x) K_q`` with batched block values and task matrices, plus a batched
    per-task noise): solve, log-determinant, ``inv_quad_logdet``, the diagonal and both roots equal dense linear
    algebra per batch entry (1e-10), in closed form."""
    from linear_operator.operators import (
        ConstantDiagLinearOperator,
        DenseLinearOperator,
        DiagLinearOperator,
        KroneckerProductDiagLinearOperator,
        KroneckerProductLinearOperator,
    )

    from bma_gp import BlockMeanLinearOperator

    gen = torch.Generator().manual_seed(3)
    part = Partition.from_labels(torch.tensor([2, 0, 1, 1, 0, 2, 2, 3, 1, 0, 2, 1]))  # 3 a singleton
    k, n, t, b = part.num_blocks, part.n, 2, 3
    op = None
    for _ in range(3):
        lam = torch.rand(b, k, generator=gen, dtype=torch.float64) + 0.2
        if diagonal:
            B = torch.rand(b, k, generator=gen, dtype=torch.float64)
        else:
            W = torch.randn(b, k, k, generator=gen, dtype=torch.float64)
            B = W @ W.mT / k
        M = BlockMeanLinearOperator(lam, B, part, diagonal=diagonal)
        F = torch.randn(b, t, t, generator=gen, dtype=torch.float64)
        term = KroneckerProductLinearOperator(
            M, DenseLinearOperator(F @ F.mT + 0.1 * torch.eye(t, dtype=torch.float64))
        )
        op = term if op is None else op + term
    ones = ConstantDiagLinearOperator(torch.ones(b, 1, dtype=torch.float64), diag_shape=n)
    task_noise = DiagLinearOperator(torch.rand(b, t, generator=gen, dtype=torch.float64) + 0.1)
    A = op + KroneckerProductDiagLinearOperator(ones, task_noise)
    assert isinstance(A, BlockMeanLCMLinearOperator) and A.shape == (b, n * t, n * t)
    rhs = torch.randn(b, n * t, 2, generator=gen, dtype=torch.float64)
    with _closed(n):
        solved, logdet = A.solve(rhs), A.logdet()
        quad, both = A.inv_quad_logdet(rhs, logdet=True)
        diag = A.diagonal()
        R, Ri = A.root_decomposition().root.to_dense(), A.root_inv_decomposition().root.to_dense()
    D = A.to_dense()
    torch.testing.assert_close(solved, torch.linalg.solve(D, rhs), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet, torch.logdet(D), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(both, torch.logdet(D), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(quad, (rhs * torch.linalg.solve(D, rhs)).sum((-2, -1)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(diag, D.diagonal(dim1=-2, dim2=-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R @ R.mT, D, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(Ri @ Ri.mT, torch.linalg.inv(D), rtol=1e-9, atol=1e-10)
