"""Partitions, block mean approximations and products of block mean operators used as a linear_operator user would,
each against dense ``torch.linalg`` in float64. Found by an audit:

* a vector right-hand side of a batched ``M @ N`` over two partitions (``matmul``, ``solve``, ``inverse() @ v``)
  crashed: ``N v`` is a batch of vectors, which ``M`` read as a matrix; ``M.solve(v, lhs)`` of a batched block mean
  operator crashed the same way; factors whose batch shapes do not broadcast failed inside torch's broadcasting;
* the sum of such a product over a batch dimension (``P.sum(0)``) was linear_operator's ``SumBatchLinearOperator``,
  whose solves and log-determinants factorised the non-symmetric sum with Cholesky, silently and wrongly; its
  ``to_dense`` (and so ``svd``) was cached under no_grad and returned later without gradients;
* ``Partition.block_sum`` / ``expand`` / ``block_average`` took ``dim % x.dim()``: an out-of-range ``dim`` silently
  reduced another dimension (and a 0-d tensor raised ZeroDivisionError);
* ``block_sum`` of an integer tensor over contiguous blocks of many sizes raised (``segment_reduce`` has no integer
  kernel); ``block_sum`` of a boolean mask over scattered blocks was a logical or, not a count;
* ``block_mean(..., chunk_columns=0 / -1 / 2.5)`` failed inside ``range`` or ``torch.cat``; ``block_mean_from_sums``
  with a non-partition raised AttributeError, and with batch shapes that do not broadcast a bare RuntimeError;
* the partition builders refused NumPy integers for ``k``, ``leaf_size``, ``num_blocks``, ``iters`` and ``dim``
  (``Partition`` accepts them), and a ``seed`` of ``None`` or a string failed inside ``int()``;
* ``group_partition`` checked float ids for exactness in float32 and float64 only: float16 / bfloat16 ids past 2048 /
  256 were merged silently; ids that require gradients made torch warn; ``kmeans_objective`` with a non-partition
  raised AttributeError; integer ids held as Python objects (a pandas object column) were refused, and missing ids
  (``None``, pandas ``NA``) or an empty string array failed inside torch's conversion;
* ``cholesky()`` of a ``BlockMeanLinearOperator`` built with ``symmetric=False`` factorised the lower triangle of
  its dense matrix, a factor of another matrix; its ``svd()`` raised "eigvalsh needs a symmetric block mean operator",
  and so did ``eigh`` and ``diagonalization``;
* ``Partition.to(0)`` ignored the device index and stayed on the CPU;
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from linear_operator.operators import DenseLinearOperator, DiagLinearOperator

from bma_gp import BlockMeanLinearOperator, Partition, block_mean, block_mean_from_sums
from bma_gp._warnings import ClosedFormFallbackWarning
from bma_gp.partition_builders import (
    group_partition,
    kdtree_partition,
    kmeans_objective,
    kmeans_partition,
    sorted_partition,
)
from closed_form_guard import closed_forms_only

DTYPE = torch.float64
LABELS = [0, 1, 0, 2, 1, 1]


def _product(batch=(2,), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    first = Partition.from_labels([0, 1, 0, 2, 1, 1, 3, 2, 0])
    second = Partition.from_labels([1, 0, 0, 1, 2, 1, 0, 2, 2])
    M = BlockMeanLinearOperator(
        torch.rand(*batch, 4, generator=gen, dtype=DTYPE) + 1, 0.3 * torch.eye(4, dtype=DTYPE) + 0.1, first
    )
    N = BlockMeanLinearOperator(
        torch.rand(*batch, 3, generator=gen, dtype=DTYPE) + 1,
        torch.rand(*batch, 3, generator=gen, dtype=DTYPE),
        second,
        diagonal=True,
    )
    return M, N


def test_a_vector_against_a_batched_product_is_a_batch_of_vectors():
    M, N = _product()
    P = M @ N
    dense = P.to_dense()
    v = torch.randn(9, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    lhs = torch.ones(3, 9, dtype=DTYPE)
    column = v.expand(2, 9).unsqueeze(-1)
    ref = torch.linalg.solve(dense, column)
    torch.testing.assert_close(P @ v, dense @ v)
    torch.testing.assert_close(v @ P, v @ dense)
    torch.testing.assert_close(P.solve(v), ref.squeeze(-1))
    torch.testing.assert_close(P.inverse() @ v, ref.squeeze(-1))
    torch.testing.assert_close(P.solve(v, lhs), (lhs @ ref).squeeze(-1))
    dense_M = M.to_dense()
    expected = DenseLinearOperator(dense_M).solve(v, lhs)
    assert expected.shape == (2, 3)
    torch.testing.assert_close(M.solve(v, lhs), expected)
    torch.testing.assert_close(M[0].solve(v, lhs), lhs @ torch.linalg.solve(dense_M[0], v))


@pytest.mark.parametrize(
    ("method", "shape", "dim"),
    [
        ("block_sum", (6, 6), 2),
        ("block_sum", (6,), 1),
        ("block_average", (6, 6), -3),
        ("expand", (3,), 1),
        ("block_sum", (), -1),
    ],
)
def test_an_out_of_range_dim_is_refused_not_wrapped(method, shape, dim):
    """``dim % x.dim()`` summed a square (n, n) tensor over the other axis for ``dim=2`` (torch raises)."""
    partition = Partition.from_labels(LABELS)
    with pytest.raises(ValueError, match=rf"{method}.*(dim {dim} is out of range|0-d)"):
        getattr(partition, method)(torch.ones(shape, dtype=DTYPE), dim=dim)


def test_block_sums_along_every_valid_dim_match_the_indicator():
    partition = Partition.from_labels(LABELS)
    indicator = torch.nn.functional.one_hot(torch.tensor(LABELS)).to(DTYPE)  # (n, k)
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    for dim in (0, 1, -1, -2):
        ref = indicator.T @ x if dim % 2 == 0 else x @ indicator
        torch.testing.assert_close(partition.block_sum(x, dim=dim), ref)


@pytest.mark.parametrize("layout", ["runs", "segments", "scattered"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64])
def test_block_sums_of_integers_match_the_indicator_in_every_layout(layout, dtype):
    """Contiguous blocks of more than a few sizes went through torch.segment_reduce, which has no integer kernel."""
    sizes = {"runs": [2, 2, 3], "segments": list(range(1, 11)), "scattered": [2, 3, 1]}[layout]
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if layout == "scattered":
        labels = labels.flip(0)
    partition = Partition.from_labels(labels)
    x = torch.arange(2 * labels.numel()).reshape(2, -1).to(dtype)
    indicator = torch.nn.functional.one_hot(labels).to(dtype)
    sums = partition.block_sum(x)
    assert torch.equal(sums.to(dtype), x @ indicator)
    torch.testing.assert_close(
        partition.block_average(x), (x @ indicator).double() / indicator.sum(0).double(), check_dtype=False
    )


@pytest.mark.parametrize("chunk_columns", [0, -1, 2.5, True])
def test_block_mean_refuses_a_chunk_size_that_is_not_a_positive_int(chunk_columns):
    """0 failed inside range(), -1 inside torch.cat (no columns), 2.5 with a bare TypeError."""
    A = DenseLinearOperator(torch.eye(6, dtype=DTYPE))
    with pytest.raises(ValueError, match="chunk_columns must be a positive int"):
        block_mean(A, Partition.from_labels(LABELS), chunk_columns=chunk_columns)


@pytest.mark.parametrize("chunk_columns", [1, 2, np.int64(3), None])
def test_block_mean_of_an_operator_in_chunks_matches_the_dense_approximation(chunk_columns):
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(6, 6, generator=gen, dtype=DTYPE)
    partition = Partition.from_labels(LABELS)
    for symmetric, X in ((True, A + A.T), (False, A)):
        ref = block_mean(X, partition, symmetric=symmetric).to_dense()
        res = block_mean(DenseLinearOperator(X), partition, symmetric=symmetric, chunk_columns=chunk_columns)
        torch.testing.assert_close(res.to_dense(), ref)
        torch.testing.assert_close(ref, _frobenius_block_mean(X, torch.tensor(LABELS)))


def _frobenius_block_mean(A, labels):
    """The Frobenius-nearest block mean matrix entry by entry: off-diagonal entries averaged per pair of blocks, the
    diagonal per block."""
    same = labels.unsqueeze(-1) == labels.unsqueeze(-2)
    res = torch.empty_like(A)
    eye = torch.eye(len(labels), dtype=torch.bool)
    for i in labels.unique():
        for j in labels.unique():
            pair = (labels.unsqueeze(-1) == i) & (labels.unsqueeze(-2) == j)
            for mask in (pair & ~eye, pair & eye & same):
                if mask.any():
                    res[mask] = A[mask].mean()
    return res


def test_block_mean_from_sums_checks_its_partition_and_batch_shapes():
    partition = Partition.from_labels(LABELS)
    with pytest.raises(TypeError, match="partition must be a bma_gp.Partition"):
        block_mean_from_sums(torch.ones(3, 3, dtype=DTYPE), torch.ones(3, dtype=DTYPE), torch.tensor(LABELS))
    with pytest.raises(ValueError, match=r"batch shapes of block_sums \(2,\) and diag_sums \(3,\)"):
        block_mean_from_sums(torch.ones(2, 3, 3, dtype=DTYPE), torch.ones(3, 3, dtype=DTYPE), partition)
    assert block_mean_from_sums(torch.ones(2, 3, 3, dtype=DTYPE), torch.ones(3, dtype=DTYPE), partition).shape == (
        2,
        6,
        6,
    )


def test_builders_take_numpy_and_tensor_integers_like_partition_does():
    """``Partition(num_blocks=np.int64(3))`` worked, ``kmeans_partition(x, np.int64(3))`` did not (``k = n // 100``
    from a NumPy array is one)."""
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    ref = kmeans_partition(x, 4, seed=1, iters=5)
    for k, seed, iters in ((np.int64(4), np.int32(1), np.int64(5)), (torch.tensor(4), torch.tensor(1), 5)):
        assert kmeans_partition(x, k, seed=seed, iters=iters) == ref
    assert kdtree_partition(x, np.int64(8)) == kdtree_partition(x, 8)
    assert sorted_partition(x, np.int64(4), dim=np.int64(1)) == sorted_partition(x, 4, dim=1)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: kmeans_partition(x, 3, seed=None), "seed must be an int, got None"),
        (lambda x: kmeans_partition(x, 3, seed="a"), "seed must be an int"),
        (lambda x: kmeans_partition(x, True), "k must be a positive int"),
        (lambda x: kmeans_partition(x, 3, iters=2.0), "iters must be a non-negative int"),
        (lambda x: kdtree_partition(x, np.float64(8)), "leaf_size must be a positive int"),
        (lambda x: sorted_partition(x, 3, dim=np.int64(2)), "dim must be an int in -2 .. 1"),
    ],
)
def test_builders_refuse_what_is_not_an_integer(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(20, 2, dtype=DTYPE))


@pytest.mark.parametrize(
    ("dtype", "large"), [(torch.float16, 2049.0), (torch.bfloat16, 257.0), (torch.float32, 2.0**24 + 1)]
)
def test_group_ids_in_a_float_too_narrow_for_them_are_refused(dtype, large):
    """2049 and 2048 are one value in float16: the ids were merged silently (only float32 and float64 were checked)."""
    ids = torch.tensor([large, large - 1, 1.0], dtype=dtype)
    with pytest.raises(ValueError, match=f"ids of dtype {dtype} from \\d+ on are not exact integers"):
        group_partition(ids)
    assert group_partition(torch.tensor([large - 2, 1.0], dtype=dtype)).num_blocks == 2  # below 2 / eps: exact


def test_group_ids_that_require_gradients_give_no_warning():
    ids = torch.tensor([3.0, 1.0, 3.0], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert group_partition(ids).labels.tolist() == [1, 0, 1]


def test_kmeans_objective_names_a_partition_that_is_not_one():
    x = torch.randn(6, 2, dtype=DTYPE)
    with pytest.raises(TypeError, match="partition must be a bma_gp.Partition"):
        kmeans_objective(x, torch.tensor(LABELS))
    means = torch.stack([x[torch.tensor(LABELS) == i].mean(0) for i in range(3)])
    expected = (x - means[torch.tensor(LABELS)]).square().sum()
    torch.testing.assert_close(kmeans_objective(x, Partition.from_labels(LABELS)), expected)


def test_partition_to_reads_a_device_index_as_tensors_do():
    """``partition.to(0)`` returned the CPU partition silently (``to(device=0)`` and ``tensor.to(0)`` mean the first
    accelerator)."""
    partition = Partition.from_labels(LABELS)

    def outcome(move):
        try:
            return str(move().device)
        except (RuntimeError, AssertionError) as err:  # no accelerator here: the same refusal as the tensor's
            return type(err).__name__

    assert outcome(lambda: partition.to(0)) == outcome(lambda: torch.zeros(1).to(0))
    assert outcome(lambda: partition.to(0)) != "cpu"
    assert partition.to(torch.float32) is partition  # a dtype is ignored
    moved = partition.to(torch.float32, "meta")
    assert moved.device.type == "meta" and moved.labels.dtype == torch.long


@pytest.mark.parametrize(
    "labels", [[0, 1, 0, 1, 0, 1], [0, 0, 0, 1, 1, 1], list(np.repeat(np.arange(10), np.arange(1, 11)))]
)
def test_block_sums_of_a_mask_count_its_entries_in_every_layout(labels):
    """Scattered blocks index-added bools (a logical or): a mask summed to True, and its block average was 1."""
    partition = Partition.from_labels(labels)
    mask = torch.arange(len(labels)) % 3 != 0
    indicator = torch.nn.functional.one_hot(torch.tensor(labels)).long()
    counts = mask.long() @ indicator
    assert torch.equal(partition.block_sum(mask), counts)
    torch.testing.assert_close(partition.block_average(mask), counts / indicator.sum(0), check_dtype=False)


def test_a_product_of_factors_whose_batches_do_not_broadcast_is_refused_in_words():
    M, _ = _product(batch=(2,))
    _, N = _product(batch=(3,))
    with pytest.raises(ValueError, match=r"batch shapes of the factors, \(2,\) and \(3,\), do not broadcast"):
        M @ N
    _, N = _product(batch=(3, 1))
    P = M @ N
    assert P.shape == (3, 2, 9, 9)
    torch.testing.assert_close(P.logdet(), torch.logdet(M.to_dense() @ N.to_dense()))


@pytest.mark.parametrize(("batches", "dim"), [(((2,), (2,)), 0), (((2, 1), (3,)), 1), (((2, 3), ()), -3)])
def test_the_sum_of_a_product_over_a_batch_dimension_solves_by_lu_and_says_so(batches, dim):
    """``P.sum(0)`` was linear_operator's SumBatchLinearOperator: its solve and logdet ran a Cholesky of the
    non-symmetric sum, silently and wrongly."""
    gen = torch.Generator().manual_seed(5)
    first = Partition.from_labels([0, 1, 0, 2, 1, 1, 3, 2, 0])
    second = Partition.from_labels([1, 0, 0, 1, 2, 1, 0, 2, 2])
    M = BlockMeanLinearOperator(
        torch.rand(*batches[0], 4, generator=gen, dtype=DTYPE) + 1,
        torch.rand(4, 4, generator=gen, dtype=DTYPE),
        first,
        symmetric=False,
    )
    N = BlockMeanLinearOperator(
        torch.rand(*batches[1], 3, generator=gen, dtype=DTYPE) + 1, 0.3 * torch.eye(3, dtype=DTYPE), second
    )
    S = (M @ N).sum(dim)
    dense = (M.to_dense() @ N.to_dense()).sum(dim)
    assert float((dense - dense.mT).abs().max()) > 0.1
    x = torch.randn(9, 2, generator=gen, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(S @ x, dense @ x)  # products stay silent
    with pytest.warns(ClosedFormFallbackWarning, match="factorised with LU"):
        torch.testing.assert_close(S.solve(x), torch.linalg.solve(dense, x))
    with pytest.warns(ClosedFormFallbackWarning, match="factorised with LU"):
        torch.testing.assert_close(S.logdet(), torch.logdet(dense), equal_nan=True)


def test_a_non_symmetric_block_mean_operator_has_no_cholesky_factor():
    """``cholesky()`` factorised the dense matrix's lower triangle (with only the dense-fallback warning): the factor
    of another matrix, ``L L^T != M``."""
    gen = torch.Generator().manual_seed(6)
    partition = Partition.from_labels(LABELS)
    M = BlockMeanLinearOperator(
        torch.rand(3, generator=gen, dtype=DTYPE) + 1,
        torch.rand(3, 3, generator=gen, dtype=DTYPE),
        partition,
        symmetric=False,
    )
    with pytest.raises(ValueError, match="cholesky needs a symmetric block mean operator"):
        M.cholesky()
    S = BlockMeanLinearOperator(M.lam, M.B, partition)  # symmetric: the dense factor, with its warning
    with pytest.warns(ClosedFormFallbackWarning, match="cholesky"):
        L = S.cholesky().to_dense()
    torch.testing.assert_close(L @ L.mT, S.to_dense())


@pytest.mark.parametrize("batch", [(), (2,)])
def test_svd_of_a_non_symmetric_block_mean_operator_is_the_dense_one_with_a_warning(batch):
    """It raised "eigvalsh needs a symmetric block mean operator" (a product over two partitions gives the dense SVD
    with a warning; a general matrix has an SVD)."""
    gen = torch.Generator().manual_seed(7)
    M = BlockMeanLinearOperator(
        torch.rand(*batch, 3, generator=gen, dtype=DTYPE) - 0.5,
        torch.rand(*batch, 3, 3, generator=gen, dtype=DTYPE),
        Partition.from_labels(LABELS),
        symmetric=False,
    )
    dense = M.to_dense()
    with pytest.warns(ClosedFormFallbackWarning, match="svd of a BlockMeanLinearOperator built with symmetric=False"):
        U, S, V = M.svd()
    torch.testing.assert_close(S, torch.linalg.svdvals(dense))
    torch.testing.assert_close(U.to_dense() @ torch.diag_embed(S) @ V.to_dense().mT, dense)


@pytest.mark.parametrize(
    "ids", [np.array([30, 10, 30], dtype=object), np.array([30.0, 10, 30], dtype=object), [np.int64(30), 10, 30]]
)
def test_group_ids_held_as_python_objects_are_numbers(ids):
    """An object column of integers (pandas reads mixed columns so) failed: "can't convert np.ndarray of type
    numpy.object_", although the docstring accepts any integers."""
    assert group_partition(ids).labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (np.array([None, 1], dtype=object), "ids hold missing values"),
        ([1, None, 2], "ids hold missing values"),
        (np.array([], dtype=str), "ids must not be empty"),
    ],
)
def test_group_ids_that_are_missing_or_empty_are_named(ids, match):
    with pytest.raises(ValueError, match=match):
        group_partition(ids)


@pytest.mark.parametrize("method", ["to_dense", "svd"])
def test_a_product_computed_under_no_grad_does_not_drop_later_gradients(method):
    """MatmulLinearOperator cached ``to_dense`` (and so the dense ``svd``) under no_grad and returned it without a
    graph afterwards (as BlockMeanLinearOperator did before the operator-edges audit)."""
    M, N = _product(batch=())
    lam = M.lam.clone().requires_grad_()
    M = BlockMeanLinearOperator(lam, M.B, M.partition)

    def value(P):
        res = P.to_dense() if method == "to_dense" else P.svd()[1]
        return res.sum()

    P = M @ N
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)
        value(P)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)
        out = value(P)
        (grad,) = torch.autograd.grad(out, lam)
        (ref,) = torch.autograd.grad(value(M @ N), lam)
    torch.testing.assert_close(grad, ref)
    fixed = M.detach() @ N  # nothing to differentiate: still cached
    assert fixed.to_dense() is fixed.to_dense()


@pytest.mark.parametrize(
    ("method", "name"),
    [("eigh", "an eigendecomposition"), ("diagonalization", "an eigendecomposition"), ("eigvalsh", "eigvalsh")],
)
def test_the_spectrum_of_a_non_symmetric_operator_is_refused_naming_what_was_asked(method, name):
    """eigh and diagonalization were refused as "eigvalsh needs a symmetric block mean operator"."""
    M = BlockMeanLinearOperator(
        torch.ones(3, dtype=DTYPE), torch.rand(3, 3, dtype=DTYPE), Partition.from_labels(LABELS), symmetric=False
    )
    with pytest.raises(ValueError, match=f"^{name}.* needs a symmetric block mean operator"):
        getattr(M, method)()


def _batched_block_mean(partition: Partition, batch: int, generator: torch.Generator) -> BlockMeanLinearOperator:
    k = partition.num_blocks
    W = torch.randn(batch, k, k, dtype=torch.float64, generator=generator)
    lam = torch.rand(batch, k, dtype=torch.float64, generator=generator) + 1
    return BlockMeanLinearOperator(lam, W @ W.mT / k + torch.eye(k, dtype=torch.float64), partition)


@pytest.mark.parametrize("product", [False, True], ids=["sum", "nonsymmetric-fallback"])
def test_a_vector_and_a_left_tensor_against_a_batched_sum(product):
    """``S.solve(v, L)`` of a batched ``BlockMeanSumLinearOperator`` (and of the dense-LU fallback of a non-symmetric
    sum) multiplied ``L`` into the squeezed batch of solutions: a RuntimeError about shapes."""
    g = torch.Generator().manual_seed(3)
    n, batch = 12, 2
    first = Partition.from_labels(torch.randint(0, 3, (n,), generator=g))
    second = Partition.from_labels(torch.randint(0, 4, (n,), generator=g))
    M = _batched_block_mean(first, batch, g)
    if product:
        M = M @ _batched_block_mean(second, batch, g)
    S = M + DiagLinearOperator(torch.rand(batch, n, dtype=torch.float64, generator=g) + 0.5)
    v = torch.randn(n, dtype=torch.float64, generator=g)
    L = torch.randn(3, n, dtype=torch.float64, generator=g)
    dense = torch.linalg.solve(S.to_dense(), v.expand(batch, n).unsqueeze(-1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)  # the non-symmetric sum factorises densely
        x, y = S.solve(v), S.solve(v, L)
    assert x.shape == (batch, n) and y.shape == (batch, 3)  # linear_operator's shapes for a vector
    torch.testing.assert_close(x, dense.squeeze(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, (L @ dense).squeeze(-1), rtol=1e-10, atol=1e-12)


def test_elementwise_products_of_a_product_say_what_is_missing():
    """``P * P``, ``P * M`` and ``M * P`` (``P = M @ N`` over two partitions) raised a ValueError about
    ``root_decomposition``, an operation the caller never asked for (``M * P`` warned about a generic product first).
    With a diagonal operator the product is closed form, with a dense matrix dense, as linear_operator gives it."""
    g = torch.Generator().manual_seed(5)
    n = 10
    first = Partition.from_labels(torch.randint(0, 3, (n,), generator=g))
    second = Partition.from_labels(torch.randint(0, 4, (n,), generator=g))
    M = _batched_block_mean(first, 1, g)[0]
    P = M @ _batched_block_mean(second, 1, g)[0]
    for a, b in ((P, P), (P, M), (M, P)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ClosedFormFallbackWarning)
            with pytest.raises(ValueError, match=r"elementwise product of a BlockMeanProductLinearOperator.*to_dense"):
                a * b
    d = torch.rand(n, dtype=torch.float64, generator=g)
    with closed_forms_only(n):
        for product in (P * DiagLinearOperator(d), DiagLinearOperator(d) * P):
            assert isinstance(product, DiagLinearOperator)
            torch.testing.assert_close(product.to_dense(), torch.diag(P.to_dense().diagonal() * d))
    dense = torch.rand(n, n, dtype=torch.float64, generator=g)
    torch.testing.assert_close((P * dense).to_dense(), P.to_dense() * dense)
