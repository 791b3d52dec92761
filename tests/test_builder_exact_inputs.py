"""kd-tree and k-means partitions of integers beyond float64's (2^53) and of exact duplicates, against hand results."""

import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

from bma_gp import Partition
from bma_gp.partition_builders import kdtree_partition, kmeans_objective, kmeans_partition

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems

NS = 1_700_000_000_000_000_000  # a Unix time in nanoseconds; float64 steps by 256 here


def _blocks(partition: Partition) -> set[frozenset[int]]:
    """The blocks as sets of point indices: the partition up to the numbering of its blocks."""
    labels = partition.labels.tolist()
    return {frozenset(i for i, label in enumerate(labels) if label == block) for block in set(labels)}


# ---------------------------------------------------------------------------- kd-tree: integers compared exactly
@pytest.mark.parametrize("as_array", [np.array, torch.tensor])
def test_kdtree_splits_nanosecond_stamps_at_their_median(as_array):
    # stamps 3, 1, 2, 0 ns after NS: the median split puts {0, 1} (points 3 and 1) before {2, 3} (points 2 and 0);
    # as float64 all four were one number and the split kept the input order, [0, 0, 1, 1]
    stamps = as_array([NS + 3, NS + 1, NS + 2, NS])
    assert kdtree_partition(stamps, 2).labels.tolist() == [1, 0, 1, 0]


def test_kdtree_splits_uint64_beyond_2_63_exactly():
    stamps = torch.tensor([2**63 + 3, 2**63 + 1, 2**63 + 2, 2**63], dtype=torch.uint64)
    assert kdtree_partition(stamps, 2).labels.tolist() == [1, 0, 1, 0]


def test_kdtree_leaves_of_shuffled_stamps_are_runs_of_their_ranks():
    # 1-d, n = 16 and leaf_size 4: two levels of halving, so the leaf of the point of rank r is r // 4 (hand result)
    g = torch.Generator().manual_seed(0)
    offsets = torch.randperm(1000, generator=g)[:16]  # distinct, less than float64's step of 256 apart in places
    partition = kdtree_partition(NS + offsets, 4)
    ranks = torch.argsort(torch.argsort(offsets))
    assert partition.labels.tolist() == (ranks // 4).tolist()


def test_kdtree_picks_the_wider_column_when_widths_differ_beyond_2_53():
    # widths 2^60 (column 0) and 2^60 + 1 (column 1): one float64 number, so the first column used to win the tie;
    # along column 1 the order is points 1, 3 | 2, 0
    x = torch.tensor([[0, 2**60 + 1], [2**60, 0], [1, 3], [2, 2]])
    assert kdtree_partition(x, 2).labels.tolist() == [1, 0, 1, 0]


def test_kdtree_width_of_the_whole_int64_range_does_not_overflow():
    # column 0 spans 2^64 - 1 (int64 max - min wraps to -1), column 1 spans 20: split along column 0, order 0, 2 | 3, 1
    x = torch.tensor([[-(2**63), 0], [2**63 - 1, 5], [0, 10], [1, 20]])
    assert kdtree_partition(x, 2).labels.tolist() == [0, 1, 0, 1]
    # the same in uint64, 0 .. 2^64 - 1
    u = torch.tensor([[0, 0], [2**64 - 1, 5], [2**63, 10], [2**63 + 1, 20]], dtype=torch.uint64)
    assert kdtree_partition(u, 2).labels.tolist() == [0, 1, 0, 1]


def test_kdtree_of_small_integers_matches_their_float64_copy():
    # integers float64 holds exactly: the integer path makes the same comparisons, so the same partition
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-(2**40), 2**40, (300, 3), generator=g)
    for leaf in (1, 5, 64):
        assert torch.equal(kdtree_partition(x, leaf).labels, kdtree_partition(x.double(), leaf).labels)


# ---------------------------------------------------------------------------- k-means: integer differences kept
@pytest.mark.parametrize("seed", range(4))
def test_kmeans_separates_nanosecond_stamps_float64_merges(seed):
    # stamps 0, 1, 2 and 100, 101, 102 ns after NS (float64: all one number, 1 block and a warning)
    stamps = torch.tensor([NS + 101, NS, NS + 2, NS + 100, NS + 1, NS + 102])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        partition = kmeans_partition(stamps, 2, seed=seed)
        assert _blocks(partition) == {frozenset({1, 2, 4}), frozenset({0, 3, 5})}
        # within-block sum of squares by hand: (1 + 0 + 1) + (1 + 0 + 1)
        assert float(kmeans_objective(stamps, partition)) == 4.0
        # six distinct stamps, k = 6: one block each
        assert kmeans_partition(stamps, 6, seed=seed).num_blocks == 6


def test_kmeans_objective_of_large_integers_matches_exact_arithmetic():
    g = np.random.default_rng(3)
    x = NS + g.integers(0, 10**6, size=(40, 2))
    labels = g.integers(0, 4, size=40)
    exact = Fraction(0)
    for block in range(4):
        rows = x[labels == block]
        for column in range(2):
            values = [int(v) for v in rows[:, column]]
            mean = Fraction(sum(values), len(values))
            exact += sum((v - mean) ** 2 for v in values)
    result = float(kmeans_objective(torch.tensor(x), Partition.from_labels(torch.tensor(labels))))
    assert result == pytest.approx(float(exact), rel=1e-12)


def test_kmeans_of_integers_spanning_all_of_int64_and_uint64():
    # differences up to 2^64 - 1 (no int64 overflow in the shift): the two ends of the range are the clusters
    x = torch.tensor([-(2**63), 2**63 - 1, -(2**63) + 1, 2**63 - 2])
    assert _blocks(kmeans_partition(x, 2)) == {frozenset({0, 2}), frozenset({1, 3})}
    u = torch.tensor([0, 2**64 - 1, 1, 2**64 - 2], dtype=torch.uint64)
    assert _blocks(kmeans_partition(u, 2)) == {frozenset({0, 2}), frozenset({1, 3})}


def test_kmeans_of_small_integers_matches_their_float64_copy():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-1000, 1000, (200, 2), generator=g)
    for k in (3, 17):
        assert torch.equal(kmeans_partition(x, k).labels, kmeans_partition(x.double(), k).labels)


# ---------------------------------------------------------------------------- k-means: exact duplicates
def _check_copies_share_blocks(x: torch.Tensor, partition: Partition, distinct: int):
    """Assert that the copies of each of the ``distinct`` points of ``x`` share a block."""
    _, point = torch.unique(x, dim=0, return_inverse=True)
    for p in range(distinct):
        assert partition.labels[point == p].unique().numel() == 1, f"copies of point {p} in several blocks"


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("sample_size", [None, 6])
def test_kmeans_keeps_copies_together_with_fewer_distinct_points_than_k(seed, sample_size):
    # 3 distinct points, 4 copies each, k = 5: the copies of one point went to up to 3 blocks (5 blocks, no warning)
    x = torch.tensor(np.repeat(np.random.default_rng(seed).standard_normal((3, 2)), 4, axis=0))
    with pytest.warns(UserWarning, match="fewer than k = 5 distinct points, so 2 clusters stayed empty"):
        partition = kmeans_partition(x, 5, seed=seed, sample_size=sample_size)
    assert _blocks(partition) == {frozenset(range(0, 4)), frozenset(range(4, 8)), frozenset(range(8, 12))}
    assert float(kmeans_objective(x, partition)) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_kmeans_with_fewer_distinct_points_than_k_gives_one_block_per_point(seed):
    # 5 distinct points with 2 .. 9 copies each, shuffled, k from 6 to 10: always 5 blocks, one per distinct point
    g = np.random.default_rng(100 + seed)
    x = torch.tensor(g.permutation(np.repeat(g.standard_normal((5, 3)), g.integers(2, 10, size=5), axis=0)))
    k = int(g.integers(6, 11))
    with pytest.warns(UserWarning, match=f"fewer than k = {k} distinct points, so {k - 5} clusters"):
        partition = kmeans_partition(x, k, seed=seed)
    assert partition.num_blocks == 5
    _check_copies_share_blocks(x, partition, 5)


@pytest.mark.parametrize("seed", range(6))
def test_kmeans_keeps_copies_together_with_enough_distinct_points(seed):
    # 8 distinct points, some with many copies, k = 6 or 8: k blocks, no warning, copies never split
    g = np.random.default_rng(200 + seed)
    x = torch.tensor(g.permutation(np.repeat(g.standard_normal((8, 2)), [1, 1, 2, 3, 5, 8, 13, 21], axis=0)))
    for k in (6, 8):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            partition = kmeans_partition(x, k, seed=seed)
        assert partition.num_blocks == k
        _check_copies_share_blocks(x, partition, 8)
    # k = 8 = the number of distinct points: one block each
    assert len(_blocks(kmeans_partition(x, 8, seed=seed))) == 8


@pytest.mark.parametrize("seed", [12, 55, 102, 106, 110, 136])
def test_kmeans_fills_empty_clusters_with_all_copies_of_a_point(seed):
    # at least k distinct points, but a subsample phase without refinement on all points leaves clusters empty: the
    # fill moved single copies of a point out of its cluster (k blocks, no warning, copies split); now all of them
    g = np.random.default_rng(seed)
    distinct = int(g.integers(3, 9))
    copies = g.integers(1, 8, size=distinct)
    x = torch.tensor(g.permutation(np.repeat(g.standard_normal((distinct, 2)), copies, axis=0)))
    k = int(g.integers(2, distinct + 1))
    iters, sample_size = int(g.integers(0, 2)), int(g.integers(k, x.shape[0] + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        partition = kmeans_partition(x, k, seed=seed, iters=iters, sample_size=sample_size, full_iters=0)
    assert partition.num_blocks == k
    _check_copies_share_blocks(x, partition, distinct)


def test_kmeans_fills_clusters_from_distinct_points_whose_distances_round_to_zero():
    # 100 distinct float32 points within 1e-9 of one another (below float32's resolution once the 5 outer points set
    # the scale): their expanded distances round to 0 or to noise, and the points with 0 were never moved, so 7 of
    # the 30 clusters were filled and the partition came with a false "fewer than k distinct points" warning
    g = torch.Generator().manual_seed(5)
    x = torch.cat([1e-9 * torch.randn(100, 2, generator=g), torch.randn(5, 2, generator=g)])
    assert torch.unique(x, dim=0).shape[0] == 105
    for seed in (0, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kmeans_partition(x, 30, seed=seed).num_blocks == 30


def test_kmeans_copies_of_large_integers_stay_together():
    # 3 distinct stamps (beyond 2^53) with 4 copies each and k = 5: as for floats, 3 blocks and a warning
    x = torch.tensor([NS + 7, NS, NS + 3] * 4)
    with pytest.warns(UserWarning, match="fewer than k = 5 distinct points"):
        partition = kmeans_partition(x, 5)
    assert _blocks(partition) == {frozenset(range(r, 12, 3)) for r in range(3)}
