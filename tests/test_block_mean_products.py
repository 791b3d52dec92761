"""Matrix products of block mean operators over two partitions, and elementwise products of sums.

``M @ N`` over different partitions of the same points is a :class:`~bma_gp.BlockMeanProductLinearOperator`: solve,
log-determinant, inverse quadratic form, products, diagonal, entries and transpose against dense float64 references,
with no dense factorisation of size ``n`` and no CG (``closed_forms_only``); roots raise. ``S * X`` for a
:class:`~bma_gp.BlockMeanSumLinearOperator` and anything but a block mean operator, a diagonal or a number has no
closed form and warns.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from linear_operator.operators import DenseLinearOperator, DiagLinearOperator, MatmulLinearOperator

from bma_gp import (
    BlockMeanLinearOperator,
    BlockMeanProductLinearOperator,
    BlockMeanSumLinearOperator,
    ClosedFormFallbackWarning,
    FallbackSumLinearOperator,
    Partition,
)
from closed_form_guard import closed_forms_only

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-10
N_POINTS = 9

# (labels of M, labels of N): scattered labels, unequal sizes, singleton blocks, one partition finer than the other
LABELS = {
    "scattered": ([2, 0, 1, 2, 0, 1, 1, 2, 0], [0, 1, 1, 0, 2, 2, 3, 3, 0]),
    "singletons": ([0, 1, 2, 3, 3, 3, 3, 4, 4], [0, 0, 0, 0, 1, 2, 3, 4, 5]),
    "unequal": ([0, 0, 0, 0, 0, 0, 1, 1, 2], [1, 0, 1, 0, 1, 0, 1, 0, 1]),
    "nested": ([0, 0, 1, 1, 2, 2, 3, 3, 4], [0, 0, 0, 0, 1, 1, 1, 1, 1]),
}


def partitions(name: str) -> tuple[Partition, Partition]:
    first, second = LABELS[name]
    return Partition.from_labels(torch.tensor(first)), Partition.from_labels(torch.tensor(second))


def operator(partition: Partition, *, kind: str = "spd", batch=(), dtype=torch.float64, seed: int = 0):
    """A block mean operator: ``spd`` (positive definite), ``nonsym`` (``symmetric=False``, any ``B``) or ``diag``
    (diagonal mode)."""
    gen = torch.Generator().manual_seed(seed)
    k = partition.num_blocks
    lam = (torch.rand(*batch, k, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    if kind == "diag":
        return BlockMeanLinearOperator(lam, torch.rand(*batch, k, generator=gen, dtype=torch.float64).to(dtype),
                                       partition, diagonal=True)  # fmt: skip
    A = torch.randn(*batch, k, k, generator=gen, dtype=torch.float64)
    if kind == "nonsym":
        return BlockMeanLinearOperator(lam, (0.3 * A).to(dtype), partition, symmetric=False)
    return BlockMeanLinearOperator(lam, (A @ A.mT / k).to(dtype), partition)


def dense64(op) -> torch.Tensor:
    return op.to_dense().to(torch.float64)


def close(actual, expected, rtol=RTOL):
    actual = actual.to(torch.float64)
    finite = expected[torch.isfinite(expected)]
    atol = rtol * max(float(finite.abs().max()) if finite.numel() else 0.0, 1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)  # logdet: NaN for det < 0


# ---------------------------------------------------------------------------- the type of M @ N
def test_product_over_two_partitions_is_closed_form_product():
    p1, p2 = partitions("scattered")
    M, N = operator(p1), operator(p2, seed=1)
    P = M @ N
    assert type(P) is BlockMeanProductLinearOperator
    assert isinstance(P, MatmulLinearOperator)  # what linear_operator code expects of a product
    assert type(M.matmul(N)) is BlockMeanProductLinearOperator
    close(P.to_dense(), dense64(M) @ dense64(N))


def test_product_over_one_partition_stays_block_mean():
    p1, _ = partitions("scattered")
    M, N = operator(p1), operator(p1, seed=1)
    assert type(M @ N) is BlockMeanLinearOperator


def test_chained_products_merge_factors_over_one_partition():
    p1, p2 = partitions("unequal")
    M, N, R, Q = operator(p1), operator(p2, seed=1), operator(p2, seed=2), operator(p1, seed=3)
    right = (M @ N) @ R  # M (N R)
    left = Q @ (M @ N)  # (Q M) N
    for P, expected in ((right, dense64(M) @ dense64(N) @ dense64(R)), (left, dense64(Q) @ dense64(M) @ dense64(N))):
        assert type(P) is BlockMeanProductLinearOperator
        assert all(type(f) is BlockMeanLinearOperator for f in (P.left_linear_op, P.right_linear_op))
        close(P.to_dense(), expected)
        b = torch.randn(N_POINTS, dtype=torch.float64)
        close(P.solve(b), torch.linalg.solve(expected, b), rtol=1e-9)


# ---------------------------------------------------------------------------- dense references
KINDS = [("spd", "spd"), ("nonsym", "spd"), ("spd", "nonsym"), ("diag", "diag"), ("diag", "spd"), ("nonsym", "diag")]


@pytest.mark.parametrize("name", sorted(LABELS))
@pytest.mark.parametrize("kinds", KINDS, ids=lambda k: "-".join(k))
def test_closed_forms_match_dense(name, kinds):
    p1, p2 = partitions(name)
    M, N = operator(p1, kind=kinds[0]), operator(p2, kind=kinds[1], seed=1)
    P = M @ N
    D = dense64(M) @ dense64(N)
    n = N_POINTS
    B = torch.randn(n, 3, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    L = torch.randn(2, n, dtype=torch.float64)
    with closed_forms_only(n):  # no dense factorisation of size n, no CG / Lanczos
        solve, solve_vec, solve_left = P.solve(B), P.solve(b), P.solve(B, L)
        logdet = P.logdet()
        inv_quad, logdet2 = P.inv_quad_logdet(B, logdet=True)
        inv_quad_cols, _ = P.inv_quad_logdet(B, logdet=False, reduce_inv_quad=False)
        diag = P.diagonal()
        product, product_vec = P @ B, P.matmul(b)
        transposed = P.mT
        t_solve = transposed.solve(B)
        entries = P[..., 2, 5], P[..., 4, 4]
        inverse = P.inverse()
    close(solve, torch.linalg.solve(D, B))
    close(solve_vec, torch.linalg.solve(D, b))
    close(solve_left, L @ torch.linalg.solve(D, B))
    close(logdet, torch.logdet(D))
    close(logdet2, torch.logdet(D))
    quad = (B * torch.linalg.solve(D, B)).sum(-2)
    close(inv_quad, quad.sum())
    close(inv_quad_cols, quad)
    close(diag, D.diagonal())
    close(product, D @ B)
    close(product_vec, D @ b)
    assert type(transposed) is BlockMeanProductLinearOperator
    close(transposed.to_dense(), D.mT)
    close(t_solve, torch.linalg.solve(D.mT, B))
    close(entries[0], D[2, 5])
    close(entries[1], D[4, 4])
    close(inverse.to_dense(), torch.linalg.inv(D), rtol=1e-9)


def test_entries_match_dense():
    p1, p2 = partitions("singletons")
    for kinds in KINDS:
        M, N = operator(p1, kind=kinds[0], batch=(2,)), operator(p2, kind=kinds[1], seed=1, batch=(2,))
        P = M @ N
        D = dense64(M) @ dense64(N)
        rows = torch.tensor([0, 3, 8, 5, 5])
        cols = torch.tensor([0, 4, 1, 5, 7])
        batch = torch.tensor([0, 1, 1, 0, 1])
        close(P._get_indices(rows, cols, batch), D[batch, rows, cols])
        sub = P[1]
        assert type(sub) is BlockMeanProductLinearOperator
        close(sub.to_dense(), D[1])


def test_logdet_follows_torch_sign_semantics():
    """det(MN) < 0 gives NaN (torch.logdet); two negative determinants give a finite log-determinant."""
    p1, p2 = partitions("unequal")
    # lam_0 < 0 on a block of 6 points: eigenvalue lam_0 of odd multiplicity 5, the core stays positive definite
    lam = torch.tensor([-0.5, 1.0, 2.0], dtype=torch.float64)
    negative = BlockMeanLinearOperator(lam, torch.eye(3, dtype=torch.float64) * 3.0, p1)
    positive = operator(p2)
    lam2 = torch.tensor([-0.7, 1.5], dtype=torch.float64)  # blocks of 4 and 5 points: multiplicity 3 is odd
    negative2 = BlockMeanLinearOperator(lam2, torch.eye(2, dtype=torch.float64) * 2.0, p2)
    assert float(torch.linalg.det(negative.to_dense())) < 0
    one = negative @ positive
    assert torch.isnan(torch.logdet(dense64(one)))
    assert torch.isnan(one.logdet())
    both = negative @ negative2
    D = dense64(both)
    assert float(torch.linalg.det(D)) > 0
    close(both.logdet(), torch.logdet(D))
    close(both.inv_quad_logdet(torch.ones(N_POINTS, 1, dtype=torch.float64), logdet=True)[1], torch.logdet(D))
    singular = BlockMeanLinearOperator(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.eye(3).double(), p1)
    assert float((singular @ positive).logdet()) == float("-inf")


# ---------------------------------------------------------------------------- batches, float32
def test_batches_broadcast():
    p1, p2 = partitions("scattered")
    M = operator(p1, batch=(2, 1))
    N = operator(p2, seed=1, batch=(3,))
    P = M @ N
    assert P.shape == torch.Size((2, 3, N_POINTS, N_POINTS))
    D = dense64(M) @ dense64(N)
    B = torch.randn(N_POINTS, 2, dtype=torch.float64)
    with closed_forms_only(N_POINTS):
        solve, logdet, diag = P.solve(B), P.logdet(), P.diagonal()
        inv_quad, logdet2 = P.inv_quad_logdet(B.expand(2, 3, N_POINTS, 2), logdet=True)
    close(solve, torch.linalg.solve(D, B))
    close(logdet, torch.logdet(D))
    close(logdet2, torch.logdet(D))
    close(inv_quad, (B * torch.linalg.solve(D, B)).sum((-2, -1)))
    close(diag, D.diagonal(dim1=-2, dim2=-1))
    close(P @ B, D @ B)
    close(P.mT.to_dense(), D.mT)


@pytest.mark.parametrize("kinds", [("spd", "spd"), ("diag", "nonsym")], ids=lambda k: "-".join(k))
def test_float32(kinds):
    p1, p2 = partitions("singletons")
    M = operator(p1, kind=kinds[0], dtype=torch.float32)
    N = operator(p2, kind=kinds[1], seed=1, dtype=torch.float32)
    P = M @ N
    assert P.dtype == torch.float32
    D = dense64(M) @ dense64(N)
    B = torch.randn(N_POINTS, 2)
    solve = P.solve(B)
    assert solve.dtype == torch.float32 and P.logdet().dtype == torch.float32 and P.diagonal().dtype == torch.float32
    close(solve, torch.linalg.solve(D, B.double()), rtol=1e-4)
    close(P.logdet(), torch.logdet(D), rtol=1e-5)
    close(P.diagonal(), D.diagonal(), rtol=1e-5)
    close(P @ B, D @ B.double(), rtol=1e-5)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("kinds", [("spd", "spd"), ("nonsym", "spd"), ("diag", "diag")], ids=lambda k: "-".join(k))
def test_gradients(kinds):
    p1, p2 = (Partition.from_labels(torch.tensor(labels)) for labels in ([0, 1, 0, 2, 2, 1, 0], [1, 1, 0, 0, 2, 3, 1]))
    M0, N0 = operator(p1, kind=kinds[0]), operator(p2, kind=kinds[1], seed=1)
    diagonal = (kinds[0] == "diag", kinds[1] == "diag")
    leaves = [
        t.detach().clone().requires_grad_(True)
        for t in (M0.lam, M0._b_vector() if diagonal[0] else M0.B, N0.lam, N0._b_vector() if diagonal[1] else N0.B)
    ]
    b = torch.randn(7, 2, dtype=torch.float64)

    def build(lam1, B1, lam2, B2):
        M = BlockMeanLinearOperator(lam1, B1, p1, diagonal=diagonal[0], symmetric=M0.symmetric)
        N = BlockMeanLinearOperator(lam2, B2, p2, diagonal=diagonal[1], symmetric=N0.symmetric)
        return M @ N

    def every(*args):
        P = build(*args)
        inv_quad, logdet = P.inv_quad_logdet(b, logdet=True)
        return P.solve(b), P.logdet(), P.diagonal(), P @ b, inv_quad, logdet, P.mT.solve(b)

    assert torch.autograd.gradcheck(every, leaves)
    # and the gradients equal those of the dense matrix
    for closed, dense in (
        (lambda P: P.logdet(), torch.logdet),
        (lambda P: (b * P.solve(b)).sum(), lambda D: (b * torch.linalg.solve(D, b)).sum()),
        (lambda P: P.diagonal().pow(2).sum(), lambda D: D.diagonal().pow(2).sum()),
    ):
        P = build(*leaves)
        g1 = torch.autograd.grad(closed(P), leaves)
        g2 = torch.autograd.grad(dense(P.left_linear_op.to_dense() @ P.right_linear_op.to_dense()), leaves)
        for a, e in zip(g1, g2):
            close(a, e, rtol=1e-9)


# ---------------------------------------------------------------------------- no root, fallbacks
def test_roots_raise_in_words():
    p1, p2 = partitions("scattered")
    P = operator(p1) @ operator(p2, seed=1)
    b = torch.randn(N_POINTS, 1, dtype=torch.float64)
    for call in (
        P.root_decomposition,
        P.root_inv_decomposition,
        P.cholesky,
        lambda: P.sqrt_inv_matmul(b),
        P.eigvalsh,
        P.diagonalization,
    ):
        with pytest.raises(ValueError, match="not symmetric, so it has no root"):
            call()


def test_svd_warns_and_decomposes_dense():
    p1, p2 = partitions("scattered")
    P = operator(p1) @ operator(p2, seed=1)
    with pytest.warns(ClosedFormFallbackWarning, match="svd of a BlockMeanProductLinearOperator"):
        U, S, V = P.svd()
    close(S, torch.linalg.svdvals(P.to_dense()))
    close((U.to_dense() * S.unsqueeze(-2)) @ V.to_dense().mT, P.to_dense())


def test_sums_with_a_product_are_solved_densely_with_lu_and_warn():
    """A product plus noise has no closed form, and linear_operator's solvers (Cholesky, CG) assume symmetry: its
    solves and log-determinants factorise the dense matrix with LU (a warning says so), values and gradients as
    torch's; roots raise. The same for a block mean operator built with symmetric=False plus a diagonal."""
    p1, p2 = partitions("scattered")
    d = torch.rand(N_POINTS, dtype=torch.float64) + 1
    b = torch.randn(N_POINTS, 2, dtype=torch.float64)
    left = torch.randn(3, N_POINTS, dtype=torch.float64)
    lam = torch.rand(p1.num_blocks, dtype=torch.float64).add(1).requires_grad_()
    B = (0.3 * torch.rand(p1.num_blocks, p1.num_blocks, dtype=torch.float64)).requires_grad_()
    asymmetric = BlockMeanLinearOperator(lam, B, p1, symmetric=False)
    P = operator(p1) @ operator(p2, seed=1)
    for S in (
        P.add_diagonal(d),
        P + DiagLinearOperator(d),
        DiagLinearOperator(d) + P,
        asymmetric + DiagLinearOperator(d),
    ):
        assert isinstance(S, FallbackSumLinearOperator)
        dense = S.to_dense()
        close(S @ b, dense @ b)
        with pytest.warns(ClosedFormFallbackWarning, match="not symmetric.*LU"):
            close(S.solve(b), torch.linalg.solve(dense, b))
        with pytest.warns(ClosedFormFallbackWarning, match="LU"):
            close(S.solve(b, left), left @ torch.linalg.solve(dense, b))
        with pytest.warns(ClosedFormFallbackWarning, match="LU"):
            inv_quad, logdet = S.inv_quad_logdet(b, logdet=True)
        close(inv_quad, (b * torch.linalg.solve(dense, b)).sum())
        close(logdet, torch.logdet(dense))
        with pytest.warns(ClosedFormFallbackWarning, match="LU"):
            close(S.logdet(), torch.logdet(dense))
        with pytest.raises(ValueError, match="not symmetric.*no such root"):
            S.root_decomposition()
    S = asymmetric + DiagLinearOperator(d)
    with pytest.warns(ClosedFormFallbackWarning):
        grads = torch.autograd.grad(S.inv_quad_logdet(b, logdet=True)[1] + S.solve(b).sum(), (lam, B))
    dense = BlockMeanLinearOperator(lam, B, p1, symmetric=False).to_dense() + torch.diag(d)
    expected = torch.autograd.grad(torch.logdet(dense) + torch.linalg.solve(dense, b).sum(), (lam, B))
    for got, want in zip(grads, expected):
        close(got, want)


def test_constant_multiple_stays_a_product():
    p1, p2 = partitions("nested")
    M, N = operator(p1), operator(p2, seed=1)
    P = (M @ N) * -2.0
    assert type(P) is BlockMeanProductLinearOperator
    D = -2.0 * dense64(M) @ dense64(N)
    close(P.to_dense(), D)
    close(P.solve(torch.ones(N_POINTS, dtype=torch.float64)), torch.linalg.solve(D, torch.ones(N_POINTS).double()))


def test_diagonal_mode_diagonal_needs_no_block_pair_table():
    """Both factors in diagonal mode (groupings): the diagonal and entries come from the counts of occupied pairs."""
    gen = torch.Generator().manual_seed(3)
    n, k1, k2 = 2000, 600, 700
    p1, p2 = (
        Partition.from_labels(torch.unique(torch.randint(k, (n,), generator=gen), return_inverse=True)[1])
        for k in (k1, k2)
    )
    M, N = operator(p1, kind="diag"), operator(p2, kind="diag", seed=1)
    P = M @ N
    called = []
    original = BlockMeanProductLinearOperator._cross
    BlockMeanProductLinearOperator._cross = lambda self: called.append(1) or original(self)
    try:
        diag = P.diagonal()
        entries = P._get_indices(torch.arange(0, n, 7), torch.arange(3, n, 7)[: len(range(0, n, 7))])
    finally:
        BlockMeanProductLinearOperator._cross = original
    assert not called
    rows = torch.arange(0, n, 7)
    cols = torch.arange(3, n, 7)[: len(rows)]
    Md, Nd = M.to_dense(), N.to_dense()
    close(diag, (Md * Nd.mT).sum(-1))
    close(entries, (Md[rows] * Nd[:, cols].mT).sum(-1))


# ---------------------------------------------------------------------------- elementwise products of sums
def a_sum() -> tuple[BlockMeanSumLinearOperator, BlockMeanLinearOperator]:
    p1, p2 = partitions("scattered")
    M, N = operator(p1), operator(p2, seed=1)
    S = M + N
    assert isinstance(S, BlockMeanSumLinearOperator)
    return S, M


def test_elementwise_product_of_a_sum_warns_and_proceeds():
    S, M = a_sum()
    X = torch.randn(N_POINTS, N_POINTS, dtype=torch.float64)
    X = X @ X.mT
    for other, dense in ((DenseLinearOperator(X), X), (X, X), (S, dense64(S))):
        with pytest.warns(ClosedFormFallbackWarning, match="elementwise product of a BlockMeanSumLinearOperator"):
            res = S * other
        close(res.to_dense(), dense64(S) * dense, rtol=1e-8)
    # a sum times a block mean operator distributes over the sum's terms (tests/test_sum_times_block_mean.py)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        for res in (M * S, S * M):
            assert isinstance(res, BlockMeanSumLinearOperator)
            close(res.to_dense(), dense64(S) * dense64(M), rtol=1e-8)


def test_elementwise_products_with_closed_forms_stay_silent():
    S, M = a_sum()
    _, p2 = partitions("scattered")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        S * 2.0  # noqa: B018
        M * operator(p2, seed=4)  # noqa: B018  (over the intersection of the partitions)
        M * M  # noqa: B018


def test_the_guard_catches_the_generic_product():
    """The check of the closed forms has teeth: linear_operator's own product of the same factors is refused."""
    import linear_operator

    from closed_form_guard import ForbiddenPath

    p1, p2 = partitions("scattered")
    generic = MatmulLinearOperator(operator(p1), operator(p2, seed=1))
    with linear_operator.settings.max_cholesky_size(10_000), closed_forms_only(N_POINTS):
        with pytest.raises(ForbiddenPath):
            generic.solve(torch.ones(N_POINTS, 1, dtype=torch.float64))
