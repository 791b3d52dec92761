"""Closed forms of BlockMeanLinearOperator against dense torch.linalg on random partitions."""

import functools
import math
from unittest import mock

import linear_operator
import pytest
import torch
from linear_operator.operators import ConstantDiagLinearOperator, DenseLinearOperator, SumLinearOperator

import bma_gp
from bma_gp import BlockMeanLinearOperator, Partition, block_mean
from closed_form_guard import closed_forms_only
from peak_memory import peak_memory_increase

# (name, labels): unequal sizes, singletons, scattered labels, k = 1, k = n
PARTITIONS = {
    "scattered": [2, 0, 1, 0, 3, 1, 1, 0, 2, 4, 1, 0],  # block 3 and 4 are singletons
    "contiguous": [0, 0, 0, 1, 1, 2, 3, 3, 3, 3],
    "one_block": [0] * 7,
    "all_singletons": [4, 2, 0, 1, 3],
    "pairs": [0, 1, 2, 0, 1, 2],
}
DTYPES = [torch.float64, torch.float32]
BATCHES = [(), (2,), (2, 3)]


def make_operator(labels, batch=(), dtype=torch.float64, seed=0, shift=0.5, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    partition = Partition.from_labels(torch.tensor(labels))
    k = partition.num_blocks
    root = torch.randn(*batch, k, k, generator=gen, dtype=torch.float64)
    B = (root @ root.mT / k + 0.2).to(dtype)
    lam = (torch.rand(*batch, k, generator=gen, dtype=torch.float64) + shift).to(dtype)
    if requires_grad:
        lam.requires_grad_(True)
        B.requires_grad_(True)
    return BlockMeanLinearOperator(lam, B, partition), lam, B


def dense(lam, B, labels):
    labels = torch.as_tensor(labels)
    B = 0.5 * (B + B.mT)
    return B[..., labels, :][..., :, labels] + torch.diag_embed(lam[..., labels])


def tol(dtype):
    return {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}


def dense_fn(A, fn):
    e, V = torch.linalg.eigh(A.double())
    return ((V * fn(e).unsqueeze(-2)) @ V.mT).to(A.dtype)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(PARTITIONS))
def test_closed_forms_match_dense(name, dtype, batch):
    labels = PARTITIONS[name]
    op, lam, B = make_operator(labels, batch, dtype, seed=list(PARTITIONS).index(name))
    A = dense(lam, B, labels)
    n = len(labels)
    x = torch.randn(*batch, n, 3, dtype=dtype)
    ref = {
        "matmul": A @ x,
        "diag": torch.diagonal(A, dim1=-2, dim2=-1),
        "solve": torch.linalg.solve(A, x),
        "inv": torch.linalg.inv(A),
        "logdet": torch.logdet(A),
        "eig": torch.linalg.eigvalsh(A),
        "sqrt": dense_fn(A, torch.sqrt),
        "isqrt": dense_fn(A, torch.rsqrt),
        "exp": dense_fn(A, torch.exp),
        "log": dense_fn(A, torch.log),
    }
    ref["quad"] = (x * ref["solve"]).sum(-2)
    t = tol(dtype)
    with closed_forms_only(op.partition.num_blocks + 1):  # nothing bigger than k x k may be factorised
        torch.testing.assert_close(op @ x, ref["matmul"], **t)
        torch.testing.assert_close(op.diagonal(), ref["diag"], **t)
        torch.testing.assert_close(op.solve(x), ref["solve"], **t)
        torch.testing.assert_close(op.inverse().to_dense(), ref["inv"], **t)
        torch.testing.assert_close(op.logdet(), ref["logdet"], **t)
        inv_quad, logdet = op.inv_quad_logdet(x, logdet=True, reduce_inv_quad=False)
        torch.testing.assert_close(inv_quad, ref["quad"], **t)
        torch.testing.assert_close(logdet, ref["logdet"], **t)
        torch.testing.assert_close(op.eigvalsh(), ref["eig"], **t)
        torch.testing.assert_close(op.matrix_sqrt().to_dense(), ref["sqrt"], **t)
        torch.testing.assert_close(op.matrix_inv_sqrt().to_dense(), ref["isqrt"], **t)
        # float32: the error of exp scales with the largest entry (e^{largest eigenvalue})
        scale = float(ref["exp"].abs().max()) if dtype == torch.float32 else 1.0
        torch.testing.assert_close(
            op.matrix_function(torch.exp).to_dense(), ref["exp"], rtol=t["rtol"], atol=t["atol"] * scale
        )
        torch.testing.assert_close(op.matrix_log().to_dense(), ref["log"], **t)
        torch.testing.assert_close(op.sqrt_inv_matmul(x), ref["isqrt"] @ x, **t)
        torch.testing.assert_close(op.root_decomposition() @ x, ref["matmul"], **t)
        torch.testing.assert_close(op.root_inv_decomposition() @ x, ref["solve"], **t)
        # linear_operator's functional entry points take the same closed forms, also below max_cholesky_size
        with linear_operator.settings.max_cholesky_size(10**9):
            torch.testing.assert_close(linear_operator.solve(op, x), ref["solve"], **t)
            torch.testing.assert_close(torch.logdet(op), ref["logdet"], **t)
            _, ld = linear_operator.inv_quad_logdet(op, x, logdet=True)
            torch.testing.assert_close(ld, ref["logdet"], **t)
        with linear_operator.settings.max_cholesky_size(0):
            torch.testing.assert_close(torch.linalg.solve(op, x), ref["solve"], **t)
            torch.testing.assert_close(torch.logdet(op), ref["logdet"], **t)


@pytest.mark.parametrize("name", list(PARTITIONS))
def test_matrix_functions_return_block_mean_operators(name):
    op, _, _ = make_operator(PARTITIONS[name])
    for result in (
        op.matrix_sqrt(),
        op.matrix_inv_sqrt(),
        op.matrix_function(torch.exp),
        op.inverse(),
        op.root_decomposition().root,
        op.root_inv_decomposition().root,
    ):
        assert isinstance(result, BlockMeanLinearOperator)
        assert result.partition is op.partition
    sq = op.matrix_sqrt()
    torch.testing.assert_close((sq @ sq).to_dense(), op.to_dense())
    isq = op.matrix_inv_sqrt()
    torch.testing.assert_close((isq @ op @ isq).to_dense(), torch.eye(len(op.partition), dtype=op.dtype))


@pytest.mark.parametrize("name", ["scattered", "one_block", "all_singletons", "contiguous"])
@pytest.mark.parametrize("method", ["solve", "logdet", "inv_quad", "sqrt", "inv_sqrt", "exp", "log", "eigvalsh"])
@pytest.mark.slow
def test_gradients_match_finite_differences(name, method):
    labels = PARTITIONS[name]
    partition = Partition.from_labels(torch.tensor(labels))
    op0, lam0, B0 = make_operator(labels, (2,), torch.float64, seed=7)
    x = torch.randn(2, len(labels), 2, dtype=torch.float64)

    def f(lam, B):
        op = BlockMeanLinearOperator(lam, B, partition)
        if method == "solve":
            return op.solve(x)
        if method == "logdet":
            return op.logdet()
        if method == "inv_quad":
            return op.inv_quad_logdet(x, logdet=True)[0]
        if method == "sqrt":
            return op.matrix_sqrt() @ x
        if method == "inv_sqrt":
            return op.matrix_inv_sqrt() @ x
        if method == "exp":
            return op.matrix_function(torch.exp) @ x
        if method == "log":
            return op.matrix_log() @ x
        # the sum of eigenvalues is the trace; sums of smooth functions of them are well defined
        return op.eigvalsh().pow(2).sum(-1)

    lam = lam0.detach().requires_grad_(True)
    B = B0.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (lam, B), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(PARTITIONS))
def test_gradients_match_dense_autograd(name):
    """Gradients of logdet + inverse quadratic (the GP marginal likelihood) agree with dense autograd."""
    labels = PARTITIONS[name]
    op, lam, B = make_operator(labels, (3,), torch.float64, seed=11, requires_grad=True)
    lam2 = lam.detach().clone().requires_grad_(True)
    B2 = B.detach().clone().requires_grad_(True)
    y = torch.randn(3, len(labels), 1, dtype=torch.float64)
    quad, logdet = op.inv_quad_logdet(y, logdet=True)
    (quad + logdet).sum().backward()
    A = dense(lam2, B2, labels)
    ((y * torch.linalg.solve(A, y)).sum((-1, -2)) + torch.logdet(A)).sum().backward()
    torch.testing.assert_close(lam.grad, lam2.grad)
    torch.testing.assert_close(B.grad, B2.grad)
    assert torch.allclose(B.grad, B.grad.mT)  # B is treated as symmetric in every path


def test_float32_gradients_close_to_float64():
    labels = PARTITIONS["scattered"]
    out = {}
    for dtype in DTYPES:
        op, lam, B = make_operator(labels, (), dtype, seed=3, requires_grad=True)
        (op.matrix_inv_sqrt() @ torch.ones(len(labels), dtype=dtype)).sum().backward()
        out[dtype] = (lam.grad.double(), B.grad.double())
    torch.testing.assert_close(out[torch.float32][0], out[torch.float64][0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out[torch.float32][1], out[torch.float64][1], rtol=1e-3, atol=1e-4)


def test_repeated_core_eigenvalues_give_finite_gradients():
    # identical blocks: C has repeated eigenvalues, where eigh's own backward would be nan
    partition = Partition.from_sizes([3, 3, 3])
    lam = torch.full((3,), 2.0, dtype=torch.float64, requires_grad=True)
    B = torch.eye(3, dtype=torch.float64).mul(0.5).requires_grad_(True)
    op = BlockMeanLinearOperator(lam, B, partition)
    op.matrix_inv_sqrt().to_dense().sum().backward()
    assert torch.isfinite(lam.grad).all() and torch.isfinite(B.grad).all()
    # this matrix is diagonal-plus-blocks of ones; compare with the dense Newton-free formula
    lam2 = lam.detach().clone().requires_grad_(True)
    B2 = B.detach().clone().requires_grad_(True)
    A = dense(lam2, B2, partition.labels)
    # A^{-1/2} = sum over the two distinct eigenvalues of projector / sqrt(eigenvalue)
    ones = torch.ones(3, 3, dtype=torch.float64) / 3
    J = torch.block_diag(ones, ones, ones)
    s = 3.0
    mu = lam2[0] + s * B2[0, 0]
    ref = J * mu.rsqrt() + (torch.eye(9, dtype=torch.float64) - J) * lam2[0].rsqrt()
    torch.testing.assert_close(op.matrix_inv_sqrt().to_dense(), ref.detach() + 0 * A.detach())


def test_algebra_keeps_type():
    op1, lam1, B1 = make_operator(PARTITIONS["scattered"], seed=1)
    op2, lam2, B2 = make_operator(PARTITIONS["scattered"], seed=2)
    A1, A2 = op1.to_dense(), op2.to_dense()
    for res, ref in [
        (op1 + op2, A1 + A2),
        (op1 * 2.5, A1 * 2.5),
        (2.5 * op1, A1 * 2.5),
        (op1 @ op2, A1 @ A2),
        (op1.add_diagonal(torch.tensor(0.3, dtype=torch.float64)), A1 + 0.3 * torch.eye(12)),
        (op1.add_jitter(0.1), A1 + 0.1 * torch.eye(12)),
        (op1 + ConstantDiagLinearOperator(torch.tensor([0.7], dtype=torch.float64), 12), A1 + 0.7 * torch.eye(12)),
        (op1 * op2, A1 * A2),
    ]:
        assert isinstance(res, BlockMeanLinearOperator), type(res)
        torch.testing.assert_close(res.to_dense(), ref)
    # the product of two block mean matrices is one, but not symmetric: it still solves
    prod = op1 @ op2
    assert not prod.symmetric
    x = torch.randn(12, 2, dtype=torch.float64)
    torch.testing.assert_close(prod.solve(x), torch.linalg.solve(A1 @ A2, x))
    torch.testing.assert_close(prod.logdet(), torch.logdet(A1 @ A2))
    torch.testing.assert_close(prod.mT @ x, (A1 @ A2).mT @ x)
    with pytest.raises(ValueError, match="symmetric"):
        prod.matrix_sqrt()
    # anything else falls back to linear_operator's generic operators, with correct values
    other = DenseLinearOperator(torch.eye(12, dtype=torch.float64))
    res = op1 + other
    assert isinstance(res, SumLinearOperator)
    torch.testing.assert_close(res.to_dense(), A1 + torch.eye(12, dtype=torch.float64))
    full_diag = op1.add_diagonal(torch.arange(12, dtype=torch.float64))
    torch.testing.assert_close(full_diag.to_dense(), A1 + torch.diag(torch.arange(12, dtype=torch.float64)))
    # a different partition does not mix
    op3, _, _ = make_operator(PARTITIONS["pairs"] * 2, seed=3)
    assert not isinstance(op1 + op3, BlockMeanLinearOperator)


def test_batched_scalar_and_principal_submatrix():
    op, lam, B = make_operator(PARTITIONS["scattered"], (2,), seed=4)
    A = op.to_dense()
    scale = torch.tensor([2.0, 3.0], dtype=torch.float64)
    res = op * scale.view(2, 1, 1)
    assert isinstance(res, BlockMeanLinearOperator)
    torch.testing.assert_close(res.to_dense(), A * scale.view(2, 1, 1))
    sub = op[..., 2:9, 2:9]
    assert isinstance(sub, BlockMeanLinearOperator)
    torch.testing.assert_close(sub.to_dense(), A[..., 2:9, 2:9])
    torch.testing.assert_close(op[1, 3, 5], A[1, 3, 5])
    idx = torch.tensor([0, 4, 4, 7])
    torch.testing.assert_close(op[..., idx, idx], A[..., idx, idx])


def test_singular_but_allowed_operators_multiply_and_add():
    # lam = 0 (a GroupKernel before noise): M = P B P^T is singular but a valid covariance
    partition = Partition.from_labels(torch.tensor([0, 1, 0, 1, 1]))
    B = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    op = BlockMeanLinearOperator(torch.zeros(2, dtype=torch.float64), B, partition)
    A = dense(torch.zeros(2, dtype=torch.float64), B, partition.labels)
    x = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(op @ x, A @ x)
    torch.testing.assert_close(
        op.matrix_sqrt().to_dense(), dense_fn(A, lambda e: e.clamp_min(0).sqrt()), atol=1e-7, rtol=1e-7
    )
    noisy = op.add_diagonal(torch.tensor(0.1, dtype=torch.float64))
    torch.testing.assert_close(noisy.solve(x), torch.linalg.solve(A + 0.1 * torch.eye(5), x))
    with pytest.raises(ValueError, match=r"singular: lam\[0\] = 0"):
        op.solve(x)
    with pytest.raises(ValueError, match="positive definite"):
        op.logdet()
    with pytest.raises(ValueError, match="positive definite"):
        op.matrix_inv_sqrt()


def test_not_positive_definite_errors_name_the_culprit():
    partition = Partition.from_sizes([2, 3])
    B = torch.eye(2, dtype=torch.float64)
    op = BlockMeanLinearOperator(torch.tensor([1.0, -0.5], dtype=torch.float64), B, partition)
    for call in (op.matrix_sqrt, op.matrix_inv_sqrt, op.logdet, op.matrix_log):
        with pytest.raises(ValueError, match=r"lam\[1\] = -0.5"):
            call()
    # lam fine, core matrix indefinite
    op = BlockMeanLinearOperator(torch.ones(2, dtype=torch.float64), -torch.eye(2, dtype=torch.float64), partition)
    with pytest.raises(ValueError, match="core matrix C .* eigenvalue"):
        op.matrix_inv_sqrt()
    with pytest.raises(ValueError, match="positive definite"):
        op.logdet()
    # an indefinite but invertible matrix still solves (LU on the k x k core)
    A = op.to_dense()
    x = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(op.solve(x), torch.linalg.solve(A, x))
    # validation off: no ValueError (and no host sync); nan instead
    with bma_gp.settings.validate(False):
        assert torch.isnan(op.matrix_inv_sqrt().to_dense()).any()


@pytest.mark.parametrize(
    "lam_shape, B_shape, match",
    [
        ((3,), (2, 2), "lam must have shape"),
        ((2,), (2, 3), "B must be square"),
        ((2,), (3, 3), "B must have shape"),
        ((2, 2), (3, 2, 2), "do not broadcast"),
    ],
)
def test_bad_shapes(lam_shape, B_shape, match):
    partition = Partition.from_sizes([2, 2])
    with pytest.raises(ValueError, match=match):
        BlockMeanLinearOperator(torch.ones(lam_shape), torch.ones(B_shape), partition)


def test_bad_types():
    partition = Partition.from_sizes([2, 2])
    with pytest.raises(TypeError, match="partition must be a bma_gp.Partition"):
        BlockMeanLinearOperator(torch.ones(2), torch.eye(2), [0, 0, 1, 1])
    with pytest.raises(TypeError, match="floating point"):
        BlockMeanLinearOperator(torch.ones(2, dtype=torch.long), torch.eye(2), partition)
    with pytest.raises(TypeError, match="share a dtype"):
        BlockMeanLinearOperator(torch.ones(2, dtype=torch.float64), torch.eye(2), partition)
    op = BlockMeanLinearOperator(torch.ones(2), torch.eye(2), partition)
    with pytest.raises(ValueError, match="does not match the operator"):
        op.solve(torch.ones(5))


def test_block_mean_is_optimal_and_psd():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor(PARTITIONS["scattered"])
    partition = Partition.from_labels(labels)
    n, k = len(labels), partition.num_blocks
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    A = X @ X.T  # positive semidefinite, rank 4
    approx = block_mean(A, partition)
    R = A - approx.to_dense()
    # the residual is orthogonal to every block mean matrix on the partition (projection property)
    for seed in range(5):
        other, _, _ = make_operator(labels.tolist(), seed=seed, shift=-0.5)
        assert abs(float((R * other.to_dense()).sum())) < 1e-10
    # equals the average over within-block permutations (closed form of the block means)
    for i in range(k):
        for j in range(k):
            block = A[labels == i][:, labels == j]
            Mb = approx.to_dense()[labels == i][:, labels == j]
            if i != j:
                torch.testing.assert_close(Mb, torch.full_like(Mb, float(block.mean())))
            else:
                torch.testing.assert_close(torch.diagonal(Mb).mean(), torch.diagonal(block).mean())
    assert torch.linalg.eigvalsh(approx.to_dense()).min() > -1e-10
    assert approx.eigvalsh().min() > -1e-10
    # works for a LinearOperator and for batches; a block mean operator is its own approximation
    torch.testing.assert_close(block_mean(DenseLinearOperator(A), partition).to_dense(), approx.to_dense())
    batch = torch.stack([A, 2 * A])
    torch.testing.assert_close(block_mean(batch, partition).to_dense()[1], 2 * approx.to_dense())
    assert block_mean(approx, partition) is approx


def test_block_mean_bad_input():
    partition = Partition.from_sizes([2, 2])
    with pytest.raises(ValueError, match="partition has 4 indices"):
        block_mean(torch.eye(5), partition)
    with pytest.raises(ValueError, match="square"):
        block_mean(torch.ones(4, 3), partition)
    with pytest.raises(TypeError, match="Partition"):
        block_mean(torch.eye(4), [0, 0, 1, 1])


@pytest.mark.slow
def test_large_operator_memory_is_linear():
    """Every closed form at n = 2.5 * 10^5 and 5 * 10^5 (k = 100), each in a fresh process: the peak
    resident memory they add grows by a few float64 vectors per index, nowhere near n per index."""
    setup = """
import torch
from bma_gp import BlockMeanLinearOperator, Partition
n, k = {n}, 100
gen = torch.Generator().manual_seed(0)
partition = Partition.from_labels(torch.randint(0, k, (n,), generator=gen))
root = torch.randn(k, k, generator=gen, dtype=torch.float64)
lam = torch.rand(k, generator=gen, dtype=torch.float64) + 1
x = torch.randn(n, dtype=torch.float64, generator=gen)
"""
    work = """
op = BlockMeanLinearOperator(lam, root @ root.T / k, partition)
y = op.solve(x)
torch.testing.assert_close(op @ y, x)
z = op.sqrt_inv_matmul(x)
torch.testing.assert_close(op.matrix_sqrt() @ z, x)
assert torch.isfinite(op.logdet())
assert op.eigvalsh().shape == (n,)
"""
    small, large = 250_000, 500_000
    peaks = [peak_memory_increase(setup.format(n=n), work) for n in (small, large)]
    per_index = (peaks[1] - peaks[0]) / (large - small)
    # a handful of n-vectors (x-sized temporaries, the sorted eigenvalues and their order) is
    # ~100 bytes per index; one n x n float64 row per index would be 8 * n bytes
    assert per_index < 400, f"{per_index:.0f} bytes per index (peaks {peaks})"


def test_float32_large_blocks_are_not_called_indefinite():
    """A positive definite float32 operator with a large spread of eigenvalues (a big block
    constant makes C's top eigenvalue ~ n) passes the definiteness check and matches float64."""
    partition = Partition.from_sizes(torch.full((40,), 25_000))
    k = partition.num_blocks
    B = torch.full((k, k), 0.1, dtype=torch.float64)  # top eigenvalue of C ~ 0.1 n = 1e5, the rest ~ lam
    lam = torch.rand(k, dtype=torch.float64) + 0.5
    op64 = BlockMeanLinearOperator(lam, B, partition)
    op32 = BlockMeanLinearOperator(lam.float(), B.float(), partition)
    x = torch.randn(len(partition), dtype=torch.float64)
    ref = op64.sqrt_inv_matmul(x)
    torch.testing.assert_close(op32.sqrt_inv_matmul(x.float()).double(), ref, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------- matvec fast paths (issue 5)
@functools.lru_cache
def _matvec_partitions():
    gen = torch.Generator().manual_seed(3)
    n = 40_000  # above twice the CPU gather chunk: the chunked route runs
    labels = torch.cat([torch.arange(9), torch.randint(0, 9, (n - 9,), generator=gen)])
    return {
        "equal_runs": Partition.from_sizes([n // 8] * 8),
        "two_runs": Partition.from_sizes([5001] * 4 + [4999] * 4),
        "many_runs": Partition.from_sizes(torch.randint(1, 160, (500,), generator=gen)),
        "scattered": Partition.from_labels(labels[torch.randperm(n, generator=gen)]),
    }


@pytest.mark.parametrize("layout", ["equal_runs", "two_runs", "many_runs", "scattered"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,t", [((), None), ((), 4), ((2,), 1)])
def test_matvec_fast_paths_match_unfused_formula(layout, dtype, batch, t):
    """lam * x + P B_sym P^T x computed with plain index_add / index_select (B not symmetric on input)."""
    partition = _matvec_partitions()[layout]
    n, k = len(partition), partition.num_blocks
    gen = torch.Generator().manual_seed(1)
    lam = torch.rand(*batch, k, generator=gen, dtype=torch.float64) + 0.5
    B = torch.randn(*batch, k, k, generator=gen, dtype=torch.float64)  # symmetrised by the operator
    x = torch.randn(n, *(() if t is None else (t,)), generator=gen, dtype=torch.float64)
    xm = x if t is not None else x.unsqueeze(-1)
    sums = torch.zeros(*batch, k, xm.shape[-1], dtype=torch.float64).index_add_(
        -2, partition.labels, xm.expand(*batch, *xm.shape)
    )
    want = (0.5 * (B + B.mT) @ sums).index_select(-2, partition.labels) + lam[..., partition.labels, None] * xm
    want = want if t is not None else want.squeeze(-1)
    op = BlockMeanLinearOperator(lam.to(dtype), B.to(dtype), partition)
    got = op @ x.to(dtype)
    assert got.dtype == dtype and got.shape == want.shape
    scale = want.abs().amax() if dtype == torch.float32 else 1.0
    torch.testing.assert_close(got.double(), want, **{k_: v * scale for k_, v in tol(dtype).items()})
    op._b_sym()  # with the symmetrised B cached, the other route gives the same numbers
    torch.testing.assert_close(op @ x.to(dtype), got, **tol(dtype))


def test_matvec_without_grad_skips_the_matmul_function():
    """No autograd: ``@`` calls _matmul directly (the Matmul function rebuilds the operator per call);
    with autograd it goes through Matmul and its closed-form derivative."""
    op, lam, B = make_operator(PARTITIONS["scattered"], requires_grad=False)
    x = torch.randn(op.shape[-1], dtype=torch.float64)
    with mock.patch("linear_operator.functions._matmul.Matmul.apply", side_effect=AssertionError("Matmul")):
        y = op @ x
        with pytest.raises(ValueError, match=r"other of shape \(13,\) does not match the operator"):  # before any work
            op @ torch.randn(op.shape[-1] + 1, dtype=torch.float64)
    torch.testing.assert_close(y, dense(lam, B, PARTITIONS["scattered"]) @ x)
    op, lam, B = make_operator(PARTITIONS["scattered"], requires_grad=True)
    with mock.patch("linear_operator.functions._matmul.Matmul.apply", side_effect=AssertionError("Matmul")):
        with pytest.raises(AssertionError, match="Matmul"):
            op @ x
    (op @ x).sum().backward()
    ref_lam, ref_B = lam.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    (dense(ref_lam, ref_B, PARTITIONS["scattered"]) @ x).sum().backward()
    torch.testing.assert_close(lam.grad, ref_lam.grad)
    torch.testing.assert_close(B.grad, ref_B.grad)


def _sum_operator(dtype):
    from bma_gp import BlockMeanSumLinearOperator

    gen = torch.Generator().manual_seed(3)
    labels1, labels2 = torch.tensor(PARTITIONS["scattered"]), torch.tensor([0, 1, 0, 1, 1, 0, 2, 2, 0, 1, 2, 0])
    p1, p2 = Partition.from_labels(labels1), Partition.from_labels(labels2)
    r1 = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    r2 = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    d = torch.rand(12, generator=gen, dtype=torch.float64) + 0.5
    S = BlockMeanSumLinearOperator(d.to(dtype), (r1 @ r1.mT).to(dtype), (r2 @ r2.mT).to(dtype), partitions=[p1, p2])
    return S


@pytest.mark.parametrize("which", ["block_mean", "block_mean_diagonal_mode", "block_mean_sum"])
@pytest.mark.parametrize("dtype, other", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
@pytest.mark.parametrize("shape", [(), (1,), (12,)])
def test_add_diagonal_casts_to_the_operators_dtype(which, dtype, other, shape):
    """A diagonal of another dtype is cast to the operator's, as DenseLinearOperator.add_diagonal does (it raised
    'lam and B must share a dtype'); values against dense, gradients reach the diagonal in its own dtype."""
    labels = PARTITIONS["scattered"]
    if which == "block_mean":
        op = make_operator(labels, dtype=dtype)[0]
    elif which == "block_mean_diagonal_mode":
        k = Partition.from_labels(torch.tensor(labels)).num_blocks
        lam, b = torch.rand(k, dtype=dtype) + 0.5, torch.rand(k, dtype=dtype)
        op = BlockMeanLinearOperator(lam, b, Partition.from_labels(torch.tensor(labels)), diagonal=True)
    else:
        op = _sum_operator(dtype)
    diag = (0.1 + torch.arange(12, dtype=other) / 20)[: (shape[0] if shape else 1)].reshape(shape)
    diag.requires_grad_(True)
    res = op.add_diagonal(diag)
    assert res.dtype == dtype and res.to_dense().dtype == dtype
    assert DenseLinearOperator(op.to_dense()).add_diagonal(diag).dtype == dtype  # linear_operator's behaviour
    want = op.to_dense().double().detach() + torch.diag_embed(diag.double().expand(12))
    tol = {"rtol": 1e-5, "atol": 1e-5} if torch.float32 in (dtype, other) else {}
    torch.testing.assert_close(res.to_dense().double(), want, **tol)
    rhs = torch.ones(12, dtype=dtype)
    torch.testing.assert_close(res.solve(rhs).double(), torch.linalg.solve(want, rhs.double()), **tol)
    (grad,) = torch.autograd.grad(res.logdet(), diag)
    (grad_ref,) = torch.autograd.grad(torch.logdet(want), diag)
    assert grad.dtype == other
    torch.testing.assert_close(grad, grad_ref.to(other), rtol=1e-4, atol=1e-4)


SCALARS = {
    "float": lambda dtype, batch: 0.5,
    "int": lambda dtype, batch: 2,
    "0-d tensor, other dtype": lambda dtype, batch: torch.tensor(
        0.5, dtype=torch.float32 if dtype == torch.float64 else torch.float64
    ),
    "(1,) tensor": lambda dtype, batch: torch.full((1,), 0.75, dtype=dtype),
    "(*batch, 1, 1) tensor": lambda dtype, batch: torch.linspace(
        0.25, 1.0, max(1, math.prod(batch)), dtype=dtype
    ).reshape(*batch, 1, 1),
}


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(SCALARS))
def test_adding_a_scalar_adds_it_to_every_entry(kind, dtype, batch, diagonal):
    """``M + c`` and ``c + M`` (a number, a 0-d or (1,) tensor, or one value per batch entry (*batch, 1, 1))
    add c to every entry, as for a dense tensor: again block mean, B + c with lam unchanged (it raised)."""
    labels = PARTITIONS["scattered"]
    M, lam, B = make_operator(labels, batch, dtype, requires_grad=True)
    if diagonal:
        b = torch.diagonal(B, dim1=-2, dim2=-1).detach().clone().requires_grad_(True)
        B = b
        M = BlockMeanLinearOperator(lam, b, M.partition, diagonal=True)
    c = SCALARS[kind](dtype, batch)
    if torch.is_tensor(c):
        c.requires_grad_(True)

    def dense_sum():  # a fresh graph per call
        fresh = BlockMeanLinearOperator(lam, B, M.partition, diagonal=diagonal)
        return fresh.to_dense().double() + torch.as_tensor(c).double()

    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    rhs = torch.randn(*batch, len(labels), 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for res in (M + c, c + M):
        want = dense_sum()
        assert isinstance(res, BlockMeanLinearOperator) and res.dtype == dtype and res.shape == M.shape
        torch.testing.assert_close(res.lam, M.lam)  # lam unchanged
        torch.testing.assert_close(res.to_dense().double(), want, **tol)
        torch.testing.assert_close(res.solve(rhs.to(dtype)).double(), torch.linalg.solve(want, rhs), **tol)
        torch.testing.assert_close(res.logdet().double(), torch.logdet(want), **tol)
        leaves = (lam, B, c) if torch.is_tensor(c) else (lam, B)
        got_g = torch.autograd.grad(res.logdet().sum(), leaves)
        want_g = torch.autograd.grad(torch.logdet(want).sum(), leaves)
        for g, w in zip(got_g, want_g):
            torch.testing.assert_close(g.double(), w.double(), **tol)


def test_adding_a_scalar_to_a_single_diagonal_block_stays_diagonal():
    M = BlockMeanLinearOperator(torch.ones(1), torch.full((1,), 2.0), Partition.from_labels([0, 0, 0]), diagonal=True)
    res = M + 0.5
    assert res.is_diagonal_mode
    torch.testing.assert_close(res.to_dense(), M.to_dense() + 0.5)


def test_adding_a_tensor_that_is_not_a_scalar_is_not_taken_for_one():
    M = make_operator(PARTITIONS["contiguous"])[0]
    n = M.shape[-1]
    rows = torch.arange(n, dtype=torch.float64).unsqueeze(-1)  # (n, 1): a different value per row
    res = M + rows
    assert not isinstance(res, BlockMeanLinearOperator)
    torch.testing.assert_close(res.to_dense(), M.to_dense() + rows)
