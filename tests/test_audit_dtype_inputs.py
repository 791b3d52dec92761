"""Unusual dtypes, shapes and values at the public entry points, found by an audit.

* ``Partition.block_sum`` of an int8 .. int32 (or uint8) tensor summed in the tensor's own dtype, and wrapped
  around, for scattered blocks and contiguous blocks of many sizes, while runs of equal-size blocks gave int64
  sums (as ``torch.sum`` does): the same sums had another dtype, and another value, by layout;
* a 0-d right-hand side of ``solve``, ``inv_quad_logdet`` or ``sqrt_inv_matmul`` failed with a bare ``IndexError``
  ("tuple index out of range") in the shape check itself;
* a complex diagonal (``add_diagonal``) or constant (``M + c``) was cast to the operator's real dtype, dropping its
  imaginary part with at most one warning per process (a dense operator gives the complex sum);
* ``GroupKernel`` on inputs with an empty batch dimension, ``(0, n, 1)``, failed with an ``IndexError`` while it
  looked for the ids shared by the batch entries (GPyTorch's kernels give the empty ``(0, n, n)`` result);
* ``BlockMeanSumLinearOperator(..., diagonal=["False"])`` took the string for ``True`` and read a ``k x k`` ``B_j``
  as a batch of ``k`` diagonals (a ``(k, n, n)`` operator, silently); a bare ``diagonal=True`` and
  ``partitions=partition`` failed with "object is not iterable"; complex ``weights`` lost their imaginary part;
* ``kernel_block_mean`` on inputs (or a batch kernel) with an empty batch dimension divided by zero while it sized
  its chunks or tiles per batch entry (``ZeroDivisionError``, both engines);
* group ids on the meta device failed inside torch (``GroupKernel``: ".item() cannot be called on meta tensors") or
  were blamed on their encoding (``GroupGaussianLikelihood(groups=...)``: "encode names as ids first");
* ``BlockMeanKernel`` with ``diag=True`` at batched training inputs (``train_x.expand(3, n, d)``) returned the
  unbatched ``(n,)`` diagonal where ``kernel(x)`` is ``(3, n, n)`` and GPyTorch's kernels give ``(3, n)``, and its
  cross covariances over an empty batch divided by zero while sizing their row chunks;
* no points at all (``n = 0``): ``GroupKernel`` refused them with "labels must not be empty" (a partition's message,
  about an argument the user never passed) and ``BlockMeanKernel(..., diag=True)`` failed in ``torch.cat``, where
  GPyTorch's kernels give the empty ``(0, 0)`` matrix and ``(0,)`` diagonal.

Each test fails before its fix. Mixed float32/float64 operands that torch itself refuses (``M32 @ rhs64``) are left
to torch's error, as ``DenseLinearOperator`` leaves them.
"""

from __future__ import annotations

import gpytorch
import numpy as np
import pytest
import torch

from bma_gp import (
    BlockMeanKernel,
    BlockMeanLinearOperator,
    BlockMeanSumLinearOperator,
    GroupGaussianLikelihood,
    GroupKernel,
    Partition,
    kernel_block_mean,
)

DTYPE = torch.float64
LABELS = [0, 1, 0, 2, 1, 2, 2]

LAYOUTS = {
    "scattered": [0, 1, 0, 2, 1, 2, 2],
    "runs": [0, 0, 1, 1, 2, 2, 2],
    "many sizes": [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9, 9, 9, 9, 9],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool])
def test_block_sum_of_integers_is_the_int64_sum_in_every_layout(layout, dtype):
    partition = Partition.from_labels(LAYOUTS[layout])
    n, k = len(partition), partition.num_blocks
    x = torch.full((n, 2), 1 if dtype == torch.bool else 100, dtype=dtype)  # 2 x 100 wraps in int8 and uint8
    expected = torch.nn.functional.one_hot(partition.labels, k).mT @ x.long()

    res = partition.block_sum(x, dim=0)

    assert res.dtype == torch.int64 == torch.sum(x).dtype
    assert torch.equal(res, expected)
    assert torch.equal(partition.block_sum(x[:, 0]), expected[:, 0])  # the 1-d path too


def _block_mean(labels=LABELS, diagonal: bool = False, batch=(), seed: int = 0) -> BlockMeanLinearOperator:
    gen = torch.Generator().manual_seed(seed)
    partition = Partition.from_labels(labels)
    k = partition.num_blocks
    root = torch.randn(*batch, k, k, generator=gen, dtype=DTYPE)
    lam = torch.rand(*batch, k, generator=gen, dtype=DTYPE) + 0.5
    B = root @ root.mT / k
    return BlockMeanLinearOperator(lam, B.diagonal(dim1=-2, dim2=-1) if diagonal else B, partition, diagonal=diagonal)


def _operators() -> dict:
    M = _block_mean()
    second = _block_mean([0, 0, 1, 1, 0, 1, 1], seed=1)
    return {
        "block mean": M,
        "diagonal B": _block_mean(diagonal=True),
        "sum": M.add_diagonal(torch.linspace(0.5, 1.0, len(LABELS), dtype=DTYPE)),
        "two partitions": BlockMeanSumLinearOperator(
            torch.ones(len(LABELS), dtype=DTYPE), M.B, second.B, partitions=[M.partition, second.partition]
        ),
        "product": M @ second,
    }


@pytest.mark.parametrize(
    "kind, method",
    [
        (kind, method)
        for kind in ("block mean", "diagonal B", "sum", "two partitions", "product")
        for method in ("solve", "inv_quad_logdet", "sqrt_inv_matmul")
        if (kind, method) != ("product", "sqrt_inv_matmul")  # not symmetric: no square root
    ],
)
def test_a_0d_right_hand_side_is_refused_by_name(kind, method):
    op = _operators()[kind]
    with pytest.raises(ValueError, match="0-d tensor; pass a vector of shape \\(7,\\)"):
        getattr(op, method)(torch.tensor(1.0, dtype=DTYPE))
    # a vector of the same value is the way round, and agrees with the dense matrix
    rhs = torch.tensor(1.0, dtype=DTYPE).expand(7)
    if method == "solve":
        torch.testing.assert_close(op.solve(rhs), torch.linalg.solve(op.to_dense(), rhs))


@pytest.mark.parametrize("kind", ["block mean", "diagonal B", "sum", "two partitions"])
@pytest.mark.parametrize("shape", [(), (1,), (7,)])
def test_a_complex_diagonal_is_refused_not_cast_to_real(kind, shape):
    op = _operators()[kind]
    diag = torch.full(shape, 1 + 2j, dtype=torch.complex128)
    with pytest.raises(TypeError, match="diag has dtype torch.complex128, but block mean operators are real"):
        op.add_diagonal(diag)
    # its real part is the way round, and adds as a dense diagonal would
    expected = op.to_dense() + torch.diag_embed(diag.real.expand(7))
    torch.testing.assert_close(op.add_diagonal(diag.real).to_dense(), expected)


@pytest.mark.parametrize("kind", ["block mean", "diagonal B"])
@pytest.mark.parametrize("shape", [(), (1, 1)])
def test_a_complex_constant_is_refused_not_cast_to_real(kind, shape):
    op = _operators()[kind]
    c = torch.full(shape, 1 + 2j, dtype=torch.complex128)
    with pytest.raises(TypeError, match="the added constant has dtype torch.complex128"):
        op + c
    torch.testing.assert_close((op + c.real).to_dense(), op.to_dense() + c.real)


@pytest.mark.parametrize("options", [{}, {"rank": 1}, {"per_group_variance": False}])
def test_group_kernel_over_an_empty_batch_is_empty_as_gpytorch_kernels_are(options):
    kernel = GroupKernel(3, **options).to(DTYPE)
    empty = torch.zeros(0, 5, 1, dtype=DTYPE)
    ids = torch.tensor([[0.0], [1.0], [2.0], [1.0], [0.0]], dtype=DTYPE)

    covar = kernel(empty).evaluate_kernel()
    assert isinstance(covar, BlockMeanLinearOperator)  # still closed form
    assert covar.to_dense().shape == (0, 5, 5)
    assert kernel(empty, diag=True).shape == (0, 5)
    assert kernel(empty, ids).to_dense().shape == (0, 5, 5)
    assert kernel(ids, empty).to_dense().shape == (0, 5, 5)
    assert kernel(empty, torch.zeros(0, 3, 1, dtype=DTYPE)).to_dense().shape == (0, 5, 3)
    noisy = covar.add_diagonal(torch.tensor(1.0, dtype=DTYPE))
    assert noisy.solve(torch.ones(0, 5, 2, dtype=DTYPE)).shape == (0, 5, 2)
    assert noisy.logdet().shape == (0,)
    # a batch of one is unchanged: the empty batch's placeholder ids do not leak into other shapes
    torch.testing.assert_close(kernel(ids.unsqueeze(0)).to_dense()[0], kernel(ids).to_dense())


@pytest.mark.parametrize("flag", ["False", "True", None, 2, torch.tensor(False)])
def test_sum_diagonal_flags_must_be_booleans(flag):
    partition = Partition.from_labels(LABELS)
    d, B = torch.ones(7, dtype=DTYPE), 2 * torch.eye(3, dtype=DTYPE)
    with pytest.raises(TypeError, match="diagonal\\[0\\] must be True or False"):
        BlockMeanSumLinearOperator(d, B, partitions=[partition], diagonal=[flag])
    for flags in ([False], (False,), [np.False_], np.array([False]), [0]):  # booleans in any form still work
        op = BlockMeanSumLinearOperator(d, B, partitions=[partition], diagonal=flags)
        assert op.shape == (7, 7)
        torch.testing.assert_close(
            op.to_dense(), torch.diag_embed(d) + partition.expand(partition.expand(B, dim=-1), dim=-2)
        )


def test_sum_arguments_given_bare_instead_of_as_lists_are_refused_in_words():
    partition = Partition.from_labels(LABELS)
    d, b = torch.ones(7, dtype=DTYPE), torch.ones(3, dtype=DTYPE)
    with pytest.raises(TypeError, match="diagonal must be a list with one True/False flag per partition"):
        BlockMeanSumLinearOperator(d, b, partitions=[partition], diagonal=True)
    with pytest.raises(TypeError, match="partitions=\\[partition\\]"):
        BlockMeanSumLinearOperator(d, b, partitions=partition, diagonal=[True])


def test_sum_complex_weights_are_refused_not_cast_to_real():
    partition = Partition.from_labels(LABELS)
    d, B = torch.ones(7, dtype=DTYPE), torch.eye(3, dtype=DTYPE)
    weights = torch.full((7,), 1j, dtype=torch.complex128)
    with pytest.raises(TypeError, match="weights\\[0\\] has dtype torch.complex128"):
        BlockMeanSumLinearOperator(d, B, partitions=[partition], weights=[weights])


@pytest.mark.parametrize(
    "make_kernel",
    [
        lambda: gpytorch.kernels.RBFKernel(),  # the stationary engine
        lambda: gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=1.5)),
        lambda: gpytorch.kernels.LinearKernel(),  # the generic engine
        lambda: gpytorch.kernels.PeriodicKernel(),
    ],
)
@pytest.mark.parametrize("batch", [(0,), (2, 0)])
@pytest.mark.parametrize("x_dtype", [torch.float32, DTYPE])
def test_kernel_block_mean_over_an_empty_batch_is_empty(make_kernel, batch, x_dtype):
    kernel = make_kernel()
    x = torch.randn(6, 2, dtype=x_dtype)
    partition = Partition.from_labels(torch.arange(6) % 2)
    res = kernel_block_mean(kernel, x.expand(*batch, 6, 2), partition)
    assert isinstance(res, BlockMeanLinearOperator)
    assert res.shape == (*batch, 6, 6)
    assert res.dtype == kernel_block_mean(kernel, x, partition).dtype  # as a non-empty batch would be
    assert res.logdet().shape == batch


def test_kernel_block_mean_of_an_empty_batch_kernel_is_empty():
    kernel = gpytorch.kernels.RBFKernel(batch_shape=torch.Size([0]))
    res = kernel_block_mean(kernel, torch.randn(6, 2), Partition.from_labels(torch.arange(6) % 3))
    assert res.shape == (0, 6, 6)


def test_group_ids_on_the_meta_device_are_refused_by_name():
    meta_ids = torch.zeros(5, 1, device="meta")
    with pytest.raises(ValueError, match="x1 is on the meta device, which holds no values"):
        GroupKernel(3)(meta_ids).to_dense()
    likelihood = GroupGaussianLikelihood(3)
    f = gpytorch.distributions.MultivariateNormal(torch.zeros(5), torch.eye(5))
    with pytest.raises(ValueError, match="groups is on the meta device, which holds no values"):
        likelihood(f, groups=torch.zeros(5, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="is on the meta device, which holds no values"):
        likelihood(f, meta_ids)
    # the same ids on the CPU work
    assert likelihood(f, groups=torch.zeros(5, dtype=torch.long)).variance.shape == (5,)


@pytest.mark.parametrize("batch", [(3,), (2, 1), (0,)])
def test_block_mean_kernel_shapes_over_batched_inputs_follow_gpytorch(batch):
    gen = torch.Generator().manual_seed(0)
    train_x, new_x = torch.randn(6, 2, generator=gen), torch.randn(2, 2, generator=gen)
    kernel = BlockMeanKernel(gpytorch.kernels.RBFKernel(), train_x, Partition.from_labels(torch.arange(6) % 2))
    rbf = gpytorch.kernels.RBFKernel()
    joint = torch.cat([train_x, new_x])
    for x1, x2 in [(train_x, train_x), (joint, joint), (new_x, train_x), (train_x, new_x)]:
        x1, x2 = x1.expand(*batch, *x1.shape), x2.expand(*batch, *x2.shape)
        full = kernel(x1, x2).to_dense()
        assert full.shape == rbf(x1, x2).shape
        if x1.shape == x2.shape:
            diagonal = kernel(x1, x2, diag=True)
            assert diagonal.shape == rbf(x1, x2, diag=True).shape
            torch.testing.assert_close(diagonal, torch.diagonal(full, dim1=-2, dim2=-1))


@pytest.mark.parametrize("options", [{}, {"rank": 1}, {"slope": True}])
def test_group_kernel_at_no_points_is_the_empty_matrix(options):
    kernel = GroupKernel(3, **options)
    columns = 2 if options.get("slope") else 1
    empty, some = torch.zeros(0, columns), torch.tensor([[0.0, 1.0], [1.0, 2.0], [2.0, 0.5]])[:, :columns]
    rbf = gpytorch.kernels.RBFKernel()
    for x1, x2 in [(empty, empty), (empty, some), (some, empty)]:
        assert kernel(x1, x2).to_dense().shape == rbf(x1, x2).shape
    assert kernel(empty, diag=True).shape == (0,)
    with pytest.raises(ValueError, match="x1 holds 7.0"):  # the ids are still checked
        kernel(torch.full((1, columns), 7.0), empty).to_dense()


def test_block_mean_kernel_diagonal_at_no_points_is_empty():
    train_x = torch.randn(6, 2)
    kernel = BlockMeanKernel(gpytorch.kernels.RBFKernel(), train_x, Partition.from_labels(torch.arange(6) % 2))
    empty = torch.zeros(0, 2)
    assert kernel(empty, diag=True).shape == (0,)
    assert kernel(empty.expand(3, 0, 2), diag=True).shape == (3, 0)
    assert kernel(empty).to_dense().shape == (0, 0)
