"""Audit of the partition builders and of block_mean / block_mean_from_sums as a user calls them."""

import warnings

import numpy as np
import pytest
import torch
from linear_operator.operators import DenseLinearOperator

from bma_gp import Partition, block_mean, block_mean_from_sums
from bma_gp.partition_builders import (
    group_partition,
    kdtree_partition,
    kmeans_objective,
    kmeans_partition,
    sorted_partition,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems


def _in_input_order(partition: Partition, perm: torch.Tensor) -> torch.Tensor:
    """Labels of ``partition`` (built on ``x[perm]``) read in the order of ``x``."""
    labels = torch.empty_like(partition.labels)
    labels[perm] = partition.labels
    return labels


# ---------------------------------------------------------------------------- integer inputs
def test_integer_times_are_sorted_and_split_exactly():
    # Unix times in seconds: neighbouring seconds are one float32 number, so they used to tie and keep their
    # (shuffled) input order
    times = 1_700_000_000 + torch.arange(1000)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    for partition in (sorted_partition(times[perm], 10), kdtree_partition(times[perm], 100)):
        labels = _in_input_order(partition, perm)
        assert bool((labels[1:] >= labels[:-1]).all())
    # beyond float64's integers too, for the sort
    assert sorted_partition(torch.tensor([2**53 + 1, 2**53, 0]), 3).labels.tolist() == [2, 1, 0]


def test_kmeans_objective_of_integer_points_is_exact():
    x = torch.tensor([[16_777_217], [16_777_216]])  # 2^24 + 1 and 2^24: one float32 number
    assert float(kmeans_objective(x, Partition.from_labels(torch.tensor([0, 0])))) == 0.5


# ---------------------------------------------------------------------------- k-means: no empty clusters
@pytest.mark.parametrize("sample_size, full_iters", [(10, 0), (50, 0), (50, 1), (None, 0)])
def test_kmeans_fills_every_cluster_when_x_has_k_distinct_points(sample_size, full_iters):
    # 7 distinct points, one of them 994 times: a subsample sees few of them, and one pass over all points left
    # clusters empty, which were dropped with a warning that x had fewer than k distinct points
    x = torch.zeros(1000, 1)
    x[:6, 0] = torch.arange(1.0, 7.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        partition = kmeans_partition(x, 7, sample_size=sample_size, full_iters=full_iters)
    assert partition.num_blocks == 7
    assert int(partition.sizes.min()) >= 1


def test_kmeans_still_drops_clusters_when_x_has_fewer_distinct_points():
    x = torch.tensor([[0.0], [0.0], [1.0], [1.0], [2.0], [2.0]]).repeat(50, 1)
    with pytest.warns(UserWarning, match="fewer than k = 5 distinct points, so 2 clusters"):
        partition = kmeans_partition(x, 5, sample_size=20, full_iters=1)
    assert partition.num_blocks == 3
    assert float(kmeans_objective(x, partition)) == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": 2**64}, r"seed must be an int in 0 \.\. 2\*\*32 - 1 = 4294967295, got 18446744073709551616"),
        ({"seed": -(2**63) - 1}, "seed must be an int in"),
        ({"tol": "0.1"}, "tol must be a non-negative number"),
        ({"tol": -0.5}, "tol must be a non-negative number"),
        ({"tol": float("nan")}, "tol must be a non-negative number"),
        ({"tol": True}, "tol must be a non-negative number"),
    ],
)
def test_kmeans_names_a_bad_seed_or_tol(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kmeans_partition(torch.randn(20, 2), 3, **kwargs)


def test_kmeans_takes_the_seeds_that_reach_the_generator_and_refuses_the_rest():
    # torch's CPU generator keeps 32 bits of a seed: a wider one would silently repeat one of these
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(1))
    for seed in (0, 2**32 - 1, np.uint32(2**32 - 1), np.int64(7)):
        assert kmeans_partition(x, 3, seed=seed).num_blocks == 3
    for seed in (2**64 - 1, -(2**63), np.uint64(2**63), 2**32, -1):
        with pytest.raises(ValueError, match="torch's random generator keeps 32 bits of a seed"):
            kmeans_partition(x, 3, seed=seed)
    assert kmeans_partition(x, 3, tol=np.float32(0.5)).num_blocks == 3


# ---------------------------------------------------------------------------- block_mean_from_sums
@pytest.mark.parametrize(
    "block_sums, diag_sums, match",
    [
        (np.ones((2, 2)), torch.ones(2), r"block_sums must be a tensor, got ndarray; convert it with torch.as_tensor"),
        (torch.ones(2, 2), [1.0, 1.0], r"diag_sums must be a tensor, got list"),
        (torch.ones(2, 2, dtype=torch.complex64), torch.ones(2), "block_sums must hold real numbers"),
        (torch.ones(2, 2), torch.ones(2, dtype=torch.bool), "diag_sums must hold real numbers"),
    ],
)
def test_block_mean_from_sums_names_sums_that_are_not_real_tensors(block_sums, diag_sums, match):
    with pytest.raises(TypeError, match=match):
        block_mean_from_sums(block_sums, diag_sums, Partition.from_sizes([2, 1]))


# ---------------------------------------------------------------------------- block_mean in 16-bit floats
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("as_operator", [False, True])
def test_block_mean_of_a_16_bit_matrix_sums_in_float32(dtype, as_operator):
    g = torch.Generator().manual_seed(0)
    A = torch.rand(300, 300, generator=g, dtype=torch.float64)
    A = A + A.T
    partition = Partition.from_labels(torch.randint(0, 3, (300,), generator=g))
    for matrix, part in ((A, partition), (torch.ones(300, 300), Partition.from_sizes([300]))):
        low = matrix.to(dtype)
        reference = block_mean(low.double(), part)  # the exact means of the 16-bit entries
        result = block_mean(DenseLinearOperator(low) if as_operator else low, part)
        assert result.dtype == dtype
        # the means rounded once to the 16-bit type (the sums of 300^2 ones overflowed float16: NaN)
        eps = torch.finfo(dtype).eps
        assert torch.allclose(result.B.double(), reference.B, rtol=eps, atol=0)
        assert torch.allclose(result.lam.double(), reference.lam, rtol=0, atol=2 * eps)


# ---------------------------------------------------------------------------- read-only arrays (pandas columns)
def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # what pandas' copy-on-write hands out for a column's values
    return array


@pytest.mark.parametrize(
    "build",
    [
        lambda: group_partition(_read_only(np.array([3, 1, 3]))),
        lambda: group_partition(_read_only(np.array([3.0, 1.0, 3.0]))),
        lambda: kmeans_partition(_read_only(np.array([[0.0, 1.0], [5.0, 1.0], [0.5, 1.0]])), 2),
        lambda: sorted_partition(_read_only(np.array([3.0, 1.0, 2.0])), 2),
        lambda: kdtree_partition(_read_only(np.array([3, 1, 2])), 2),
    ],
)
def test_builders_read_a_read_only_array_without_a_torch_warning(build):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.as_tensor warns once per process that it may write to it
        partition = build()
    assert partition.num_blocks == 2


# ---------------------------------------------------------------------------- block_mean of a non-symmetric matrix
def test_block_mean_of_a_non_symmetric_matrix_is_that_of_its_symmetric_part_unless_told():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(7, 7, generator=g, dtype=torch.float64)
    partition = Partition.from_labels(torch.tensor([0, 1, 0, 2, 1, 1, 0]))
    general = block_mean(A, partition, symmetric=False)
    symmetric = block_mean(0.5 * (A + A.T), partition, symmetric=False).to_dense()
    torch.testing.assert_close(block_mean(A, partition).to_dense(), symmetric)
    # a non-symmetric block mean operator is its own approximation only when symmetric=False is asked for; the
    # default returned it unchanged (not symmetric) while its dense twin got the symmetric part
    assert block_mean(general, partition, symmetric=False) is general
    for approximation in (block_mean(general, partition), block_mean(general.to_dense(), partition)):
        assert approximation.symmetric
        torch.testing.assert_close(approximation.to_dense(), symmetric)


# ---------------------------------------------------------------------------- meta inputs
@pytest.mark.parametrize(
    "build, name",
    [
        (lambda x: kmeans_partition(x, 2), "x is"),
        (lambda x: kdtree_partition(x, 2), "x is"),
        (lambda x: sorted_partition(x, 2), "x is"),
        (lambda x: kmeans_objective(x, Partition.from_sizes([2, 2])), "x is"),
        (lambda x: group_partition(x[:, 0].long()), "ids are"),
    ],
)
def test_builders_refuse_meta_inputs_in_words(build, name):
    # the values decide the partition; this was "Tensor.item() cannot be called on meta tensors" from torch
    with pytest.raises(ValueError, match=f"{name} on the meta device, which hold.? no values.*on a real device"):
        build(torch.empty(4, 2, device="meta"))


# ---------------------------------------------------------------------------- k-means at any scale
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_kmeans_does_not_depend_on_the_units_of_x(scale):
    # float32 squared distances overflow from coordinates of 1e19 and underflow below 1e-19: k-means++ saw one
    # point and the partition had 3 (1e20) or 1 (1e-30) blocks, with a warning about too few distinct points
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        partition = kmeans_partition(x * scale, 10)
    assert torch.equal(partition.labels, kmeans_partition(x, 10).labels)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_mean_from_16_bit_sums_of_large_blocks(dtype):
    # block sums of a matrix of 0.001s over blocks of 300 and 2 points (diagonal 0.002): s_i s_j = 90000 overflowed
    # float16, and B was 0 on the large block
    partition = Partition.from_sizes([300, 2])
    T = torch.tensor([[90.0, 0.6], [0.6, 0.004]], dtype=torch.float64)
    d = torch.tensor([0.6, 0.004], dtype=torch.float64)
    reference = block_mean_from_sums(T.to(dtype).double(), d.to(dtype).double(), partition)
    result = block_mean_from_sums(T.to(dtype), d.to(dtype), partition)
    assert result.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(result.B.double(), reference.B, rtol=eps, atol=0)
    torch.testing.assert_close(result.lam.double(), reference.lam, rtol=eps, atol=0)


# ---------------------------------------------------------------------------- kd-tree: any leaf size
@pytest.mark.parametrize("leaf_size", [20, 10**6, 2**63, 2**70, np.uint64(2**64 - 1)])
def test_kdtree_with_a_leaf_size_of_at_least_n_is_one_block(leaf_size):
    # 2**63 and above wrapped in the comparison with the cell sizes: the splitting never stopped (or OverflowError)
    partition = kdtree_partition(torch.randn(20, 2), leaf_size)
    assert partition.num_blocks == 1 and len(partition) == 20
