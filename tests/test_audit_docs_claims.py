"""The promises of the user-facing docs, one small check per claim: README.md, docs/gp.md ("Compositions: which
operations stay closed form", its table and the paragraph above it) and docs/mixed.md ("What stays in closed form").

Each row is built the way the docs write it, run inside ``closed_forms_only`` (CG, Lanczos and dense factorisations
of ``n x n`` matrices raise) where the docs say "closed form", and compared with a dense float64 reference computed
outside the guard. Rows that the docs say fall back must say so with a ``ClosedFormFallbackWarning``."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from linear_operator.operators import (
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    LowRankRootLinearOperator,
)

from bma_gp import (
    BlockMeanLinearOperator,
    BlockMeanSumLinearOperator,
    ClosedFormFallbackWarning,
    FallbackIndexedLinearOperator,
    FallbackScaledLinearOperator,
    FallbackSumLinearOperator,
    Partition,
)
from closed_form_guard import closed_forms_only

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
    return (batch + DiagLinearOperator(_noise()))[..., idx, :][..., idx]


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
