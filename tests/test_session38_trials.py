"""Session 38 user trials: the findings, each a test that failed on the code before the fix."""

from __future__ import annotations

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanLinearOperator, GroupKernel, Partition
from gp_reference import GP

PARTITIONS = {
    "scattered": [2, 0, 1, 0, 3, 1, 1, 0, 2, 4, 1, 0],  # blocks 3 and 4 are singletons
    "one_block": [0] * 7,
    "all_singletons": [4, 2, 0, 1, 3],
}


def _operator(labels, batch, dtype, diagonal_core, requires_grad=False):
    gen = torch.Generator().manual_seed(len(labels))
    partition = Partition.from_labels(torch.tensor(labels))
    k = partition.num_blocks
    if diagonal_core:
        B = torch.diag_embed(torch.rand(*batch, k, generator=gen, dtype=torch.float64) + 0.3)
    else:
        root = torch.randn(*batch, k, k, generator=gen, dtype=torch.float64)
        B = root @ root.mT / k + 0.2
    lam = torch.rand(*batch, k, generator=gen, dtype=torch.float64) + 0.5
    lam, B = lam.to(dtype).requires_grad_(requires_grad), B.to(dtype).requires_grad_(requires_grad)
    return BlockMeanLinearOperator(lam, B, partition), lam, B


@pytest.mark.parametrize("diagonal_core", [True, False])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(PARTITIONS))
def test_block_sums_of_a_solve_match_dense(name, dtype, batch, diagonal_core):
    labels = PARTITIONS[name]
    op, lam, B = _operator(labels, batch, dtype, diagonal_core)
    rhs = torch.randn(*batch, len(labels), 3, dtype=dtype, generator=torch.Generator().manual_seed(1))
    P = torch.nn.functional.one_hot(torch.tensor(labels)).to(torch.float64)
    expected = P.mT @ torch.linalg.solve(op.to_dense().double(), rhs.double())
    got = op._solve_block_sums(rhs)
    assert got.dtype == torch.float64  # the core's precision
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("diagonal_core", [True, False])
def test_block_sums_of_a_solve_have_dense_gradients(diagonal_core):
    labels = PARTITIONS["scattered"]
    gen = torch.Generator().manual_seed(3)
    partition = Partition.from_labels(torch.tensor(labels))
    k = partition.num_blocks
    lam = (torch.rand(k, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    shape = (k,) if diagonal_core else (k, k)
    raw = (torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.3).requires_grad_(True)
    rhs = torch.randn(len(labels), 2, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(k, 2, generator=gen, dtype=torch.float64)

    def B():  # diagonal by construction, or a symmetric matrix
        return torch.diag_embed(raw) if diagonal_core else raw @ raw.mT

    op = BlockMeanLinearOperator(lam, B(), partition)
    assert op._diagonal_core() == diagonal_core
    got = torch.autograd.grad((op._solve_block_sums(rhs) * weights).sum(), (lam, raw, rhs))
    P = torch.nn.functional.one_hot(torch.tensor(labels)).to(torch.float64)
    dense = torch.diag_embed(lam[torch.tensor(labels)]) + B()[labels][:, labels]
    expected = torch.autograd.grad(((P.mT @ torch.linalg.solve(dense, rhs)) * weights).sum(), (lam, raw, rhs))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def _intercept_data():
    """The trial's data: 30 groups of about 20 rows, group effects of size 1 and noise 1e-3."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 30, (600,), generator=gen)
    noise = 1e-3 * torch.randn(600, generator=gen, dtype=torch.float64)
    return labels, torch.randn(30, generator=gen, dtype=torch.float64)[labels] + noise


def _random_intercept_mean(noise: float, labels: torch.Tensor, y: torch.Tensor, variance: float):
    x = labels.to(torch.float64).unsqueeze(-1)
    likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-14))
    model = GP(x, y, likelihood.double(), GroupKernel(int(labels.max()) + 2)).double()
    model.mean_module = gpytorch.means.ZeroMean()
    model.covar_module.var = torch.tensor(variance, dtype=torch.float64)
    likelihood.noise = torch.tensor(noise, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        return model(torch.arange(int(labels.max()) + 1, dtype=torch.float64).unsqueeze(-1)).mean


@pytest.mark.parametrize("noise", [1e-6, 1e-10])
def test_a_random_intercepts_mean_at_tiny_noise_is_accurate(noise):
    # the trial: 30 groups of about 20 rows, variance 1, noise far below it. The mean used to sum entries of
    # M^{-1} r (size r / noise) over each group: 3.5e-9 relative at noise 1e-6, 1.5e-5 at 1e-10 (a dense Cholesky
    # lost 3e-13 and 6e-9)
    labels, y = _intercept_data()
    mean = _random_intercept_mean(noise, labels, y, 1.0)
    sizes = torch.bincount(labels, minlength=30).double()
    sums = torch.zeros(30, dtype=torch.float64).index_add_(0, labels, y)
    exact = sums / (noise + sizes)  # v S_g / (noise + n_g v), v = 1
    assert ((mean - exact).abs().max() / exact.abs().max()).item() < 1e-13


@pytest.mark.parametrize("lengthscale", [3.0, 0.3])
@pytest.mark.parametrize("ard", [False, True])
def test_float32_rbf_block_means_of_duplicate_rows_are_not_indefinite(ard, lengthscale):
    # the trial: every row twice, each pair a block. The distance GEMM rounds a duplicate pair's distance to slightly
    # below zero, and exp(-rho^2) above the outputscale gave lam = -5e-6 (-1.5e-5 at lengthscale 0.3): a float32 GP
    # at noise 1e-6 then refused its own covariance
    from bma_gp import kernel_block_mean

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(50, 10, generator=gen)
    x = torch.cat([x0, x0])
    partition = Partition.from_labels(torch.cat([torch.arange(50), torch.arange(50)]))
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=10 if ard else None))
    kernel.base_kernel.lengthscale = lengthscale
    M = kernel_block_mean(kernel, x, partition)
    assert M.lam.min().item() >= 0.0
    assert M.B.diagonal().max().item() <= kernel.outputscale.item()
    # the same matrix in float64 (where the rounding is 1e-15) up to float32 distances
    M64 = kernel_block_mean(kernel.double(), x.double(), partition)
    torch.testing.assert_close(M.B.double(), M64.B, rtol=0, atol=3e-5)  # float32 GEMM at rho^2 ~ 100: 1e-5


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("block_mean_first", [True, False])
def test_logdet_of_a_kronecker_product_with_a_block_mean_factor_is_closed_form(block_mean_first, batch):
    from linear_operator.operators import DenseLinearOperator, KroneckerProductLinearOperator

    from closed_form_guard import closed_forms_only

    labels = PARTITIONS["scattered"]
    op, lam, B = _operator(labels, batch, torch.float64, False)
    gen = torch.Generator().manual_seed(5)
    root = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    task = (root @ root.mT + torch.eye(3, dtype=torch.float64)).requires_grad_(True)
    kron = KroneckerProductLinearOperator(
        *((op, DenseLinearOperator(task)) if block_mean_first else (DenseLinearOperator(task), op))
    )
    rhs = torch.randn(*batch, 3 * len(labels), 2, generator=gen, dtype=torch.float64)
    with closed_forms_only(len(labels)):  # the 5 x 5 core and the 3 x 3 factor; no eigenvectors of M, nothing 36 x 36
        logdet = kron.logdet()
        quad, logdet2 = kron.inv_quad_logdet(rhs, logdet=True)
    dense = kron.to_dense()
    expected = torch.logdet(dense)
    torch.testing.assert_close(logdet, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet2, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(quad, (rhs * torch.linalg.solve(dense, rhs)).sum((-2, -1)), rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(logdet.sum(), task)
    (expected_grad,) = torch.autograd.grad(expected.sum(), task)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)


_LARGE_OPERATOR_SETUP = (
    "import torch\n"
    "from linear_operator.operators import DenseLinearOperator, DiagLinearOperator, KroneckerProductLinearOperator\n"
    "from bma_gp import BlockMeanLinearOperator, Partition\n"
    "n, k = {n}, 20\n"
    "g = torch.Generator().manual_seed(0)\n"
    "W = torch.randn(k, k, generator=g, dtype=torch.float64)\n"
    "M = BlockMeanLinearOperator(torch.rand(k, generator=g, dtype=torch.float64) + 1, W @ W.T / k,\n"
    "    Partition.from_labels(torch.randint(0, k, (n,), generator=g)))\n"
)


def test_logdet_of_a_large_kronecker_product_takes_no_n_by_n_memory():
    from peak_memory import peak_memory_increase

    setup = (
        _LARGE_OPERATOR_SETUP
        + "K = KroneckerProductLinearOperator(M, DenseLinearOperator(torch.eye(3, dtype=torch.float64) + 0.1))\n"
    )
    # n = 20,000: the factor's eigenvectors alone were 3.2 GB
    peak = peak_memory_increase(setup.format(n=20_000), "K.logdet()")
    assert peak < 200e6, f"peak increase {peak / 1e6:.0f} MB"


def test_solves_of_a_kronecker_product_with_a_block_mean_factor_are_closed_form_at_any_size():
    # up to max_cholesky_size linear_operator took a dense Cholesky of the block mean factor (announced)
    import warnings

    from linear_operator.operators import DenseLinearOperator, KroneckerProductLinearOperator

    from closed_form_guard import closed_forms_only

    labels = PARTITIONS["scattered"]
    op, lam, B = _operator(labels, (), torch.float64, False)
    kron = KroneckerProductLinearOperator(op, DenseLinearOperator(torch.eye(3, dtype=torch.float64) + 0.2))
    dense = kron.to_dense()
    gen = torch.Generator().manual_seed(6)
    rhs = torch.randn(36, 2, generator=gen, dtype=torch.float64)
    vec = torch.randn(36, generator=gen, dtype=torch.float64)
    left = torch.randn(4, 36, generator=gen, dtype=torch.float64)
    with closed_forms_only(len(labels)), warnings.catch_warnings():
        warnings.simplefilter("error")  # no ClosedFormFallbackWarning
        got = [kron.solve(rhs), kron.solve(vec), kron.solve(rhs, left), kron.solve(vec, left)]
        quad = kron.inv_quad_logdet(rhs, reduce_inv_quad=False)[0]
        quad_vec = kron.inv_quad_logdet(vec)[0]
        quad_sum = kron.inv_quad(rhs)
    expected = [torch.linalg.solve(dense, rhs), torch.linalg.solve(dense, vec)]
    expected += [left @ expected[0], left @ expected[1]]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(quad, (rhs * expected[0]).sum(-2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(quad_vec, vec @ expected[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(quad_sum, (rhs * expected[0]).sum(), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="right_tensor of shape \\(35, 2\\)"):
        kron.solve(rhs[:35])
    with pytest.raises(ValueError, match="inv_quad_rhs"):
        kron.inv_quad_logdet(rhs[:35])


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("form", ["MD", "DM", "DMD"])
def test_products_of_a_block_mean_operator_and_a_diagonal_solve_in_closed_form(form, batch):
    # they factorised the dense n x n product with LU (320 GB asked for at n = 200,000 in the trial)
    import warnings

    from linear_operator.operators import DiagLinearOperator

    from closed_form_guard import closed_forms_only

    labels = PARTITIONS["scattered"]
    op, lam, B = _operator(labels, batch, torch.float64, False)
    gen = torch.Generator().manual_seed(7)
    d = (torch.rand(*batch, len(labels), generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    D = DiagLinearOperator(d)
    product = {"MD": lambda: op @ D, "DM": lambda: D @ op, "DMD": lambda: D @ op @ D}[form]()
    rhs = torch.randn(*batch, len(labels), 2, generator=gen, dtype=torch.float64)
    with closed_forms_only(len(labels)), warnings.catch_warnings():
        warnings.simplefilter("error")  # no ClosedFormFallbackWarning
        solved, logdet = product.solve(rhs), product.logdet()
        quad, logdet2 = product.inv_quad_logdet(rhs, logdet=True, reduce_inv_quad=False)
    dense = product.to_dense()
    torch.testing.assert_close(solved, torch.linalg.solve(dense, rhs), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet, torch.logdet(dense), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet2, logdet)
    torch.testing.assert_close(quad, (rhs * torch.linalg.solve(dense, rhs)).sum(-2), rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(logdet.sum() + solved.sum(), d)
    (expected,) = torch.autograd.grad(torch.logdet(dense).sum() + torch.linalg.solve(dense, rhs).sum(), d)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-9)


def test_a_product_with_a_negative_determinant_keeps_torch_logdet_semantics():
    from linear_operator.operators import DiagLinearOperator

    op, _, _ = _operator(PARTITIONS["scattered"], (), torch.float64, False)
    d = torch.ones(12, dtype=torch.float64)
    d[3] = -2.0
    assert torch.isnan((op @ DiagLinearOperator(d)).logdet())
    d[3] = 0.0
    assert (op @ DiagLinearOperator(d)).logdet() == -float("inf")


def test_a_product_with_a_diagonal_takes_no_n_by_n_memory():
    from peak_memory import peak_memory_increase

    setup = _LARGE_OPERATOR_SETUP + (
        "A = M @ DiagLinearOperator(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)\n"
        "x = torch.randn(n, 2, generator=g, dtype=torch.float64)\n"
    )
    # n = 20,000: the dense product alone was 3.2 GB
    peak = peak_memory_increase(setup.format(n=20_000), "A.solve(x)\nA.logdet()\nA.inv_quad_logdet(x, logdet=True)")
    assert peak < 200e6, f"peak increase {peak / 1e6:.0f} MB"


class _Crossed(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, levels):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = GroupKernel(levels[0], active_dims=[0]) + GroupKernel(levels[1], active_dims=[1])

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _crossed_mean(x, y, test_x, levels, variances, noise):
    likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-14))
    model = _Crossed(x, y, likelihood.double(), levels).double()
    for kernel, v in zip(model.covar_module.kernels, variances):
        kernel.var = torch.tensor(v, dtype=torch.float64)
    likelihood.noise = torch.tensor(noise, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        return model(test_x).mean


@pytest.mark.parametrize("noise", [1e-8, 1e-10])
def test_a_sums_mean_at_tiny_noise_is_accurate(noise):
    # the trial: a grouping plus a second one of variance ~0 over one level (the covariance of the grouping alone),
    # predicted by the sums' strategy: 1.9e-7 relative at noise 1e-8, 2.4e-5 at 1e-10
    labels, y = _intercept_data()
    x = torch.stack([labels.double(), torch.zeros(600, dtype=torch.float64)], -1)
    test_x = torch.stack([torch.arange(30, dtype=torch.float64), torch.zeros(30, dtype=torch.float64)], -1)
    mean = _crossed_mean(x, y, test_x, (31, 1), (1.0, 1e-300), noise)
    sizes = torch.bincount(labels, minlength=30).double()
    exact = torch.zeros(30, dtype=torch.float64).index_add_(0, labels, y) / (noise + sizes)
    assert ((mean - exact).abs().max() / exact.abs().max()).item() < 1e-13


def _crossed_data():
    """400 rows over two crossed groupings of 12 and 7 levels (ids as float columns) and their targets."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 12, (400,), generator=gen), torch.randint(0, 7, (400,), generator=gen)
    ua, ub = torch.randn(12, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
    y = ua[a] + ub[b] + 1e-3 * torch.randn(400, generator=gen, dtype=torch.float64)
    return torch.stack([a, b], -1).double(), y


def _dense_crossed_mean(x, y, test_x, variances, noise):
    """The posterior mean of the two crossed groupings by a dense float64 Cholesky."""

    def covariance(p, q):
        return sum(v * (p[:, j, None] == q[None, :, j]).double() for j, v in enumerate(variances))

    L = torch.linalg.cholesky(covariance(x, x) + noise * torch.eye(x.shape[0], dtype=torch.float64))
    return covariance(test_x, x) @ torch.cholesky_solve(y.unsqueeze(-1), L).squeeze(-1)


def test_a_crossed_sums_mean_at_tiny_noise_matches_a_dense_solve():
    # two crossed groupings at noise 1e-8: the dense Cholesky reference loses about 1e-10 here; the sum's mean lost
    # 1e-7 before
    x, y = _crossed_data()
    test_x = torch.stack([torch.arange(12), torch.arange(12) % 7], -1).double()
    noise, variances = 1e-8, (1.0, 0.5)
    mean = _crossed_mean(x, y, test_x, (12, 7), variances, noise)
    expected = _dense_crossed_mean(x, y, test_x, variances, noise)
    assert ((mean - expected).abs().max() / expected.abs().max()).item() < 1e-8


class _BatchGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel, batch):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=torch.Size(batch))
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@pytest.mark.parametrize("kind", ["group", "block_mean"])
def test_a_fantasy_of_a_batch_model_with_unbatched_inputs_predicts_as_rebuilt(kind):
    # the fantasy's strategy held (2, 2, n) means for a model batch of 2 and failed on its first prediction
    # ("shape '[2, 7]' is invalid for input of size 28"); after train() / eval() the same model predicted
    from bma_gp import BlockMeanKernel

    gen = torch.Generator().manual_seed(0)
    batch = torch.Size([2])
    if kind == "group":
        x = torch.randint(0, 6, (60, 1), generator=gen).double()
        kernel, test_x, fx = GroupKernel(6), torch.tensor([[1.0], [2.0], [5.0]]).double(), x[:3].clone()
    else:
        x = torch.rand(60, 2, generator=gen, dtype=torch.float64) * 4
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(batch_shape=batch), batch_shape=batch)
        kernel = BlockMeanKernel(base, x, Partition.from_labels(torch.arange(60) % 6))
        test_x = torch.rand(7, 2, generator=gen, dtype=torch.float64) * 4
        fx = torch.rand(3, 2, generator=gen, dtype=torch.float64) * 4
    y = torch.stack([torch.sin(x[:, 0]), 2 * torch.cos(x[:, 0])])
    fy = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch).double()
    model = _BatchGP(x, y, likelihood, kernel, batch).double()
    model.eval()
    with torch.no_grad():
        model(test_x)
        fantasy = model.get_fantasy_model(fx, fy)
        got = fantasy(test_x)
        mean, covar = got.mean, got.covariance_matrix
        fantasy.train()
        fantasy.eval()
        rebuilt = fantasy(test_x)
    assert mean.shape == (2, test_x.shape[0])
    torch.testing.assert_close(mean, rebuilt.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(covar, rebuilt.covariance_matrix, rtol=1e-10, atol=1e-10)


def test_a_fantasy_of_another_dtype_is_refused_as_test_inputs_are():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (40, 1), generator=gen).float()
    y = torch.randn(40, generator=gen)
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), GroupKernel(6))
    model.eval()
    with torch.no_grad():
        model(x[:3])
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(TypeError, match="fantasy inputs are torch.float64.*inputs.to\\(torch.float32\\)"):
            model.get_fantasy_model(x[:2].double(), y[:2].double())
        with pytest.raises(TypeError, match="fantasy targets are torch.float64"):
            model.get_fantasy_model(x[:2], y[:2].double())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        assert model.get_fantasy_model(x[:2], y[:2])(x[:3]).mean.dtype == torch.float32


def test_a_kernel_converted_without_its_model_is_named_as_the_cause():
    from bma_gp import BlockMeanKernel

    x = torch.rand(30, 2, dtype=torch.float64)
    kernel = BlockMeanKernel(
        gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), x, Partition.from_labels(torch.arange(30) % 5)
    )
    model = GP(x, torch.sin(x[:, 0]), gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    model.covar_module.float()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with pytest.raises(
        ValueError,
        match="bound training inputs \\(train_x\\) are torch.float32 but the model's training inputs are "
        "torch.float64.*model.float\\(\\)",
    ):
        mll(model(x), model.train_targets)


def test_training_mode_on_other_inputs_says_it_is_the_base_kernels_prior():
    from bma_gp import BlockMeanKernel

    x = torch.rand(30, 2, dtype=torch.float64)
    kernel = BlockMeanKernel(
        gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), x, Partition.from_labels(torch.arange(30) % 5)
    )
    model = GP(x, torch.sin(x[:, 0]), gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    with gpytorch.settings.debug(False), pytest.warns(UserWarning, match="prior of its base kernel there"):
        model(x[:10])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model(x)  # the training inputs: no warning


@pytest.mark.parametrize(
    "values",
    [
        dict(var=torch.tensor([5.0, 6.0]), corr=2.0),
        dict(corr=0.5, var=-1.0),
        dict(raw_var=torch.zeros(2), corr=float("nan")),
    ],
)
def test_group_kernel_initialize_is_all_or_nothing(values):
    kernel = GroupKernel(4, slope=True).double()
    kernel.var = torch.tensor([2.0, 3.0])
    kernel.corr = 0.3
    before = {k: v.clone() for k, v in kernel.state_dict().items()}
    with pytest.raises(ValueError):
        kernel.initialize(**values)
    assert all(torch.equal(v, kernel.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("name", ["raw_var", "raw_corr"])
def test_a_non_finite_group_kernel_state_is_refused_on_load(name):
    kernel = GroupKernel(4, slope=True).double()
    kernel.var = torch.tensor([2.0, 3.0])
    kernel.corr = 0.3
    before = {k: v.clone() for k, v in kernel.state_dict().items()}
    state = {k: v.clone() for k, v in before.items()}
    state[name] = torch.full_like(state[name], float("nan"))
    state["raw_var" if name == "raw_corr" else "raw_corr"] += 0.5  # a finite change in the same module: not loaded
    with pytest.raises(RuntimeError, match=f"{name} holds NaN or inf"):
        kernel.load_state_dict(state)
    assert all(torch.equal(v, kernel.state_dict()[k]) for k, v in before.items())


def test_an_exact_kernel_beside_a_grouping_warns_with_the_closed_form_alternatives():
    x = torch.stack([torch.rand(30, dtype=torch.float64), (torch.arange(30) % 4).double()], -1)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0])) + GroupKernel(4, active_dims=[1])
    model = GP(x, torch.sin(x[:, 0]), gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    from bma_gp import ClosedFormFallbackWarning

    with pytest.warns(ClosedFormFallbackWarning, match="wrap an exact kernel in BlockMeanKernel.*max_cholesky_size"):
        mll(model(x), model.train_targets)


@pytest.mark.parametrize("case", ["non_symmetric_negative", "symmetric_indefinite", "twice"])
def test_a_kronecker_logdet_follows_torch_logdet_for_factors_of_any_sign(case):
    # a helper's check of the hook: a factor with a negative determinant to an even power gave NaN (dense: 5.8159)
    from linear_operator.operators import DenseLinearOperator, KroneckerProductLinearOperator

    partition = Partition.from_labels(torch.tensor([0, 0, 1]))
    dt = torch.float64
    if case == "symmetric_indefinite":
        M = BlockMeanLinearOperator(
            torch.tensor([-1.0, 2.0], dtype=dt), torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=dt), partition
        )
    else:
        M = BlockMeanLinearOperator(
            torch.tensor([1.0, 2.0], dtype=dt),
            torch.tensor([[-2.0, 0.2], [0.1, 0.3]], dtype=dt),
            partition,
            symmetric=False,
        )
    A = DenseLinearOperator(torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=dt))
    for kron in (
        (KroneckerProductLinearOperator(M, A), KroneckerProductLinearOperator(A, M))
        if case != "twice"
        else (
            KroneckerProductLinearOperator(M, M),
            KroneckerProductLinearOperator(M, DenseLinearOperator(torch.eye(3, dtype=dt))),  # an odd power: negative
        )
    ):
        expected = torch.logdet(kron.to_dense())
        torch.testing.assert_close(kron.logdet(), expected, rtol=1e-10, atol=1e-10, equal_nan=True)
        torch.testing.assert_close(
            kron.inv_quad_logdet(logdet=True)[1], expected, rtol=1e-10, atol=1e-10, equal_nan=True
        )


def _full_matrix_state():
    from bma_gp.optim import FullMatrixAdagrad

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = FullMatrixAdagrad(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return opt, opt.state_dict()


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda sd: sd["global_state"]["H"].add_(torch.triu(torch.ones_like(sd["global_state"]["H"]), 1)),
            "not symmetric",
        ),
        (lambda sd: sd.__setitem__("param_numels", [1, 2]), "do not fit its H, 15 x 15"),
        (lambda sd: sd.__setitem__("param_numels", "12,3"), "must be a list of entry counts"),
    ],
)
def test_a_full_matrix_state_whose_h_or_sizes_are_corrupt_is_refused(edit, message):
    import copy

    opt, good = _full_matrix_state()
    bad = copy.deepcopy(good)
    edit(bad)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert torch.equal(after["global_state"]["H"], good["global_state"]["H"])
    opt.load_state_dict(good)  # the intact state still loads


@pytest.mark.parametrize("noise", [1e-6, 1e-10])
def test_a_random_intercepts_mean_at_its_training_inputs_at_tiny_noise_is_accurate(noise):
    # a helper's audit: at the training inputs K alpha summed alpha's entries (size r / noise) over each group:
    # 1.4e-9 relative at noise 1e-6, 1.9e-5 at 1e-10 (a dense Cholesky: 4.5e-13, 2.9e-11)
    labels, y = _intercept_data()
    x = labels.to(torch.float64).unsqueeze(-1)
    likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-14))
    model = GP(x, y, likelihood.double(), GroupKernel(31)).double()
    model.mean_module = gpytorch.means.ZeroMean()
    model.covar_module.var = torch.tensor(1.0, dtype=torch.float64)
    likelihood.noise = torch.tensor(noise, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        mean = model(x).mean
    sizes = torch.bincount(labels, minlength=30).double()
    exact = (torch.zeros(30, dtype=torch.float64).index_add_(0, labels, y) / (noise + sizes))[labels]
    assert ((mean - exact).abs().max() / exact.abs().max()).item() < 1e-13


def test_a_crossed_sums_mean_at_its_training_inputs_at_tiny_noise_matches_a_dense_solve():
    # a helper's audit: at the training inputs the sum took Z G c with c = u - A x, which cancels (1.6e-7 relative
    # at noise 1e-8 for crossed groupings); G c is the capacitance solve x itself now
    x, y = _crossed_data()
    noise, variances = 1e-8, (1.0, 0.5)
    mean = _crossed_mean(x, y, x, (12, 7), variances, noise)
    expected = _dense_crossed_mean(x, y, x, variances, noise)
    assert ((mean - expected).abs().max() / expected.abs().max()).item() < 1e-9
