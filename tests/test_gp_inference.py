"""ExactGP training and prediction with block mean kernels, against a dense reference.

The reference builds the block-exchangeable joint covariance entry by entry (docs/math.md, section 2)
and conditions with dense LU solves. The model runs under ``closed_forms_only``: CG,
Lanczos, ``psd_safe_cholesky`` and every dense factorisation of an ``n x n`` matrix raise.
"""

from __future__ import annotations

import math
import warnings

import gpytorch
import pytest
import torch

from bma_gp import ClosedFormFallbackWarning, Partition
from bma_gp.kernels import BlockMeanKernel, GroupKernel
from closed_form_guard import closed_forms_only

DTYPE = torch.float64


# ---------------------------------------------------------------------------- dense reference
def dense_block_mean(K: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The block mean approximation (docs/math.md, section 2) entry by entry: block means off the diagonal,
    diagonal means on it."""
    k = int(labels.max()) + 1
    onehot = torch.nn.functional.one_hot(labels, k).to(K.dtype)  # (n, k)
    B = torch.zeros(*K.shape[:-2], k, k, dtype=K.dtype)
    lam = torch.zeros(*K.shape[:-2], k, dtype=K.dtype)
    for i in range(k):
        rows = (labels == i).nonzero().flatten()
        for j in range(k):
            cols = (labels == j).nonzero().flatten()
            block = K[..., rows, :][..., :, cols]
            if i != j:
                B[..., i, j] = block.mean((-1, -2))
            else:
                s = rows.numel()
                diag = torch.diagonal(block, dim1=-2, dim2=-1)
                B[..., i, i] = (block.sum((-1, -2)) - diag.sum(-1)) / (s * (s - 1)) if s > 1 else 0.0
                lam[..., i] = diag.mean(-1) - B[..., i, i]
    return onehot @ B @ onehot.T + torch.diag_embed(lam[..., labels])


def dense_cross(K_new_train: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of k(x, X_j) over the block j of each training column."""
    k = int(labels.max()) + 1
    onehot = torch.nn.functional.one_hot(labels, k).to(K_new_train.dtype)
    means = (K_new_train @ onehot) / onehot.sum(0)
    return means @ onehot.T


def dense_posterior(Ktrain, noise, y, mean, Kcross, Ktest):
    A = Ktrain + noise * torch.eye(Ktrain.shape[-1], dtype=Ktrain.dtype)
    alpha = torch.linalg.solve(A, (y - mean).unsqueeze(-1))
    mu = mean + (Kcross @ alpha).squeeze(-1)
    cov = Ktest - Kcross @ torch.linalg.solve(A, Kcross.mT)
    return mu, cov


def dense_mll(Ktrain, noise, y, mean):
    A = Ktrain + noise * torch.eye(Ktrain.shape[-1], dtype=Ktrain.dtype)
    r = (y - mean).unsqueeze(-1)
    quad = (r * torch.linalg.solve(A, r)).sum((-1, -2))
    logdet = torch.linalg.slogdet(A)[1]
    n = y.shape[-1]
    return -0.5 * (quad + logdet + n * math.log(2 * math.pi)) / n


def assert_mll_matches_dense(loss, grads, K, likelihood, y, mean, params):
    """``loss`` (an exact marginal log likelihood) and its ``grads`` against the dense computation for the training
    covariance ``K`` (values rtol 1e-10, gradients rtol 1e-8)."""
    ref = dense_mll(K, likelihood.noise, y, mean)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------- models
class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar_module, batch_shape=()):
        super().__init__(x, y, likelihood)
        batch_shape = torch.Size(batch_shape)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch_shape)
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def make_data(n=48, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=DTYPE)
    y = torch.sin(5 * x[:, 0]) + x[:, -1] ** 2 + 0.1 * torch.randn(n, generator=g, dtype=DTYPE)
    return x, y


def make_partition(n, k, contiguous, seed=1):
    if contiguous:
        sizes = torch.full((k,), n // k)
        sizes[: n % k] += 1
        return Partition.from_sizes(sizes)
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=g)])
    labels = labels[torch.randperm(n, generator=g)]
    labels[0] = labels[1]  # ensure at least one block with two members
    labels = torch.unique(labels, return_inverse=True)[1]
    return Partition.from_labels(labels)


def build_model(x, y, partition, scale: bool, ard: bool = True):
    base = gpytorch.kernels.RBFKernel(ard_num_dims=x.shape[-1] if ard else None)
    base.lengthscale = 0.3
    kernel = BlockMeanKernel(base, x, partition)
    if scale:
        kernel = gpytorch.kernels.ScaleKernel(kernel)
        kernel.outputscale = 1.7
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 0.05
    model = GP(x, y, likelihood, kernel).to(DTYPE)
    model.mean_module.constant.data.fill_(0.2)
    return model, likelihood, base


def reference_pieces(model, base, x, xt, partition):
    """Dense block-exchangeable covariances with the model's current hyperparameters."""
    scale = model.covar_module.outputscale if isinstance(model.covar_module, gpytorch.kernels.ScaleKernel) else 1.0
    with gpytorch.settings.lazily_evaluate_kernels(False):
        K = base(x, x).to_dense()
        Kx = base(xt, x).to_dense() if xt is not None else None
        Kt = base(xt, xt).to_dense() if xt is not None else None
    labels = partition.labels
    Ktrain = scale * dense_block_mean(K, labels)
    if xt is None:
        return Ktrain, None, None
    return Ktrain, scale * dense_cross(Kx, labels), scale * Kt


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("max_chol", [800, 0])
def test_training_step_matches_dense_reference(contiguous, scale, max_chol):
    x, y = make_data()
    partition = make_partition(x.shape[0], 7, contiguous)
    model, likelihood, base = build_model(x, y, partition, scale)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    with closed_forms_only(x.shape[0]), gpytorch.settings.max_cholesky_size(max_chol):
        loss = mll(model(x), y)
        params = [p for p in model.parameters()]
        grads = torch.autograd.grad(loss, params)

    Ktrain, _, _ = reference_pieces(model, base, x, None, partition)
    ref = dense_mll(Ktrain, likelihood.noise, y, model.mean_module.constant)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)
    assert any(float(g.abs().max()) > 1e-6 for g in grads)  # the check is not vacuous


@pytest.mark.slow
def test_optimizer_steps_run_in_closed_form_and_decrease_loss():
    x, y = make_data(n=60)
    partition = make_partition(60, 6, contiguous=False)
    model, likelihood, _ = build_model(x, y, partition, scale=True)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    with closed_forms_only(60):
        for _ in range(15):
            opt.zero_grad()
            loss = -mll(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss))
    assert losses[-1] < losses[0] - 1e-3


# ---------------------------------------------------------------------------- prediction
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("fast_pred_var", [False, True])
@pytest.mark.parametrize("max_chol", [800, 0])
def test_prediction_matches_dense_reference(contiguous, scale, fast_pred_var, max_chol):
    x, y = make_data()
    xt = torch.rand(9, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    partition = make_partition(x.shape[0], 7, contiguous)
    model, likelihood, base = build_model(x, y, partition, scale)
    model.eval()
    likelihood.eval()
    with (
        closed_forms_only(x.shape[0]),
        gpytorch.settings.max_cholesky_size(max_chol),
        gpytorch.settings.fast_pred_var(fast_pred_var),
    ):
        latent = model(xt)
        mean, var, cov = latent.mean, latent.variance, latent.covariance_matrix
        observed = likelihood(model(xt))
        obs_mean, obs_var = observed.mean, observed.variance

    Ktrain, Kcross, Ktest = reference_pieces(model, base, x, xt, partition)
    ref_mean, ref_cov = dense_posterior(Ktrain, likelihood.noise, y, model.mean_module.constant, Kcross, Ktest)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(var, ref_cov.diagonal(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(obs_mean, ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(obs_var, ref_cov.diagonal() + likelihood.noise, rtol=1e-9, atol=1e-9)
    assert bool((var >= 0).all())


def test_prediction_far_and_near_training_points_is_nonnegative_and_bounded():
    x, y = make_data(n=80)
    partition = make_partition(80, 4, contiguous=False)
    model, likelihood, base = build_model(x, y, partition, scale=True)
    model.likelihood.noise = 1e-4
    model.eval()
    xt = torch.cat([x[:10] + 1e-3, torch.full((3, 2), 5.0, dtype=DTYPE)])
    with closed_forms_only(80):
        var = model(xt).variance
    prior = model.covar_module.outputscale.detach()
    assert bool((var >= 0).all()) and bool((var <= prior + 1e-9).all())
    torch.testing.assert_close(var[-3:], prior.expand(3), rtol=1e-6, atol=1e-6)  # far away: prior variance


def test_prediction_at_training_inputs_is_posterior_of_training_points():
    x, y = make_data()
    partition = make_partition(x.shape[0], 6, contiguous=True)
    model, likelihood, base = build_model(x, y, partition, scale=False)
    model.eval()
    with closed_forms_only(x.shape[0] + 1):
        post = model(x)
        mean, cov = post.mean, post.covariance_matrix
    Ktrain, _, _ = reference_pieces(model, base, x, None, partition)
    ref_mean, ref_cov = dense_posterior(Ktrain, likelihood.noise, y, model.mean_module.constant, Ktrain, Ktrain)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("scale", [True, False])
def test_eager_kernel_evaluation_in_eval_mode_warns(scale):
    """Under lazily_evaluate_kernels(False) GPyTorch evaluates the kernel on cat(train_x, test_x) and never asks it
    for its prediction strategy: model(train_x) is then the posterior of new points at the training inputs, not
    the one at the training points. The kernel says so in a warning; the default (lazy) path stays exact and
    silent, and training under the eager setting does not warn."""
    x, y = make_data()
    partition = make_partition(x.shape[0], 6, contiguous=False)
    model, likelihood, base = build_model(x, y, partition, scale=scale)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with gpytorch.settings.lazily_evaluate_kernels(False):
            mll(model(x), y).backward()  # training mode: the training covariance alone
        model.eval()
        with torch.no_grad():
            lazy = model(x)
            lazy_mean = lazy.mean
    Ktrain, _, _ = reference_pieces(model, base, x, None, partition)
    ref_mean, _ = dense_posterior(Ktrain, likelihood.noise, y, model.mean_module.constant, Ktrain, Ktrain)
    torch.testing.assert_close(lazy_mean, ref_mean, rtol=1e-9, atol=1e-9)
    model.prediction_strategy = None
    with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False):
        with pytest.warns(ClosedFormFallbackWarning, match="lazily_evaluate_kernels on"):
            eager_mean = model(x).mean
    assert (eager_mean - ref_mean).abs().max() > 1e-3  # the other quantity, as the warning says


def test_stale_training_data_is_detected_and_set_train_data_fixes_it():
    x, y = make_data(n=40)
    partition = make_partition(40, 5, contiguous=True)
    model, likelihood, base = build_model(x, y, partition, scale=False)
    x2, y2 = make_data(n=30, seed=3)
    model.set_train_data(x2, y2, strict=False)
    model.eval()
    xt = torch.rand(4, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="set_train_data"):
        model(xt)
    partition2 = make_partition(30, 3, contiguous=False)
    model.covar_module.set_train_data(x2, partition2)
    model.prediction_strategy = None
    with closed_forms_only(30):
        mean = model(xt).mean
    Ktrain, Kcross, Ktest = reference_pieces(model, base, x2, xt, partition2)
    ref_mean, _ = dense_posterior(Ktrain, likelihood.noise, y2, model.mean_module.constant, Kcross, Ktest)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)


def test_batch_independent_outputs():
    x, y = make_data(n=36)
    ys = torch.stack([y, -2 * y + 0.3])
    partition = make_partition(36, 4, contiguous=False)
    base = gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2]))
    base.lengthscale = torch.tensor([[[0.2]], [[0.5]]])
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size([2]))
    likelihood.noise = 0.1
    model = GP(x, ys, likelihood, BlockMeanKernel(base, x, partition), batch_shape=torch.Size([2])).to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    xt = torch.rand(5, 2, dtype=DTYPE)
    with closed_forms_only(36):
        loss = mll(model(x), ys)
        model.eval()
        post = model(xt)
        mean, var = post.mean, post.variance
    for b in range(2):
        with gpytorch.settings.lazily_evaluate_kernels(False):
            K = base(x, x).to_dense()[b]
            Kx = base(xt, x).to_dense()[b]
            Kt = base(xt, xt).to_dense()[b]
        Ktrain = dense_block_mean(K, partition.labels)
        noise = likelihood.noise[b]
        c = model.mean_module.constant[b]
        ref_mean, ref_cov = dense_posterior(Ktrain, noise, ys[b], c, dense_cross(Kx, partition.labels), Kt)
        torch.testing.assert_close(mean[b], ref_mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(var[b], ref_cov.diagonal(), rtol=1e-9, atol=1e-9)
    ref_loss = torch.stack(
        [
            dense_mll(
                dense_block_mean(base(x, x).to_dense()[b], partition.labels),
                likelihood.noise[b],
                ys[b],
                model.mean_module.constant[b],
            )
            for b in range(2)
        ]
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)


def test_float32_prediction_is_close_to_float64():
    x, y = make_data()
    partition = make_partition(x.shape[0], 6, contiguous=False)
    model, likelihood, _ = build_model(x, y, partition, scale=True)
    xt = torch.rand(6, 2, dtype=DTYPE)
    model.eval()
    ref = model(xt)
    model32 = model.float()
    model32.prediction_strategy = None
    with closed_forms_only(x.shape[0]):
        out = model32(xt.float())
        mean, var = out.mean, out.variance
    torch.testing.assert_close(mean.double(), ref.mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(var.double(), ref.variance, rtol=1e-3, atol=1e-3)
    assert bool((var >= 0).all())


# ---------------------------------------------------------------------------- GroupKernel in a GP
def group_data(n=200, num_groups=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_groups - 2, (n,), generator=g)  # the last two ids never occur in training
    effect = torch.randn(num_groups, generator=g, dtype=DTYPE)
    y = effect[ids] + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    return ids.to(DTYPE).unsqueeze(-1), y


@pytest.mark.parametrize("fast_pred_var", [False, True])
def test_group_kernel_gp_matches_dense_exact_gp(fast_pred_var):
    x, y = group_data()
    kernel = GroupKernel(12, rank=2)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = GP(x, y, likelihood, gpytorch.kernels.ScaleKernel(kernel)).to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    params = list(model.parameters())
    with closed_forms_only(x.shape[0]):
        loss = mll(model(x), y)
        grads = torch.autograd.grad(loss, params)

    C = model.covar_module.outputscale * kernel.covar_matrix
    ids = x[:, 0].long()
    K = C[ids][:, ids]
    assert_mll_matches_dense(loss, grads, K, likelihood, y, model.mean_module.constant, params)

    xt = torch.tensor([[0.0], [3.0], [10.0], [11.0], [3.0]], dtype=DTYPE)  # includes unseen ids 10, 11
    model.eval()
    with closed_forms_only(x.shape[0]), gpytorch.settings.fast_pred_var(fast_pred_var):
        post = model(xt)
        mean, cov = post.mean, post.covariance_matrix
    tid = xt[:, 0].long()
    ref_mean, ref_cov = dense_posterior(
        K, likelihood.noise, y, model.mean_module.constant, C[tid][:, ids], C[tid][:, tid]
    )
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-9, atol=1e-9)
    assert bool((post.variance >= 0).all())


def test_group_kernel_plus_rbf_uses_generic_path_correctly():
    g = torch.Generator().manual_seed(2)
    n = 50
    ids = torch.randint(0, 5, (n,), generator=g).to(DTYPE)
    t = torch.rand(n, generator=g, dtype=DTYPE)
    x = torch.stack([ids, t], -1)
    y = ids * 0.3 + torch.sin(6 * t)
    group = GroupKernel(5, rank=1, active_dims=[0])
    rbf = gpytorch.kernels.RBFKernel(active_dims=[1])
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = GP(x, y, likelihood, group + rbf).to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    loss = mll(model(x), y)
    C = group.covar_matrix
    il = ids.long()
    with gpytorch.settings.lazily_evaluate_kernels(False):
        K = C[il][:, il] + rbf(x, x).to_dense()
    torch.testing.assert_close(
        loss, dense_mll(K, likelihood.noise, y, model.mean_module.constant), rtol=1e-8, atol=1e-8
    )
    xt = torch.tensor([[1.0, 0.5], [4.0, 0.1]], dtype=DTYPE)
    model.eval()
    mean = model(xt).mean
    with gpytorch.settings.lazily_evaluate_kernels(False):
        Kx = C[xt[:, 0].long()][:, il] + rbf(xt, x).to_dense()
        Kt = C[xt[:, 0].long()][:, xt[:, 0].long()] + rbf(xt, xt).to_dense()
    ref_mean, _ = dense_posterior(K, likelihood.noise, y, model.mean_module.constant, Kx, Kt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("lengthscale", [2.0, 0.3])
def test_posterior_draws_at_training_inputs_have_finite_gradients(lengthscale):
    # a long lengthscale makes the block mean posterior at the training inputs singular within rounding; the
    # symmetric square root's derivative there was infinite and every hyperparameter gradient of a draw NaN
    g = torch.Generator().manual_seed(5)
    n = 60
    x = torch.rand(n, 1, generator=g, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0]) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    labels = torch.cat([torch.arange(8), torch.randint(0, 8, (n - 8,), generator=g)])[torch.randperm(n, generator=g)]

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean()
            base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
            self.covar_module = BlockMeanKernel(base, x, Partition.from_labels(labels, 8))

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), self.covar_module(inputs))

    model = GP().double()
    model.covar_module.base_kernel.base_kernel.lengthscale = lengthscale
    model.eval()
    base = torch.randn(3, n, generator=g, dtype=torch.float64)
    # at the training inputs the gradients are those of the exact posterior covariance (the noise's too), whatever
    # detach_test_caches says (docs/gp.md, section 4)
    for detach in (True, False):
        model.zero_grad()
        with gpytorch.settings.detach_test_caches(detach):
            post = model(x)
            draws = post.rsample(torch.Size([3]), base_samples=base)
            draws.sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    # the root is still one of the posterior covariance (to rounding)
    with torch.no_grad():
        R = post.lazy_covariance_matrix.root_decomposition().root.to_dense()
        S = post.covariance_matrix
    torch.testing.assert_close(R @ R.mT, S, rtol=0, atol=1e-12 * float(S.abs().max()))
