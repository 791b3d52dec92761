"""Regressions of the block mean operator and exact prediction, each against an independent reference.

* sampling the posterior at the training inputs (it was built as a non-symmetric operator);
* ``logdet`` of non-symmetric operators keeps the sign of the determinant (``torch.logdet`` semantics);
* NaN or inf in ``lam`` or ``B`` is named, under ``bma_gp.settings.validate``;
* the cached core accessors (``core``, ``core_cholesky``, ``from_core``) and their one dtype policy,
  used by prediction instead of a second factorisation.
"""

from __future__ import annotations

import inspect
import warnings
from unittest import mock

import gpytorch
import pytest
import torch

import bma_gp
from bma_gp import BlockMeanLinearOperator, Partition, block_mean
from bma_gp._precision import core_dtype
from bma_gp.kernels import BlockMeanKernel, GroupKernel
from closed_form_guard import closed_forms_only
from test_gp_inference import (
    GP,
    build_model,
    dense_block_mean,
    dense_posterior,
    group_data,
    make_data,
    make_partition,
    reference_pieces,
)

DTYPE = torch.float64


def random_operator(labels, batch=(), dtype=DTYPE, seed=0, shift=0.5, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    partition = Partition.from_labels(torch.tensor(labels))
    k = partition.num_blocks
    root = torch.randn(*batch, k, k, generator=gen, dtype=DTYPE)
    B = scale * (root @ root.mT / k + 0.2)
    lam = scale * (torch.rand(*batch, k, generator=gen, dtype=DTYPE) + shift)
    return BlockMeanLinearOperator(lam.to(dtype), B.to(dtype), partition)


def dense64(op: BlockMeanLinearOperator) -> torch.Tensor:
    """The dense matrix of ``op`` from its stored values, in float64 (no float32 rounding of the sum)."""
    return BlockMeanLinearOperator(op.lam.double(), op.B.double(), op.partition, symmetric=op.symmetric).to_dense()


CONTIGUOUS = False
SCATTERED = [2, 0, 1, 0, 3, 1, 1, 0, 2, 4, 1, 0]  # blocks 3 and 4 are singletons


# ---------------------------------------------------------------------------- posterior at the training inputs
def _gp_models():
    """(name, model, likelihood, dense prior covariance at the training inputs), in eval mode."""
    x, y = make_data()
    partition = make_partition(x.shape[0], 6, contiguous=CONTIGUOUS)
    out = []
    for scale in (False, True):
        model, likelihood, base = build_model(x, y, partition, scale=scale)
        Ktrain, _, _ = reference_pieces(model, base, x, None, partition)
        out.append(
            ("ScaleKernel(BlockMeanKernel)" if scale else "BlockMeanKernel", model, likelihood, x, y, Ktrain.detach())
        )
    gx, gy = group_data(n=60)
    if CONTIGUOUS:
        order = torch.argsort(gx[:, 0], stable=True)
        gx, gy = gx[order], gy[order]
    kernel = GroupKernel(12, rank=2)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 0.2
    model = GP(gx, gy, likelihood, kernel).to(DTYPE)
    ids = gx[:, 0].long()
    with torch.no_grad():
        C = kernel.covar_matrix
    out.append(("GroupKernel", model, likelihood, gx, gy, C[ids][:, ids].detach()))
    for entry in out:
        entry[1].eval()
    return out


def _call(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
        return model(x)


@pytest.mark.parametrize("case", range(3), ids=["BlockMeanKernel", "ScaleKernel", "GroupKernel"])
def test_posterior_at_training_inputs_is_symmetric_and_samples(case):
    name, model, likelihood, x, y, Ktrain = _gp_models()[case]
    noise = likelihood.noise.detach()
    _, ref_cov = dense_posterior(Ktrain, noise, y, model.mean_module.constant.detach(), Ktrain, Ktrain)
    n = x.shape[0]
    with torch.no_grad(), closed_forms_only(n):
        post = _call(model, x)
        cov = post.lazy_covariance_matrix
        assert isinstance(cov, BlockMeanLinearOperator) and cov.symmetric, name
        root = cov.root_decomposition().root.to_dense()
        eps = torch.randn(n, 3, dtype=DTYPE)
        samples = post.rsample(torch.Size([3]), base_samples=eps.mT)
        plain = post.rsample(torch.Size([2]))
        noisy = likelihood(_call(model, x))
        noisy_root = noisy.lazy_covariance_matrix.root_decomposition().root.to_dense()
        noisy.rsample()
        with gpytorch.settings.fast_pred_samples():
            fast = _call(model, x).rsample(torch.Size([2]))
    torch.testing.assert_close(cov.to_dense(), ref_cov, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(root @ root.mT, ref_cov, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(
        noisy_root @ noisy_root.mT, ref_cov + noise * torch.eye(n, dtype=DTYPE), rtol=1e-8, atol=1e-9
    )
    torch.testing.assert_close(samples, post.mean + (root @ eps).mT, rtol=1e-9, atol=1e-9)
    assert plain.shape == (2, n) and fast.shape == (2, n) and bool(torch.isfinite(plain).all())


def test_posterior_at_training_inputs_of_a_batch_of_gps():
    x, y = make_data(n=36)
    ys = torch.stack([y, -2 * y + 0.3])
    partition = make_partition(36, 4, contiguous=False)
    base = gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2]))
    base.lengthscale = torch.tensor([[[0.2]], [[0.5]]])
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size([2]))
    likelihood.noise = torch.tensor([[0.1], [0.3]])
    model = GP(x, ys, likelihood, BlockMeanKernel(base, x, partition), batch_shape=torch.Size([2])).to(DTYPE)
    model.eval()
    with torch.no_grad(), closed_forms_only(36):
        post = _call(model, x)
        cov = post.lazy_covariance_matrix
        root = cov.root_decomposition().root.to_dense()
        assert post.rsample(torch.Size([3])).shape == (3, 2, 36)
    assert isinstance(cov, BlockMeanLinearOperator) and cov.symmetric
    for b in range(2):
        with gpytorch.settings.lazily_evaluate_kernels(False):
            K = base(x, x).to_dense()[b].detach()
        Kt = dense_block_mean(K, partition.labels)
        _, ref = dense_posterior(Kt, likelihood.noise[b].detach(), ys[b], 0.0, Kt, Kt)
        torch.testing.assert_close(root[b] @ root[b].mT, ref, rtol=1e-8, atol=1e-10)


def test_posterior_samples_have_the_dense_covariance():
    """Monte Carlo: 4000 draws, the sample covariance agrees with the dense posterior to sampling error."""
    name, model, likelihood, x, y, Ktrain = _gp_models()[0]
    _, ref_cov = dense_posterior(
        Ktrain, likelihood.noise.detach(), y, model.mean_module.constant.detach(), Ktrain, Ktrain
    )
    with torch.no_grad():
        draws = _call(model, x).rsample(torch.Size([4000]))
    centred = draws - draws.mean(0)
    sample_cov = centred.mT @ centred / (draws.shape[0] - 1)
    scale = ref_cov.diagonal().max()
    # entries of a sample covariance have standard deviation <= sqrt(2 / N) * max variance ~ 0.022 * scale
    assert float((sample_cov - ref_cov).abs().max()) < 0.1 * float(scale)


def test_posterior_covariance_gradients_match_dense():
    x, y = make_data(n=30)
    partition = make_partition(30, 5, contiguous=False)
    model, likelihood, base = build_model(x, y, partition, scale=True)
    model.eval()
    weights = torch.randn(30, 30, dtype=DTYPE)
    params = [base.raw_lengthscale, model.covar_module.raw_outputscale, likelihood.raw_noise]
    with gpytorch.settings.detach_test_caches(False):
        loss = (_call(model, x).covariance_matrix * weights).sum()
    grads = torch.autograd.grad(loss, params)
    Ktrain, _, _ = reference_pieces(model, base, x, None, partition)
    _, ref_cov = dense_posterior(Ktrain, likelihood.noise, y, model.mean_module.constant, Ktrain, Ktrain)
    ref_grads = torch.autograd.grad((ref_cov * weights).sum(), params)
    torch.testing.assert_close(loss, (ref_cov * weights).sum(), rtol=1e-8, atol=1e-9)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_posterior_of_a_smooth_kernel_with_many_blocks_has_a_root(dtype):
    """A smooth kernel makes the prior core nearly singular: K - K M^-1 K then has eigenvalues of
    order eps * |K|, far below zero relative to the posterior's own scale (the noise). They must not
    stop the square root, and the result must match the dense posterior."""
    n, k = 600, 150
    x, _ = make_data(n=n)
    partition = make_partition(n, k, contiguous=False)
    base = gpytorch.kernels.RBFKernel().to(DTYPE)
    base.lengthscale = 1.0
    with torch.no_grad():
        K64 = block_mean(5.0 * base(x, x).to_dense(), partition)
    K = BlockMeanLinearOperator(K64.lam.to(dtype), K64.B.to(dtype), partition)
    M = K.add_diagonal(torch.tensor(1e-4, dtype=dtype))
    Kd = dense64(K)
    ref = Kd - Kd @ torch.linalg.solve(dense64(M), Kd)
    post = K.schur_complement(K, M)
    assert post.symmetric and post.dtype == dtype
    root = post.matrix_sqrt()
    R = dense64(root)
    scale = float(ref.diagonal().max())
    assert float((dense64(post) - ref).abs().max()) < (1e-7 if dtype == torch.float64 else 1e-4) * scale
    # float64: exact to rounding. float32: the prior itself is indefinite at ~eps32 |K|, far above the
    # noise here; the square root clamps those directions, which moves entries by that much.
    assert float((R @ R - ref).abs().max()) < (1e-7 if dtype == torch.float64 else 5e-2) * scale


def test_schur_complement_that_is_indefinite_beyond_rounding_has_no_square_root_under_validation():
    K = random_operator(SCATTERED, seed=3)
    M = K.add_diagonal(torch.tensor(0.1, dtype=DTYPE))
    wrong_prior = K * 0.5  # K/2 - K M^-1 K is indefinite: not a posterior
    S = wrong_prior.schur_complement(K, M)
    dense = dense64(S)
    torch.testing.assert_close(
        dense, dense64(wrong_prior) - dense64(K) @ torch.linalg.solve(dense64(M), dense64(K)), rtol=1e-10, atol=1e-12
    )
    assert float(torch.linalg.eigvalsh(dense).min()) < -1e-3
    with pytest.raises(ValueError, match="matrix_sqrt needs a positive semidefinite"):
        S.matrix_sqrt()
    with bma_gp.settings.validate(False):
        root = wrong_prior.schur_complement(K, M).matrix_sqrt()
    assert float(torch.linalg.eigvalsh(dense64(root)).min()) > -1e-12  # negative eigenvalues clamped


def test_schur_complement_rejects_other_partitions():
    K = random_operator(SCATTERED)
    other = random_operator([0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 4])
    with pytest.raises(ValueError, match="other must be a BlockMeanLinearOperator on the same partition"):
        K.schur_complement(K, other)
    with pytest.raises(ValueError, match="cross must be"):
        K.schur_complement(torch.eye(12, dtype=DTYPE), K)


# ---------------------------------------------------------------------------- logdet of non-symmetric operators
def _product_with_determinant(sign: int, batch=()):
    """A product of two symmetric block mean operators (symmetric=False) whose determinant has ``sign``."""
    labels = [0, 0, 1, 1, 1, 2]  # multiplicities 1, 2, 0
    A = random_operator(labels, batch=batch, seed=1)
    lam = torch.tensor([1.0, 2.0, 0.7], dtype=DTYPE).expand(*batch, 3).clone()
    B = torch.tensor([[1.0, 0.1, 0.0], [0.1, 0.3, 0.2], [0.0, 0.2, 0.4]], dtype=DTYPE).expand(*batch, 3, 3).clone()
    if sign < 0:
        lam[..., 0] = -1.0  # lam_0 has multiplicity 1: flips the sign of det (C stays positive definite)
    elif sign == 0:
        lam[..., 1] = 0.0
    P = A.matmul(BlockMeanLinearOperator(lam, B, A.partition))
    assert isinstance(P, BlockMeanLinearOperator) and not P.symmetric
    return P


@pytest.mark.parametrize("sign", [1, -1, 0])
def test_logdet_of_a_product_follows_torch_logdet(sign):
    P = _product_with_determinant(sign)
    dense = P.to_dense()
    det = torch.linalg.det(dense)
    assert (float(det) > 1e-12) if sign > 0 else (float(det) < -1e-12) if sign < 0 else abs(float(det)) < 1e-12
    ours, ref = P.logdet(), torch.logdet(dense)
    if sign > 0:
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    elif sign < 0:
        assert torch.isnan(ref) and torch.isnan(ours)
    else:
        assert torch.isneginf(ours)


def test_logdet_of_a_product_negative_lam_with_even_multiplicity_is_finite():
    labels = [0, 0, 0, 1, 2, 2]  # multiplicities 2, 0, 1
    P = random_operator(labels, seed=2).matmul(
        BlockMeanLinearOperator(
            torch.tensor([-1.5, 1.0, 2.0], dtype=DTYPE),
            torch.diag(torch.tensor([0.8, 0.3, 0.3], dtype=DTYPE)),
            Partition.from_labels(torch.tensor(labels)),
        )
    )
    torch.testing.assert_close(P.logdet(), torch.logdet(P.to_dense()), rtol=1e-10, atol=1e-10)
    assert torch.isfinite(P.logdet())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logdet_of_products_in_a_batch_with_mixed_signs(dtype):
    pos, neg = _product_with_determinant(1), _product_with_determinant(-1)
    P = BlockMeanLinearOperator(
        torch.stack([pos.lam, neg.lam]).to(dtype), torch.stack([pos.B, neg.B]).to(dtype), pos.partition, symmetric=False
    )
    ours = P.logdet()
    ref = torch.logdet(dense64(P))
    assert ours.dtype == dtype
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=1e-5)
    assert torch.isnan(ours[1]) and torch.isnan(ref[1])


def test_logdet_of_a_product_gradient_matches_dense():
    labels = [0, 0, 1, 1, 1, 2]
    lam = torch.tensor([1.0, 2.0, 0.7], dtype=DTYPE, requires_grad=True)
    B = torch.tensor([[0.5, 0.1, 0.0], [0.3, 0.3, 0.2], [0.0, 0.2, 0.4]], dtype=DTYPE, requires_grad=True)
    A = random_operator(labels, seed=4)

    def product():
        return A.matmul(BlockMeanLinearOperator(lam, B, A.partition, symmetric=False))

    grads = torch.autograd.grad(product().logdet(), (lam, B))
    ref = torch.autograd.grad(torch.logdet(product().to_dense()), (lam, B))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------- non-finite input
def _with_bad(where, value, batch=()):
    op = random_operator(SCATTERED, batch=batch)
    lam, B = op.lam.clone(), op.B.clone()
    if where == "lam":
        lam[(*[0] * len(batch), 1)] = value
    else:
        B[(*[0] * len(batch), 2, 0)] = value
        B[(*[0] * len(batch), 0, 2)] = value
    return BlockMeanLinearOperator(lam, B, op.partition)


CALLS = {
    "solve": lambda op: op.solve(torch.ones(op.shape[-1], dtype=op.dtype)),
    "logdet": lambda op: op.logdet(),
    "inv_quad_logdet": lambda op: op.inv_quad_logdet(torch.ones(op.shape[-1], 1, dtype=op.dtype), logdet=True),
    "matrix_sqrt": lambda op: op.matrix_sqrt(),
    "matrix_inv_sqrt": lambda op: op.matrix_inv_sqrt(),
    "matrix_exp": lambda op: op.matrix_exp(),
    "eigvalsh": lambda op: op.eigvalsh(),
    "inverse": lambda op: op.inverse(),
    "core_cholesky": lambda op: op.core_cholesky(),
    "root_decomposition": lambda op: op.root_decomposition().root.to_dense(),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("where, value", [("lam", float("nan")), ("B", float("inf")), ("B", float("nan"))])
def test_non_finite_input_is_named(call, where, value):
    op = _with_bad(where, value)
    name = r"lam\[1\]" if where == "lam" else r"B\[0, 2\]"
    with pytest.raises(ValueError, match=rf"not finite: {name} = (nan|inf)"):
        CALLS[call](op)


@pytest.mark.parametrize("where", ["lam", "B"])
def test_non_finite_input_that_needs_gradients_is_named_without_a_torch_warning(where):
    """The message reads the bad value off tensors that track gradients (a kernel's hyperparameters produced them):
    no "Converting a tensor with requires_grad=True to a scalar" warning on the way to the error."""
    op = _with_bad(where, float("nan"))
    op = BlockMeanLinearOperator(op.lam.requires_grad_(True), op.B.requires_grad_(True), op.partition)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="not finite"):
            op.solve(torch.ones(op.shape[-1], dtype=op.dtype))


def test_non_finite_input_names_the_batch_index():
    op = _with_bad("lam", float("nan"), batch=(2,))
    with pytest.raises(ValueError, match=r"lam\[1\] = nan \(batch index \(0,\)\)"):
        op.solve(torch.ones(op.shape[-1], dtype=DTYPE))


def test_non_finite_input_with_validation_off_propagates_without_checking():
    op = _with_bad("lam", float("nan"))
    with (
        bma_gp.settings.validate(False),
        mock.patch.object(BlockMeanLinearOperator, "_check_finite", side_effect=AssertionError("host sync")),
    ):
        x = op.solve(torch.ones(op.shape[-1], dtype=DTYPE))
        assert bool(torch.isnan(x).any())
        assert torch.isnan(op.logdet())


def test_matmul_does_not_validate():
    """Products are not closed forms that could mislead: NaN propagates there without a host sync."""
    op = _with_bad("B", float("nan"))
    with mock.patch.object(BlockMeanLinearOperator, "_check_finite", side_effect=AssertionError("host sync")):
        assert bool(torch.isnan(op @ torch.ones(op.shape[-1], dtype=DTYPE)).any())


# ---------------------------------------------------------------------------- core accessors
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_core_round_trips_through_from_core(dtype, batch):
    op = random_operator(SCATTERED, batch=batch, dtype=dtype)
    lam, C = op.core()
    assert lam.dtype == C.dtype == core_dtype(dtype) == op.core_dtype == torch.float64
    assert C.shape == (*batch, 5, 5)
    # C = U^T M U with U = P S^-1/2: an independent dense computation
    P = torch.nn.functional.one_hot(op.partition.labels, 5).double()
    U = P / op.partition.sizes.double().sqrt()
    torch.testing.assert_close(C, U.T @ dense64(op) @ U, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=1e-12)
    torch.testing.assert_close(op.core_matrix(), C, rtol=0, atol=0)
    back = BlockMeanLinearOperator.from_core(lam, C, op.partition, dtype=dtype)
    assert back.dtype == dtype
    torch.testing.assert_close(
        back.to_dense(),
        op.to_dense(),
        rtol=1e-6 if dtype == torch.float32 else 1e-12,
        atol=1e-6 if dtype == torch.float32 else 1e-12,
    )


def test_core_is_cached_without_gradients_and_fresh_with():
    op = random_operator(SCATTERED)
    assert op.core()[1] is op.core()[1]
    lam = op.lam.clone().requires_grad_(True)
    op2 = BlockMeanLinearOperator(lam, op.B, op.partition)
    op2.logdet().backward()
    op2.core()[1].sum().backward()  # a second backward through a fresh graph works
    assert lam.grad is not None
    # a core computed under no_grad is not reused once gradients are recorded
    op3 = BlockMeanLinearOperator(lam, op.B, op.partition)
    with torch.no_grad():
        op3.core()
    (grad,) = torch.autograd.grad(op3.core()[1].diagonal().sum(), lam)
    torch.testing.assert_close(grad, torch.ones_like(lam))  # d trace(C) / d lam_i = 1


def test_results_are_not_cached_with_gradients():
    """A factorisation cached under no_grad used to drop the gradient of a later logdet through C
    (silently), and one cached with its graph broke a second backward pass."""
    labels = [0, 0, 1, 1, 1, 2]
    lam = torch.tensor([1.0, 2.0, 0.5], dtype=DTYPE, requires_grad=True)
    B = 0.3 * torch.eye(3, dtype=DTYPE)
    op = BlockMeanLinearOperator(lam, B, Partition.from_labels(torch.tensor(labels)))
    with torch.no_grad():
        op.logdet(), op.inverse(), op.matrix_sqrt()
    (grad,) = torch.autograd.grad(op.logdet(), lam)
    (ref,) = torch.autograd.grad(torch.logdet(op.to_dense()), lam)
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-12)
    x = torch.randn(6, dtype=DTYPE)
    for _ in range(2):  # twice: no graph is kept between calls
        op.inv_quad_logdet(x, logdet=True)[1].backward()
        op.matrix_sqrt().to_dense().sum().backward()
    fixed = BlockMeanLinearOperator(lam.detach(), B, op.partition)
    assert fixed.inverse() is fixed.inverse() and fixed.core_cholesky() is fixed.core_cholesky()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_core_cholesky_factorises_the_core_in_core_dtype(dtype):
    op = random_operator(SCATTERED, batch=(3,), dtype=dtype)
    L = op.core_cholesky()
    assert L.dtype == torch.float64 and L is op.core_cholesky()  # cached
    torch.testing.assert_close(L @ L.mT, op.core_matrix(), rtol=1e-12, atol=1e-12)
    assert bool((torch.triu(L, 1) == 0).all())


def test_core_cholesky_of_an_indefinite_core():
    partition = Partition.from_sizes([2, 3])
    lam = torch.ones(2, 2, dtype=DTYPE)
    B = torch.stack([torch.eye(2, dtype=DTYPE), -torch.eye(2, dtype=DTYPE)])  # batch 1 is indefinite
    op = BlockMeanLinearOperator(lam, B, partition)
    message = r"core_cholesky needs a positive definite.*eigenvalue -\d.*batch index \(1,\)"
    with pytest.raises(ValueError, match=message):
        op.core_cholesky()
    with bma_gp.settings.validate(False):
        L = BlockMeanLinearOperator(lam, B, partition).core_cholesky()
    assert bool(torch.isfinite(L[0]).all()) and bool(torch.isnan(L[1]).all())
    with pytest.raises(ValueError, match="symmetric=False"):
        BlockMeanLinearOperator(lam, B, partition, symmetric=False).core_cholesky()


def test_from_core_rejects_bad_input():
    partition = Partition.from_sizes([2, 3])
    with pytest.raises(ValueError, match="C must be a square"):
        BlockMeanLinearOperator.from_core(torch.ones(2), torch.ones(2, 3), partition)
    with pytest.raises(ValueError, match="lam must be a tensor of shape"):
        BlockMeanLinearOperator.from_core(torch.ones(3), torch.eye(2), partition)
    with pytest.raises(ValueError, match="num_blocks = 3"):
        BlockMeanLinearOperator.from_core(torch.ones(3), torch.eye(3), partition)


def test_prediction_uses_the_operators_cholesky():
    x, y = make_data(n=30)
    partition = make_partition(30, 5, contiguous=True)
    model, likelihood, _ = build_model(x, y, partition, scale=False)
    model.eval()
    xt = torch.rand(4, 2, dtype=DTYPE)
    calls = []
    original = BlockMeanLinearOperator.core_cholesky

    def spy(self):
        calls.append(self)
        return original(self)

    with (
        torch.no_grad(),
        mock.patch.object(BlockMeanLinearOperator, "core_cholesky", spy),
        mock.patch.object(torch.linalg, "eigh", side_effect=AssertionError("eigh in prediction")),
    ):
        var = model(xt).variance
    strategy = model.prediction_strategy
    assert calls and calls[0] is strategy.block_mean_covar
    root_sizes, factor = strategy.block_covar_root
    torch.testing.assert_close(factor, strategy.block_mean_covar.core_cholesky(), rtol=0, atol=0)
    assert bool((var > 0).all())


def test_one_precision_policy():
    for low in (torch.float32, torch.float16, torch.bfloat16):
        assert core_dtype(low) is torch.float64
    assert core_dtype(torch.float64) is torch.float64
    op = random_operator([0, 0, 1], dtype=torch.float32)
    assert op.core_dtype is torch.float64


def test_matrix_function_has_no_private_parameters():
    params = list(inspect.signature(BlockMeanLinearOperator.matrix_function).parameters)
    assert params == ["self", "fn", "check"]
    op = random_operator(SCATTERED)
    torch.testing.assert_close(
        op.matrix_function(torch.exp).to_dense(), torch.linalg.matrix_exp(op.to_dense()), rtol=1e-10, atol=1e-10
    )


def test_singleton_blocks_keep_relative_precision_at_small_scale():
    """A singleton block's one visible value used to be folded against a placeholder of 1, which
    cancels at small scales: at scale 1e-8 the square root lost half of float64's digits."""
    op = random_operator(SCATTERED, scale=1e-8)
    dense = op.to_dense()
    root = op.matrix_sqrt().to_dense()
    assert float((root @ root - dense).abs().max()) < 1e-13 * float(dense.abs().max())
    inv = op.inverse().to_dense()
    eye = torch.eye(dense.shape[-1], dtype=DTYPE)
    assert float((inv @ dense - eye).abs().max()) < 1e-12


@pytest.mark.parametrize("fn", ["matrix_inv_sqrt", "matrix_log"])
def test_float32_operator_ill_conditioned_for_float32_keeps_its_inverse_square_root(fn):
    """The operator sweep at n = 10^7 (blocks of 10^4 points) failed: ``matrix_inv_sqrt`` of a positive definite
    float32 operator raised "needs a positive definite matrix, but ... has eigenvalue 1.02284", because the
    smallest eigenvalue of its core (factorised in float64) was below 10 eps32 of the largest. Solves accepted
    the same operator. Only eigenvalues within rounding of the core's own precision count as zero now."""
    partition = Partition.from_sizes(torch.tensor([50, 70]))
    lam = torch.tensor([1.0, 1.5])
    B = torch.full((2, 2), 1e5)  # C's eigenvalues: about 1.2e7 and about 1, a ratio below 10 eps32
    op = BlockMeanLinearOperator(lam, B, partition)
    evals = torch.linalg.eigvalsh(op.core_matrix())
    assert float(evals.min() / evals.max()) < 10 * torch.finfo(torch.float32).eps
    v = torch.randn(120, generator=torch.Generator().manual_seed(0))
    res = getattr(op, fn)() @ v
    e, V = torch.linalg.eigh(dense64(op))
    f = e.rsqrt() if fn == "matrix_inv_sqrt" else e.log()
    ref = (V * f) @ V.mT @ v.double()
    assert float((res.double() - ref).norm() / ref.norm()) < 1e-5
    # a core that is singular in its own precision still raises: C = I + diag(-1, 1) has eigenvalue 0
    singular = BlockMeanLinearOperator(
        torch.ones(2), torch.diag(torch.tensor([-1.0, 1.0])), Partition.from_sizes(torch.tensor([1, 1]))
    )
    with pytest.raises(ValueError, match="positive definite"):
        getattr(singular, fn)()


@pytest.mark.parametrize("diagonal", [False, True])
def test_matrix_function_names_an_fn_that_is_not_elementwise(diagonal):
    """A reduction, a dropped entry or a constant returned by ``fn`` was reported as a shape error about ``lam``
    (which the caller never passed), a bare broadcasting RuntimeError or an AttributeError on float."""
    part = Partition.from_labels(torch.tensor([0, 1, 1, 0, 2, 2]))
    B = torch.ones(3, dtype=torch.float64) if diagonal else torch.eye(3, dtype=torch.float64)
    M = BlockMeanLinearOperator(torch.ones(3, dtype=torch.float64), B, part, diagonal=diagonal)
    for fn in (lambda e: e.sum(), lambda e: e[..., :-1], lambda e: e.unsqueeze(-1)):
        with pytest.raises(ValueError, match=r"matrix_function\(fn\).*same shape.*it gave shape"):
            M.matrix_function(fn)
    with pytest.raises(TypeError, match=r"matrix_function\(fn\).*got a float.*full_like"):
        M.matrix_function(lambda e: 1.0)
    with pytest.raises(TypeError, match=r"matrix_function\(fn\): fn must be a function"):
        M.matrix_function(2.0)
    # an elementwise fn still works, against dense
    dense = M.to_dense()
    e, V = torch.linalg.eigh(dense)
    torch.testing.assert_close(M.matrix_function(torch.exp).to_dense(), (V * e.exp()) @ V.mT)


def test_add_diagonal_reports_shape_errors_only_for_shapes():
    """add_diagonal caught every RuntimeError of the sum and reported it as 'expected a scalar, shape ...', also for
    a vector of the right shape (a meta operator's .item(), an allocation failure). Shapes are checked first; an error
    inside the sum is raised as it is."""
    part = Partition.from_labels(torch.arange(8) % 3)
    M = BlockMeanLinearOperator(torch.ones(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), part)
    with pytest.raises(ValueError, match=r"expected a scalar, shape \(\*batch, 1\) or \(\*batch, 8\), got \(7,\)"):
        M.add_diagonal(torch.ones(7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"got \(3, 8\)"):
        M.expand(2, 8, 8).add_diagonal(torch.ones(3, 8, dtype=torch.float64))
    with mock.patch("bma_gp._composition.add_structured", side_effect=RuntimeError("inside the sum")):
        with pytest.raises(RuntimeError, match="inside the sum"):
            M.add_diagonal(torch.ones(8, dtype=torch.float64))
    d = torch.linspace(0.1, 0.8, 8, dtype=torch.float64)
    torch.testing.assert_close(M.add_diagonal(d).to_dense(), M.to_dense() + torch.diag(d))


@pytest.mark.parametrize("diagonal", [False, True])
def test_constant_diagonal_of_another_dtype_promotes_in_either_order(diagonal):
    """M + ConstantDiagLinearOperator(float64) on a float32 M kept float32 and dropped a 1e-9 jitter, while c + M
    promoted to float64 (user trial). Both follow torch's promotion now, as the dense sum does."""
    from linear_operator.operators import ConstantDiagLinearOperator

    part = Partition.from_labels(torch.tensor([0, 0, 1, 1, 2, 2]))
    B = torch.ones(3) if diagonal else torch.eye(3)
    M = BlockMeanLinearOperator(torch.ones(3), B, part, diagonal=diagonal)
    c = ConstantDiagLinearOperator(torch.tensor([1e-9], dtype=torch.float64), 6)
    dense = M.to_dense() + c.to_dense()
    for S in (M + c, c + M):
        assert isinstance(S, BlockMeanLinearOperator) and S.dtype == dense.dtype == torch.float64
        torch.testing.assert_close(S.to_dense(), dense, rtol=0, atol=1e-15)
    same = ConstantDiagLinearOperator(torch.tensor([0.5]), 6)
    assert (M + same).dtype == torch.float32  # the same dtype: unchanged


def _refuses_float64_right_hand_sides(op, x):
    """The product, solve and inv_quad of a float32 ``op`` with the float64 ``x`` each raise the named TypeError."""
    with pytest.raises(TypeError, match=r"other has dtype torch.float64 but the operator has dtype torch.float32"):
        op @ x
    with pytest.raises(TypeError, match=r"right_tensor has dtype torch.float64"):
        op.solve(x)
    with pytest.raises(TypeError, match=r"inv_quad_rhs has dtype torch.float64"):
        op.inv_quad_logdet(x, logdet=True)


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("B_off", [0.0, 1e-3])
def test_right_hand_side_of_another_dtype_is_refused_whatever_B_holds(diagonal, B_off):
    """A float32 operator with a float64 right-hand side promoted where B was diagonal (by its values, or as
    diagonal=True) and raised torch's 'expected m1 and m2 to have the same dtype' where it was dense (user trial):
    the same code worked or crashed by the fitted values. Now a TypeError naming the argument, as torch's matrix
    products refuse; a matching dtype works."""
    part = Partition.from_sizes([3, 3])
    if diagonal:
        M = BlockMeanLinearOperator(torch.ones(2), torch.ones(2), part, diagonal=True)
    else:
        M = BlockMeanLinearOperator(torch.ones(2), torch.tensor([[1.0, B_off], [B_off, 1.0]]), part)
    x = torch.ones(6, 2, dtype=torch.float64)
    _refuses_float64_right_hand_sides(M, x)
    with pytest.raises(TypeError, match=r"other has dtype torch.float16"):
        M @ x.half()
    torch.testing.assert_close(M @ x.float(), M.to_dense() @ x.float())
    torch.testing.assert_close(M.double() @ x, M.to_dense().double() @ x)


def test_sum_refuses_a_right_hand_side_of_another_dtype_in_every_operation():
    """A float32 sum (per-point noise) with a float64 right-hand side: its product raised torch's 'expected m1 and
    m2 to have the same dtype', its solve promoted to float64 and its inv_quad stayed float32. Now one TypeError."""
    from linear_operator.operators import DiagLinearOperator

    part = Partition.from_sizes([3, 3])
    S = BlockMeanLinearOperator(torch.ones(2), torch.eye(2), part) + DiagLinearOperator(torch.linspace(1, 2, 6))
    assert type(S).__name__ == "BlockMeanSumLinearOperator"
    x = torch.ones(6, 2, dtype=torch.float64)
    _refuses_float64_right_hand_sides(S, x)
    torch.testing.assert_close(S.solve(x.float()), torch.linalg.solve(S.to_dense(), x.float()))


def test_singleton_fold_keeps_the_entry_at_any_scale():
    # a singleton's visible entry v = lam + B_ii is all that matters; folding it as B_ii + (lam - 1) rounded past 2^53
    # (lam = 2^60, B_ii = -(2^60 + 256): C_ii came out -255 where v = -256 exactly)
    lam = torch.tensor([2.0**60, 1.0], dtype=torch.float64, requires_grad=True)
    B = torch.tensor([[-(2.0**60 + 256), 0.5], [0.5, 1.0]], dtype=torch.float64, requires_grad=True)
    M = BlockMeanLinearOperator(lam, B, Partition.from_sizes([1, 1]))
    dense = torch.tensor([[-256.0, 0.5], [0.5, 2.0]], dtype=torch.float64)
    assert torch.equal(M.to_dense(), dense)
    assert torch.equal(M.core()[1], dense)
    torch.testing.assert_close(M.eigvalsh(), torch.linalg.eigvalsh(dense), rtol=1e-14, atol=0)
    e0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(M.solve(e0), torch.linalg.solve(dense, e0), rtol=1e-14, atol=0)
    M.eigvalsh().sum().backward()  # the trace: d/dlam and d/dB_ii are 1 for each singleton's entry
    assert torch.equal(lam.grad, torch.ones(2, dtype=torch.float64))
    assert torch.equal(B.grad.diagonal(), torch.ones(2, dtype=torch.float64))
