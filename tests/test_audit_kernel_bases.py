"""Audit of BlockMeanKernel / kernel_block_mean with the base kernels GPyTorch users wrap: regressions found."""

from unittest import mock

import gpytorch
import pytest
import torch
from gpytorch.kernels import LinearKernel, PeriodicKernel, RBFKernel, ScaleKernel
from linear_operator import to_dense

from bma_gp import BlockMeanKernel, Partition, block_mean
from bma_gp.kernel_block_mean import kernel_block_mean
from gp_reference import GP
from largest_tensor import LargestTensor


def _no_cholesky(*args, **kwargs):
    raise AssertionError("a dense Cholesky factorisation was run")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_generic_engine_does_not_factorise_a_sum_with_a_linear_kernel(dtype):
    """With one chunk of all the rows the generic engine evaluated ``kernel(x, x)``: ``LinearKernel`` returns a root
    there, and linear_operator adds a dense matrix and a root by a root decomposition of the dense one, an ``n x n``
    Cholesky (with jitter; ``NotPSDError`` in float32 for a smooth RBF part)."""
    n = 300
    x = torch.rand(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    partition = Partition.from_labels(torch.randint(10, (n,), generator=torch.Generator().manual_seed(1)))
    kernel = (ScaleKernel(RBFKernel()) + LinearKernel()).to(dtype)
    smooth, linear = kernel.kernels
    smooth.base_kernel.lengthscale = 3.0
    smooth.outputscale = 1e4
    with (
        mock.patch.object(torch.linalg, "cholesky", _no_cholesky),
        mock.patch.object(torch.linalg, "cholesky_ex", _no_cholesky),
    ):
        op = kernel_block_mean(kernel, x, partition)
        op.B.sum().backward()
    xd = x.double()
    with gpytorch.settings.lazily_evaluate_kernels(False), torch.no_grad():
        dense = smooth.double()(xd, xd).to_dense() + linear.variance.double() * (xd @ xd.mT)
    ref = block_mean(dense, partition)
    torch.testing.assert_close(op.B.double(), ref.B, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    assert linear.raw_variance.grad is not None and smooth.raw_outputscale.grad is not None


@pytest.mark.parametrize("base", ["rbf", "periodic_batch"])
def test_diag_of_training_against_new_points_is_not_formed_densely(base):
    """``kernel(x1, x2, diag=True)`` with the training inputs on one side and as many new points on the other took
    the diagonal of the dense ``n x n`` cross-covariance; it is the mean of ``k(x_new[i], X_{c_i})``, reduced one
    chunk of rows at a time."""
    n, t = 120, 5
    g = torch.Generator().manual_seed(0)
    x, other = torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)
    tail1, tail2 = (
        torch.randn(t, 2, generator=g, dtype=torch.float64),
        torch.randn(t, 2, generator=g, dtype=torch.float64),
    )
    partition = Partition.from_labels(torch.randint(7, (n,), generator=g))
    if base == "rbf":
        kernel = ScaleKernel(RBFKernel()).double()
    else:
        kernel = PeriodicKernel(batch_shape=torch.Size([2])).double()
    bm = BlockMeanKernel(kernel, x, partition, chunk_size=15)
    cases = [
        (other, x),
        (x, other),
        (torch.cat([x, tail1]), torch.cat([other, tail2])),
        (torch.cat([other, tail1]), torch.cat([x, tail2])),
    ]
    for x1, x2 in cases:
        a1, a2 = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
        with LargestTensor(square=n) as largest:
            diag = bm(a1, a2, diag=True)
        assert largest.squares == [] and largest.largest <= 2 * 15 * n * 2  # a chunk of 15 rows, never n x n
        b1, b2 = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
        ref = torch.diagonal(to_dense(bm(b1, b2)), dim1=-2, dim2=-1)
        torch.testing.assert_close(diag, ref, rtol=1e-12, atol=1e-14)
        grads = torch.autograd.grad(diag.sin().sum(), [a1, a2], allow_unused=True)
        ref_grads = torch.autograd.grad(ref.sin().sum(), [b1, b2], allow_unused=True)
        for got, want in zip(grads, ref_grads):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch_shape": torch.Size([2])}, ValueError, "batch_shape"),
        ({"ard_num_dims": 2}, ValueError, "ard_num_dims"),
        ({"lengthscale_prior": gpytorch.priors.GammaPrior(3.0, 6.0)}, ValueError, "lengthscale_prior"),
        ({"lengthscale_constraint": gpytorch.constraints.Interval(0.1, 1.0)}, ValueError, "lengthscale_constraint"),
        ({"chunksize": 10}, TypeError, "chunksize"),
    ],
)
def test_block_mean_kernel_refuses_kernel_arguments_it_would_drop(kwargs, error, match):
    """GPyTorch's ``Kernel.__init__`` takes these and drops them silently for a kernel without a lengthscale, so
    ``BlockMeanKernel(base, x, p, batch_shape=...)`` gave an unbatched kernel and a lengthscale prior never entered
    the marginal likelihood."""
    x = torch.randn(10, 2, dtype=torch.float64)
    with pytest.raises(error, match=match):
        BlockMeanKernel(RBFKernel().double(), x, Partition.from_sizes([4, 6]), **kwargs)
    # what is accepted: the base kernel's own batch shape, active_dims=None
    batch = torch.Size([2])
    kernel = BlockMeanKernel(RBFKernel(batch_shape=batch), x, Partition.from_sizes([4, 6]), batch_shape=batch)
    assert kernel.batch_shape == batch
    BlockMeanKernel(RBFKernel(), x, Partition.from_sizes([4, 6]), active_dims=None)


def test_inducing_point_kernel_in_training_mode_is_refused_in_words():
    """An ``InducingPointKernel`` in training mode refuses ``kernel(x[a:b], x)`` ("x1 should equal x2 in training
    mode", from inside the generic engine) and registers its SGPR loss term for the exact low-rank matrix; with one
    chunk of all the rows it was evaluated on equal inputs instead, so whether it failed depended on ``n``."""
    n = 40
    x = torch.rand(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    partition = Partition.from_labels(torch.arange(n) % 4)
    inducing = torch.linspace(0, 1, 5, dtype=torch.float64).unsqueeze(-1)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    kernel = gpytorch.kernels.InducingPointKernel(ScaleKernel(RBFKernel()), inducing, likelihood).double()
    with pytest.raises(ValueError, match="InducingPointKernel in training mode"):
        kernel_block_mean(kernel, x, partition)
    with pytest.raises(ValueError, match="InducingPointKernel in training mode"):
        BlockMeanKernel(kernel + LinearKernel().double(), x, partition)(x).evaluate_kernel()
    kernel.eval()  # its low-rank covariance as a base kernel
    op = kernel_block_mean(kernel, x, partition)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        ref = block_mean(to_dense(kernel(x, x)), partition)
    torch.testing.assert_close(op.to_dense(), ref.to_dense())


@pytest.mark.parametrize(
    "make",
    [
        lambda: ScaleKernel(PeriodicKernel()),
        lambda: ScaleKernel(gpytorch.kernels.MaternKernel(nu=0.5)) + ScaleKernel(PeriodicKernel()),
        lambda: ScaleKernel(RBFKernel()) * PeriodicKernel() + LinearKernel(),  # not translation invariant: as is
    ],
    ids=["periodic", "matern_plus_periodic", "with_linear"],
)
def test_generic_engine_is_accurate_on_float32_inputs_far_from_zero(make):
    """Decimal years in float32 (the CO2 series): a chunk ``kernel(x[a:b], x)`` has unequal inputs, where GPyTorch's
    distances are ``torch.cdist`` without centring, and a ``PeriodicKernel``'s block means were off by 0.5 (the
    dense ``kernel(x, x)``, centred by GPyTorch, by 3e-4). Translation-invariant kernels now see centred inputs."""
    from bma_gp.datasets import load_co2

    years = load_co2(dtype=torch.float32)[0][::8]
    n = years.shape[0]
    partition = Partition.from_labels(torch.arange(n) // 7)
    kernel64 = make().double()
    with torch.no_grad():
        for p in kernel64.parameters():
            p.fill_(0.5)
    kernel32 = make().float()
    kernel32.load_state_dict({k: v.float() for k, v in kernel64.state_dict().items()})
    op = kernel_block_mean(kernel32, years, partition, chunk_size=40)
    x = years.double()  # the float32 inputs, exactly
    with gpytorch.settings.lazily_evaluate_kernels(False), torch.no_grad():
        truth = block_mean(to_dense(kernel64(x, x)), partition)
    scale = truth.B.abs().max()
    assert (op.B.double() - truth.B).abs().max() < 3e-3 * scale
    assert (op.lam.double() - truth.lam).abs().max() < 3e-3 * scale
    # gradients with respect to the inputs are unchanged by the centring (float64: against the dense ones)
    xa, xb = x[:120].clone().requires_grad_(True), x[:120].clone().requires_grad_(True)
    part = Partition.from_labels(torch.arange(120) // 7)
    got = torch.autograd.grad(kernel_block_mean(kernel64, xa, part, chunk_size=40).B.sin().sum(), xa)[0]
    with gpytorch.settings.lazily_evaluate_kernels(False):
        want = torch.autograd.grad(block_mean(to_dense(kernel64(xb, xb)), part).B.sin().sum(), xb)[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_float32_predictions_of_a_periodic_block_mean_kernel_on_decimal_years():
    """The cross-covariances of new points with the training blocks are ``base_kernel(x_new, train_x)``, unequal
    inputs again: on float32 decimal years a periodic + RBF model's predictive mean was off by 10 (targets of scale
    1) against the same model in float64. Both inputs are now centred on the training inputs' means."""
    from bma_gp.datasets import load_co2

    t, y = load_co2(dtype=torch.float32)
    x, y = t[::8], y[::8]
    y = (y - y.mean()) / y.std()
    partition = Partition.from_labels(torch.arange(x.shape[0]) // 5)
    x_new = torch.linspace(1960, 2000, 30).unsqueeze(-1) + 0.013

    means = {}
    for dtype in (torch.float64, torch.float32):
        base = ScaleKernel(PeriodicKernel()) + ScaleKernel(RBFKernel())
        base.kernels[0].base_kernel.period_length = 1.0
        base.kernels[1].base_kernel.lengthscale = 10.0
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        likelihood.noise = 0.01
        xd = x.to(dtype)  # the float32 years, exactly, in both models
        model = GP(xd, y.to(dtype), likelihood, BlockMeanKernel(base, xd, partition)).to(dtype)
        model.eval()
        with torch.no_grad():
            means[dtype] = model(x_new.to(dtype)).mean.double()
    assert (means[torch.float32] - means[torch.float64]).abs().max() < 0.02


@pytest.mark.parametrize(
    "make",
    [
        lambda: gpytorch.kernels.RBFKernelGrad(),
        lambda: gpytorch.kernels.MultitaskKernel(RBFKernel(), num_tasks=2),
        lambda: gpytorch.kernels.LCMKernel([RBFKernel(), PeriodicKernel()], num_tasks=2),
    ],
    ids=["rbf_grad", "multitask", "lcm"],
)
def test_kernels_with_several_outputs_per_input_are_refused_in_words(make):
    """A derivative or multitask kernel's matrix on n inputs is not n x n: the engine failed inside
    ``torch.segment_reduce`` ("Expected all rows of lengths along axis to sum to data.size")."""
    n = 12
    x = torch.rand(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    partition = Partition.from_labels(torch.arange(n) % 3)
    kernel = make().double()
    with pytest.raises(ValueError, match="outputs per input"):
        kernel_block_mean(kernel, x, partition)
    with pytest.raises(ValueError, match="outputs per input"):
        BlockMeanKernel(kernel, x, partition)
    # what the message suggests works: the block mean over the inputs inside the multitask kernel
    multitask = gpytorch.kernels.MultitaskKernel(BlockMeanKernel(RBFKernel(), x, partition), num_tasks=2).double()
    assert multitask(x).to_dense().shape == (2 * n, 2 * n)


@pytest.mark.parametrize(
    "make",
    [
        lambda: gpytorch.kernels.SpectralMixtureKernel(num_mixtures=4, ard_num_dims=3),
        lambda: ScaleKernel(PeriodicKernel(ard_num_dims=3)) + RBFKernel(),
    ],
    ids=["spectral_mixture", "periodic_sum"],
)
def test_generic_chunks_count_the_kernels_intermediate_tensors(make, monkeypatch):
    """The generic engine sized its chunks by the kernel values alone, but a spectral mixture works on ``Q x d``
    numbers per entry and a periodic kernel on ``d``: at n = 6000 with Q = 10 and d = 5 the forward pass took 13 GB
    (with the default 64 MB budget; 0.3 GB now) and the backward pass more than this machine has."""
    import sys

    module = sys.modules["bma_gp.kernel_block_mean"]  # the package re-exports the function under the same name
    n, d = 600, 3
    budget_entries = 40 * n  # the chunk budget: 40 rows of kernel values
    monkeypatch.setattr(module, "_CHUNK_BYTES", budget_entries * 8)
    x = torch.rand(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    partition = Partition.from_labels(torch.randint(7, (n,), generator=torch.Generator().manual_seed(1)))
    kernel = make().double()
    with LargestTensor() as seen:
        op = kernel_block_mean(kernel, x, partition)
        op.B.sum().backward()
    assert seen.largest <= 1.5 * budget_entries, (seen.largest, seen.where)
    with gpytorch.settings.lazily_evaluate_kernels(False), torch.no_grad():
        ref = block_mean(kernel(x, x).to_dense(), partition)
    torch.testing.assert_close(op.B.detach(), ref.B, rtol=1e-10, atol=1e-12)
