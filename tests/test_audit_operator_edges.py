"""Edge cases of the core operators found by an audit, each against dense ``torch.linalg`` in float64.

* results computed under ``no_grad`` from tensors that require gradients were cached by ``to_dense``,
  ``diagonalization`` and ``svd`` and silently returned without a graph later (and with gradients the cached
  graph broke a second backward pass);
* ``sqrt_inv_matmul`` with a vector ``rhs`` and a ``lhs`` returned a column, not a vector;
* ``add_low_rank`` formed the dense ``n x n`` matrix ``U U^T`` and a sum without closed forms;
* ``num_blocks`` refused NumPy and tensor integers;
* ``block_mean`` of a complex matrix failed inside torch with an unrelated message;
* an empty principal slice ``M[..., a:a, a:a]`` failed (ZeroDivisionError, or "labels must not be empty");
* the eigenvalues of a sum (and of the fallback operators) came silently from linear_operator's dense ``eigh``,
  which clamps negative eigenvalues to zero: wrong for an indefinite sum or a negative multiple;
* the elementwise product of block mean operators over two partitions was linear_operator's ``MulLinearOperator``,
  whose products multiply through ``n x n`` roots (an ``n x n x t`` temporary) and whose solves run silently
  dense or iterative; it is a block mean operator over the intersection of the partitions.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from linear_operator.operators import ConstantDiagLinearOperator, DenseLinearOperator, DiagLinearOperator

import bma_gp
from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, Partition, block_mean
from bma_gp._warnings import ClosedFormFallbackWarning

DTYPE = torch.float64
LABELS = [0, 1, 0, 2, 1, 1]


def operator(requires_grad: str = "", labels=LABELS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    partition = Partition.from_labels(torch.tensor(labels))
    k = partition.num_blocks
    root = torch.randn(k, k, generator=gen, dtype=DTYPE)
    lam = (torch.rand(k, generator=gen, dtype=DTYPE) + 0.5).requires_grad_(requires_grad == "lam")
    B = (root @ root.mT / k).requires_grad_(requires_grad == "B")
    return BlockMeanLinearOperator(lam, B, partition), lam, B


def _dense_of(result) -> torch.Tensor:
    if isinstance(result, tuple):
        result = result[0]
    return result.to_dense() if hasattr(result, "to_dense") else result


@pytest.mark.parametrize("which", ["lam", "B"])
@pytest.mark.parametrize("method", ["to_dense", "diagonalization", "svd"])
def test_results_computed_under_no_grad_do_not_drop_later_gradients(method, which):
    op, lam, B = operator(which)
    with torch.no_grad():
        getattr(op, method)()
    value = _dense_of(getattr(op, method)())
    assert value.requires_grad, f"{method} returned a result cached under no_grad, without a graph"
    leaf = lam if which == "lam" else B
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    fresh, lam2, B2 = operator(which)
    (ref,) = torch.autograd.grad(_dense_of(getattr(fresh, method)()).sum(), lam2 if which == "lam" else B2)
    torch.testing.assert_close(grad, ref)


def test_to_dense_with_gradients_backpropagates_twice():
    op, lam, _ = operator("lam")
    for _ in range(2):  # a cached graph cannot be backpropagated a second time
        op.to_dense().sum().backward()
    torch.testing.assert_close(lam.grad, 2 * torch.tensor([2.0, 3.0, 1.0], dtype=DTYPE))


def test_to_dense_is_still_cached_without_gradients():
    op, _, _ = operator()
    assert op.to_dense() is op.to_dense()


@pytest.mark.parametrize("batch", [(), (2,)])
def test_sqrt_inv_matmul_of_a_vector_with_lhs_matches_linear_operator(batch):
    op, _, _ = operator()
    if batch:
        op = op.expand(*batch, *op.shape)
    dense = op.to_dense()
    gen = torch.Generator().manual_seed(1)
    rhs = torch.randn(6, generator=gen, dtype=DTYPE)
    lhs = torch.randn(3, 6, generator=gen, dtype=DTYPE)
    res, quad = op.sqrt_inv_matmul(rhs, lhs)
    ref, ref_quad = DenseLinearOperator(dense).sqrt_inv_matmul(rhs, lhs)
    assert res.shape == ref.shape == (*batch, 3)
    torch.testing.assert_close(res, ref)
    torch.testing.assert_close(quad, ref_quad)


@pytest.mark.parametrize("kind", ["block_mean", "sum"])
@pytest.mark.parametrize("root_kind", ["tensor", "operator", "batch"])
def test_add_low_rank_stays_in_closed_form(kind, root_kind):
    op, _, _ = operator()
    if kind == "sum":
        op = op + DiagLinearOperator(torch.linspace(0.5, 1.0, 6, dtype=DTYPE))
    gen = torch.Generator().manual_seed(2)
    U = torch.randn(*((2,) if root_kind == "batch" else ()), 6, 2, generator=gen, dtype=DTYPE)
    res = op.add_low_rank(DenseLinearOperator(U) if root_kind == "operator" else U)
    assert isinstance(res, BlockMeanSumLinearOperator)
    dense = op.to_dense() + U @ U.mT
    x = torch.randn(6, 3, generator=gen, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        torch.testing.assert_close(res.solve(x), torch.linalg.solve(dense, x))
        torch.testing.assert_close(res.logdet(), torch.logdet(dense))


@pytest.mark.parametrize("num_blocks", [np.int64(3), np.int32(3), torch.tensor(3)])
def test_num_blocks_accepts_numpy_and_tensor_integers(num_blocks):
    partition = Partition.from_labels([0, 2, 2, 1], num_blocks=num_blocks)
    assert partition.num_blocks == 3 and type(partition.num_blocks) is int
    assert partition.sizes.tolist() == [1, 1, 2]


@pytest.mark.parametrize("num_blocks", [3.0, True, torch.tensor(3.0), "3", torch.tensor([3, 3])])
def test_num_blocks_that_is_not_an_integer_is_refused(num_blocks):
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        Partition.from_labels([0, 2, 2, 1], num_blocks=num_blocks)


def test_block_mean_of_a_complex_matrix_is_a_type_error():
    with pytest.raises(TypeError, match="A must hold real numbers"):
        block_mean(torch.ones(6, 6, dtype=torch.complex128), Partition.from_labels(LABELS))


@pytest.mark.parametrize("kind", ["block_mean", "sum"])
@pytest.mark.parametrize(
    "index", [(Ellipsis, slice(3, 3), slice(3, 3)), (Ellipsis, slice(5, 2), slice(5, 2)), (1, slice(3, 3), slice(3, 3))]
)
def test_an_empty_principal_slice_is_the_empty_matrix(kind, index):
    gen = torch.Generator().manual_seed(3)
    partition = Partition.from_labels(LABELS)
    op = BlockMeanLinearOperator(
        torch.rand(2, 3, generator=gen, dtype=DTYPE) + 0.5, torch.eye(3, dtype=DTYPE), partition
    )
    if kind == "sum":
        op = op + DiagLinearOperator(torch.linspace(0.5, 1.0, 6, dtype=DTYPE))
    sub = op[index]
    dense = op.to_dense()[index]
    assert sub.shape == dense.shape
    torch.testing.assert_close(sub.logdet(), torch.logdet(dense))
    assert sub.solve(torch.zeros(*dense.shape[:-1], 1, dtype=DTYPE)).shape == (*dense.shape[:-1], 1)


def _indefinite_sum():
    """``diag(d) + P_1 B_1 P_1^T + P_2 B_2 P_2^T`` with a positive ``d`` and a negative definite ``B_1``: indefinite."""
    first = BlockMeanLinearOperator(
        torch.full((3,), 0.5, dtype=DTYPE), -torch.eye(3, dtype=DTYPE), Partition.from_labels(LABELS)
    )
    second = BlockMeanLinearOperator(
        torch.zeros(2, dtype=DTYPE),
        torch.ones(2, dtype=DTYPE),
        Partition.from_labels([0, 0, 1, 1, 0, 1]),
        diagonal=True,
    )
    return first + DiagLinearOperator(torch.linspace(0.5, 1.0, 6, dtype=DTYPE)) + second


@pytest.mark.parametrize("kind", ["sum", "negative multiple", "fallback sum"])
def test_eigenvalues_without_a_closed_form_are_exact_and_warn(kind):
    op = _indefinite_sum()
    assert isinstance(op, BlockMeanSumLinearOperator)
    if kind == "negative multiple":
        op = op * -1.0
    elif kind == "fallback sum":
        op = op + DenseLinearOperator(0.1 * torch.ones(6, 6, dtype=DTYPE))
    dense = op.to_dense()
    ref = torch.linalg.eigvalsh(dense)
    assert bool((ref < 0).any())
    with pytest.warns(ClosedFormFallbackWarning, match="no closed-form spectrum"):
        evals = op.eigvalsh()
    torch.testing.assert_close(evals, ref)
    with pytest.warns(ClosedFormFallbackWarning, match="no closed-form spectrum"):
        evals, evecs = op.diagonalization()
    torch.testing.assert_close(evecs.to_dense() @ torch.diag_embed(evals) @ evecs.to_dense().mT, dense)


def test_lanczos_diagonalization_of_a_sum_warns():
    op = _indefinite_sum().add_diagonal(torch.tensor(3.0, dtype=DTYPE))
    with pytest.warns(ClosedFormFallbackWarning, match="no closed-form spectrum"):
        op.diagonalization(method="lanczos")


@pytest.mark.parametrize("diagonal", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_elementwise_product_over_two_partitions_is_a_block_mean_operator(diagonal, batch):
    gen = torch.Generator().manual_seed(4)
    first, second = Partition.from_labels([0, 1, 0, 2, 1, 1, 3]), Partition.from_labels([0, 0, 1, 1, 0, 1, 1])

    def make(partition, diag):
        k = partition.num_blocks
        root = torch.randn(*batch, k, k, generator=gen, dtype=DTYPE)
        B = torch.rand(*batch, k, generator=gen, dtype=DTYPE) if diag else root @ root.mT / k
        lam = torch.rand(*batch, k, generator=gen, dtype=DTYPE) + 0.5
        return BlockMeanLinearOperator(lam, B, partition, diagonal=diag)

    M, N = make(first, diagonal[0]), make(second, diagonal[1])
    dense = M.to_dense() * N.to_dense()
    x = torch.randn(7, 2, generator=gen, dtype=DTYPE)
    for product in (M * N, N * M):
        assert isinstance(product, BlockMeanLinearOperator)
        assert product.partition.num_blocks == 6  # the occupied pairs of blocks
        assert product.is_diagonal_mode == all(diagonal)
        torch.testing.assert_close(product.to_dense(), dense)
        torch.testing.assert_close(product.solve(x), torch.linalg.solve(dense, x))
        torch.testing.assert_close(product.logdet(), torch.logdet(dense))


def test_elementwise_product_over_two_partitions_gradients():
    first, second = Partition.from_labels([0, 1, 0, 2, 1, 1, 3]), Partition.from_labels([0, 0, 1, 1, 0, 1, 1])
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(5), dtype=DTYPE)

    def fn(lam, B, lam2, b2):
        M = BlockMeanLinearOperator(lam, 0.5 * (B + B.mT), first)
        N = BlockMeanLinearOperator(lam2, b2, second, diagonal=True)
        return torch.stack((M * N).inv_quad_logdet(x, logdet=True))

    inputs = (
        torch.tensor([0.7, 1.1, 0.9, 1.3], dtype=DTYPE),
        0.3 * torch.eye(4, dtype=DTYPE) + 0.1,
        torch.tensor([0.8, 1.2], dtype=DTYPE),
        torch.tensor([0.4, 0.6], dtype=DTYPE),
    )
    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in inputs))


def test_elementwise_product_with_a_diagonal_is_a_diagonal_either_way():
    """M * D and D * M are diag(diag(M) d), silently and with gradients (M * D went through linear_operator's
    MulLinearOperator, which forms roots of both factors, with a warning)."""
    partition = Partition.from_labels([0, 1, 0, 2, 1, 1, 3])
    lam = (torch.rand(2, 4, dtype=DTYPE) + 1).requires_grad_()
    M = BlockMeanLinearOperator(lam, torch.eye(4, dtype=DTYPE) * 0.3 + 0.1, partition)
    for D in (
        DiagLinearOperator(torch.rand(7, dtype=DTYPE)),
        ConstantDiagLinearOperator(torch.tensor([2.0], dtype=DTYPE), 7),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            products = (M * D, D * M)
        for product in products:
            assert isinstance(product, DiagLinearOperator) and product.shape == (2, 7, 7)
            torch.testing.assert_close(product.to_dense(), M.to_dense() * D.to_dense())
    S = M + DiagLinearOperator(torch.rand(7, dtype=DTYPE))  # a BlockMeanSumLinearOperator
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        product = S * D
    assert isinstance(product, DiagLinearOperator)
    torch.testing.assert_close(product.to_dense(), S.to_dense() * D.to_dense())
    (grad,) = torch.autograd.grad((M * D).diagonal().sum(), lam)
    (expected,) = torch.autograd.grad((M.to_dense() * D.to_dense()).diagonal(dim1=-2, dim2=-1).sum(), lam)
    torch.testing.assert_close(grad, expected)


def test_elementwise_product_over_two_partitions_respects_the_size_limit():
    """The product's core is k x k over the occupied pairs of blocks (up to n x n): past
    bma_gp.settings.max_capacitance_size it is refused with a message naming that size, and within it is built."""
    first, second = Partition.from_labels([0, 1, 0, 2, 1, 1, 3]), Partition.from_labels([0, 0, 1, 1, 0, 1, 1])
    M = BlockMeanLinearOperator(torch.ones(4, dtype=DTYPE), 0.1 * torch.eye(4, dtype=DTYPE) + 0.1, first)
    N = BlockMeanLinearOperator(torch.ones(2, dtype=DTYPE), torch.full((2, 2), 0.2, dtype=DTYPE), second)
    with bma_gp.settings.max_capacitance_size(5), pytest.raises(ValueError, match=r"6 occupied pairs.*6 x 6 core"):
        M * N
    with bma_gp.settings.max_capacitance_size(6):
        torch.testing.assert_close((M * N).to_dense(), M.to_dense() * N.to_dense())
    with bma_gp.settings.max_capacitance_size(1):  # diagonal mode keeps k numbers only: no limit
        D = BlockMeanLinearOperator(torch.ones(4, dtype=DTYPE), torch.rand(4, dtype=DTYPE), first, diagonal=True)
        E = BlockMeanLinearOperator(torch.ones(2, dtype=DTYPE), torch.rand(2, dtype=DTYPE), second, diagonal=True)
        torch.testing.assert_close((D * E).to_dense(), D.to_dense() * E.to_dense())


def test_partitions_and_operators_serialise():
    partition = Partition.from_labels(LABELS)
    op, _, _ = operator()
    for obj in (partition, Partition.from_sizes([2, 3]), op):
        for copied in (pickle.loads(pickle.dumps(obj)), copy.deepcopy(obj)):
            assert torch.equal(_dense_of(copied), _dense_of(obj)) if obj is op else copied == obj
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        with pytest.raises(pickle.UnpicklingError):  # not allow-listed: the documented workaround below
            torch.load(buffer, weights_only=True)
        buffer.seek(0)
        with torch.serialization.safe_globals([Partition, BlockMeanLinearOperator]):
            loaded = torch.load(buffer, weights_only=True)
        assert torch.equal(loaded.to_dense(), op.to_dense()) if obj is op else loaded == obj
