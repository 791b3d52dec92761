"""The promises of the user-facing docs, one small check per claim: README.md, docs/gp.md ("Compositions: which
operations stay closed form", its table and the paragraph above it) and docs/mixed.md ("What stays in closed form").

Each row is built the way the docs write it, run inside ``closed_forms_only`` (CG, Lanczos and dense factorisations
of ``n x n`` matrices raise) where the docs say "closed form", and compared with a dense float64 reference computed
outside the guard. Rows that the docs say fall back must say so with a ``ClosedFormFallbackWarning``."""

from __future__ import annotations

import copy
import warnings

import gpytorch
import pytest
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel
from linear_operator.operators import (
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    LowRankRootLinearOperator,
)

from bma_gp import (
    BlockMeanKernel,
    BlockMeanLinearOperator,
    BlockMeanProductLinearOperator,
    BlockMeanSumLinearOperator,
    ChunkedInducingPointKernel,
    ClosedFormFallbackWarning,
    FallbackIndexedLinearOperator,
    FallbackMatmulLinearOperator,
    FallbackScaledLinearOperator,
    FallbackSumLinearOperator,
    GroupGaussianLikelihood,
    GroupKernel,
    Partition,
    settings,
)
from closed_form_guard import closed_forms_only
from gp_reference import GP, dense_copy
from largest_tensor import LargestTensor

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64
N = 36


def block_mean(
    k: int, seed: int, diagonal: bool = False, labels: torch.Tensor | None = None
) -> BlockMeanLinearOperator:
    generator = torch.Generator().manual_seed(seed)
    if labels is None:
        labels = torch.randint(0, k, (N,), generator=generator)
        labels[:k] = torch.arange(k)  # every block occupied
    lam = torch.rand(k, dtype=DTYPE, generator=generator) + 1
    if diagonal:
        B = torch.rand(k, dtype=DTYPE, generator=generator) + 0.5
    else:
        W = torch.randn(k, k, dtype=DTYPE, generator=generator)
        B = W @ W.T / k + 0.1 * torch.eye(k, dtype=DTYPE)
    return BlockMeanLinearOperator(lam, B, Partition.from_labels(labels), diagonal=diagonal)


def _noise() -> torch.Tensor:
    return torch.rand(N, dtype=DTYPE, generator=torch.Generator().manual_seed(9)) + 0.2


def _root() -> torch.Tensor:
    return torch.randn(N, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(8))


def _shared_labels() -> torch.Tensor:
    return block_mean(5, 0).partition.labels


# gp.md's table, the rows whose result has closed forms: (expression, builder, expected type)
CLOSED_FORM_ROWS = {
    "M.add_diagonal(c)": (lambda: block_mean(5, 0).add_diagonal(torch.tensor(0.3, dtype=DTYPE)), "BM"),
    "M + ConstantDiagLinearOperator": (
        lambda: block_mean(5, 0) + ConstantDiagLinearOperator(torch.tensor([0.3], dtype=DTYPE), N),
        "BM",
    ),
    "M + c (number)": (lambda: block_mean(5, 0) + 0.7, "BM"),
    "c + M (tensor of shape ())": (lambda: torch.tensor(0.7, dtype=DTYPE) + block_mean(5, 0), "BM"),
    "M + c (tensor of shape (1,))": (lambda: block_mean(5, 0) + torch.tensor([0.7], dtype=DTYPE), "BM"),
    "M + c (tensor of shape (1, 1))": (lambda: block_mean(5, 0) + torch.tensor([[0.7]], dtype=DTYPE), "BM"),
    "M + c (diagonal=True)": (lambda: block_mean(5, 3, diagonal=True) + 0.7, "BM"),
    "M1 + M2 on the same partition": (
        lambda: block_mean(5, 0) + block_mean(5, 2, labels=_shared_labels()),
        "BM",
    ),
    "M1 * M2 over two partitions": (lambda: block_mean(5, 0) * block_mean(7, 1), "BM"),
    "M + DiagLinearOperator(d)": (lambda: block_mean(5, 0) + DiagLinearOperator(_noise()), "SUM"),
    "M.add_diagonal(d)": (lambda: block_mean(5, 0).add_diagonal(_noise()), "SUM"),
    "M + DiagLinearOperator(d constant per block)": (
        lambda: block_mean(5, 0) + DiagLinearOperator(_noise()[:5][_shared_labels()]),
        "BM",
    ),
    "M1 + M2 over different partitions": (lambda: block_mean(5, 0) + block_mean(7, 1), "SUM"),
    "M1 + M2 + noise": (lambda: block_mean(5, 0) + block_mean(7, 1) + DiagLinearOperator(_noise()), "SUM"),
    "M + LowRankRootLinearOperator(U)": (lambda: block_mean(5, 0) + LowRankRootLinearOperator(_root()), "SUM"),
    "M.add_low_rank(U)": (lambda: block_mean(5, 0).add_low_rank(_root()), "SUM"),
    "diagonal grouping + grouping + root + noise": (
        lambda: (
            block_mean(5, 3, diagonal=True)
            + block_mean(7, 1)
            + LowRankRootLinearOperator(_root())
            + DiagLinearOperator(_noise())
        ),
        "SUM",
    ),
}


@pytest.mark.parametrize("max_cholesky_size", [0, 10**6])
@pytest.mark.parametrize("row", list(CLOSED_FORM_ROWS))
def test_gp_table_closed_form_rows(row, max_cholesky_size):
    """Each row's solve, inv_quad_logdet (also unreduced), logdet, diagonal, matmul and both roots: closed form at
    every max_cholesky_size, equal to the dense matrix's."""
    build, kind = CLOSED_FORM_ROWS[row]
    op = build()
    assert isinstance(op, BlockMeanLinearOperator if kind == "BM" else BlockMeanSumLinearOperator), type(op)
    dense = op.to_dense()
    x = torch.randn(N, 3, dtype=DTYPE)
    solved = torch.linalg.solve(dense, x)
    logdet = torch.logdet(dense)
    inverse = torch.linalg.inv(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with closed_forms_only(N), gpytorch.settings.max_cholesky_size(max_cholesky_size):
            got_solve = op.solve(x)
            inv_quad, got_logdet = op.inv_quad_logdet(x, logdet=True)
            unreduced, _ = op.inv_quad_logdet(x, logdet=True, reduce_inv_quad=False)
            plain_logdet = op.logdet()
            diagonal = op.diagonal()
            product = op @ x
            root = op.root_decomposition().root.to_dense()
            inv_root = op.root_inv_decomposition().root.to_dense()
    torch.testing.assert_close(got_solve, solved, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(inv_quad, (x * solved).sum(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(unreduced, (x * solved).sum(0), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_logdet, logdet, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(plain_logdet, logdet, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(diagonal, dense.diagonal())
    torch.testing.assert_close(product, dense @ x)
    torch.testing.assert_close(root @ root.mT, dense, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(inv_root @ inv_root.mT, inverse, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda: torch.full((1, N), 0.3, dtype=DTYPE), id="row (1, n)"),  # symmetric sums: solvable
        pytest.param(lambda: torch.full((N, 1), 0.3, dtype=DTYPE), id="column (n, 1)"),
        pytest.param(lambda: torch.eye(N, dtype=DTYPE).expand(2, N, N).clone(), id="batch (2, n, n)"),
        pytest.param(lambda: DenseLinearOperator(torch.eye(N, dtype=DTYPE).expand(2, N, N).clone()), id="operator"),
    ],
)
@pytest.mark.parametrize("summand", ["M", "S", "batch M"])
@pytest.mark.parametrize("left", [True, False])
def test_dense_summand_that_broadcasts_warns_when_solved(other, summand, left):
    """gp.md: "`M` + a dense matrix -> FallbackSumLinearOperator, with a ClosedFormFallbackWarning when it is solved".
    A dense summand that broadcasts (a row, a column, other batch dimensions) gave linear_operator's plain
    SumLinearOperator, whose solve took CG or a dense Cholesky without a word."""
    if summand == "M":
        op = block_mean(5, 0)
    elif summand == "S":
        op = block_mean(5, 0) + DiagLinearOperator(_noise())
    else:
        op = BlockMeanLinearOperator(
            torch.rand(2, 5, dtype=DTYPE) + 1, torch.eye(5, dtype=DTYPE).expand(2, 5, 5), block_mean(5, 0).partition
        )
    term = other()
    total = op + term if left else term + op
    assert isinstance(total, FallbackSumLinearOperator), type(total)
    dense_term = term.to_dense() if not torch.is_tensor(term) else term
    torch.testing.assert_close(total.to_dense(), op.to_dense() + dense_term)
    x = torch.randn(N, 2, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)
        torch.testing.assert_close(total @ x, (op.to_dense() + dense_term) @ x)  # products stay silent ...
    with pytest.warns(ClosedFormFallbackWarning, match="solve"):  # ... solves say they fall back
        solved = total.solve(x)
    torch.testing.assert_close(solved, torch.linalg.solve(op.to_dense() + dense_term, x))


@pytest.mark.parametrize("root_batch", [(), (2,)])
@pytest.mark.parametrize("diag_batch", [(), (2,)])
def test_batch_sum_of_a_sum_stays_closed_form(diag_batch, root_batch):
    """A batch of sums summed over its batch dimension is again a sum over the same partitions (gp.md: every
    expression of the family stays closed form); it was linear_operator's SumBatchLinearOperator, solved by CG and
    Lanczos without a warning."""
    labels = _shared_labels()
    lam = torch.rand(2, 5, dtype=DTYPE) + 1
    W = torch.randn(2, 5, 5, dtype=DTYPE)
    M = BlockMeanLinearOperator(lam, W @ W.mT / 5 + 0.1 * torch.eye(5, dtype=DTYPE), Partition.from_labels(labels))
    grouping = block_mean(7, 1, diagonal=True)
    noise = torch.rand(*diag_batch, N, dtype=DTYPE) + 0.2
    root = torch.randn(*root_batch, N, 2, dtype=DTYPE)
    batch = M + grouping + LowRankRootLinearOperator(root) + DiagLinearOperator(noise)
    total = batch.sum(0)
    assert isinstance(total, BlockMeanSumLinearOperator), type(total)
    dense = batch.to_dense().sum(0)
    torch.testing.assert_close(total.to_dense(), dense)
    x = torch.randn(N, 2, dtype=DTYPE)
    solved, logdet = torch.linalg.solve(dense, x), torch.logdet(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with closed_forms_only(N), gpytorch.settings.max_cholesky_size(0):
            got = total.solve(x)
            got_logdet = total.logdet()
            R = total.root_decomposition().root.to_dense()
    torch.testing.assert_close(got, solved)
    torch.testing.assert_close(got_logdet, logdet)
    torch.testing.assert_close(R @ R.mT, dense)


def _fallback_sum() -> FallbackSumLinearOperator:
    batch = BlockMeanLinearOperator(
        torch.rand(2, 5, dtype=DTYPE) + 1, torch.eye(5, dtype=DTYPE).expand(2, 5, 5), block_mean(5, 0).partition
    )
    return batch + 2 * torch.eye(N, dtype=DTYPE)


def _scaled() -> FallbackScaledLinearOperator:
    batch = BlockMeanLinearOperator(
        torch.rand(2, 5, dtype=DTYPE) + 1, torch.eye(5, dtype=DTYPE).expand(2, 5, 5), block_mean(5, 0).partition
    )
    return (batch + DiagLinearOperator(_noise())) * -2.0


def _indexed() -> FallbackIndexedLinearOperator:
    batch = BlockMeanLinearOperator(
        torch.rand(2, 5, dtype=DTYPE) + 1, torch.eye(5, dtype=DTYPE).expand(2, 5, 5), block_mean(5, 0).partition
    )
    idx = torch.tensor([3, 1, 7, 20, 11, 30])
    # built directly: indexing the same distinct points on both sides gives the principal submatrix in the family,
    # and other square indexings are not symmetric; the fallback's parts are what is checked here
    rows = idx.view(-1, 1).expand(2, -1, 1)
    ones = torch.ones(2, idx.numel(), 1, dtype=DTYPE)
    return FallbackIndexedLinearOperator(batch + DiagLinearOperator(_noise()), rows, ones, rows, ones)


@pytest.mark.parametrize(
    "derive",
    [
        pytest.param(lambda op: op[0], id="op[0]"),
        pytest.param(lambda op: op[:, :10, :10], id="op[:, :10, :10]"),
        pytest.param(lambda op: op[1, 2:8, 2:8], id="op[1, 2:8, 2:8]"),
        pytest.param(lambda op: op.sum(0), id="op.sum(0)"),
    ],
)
@pytest.mark.parametrize("make", [_fallback_sum, _scaled, _indexed], ids=["sum", "scaled", "indexed"])
def test_parts_of_a_fallback_still_warn(make, derive):
    """gp.md: a sum with a summand outside the family, a negative multiple and rows and columns other than one
    principal slice warn when they are solved. A batch entry or a slice of such a sum (what mvn[0] and mvn[..., a:b]
    ask for) was linear_operator's plain SumLinearOperator, and a sum over the batch a SumBatchLinearOperator or an
    InterpolatedLinearOperator: solved by Cholesky or CG without a word."""
    op = make()
    part = derive(op)
    dense = part.to_dense()
    x = torch.randn(dense.shape[-1], 2, dtype=DTYPE)
    reference = torch.linalg.solve(dense, x)
    if make is _scaled and not isinstance(part.base_linear_op, FallbackIndexedLinearOperator):
        # gp.md: a negative multiple's solve is the sum's closed form divided by c, also for its parts
        assert isinstance(part, FallbackScaledLinearOperator), type(part)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            with closed_forms_only(dense.shape[-1]), gpytorch.settings.max_cholesky_size(0):
                solved = part.solve(x)
    elif isinstance(part, (BlockMeanLinearOperator, BlockMeanSumLinearOperator)):
        # a batch entry or a slice of rows and columns over the same distinct points is a principal submatrix of the
        # base: in the family again, closed form
        assert make is _indexed and derive is not None
        with warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            solved = part.solve(x)
    else:
        with pytest.warns(ClosedFormFallbackWarning):
            solved = part.solve(x)
    torch.testing.assert_close(solved, reference)


def test_batch_product_of_a_sum_warns():
    """gp.md: an elementwise product of a sum with anything but a diagonal leaves the closed forms and warns when it
    is formed; over a batch dimension (``S.prod(0)``) linear_operator multiplied the entries' roots silently."""
    batch = BlockMeanLinearOperator(
        torch.rand(2, 5, dtype=DTYPE) + 1, torch.eye(5, dtype=DTYPE).expand(2, 5, 5), block_mean(5, 0).partition
    ) + DiagLinearOperator(_noise())
    with pytest.warns(ClosedFormFallbackWarning, match="elementwise product"):
        product = batch.prod(0)
    torch.testing.assert_close(product.to_dense(), batch.to_dense().prod(0))


def test_gp_table_product_over_two_partitions():
    """gp.md, `M1 @ M2` over two partitions: solve, logdet, inv_quad_logdet, matmul, diagonal, entries, mT and
    inverse() closed form; roots, cholesky and eigendecompositions raise; svd warns; plus noise warns and refuses
    roots."""
    M1, M2 = block_mean(5, 0), block_mean(7, 1)
    P = M1 @ M2
    assert isinstance(P, BlockMeanProductLinearOperator)
    dense = M1.to_dense() @ M2.to_dense()
    x = torch.randn(N, 2, dtype=DTYPE)
    solved, logdet, inverse = torch.linalg.solve(dense, x), torch.logdet(dense), torch.linalg.inv(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with closed_forms_only(N), gpytorch.settings.max_cholesky_size(0):
            torch.testing.assert_close(P.solve(x), solved)
            torch.testing.assert_close(P.logdet(), logdet)
            inv_quad, both_logdet = P.inv_quad_logdet(x, logdet=True)
            torch.testing.assert_close(inv_quad, (x * solved).sum())
            torch.testing.assert_close(both_logdet, logdet)
            torch.testing.assert_close(P @ x, dense @ x)
            torch.testing.assert_close(P.diagonal(), dense.diagonal())
            torch.testing.assert_close(P[3:7, 2:9].to_dense(), dense[3:7, 2:9])
            torch.testing.assert_close(P.mT @ x, dense.mT @ x)
            torch.testing.assert_close(P.inverse().to_dense(), inverse)
    for refused in (P.root_decomposition, P.cholesky, P.eigh, P.eigvalsh):
        with pytest.raises(ValueError, match="BlockMeanProductLinearOperator"):
            refused()
    with pytest.warns(ClosedFormFallbackWarning, match="svd"):
        P.svd()
    noisy = P + DiagLinearOperator(_noise())
    with pytest.warns(ClosedFormFallbackWarning, match="LU"):
        torch.testing.assert_close(noisy.solve(x), torch.linalg.solve(dense + torch.diag(_noise()), x))
    with pytest.raises(ValueError, match="not symmetric"):
        noisy.root_decomposition()


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: (block_mean(5, 0) @ block_mean(7, 1)) @ block_mean(4, 2), id="(M1 @ M2) @ M3"),
        pytest.param(lambda: block_mean(5, 0) @ (block_mean(7, 1) + DiagLinearOperator(_noise())), id="M @ S"),
        pytest.param(lambda: (block_mean(7, 1) + DiagLinearOperator(_noise())) @ block_mean(5, 0), id="S @ M"),
        pytest.param(
            lambda: (
                (block_mean(7, 1) + DiagLinearOperator(_noise()))
                @ (block_mean(5, 0) + LowRankRootLinearOperator(_root()))
            ),
            id="S1 @ S2",
        ),
        pytest.param(lambda: block_mean(5, 0) @ DenseLinearOperator(torch.eye(N, dtype=DTYPE) + 0.1), id="M @ A"),
        pytest.param(lambda: DenseLinearOperator(torch.eye(N, dtype=DTYPE) + 0.1) @ block_mean(5, 0), id="A @ M"),
    ],
)
def test_gp_table_matmul_fallback(build):
    """gp.md, products that leave the family: FallbackMatmulLinearOperator, products / diagonal / mT exact and
    silent, solves and log-determinants by LU with a warning, roots raise."""
    op = build()
    assert isinstance(op, FallbackMatmulLinearOperator), type(op)
    dense = op.to_dense()
    x = torch.randn(N, 2, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        torch.testing.assert_close(op @ x, dense @ x)
        torch.testing.assert_close(op.diagonal(), dense.diagonal())
        torch.testing.assert_close(op.mT @ x, dense.mT @ x)
    with pytest.warns(ClosedFormFallbackWarning, match="LU"):
        torch.testing.assert_close(op.solve(x), torch.linalg.solve(dense, x))
    with pytest.warns(ClosedFormFallbackWarning, match="LU"):
        torch.testing.assert_close(op.logdet(), torch.logdet(dense))
    with pytest.raises(ValueError, match="not symmetric"):
        op.root_decomposition()


def test_gp_table_elementwise_products():
    """gp.md: `S * X` and `M * X` for anything but a block mean operator, a diagonal or a number warn when formed;
    `M * DiagLinearOperator(d)` and `S * DiagLinearOperator(d)` are the diagonal diag(diag(M) d), silently."""
    M, d = block_mean(5, 0), _noise()
    S = block_mean(7, 1) + DiagLinearOperator(d)
    A = torch.randn(N, N, dtype=DTYPE)
    for op in (M, S):
        with pytest.warns(ClosedFormFallbackWarning, match="elementwise product"):
            product = op * DenseLinearOperator(A)
        torch.testing.assert_close(product.to_dense(), op.to_dense() * A)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            diagonal = op * DiagLinearOperator(d)
            scaled = op * 2.0
        assert isinstance(diagonal, DiagLinearOperator)
        torch.testing.assert_close(diagonal.to_dense(), op.to_dense() * torch.diag(d))
        assert isinstance(scaled, type(op))
        torch.testing.assert_close(scaled.to_dense(), 2 * op.to_dense())


def test_gp_prose_sum_fallbacks():
    """gp.md, the paragraph above the table: a principal slice is again a sum; other rows and columns warn when
    solved; cholesky (and MultivariateNormal.entropy) warn; eigendecompositions warn; a negative multiple keeps the
    closed forms (its logdet NaN for odd n) and refuses roots; M + an exact kernel warns when solved."""
    S = block_mean(5, 0) + block_mean(7, 1) + DiagLinearOperator(_noise())
    dense = S.to_dense()
    x = torch.randn(N, 2, dtype=DTYPE)
    sliced = S[4:20, 4:20]
    assert isinstance(sliced, BlockMeanSumLinearOperator)
    torch.testing.assert_close(sliced.to_dense(), dense[4:20, 4:20])
    idx = torch.tensor([3, 1, 7, 20, 11])
    principal = S[idx][:, idx]  # distinct points, the same on both sides: again a sum
    assert isinstance(principal, BlockMeanSumLinearOperator)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        torch.testing.assert_close(principal.solve(x[:5]), torch.linalg.solve(dense[idx][:, idx], x[:5]))
    repeated = torch.tensor([3, 1, 7, 3, 11])
    indexed = S[repeated][:, repeated]  # a point repeated: the interpolated operator, exact products, solves warn
    assert isinstance(indexed, FallbackIndexedLinearOperator)
    torch.testing.assert_close(indexed @ x[:5], dense[repeated][:, repeated] @ x[:5])
    with pytest.warns(ClosedFormFallbackWarning), warnings.catch_warnings():  # singular (two equal rows): no values
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            indexed.solve(x[:5])
        except Exception:  # the generic path may refuse it, after its warning
            pass
    with pytest.warns(ClosedFormFallbackWarning):
        L = S.cholesky().to_dense()
    torch.testing.assert_close(L @ L.mT, dense)
    with pytest.warns(ClosedFormFallbackWarning):
        entropy = gpytorch.distributions.MultivariateNormal(torch.zeros(N, dtype=DTYPE), S).entropy()
    torch.testing.assert_close(
        entropy, torch.distributions.MultivariateNormal(torch.zeros(N, dtype=DTYPE), dense).entropy()
    )
    eigenvalues = torch.linalg.eigvalsh(dense)
    with pytest.warns(ClosedFormFallbackWarning):
        torch.testing.assert_close(S.eigvalsh(), eigenvalues)
    for n in (N, N - 1):  # even and odd sizes: logdet of -2 S is logdet S + n log 2, NaN for odd n
        part = S[:n, :n]
        negative = part * -2.0
        assert isinstance(negative, FallbackScaledLinearOperator)
        with closed_forms_only(N - 1), gpytorch.settings.max_cholesky_size(0):
            solved = negative.solve(x[:n])
            logdet = negative.logdet()
        torch.testing.assert_close(solved, torch.linalg.solve(-2 * dense[:n, :n], x[:n]))
        torch.testing.assert_close(logdet, torch.logdet(-2 * dense[:n, :n]), equal_nan=True)
        assert bool(logdet.isnan()) == (n % 2 == 1)
        with pytest.raises(ValueError, match="root_decomposition.*no real root"):
            negative.root_decomposition()
    kernel_sum = block_mean(5, 0) + gpytorch.kernels.RBFKernel().to(DTYPE)(torch.randn(N, 1, dtype=DTYPE))
    assert isinstance(kernel_sum, FallbackSumLinearOperator)
    with pytest.warns(ClosedFormFallbackWarning, match="solve"):
        torch.testing.assert_close(kernel_sum.solve(x), torch.linalg.solve(kernel_sum.to_dense(), x))


def test_gp_prose_marginal_likelihood_without_fast_log_prob_warns():
    """gp.md: under fast_computations(log_prob=False) MultivariateNormal.log_prob takes torch's Cholesky factor and
    warns, naming the setting; the default takes the closed-form inv_quad_logdet."""
    S = block_mean(5, 0) + block_mean(7, 1) + DiagLinearOperator(_noise())
    y = torch.randn(N, dtype=DTYPE)
    reference = torch.distributions.MultivariateNormal(torch.zeros(N, dtype=DTYPE), S.to_dense()).log_prob(y)
    with closed_forms_only(N), gpytorch.settings.max_cholesky_size(0):
        closed = gpytorch.distributions.MultivariateNormal(torch.zeros(N, dtype=DTYPE), S).log_prob(y)
    torch.testing.assert_close(closed, reference)
    S = block_mean(5, 0) + block_mean(7, 1) + DiagLinearOperator(_noise())  # no cached factor
    with pytest.warns(ClosedFormFallbackWarning, match="fast_computations"):
        with gpytorch.settings.fast_computations(log_prob=False):
            dense_path = gpytorch.distributions.MultivariateNormal(torch.zeros(N, dtype=DTYPE), S).log_prob(y)
    torch.testing.assert_close(dense_path, reference)


# docs/mixed.md, "What stays in closed form": the model rows. Columns of the inputs: a covariate, two group ids (8
# levels each, 6 and 7 present in training), and ids of a grouping with more than 256 levels present.
def _mixed_data(n: int):
    generator = torch.Generator().manual_seed(0)
    covariate = torch.randn(n, generator=generator, dtype=DTYPE)
    g1, g2 = (torch.arange(n) % 6).to(DTYPE), (torch.arange(n) % 7).to(DTYPE)
    many = (torch.arange(n) % 258).to(DTYPE)
    inputs = torch.stack([covariate, g1, g2, many], -1)
    y = torch.sin(covariate) + 0.3 * g1 + 0.1 * torch.randn(n, generator=generator, dtype=DTYPE)
    test = torch.tensor([[0.3, 0, 1, 5], [-0.5, 3, 6, 10], [1.0, 6, 2, 257], [0.1, 2, 7, 300]], dtype=DTYPE)
    return inputs, y, test  # test rows hold unseen levels: 6, 7 and 300


def _gaussian(inputs):
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 0.05
    return likelihood


def _fixed(inputs):
    noise = 0.01 + 0.1 * torch.rand(inputs.shape[0], generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    return gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise)


def _per_group(inputs):
    return GroupGaussianLikelihood(8, group_dim=1, train_inputs=inputs)


def _sgpr_plus_two(kind):
    def build(likelihood):
        inducing = torch.linspace(-2, 2, 5, dtype=DTYPE).unsqueeze(-1)
        smooth = kind(ScaleKernel(RBFKernel()), inducing, likelihood, active_dims=[0])
        return smooth + GroupKernel(8, active_dims=[1]) + GroupKernel(8, active_dims=[2])

    return build


MIXED_ROWS = {
    "GroupKernel + GaussianLikelihood": (lambda lik: GroupKernel(8, active_dims=[1]), _gaussian),
    "two crossed GroupKernels": (
        lambda lik: GroupKernel(8, active_dims=[1]) + GroupKernel(8, active_dims=[2]),
        _gaussian,
    ),
    "two crossed GroupKernels, per-group variances": (
        lambda lik: (
            GroupKernel(8, per_group_variance=True, active_dims=[1])
            + GroupKernel(8, per_group_variance=True, active_dims=[2])
        ),
        _gaussian,
    ),
    "GroupKernel(rank=2) past 256 groups": (lambda lik: GroupKernel(301, rank=2, active_dims=[3]), _gaussian),
    "ScaleKernel(GroupKernel(rank=2)) past 256 groups, crossed": (
        lambda lik: ScaleKernel(GroupKernel(301, rank=2, active_dims=[3])) + GroupKernel(8, active_dims=[1]),
        _gaussian,
    ),
    "GroupKernels + FixedNoiseGaussianLikelihood": (
        lambda lik: GroupKernel(8, active_dims=[1]) + GroupKernel(8, active_dims=[2]),
        _fixed,
    ),
    "(1 + x | g)": (lambda lik: GroupKernel(8, slope=True, active_dims=[1, 0]), _gaussian),
    "(x || g)": (lambda lik: GroupKernel(8, slope=True, correlated=False, active_dims=[1, 0]), _gaussian),
    "(0 + x | g)": (lambda lik: GroupKernel(8, slope=True, intercept=False, active_dims=[1, 0]), _gaussian),
    "GroupKernels + GroupGaussianLikelihood": (
        lambda lik: GroupKernel(8, active_dims=[1]) + GroupKernel(8, active_dims=[2]),
        _per_group,
    ),
    "slopes + GroupGaussianLikelihood": (lambda lik: GroupKernel(8, slope=True, active_dims=[1, 0]), _per_group),
    "ChunkedInducingPointKernel + two GroupKernels": (_sgpr_plus_two(ChunkedInducingPointKernel), _gaussian),
    "InducingPointKernel + two GroupKernels": (_sgpr_plus_two(gpytorch.kernels.InducingPointKernel), _gaussian),
}


@pytest.mark.parametrize("row", list(MIXED_ROWS))
def test_mixed_table_rows(row):
    """Training (mll and its gradients), prediction at new inputs (mean and covariance, fast_pred_var on and off),
    the posterior at the training inputs and rsample at training and new inputs, all under closed_forms_only at
    max_cholesky_size(0), against GPyTorch's dense computation."""
    n = 264 if "256" in row else 60
    inputs, y, test = _mixed_data(n)
    build, likelihood_of = MIXED_ROWS[row]
    likelihood = likelihood_of(inputs)
    model = GP(inputs, y, likelihood, build(likelihood)).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():  # away from the initial values (equal variances hide mistakes)
            p.add_(0.05 * torch.randn_like(p))
    reference = dense_copy(model)
    model.train()
    reference.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gpytorch.settings.max_cholesky_size(10**6):
            ref_loss = gpytorch.mlls.ExactMarginalLogLikelihood(reference.likelihood, reference)(reference(inputs), y)
            ref_names, ref_params = zip(*reference.named_parameters())
            ref_grads = dict(zip(ref_names, torch.autograd.grad(ref_loss, ref_params, allow_unused=True)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with closed_forms_only(n), gpytorch.settings.max_cholesky_size(0):
            loss = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(inputs), y)
            grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    # GPyTorch's InducingPointKernel loses its likelihood in the deep copy that dense_copy makes (docs/gp.md, fantasy
    # models), so the reference's trace term has no noise gradient there; the other gradients are compared.
    for (name, _), grad in zip(model.named_parameters(), grads):
        if "InducingPointKernel" in row and not row.startswith("Chunked") and name.startswith("likelihood"):
            continue
        ref_grad = ref_grads[name.replace("covar_module.", "covar_module.kernel.", 1)]  # dense_copy's DenseKernel
        assert (grad is None) == (ref_grad is None), name
        if grad is not None:
            torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10, msg=name)
    model.eval()
    reference.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6):
            ref_new = reference(test)
            ref_mean, ref_covar = ref_new.mean, ref_new.covariance_matrix
            ref_train = reference(inputs)
            ref_train_mean, ref_train_var = ref_train.mean, ref_train.variance
    groups = (inputs,) if isinstance(likelihood, GroupGaussianLikelihood) else ()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with closed_forms_only(n), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
            for fast in (False, True):
                with gpytorch.settings.fast_pred_var(fast):
                    new = model(test)
                    torch.testing.assert_close(new.mean, ref_mean, rtol=1e-9, atol=1e-10)
                    torch.testing.assert_close(new.covariance_matrix, ref_covar, rtol=1e-8, atol=1e-10)
            train = model(inputs)
            torch.testing.assert_close(train.mean, ref_train_mean, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(train.variance, ref_train_var, rtol=1e-8, atol=1e-10)
            assert model.likelihood(model(inputs), *groups).rsample(torch.Size([2])).shape == (2, n)
            if row != "GroupKernels + FixedNoiseGaussianLikelihood":  # mixed.md: rsample at training inputs only
                assert model(test).rsample(torch.Size([2])).shape == (2, test.shape[0])


def test_mixed_table_exact_kernel_plus_groups_warns():
    """mixed.md's last row: an exact ScaleKernel(RBFKernel) + GroupKernel takes GPyTorch's generic path with a
    ClosedFormFallbackWarning, in training and at prediction."""
    inputs, y, test = _mixed_data(60)
    likelihood = _gaussian(inputs)
    model = GP(inputs, y, likelihood, ScaleKernel(RBFKernel(active_dims=[0])) + GroupKernel(8, active_dims=[1]))
    model = model.to(DTYPE)
    with pytest.warns(ClosedFormFallbackWarning):
        gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(inputs), y).backward()
    model.eval()
    with pytest.warns(ClosedFormFallbackWarning), torch.no_grad():
        assert model(test).variance.shape == (test.shape[0],)


@pytest.mark.parametrize("likelihood_of", [_gaussian, _fixed, _per_group], ids=["gaussian", "fixed", "per-group"])
@pytest.mark.parametrize("kernel", ["GroupKernel", "ScaleKernel(BlockMeanKernel)"])
def test_mixed_table_fantasy_of_a_fantasy(kernel, likelihood_of):
    """mixed.md's fantasy row: get_fantasy_model, also of a fantasy, with a batch of fantasy targets, closed form and
    equal (rtol 1e-8) to the dense posterior of the model given all the points."""
    n = 60
    inputs, y, test = _mixed_data(n)
    likelihood = likelihood_of(inputs)
    if kernel == "GroupKernel":
        covar = GroupKernel(8, active_dims=[1])
    else:
        covar = ScaleKernel(
            BlockMeanKernel(RBFKernel(active_dims=[0]), inputs, Partition.from_labels(torch.arange(n) % 6))
        )
    model = GP(inputs, y, likelihood, covar).to(DTYPE)
    model.eval()
    with torch.no_grad():
        assert model(test).mean.shape == (test.shape[0],)  # builds the prediction strategy
    generator = torch.Generator().manual_seed(5)
    x1, x2 = test[:2], test[2:]
    y1, y2 = torch.randn(3, 2, generator=generator, dtype=DTYPE), torch.randn(3, 2, generator=generator, dtype=DTYPE)
    fixed = likelihood_of is _fixed
    noise1, noise2 = torch.full((3, 2), 0.03, dtype=DTYPE), torch.full((3, 2), 0.04, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with closed_forms_only(n), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
            first = model.get_fantasy_model(x1, y1, **({"noise": noise1} if fixed else {}))
            assert first(test).mean.shape == (3, test.shape[0])
            second = first.get_fantasy_model(x2, y2, **({"noise": noise2} if fixed else {}))
            prediction = second(test)
            mean, covar_matrix = prediction.mean, prediction.covariance_matrix
    everything = torch.cat([inputs, x1, x2])
    for b in range(3):
        if fixed:
            noise = torch.cat([likelihood.noise.detach(), noise1[b], noise2[b]])
            all_likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise)
        else:
            all_likelihood = copy.deepcopy(likelihood)
        given_all = GP(everything, torch.cat([y, y1[b], y2[b]]), all_likelihood, copy.deepcopy(model.covar_module))
        given_all = given_all.to(DTYPE)
        given_all.mean_module.load_state_dict(model.mean_module.state_dict())
        reference = dense_copy(given_all)
        reference.eval()
        if not fixed and isinstance(likelihood, GroupGaussianLikelihood):
            reference.likelihood.set_train_inputs(everything)
        with warnings.catch_warnings(), torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6):
            warnings.simplefilter("ignore")
            expected = reference(test)
            torch.testing.assert_close(mean[b], expected.mean, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(covar_matrix[b], expected.covariance_matrix, rtol=1e-8, atol=1e-10)


def _lazy_kernels():
    inputs, _, _ = _mixed_data(N)
    partition = Partition.from_labels(torch.arange(N) % 5)
    return inputs, {
        "BlockMeanKernel": BlockMeanKernel(ScaleKernel(RBFKernel(active_dims=[0])), inputs, partition),
        "GroupKernel + GroupKernel": GroupKernel(8, active_dims=[1]) + GroupKernel(8, active_dims=[2]),
        "GroupKernel * BlockMeanKernel": GroupKernel(8, active_dims=[1])
        * BlockMeanKernel(RBFKernel(), inputs, partition),
        "GroupKernel(slope=True) + GroupKernel": (
            GroupKernel(8, slope=True, active_dims=[1, 0]) + GroupKernel(8, active_dims=[2])
        ),
        "GroupKernel(rank=2)": GroupKernel(8, rank=2, active_dims=[1]),
    }


@pytest.mark.parametrize("name", list(_lazy_kernels()[1]))
def test_gp_table_lazily_evaluated_kernels(name):
    """gp.md: `kernel(x).add_diagonal(v)`, `kernel(x) + DiagLinearOperator(v)` and `kernel(x).root_decomposition()` of
    a lazily evaluated kernel that contains BlockMeanKernel / GroupKernel take the closed forms (slopes too)."""
    inputs, kernels = _lazy_kernels()
    kernel = kernels[name].to(DTYPE)
    dense = kernel(inputs).to_dense().detach()
    v = _noise()
    x = torch.randn(N, 2, dtype=DTYPE)
    noisy = dense + torch.diag(v)
    solved, logdet = torch.linalg.solve(noisy, x), torch.logdet(noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with closed_forms_only(N), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
            for op in (kernel(inputs).add_diagonal(v), kernel(inputs) + DiagLinearOperator(v)):
                assert isinstance(op, BlockMeanSumLinearOperator), type(op)
                torch.testing.assert_close(op.solve(x), solved)
                torch.testing.assert_close(op.logdet(), logdet)
            root = kernel(inputs).root_decomposition().root.to_dense()
    torch.testing.assert_close(root @ root.mT, dense)


def test_readme_inverse_square_root_is_a_block_mean_operator():
    """README: `M.matrix_inv_sqrt()` is again a block mean operator (M^{-1/2}), formed in closed form."""
    M = block_mean(5, 0)
    dense = M.to_dense()
    eigenvalues, vectors = torch.linalg.eigh(dense)
    with closed_forms_only(N):
        inv_sqrt = M.matrix_inv_sqrt()
    assert isinstance(inv_sqrt, BlockMeanLinearOperator)
    torch.testing.assert_close(inv_sqrt.to_dense(), vectors @ torch.diag(eigenvalues.rsqrt()) @ vectors.T)


@pytest.mark.parametrize("order", ["group first", "block mean first"])
def test_product_of_scaled_block_mean_kernels_predicts_in_closed_form(order):
    """gp.md, section 4: a product whose factors are GroupKernels or BlockMeanKernels, also in a ScaleKernel, predicts
    at new inputs in closed form. With both factors in ScaleKernels the test-by-test covariance was a block mean
    operator times a ConstantMulLinearOperator, which linear_operator multiplied through a Lanczos root of the
    latter (past max_cholesky_size: a rank-limited approximation of the predictive covariance, without a word)."""
    n = 40
    generator = torch.Generator().manual_seed(0)
    inputs = torch.stack([torch.randn(n, generator=generator, dtype=DTYPE), (torch.arange(n) % 4).to(DTYPE)], -1)
    y = torch.randn(n, generator=generator, dtype=DTYPE)
    test = torch.tensor([[0.1, 0], [0.5, 3], [-1.0, 5], [2.0, 1]], dtype=DTYPE)
    group = ScaleKernel(GroupKernel(6, active_dims=[1]))
    block = ScaleKernel(BlockMeanKernel(RBFKernel(active_dims=[0]), inputs, Partition.from_labels(torch.arange(n) % 5)))
    covar = group * block if order == "group first" else block * group
    model = GP(inputs, y, _gaussian(inputs), covar).to(DTYPE)
    with torch.no_grad():
        covar.kernels[0].outputscale = 1.7
        covar.kernels[1].outputscale = 0.6
    reference = dense_copy(model)
    model.eval()
    reference.eval()
    with warnings.catch_warnings(), torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6):
        warnings.simplefilter("ignore")
        expected = reference(test)
        expected_mean, expected_covar = expected.mean, expected.covariance_matrix
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with closed_forms_only(n), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
            prediction = model(test)
            torch.testing.assert_close(prediction.mean, expected_mean)
            torch.testing.assert_close(prediction.covariance_matrix, expected_covar)


def test_gp_table_capacitance_limits_name_the_setting():
    """gp.md: `M1 * M2` past max_capacitance_size raises a ValueError that names it, except in diagonal mode; a sum
    whose factorised capacitance passes the limit is refused with an error that names it."""
    M1, M2 = block_mean(5, 0), block_mean(7, 1)
    with settings.max_capacitance_size(10):
        with pytest.raises(ValueError, match="max_capacitance_size"):
            M1 * M2
        D1, D2 = block_mean(5, 3, diagonal=True), block_mean(7, 4, diagonal=True)
        product = D1 * D2  # diagonal mode: no k x k core, no limit
        torch.testing.assert_close(product.to_dense(), D1.to_dense() * D2.to_dense())
        S = M1 + M2 + DiagLinearOperator(_noise())
        with pytest.raises(ValueError, match="max_capacitance_size"):
            S.logdet()


def test_diagonal_mode_forms_no_k_by_k_matrix():
    """README / gp.md: a diagonal B (GroupKernel's variances) is passed as its k values and its closed forms are
    elementwise: no k x k matrix is formed, for the operator, its noisy sum and a product of two groupings' diagonal."""
    k, n = 1500, 3000
    labels = torch.arange(n) % k
    M = BlockMeanLinearOperator(
        torch.zeros(k, dtype=DTYPE), torch.rand(k, dtype=DTYPE) + 0.1, Partition.from_labels(labels), diagonal=True
    )
    x = torch.randn(n, dtype=DTYPE)
    other = BlockMeanLinearOperator(
        torch.rand(7, dtype=DTYPE),
        torch.rand(7, dtype=DTYPE),
        Partition.from_labels(torch.arange(n) % 7),
        diagonal=True,
    )
    with LargestTensor(square=k) as record:
        noisy = M.add_diagonal(torch.tensor(0.5, dtype=DTYPE))
        noisy.solve(x)
        noisy.logdet()
        noisy.root_decomposition().root @ x
        S = M + DiagLinearOperator(torch.rand(n, dtype=DTYPE) + 0.5)
        S.inv_quad_logdet(x.unsqueeze(-1), logdet=True)
        (M @ other).diagonal()
    assert record.squares == [], record.squares
    assert record.largest <= 4 * n, (record.largest, record.where)
