"""Batched and multi-output GPyTorch models on block mean kernels, built the way GPyTorch's tutorials build them.

Each model is compared with the same model whose block mean or group kernel is evaluated densely
(:class:`gp_reference.DenseKernel`: GPyTorch's dense Cholesky on the kernel matrix in float64), and runs inside
:func:`closed_form_guard.closed_forms_only` where the closed forms are promised.
"""

from __future__ import annotations

import copy
import warnings

import gpytorch
import pytest
import torch
from linear_operator.operators import (
    BlockDiagLinearOperator,
    BlockInterleavedLinearOperator,
    ConstantDiagLinearOperator,
    DiagLinearOperator,
)

from bma_gp import BlockMeanKernel, BlockMeanLinearOperator, ClosedFormFallbackWarning, GroupKernel, Partition
from bma_gp.kernels import BlockCrossLinearOperator
from closed_form_guard import closed_forms_only
from gp_reference import DenseKernel

DTYPE = torch.float64
N, T = 40, 3
TASKS = torch.Size([T])


def data(seed: int = 0):
    """Inputs, group ids, targets ``(T, N)``, a partition of the rows and test inputs / ids."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(N, 1, generator=generator, dtype=DTYPE)
    ids = torch.randint(0, 6, (N, 1), generator=generator).to(DTYPE)
    y = torch.randn(T, N, generator=generator, dtype=DTYPE)
    partition = Partition.from_labels((x[:, 0] * 5).long().clamp(max=4))
    xt = torch.rand(7, 1, generator=generator, dtype=DTYPE)
    ids_t = torch.tensor([[0.0], [1.0], [5.0], [2.0]], dtype=DTYPE)
    return x, ids, y, partition, xt, ids_t


class BatchGP(gpytorch.models.ExactGP):
    """GPyTorch's batch-independent multi-output model: a batch of ``T`` GPs, optionally as one multitask output."""

    def __init__(self, x, y, likelihood, kernel, multitask: bool = False):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=TASKS)
        self.covar_module = kernel
        self.multitask = multitask

    def forward(self, x):
        mvn = gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))
        return gpytorch.distributions.MultitaskMultivariateNormal.from_batch_mvn(mvn) if self.multitask else mvn


def dense_reference(model):
    """A deep copy of ``model`` with every block mean or group kernel evaluated densely."""
    reference = copy.deepcopy(model)
    for module in list(reference.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (BlockMeanKernel, GroupKernel)):
                setattr(module, name, DenseKernel(child))
    reference.prediction_strategy = None
    return reference


def fit_and_predict(model, x, y, xt, closed_form: bool):
    """Loss, parameter gradients and predictive mean / variance at ``xt`` (inside the guard if ``closed_form``);
    ``x`` and ``xt`` may be tuples of the model's inputs."""
    likelihood = model.likelihood
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    x, xt = (x if isinstance(x, tuple) else (x,)), (xt if isinstance(xt, tuple) else (xt,))
    size = x[0].shape[-2]
    model.train()
    model.zero_grad()
    guard = closed_forms_only(size) if closed_form else gpytorch.settings.max_cholesky_size(10**6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dense reference warns about lazily_evaluate_kernels(False)
        with guard:
            loss = -mll(model(*x), y).sum()
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.eval()
        guard = closed_forms_only(size) if closed_form else gpytorch.settings.max_cholesky_size(10**6)
        with torch.no_grad(), guard:
            pred = likelihood(model(*xt))
            mean, variance = pred.mean, pred.variance
    return loss.detach(), grads, mean, variance


def assert_matches_dense(model, x, y, xt):
    reference = dense_reference(model)
    loss, grads, mean, variance = fit_and_predict(model, x, y, xt, closed_form=True)
    ref_loss, ref_grads, ref_mean, ref_variance = fit_and_predict(reference, x, y, xt, closed_form=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    assert len(grads) == len(ref_grads)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(variance, ref_variance, rtol=1e-8, atol=1e-9)


def batch_likelihood():
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=TASKS)
    likelihood.noise = torch.tensor([0.1, 0.2, 0.3]).view(T, 1)
    return likelihood


def batch_scale(kernel):
    """``ScaleKernel(kernel, batch_shape=(T,))``: one outputscale per output, around an unbatched kernel."""
    scaled = gpytorch.kernels.ScaleKernel(kernel, batch_shape=TASKS)
    scaled.outputscale = torch.tensor([0.5, 1.0, 2.0])
    return scaled


# ---------------------------------------------------------------- a batch ScaleKernel around an unbatched kernel
def _assert_warned_loss_matches_dense(model, x, y, match: str) -> None:
    """The model's training loss warns (``ClosedFormFallbackWarning`` matching ``match``) and equals its dense
    reference's."""
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with pytest.warns(ClosedFormFallbackWarning, match=match):
        loss = -mll(model(x), y.mT)
    reference = dense_reference(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_loss = -gpytorch.mlls.ExactMarginalLogLikelihood(reference.likelihood, reference)(reference(x), y.mT)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)


def test_batch_outputscale_around_unbatched_group_kernel_is_closed_form():
    _, ids, y, _, _, ids_t = data()
    kernel = batch_scale(GroupKernel(6, per_group_variance=True))
    model = BatchGP(ids, y, batch_likelihood(), kernel).to(DTYPE)
    assert_matches_dense(model, ids, y, ids_t)


def test_batch_outputscale_around_unbatched_block_mean_kernel_is_closed_form():
    x, _, y, partition, xt, _ = data()
    kernel = batch_scale(BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, partition))
    model = BatchGP(x, y, batch_likelihood(), kernel).to(DTYPE)
    assert_matches_dense(model, x, y, xt)


def test_batch_outputscale_around_group_factor_sum_is_closed_form():
    generator = torch.Generator().manual_seed(1)
    n = 400  # 300 levels: past FACTOR_DENSE_MAX_GROUPS, so the kernel is a BlockMeanSumLinearOperator
    ids = torch.randint(0, 300, (n, 1), generator=generator).to(DTYPE)
    y = torch.randn(T, n, generator=generator, dtype=DTYPE)
    model = BatchGP(ids, y, batch_likelihood(), batch_scale(GroupKernel(300, rank=2))).to(DTYPE)
    reference = dense_reference(model)
    loss, grads, mean, variance = fit_and_predict(model, ids, y, ids[:9], closed_form=True)
    ref_loss, ref_grads, ref_mean, ref_variance = fit_and_predict(reference, ids, y, ids[:9], closed_form=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(variance, ref_variance, rtol=1e-8, atol=1e-9)


def test_batch_outputscale_keeps_the_cross_covariance_per_block():
    # between new and training inputs the covariance is t x k values (docs/gp.md), also with one outputscale per output
    x, ids, _, partition, xt, ids_t = data()
    for kernel, inputs, new in [
        (BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, partition), x, xt),
        (GroupKernel(6), ids, ids_t),
    ]:
        scaled = batch_scale(kernel).to(DTYPE).eval()
        cross = scaled(new, inputs).evaluate_kernel()
        assert isinstance(cross, BlockCrossLinearOperator)
        expected = kernel(new, inputs).to_dense() * scaled.outputscale.view(T, 1, 1)
        torch.testing.assert_close(cross.to_dense(), expected)
        torch.testing.assert_close(scaled(inputs, new).to_dense(), expected.mT)


# ---------------------------------------------------------------- from_batch_mvn with a MultitaskGaussianLikelihood
def multitask_likelihood(**options):
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=T, **options)
    if likelihood.has_task_noise and likelihood.rank == 0:
        likelihood.task_noises = torch.tensor([0.1, 0.2, 0.3])
    return likelihood


def batch_rbf():
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(batch_shape=TASKS), batch_shape=TASKS)
    kernel.outputscale = torch.tensor([0.5, 1.0, 2.0])
    kernel.base_kernel.lengthscale = torch.tensor([0.2, 0.5, 1.0]).view(T, 1, 1)
    return kernel


def test_from_batch_mvn_with_task_noises_is_closed_form():
    x, _, y, partition, xt, _ = data()
    for options in [{"rank": 0}, {"rank": 0, "has_global_noise": False}, {"rank": 0, "has_task_noise": False}]:
        kernel = BlockMeanKernel(batch_rbf(), x, partition)
        model = BatchGP(x, y.mT, multitask_likelihood(**options), kernel, multitask=True).to(DTYPE)
        assert_matches_dense(model, x, y.mT, xt)


def test_from_batch_mvn_of_group_kernels_with_task_noises_is_closed_form():
    _, ids, y, _, _, ids_t = data()
    kernel = gpytorch.kernels.ScaleKernel(GroupKernel(6, batch_shape=TASKS), batch_shape=TASKS)
    model = BatchGP(ids, y.mT, multitask_likelihood(rank=0), kernel, multitask=True).to(DTYPE)
    assert_matches_dense(model, ids, y.mT, ids_t)


def test_from_batch_mvn_with_correlated_task_noise_warns():
    x, _, y, partition, _, _ = data()
    model = BatchGP(x, y.mT, multitask_likelihood(rank=1), BlockMeanKernel(batch_rbf(), x, partition), multitask=True)
    model = model.to(DTYPE)
    _assert_warned_loss_matches_dense(model, x, y, "no closed form")


def test_block_diagonal_tasks_plus_diagonal_solve_and_logdet():
    generator = torch.Generator().manual_seed(2)
    partition = Partition.from_labels(torch.arange(12) % 4)
    W = torch.randn(T, 4, 4, generator=generator, dtype=DTYPE)
    tasks = BlockMeanLinearOperator(torch.rand(T, 4, generator=generator, dtype=DTYPE), W @ W.mT, partition)
    d = torch.rand(T * 12, generator=generator, dtype=DTYPE) + 0.5
    rhs = torch.randn(T * 12, 2, generator=generator, dtype=DTYPE)
    for layout in [BlockDiagLinearOperator, BlockInterleavedLinearOperator]:
        blocks = layout(tasks)
        dense = blocks.to_dense() + torch.diag(d)
        with closed_forms_only(12):
            noisy = blocks + DiagLinearOperator(d)
            solved = noisy.solve(rhs)
            inv_quad, logdet = noisy.inv_quad_logdet(rhs, logdet=True)
            root = noisy.root_decomposition().root.to_dense()
            inv_root = noisy.root_inv_decomposition().root.to_dense()
        assert isinstance(noisy, layout)
        with closed_forms_only(12):
            jittered = noisy.add_jitter(0.1)  # linear_operator's add_diagonal would give a generic AddedDiag
            jittered_logdet = jittered.logdet()
        torch.testing.assert_close(jittered_logdet, torch.logdet(dense + 0.1 * torch.eye(T * 12, dtype=DTYPE)))
        torch.testing.assert_close(noisy.to_dense(), dense)
        torch.testing.assert_close(solved, torch.linalg.solve(dense, rhs))
        torch.testing.assert_close(logdet, torch.logdet(dense))
        torch.testing.assert_close(inv_quad, (rhs * torch.linalg.solve(dense, rhs)).sum())
        torch.testing.assert_close(root @ root.mT, dense)
        torch.testing.assert_close(inv_root @ inv_root.mT, torch.linalg.inv(dense))


def test_group_likelihood_refuses_a_multitask_distribution_in_words():
    # it read the last dimension of the (n, t) event as the points: a message about "3 points" for 40, and for
    # n == t torch's broadcasting RuntimeError
    from bma_gp import GroupGaussianLikelihood

    _, ids, y, _, _, _ = data()
    for rows in [N, T]:
        likelihood = GroupGaussianLikelihood(6, group_dim=0, train_inputs=ids[:rows])
        kernel = GroupKernel(6, batch_shape=TASKS)
        model = BatchGP(ids[:rows], y[:, :rows].mT, likelihood, kernel, multitask=True).to(DTYPE)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        with pytest.raises(
            ValueError, match=rf"MultitaskMultivariateNormal of {rows} points and {T} tasks.*from_batch_mvn"
        ):
            mll(model(ids[:rows]), y[:, :rows].mT)


# ---------------------------------------------------------------- MultitaskKernel around a block mean kernel
class KroneckerGP(gpytorch.models.ExactGP):
    """GPyTorch's multitask model: ``MultitaskKernel(data kernel)`` and a ``MultitaskGaussianLikelihood``."""

    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=T)
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))


def test_constant_diagonal_times_block_mean_operator_is_a_multiple():
    generator = torch.Generator().manual_seed(3)
    W = torch.randn(2, 3, 3, generator=generator, dtype=DTYPE)
    M = BlockMeanLinearOperator(
        torch.rand(2, 3, generator=generator, dtype=DTYPE), W @ W.mT, Partition.from_labels(torch.arange(10) % 3)
    )
    c = ConstantDiagLinearOperator(torch.tensor([[2.0], [3.0]], dtype=DTYPE), diag_shape=10)
    expected = c.to_dense() @ M.to_dense()
    for product in [c @ M, M @ c]:
        assert isinstance(product, BlockMeanLinearOperator)
        torch.testing.assert_close(product.to_dense(), expected)


def test_multitask_kernel_with_task_noises_uses_the_block_mean_spectrum():
    # above max_cholesky_size linear_operator solves Kron(K, C) + I x D through each factor's eigendecomposition,
    # after whitening K by the noise's identity factor: that must stay the block mean operator's closed form
    x, _, y, partition, xt, _ = data()
    kernel = gpytorch.kernels.MultitaskKernel(BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, partition), T, rank=1)
    kernel.task_covar_module.covar_factor.data = torch.tensor([[1.0], [0.5], [-0.3]])
    model = KroneckerGP(x, y.mT, multitask_likelihood(rank=0), kernel).to(DTYPE)
    with gpytorch.settings.max_cholesky_size(0):
        assert_matches_dense(model, x, y.mT, xt)


def test_multitask_kernel_with_coupled_task_noise_is_closed_form():
    # up to max_cholesky_size linear_operator factorised the dense (n t) x (n t) Kronecker sum (announced), and above it
    # whitened by a Lanczos inverse root of the noise's task factor. A noise that couples the tasks (rank=1) is closed
    # form since session 28 (tests/test_kronecker_task_noise.py), like a per-task noise (rank=0), at every size
    x, _, y, partition, xt, _ = data()
    kernel = gpytorch.kernels.MultitaskKernel(BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, partition), T)
    model = KroneckerGP(x, y.mT, multitask_likelihood(rank=1), kernel).to(DTYPE)
    for size in (800, 0):
        with gpytorch.settings.max_cholesky_size(size):
            assert_matches_dense(model, x, y.mT, xt)


# -------------------------------------------------------------- IndexKernel over the tasks (GPyTorch's Hadamard model)
class HadamardGP(gpytorch.models.ExactGP):
    """GPyTorch's Hadamard multitask model: ``covar_module(x).mul(task_covar_module(i))``."""

    def __init__(self, inputs, y, likelihood, kernel, task_kernel):
        super().__init__(inputs, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel
        self.task_covar_module = task_kernel

    def forward(self, x, i):
        covar = self.covar_module(x).mul(self.task_covar_module(i))
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), covar)


def test_hadamard_model_with_an_index_kernel_is_closed_form():
    x, ids, y, partition, xt, _ = data()
    tasks = torch.arange(N).unsqueeze(-1) % 2  # task 2 is never seen in training
    test_tasks = torch.tensor([[0], [1], [2], [2], [1], [0], [2]])
    for kernel, inputs, test_inputs in [
        (BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, partition), x, xt),
        (GroupKernel(6, per_group_variance=True), ids, torch.tensor([[0.0], [1.0], [5.0], [2.0], [0.0], [3.0], [4.0]])),
    ]:
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        likelihood.noise = 0.1
        task_kernel = gpytorch.kernels.IndexKernel(num_tasks=T, rank=1)
        task_kernel.covar_factor.data = torch.tensor([[1.0], [0.5], [-0.3]])
        model = HadamardGP((inputs, tasks), y[0], likelihood, kernel, task_kernel).to(DTYPE)
        reference = dense_reference(model)
        loss, grads, mean, variance = fit_and_predict(model, (inputs, tasks), y[0], (test_inputs, test_tasks), True)
        ref = fit_and_predict(reference, (inputs, tasks), y[0], (test_inputs, test_tasks), False)
        torch.testing.assert_close(loss, ref[0], rtol=1e-9, atol=1e-10)
        for grad, ref_grad in zip(grads, ref[1]):
            torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(mean, ref[2], rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(variance, ref[3], rtol=1e-8, atol=1e-9)


def test_elementwise_product_with_a_nonsymmetric_indexed_matrix_is_not_taken_for_a_block_mean():
    from linear_operator.operators import InterpolatedLinearOperator

    partition = Partition.from_labels(torch.arange(8) % 2)
    M = BlockMeanLinearOperator(
        torch.ones(2, dtype=DTYPE), torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DTYPE), partition
    )
    ids = (torch.arange(8) % 3).unsqueeze(-1)
    for C, closed in [
        (torch.tensor([[1.0, 0.2, 0.0], [0.2, 2.0, 0.1], [0.0, 0.1, 1.5]]), True),
        (torch.rand(3, 3), False),
    ]:
        indexed = InterpolatedLinearOperator(
            C.to(DTYPE), ids, torch.ones(8, 1, dtype=DTYPE), ids, torch.ones(8, 1, dtype=DTYPE)
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            product = M._mul_matrix(indexed)
        assert isinstance(product, BlockMeanLinearOperator) == closed
        assert any(issubclass(w.category, ClosedFormFallbackWarning) for w in caught) != closed
        if closed:  # (linear_operator's generic product multiplies roots: it assumes symmetric factors)
            torch.testing.assert_close(product.to_dense(), M.to_dense() * indexed.to_dense())


# ---------------------------------------------------------------- AdditiveStructureKernel / ProductStructureKernel
def test_structure_kernels_say_what_to_build_instead():
    # they evaluate the base kernel with last_dim_is_batch=True, which the user never passed: the error must say why
    # it comes up and what to build instead
    x, ids, y, partition, _, _ = data()
    x2 = torch.cat([x, x.flip(0)], -1)
    for structure in [gpytorch.kernels.AdditiveStructureKernel, gpytorch.kernels.ProductStructureKernel]:
        for base, inputs, hint in [
            (BlockMeanKernel(gpytorch.kernels.RBFKernel(), x2, partition), x2, r"AdditiveKernel\(\*\[BlockMeanKernel"),
            (GroupKernel(6), torch.cat([ids, ids.flip(0)], -1), r"GroupKernel\(k0, active_dims=\[0\]\) \+"),
        ]:
            model = BatchGP(inputs, y, batch_likelihood(), structure(base, num_dims=2)).to(DTYPE)
            mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # GPyTorch's, about last_dim_is_batch
                with pytest.raises(
                    NotImplementedError, match="AdditiveStructureKernel and ProductStructureKernel.*" + hint
                ):
                    mll(model(inputs), y)
