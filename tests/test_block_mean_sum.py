"""BlockMeanSumLinearOperator (docs/math.md section 4) against dense torch.linalg and dense autograd.

``M = diag(d) + sum_j W_j P_j B_j P_j^T W_j + U U^T`` on random partitions with singleton blocks,
unequal sizes and scattered labels; crossed and nested groupings; float32 and float64; batch shapes
() and (2,). Every reference is the dense n x n matrix built from the same leaf tensors.
"""

from __future__ import annotations

import inspect
import math
import warnings

import gpytorch
import linear_operator
import pytest
import torch
from linear_operator.operators import (
    AddedDiagLinearOperator,
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    LowRankRootAddedDiagLinearOperator,
    LowRankRootLinearOperator,
    SumLinearOperator,
)

import bma_gp
from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, Partition
from closed_form_guard import closed_forms_only
from largest_tensor import LargestTensor

N = 40
CLOSED = (BlockMeanLinearOperator, BlockMeanSumLinearOperator)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems


# ---------------------------------------------------------------------------- random structures
def random_labels(n: int, k: int, gen: torch.Generator, singletons: int = 2) -> torch.Tensor:
    """k blocks on n points: ``singletons`` blocks of size 1, the others of unequal sizes, labels scattered."""
    labels = list(range(k))  # every block used once
    weights = torch.tensor([0.0] * singletons + [float(i + 1) ** 2 for i in range(k - singletons)])
    labels += torch.multinomial(weights, n - k, replacement=True, generator=gen).tolist()
    labels = torch.tensor(labels)[torch.randperm(n, generator=gen)]
    relabel = torch.randperm(k, generator=gen)  # singletons are not the first labels
    return relabel[labels]


def nested_labels(fine: torch.Tensor, k_fine: int, k_coarse: int, gen: torch.Generator) -> torch.Tensor:
    """A coarser grouping containing ``fine`` (regions inside countries); every coarse block used."""
    owner = torch.cat([torch.arange(k_coarse), torch.randint(k_coarse, (k_fine - k_coarse,), generator=gen)])
    owner = owner[torch.randperm(k_fine, generator=gen)]
    return owner[fine]


def psd(k, batch, gen):
    W = torch.randn(*batch, k, k, generator=gen, dtype=torch.float64)
    return W @ W.mT / k


def diag_block(k, batch, gen):
    return torch.diag_embed(torch.rand(*batch, k, generator=gen, dtype=torch.float64) + 0.2)


# name -> (block sizes, which B are diagonal, rank m, nested second partition, weighted partitions[, shared]);
# ``shared`` maps a term to an earlier term whose labels it reuses (a random intercept and slope on one grouping)
STRUCTURES = {
    "one": ((7,), (), 0, False, ()),
    "one_root": ((6,), (), 3, False, ()),
    "crossed": ((8, 5), (), 0, False, ()),
    "crossed_diagB": ((8, 5), (0,), 0, False, ()),
    "crossed_root": ((8, 5), (1,), 3, False, ()),
    "nested_root": ((9, 3), (), 2, True, ()),
    # three diagonal terms over one grouping (eliminated together, level by level), alone and beside a crossed
    # dense grouping and a root
    "joint": ((9, 9, 9), (0, 1, 2), 0, False, (1, 2), {1: 0, 2: 0}),
    "joint_root": ((9, 9, 5), (0, 1), 3, False, (1,), {1: 0}),
}


class Case:
    """Leaf tensors of one operator and its dense twin."""

    def __init__(self, structure, dtype=torch.float64, batch=(), seed=0, n=N, weights=()):
        """``structure``: a name in :data:`STRUCTURES`, or such a tuple itself."""
        sizes, diagonal, m, nested, weighted, *more = STRUCTURES[structure] if isinstance(structure, str) else structure
        shared = more[0] if more else {}
        weighted = tuple(weighted) + tuple(weights)
        gen = torch.Generator().manual_seed(seed)
        labels = [random_labels(n, sizes[0], gen)]
        for j, k in enumerate(sizes[1:], start=1):
            if j in shared:  # equal labels, a Partition of its own
                labels.append(labels[shared[j]].clone())
            else:
                labels.append(nested_labels(labels[0], sizes[0], k, gen) if nested else random_labels(n, k, gen))
        self.partitions = [Partition.from_labels(lab) for lab in labels]
        assert [p.num_blocks for p in self.partitions] == list(sizes)
        self.d = (torch.rand(*batch, n, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        self.blocks = [(diag_block if j in diagonal else psd)(k, batch, gen).to(dtype) for j, k in enumerate(sizes)]
        self.root = None
        if m:
            self.root = (torch.randn(*batch, n, m, generator=gen, dtype=torch.float64) / math.sqrt(m)).to(dtype)
        self.weights = [
            (torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) if j in weighted else None)
            for j in range(len(sizes))
        ]
        self.dtype, self.batch, self.n = dtype, tuple(batch), n

    def leaves(self):
        return [self.d, *self.blocks, *([] if self.root is None else [self.root])]

    def requires_grad_(self):
        self.d = self.d.detach().clone().requires_grad_(True)
        self.blocks = [B.detach().clone().requires_grad_(True) for B in self.blocks]
        if self.root is not None:
            self.root = self.root.detach().clone().requires_grad_(True)
        return self

    def op(self):
        return BlockMeanSumLinearOperator(
            self.d, *self.blocks, partitions=self.partitions, root=self.root, weights=self.weights
        )

    def dense(self, dtype=None):
        """``D + Z G Z^T`` from the leaves (differentiable), optionally in another dtype."""
        dtype = dtype or self.dtype
        res = torch.diag_embed(self.d.to(dtype))
        for part, B, w in zip(self.partitions, self.blocks, self.weights):
            Z = torch.nn.functional.one_hot(part.labels, part.num_blocks).to(dtype)
            if w is not None:
                Z = Z * w.to(dtype).unsqueeze(-1)
            B = B.to(dtype)
            res = res + Z @ (0.5 * (B + B.mT)) @ Z.mT  # B is used symmetrised (its gradient is symmetric)
        if self.root is not None:
            U = self.root.to(dtype)
            res = res + U @ U.mT
        return res


def tol(dtype):
    return {"rtol": 1e-8, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}


def assert_close(actual, expected, dtype):
    """Relative check against a float64 reference; ``atol`` scaled by the size of ``expected`` (entries
    can be near zero)."""
    t = tol(dtype)
    expected = expected.detach().to(torch.float64)
    atol = t["atol"] * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.detach().to(torch.float64), expected, rtol=t["rtol"], atol=atol)


DTYPES = [torch.float64, torch.float32]
BATCHES = [(), (2,)]
grid = pytest.mark.parametrize("structure", list(STRUCTURES))
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
batches = pytest.mark.parametrize("batch", BATCHES, ids=["nobatch", "batch2"])


# ---------------------------------------------------------------------------- values
class Checks:
    """Run every check of one case and report all mismatches together (one bug must not hide another)."""

    def __init__(self):
        self.failures = []

    def __call__(self, name, fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - collected, re-raised below
            self.failures.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0:4]}")

    def done(self):
        assert not self.failures, "\n".join(self.failures)


def _value_checks(op, A, dtype, batch, seed):
    """solve, inv_quad_logdet (both reductions), logdet, diagonal, matmul, roots against dense ``A``."""
    gen = torch.Generator().manual_seed(seed)
    rhs = torch.randn(*batch, A.shape[-1], 3, generator=gen, dtype=torch.float64).to(dtype)
    vec = torch.randn(A.shape[-1], generator=gen, dtype=torch.float64).to(dtype)
    left = torch.randn(*batch, 2, A.shape[-1], generator=gen, dtype=torch.float64).to(dtype)
    r64, v64 = rhs.double(), vec.double().expand(*batch, A.shape[-1]).unsqueeze(-1)
    Ainv_rhs, Ainv_vec = torch.linalg.solve(A, r64), torch.linalg.solve(A, v64).squeeze(-1)
    quad = (r64 * Ainv_rhs).sum(-2)
    check = Checks()
    check("solve", lambda: assert_close(op.solve(rhs), Ainv_rhs, dtype))
    check("solve(vector)", lambda: assert_close(op.solve(vec), Ainv_vec, dtype))
    check("solve(rhs, left)", lambda: assert_close(op.solve(rhs, left), left.double() @ Ainv_rhs, dtype))
    for reduce in (True, False):

        def iql(reduce=reduce):
            inv_quad, logdet = op.inv_quad_logdet(rhs, logdet=True, reduce_inv_quad=reduce)
            assert inv_quad.dtype == dtype and logdet.dtype == dtype
            assert_close(inv_quad, quad.sum(-1) if reduce else quad, dtype)
            assert_close(logdet, torch.logdet(A), dtype)
            assert_close(op.inv_quad(rhs, reduce_inv_quad=reduce), quad.sum(-1) if reduce else quad, dtype)

        check(f"inv_quad_logdet(reduce_inv_quad={reduce})", iql)
    check(
        "inv_quad(vector)",
        lambda: assert_close(op.inv_quad_logdet(vec, logdet=False)[0], (vec.double() * Ainv_vec).sum(-1), dtype),
    )
    check("logdet", lambda: assert_close(op.logdet(), torch.logdet(A), dtype))
    check("diagonal", lambda: assert_close(op.diagonal(), torch.diagonal(A, dim1=-2, dim2=-1), dtype))
    check("matmul", lambda: assert_close(op.matmul(rhs), A @ r64, dtype))
    check("matmul(vector)", lambda: assert_close(op @ vec, (A @ v64).squeeze(-1), dtype))
    check("to_dense", lambda: assert_close(op.to_dense(), A, dtype))

    def root():
        R = op.root_decomposition().root.to_dense()
        assert_close(R @ R.mT, A, dtype)

    def root_inv():
        R = op.root_inv_decomposition().root.to_dense()
        assert_close(R @ R.mT, torch.linalg.inv(A), dtype)

    check("root_decomposition: R R^T == M", root)
    check("root_inv_decomposition: R R^T == M^-1", root_inv)
    check.done()


@grid
@dtypes
@batches
def test_values(structure, dtype, batch):
    case = Case(structure, dtype, batch, seed=1)
    _value_checks(case.op(), case.dense(torch.float64), dtype, batch, seed=2)


@dtypes
def test_roots_keep_the_operator_dtype(dtype):
    # a float32 operator's roots are float32 operators (the working precision is internal)
    op = Case("crossed_root", dtype).op()
    for root in (op.root_decomposition(), op.root_inv_decomposition()):
        assert root.dtype == dtype and root.root.dtype == dtype
        assert root.to_dense().dtype == dtype


def test_root_decomposition_matmul():
    # The RootLinearOperator returned by root_decomposition must be usable like any operator:
    # R @ x goes through linear_operator's Matmul function, which rebuilds _WoodburyRoot from its
    # representation_tree.
    case = Case("crossed_root")
    op, A = case.op(), case.dense()
    x = torch.randn(N, 3, dtype=torch.float64)
    assert_close(op.root_decomposition().matmul(x), A @ x, torch.float64)
    assert_close(op.root_inv_decomposition() @ x, torch.linalg.solve(A, x), torch.float64)


def test_sample_through_root():
    # R eps with eps ~ N(0, I) has covariance M: R R^T was checked above, here R is applied to vectors
    case = Case("crossed_root", batch=(2,))
    op, A = case.op(), case.dense()
    R = op.root_decomposition().root
    eps = torch.randn(2, R.shape[-1], 3, dtype=torch.float64)
    dense_root = R.to_dense()
    assert_close(dense_root @ dense_root.mT, A, torch.float64)
    assert_close(R.matmul(eps), dense_root @ eps, torch.float64)
    assert_close(R._t_matmul(eps), dense_root.mT @ eps, torch.float64)
    # GPyTorch's sampler on the operator: closed-form root, empirical covariance close to M
    with closed_forms_only(N):
        samples = gpytorch.distributions.MultivariateNormal(torch.zeros(2, N, dtype=torch.float64), op).rsample(
            torch.Size([20000])
        )
    cov = torch.einsum("sbi,sbj->bij", samples, samples) / samples.shape[0]
    scale = torch.diagonal(A, dim1=-2, dim2=-1).sqrt()
    corr_error = (cov - A) / (scale.unsqueeze(-1) * scale.unsqueeze(-2))
    assert corr_error.abs().max() < 0.05


@pytest.mark.parametrize("structure", ["crossed", "crossed_root"])
def test_batch_indexing(structure):
    # op[i], unsqueeze / squeeze and expand of a batched operator index every representation tensor,
    # the low-rank root (a keyword argument of the constructor) included
    case = Case(structure, batch=(2,))
    op, A = case.op(), case.dense()
    check = Checks()
    check("op[1]", lambda: assert_close(op[1].to_dense(), A[1], torch.float64))
    check(
        "op[1] solve",
        lambda: assert_close(op[1].solve(A[1][:, :2]), torch.eye(N, 2, dtype=torch.float64), torch.float64),
    )
    check("unsqueeze(0)[0]", lambda: assert_close(op.unsqueeze(0)[0].to_dense(), A, torch.float64))
    check("expand", lambda: assert_close(op.expand(3, 2, N, N).to_dense(), A.expand(3, 2, N, N), torch.float64))
    check("op[:, :5, :5]", lambda: assert_close(op[:, :5, :5].to_dense(), A[:, :5, :5], torch.float64))
    check.done()


@grid
@batches
def test_principal_slices_stay_closed_form(structure, batch):
    """op[a:b, a:b] (what MultivariateNormal[..., a:b] asks for) is again a sum: the labels, d, the weights and the
    root's rows restricted, each block matrix to the blocks those points touch."""
    case = Case(structure, batch=batch, seed=3)
    op, A = case.op(), case.dense()
    for index in (slice(0, N // 2), slice(5, N, 3)):
        sub = op[(..., index, index)]
        assert isinstance(sub, BlockMeanSumLinearOperator)
        ref = A[(..., index, index)]
        with closed_forms_only(N):
            _value_checks(sub, ref, torch.float64, batch, seed=4)


def test_other_indexing_warns_when_it_leaves_the_closed_forms():
    """Rows and columns other than one principal submatrix (a point repeated, different slices) take linear_operator's
    interpolated operator: its products are right and silent, its solves say that they are generic. (The same distinct
    points on both sides, ``M[idx][:, idx]``, are the principal submatrix: tests/test_indexed_principal19.py.)"""
    case = Case("crossed_root")
    op, A = case.op(), case.dense()
    idx = torch.cat([torch.arange(0, N, 2), torch.tensor([0])])  # the first point twice
    b = torch.randn(idx.numel(), 2, dtype=torch.float64)
    M1 = BlockMeanLinearOperator(
        torch.rand(4, dtype=torch.float64) + 0.5,
        torch.eye(4, dtype=torch.float64),
        Partition.from_labels(torch.arange(N) % 4),
    )
    for M, ref in ((op, A), (M1, M1.to_dense())):
        sub = M[idx][:, idx]
        assert isinstance(sub, bma_gp.FallbackIndexedLinearOperator)
        torch.testing.assert_close(sub.to_dense(), ref[idx][:, idx])
        torch.testing.assert_close(sub @ b, ref[idx][:, idx] @ b)  # products stay silent
        with pytest.warns(bma_gp.ClosedFormFallbackWarning, match="other than one principal slice"):
            try:
                sub.solve(b)
            except Exception:  # singular (two equal rows): the generic path may refuse it after warning
                pass
        rows = M[: N // 2, N // 2 :]
        torch.testing.assert_close(rows.to_dense(), ref[: N // 2, N // 2 :])


@pytest.mark.parametrize("structure", ["one", "crossed", "crossed_root"])
def test_sqrt_inv_matmul(structure):
    # sqrt_inv_matmul(rhs) is M^{-1/2} rhs with the *symmetric* inverse square root (linear_operator's
    # contract); a non-symmetric R with R R^T = M^{-1} does not give it when d is not constant, so that
    # case raises instead of handing back an iterative estimate, and a constant d is exact.
    case = Case(structure)
    per_point = case.op()
    with pytest.raises(NotImplementedError, match="constant"):
        per_point.sqrt_inv_matmul(torch.randn(N, 2, dtype=torch.float64))
    op = BlockMeanSumLinearOperator(
        torch.full_like(per_point.diag_values, 0.7),
        *per_point.blocks,
        partitions=per_point.partitions,
        root=per_point.root,
        weights=per_point.weights,
    )
    A = op.to_dense()
    evals, evecs = torch.linalg.eigh(A)
    inv_sqrt = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.mT
    rhs, lhs = torch.randn(N, 3, dtype=torch.float64), torch.randn(2, N, dtype=torch.float64)
    assert_close(op.sqrt_inv_matmul(rhs), inv_sqrt @ rhs, torch.float64)
    res, quad = op.sqrt_inv_matmul(rhs, lhs)
    assert_close(res, lhs @ inv_sqrt @ rhs, torch.float64)
    assert_close(quad, (lhs @ inv_sqrt).pow(2).sum(-1), torch.float64)


# ---------------------------------------------------------------------------- gradients (float64)
def _losses(op, rhs, weight):
    return {
        "solve": lambda: (op.solve(rhs) * weight).sum(),
        "inv_quad_logdet": lambda: sum(t.sum() for t in op.inv_quad_logdet(rhs, logdet=True)),
        "inv_quad_noreduce": lambda: (op.inv_quad(rhs, reduce_inv_quad=False) * weight[..., 0, :]).sum(),
        "logdet": lambda: op.logdet().sum(),
        "diagonal": lambda: (op.diagonal() * weight[..., 0]).sum(),
        "matmul": lambda: (op.matmul(rhs) * weight).sum(),
        "root": lambda: ((lambda R: R @ R.mT)(op.root_decomposition().root.to_dense()) * weight[..., :1]).sum(),
        "root_inv": lambda: ((lambda R: R @ R.mT)(op.root_inv_decomposition().root.to_dense()) * weight[..., :1]).sum(),
    }


def _dense_losses(A, rhs, weight):
    return {
        "solve": lambda: (torch.linalg.solve(A, rhs) * weight).sum(),
        "inv_quad_logdet": lambda: (rhs * torch.linalg.solve(A, rhs)).sum() + torch.logdet(A).sum(),
        "inv_quad_noreduce": lambda: ((rhs * torch.linalg.solve(A, rhs)).sum(-2) * weight[..., 0, :]).sum(),
        "logdet": lambda: torch.logdet(A).sum(),
        "diagonal": lambda: (torch.diagonal(A, dim1=-2, dim2=-1) * weight[..., 0]).sum(),
        "matmul": lambda: ((A @ rhs) * weight).sum(),
        "root": lambda: (A * weight[..., :1]).sum(),
        "root_inv": lambda: (torch.linalg.inv(A) * weight[..., :1]).sum(),
    }


METHODS = list(_losses(None, None, None))


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def assert_grads_close(actual, expected, names):
    bad = []
    for a, e, name in zip(actual, expected, names):
        if a is None:
            bad.append(f"no gradient reaches {name}")
            continue
        scale = max(1.0, float(e.abs().max()))
        if not torch.allclose(a, e, rtol=1e-8, atol=1e-10 * scale):
            bad.append(f"gradient of {name}: max abs error {float((a - e).abs().max()):.3g} (scale {scale:.3g})")
    assert not bad, "; ".join(bad)


def _leaf_names(case):
    return ["d", *(f"B_{j + 1}" for j in range(len(case.blocks))), *(["U"] if case.root is not None else [])]


def _gradient_checks(case, batch, seed, methods=None):
    """Gradients of every method's loss w.r.t. d, each B_j and U against dense autograd (float64)."""
    gen = torch.Generator().manual_seed(seed)
    rhs = torch.randn(*batch, case.n, 3, generator=gen, dtype=torch.float64)
    weight = torch.randn(*batch, case.n, case.n, generator=gen, dtype=torch.float64)
    weight = weight + weight.mT
    leaves, names = case.leaves(), _leaf_names(case)
    check = Checks()
    for method in methods or METHODS:

        def run(method=method):
            w = weight if method.startswith("root") else weight[..., :3]
            actual = _grads(_losses(case.op(), rhs, w)[method](), leaves)
            expected = _grads(_dense_losses(case.dense(), rhs, w)[method](), leaves)
            assert_grads_close(actual, expected, names)

        check(method, run)
    check.done()


GRADIENT_CASES = [(s, ()) for s in STRUCTURES] + [("crossed", (2,)), ("nested_root", (2,))]


@pytest.mark.parametrize("structure,batch", GRADIENT_CASES, ids=[f"{s}-{len(b)}" for s, b in GRADIENT_CASES])
def test_gradients(structure, batch):
    _gradient_checks(Case(structure, torch.float64, batch, seed=5).requires_grad_(), batch, seed=6)


def test_gradient_reaches_off_diagonal_of_a_diagonal_B():
    # Minimal case: B_1 happens to be diagonal (the eliminated grouping), but it is a free k x k
    # parameter; d logdet M / d B_1 = P_1^T M^{-1} P_1, which has non-zero off-diagonal entries.
    case = Case("crossed_diagB").requires_grad_()
    (g_op,) = _grads(case.op().logdet(), [case.blocks[0]])
    (g_dense,) = _grads(torch.logdet(case.dense()), [case.blocks[0]])
    off = ~torch.eye(g_dense.shape[-1], dtype=torch.bool)
    assert g_dense[off].abs().max() > 1e-3
    assert_grads_close([g_op], [g_dense], ["B_1"])


@pytest.mark.parametrize("with_root", [False, True], ids=["noroot", "root"])
@batches
def test_gradients_from_block_mean_operators(with_root, batch):
    # built by sums: gradients reach lam_j and B_j of each BlockMeanLinearOperator, d and U
    gen = torch.Generator().manual_seed(7)
    p1 = Partition.from_labels(random_labels(N, 7, gen))
    p2 = Partition.from_labels(random_labels(N, 4, gen))
    lam1 = (torch.rand(*batch, 7, generator=gen, dtype=torch.float64) + 0.3).requires_grad_(True)
    lam2 = (torch.rand(*batch, 4, generator=gen, dtype=torch.float64) + 0.3).requires_grad_(True)
    B1 = psd(7, batch, gen).requires_grad_(True)
    B2 = psd(4, batch, gen).requires_grad_(True)
    d = (torch.rand(*batch, N, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    U = torch.randn(*batch, N, 2, generator=gen, dtype=torch.float64).requires_grad_(True)
    leaves = [lam1, lam2, B1, B2, d] + ([U] if with_root else [])
    names = ["lam_1", "lam_2", "B_1", "B_2", "d"] + (["U"] if with_root else [])

    op = BlockMeanLinearOperator(lam1, B1, p1) + BlockMeanLinearOperator(lam2, B2, p2) + DiagLinearOperator(d)
    if with_root:
        op = LowRankRootLinearOperator(U) + op
    assert isinstance(op, BlockMeanSumLinearOperator)

    def dense():
        res = torch.diag_embed(d)
        for lam, B, p in ((lam1, B1, p1), (lam2, B2, p2)):
            P = torch.nn.functional.one_hot(p.labels, p.num_blocks).double()
            res = res + P @ (0.5 * (B + B.mT)) @ P.mT + torch.diag_embed(lam[..., p.labels])
        return res + (U @ U.mT if with_root else 0)

    A = dense()
    rhs = torch.randn(*batch, N, 2, generator=gen, dtype=torch.float64)
    inv_quad, logdet = op.inv_quad_logdet(rhs, logdet=True)
    assert_close(inv_quad, (rhs * torch.linalg.solve(A, rhs)).sum((-2, -1)), torch.float64)
    assert_close(logdet, torch.logdet(A), torch.float64)
    loss = inv_quad.sum() + logdet.sum() + op.solve(rhs).sum()
    loss_dense = (rhs * torch.linalg.solve(A, rhs)).sum() + torch.logdet(A).sum() + torch.linalg.solve(A, rhs).sum()
    assert_grads_close(_grads(loss, leaves), _grads(loss_dense, leaves), names)


@batches
def test_root_without_a_diagonal_is_z_l(batch):
    # d = 0 (a prior of group kernels and an inducing-point root, without noise): R = [Z L, 0], n x max(n, q) (zero
    # columns pad it to the n base samples GPyTorch's rsample(base_samples=...) takes), R R^T = M
    case = Case("crossed_root", torch.float64, batch, seed=41)
    op = BlockMeanSumLinearOperator(
        torch.zeros_like(case.d), *case.blocks, partitions=case.partitions, root=case.root, weights=case.weights
    )
    case.d = torch.zeros_like(case.d)
    dense = case.dense()
    with closed_forms_only(N):
        R = op.root_decomposition().root
        assert R.shape == (*batch, N, max(N, op.capacitance_size))
        R_dense = R.to_dense()
        x = torch.randn(*batch, N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        Rt_x = R.mT @ x
    assert_close(R_dense @ R_dense.mT, dense, torch.float64)
    assert_close(Rt_x, R_dense.mT @ x, torch.float64)
    sample = gpytorch.distributions.MultivariateNormal(torch.zeros(*batch, N, dtype=torch.float64), op).rsample()
    assert sample.shape == (*batch, N) and bool(torch.isfinite(sample).all())


# ---------------------------------------------------------------------------- joint elimination
@batches
@pytest.mark.parametrize("with_rest", [False, True], ids=["alone", "crossed_root"])
def test_joint_elimination_gradients(with_rest, batch, monkeypatch):
    # A correlated intercept and slope (three diagonal terms over one grouping, two weighted) given as vectors
    # with diagonal=True, so the gradients flow through the level-by-level elimination; with a crossed dense
    # grouping and a root beside them, through the Schur complement as well.
    import bma_gp.block_mean_sum_linear_operator as module

    calls = []
    original = module.BlockMeanSumLinearOperator._factorise_joint
    monkeypatch.setattr(
        module.BlockMeanSumLinearOperator,
        "_factorise_joint",
        lambda self, E, rest: calls.append((tuple(E), tuple(rest))) or original(self, E, rest),
    )
    gen = torch.Generator().manual_seed(31)
    n, k = 60, 11
    labels = random_labels(n, k, gen)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    partitions = [Partition.from_labels(labels)] * 3
    weights = [None, x, 1 + 0.5 * x]
    diagonals = [
        (torch.rand(*batch, k, generator=gen, dtype=torch.float64) + 0.1).requires_grad_(True) for _ in range(3)
    ]
    d = (torch.rand(*batch, n, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    blocks, flags, root = list(diagonals), [True] * 3, None
    if with_rest:
        partitions.append(Partition.from_labels(random_labels(n, 4, gen)))
        weights.append(None)
        blocks.append(psd(4, batch, gen).requires_grad_(True))
        flags.append(False)
        root = torch.randn(*batch, n, 2, generator=gen, dtype=torch.float64).requires_grad_(True)
    leaves = [d, *blocks] + ([root] if root is not None else [])
    op = BlockMeanSumLinearOperator(d, *blocks, partitions=partitions, root=root, weights=weights, diagonal=flags)

    def dense():
        res = torch.diag_embed(d)
        for part, B, w, flag in zip(partitions, blocks, weights, flags):
            Z = torch.nn.functional.one_hot(part.labels, part.num_blocks).double()
            Z = Z if w is None else Z * w.unsqueeze(-1)
            B = torch.diag_embed(B) if flag else 0.5 * (B + B.mT)
            res = res + Z @ B @ Z.mT
        return res + (root @ root.mT if root is not None else 0)

    A = dense()
    rhs = torch.randn(*batch, n, 2, generator=gen, dtype=torch.float64)
    inv_quad, logdet = op.inv_quad_logdet(rhs, logdet=True)
    solved = op.solve(rhs)
    assert calls and calls[0] == ((0, 1, 2), (3, 4) if with_rest else ())
    ref = torch.linalg.solve(A, rhs)
    assert_close(inv_quad, (rhs * ref).sum((-2, -1)), torch.float64)
    assert_close(logdet, torch.logdet(A), torch.float64)
    assert_close(solved, ref, torch.float64)
    loss = inv_quad.sum() + logdet.sum() + (solved * rhs.flip(-1)).sum()
    loss_dense = (rhs * ref).sum() + torch.logdet(A).sum() + (ref * rhs.flip(-1)).sum()
    names = ["d"] + [f"B_{j + 1}" for j in range(len(blocks))] + (["U"] if root is not None else [])
    assert_grads_close(_grads(loss, leaves), _grads(loss_dense, leaves), names)


def test_joint_elimination_factorises_only_the_rest():
    # 300 levels with intercept, slope and correlation terms plus a rank-3 root: one eliminated term would leave
    # 600 + 3 columns to factorise; the joint elimination leaves the root's 3, so a limit of 10 is enough.
    gen = torch.Generator().manual_seed(32)
    n, k = 1200, 300
    labels = torch.randperm(n, generator=gen) % k
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    p = Partition.from_labels(labels)
    d = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    values = [torch.rand(k, generator=gen, dtype=torch.float64) + 0.1 for _ in range(3)]
    U = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    op = BlockMeanSumLinearOperator(
        d, *values, partitions=[p] * 3, root=U, weights=[None, x, 1 - x], diagonal=[True] * 3
    )
    rhs = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    with bma_gp.settings.max_capacitance_size(10), closed_forms_only(n):
        solved, logdet = op.solve(rhs), op.logdet()
    dense = op.to_dense()
    assert_close(solved, torch.linalg.solve(dense, rhs), torch.float64)
    assert_close(logdet, torch.logdet(dense), torch.float64)


# ---------------------------------------------------------------------------- random slopes
@dtypes
@batches
@pytest.mark.parametrize("structure", ["one_root", "crossed", "crossed_root"])
def test_weights_random_slopes(structure, dtype, batch):
    # P_w[a, c_a] = w_a: Z G Z^T with a covariate-scaled indicator column (weights on partition 0)
    case = Case(structure, dtype, batch, seed=8, weights=(0,))
    assert case.weights[0] is not None
    _value_checks(case.op(), case.dense(torch.float64), dtype, batch, seed=9)
    if dtype == torch.float64:
        _gradient_checks(case.requires_grad_(), batch, seed=10, methods=["inv_quad_logdet", "solve", "diagonal"])


def test_weights_intercept_and_slope_on_one_grouping():
    # (1 + x | g): the same partition twice, once plain and once weighted by x, with a 2 x 2
    # covariance per group written as the Z G Z^T of the two columns (cross covariance in neither B)
    gen = torch.Generator().manual_seed(9)
    p = Partition.from_labels(random_labels(N, 6, gen))
    x = torch.randn(N, generator=gen, dtype=torch.float64)
    d = torch.rand(N, generator=gen, dtype=torch.float64) + 0.5
    B0, B1 = diag_block(6, (), gen), diag_block(6, (), gen)
    op = BlockMeanSumLinearOperator(d, B0, B1, partitions=[p, p], weights=[None, x])
    P = torch.nn.functional.one_hot(p.labels, 6).double()
    Z = torch.cat([P, P * x.unsqueeze(-1)], dim=-1)
    G = torch.block_diag(B0, B1)
    A = torch.diag_embed(d) + Z @ G @ Z.mT
    rhs = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    assert_close(op.solve(rhs), torch.linalg.solve(A, rhs), torch.float64)
    assert_close(op.logdet(), torch.logdet(A), torch.float64)


# ---------------------------------------------------------------------------- indefinite B
def test_indefinite_block_mean_plus_second_partition():
    # block_mean of a PSD kernel matrix can have an indefinite B (its lam carries the rest); added to
    # a second grouping and noise, solve / logdet / inv_quad must still be exact
    gen = torch.Generator().manual_seed(10)
    p1 = Partition.from_labels(random_labels(N, 6, gen))
    p2 = Partition.from_labels(random_labels(N, 4, gen))
    x = torch.randn(N, 1, generator=gen, dtype=torch.float64) * 3
    K = torch.exp(-0.5 * (x - x.mT) ** 2)
    bm = bma_gp.block_mean(K, p1)
    assert torch.linalg.eigvalsh(bm.B).min() < -1e-3, "the test needs an indefinite B"
    second = BlockMeanLinearOperator(torch.rand(4, generator=gen, dtype=torch.float64) + 0.2, psd(4, (), gen), p2)
    noise = torch.rand(N, generator=gen, dtype=torch.float64) + 0.1
    op = bm + second + DiagLinearOperator(noise)
    assert isinstance(op, BlockMeanSumLinearOperator)
    A = bm.to_dense() + second.to_dense() + torch.diag(noise)
    assert torch.linalg.eigvalsh(A).min() > 0
    rhs = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    with closed_forms_only(N):
        solved, logdet = op.solve(rhs), op.logdet()
        inv_quad, logdet2 = op.inv_quad_logdet(rhs, logdet=True)
    assert_close(solved, torch.linalg.solve(A, rhs), torch.float64)
    assert_close(logdet, torch.logdet(A), torch.float64)
    assert_close(logdet2, torch.logdet(A), torch.float64)
    assert_close(inv_quad, (rhs * torch.linalg.solve(A, rhs)).sum(), torch.float64)


def _denman_beavers_sqrt(S: torch.Tensor, iterations: int = 40) -> torch.Tensor:
    """The principal square root of a positive definite matrix by the Denman-Beavers iteration: an independent
    dense reference whose autograd derivative does not divide by eigenvalue gaps (``eigh``'s does)."""
    Y, Zm = S, torch.eye(S.shape[-1], dtype=S.dtype).expand_as(S)
    for _ in range(iterations):
        Y, Zm = 0.5 * (Y + torch.linalg.inv(Zm)), 0.5 * (Zm + torch.linalg.inv(Y))
    return Y


def _indefinite_sums(dtype, batch=()):
    """Sums with a block mean approximation's indefinite B (plus noise, a second grouping, a low-rank root)."""
    gen = torch.Generator().manual_seed(12)
    p1 = Partition.from_labels(random_labels(N, 6, gen))
    p2 = Partition.from_labels(random_labels(N, 4, gen))
    x = torch.randn(*batch, N, 1, generator=gen, dtype=torch.float64) * 3
    bm = bma_gp.block_mean(torch.exp(-0.5 * (x - x.mT) ** 2), p1)
    assert bool((torch.linalg.eigvalsh(bm.B)[..., 0] < -1e-3).all()), "the test needs an indefinite B"
    second = BlockMeanLinearOperator(torch.rand(4, generator=gen, dtype=torch.float64) + 0.2, psd(4, batch, gen), p2)
    noise = torch.rand(*batch, N, generator=gen, dtype=torch.float64) + 0.1
    U = torch.randn(*batch, N, 3, generator=gen, dtype=torch.float64)
    sums = {
        "bm+noise": bm + DiagLinearOperator(noise),
        "bm+second+noise": bm + second + DiagLinearOperator(noise),
        "bm+lowrank+noise": (bm + LowRankRootLinearOperator(U)).add_diagonal(noise),
    }
    return {name: op.to(dtype) for name, op in sums.items()}


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batch2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_roots_with_an_indefinite_block_come_from_the_gram_root(dtype, batch):
    # before: root_decomposition raised "roots need a positive semidefinite B" although M is positive definite
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for name, op in _indefinite_sums(dtype, batch).items():
        assert isinstance(op, BlockMeanSumLinearOperator), name
        A = op.to_dense().double()
        assert bool((torch.linalg.eigvalsh(A)[..., 0] > 0).all())
        with closed_forms_only(N):
            R = op.root_decomposition().root.to_dense().double()
            R_inv = op.root_inv_decomposition().root.to_dense().double()
        assert R.shape[-2:] == (N, N) and R_inv.shape[-2:] == (N, N)
        scale = A.abs().amax()
        assert float((R @ R.mT - A).abs().amax()) < tol * scale, name
        A_inv = torch.linalg.inv(A)
        assert float((R_inv @ R_inv.mT - A_inv).abs().amax()) < tol * A_inv.abs().amax(), name


def test_indefinite_block_root_gradients_match_a_dense_square_root():
    # R = D^{1/2} (D^{-1/2} M D^{-1/2})^{1/2}, differentiated densely through Denman-Beavers
    gen = torch.Generator().manual_seed(13)
    p1 = Partition.from_labels(random_labels(N, 6, gen))  # crossed: the Gram matrix is singular for every d
    p2 = Partition.from_labels(random_labels(N, 4, gen))
    B1 = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    B1 = (0.05 * (B1 + B1.mT) + 0.3).requires_grad_(True)
    B2 = psd(4, (), gen).requires_grad_(True)
    d = (torch.rand(N, generator=gen, dtype=torch.float64) + 5).requires_grad_(True)
    assert float(torch.linalg.eigvalsh(B1.detach())[0]) < -0.05, "the test needs an indefinite B_1"
    Z = torch.cat([torch.nn.functional.one_hot(p.labels, p.num_blocks).double() for p in (p1, p2)], dim=-1)
    v = torch.randn(N, 2, generator=gen, dtype=torch.float64)

    def dense(d, B1, B2):
        A = torch.diag(d) + Z @ torch.block_diag(B1, B2) @ Z.mT
        s = d.sqrt()
        return s.unsqueeze(-1) * _denman_beavers_sqrt(A / s.unsqueeze(-1) / s)

    op = BlockMeanSumLinearOperator(d, B1, B2, partitions=[p1, p2])
    with closed_forms_only(N):
        value = (op.root_decomposition().root @ v).pow(2).sum()
        grads = torch.autograd.grad(value, [d, B1, B2])
    ref_value = (dense(d, B1, B2) @ v).pow(2).sum()
    ref_grads = torch.autograd.grad(ref_value, [d, B1, B2])
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=0)
    for g, r in zip(grads, ref_grads):
        if g.dim() == 2:  # B enters symmetrised
            g, r = 0.5 * (g + g.mT), 0.5 * (r + r.mT)
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12 * float(r.abs().max()))


@pytest.mark.parametrize("kind", ["root", "inverse"])
def test_gram_root_core_gradients(kind):
    # the core of every Gram-matrix root: I + Y X Y^T = (I + Y G Y^T)^{+-1/2}; finite differences of Y X Y^T in Y
    # (a singular Gram matrix: one column of Y a combination of two others) and in an indefinite G
    from bma_gp.block_mean_sum_linear_operator import gram_root_core

    gen = torch.Generator().manual_seed(17)
    Y = 0.2 * torch.randn(30, 8, generator=gen, dtype=torch.float64)
    Y[:, 7] = Y[:, 0] - Y[:, 1]
    G = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    G = 0.01 * (G + G.mT)
    assert float(torch.linalg.eigvalsh(G)[0]) < 0

    def product(Yv, Gv):
        return Yv @ gram_root_core(Yv.mT @ Yv, 0.5 * (Gv + Gv.mT), kind, "test") @ Yv.mT

    S = torch.eye(30, dtype=torch.float64) + Y @ G @ Y.mT
    root = torch.eye(30, dtype=torch.float64) + product(Y, G)
    expected = _denman_beavers_sqrt(S)
    torch.testing.assert_close(root, expected if kind == "root" else torch.linalg.inv(expected), rtol=1e-10, atol=1e-12)
    inputs = (Y.clone().requires_grad_(True), G.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(product, inputs, fast_mode=True)


def _indefinite_block(k: int, shift: float, gen: torch.Generator) -> torch.Tensor:
    """A small symmetric ``B`` plus ``shift`` in every entry, with a clearly negative eigenvalue."""
    B = torch.randn(k, k, generator=gen, dtype=torch.float64)
    B = 0.05 * (B + B.mT) + shift
    assert float(torch.linalg.eigvalsh(B)[0]) < -0.05, "the test needs an indefinite B"
    return B


def test_indefinite_weighted_block_root():
    # a random slope (row weights on the indicators) whose block is indefinite
    gen = torch.Generator().manual_seed(16)
    p1 = Partition.from_labels(random_labels(N, 6, gen))
    p2 = Partition.from_labels(random_labels(N, 4, gen))
    B1 = _indefinite_block(6, 0.2, gen)
    w = torch.randn(N, generator=gen, dtype=torch.float64)
    d = torch.rand(N, generator=gen, dtype=torch.float64) + 3
    op = BlockMeanSumLinearOperator(d, B1, psd(4, (), gen), partitions=[p1, p2], weights=[w, None])
    A = op.to_dense()
    with closed_forms_only(N):
        R = op.root_decomposition().root.to_dense()
        R_inv = op.root_inv_decomposition().root.to_dense()
    torch.testing.assert_close(R @ R.mT, A, rtol=0, atol=1e-12 * float(A.abs().max()))
    A_inv = torch.linalg.inv(A)
    torch.testing.assert_close(R_inv @ R_inv.mT, A_inv, rtol=0, atol=1e-12 * float(A_inv.abs().max()))


def test_indefinite_block_with_constant_diagonal_gives_the_symmetric_roots():
    gen = torch.Generator().manual_seed(14)
    p1 = Partition.from_labels(random_labels(N, 6, gen))
    p2 = Partition.from_labels(random_labels(N, 4, gen))
    B1 = _indefinite_block(6, 0.3, gen)
    d = torch.full((N,), 3.0, dtype=torch.float64)
    op = BlockMeanSumLinearOperator(d, B1, psd(4, (), gen), partitions=[p1, p2])
    A = op.to_dense()
    root = _denman_beavers_sqrt(A)
    rhs = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    with closed_forms_only(N):
        R = op.root_decomposition().root.to_dense()
        R_inv = op.root_inv_decomposition().root.to_dense()
        whitened = op.sqrt_inv_matmul(rhs)
    torch.testing.assert_close(R, root, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(R_inv, torch.linalg.inv(root), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(whitened, torch.linalg.solve(root, rhs), rtol=1e-10, atol=1e-12)


def test_indefinite_blocks_without_a_diagonal_and_sums_that_are_not_positive_definite():
    gen = torch.Generator().manual_seed(15)
    p1 = Partition.from_labels(random_labels(N, 6, gen))
    p2 = Partition.from_labels(random_labels(N, 4, gen))
    # P_1 (c 11^T) P_1^T = P_2 (c 11^T) P_2^T: B_1 - c and B_2 + c give the same (positive semidefinite) matrix
    B1, B2 = psd(6, (), gen) - 5.0, psd(4, (), gen) + 5.0
    assert float(torch.linalg.eigvalsh(B1)[0]) < -1
    zero = BlockMeanSumLinearOperator(torch.zeros(N, dtype=torch.float64), B1, B2, partitions=[p1, p2])
    A = zero.to_dense()
    with closed_forms_only(N):
        R = zero.root_decomposition().root.to_dense()
    torch.testing.assert_close(R @ R.mT, A, rtol=0, atol=1e-12 * float(A.abs().max()))
    torch.testing.assert_close(R, R.mT, rtol=0, atol=1e-12 * float(A.abs().max()))  # the symmetric root Z X Z^T
    # indefinite beyond what the diagonal covers: an error that says so, not a wrong root
    small = torch.full((N,), 0.1, dtype=torch.float64)
    bad = BlockMeanSumLinearOperator(small, B1, psd(4, (), gen), partitions=[p1, p2])
    assert float(torch.linalg.eigvalsh(bad.to_dense())[0]) < 0
    with pytest.raises(ValueError, match="not positive definite"):
        bad.root_decomposition()
    bad_zero = BlockMeanSumLinearOperator(torch.zeros(N, dtype=torch.float64), B1, psd(4, (), gen), partitions=[p1, p2])
    with pytest.raises(ValueError, match="not positive semidefinite"):
        bad_zero.root_decomposition()


# ---------------------------------------------------------------------------- entry points
def _pieces(batch=(), dtype=torch.float64):
    gen = torch.Generator().manual_seed(11)
    p1 = Partition.from_labels(random_labels(N, 7, gen))
    p2 = Partition.from_labels(random_labels(N, 4, gen))
    M1 = BlockMeanLinearOperator(
        (torch.rand(*batch, 7, generator=gen, dtype=torch.float64) + 0.3).to(dtype), psd(7, batch, gen).to(dtype), p1
    )
    M2 = BlockMeanLinearOperator(
        (torch.rand(*batch, 4, generator=gen, dtype=torch.float64) + 0.3).to(dtype), psd(4, batch, gen).to(dtype), p2
    )
    d = (torch.rand(*batch, N, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    U = torch.randn(*batch, N, 3, generator=gen, dtype=torch.float64).to(dtype)
    return M1, M2, d, U


ENTRY_POINTS = {
    "M+Diag": lambda M1, M2, d, U: M1 + DiagLinearOperator(d),
    "Diag+M": lambda M1, M2, d, U: DiagLinearOperator(d) + M1,
    "add_diagonal": lambda M1, M2, d, U: M1.add_diagonal(d),
    "M+ConstantDiag": lambda M1, M2, d, U: M1 + ConstantDiagLinearOperator(d[..., :1] * 0 + 0.7, N),
    "M+LowRank": lambda M1, M2, d, U: M1 + LowRankRootLinearOperator(U),
    "LowRank+M": lambda M1, M2, d, U: LowRankRootLinearOperator(U) + M1,
    "LowRankAddedDiag+M": lambda M1, M2, d, U: (
        LowRankRootAddedDiagLinearOperator(LowRankRootLinearOperator(U), DiagLinearOperator(d)) + M1
    ),
    "M1+M2": lambda M1, M2, d, U: M1 + M2,
    "(M1+Diag)+(LowRank+M2)": lambda M1, M2, d, U: (M1 + DiagLinearOperator(d)) + (LowRankRootLinearOperator(U) + M2),
    "Diag+(M1+M2)": lambda M1, M2, d, U: DiagLinearOperator(d) + (M1 + M2),
    "LowRank+(Diag+(M2+M1))": lambda M1, M2, d, U: LowRankRootLinearOperator(U) + (DiagLinearOperator(d) + (M2 + M1)),
    "(LowRank+Diag)+M1+M2": lambda M1, M2, d, U: (LowRankRootLinearOperator(U) + DiagLinearOperator(d)) + M1 + M2,
    "(M1+M2).add_diagonal": lambda M1, M2, d, U: (M1 + M2).add_diagonal(d),
    "(M1+LowRank)+ConstantDiag": lambda M1, M2, d, U: (
        (M1 + LowRankRootLinearOperator(U)) + ConstantDiagLinearOperator(d[..., :1] * 0 + 0.7, N)
    ),
    "M1+M1": lambda M1, M2, d, U: M1 + M1,
    "closed_form(Sum)": lambda M1, M2, d, U: bma_gp.closed_form(
        SumLinearOperator(M1, DiagLinearOperator(d), LowRankRootLinearOperator(U))
    ),
    "closed_form(AddedDiag)": lambda M1, M2, d, U: bma_gp.closed_form(
        AddedDiagLinearOperator(M1, DiagLinearOperator(d))
    ),
    "closed_form(nested)": lambda M1, M2, d, U: bma_gp.closed_form(
        SumLinearOperator(SumLinearOperator(M1, M2), AddedDiagLinearOperator(M2, DiagLinearOperator(d)))
    ),
}
_DENSE_ENTRY = {
    "M+Diag": lambda M1, M2, d, U: M1 + torch.diag_embed(d),
    "Diag+M": lambda M1, M2, d, U: M1 + torch.diag_embed(d),
    "add_diagonal": lambda M1, M2, d, U: M1 + torch.diag_embed(d),
    "M+ConstantDiag": lambda M1, M2, d, U: M1 + 0.7 * torch.eye(N, dtype=d.dtype),
    "M+LowRank": lambda M1, M2, d, U: M1 + U @ U.mT,
    "LowRank+M": lambda M1, M2, d, U: M1 + U @ U.mT,
    "LowRankAddedDiag+M": lambda M1, M2, d, U: M1 + U @ U.mT + torch.diag_embed(d),
    "M1+M2": lambda M1, M2, d, U: M1 + M2,
    "(M1+Diag)+(LowRank+M2)": lambda M1, M2, d, U: M1 + M2 + U @ U.mT + torch.diag_embed(d),
    "Diag+(M1+M2)": lambda M1, M2, d, U: M1 + M2 + torch.diag_embed(d),
    "LowRank+(Diag+(M2+M1))": lambda M1, M2, d, U: M1 + M2 + U @ U.mT + torch.diag_embed(d),
    "(LowRank+Diag)+M1+M2": lambda M1, M2, d, U: M1 + M2 + U @ U.mT + torch.diag_embed(d),
    "(M1+M2).add_diagonal": lambda M1, M2, d, U: M1 + M2 + torch.diag_embed(d),
    "(M1+LowRank)+ConstantDiag": lambda M1, M2, d, U: M1 + U @ U.mT + 0.7 * torch.eye(N, dtype=d.dtype),
    "M1+M1": lambda M1, M2, d, U: 2 * M1,
    "closed_form(Sum)": lambda M1, M2, d, U: M1 + U @ U.mT + torch.diag_embed(d),
    "closed_form(AddedDiag)": lambda M1, M2, d, U: M1 + torch.diag_embed(d),
    "closed_form(nested)": lambda M1, M2, d, U: M1 + 2 * M2 + torch.diag_embed(d),
}


@batches
def test_entry_points_return_the_closed_form_class(batch):
    M1, M2, d, U = _pieces(batch)
    rhs = torch.randn(*batch, N, 2, dtype=torch.float64)
    check = Checks()
    for entry, build in ENTRY_POINTS.items():

        def run(build=build, entry=entry):
            op = build(M1, M2, d, U)
            assert isinstance(op, CLOSED), f"gave {type(op).__name__}"
            A = _DENSE_ENTRY[entry](M1.to_dense(), M2.to_dense(), d, U)
            expected = torch.linalg.solve(A, rhs), torch.logdet(A)
            assert_close(op.to_dense(), A, torch.float64)
            with closed_forms_only(N):
                solved, logdet = op.solve(rhs), op.logdet()
            assert_close(solved, expected[0], torch.float64)
            assert_close(logdet, expected[1], torch.float64)

        check(entry, run)
    check.done()


def test_entry_point_classes():
    M1, M2, d, U = _pieces()
    # a diagonal that is constant inside every block keeps the single-partition operator
    assert type(M1 + ConstantDiagLinearOperator(torch.tensor([0.7], dtype=torch.float64), N)) is BlockMeanLinearOperator
    assert type(M1 + M1) is BlockMeanLinearOperator
    for entry in [
        "M+Diag",
        "Diag+M",
        "add_diagonal",
        "M+LowRank",
        "LowRank+M",
        "LowRankAddedDiag+M",
        "M1+M2",
        "(M1+Diag)+(LowRank+M2)",
        "LowRank+(Diag+(M2+M1))",
        "closed_form(Sum)",
    ]:
        assert type(ENTRY_POINTS[entry](M1, M2, d, U)) is BlockMeanSumLinearOperator, entry
    # the structure is kept: one term per distinct partition, the roots concatenated
    op = ENTRY_POINTS["LowRank+(Diag+(M2+M1))"](M1, M2, d, U)
    assert sorted(op.num_blocks) == [4, 7] and op.rank == 3 and op.capacitance_size == 14
    op = (LowRankRootLinearOperator(U) + M1) + LowRankRootLinearOperator(U[..., :2])
    assert isinstance(op, BlockMeanSumLinearOperator) and op.rank == 5


def test_entry_points_float32():
    M1, M2, d, U = _pieces(dtype=torch.float32)
    op = LowRankRootLinearOperator(U) + (DiagLinearOperator(d) + (M1 + M2))
    assert isinstance(op, BlockMeanSumLinearOperator) and op.dtype == torch.float32
    A = (M1.to_dense() + M2.to_dense() + U @ U.mT + torch.diag(d)).double()
    assert_close(op.logdet(), torch.logdet(A), torch.float32)


# ---------------------------------------------------------------------------- no iterative / dense paths
def _all_methods(op, rhs, weight):
    R = op.root_decomposition().root
    Rinv = op.root_inv_decomposition().root
    eps = torch.randn(*op.batch_shape, R.shape[-1], 2, dtype=op.dtype)
    values = [
        op.solve(rhs),
        op.solve(rhs, rhs.mT),
        *op.inv_quad_logdet(rhs, logdet=True),
        *op.inv_quad_logdet(rhs, logdet=True, reduce_inv_quad=False),
        op.inv_quad(rhs),
        op.logdet(),
        op.diagonal(),
        op.matmul(rhs),
        R.matmul(eps),
        Rinv.matmul(rhs),
        R._t_matmul(rhs),
        Rinv._t_matmul(rhs),
    ]
    return sum((v * (weight if v.shape == weight.shape else 1)).sum() for v in values)


@pytest.mark.parametrize("size", [0, 10**6], ids=["cholesky0", "cholesky1e6"])
def test_closed_forms_only(size):
    # every contract method and its backward pass, at both max_cholesky_size extremes, with CG,
    # Lanczos, psd_safe_cholesky and every dense factorisation of size >= n refused
    check = Checks()
    with gpytorch.settings.max_cholesky_size(size), linear_operator.settings.max_cholesky_size(size):
        with closed_forms_only(N):
            for structure, batch in [("crossed_diagB", ()), ("nested_root", (2,))]:
                if True:

                    def run(structure=structure, batch=batch):
                        case = Case(structure, torch.float64, batch, seed=12).requires_grad_()
                        rhs = torch.randn(*batch, N, 3, dtype=torch.float64, requires_grad=True)
                        weight = torch.randn(*batch, N, 3, dtype=torch.float64)
                        op = case.op()
                        _all_methods(op, rhs, weight).backward()
                        # linear_operator's functional entry points
                        linear_operator.inv_quad_logdet(op, rhs, logdet=True)
                        linear_operator.solve(op, rhs)
                        for leaf in [rhs, *case.leaves()]:
                            assert leaf.grad is not None and torch.isfinite(leaf.grad).all()

                    check(f"{structure}{batch}", run)
    check.done()


@pytest.mark.parametrize("size", [0, 10**6], ids=["cholesky0", "cholesky1e6"])
def test_closed_forms_only_entry_points(size):
    M1, M2, d, U = _pieces(batch=(2,))
    rhs = torch.randn(2, N, 2, dtype=torch.float64)
    with gpytorch.settings.max_cholesky_size(size), linear_operator.settings.max_cholesky_size(size):
        with closed_forms_only(N):
            for build in ENTRY_POINTS.values():
                op = build(M1, M2, d, U)
                op.solve(rhs), op.inv_quad_logdet(rhs, logdet=True), op.diagonal(), op.matmul(rhs)
                op.root_decomposition().root.to_dense()


def test_closed_forms_only_with_gpytorch_mvn():
    # GPyTorch's marginal log likelihood path: MultivariateNormal.log_prob on the sum
    M1, M2, d, U = _pieces()
    op = LowRankRootLinearOperator(U) + (M1 + M2).add_diagonal(d)
    y = torch.randn(N, dtype=torch.float64)
    A = op.to_dense()
    for size in (0, 10**6):
        with gpytorch.settings.max_cholesky_size(size), linear_operator.settings.max_cholesky_size(size):
            with closed_forms_only(N):
                lp = gpytorch.distributions.MultivariateNormal(torch.zeros(N, dtype=torch.float64), op).log_prob(y)
        expected = torch.distributions.MultivariateNormal(torch.zeros(N, dtype=torch.float64), A).log_prob(y)
        assert_close(lp, expected, torch.float64)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("structure", ["crossed", "crossed_diagB", "crossed_root"])
def test_capacitance_limit_names_q(structure):
    case = Case(structure)
    q = sum(p.num_blocks for p in case.partitions) + (0 if case.root is None else case.root.shape[-1])
    # with a diagonal B the largest diagonal grouping is eliminated and only q - k_e (here 5) is
    # factorised (docs/math.md section 4): the limit applies to that
    limit = 4 if structure == "crossed_diagB" else 5
    rhs = torch.randn(N, 2, dtype=torch.float64)
    for method in (
        lambda op: op.solve(rhs),
        lambda op: op.logdet(),
        lambda op: op.inv_quad_logdet(rhs, True),
        lambda op: op.root_decomposition().root.to_dense(),
    ):
        with bma_gp.settings.max_capacitance_size(limit):
            with pytest.raises(ValueError, match=rf"\bq = {q}\b"):
                method(case.op())
    # under the limit everything works
    with bma_gp.settings.max_capacitance_size(q):
        case.op().logdet()


@pytest.mark.parametrize("diagonal", [False, True])
def test_negative_offset_of_a_singleton_block_stays_valid_in_sums(diagonal):
    """Of a singleton block only lam_i + B_ii is visible, so a negative lam_i is a valid operator; in a sum it moves
    into B_ii instead of making the per-point diagonal negative (which the sums' closed forms refuse)."""
    part = Partition.from_sizes([1, 3, 4, 1])
    lam = torch.tensor([-0.5, 1.0, 1.0, -0.2], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([2.0, 0.5, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    v = torch.linspace(0.1, 0.3, 9, dtype=torch.float64)
    rhs = torch.randn(9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def M():
        return BlockMeanLinearOperator(lam, b if diagonal else torch.diag_embed(b), part, diagonal=diagonal)

    builders = (
        lambda: M().add_diagonal(v),
        lambda: M() + DiagLinearOperator(v),
        lambda: M() + DiagLinearOperator(v) + second_grouping(part.n),
    )
    for build in builders:
        S = build()
        assert isinstance(S, BlockMeanSumLinearOperator)
        A = S.to_dense()
        assert torch.linalg.eigvalsh(A).min() > 0
        with closed_forms_only(9):
            quad, logdet = S.inv_quad_logdet(rhs, logdet=True)
            solved = S.solve(rhs)
        torch.testing.assert_close(solved, torch.linalg.solve(A, rhs), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(logdet, torch.logdet(A), rtol=1e-10, atol=1e-12)
        ref = (rhs * torch.linalg.solve(A, rhs)).sum() + torch.logdet(A)
        grads = torch.autograd.grad(quad + logdet, (lam, b), retain_graph=True)  # A shares S's graph
        for g, r in zip(grads, torch.autograd.grad(ref, (lam, b))):
            torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_singleton_without_positive_offset_in_sums_without_noise(diagonal, dtype, batch):
    """A singleton block with lam_i <= 0 and no noise: the sum's per-point diagonal would be 0 there (the closed
    forms divide by it) although the sum is positive definite; a share of B_ii moves into it. Against dense: solve,
    log-determinant, the root, and the gradients of lam, B and U. Before: 'needs a positive per-point diagonal d'."""
    gen = torch.Generator().manual_seed(3)
    part = Partition.from_labels(torch.tensor([2, 0, 0, 1, 3, 1, 0, 1, 4]))  # blocks 2, 3, 4 are singletons
    lam = torch.tensor([0.5, 0.4, 0.0, -0.3, -1.5], dtype=dtype).expand(*batch, 5).clone().requires_grad_()
    b = torch.tensor([0.6, 0.8, 2.0, 1.0, 1.7], dtype=dtype)
    if diagonal:
        B = b.expand(*batch, 5).clone().requires_grad_()
    else:
        off = 0.05 * torch.randn(5, 5, dtype=torch.float64, generator=gen).to(dtype)
        B = (torch.diag_embed(b) + off + off.mT).expand(*batch, 5, 5).clone().requires_grad_()
    U = (0.3 * torch.randn(*batch, 9, 2, dtype=torch.float64, generator=gen)).to(dtype).requires_grad_()
    rhs = torch.randn(9, 2, dtype=torch.float64, generator=gen).to(dtype)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)

    def M():
        return BlockMeanLinearOperator(lam, B, part, diagonal=diagonal)

    second = second_grouping(9).to(dtype)
    for build, other in (
        (lambda: M() + LowRankRootLinearOperator(U), lambda: U @ U.mT),
        (lambda: LowRankRootLinearOperator(U) + M(), lambda: U @ U.mT),
        (lambda: M() + second, second.to_dense),
    ):
        S = build()
        assert isinstance(S, BlockMeanSumLinearOperator)
        assert bool((S.diag_values > 0).all())  # the moved share
        A = M().to_dense() + other()
        torch.testing.assert_close(S.to_dense(), A, **tol)  # the same matrix
        assert torch.linalg.eigvalsh(A.double()).min() > 0.05
        with closed_forms_only(9):
            quad, logdet = S.inv_quad_logdet(rhs, logdet=True)
            solved = S.solve(rhs)
            root = S.root_decomposition().root.to_dense()
        torch.testing.assert_close(solved, torch.linalg.solve(A, rhs), **tol)
        torch.testing.assert_close(logdet, torch.logdet(A), **tol)
        torch.testing.assert_close(root @ root.mT, A, **tol)
        leaves = [x for x in (lam, B, U) if x.requires_grad]
        ref = (rhs * torch.linalg.solve(A, rhs)).sum((-1, -2)) + torch.logdet(A)
        grads = torch.autograd.grad((quad + logdet).sum(), leaves, retain_graph=True, allow_unused=True)
        refs = torch.autograd.grad(ref.sum(), leaves, allow_unused=True)
        for g, r in zip(grads, refs):
            if r is None:  # U is not in the second grouping's sum
                continue
            torch.testing.assert_close(g, r, rtol=tol["rtol"] * 100, atol=tol["atol"] * 100)


def test_singleton_with_no_positive_variance_still_refused():
    """Where a singleton's own d + B_ii is not positive either, nothing moves and the error stays clear."""
    part = Partition.from_sizes([1, 3])
    M = BlockMeanLinearOperator(
        torch.tensor([0.0, 1.0], dtype=torch.float64), torch.diag(torch.tensor([0.0, 1.0], dtype=torch.float64)), part
    )
    S = M + LowRankRootLinearOperator(torch.ones(4, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"positive per-point diagonal d, but d\[0\] = 0"):
        S.logdet()


def second_grouping(n: int) -> BlockMeanLinearOperator:
    labels = torch.arange(n) % 2
    return BlockMeanLinearOperator(
        torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64) * 0.3, Partition.from_labels(labels)
    )


def test_non_finite_inputs_of_a_sum_are_named():
    """A NaN in a block matrix or the root reaches the capacitance as 'not positive definite'; the error names the
    input instead, and a NaN lam (spread into d) points at lam as well as at the noise."""
    part = Partition.from_sizes([3, 4, 5])
    rhs = torch.ones(12, 1, dtype=torch.float64)
    noise = DiagLinearOperator(torch.linspace(0.1, 0.2, 12, dtype=torch.float64))
    B = torch.eye(3, dtype=torch.float64)
    B[0, 1] = B[1, 0] = math.nan
    ones = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"not finite: blocks\[0\]\[0, 1\] = nan"):
        (BlockMeanLinearOperator(ones, B, part) + noise).solve(rhs)
    U = torch.ones(12, 1, dtype=torch.float64)
    U[3, 0] = math.nan
    plain = BlockMeanLinearOperator(ones, torch.eye(3, dtype=torch.float64), part)
    with pytest.raises(ValueError, match=r"not finite: the root U\[3, 0\] = nan"):
        (plain + noise + LowRankRootLinearOperator(U)).logdet()
    lam = ones.clone()
    lam[1] = math.nan
    with pytest.raises(ValueError, match=r"d\[3\] = nan is not finite.*lam"):
        (BlockMeanLinearOperator(lam, torch.eye(3, dtype=torch.float64), part) + noise).solve(rhs)


@pytest.mark.parametrize("bad", [0.0, -0.5, math.nan])
def test_non_positive_diagonal_names_d(bad):
    case = Case("crossed_root")
    case.d = case.d.clone()
    case.d[17] = bad
    rhs = torch.randn(N, 2, dtype=torch.float64)
    for method in (
        lambda op: op.solve(rhs),
        lambda op: op.logdet(),
        lambda op: op.inv_quad_logdet(rhs, True),
        lambda op: op.inv_quad(rhs),
        lambda op: op.root_decomposition().root.to_dense(),
    ):
        with pytest.raises(ValueError, match=r"\bd\[17\]"):
            method(case.op())


def test_dense_summand_warns_fallback():
    M1, M2, d, U = _pieces()
    dense = DenseLinearOperator(torch.eye(N, dtype=torch.float64) * 2)
    b = torch.randn(N, dtype=torch.float64)
    res = M1 + dense  # building and multiplying are silent; the generic solve says so when it runs
    assert isinstance(res, bma_gp.FallbackSumLinearOperator) and not isinstance(res, CLOSED)
    torch.testing.assert_close(res.to_dense(), M1.to_dense() + dense.to_dense())
    with pytest.warns(bma_gp.ClosedFormFallbackWarning):
        res.solve(b)
    res = dense + (M1 + DiagLinearOperator(d))
    assert isinstance(res, bma_gp.FallbackSumLinearOperator)
    with pytest.warns(bma_gp.ClosedFormFallbackWarning):
        res.add_diagonal(torch.tensor(0.5, dtype=torch.float64)).inv_quad_logdet(b.unsqueeze(-1), logdet=True)
    with pytest.raises(ValueError):
        bma_gp.closed_form(SumLinearOperator(M1, dense))
    # noise added with + (what a likelihood does to an eagerly evaluated kernel) keeps the fallback and its warning
    noise = torch.full((N,), 0.1, dtype=torch.float64)
    fallback = M1 + dense
    for res in (
        fallback + DiagLinearOperator(noise),
        DiagLinearOperator(noise) + fallback,
        fallback + ConstantDiagLinearOperator(torch.tensor([0.1], dtype=torch.float64), N),
        fallback + DenseLinearOperator(torch.eye(N, dtype=torch.float64)),
    ):
        assert isinstance(res, bma_gp.FallbackSumLinearOperator)
        torch.testing.assert_close(res.to_dense(), fallback.to_dense() + res.linear_ops[-1].to_dense())
        with pytest.warns(bma_gp.ClosedFormFallbackWarning):
            res.solve(b)
    # sums without a block mean operator are untouched and do not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = DiagLinearOperator(d) + dense
    assert not isinstance(res, CLOSED)


# ---------------------------------------------------------------------------- memory: no k x k from a diagonal B_j
def test_diagonal_block_is_never_formed_when_another_block_is_dense():
    # A many-level grouping held as its diagonal next to a dense one: asking for the dense B_1 once formed every
    # block as a matrix, the diagonal grouping's k_2 x k_2 included (80 GB at 10^5 levels in float64).
    n, k1, k2 = 6000, 20, 3000
    gen = torch.Generator().manual_seed(21)
    p1 = Partition.from_labels(torch.randint(k1, (n,), generator=gen))
    p2 = Partition.from_labels(torch.randperm(n, generator=gen) % k2)
    B1 = psd(k1, (), gen).requires_grad_(True)
    v2 = (torch.rand(k2, generator=gen, dtype=torch.float64) + 0.1).requires_grad_(True)
    d = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    U = torch.randn(n, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    rhs = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    mode = LargestTensor()
    with closed_forms_only(n), mode:
        op = (
            BlockMeanLinearOperator(torch.zeros(k1, dtype=torch.float64), B1, p1)
            + BlockMeanLinearOperator(torch.zeros(k2, dtype=torch.float64), v2, p2, diagonal=True)
            + LowRankRootLinearOperator(U)
            + DiagLinearOperator(d)
        )
        assert isinstance(op, BlockMeanSumLinearOperator) and op.diagonal_blocks == (False, True)
        inv_quad, logdet = op.inv_quad_logdet(rhs, logdet=True)
        x = op.solve(rhs)
        (inv_quad + logdet + x.sum() + op.diagonal().sum()).backward()
    assert mode.largest < k2 * k2 // 2, f"{mode.where} returned a tensor of {mode.largest} elements"
    # the same answers as the operator with B_2 given as a matrix
    ref = BlockMeanSumLinearOperator(
        d.detach(), B1.detach(), torch.diag_embed(v2.detach()), partitions=[p1, p2], root=U.detach()
    )
    ref_quad, ref_logdet = ref.inv_quad_logdet(rhs, logdet=True)
    assert_close(inv_quad.detach(), ref_quad, torch.float64)
    assert_close(logdet.detach(), ref_logdet, torch.float64)
    assert_close(x.detach(), ref.solve(rhs), torch.float64)
    assert v2.grad is not None and B1.grad is not None and bool(v2.grad.abs().sum() > 0)


# ---------------------------------------------------------------------------- large
@pytest.mark.slow
def test_large_crossed_float32_matches_float64():
    n = 10**6
    gen = torch.Generator().manual_seed(13)
    labels = [torch.randint(k, (n,), generator=gen) for k in (50, 300)]
    partitions = [Partition.from_labels(lab) for lab in labels]
    d = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    B1 = psd(50, (), gen)
    B2 = diag_block(300, (), gen)
    U = torch.randn(n, 4, generator=gen, dtype=torch.float64) / 2
    rhs = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    results = {}
    for dtype in (torch.float64, torch.float32):
        op = BlockMeanSumLinearOperator(
            d.to(dtype), B1.to(dtype), B2.to(dtype), partitions=partitions, root=U.to(dtype)
        )
        with closed_forms_only(1000):
            inv_quad, logdet = op.inv_quad_logdet(rhs.to(dtype), logdet=True, reduce_inv_quad=False)
            results[dtype] = (op.solve(rhs.to(dtype)), op.logdet(), inv_quad, logdet)
    for a, b in zip(results[torch.float32], results[torch.float64]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    # float64 against the definition: M x = rhs
    x = results[torch.float64][0]
    op = BlockMeanSumLinearOperator(d, B1, B2, partitions=partitions, root=U)
    torch.testing.assert_close(op.matmul(x), rhs, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------- the chunked pass over U
@pytest.fixture
def small_chunks(monkeypatch):
    """Row chunks of 1024 (the minimum) and a cast buffer of 100 rows, so n = 2100 takes three chunks, the
    last one partial, every cast of U to the working precision takes several pieces, and block sums of
    8 levels are carried over one chunk before they join the working-precision total."""
    import bma_gp.block_mean_sum_linear_operator as module

    monkeypatch.setattr(module, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(module, "_CAST_ROWS", 100)
    monkeypatch.setattr(module, "_FLUSH_TERMS", 256)  # k = 8: block sums join the total every second chunk
    assert module._chunk_rows(3) == 1024


CHUNKED = [("crossed_root", (), ()), ("nested_root", (2,), ()), ("crossed_root", (), (0, 1))]


@pytest.mark.parametrize("structure,batch,weights", CHUNKED, ids=["crossed", "nested-batch2", "weighted"])
def test_gradients_over_several_chunks(small_chunks, structure, batch, weights):
    case = Case(structure, torch.float64, batch, seed=11, n=2100, weights=weights).requires_grad_()
    _gradient_checks(case, batch, seed=12, methods=["inv_quad_logdet", "solve"])


def test_float32_root_over_several_chunks(small_chunks):
    """A float32 U is cast to the float64 working precision piece by piece: values and gradients agree with
    the float64 operator on the same leaves."""
    case64 = Case("crossed_root", torch.float64, (), seed=13, n=2600, weights=(1,)).requires_grad_()
    case32 = Case("crossed_root", torch.float32, (), seed=13, n=2600, weights=(1,)).requires_grad_()
    rhs = torch.randn(2600, 2, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    results = []
    for case in (case64, case32):
        quad, logdet = case.op().inv_quad_logdet(rhs.to(case.dtype), logdet=True)
        grads = _grads(quad + logdet, case.leaves())
        results.append((quad, logdet, grads))
    (q64, l64, g64), (q32, l32, g32) = results
    assert_close(q32, q64, torch.float32)
    assert_close(l32, l64, torch.float32)
    for a, e in zip(g32, g64):
        assert_close(a, e, torch.float32)


# ---------------------------------------------------------------------------- caches across grad modes
@pytest.mark.parametrize("method", ["logdet", "solve", "inv_quad_logdet"])
def test_a_call_under_no_grad_leaves_no_graphless_cache_for_later_gradients(method):
    """A closed form computed under ``no_grad`` caches the factorisation; a later call with gradients must not
    use it (it has no graph): the gradients equal those of a fresh operator. Calls without gradients still share
    one factorisation."""
    gen = torch.Generator().manual_seed(3)
    n = 60
    parts = [Partition.from_labels(random_labels(n, k, gen)) for k in (7, 4)]
    leaves = [
        (0.5 + torch.rand(7, generator=gen, dtype=torch.float64)).requires_grad_(),
        (0.5 + torch.rand(4, generator=gen, dtype=torch.float64)).requires_grad_(),
        (0.5 + torch.rand(n, generator=gen, dtype=torch.float64)).requires_grad_(),
        (0.3 * torch.randn(n, 2, generator=gen, dtype=torch.float64)).requires_grad_(),
    ]
    rhs = torch.randn(n, 2, generator=gen, dtype=torch.float64)

    def build():
        b1, b2, d, U = leaves
        return BlockMeanSumLinearOperator(d, b1, b2, partitions=parts, root=U, diagonal=[True, True])

    def loss(op):
        if method == "logdet":
            return op.logdet()
        if method == "solve":
            return (op.solve(rhs) * rhs).sum()
        inv_quad, logdet = op.inv_quad_logdet(rhs, logdet=True)
        return inv_quad + logdet

    op = build()
    calls = []
    factorise = op._factorise
    op._factorise = lambda: calls.append(1) or factorise()
    with torch.no_grad():
        first = loss(op)
        assert torch.equal(loss(op), first)
    assert len(calls) == 1  # without gradients the factorisation is kept
    got = torch.autograd.grad(loss(op), leaves)
    want = torch.autograd.grad(loss(build()), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_cholesky_and_entropy_say_they_factorise_the_dense_matrix():
    """A triangular factor has no closed form: cholesky() (and so MultivariateNormal.entropy) takes the dense path
    and says so; the values are right."""
    M1, _, d, _ = _pieces()
    builders = (lambda: M1 + DiagLinearOperator(d), lambda: M1.add_diagonal(torch.tensor(0.5, dtype=torch.float64)))
    for build in builders:
        op = build()
        with pytest.warns(bma_gp.ClosedFormFallbackWarning, match="cholesky of a"):
            L = op.cholesky().to_dense()
        torch.testing.assert_close(L @ L.mT, op.to_dense())
        op = build()  # the factor is cached on the operator
        mvn = gpytorch.distributions.MultivariateNormal(torch.zeros(N, dtype=torch.float64), op)
        with pytest.warns(bma_gp.ClosedFormFallbackWarning):
            entropy = mvn.entropy()
        ref = 0.5 * N * (1 + math.log(2 * math.pi)) + 0.5 * torch.logdet(op.to_dense())
        torch.testing.assert_close(entropy, ref)


def test_an_explicit_sum_linear_operator_with_noise_is_routed():
    """SumLinearOperator(M1, M2) built directly, plus a diagonal (+ or add_diagonal): the closed form when every term
    has one, else a fallback sum that warns; never linear_operator's silent generic sum."""
    M1, M2, d, _ = _pieces()
    rhs = torch.randn(N, 2, dtype=torch.float64)
    explicit = SumLinearOperator(M1, M2)
    for res in (explicit + DiagLinearOperator(d), explicit.add_diagonal(d)):
        assert isinstance(res, BlockMeanSumLinearOperator)
        A = M1.to_dense() + M2.to_dense() + torch.diag(d)
        with closed_forms_only(N):
            solved = res.solve(rhs)
        torch.testing.assert_close(solved, torch.linalg.solve(A, rhs))
    dense = DenseLinearOperator(torch.eye(N, dtype=torch.float64))
    res = SumLinearOperator(M1, dense).add_diagonal(d)
    assert isinstance(res, bma_gp.FallbackSumLinearOperator)
    with pytest.warns(bma_gp.ClosedFormFallbackWarning):
        res.solve(rhs)


@pytest.mark.parametrize("size", [2, 3, 7, 10, 30])
def test_a_diagonal_constant_in_every_block_keeps_the_block_mean_operator(size):
    # before: the block average of d was compared with d exactly, and 7 entries of 0.1 average to 0.1 + 1 ulp, so
    # blocks of 7 points made a constant noise a BlockMeanSumLinearOperator (without the single-partition forms)
    p = Partition.from_labels(torch.arange(4 * size) % 4)
    M = BlockMeanLinearOperator(torch.ones(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), p)
    d = torch.full((4 * size,), 0.1, dtype=torch.float64)
    d[torch.arange(4 * size) % 4 == 2] = 0.3  # another constant in one block
    for op in (M + DiagLinearOperator(d), M.add_diagonal(d), DiagLinearOperator(d) + M):
        assert type(op) is BlockMeanLinearOperator
        torch.testing.assert_close(op.to_dense(), M.to_dense() + torch.diag(d), rtol=0, atol=0)
    d[5] += 1e-3  # not constant in its block: a sum
    assert isinstance(M + DiagLinearOperator(d), BlockMeanSumLinearOperator)


def test_a_dense_matrix_summand_warns_when_solved():
    # before: M + torch.Tensor gave linear_operator's plain SumLinearOperator, whose solves were silent
    p = Partition.from_labels(torch.arange(20) % 4)
    M = BlockMeanLinearOperator(torch.ones(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), p)
    dense = torch.eye(20, dtype=torch.float64) + 0.01
    rhs = torch.ones(20, 1, dtype=torch.float64)
    for op in (M + dense, dense + M, (M + DiagLinearOperator(torch.rand(20, dtype=torch.float64))) + dense):
        with pytest.warns(bma_gp.ClosedFormFallbackWarning):
            solved = op.solve(rhs)
        torch.testing.assert_close(op.to_dense() @ solved, rhs)


@pytest.mark.parametrize("kind", ["root_decomposition", "root_inv_decomposition"])
def test_singular_blocks_give_exact_root_gradients(kind):
    # before: B_j^{1/2} at a zero eigenvalue (a rank-one B, a group variance exactly 0) made these gradients NaN or
    # -inf; such blocks now take the Gram-matrix root, which is smooth in B_j
    gen = torch.Generator().manual_seed(18)
    p1 = Partition.from_labels(random_labels(N, 5, gen))
    p2 = Partition.from_labels(random_labels(N, 3, gen))
    Z1 = torch.nn.functional.one_hot(p1.labels, 5).double()
    Z2 = torch.nn.functional.one_hot(p2.labels, 3).double()
    d = torch.rand(N, generator=gen, dtype=torch.float64) + 0.1
    W = torch.randn(5, 1, generator=gen, dtype=torch.float64)
    probe = torch.randn(N, N, generator=gen, dtype=torch.float64)
    for B1, diagonal in ((W @ W.mT, False), (torch.tensor([0.5, 0.0, 1.0, 0.3, 0.2], dtype=torch.float64), True)):
        B1 = B1.clone().requires_grad_(True)
        op = BlockMeanSumLinearOperator(
            d, B1, torch.eye(3, dtype=torch.float64), partitions=[p1, p2], diagonal=[diagonal, False]
        )
        with closed_forms_only(N):
            R = getattr(op, kind)().root.to_dense()
            grad = torch.autograd.grad(((R @ R.mT) * probe).sum(), B1)[0]
        G1 = torch.diag(B1) if diagonal else B1
        M = torch.diag(d) + Z1 @ G1 @ Z1.mT + Z2 @ Z2.mT
        target = M if kind == "root_decomposition" else torch.linalg.inv(M)
        ref = torch.autograd.grad((target * probe).sum(), B1)[0]
        if not diagonal:
            grad, ref = 0.5 * (grad + grad.mT), 0.5 * (ref + ref.mT)
        assert bool(torch.isfinite(grad).all())
        torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-11 * float(ref.abs().max()))


def test_roots_without_a_diagonal_have_finite_gradients_where_the_gram_matrix_is_singular():
    # d = 0, an indefinite B_1 and a second grouping: F G F is singular in the crossed direction, where the square
    # root's derivative was inf times 0 (NaN for some random draws)
    for seed in range(6):
        gen = torch.Generator().manual_seed(100 + seed)
        p1 = Partition.from_labels(random_labels(N, 7, gen))
        p2 = Partition.from_labels(torch.zeros(N, dtype=torch.long))  # one level: the sum of P_1's columns
        # P_1 (B - 3) P_1^T + 3.1: the same matrix as P_1 B P_1^T + 0.1, positive semidefinite, while B_1 is not
        B1 = (psd(7, (), gen) - 3.0).requires_grad_(True)
        B2 = torch.tensor([[3.1]], dtype=torch.float64, requires_grad=True)
        op = BlockMeanSumLinearOperator(torch.zeros(N, dtype=torch.float64), B1, B2, partitions=[p1, p2])
        R = op.root_decomposition().root.to_dense()
        Z1 = torch.nn.functional.one_hot(p1.labels, 7).double()
        M = Z1 @ B1 @ Z1.mT + B2 * torch.ones(N, N, dtype=torch.float64)
        torch.testing.assert_close(R @ R.mT, M, rtol=0, atol=1e-12 * float(M.abs().max()))
        probe = torch.randn(N, N, generator=gen, dtype=torch.float64)
        grads = torch.autograd.grad(((R @ R.mT) * probe).sum(), [B1, B2])
        refs = torch.autograd.grad((M * probe).sum(), [B1, B2])
        for g, r in zip(grads, refs):
            assert bool(torch.isfinite(g).all()), seed
            g, r = (0.5 * (g + g.mT), 0.5 * (r + r.mT)) if g.shape[-1] > 1 else (g, r)
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11 * float(r.abs().max()))


def test_a_negative_multiple_of_a_sum_warns_when_solved():
    # before: M * c with c < 0 was linear_operator's plain ConstantMulLinearOperator, which took a dense Cholesky
    # (CG past max_cholesky_size) silently
    M1, M2, d, U = _pieces()
    op = M1 + M2 + DiagLinearOperator(d)
    rhs = torch.randn(N, 2, dtype=torch.float64)
    dense = -1.5 * op.to_dense()
    for scaled in (op * -1.5, op.mul(torch.tensor(-1.5, dtype=torch.float64)), -1.5 * op):
        assert isinstance(scaled, bma_gp.FallbackScaledLinearOperator)
        with closed_forms_only(N):  # products, solves and the inverse quadratic form: M's closed forms over c
            product, solved, solved_vector = scaled @ rhs, scaled.solve(rhs), scaled.solve(rhs[:, 0])
            inv_quad, _ = scaled.inv_quad_logdet(rhs, logdet=False, reduce_inv_quad=False)
        reference = torch.linalg.solve(dense, rhs)
        torch.testing.assert_close(product, dense @ rhs)
        torch.testing.assert_close(solved, reference)
        torch.testing.assert_close(solved_vector, reference[:, 0])
        torch.testing.assert_close(inv_quad, (rhs * reference).sum(0))
        with pytest.raises(ValueError, match="negative multiple.*no real root"):  # was a zero root, after a warning
            scaled.root_decomposition()
    assert isinstance(op * 2.0, BlockMeanSumLinearOperator)  # a positive factor keeps the closed forms


@pytest.mark.parametrize("batched", [False, True])
def test_detach_in_place(batched):
    """``detach_()`` as linear_operator's: before, the sum's broadcast views of d, B and U made torch refuse
    ('Can't detach views in-place'). After it, no tensor of the sum requires gradients, results computed before
    (with a graph) are gone, and the values are unchanged."""
    gen = torch.Generator().manual_seed(5)
    part = Partition.from_labels(torch.tensor([0, 1, 1, 2, 0, 2, 2, 1]))
    lam = (torch.rand(3, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    B = torch.eye(3, dtype=torch.float64).expand(*((2,) if batched else ()), 3, 3).clone().requires_grad_()
    d = (torch.rand(8, dtype=torch.float64, generator=gen) + 0.1).requires_grad_()
    U = torch.randn(8, 2, dtype=torch.float64, generator=gen).requires_grad_()
    for S in (
        BlockMeanLinearOperator(lam, B, part) + DiagLinearOperator(d),
        BlockMeanLinearOperator(lam, B, part) + LowRankRootLinearOperator(U),
    ):
        assert S.logdet().requires_grad
        dense = S.to_dense().detach()
        assert S.detach_() is S
        assert not any(t.requires_grad for t in S.representation())
        logdet = S.logdet()
        assert not logdet.requires_grad
        torch.testing.assert_close(logdet, torch.logdet(dense))
        torch.testing.assert_close(S.to_dense(), dense)


def test_dense_fallback_warnings_name_the_callers_line():
    """The ClosedFormFallbackWarning of cholesky() (through linear_operator's method) named a line inside
    linear_operator (a fixed stacklevel); it names the caller's line, as the solve fallback's does (user trial)."""
    part = Partition.from_labels(torch.arange(12) % 3)
    M = BlockMeanLinearOperator(torch.ones(3, dtype=torch.float64) + 1, torch.eye(3, dtype=torch.float64), part)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        M.cholesky()
        line = inspect.currentframe().f_lineno - 1
        M.to_dense()  # no warning
    found = [w for w in caught if issubclass(w.category, bma_gp.ClosedFormFallbackWarning)]
    assert len(found) == 1 and "cholesky of a BlockMeanLinearOperator" in str(found[0].message)
    assert (found[0].filename, found[0].lineno) == (__file__, line)
