"""A diagonal ``B`` (per-level variances, what GroupKernel builds): the operator's closed forms are elementwise.

Values and gradients against dense linear algebra, and proof that no ``k x k`` factorisation or eigendecomposition
runs. A leaf ``B`` that is diagonal only by value and needs gradients keeps the general path (its off-diagonal
entries have gradients).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import bma_gp
from bma_gp import BlockMeanLinearOperator, Partition

PARTITIONS = {
    "scattered": [2, 0, 1, 0, 3, 1, 1, 0, 2, 4, 1, 0],  # blocks 3 and 4 are singletons
    "contiguous": [0, 0, 0, 1, 1, 2, 3, 3, 3, 3],
    "all_singletons": [4, 2, 0, 1, 3],
}


def dense(lam, b, labels):
    labels = torch.as_tensor(labels)
    return torch.diag_embed(b)[..., labels, :][..., :, labels] + torch.diag_embed(lam[..., labels])


def make(labels, batch=(), dtype=torch.float64, seed=0, negative_lam=False):
    gen = torch.Generator().manual_seed(seed)
    k = Partition.from_labels(torch.tensor(labels)).num_blocks
    lam = torch.rand(*batch, k, generator=gen, dtype=torch.float64) + 0.3
    b = torch.rand(*batch, k, generator=gen, dtype=torch.float64) + 0.1
    if negative_lam:  # lam < 0 offset by b: still positive definite on singletons only
        lam = -lam
    return lam.to(dtype).requires_grad_(True), b.to(dtype).requires_grad_(True)


def no_factorisation():
    """Patch every k x k factorisation and eigendecomposition to raise."""

    def boom(*args, **kwargs):
        raise AssertionError("a k x k factorisation ran for a diagonal B")

    names = ["cholesky_ex", "cholesky", "eigh", "eigvalsh", "solve_ex", "solve", "slogdet", "solve_triangular"]
    patches = [mock.patch.object(torch.linalg, name, boom) for name in names]
    patches.append(mock.patch.object(torch, "cholesky_solve", boom))
    return patches


def tol(dtype):
    return {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}


@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(PARTITIONS))
def test_closed_forms_and_gradients_match_dense(name, dtype, batch):
    labels = PARTITIONS[name]
    partition = Partition.from_labels(torch.tensor(labels))
    lam, b = make(labels, batch, dtype)
    rhs = torch.randn(*batch, len(labels), 2, dtype=dtype)
    A = dense(lam.double(), b.double(), labels)

    def ours():
        M = BlockMeanLinearOperator(lam, torch.diag_embed(b), partition)
        assert M._diagonal_core()  # (patched to False for the general path's reference)
        quad, logdet = M.inv_quad_logdet(rhs, logdet=True)
        return {
            "solve": M.solve(rhs),
            "quad": quad,
            "logdet": logdet,
            "logdet_alone": M.logdet(),
            "sqrt": M.matrix_sqrt().to_dense(),
            "inv_sqrt": M.matrix_inv_sqrt().to_dense(),
            "log": M.matrix_log().to_dense(),
            "matmul": M @ rhs,
            "diag": M.diagonal(),
            "eigvalsh": M.eigvalsh(),
        }

    e, V = torch.linalg.eigh(A)
    fn = lambda f: (V * f(e).unsqueeze(-2)) @ V.mT  # noqa: E731
    want = {
        "solve": torch.linalg.solve(A, rhs.double()),
        "quad": (rhs.double() * torch.linalg.solve(A, rhs.double())).sum((-2, -1)),
        "logdet": torch.logdet(A),
        "logdet_alone": torch.logdet(A),
        "sqrt": fn(torch.sqrt),
        "inv_sqrt": fn(torch.rsqrt),
        "log": fn(torch.log),
        "matmul": A @ rhs.double(),
        "diag": torch.diagonal(A, dim1=-2, dim2=-1),
        "eigvalsh": e,
    }
    patches = no_factorisation()
    for p in patches:
        p.start()
    try:
        got = ours()
    finally:
        for p in patches:
            p.stop()
    for key, value in want.items():
        torch.testing.assert_close(got[key].double(), value, **tol(dtype), msg=key)
    # gradients with respect to lam and b: against dense autograd where it needs no eigendecomposition (its
    # backward divides by eigenvalue gaps, and lam_i is repeated), and against the general path (eigh with the
    # Daleckii-Krein backward, tested against dense elsewhere) for the matrix functions
    weights = {key: torch.randn(value.shape, dtype=torch.float64) for key, value in want.items()}
    plain = ["solve", "quad", "logdet", "logdet_alone", "matmul", "diag"]
    spectral = ["sqrt", "inv_sqrt", "log"]
    loss_ours = sum((got[key].double() * weights[key]).sum() for key in plain)
    loss_dense = sum((want[key] * weights[key]).sum() for key in plain)
    for got_g, want_g in zip(torch.autograd.grad(loss_ours, (lam, b)), torch.autograd.grad(loss_dense, (lam, b))):
        torch.testing.assert_close(got_g.double(), want_g.double(), **tol(dtype))
    got = ours()
    with mock.patch.object(BlockMeanLinearOperator, "_diagonal_core", lambda self, read_back=True: False):
        general = _general(lam, b, partition, rhs)
    loss_ours = sum((got[key].double() * weights[key]).sum() for key in spectral)
    loss_general = sum((general[key].double() * weights[key]).sum() for key in spectral)
    grads, want_grads = torch.autograd.grad(loss_ours, (lam, b)), torch.autograd.grad(loss_general, (lam, b))
    for got_g, want_g in zip(grads, want_grads):
        torch.testing.assert_close(got_g.double(), want_g.double(), **tol(dtype))


def _general(lam, b, partition, rhs):
    M = BlockMeanLinearOperator(lam, torch.diag_embed(b), partition)
    return {
        "sqrt": M.matrix_sqrt().to_dense(),
        "inv_sqrt": M.matrix_inv_sqrt().to_dense(),
        "log": M.matrix_log().to_dense(),
    }


def test_diagonal_by_value_without_gradients_takes_the_elementwise_path():
    labels = PARTITIONS["scattered"]
    lam, b = make(labels)
    M = BlockMeanLinearOperator(lam.detach(), torch.diag(b.detach()), Partition.from_labels(torch.tensor(labels)))
    assert M._diagonal_core()
    patches = no_factorisation()
    for p in patches:
        p.start()
    try:
        x = M.solve(torch.ones(len(labels), dtype=torch.float64))
    finally:
        for p in patches:
            p.stop()
    torch.testing.assert_close(x, torch.linalg.solve(dense(lam, b, labels), torch.ones(len(labels)).double()))


def test_a_leaf_that_is_diagonal_by_value_keeps_its_off_diagonal_gradients():
    labels = PARTITIONS["contiguous"]
    lam, b = make(labels)
    B = torch.diag(b.detach()).requires_grad_(True)  # a leaf: every entry is a parameter
    M = BlockMeanLinearOperator(lam.detach(), B, Partition.from_labels(torch.tensor(labels)))
    assert not M._diagonal_core()
    rhs = torch.randn(len(labels), dtype=torch.float64)
    (M.inv_quad(rhs) + M.logdet()).backward()
    B_ref = B.detach().clone().requires_grad_(True)
    A = torch.diag_embed(lam.detach()[torch.tensor(labels)]) + (0.5 * (B_ref + B_ref.mT))[labels][:, labels]
    (rhs @ torch.linalg.solve(A, rhs) + torch.logdet(A)).backward()
    assert B.grad is not None and bool((B.grad - torch.diag(torch.diagonal(B.grad))).abs().max() > 1e-3)
    torch.testing.assert_close(B.grad, B_ref.grad, rtol=1e-10, atol=1e-12)


def test_singular_and_indefinite_cores_are_named():
    partition = Partition.from_labels(torch.tensor([0, 0, 1, 1, 1]))
    lam = torch.tensor([1.0, 2.0], dtype=torch.float64)
    # block 0: c = lam + 2 b = 0 -> singular
    M = BlockMeanLinearOperator(lam, torch.diag(torch.tensor([-0.5, 1.0], dtype=torch.float64)), partition)
    with pytest.raises(ValueError, match="singular"):
        M.solve(torch.ones(5, dtype=torch.float64))
    # block 0: c = 1 - 2 = -1 -> indefinite: solvable, no log-determinant, no inverse square root
    M = BlockMeanLinearOperator(lam, torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64)), partition)
    x = M.solve(torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(M @ x, torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive definite|eigenvalue"):
        M.logdet()
    with pytest.raises(ValueError, match="eigenvalue"):
        M.matrix_inv_sqrt()
    with bma_gp.settings.validate(False):
        assert torch.isnan(M.logdet())


def test_group_kernel_training_step_has_no_k_by_k_factorisation():
    import gpytorch

    from bma_gp.kernels import GroupKernel

    torch.manual_seed(0)
    n, k = 400, 60
    x = torch.randint(0, k, (n, 1)).double()
    y = torch.randn(n, dtype=torch.float64)
    kernel = GroupKernel(num_groups=k).double()
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    K = kernel(x).evaluate_kernel()
    M = K.add_diagonal(likelihood.noise.squeeze(-1))
    assert isinstance(M, BlockMeanLinearOperator) and M._diagonal_core()
    patches = no_factorisation()
    for p in patches:
        p.start()
    try:
        quad, logdet = M.inv_quad_logdet(y.unsqueeze(-1), logdet=True)
        (quad + logdet).backward()
    finally:
        for p in patches:
            p.stop()
    dense_M = K.to_dense().detach() + likelihood.noise.detach() * torch.eye(n, dtype=torch.float64)
    ref = y @ torch.linalg.solve(dense_M, y) + torch.logdet(dense_M)
    torch.testing.assert_close(quad + logdet, ref, rtol=1e-10, atol=1e-10)
    assert kernel.raw_var.grad is not None and torch.isfinite(kernel.raw_var.grad).all()
