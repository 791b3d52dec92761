"""A diagonal ``B`` (per-level variances, what GroupKernel builds): the operator's closed forms are elementwise.

Values and gradients against dense linear algebra, and proof that no ``k x k`` factorisation or eigendecomposition
runs. A leaf ``B`` that is diagonal only by value and needs gradients keeps the general path (its off-diagonal
entries have gradients).
"""

from __future__ import annotations

import math
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


CONSTANT_TERMS = {
    "diag_embed(b) + W": lambda D, W: D + W,
    "W + diag_embed(b)": lambda D, W: W + D,
    "diag_embed(b) - W": lambda D, W: D - W + 2 * W.diagonal().sum() * torch.eye(W.shape[-1], dtype=W.dtype),
    "2 diag_embed(b) + W": lambda D, W: 2 * D + W,
    "(diag_embed(b) + W).mT": lambda D, W: (D + W).mT,
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("term", list(CONSTANT_TERMS))
def test_a_constant_off_diagonal_term_keeps_the_general_path(term, dtype):
    """``diag_embed(b) + W`` with a constant ``W``: the graph shows only the diagonal term, so ``B`` is not
    diagonal by construction; every closed form must keep ``W`` (it was dropped: to_dense right, the rest wrong)."""
    labels = PARTITIONS["scattered"]
    lam, b = make(labels, dtype=dtype)
    k = b.shape[-1]
    V = torch.randn(k, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    B = CONSTANT_TERMS[term](torch.diag_embed(b), V @ V.mT)
    M = BlockMeanLinearOperator(lam, B, Partition.from_labels(torch.tensor(labels)))
    assert not M._diagonal_core()
    idx = torch.tensor(labels)
    B_ref = B.detach().double().requires_grad_(True)
    A = torch.diag_embed(lam.detach().double()[idx]) + (0.5 * (B_ref + B_ref.mT))[idx][:, idx]
    rhs = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rtol, atol = (1e-10, 1e-11) if dtype == torch.float64 else (1e-4, 1e-4)
    torch.testing.assert_close(M.to_dense().double(), A, rtol=rtol, atol=atol)
    torch.testing.assert_close((M @ rhs.to(dtype)).double(), A @ rhs, rtol=rtol, atol=atol)
    torch.testing.assert_close(M.solve(rhs.to(dtype)).double(), torch.linalg.solve(A, rhs), rtol=rtol, atol=atol)
    torch.testing.assert_close(M.logdet().double(), torch.logdet(A), rtol=rtol, atol=atol)
    # gradients reach b through the diagonal only, as in dense
    M.logdet().backward()
    b_ref = b.detach().double().requires_grad_(True)
    B2 = CONSTANT_TERMS[term](torch.diag_embed(b_ref), (V @ V.mT).double())
    torch.logdet(torch.diag_embed(lam.detach().double()[idx]) + (0.5 * (B2 + B2.mT))[idx][:, idx]).backward()
    torch.testing.assert_close(b.grad.double(), b_ref.grad, rtol=rtol, atol=atol)


def test_a_constant_diagonal_term_keeps_the_elementwise_path():
    """``diag_embed(b) + c I`` (constant) is diagonal by construction and by value: elementwise, matches dense."""
    labels = PARTITIONS["contiguous"]
    lam, b = make(labels)
    k = b.shape[-1]
    M = BlockMeanLinearOperator(
        lam, torch.diag_embed(b) + 0.3 * torch.eye(k, dtype=torch.float64), Partition.from_labels(torch.tensor(labels))
    )
    assert M._diagonal_core()
    logdet = M.logdet()
    logdet.backward()
    b_ref = b.detach().clone().requires_grad_(True)
    torch.logdet(dense(lam.detach(), b_ref + 0.3, labels)).backward()
    torch.testing.assert_close(logdet, torch.logdet(dense(lam.detach(), b.detach() + 0.3, labels)))
    torch.testing.assert_close(b.grad, b_ref.grad)
    # a trainable factor scales a constant's off-diagonal entries (their gradient is W_ij even where scale = 0,
    # B diagonal by value): a product is strict about constants below it
    scale = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    B = (torch.diag_embed(b) + torch.ones(k, k, dtype=torch.float64)) * scale
    assert not bma_gp._diagonal.structurally_diagonal(B.grad_fn, constants=True)
    assert not BlockMeanLinearOperator(lam, B, Partition.from_labels(torch.tensor(labels)))._diagonal_core()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_kernel_with_a_frozen_factor_matches_dense(dtype):
    """GroupKernel(rank=2, per_group_variance=True) with ``covar_factor`` frozen: B = diag(v) + W W^T with a
    constant W. It was taken as diagonal, dropping W W^T from matmul, solve and logdet."""
    import gpytorch

    from bma_gp.kernels import GroupKernel

    gen = torch.Generator().manual_seed(0)
    G, n = 6, 40
    ids = torch.cat([torch.arange(G), torch.randint(0, G, (n - G,), generator=gen)]).to(dtype).unsqueeze(-1)
    kernel = GroupKernel(G, rank=2, per_group_variance=True).to(dtype)
    kernel.covar_factor.requires_grad_(False)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        K = kernel(ids)
        assert isinstance(K, BlockMeanLinearOperator)
        noisy = K.add_diagonal(torch.tensor(0.1, dtype=dtype))
        A = K.to_dense().detach().double() + 0.1 * torch.eye(n, dtype=torch.float64)
        rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1e-4)
        torch.testing.assert_close((K @ y.to(dtype)).double(), K.to_dense().detach().double() @ y, rtol=rtol, atol=atol)
        torch.testing.assert_close(noisy.solve(y.to(dtype)).double(), torch.linalg.solve(A, y), rtol=rtol, atol=atol)
        torch.testing.assert_close(noisy.logdet().double(), torch.logdet(A), rtol=rtol, atol=atol)


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


def _assert_same_values_and_gradients(ops, vec, full, leaves):
    """Every ``fn`` of ``ops`` gives the same value on both operators, and the same gradients to ``leaves``."""
    for key, fn in ops.items():
        got, want = fn(vec), fn(full)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=key)
        got_g = torch.autograd.grad(got.sum(), leaves, allow_unused=True)
        want_g = torch.autograd.grad(want.sum(), leaves, allow_unused=True)
        for g, w in zip(got_g, want_g):
            assert (g is None) == (w is None), key
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=key)


# ---------------------------------------------------------------------------- diagonal=True: B held as a vector
def _pair(labels, batch=(), dtype=torch.float64, seed=3):
    lam, b = make(labels, batch, dtype, seed)
    partition = Partition.from_labels(torch.tensor(labels))
    vec = BlockMeanLinearOperator(lam, b, partition, diagonal=True)
    full = BlockMeanLinearOperator(lam, torch.diag_embed(b), partition)
    return vec, full, lam, b


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("name", list(PARTITIONS))
def test_diagonal_mode_matches_the_dense_b_and_never_forms_it(name, batch):
    labels = PARTITIONS[name]
    vec, full, lam, b = _pair(labels, batch)
    n = len(labels)
    rhs = torch.randn(*batch, n, 2, dtype=torch.float64)
    ops = {
        "solve": lambda M: M.solve(rhs),
        "inv_quad_logdet": lambda M: torch.stack(M.inv_quad_logdet(rhs, logdet=True)),
        "sqrt": lambda M: M.matrix_sqrt() @ rhs,
        "inv_sqrt": lambda M: M.matrix_inv_sqrt() @ rhs,
        "inverse": lambda M: M.inverse() @ rhs,
        "matmul": lambda M: M @ rhs,
        "diagonal": lambda M: M.diagonal(),
        "eigvalsh": lambda M: M.eigvalsh(),
        "scaled": lambda M: (M * 2.5) @ rhs,
        "noise": lambda M: M.add_diagonal(torch.tensor(0.3, dtype=torch.float64)).logdet(),
        "expanded": lambda M: M._expand_batch((3, *batch)) @ rhs,
    }
    _assert_same_values_and_gradients(ops, vec, full, (lam, b))
    assert vec._B is None  # none of the above formed the k x k matrix
    torch.testing.assert_close(vec.to_dense(), full.to_dense())  # asked for explicitly: formed on demand
    assert torch.equal(vec.B, torch.diag_embed(b))


def _diagonal_mode_algebra(batch):
    """``name: (fn(M, M2), result in diagonal mode when both operands are)`` for two operators of one partition."""
    rows, cols = torch.tensor([3, 1, 0, 4]), torch.tensor([5, 1, 0, 4])
    ops = {
        "sum": (lambda M, M2: M + M2, True),
        "product": (lambda M, M2: M @ M2, True),
        "hadamard": (lambda M, M2: M * M2, True),
        "slice": (lambda M, M2: M[..., 1:7, 1:7], True),
        "stepped slice": (lambda M, M2: M[..., 0:9:2, 0:9:2], True),
        "entries": (lambda M, M2: M[..., rows, cols], None),
    }
    if batch:
        ops["batch sum"] = (lambda M, M2: M.sum(0), True)
        ops["batch prod"] = (lambda M, M2: (M + M2).prod(0), True)
    return ops


def _as_dense(res):
    return res if torch.is_tensor(res) else res.to_dense()


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["scattered", "contiguous"])
def test_diagonal_mode_algebra_stays_diagonal_and_matches_dense(name, dtype, batch):
    """``+``, ``@``, ``*``, principal slices, entries and batch sums/products of diagonal-mode operators: the
    result is again diagonal mode (no k x k matrix), with the values and gradients of dense algebra."""
    labels = PARTITIONS[name]
    vec, full, lam, b = _pair(labels, batch, dtype)
    vec2, full2, lam2, b2 = _pair(labels, batch, dtype, seed=4)
    leaves = (lam, b, lam2, b2)
    idx = torch.tensor(labels)
    for key, (fn, diagonal) in _diagonal_mode_algebra(batch).items():
        got, want = fn(vec, vec2), fn(full, full2)
        if diagonal:
            assert isinstance(got, BlockMeanLinearOperator) and got.is_diagonal_mode and got._B is None, key
            assert vec._B is None and vec2._B is None, key
        D1 = dense(lam.double(), b.double(), idx)
        D2 = dense(lam2.double(), b2.double(), idx)
        ref = _as_dense(fn(D1, D2)) if key not in ("product", "hadamard", "batch prod") else None
        if key == "product":
            ref = D1 @ D2
        elif key == "hadamard":
            ref = D1 * D2
        elif key == "batch prod":
            ref = (D1 + D2).prod(0)
        got_d = _as_dense(got)
        torch.testing.assert_close(got_d.double(), ref.detach(), **tol(dtype), msg=key)
        torch.testing.assert_close(got_d, _as_dense(want), **tol(dtype), msg=key)
        w = torch.randn(got_d.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
        got_g = torch.autograd.grad((got_d * w).sum(), leaves, allow_unused=True)
        want_g = torch.autograd.grad((_as_dense(want) * w).sum(), leaves, allow_unused=True)
        for g, r in zip(got_g, want_g):
            assert (g is None) == (r is None), key
            if g is not None:
                torch.testing.assert_close(g, r, **tol(dtype), msg=key)


def test_diagonal_mode_with_a_full_core_matches_dense():
    """A diagonal-mode operator with a full-core one: ``+`` and ``@`` genuinely need the k x k matrix, while
    ``*`` (diag(b) * B2 = diag(b * diag(B2))) stays diagonal."""
    labels = PARTITIONS["scattered"]
    vec, _, lam, b = _pair(labels)
    k = b.shape[-1]
    V = torch.randn(k, k, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    other = BlockMeanLinearOperator(lam.detach() + 1, V @ V.mT, vec.partition)
    D1, D2 = vec.to_dense(), other.to_dense()
    for M, M2 in ((vec, other), (other, vec)):
        torch.testing.assert_close((M + M2).to_dense(), D1 + D2 if M is vec else D2 + D1)
        torch.testing.assert_close((M @ M2).to_dense(), D1 @ D2 if M is vec else D2 @ D1)
        had = M * M2
        assert isinstance(had, BlockMeanLinearOperator) and had.is_diagonal_mode
        torch.testing.assert_close(had.to_dense(), D1 * D2)


@pytest.mark.parametrize("batch", [(), (2,)])
def test_diagonal_mode_algebra_forms_no_k_by_k_matrix(batch):
    """The same algebra with k = 3000 blocks: no k x k tensor is formed (it was, for each of them)."""
    from largest_tensor import LargestTensor

    k, n = 3000, 6000
    partition = Partition.from_labels(torch.arange(n) % k)
    gen = torch.Generator().manual_seed(0)
    lam, b, lam2, b2 = (torch.rand(*batch, k, generator=gen, dtype=torch.float64) + 0.5 for _ in range(4))
    M = BlockMeanLinearOperator(lam, b, partition, diagonal=True)
    M2 = BlockMeanLinearOperator(lam2, b2, partition, diagonal=True)
    x = torch.randn(*batch, n, 1, generator=gen, dtype=torch.float64)
    rows = torch.arange(0, n, 7)
    cols = torch.cat([rows[: len(rows) // 2] % k, rows[len(rows) // 2 :].flip(0)])  # same blocks, then others
    with LargestTensor(square=k) as mode:
        results = {key: fn(M, M2) for key, (fn, _) in _diagonal_mode_algebra(batch).items()}
        entries = M[..., rows, cols]
        sums = (M + M2) @ x, (M @ M2) @ x, (M * M2).diagonal()
    assert mode.squares == [] and mode.largest <= 4 * n, (mode.squares, mode.where)
    # values against the operands (both M2(n)): no dense n x n reference at this size
    torch.testing.assert_close(sums[0], M @ x + M2 @ x)
    torch.testing.assert_close(sums[1], M @ (M2 @ x))
    torch.testing.assert_close(sums[2], M.diagonal() * M2.diagonal())
    labels = partition.labels
    zero = torch.zeros(*batch, len(rows), dtype=torch.float64)
    want = torch.where(labels[rows] == labels[cols], b[..., labels[rows]], zero)
    want = want + torch.where(rows == cols, lam[..., labels[rows]], zero)
    assert bool((labels[rows] == labels[cols]).any()) and bool((labels[rows] != labels[cols]).any())
    torch.testing.assert_close(entries, want)
    for key, res in results.items():
        assert torch.is_tensor(res) or (res.is_diagonal_mode and res._B is None), key


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(PARTITIONS))
def test_schur_complement_of_diagonal_cores_is_elementwise_and_matches_dense(name, dtype, batch):
    """``K - A N^-1 A^T`` (the posterior at the training inputs of a random-intercept model) for three diagonal
    cores: values, its square root and gradients against dense algebra, with every k x k factorisation patched to
    raise, and the result held in diagonal mode (no k x k matrix)."""
    labels = PARTITIONS[name]
    partition = Partition.from_labels(torch.tensor(labels))
    n = len(labels)
    lam, b = make(labels, batch, dtype, seed=5)
    lam_a, b_a = make(labels, batch, dtype, seed=6)
    noise = torch.tensor(0.4, dtype=dtype, requires_grad=True)
    K = BlockMeanLinearOperator(lam, b, partition, diagonal=True)
    A = BlockMeanLinearOperator(0.5 * lam_a, 0.5 * b_a, partition, diagonal=True)  # K - A N^-1 A stays >= 0
    rhs = torch.randn(*batch, n, 2, dtype=dtype)
    patches = no_factorisation()
    for p in patches:
        p.start()
    try:
        S = K.schur_complement(A, K.add_diagonal(noise))
        got = {"S": S.to_dense(), "sqrt": S.matrix_sqrt() @ rhs}
    finally:
        for p in patches:
            p.stop()
    assert S.is_diagonal_mode and S._B is None and S.symmetric and S.dtype == dtype
    Kd, Ad = dense(lam.double(), b.double(), labels), dense(0.5 * lam_a.double(), 0.5 * b_a.double(), labels)
    Nd = Kd + noise.double() * torch.eye(n, dtype=torch.float64)
    want_S = Kd - Ad @ torch.linalg.solve(Nd, Ad.mT)
    e, V = torch.linalg.eigh(want_S)
    assert float(e.min().detach()) > -1e-12  # a covariance: the square root exists
    want = {"S": want_S, "sqrt": (V * e.clamp_min(0).sqrt().unsqueeze(-2)) @ V.mT @ rhs.double()}
    for key in want:
        torch.testing.assert_close(got[key].double(), want[key], **tol(dtype), msg=key)
    leaves = (lam, b, lam_a, b_a, noise)
    w = torch.randn(want_S.shape, dtype=torch.float64)
    got_g = torch.autograd.grad((got["S"].double() * w).sum(), leaves)
    want_g = torch.autograd.grad((want_S * w).sum(), leaves)
    for key, g, ref in zip(["lam", "b", "lam_a", "b_a", "noise"], got_g, want_g):
        torch.testing.assert_close(g.double(), ref.double(), **tol(dtype), msg=lambda m, key=key: f"{key}: {m}")


def test_schur_complement_of_diagonal_cores_validates_like_the_general_path():
    labels = PARTITIONS["scattered"]
    K, _, _, _ = _pair(labels)
    with pytest.raises(ValueError, match="schur_complement needs a positive definite"):
        K.schur_complement(K, K * -1.0)
    bad = BlockMeanLinearOperator(K.lam.detach(), K._b_vector().detach().clone(), K.partition, diagonal=True)
    bad._b_diag[1] = float("nan")
    with pytest.raises(ValueError, match=r"B\[1, 1\] = nan"):
        K.schur_complement(bad, K)
    # the elementwise result equals the general path's on the same operators (dense B, no gradients)
    with torch.no_grad():
        N = K.add_diagonal(torch.tensor(0.2, dtype=torch.float64))
        fast = K.schur_complement(K, N)
        with mock.patch.object(BlockMeanLinearOperator, "_diagonal_core", lambda self, read_back=True: False):
            slow = K.schur_complement(K, N)
    assert fast.is_diagonal_mode and not slow.is_diagonal_mode
    torch.testing.assert_close(fast.to_dense(), slow.to_dense(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fast._rounding, slow._rounding, rtol=1.0, atol=0.0)  # the same order of magnitude


def test_diagonal_mode_survives_conversions_and_products_with_gradients():
    vec, full, lam, b = _pair(PARTITIONS["scattered"])
    assert vec.to(torch.float32).is_diagonal_mode and vec.to(torch.float32).dtype == torch.float32
    assert vec.add_diagonal(torch.tensor(0.5, dtype=torch.float64)).is_diagonal_mode
    assert vec.inverse().is_diagonal_mode and vec.matrix_sqrt().is_diagonal_mode
    x = torch.randn(len(PARTITIONS["scattered"]), 3, dtype=torch.float64, requires_grad=True)
    # linear_operator's Matmul autograd function: the operator's gradient comes from _bilinear_derivative
    got = torch.autograd.grad((vec.matmul(x) ** 2).sum(), (lam, b, x))
    want = torch.autograd.grad((full.matmul(x) ** 2).sum(), (lam, b, x))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_diagonal_mode_input_errors_name_the_argument():
    partition = Partition.from_labels(torch.tensor([0, 0, 1]))
    lam = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="diagonal=True"):
        BlockMeanLinearOperator(lam, torch.ones(3, dtype=torch.float64), partition, diagonal=True)
    with pytest.raises(TypeError, match="diagonal"):
        BlockMeanLinearOperator(lam, lam, partition, diagonal=1)
    M = BlockMeanLinearOperator(lam, torch.tensor([1.0, float("nan")], dtype=torch.float64), partition, diagonal=True)
    with pytest.raises(ValueError, match=r"B\[1, 1\] = nan"):
        M.logdet()


def _random_intercept_model(x, y, likelihood, k):
    """An ExactGP with a constant mean and ``GroupKernel(k, per_group_variance=True)``, float64."""
    import gpytorch

    from bma_gp.kernels import GroupKernel

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = GroupKernel(k, per_group_variance=True)

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), self.covar_module(inputs))

    return Model().double()


def _watched_diag_embed(k):
    """``(formed, watch, real)``: ``watch`` stands in for ``torch.diag_embed`` (``real``) and records in ``formed``
    every embedding of at least ``k / 2`` values."""
    formed: list[tuple[int, ...]] = []
    real = torch.diag_embed

    def watch(values, *args, **kwargs):
        if values.shape[-1] >= k // 2:
            formed.append(tuple(values.shape))
        return real(values, *args, **kwargs)

    return formed, watch, real


def test_group_kernel_with_many_groups_never_forms_a_k_by_k_matrix(monkeypatch):
    import gpytorch

    k, n = 1500, 3000
    formed, watch, real = _watched_diag_embed(k)

    torch.manual_seed(1)
    x = torch.randint(0, k, (n, 1)).double()
    y = torch.randn(n, dtype=torch.float64)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()

    model = _random_intercept_model(x, y, likelihood, k)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    monkeypatch.setattr(torch, "diag_embed", watch)
    loss = -mll(model(x), y)
    loss.backward()
    monkeypatch.setattr(torch, "diag_embed", real)
    assert formed == []
    # the same loss from the dense covariance
    covar = model.covar_module(x).to_dense().detach() + likelihood.noise.detach() * torch.eye(n, dtype=torch.float64)
    resid = y - model.mean_module.constant.detach()
    dense_loss = 0.5 * (resid @ torch.linalg.solve(covar, resid) + torch.logdet(covar) + n * math.log(2 * math.pi)) / n
    torch.testing.assert_close(loss.detach(), dense_loss, rtol=1e-9, atol=1e-9)
    assert model.covar_module.raw_var.grad is not None and bool(torch.isfinite(model.covar_module.raw_var.grad).all())

    # prediction at new inputs (seen and unseen groups) forms no k x k matrix either, and matches dense algebra
    model.eval()
    x_test = torch.cat([x[:40], torch.full((5, 1), float(k - 1))])  # the last id may be unseen
    monkeypatch.setattr(torch, "diag_embed", watch)
    with torch.no_grad(), gpytorch.settings.fast_pred_var(False):
        pred = model(x_test)
        mean, var = pred.mean, pred.variance
    monkeypatch.setattr(torch, "diag_embed", real)
    assert formed == []
    with torch.no_grad():
        K_tx = model.covar_module(x_test, x).to_dense()
        K_tt = model.covar_module(x_test).to_dense()
        want_mean = model.mean_module.constant + K_tx @ torch.linalg.solve(covar, resid)
        want_var = torch.diagonal(K_tt - K_tx @ torch.linalg.solve(covar, K_tx.mT))
    torch.testing.assert_close(mean, want_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(var, want_var, rtol=1e-8, atol=1e-10)

    # at the training inputs (fitted values, posterior draws): the Schur complement of three diagonal cores, so
    # no k x k matrix either (it formed and factorised k x k cores: 10 s and O(k^2) memory at 5000 groups)
    monkeypatch.setattr(torch, "diag_embed", watch)
    with torch.no_grad():
        post = model(x)
        train_var = post.variance
        draws = likelihood(post).rsample(torch.Size([2]))
    monkeypatch.setattr(torch, "diag_embed", real)
    assert formed == []
    assert draws.shape == (2, n) and bool(torch.isfinite(draws).all())
    with torch.no_grad():
        K_xx = model.covar_module(x).to_dense()
        want_train = torch.diagonal(K_xx - K_xx @ torch.linalg.solve(covar, K_xx))
    torch.testing.assert_close(train_var, want_train, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------- sums with diagonal blocks
def _sum_pair(seed=0, batch=()):
    """The same crossed sum ``diag(d) + P_1 B_1 P_1^T + P_2 diag(b_2) P_2^T``, with ``b_2`` given as a vector
    (``diagonal=[False, True]``) and as ``diag_embed(b_2)``."""
    from bma_gp import BlockMeanSumLinearOperator

    gen = torch.Generator().manual_seed(seed)
    n, k1, k2 = 40, 3, 11
    p1 = Partition.from_labels(torch.randperm(n, generator=gen) % k1)
    p2 = Partition.from_labels(torch.unique(torch.randint(0, k2, (n,), generator=gen), return_inverse=True)[1])
    k2 = p2.num_blocks
    W = torch.randn(*batch, k1, k1, generator=gen, dtype=torch.float64)
    B1 = (W @ W.mT / k1).requires_grad_(True)
    b2 = (torch.rand(*batch, k2, generator=gen, dtype=torch.float64) + 0.2).requires_grad_(True)
    d = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    vec = BlockMeanSumLinearOperator(d, B1, b2, partitions=[p1, p2], diagonal=[False, True])
    full = BlockMeanSumLinearOperator(d, B1, torch.diag_embed(b2), partitions=[p1, p2])
    return vec, full, (d, B1, b2)


@pytest.mark.parametrize("batch", [(), (2,)])
def test_sum_with_a_diagonal_block_matches_the_dense_block(batch):
    vec, full, leaves = _sum_pair(batch=batch)
    n = vec.shape[-1]
    rhs = torch.randn(*batch, n, 2, dtype=torch.float64)
    ops = {
        "inv_quad_logdet": lambda M: torch.stack(M.inv_quad_logdet(rhs, logdet=True)),
        "solve": lambda M: M.solve(rhs),
        "matmul": lambda M: M @ rhs,
        "diagonal": lambda M: M.diagonal(),
        "entries": lambda M: M[..., 3:9, 2:7].to_dense(),
        "root": lambda M: M.root_decomposition().root.to_dense() @ M.root_decomposition().root.to_dense().mT,
        "scaled": lambda M: (M * 1.7) @ rhs,
        "noise": lambda M: M.add_diagonal(torch.tensor(0.2, dtype=torch.float64)).logdet(),
        "expanded": lambda M: M._expand_batch((3, *batch)) @ rhs,
    }
    _assert_same_values_and_gradients(ops, vec, full, leaves)
    assert vec._dense_blocks[1] is None  # none of the above formed diag(b_2) (root_decomposition forms its root)
    torch.testing.assert_close(vec.blocks[1], torch.diag_embed(leaves[2]))  # asked for: formed on demand


def test_sum_diagonal_flags_are_checked():
    from bma_gp import BlockMeanSumLinearOperator

    vec, _, (d, B1, b2) = _sum_pair()
    with pytest.raises(ValueError, match="one flag per partition"):
        BlockMeanSumLinearOperator(d, B1, b2, partitions=vec.partitions, diagonal=[True])
    with pytest.raises(ValueError, match=r"blocks\[1\] is given as its diagonal"):
        BlockMeanSumLinearOperator(d, B1, b2[:-1], partitions=vec.partitions, diagonal=[False, True])


def test_crossed_group_kernels_keep_their_variances_as_vectors(monkeypatch):
    from bma_gp import BlockMeanSumLinearOperator
    from bma_gp.kernels import GroupKernel

    ka, kb, n = 40, 1200, 3000
    torch.manual_seed(2)
    x = torch.stack([torch.randint(0, ka, (n,)), torch.randint(0, kb, (n,))], -1).double()
    y = torch.randn(n, dtype=torch.float64)
    kernel = (
        GroupKernel(ka, active_dims=[0], per_group_variance=True).double() + GroupKernel(kb, active_dims=[1]).double()
    )
    noise = torch.tensor(0.3, dtype=torch.float64)
    formed = []
    real = torch.diag_embed

    def watch(values, *args, **kwargs):
        if values.shape[-1] >= kb // 2:
            formed.append(tuple(values.shape))
        return real(values, *args, **kwargs)

    monkeypatch.setattr(torch, "diag_embed", watch)
    M = kernel(x).add_diagonal(noise)
    assert isinstance(M, BlockMeanSumLinearOperator) and M.diagonal_blocks == (True, True)
    quad, logdet = M.inv_quad_logdet(y.unsqueeze(-1), logdet=True)
    (quad + logdet).backward()
    monkeypatch.setattr(torch, "diag_embed", real)
    assert formed == []
    dense = kernel(x).to_dense().detach() + noise * torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(
        quad + logdet, y @ torch.linalg.solve(dense, y) + torch.logdet(dense), rtol=1e-10, atol=0
    )
    for k in kernel.kernels:
        assert k.raw_var.grad is not None and bool(torch.isfinite(k.raw_var.grad).all())


def test_group_kernel_with_per_point_noise_keeps_its_variances_as_a_vector(monkeypatch):
    """One GroupKernel with FixedNoiseGaussianLikelihood: the posterior at the training inputs goes through the sums'
    closed form, and the grouping's variances stay a vector there (it formed the k x k B: 1.2 s at 5000 groups)."""
    import gpytorch

    k, n = 1500, 3000
    formed, watch, real = _watched_diag_embed(k)

    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, k, (n, 1), generator=gen).double()
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    noise = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5 + 0.1
    likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise).double()

    model = _random_intercept_model(x, y, likelihood, k).eval()
    monkeypatch.setattr(torch, "diag_embed", watch)
    with torch.no_grad():
        var = model(x).variance
    monkeypatch.setattr(torch, "diag_embed", real)
    assert formed == []
    with torch.no_grad():
        K = model.covar_module(x).to_dense()
        want = torch.diagonal(K - K @ torch.linalg.solve(K + torch.diag(noise), K))
    torch.testing.assert_close(var, want, rtol=1e-8, atol=1e-10)


def test_schur_complement_names_a_non_symmetric_other():
    labels = PARTITIONS["scattered"]
    K, _, _, _ = _pair(labels)
    k = K.partition.num_blocks
    B = torch.randn(k, k, dtype=K.dtype, generator=torch.Generator().manual_seed(0))
    other = BlockMeanLinearOperator(K.lam.detach(), B, K.partition, symmetric=False)
    with pytest.raises(ValueError, match="schur_complement's other.*symmetric=False"):
        K.schur_complement(K, other)


def test_whole_block_matrix_with_diagonal_true_warns_batch_reading():
    """``diagonal=True`` with a ``(k, k)`` B and unbatched lam reads B as a batch of k diagonals: warned, as that
    is what a whole block matrix passed by mistake looks like; a batched lam (an intended batch) is silent."""
    k = 3
    partition = Partition.from_labels(torch.tensor([0, 1, 2, 1]))
    B = torch.eye(k, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"batch of 3 diagonals.*torch.diagonal\(B\)"):
        op = BlockMeanLinearOperator(torch.ones(k, dtype=torch.float64), B, partition, diagonal=True)
    assert op.batch_shape == (k,)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BlockMeanLinearOperator(torch.ones(k, k, dtype=torch.float64), B, partition, diagonal=True)
        BlockMeanLinearOperator(
            torch.ones(k, dtype=torch.float64), torch.ones(k, dtype=torch.float64), partition, diagonal=True
        )
