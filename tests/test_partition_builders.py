"""Partition builders: determinism, no empty blocks, sizes, quality, validation."""

import numpy as np
import pytest
import torch

from bma_gp import Partition
from bma_gp.partition_builders import (
    group_partition,
    kdtree_partition,
    kmeans_objective,
    kmeans_partition,
    sorted_partition,
)


def _blobs(n=600, d=3, centres=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = 5 * torch.randn(centres, d, generator=g)
    return c[torch.randint(centres, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


def _check_valid(p: Partition, n: int):
    assert isinstance(p, Partition)
    assert len(p) == n
    assert int(p.sizes.min()) >= 1
    assert int(p.sizes.sum()) == n
    assert torch.equal(torch.bincount(p.labels, minlength=p.num_blocks), p.sizes)


# ---------------------------------------------------------------------------- k-means
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kmeans_deterministic_and_valid(dtype):
    x = _blobs().to(dtype)
    a, b = kmeans_partition(x, 12, seed=3), kmeans_partition(x, 12, seed=3)
    _check_valid(a, x.shape[0])
    assert a.num_blocks == 12
    assert torch.equal(a.labels, b.labels)


def test_kmeans_beats_random_assignment_and_finds_blobs():
    x = _blobs(centres=6)
    p = kmeans_partition(x, 6, seed=0)
    g = torch.Generator().manual_seed(1)
    random_labels = torch.randint(6, (x.shape[0],), generator=g)
    random = Partition.from_labels(random_labels)
    assert kmeans_objective(x, p) < 0.2 * kmeans_objective(x, random)
    # well separated blobs: within-cluster sum of squares close to the noise level 0.3^2 * n * d
    assert kmeans_objective(x, p) < 2 * 0.09 * x.numel()


def test_kmeans_subsample_phase_matches_quality():
    x = _blobs(n=3000, d=2, centres=8, seed=2)
    full = kmeans_partition(x, 8, seed=0)
    sub = kmeans_partition(x, 8, seed=0, sample_size=500)
    _check_valid(sub, 3000)
    assert kmeans_objective(x, sub) < 1.2 * kmeans_objective(x, full)


def test_kmeans_refills_or_drops_empty_clusters():
    # 5 distinct points, k = 8: at most 5 non-empty clusters can exist
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]]).repeat(4, 1)
    with pytest.warns(UserWarning, match=r"fewer than k = 8 distinct points.* the partition has 5 blocks"):
        p = kmeans_partition(x, 8, seed=0)
    _check_valid(p, 20)
    assert p.num_blocks == 5
    # k = n on distinct points: every point its own block (refilling must reach that)
    y = torch.randn(30, 2, generator=torch.Generator().manual_seed(0))
    q = kmeans_partition(y, 30, seed=0)
    _check_valid(q, 30)
    assert q.num_blocks == 30


def test_kmeans_one_dimensional_input_and_k_one():
    x = torch.linspace(0, 1, 50)
    p = kmeans_partition(x, 1)
    assert p.num_blocks == 1 and int(p.sizes[0]) == 50
    q = kmeans_partition(x, 5)
    # clusters of sorted 1-d data are intervals
    for i in range(q.num_blocks):
        idx = (q.labels == i).nonzero().flatten()
        assert int(idx.max() - idx.min()) + 1 == idx.numel()


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(10, 2), 0), "k must be positive"),
        ((torch.randn(10, 2), 11), "exceeds the number of points"),
        ((torch.randn(10, 2), 2.5), "k must be a positive int"),
        ((torch.randn(2, 3, 4), 2), "shape"),
        ((torch.tensor([[0.0], [float("nan")]]), 1), "NaN"),
        ((torch.empty(0, 2), 1), "at least one point"),
    ],
)
def test_kmeans_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        kmeans_partition(*args)


def test_kmeans_bad_iters():
    with pytest.raises(ValueError, match="iters"):
        kmeans_partition(torch.randn(10, 2), 2, iters=-1)


# ---------------------------------------------------------------------------- kd-tree
@pytest.mark.parametrize("n, leaf", [(1000, 64), (1001, 7), (37, 37), (37, 100), (5, 1), (513, 2)])
def test_kdtree_leaf_sizes(n, leaf):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(n))
    p = kdtree_partition(x, leaf)
    _check_valid(p, n)
    assert int(p.sizes.max()) <= leaf
    if n > leaf:  # balanced halving: a cell of m > leaf points splits into floor(m/2) >= ceil(leaf/2)
        assert int(p.sizes.min()) >= (leaf + 1) // 2


def test_kdtree_splits_on_the_widest_dimension_and_is_spatial():
    g = torch.Generator().manual_seed(0)
    x = torch.stack([100 * torch.rand(400, generator=g), torch.rand(400, generator=g)], -1)
    p = kdtree_partition(x, 100)  # two levels: both splits along the wide first axis
    assert p.num_blocks == 4
    lo = torch.stack([x[p.labels == i, 0].min() for i in range(4)])
    hi = torch.stack([x[p.labels == i, 0].max() for i in range(4)])
    assert bool((hi[:-1] <= lo[1:]).all())  # blocks are intervals of x0, in tree order
    assert kmeans_objective(x, p) < 0.2 * kmeans_objective(x, Partition.from_labels(torch.arange(400) % 4))


def test_kdtree_deterministic_and_bad_input():
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kdtree_partition(x, 10).labels, kdtree_partition(x, 10).labels)
    with pytest.raises(ValueError, match="leaf_size"):
        kdtree_partition(x, 0)
    with pytest.raises(ValueError, match="leaf_size"):
        kdtree_partition(x, True)


# ---------------------------------------------------------------------------- sorted
def test_sorted_partition_equal_counts_in_order():
    t = torch.randperm(103).double()
    p = sorted_partition(t, 10)
    _check_valid(p, 103)
    assert int(p.sizes.max()) - int(p.sizes.min()) <= 1
    # block ids increase with the coordinate
    order = torch.argsort(t)
    assert bool((p.labels[order][1:] >= p.labels[order][:-1]).all())


def test_sorted_partition_other_dim_and_bad_input():
    x = torch.stack([torch.zeros(20), torch.arange(20.0).flip(0)], -1)
    p = sorted_partition(x, 4, dim=1)
    assert torch.equal(p.labels, torch.arange(20).flip(0) * 4 // 20)
    with pytest.raises(ValueError, match="dim"):
        sorted_partition(x, 4, dim=2)
    with pytest.raises(ValueError, match="num_blocks"):
        sorted_partition(x, 21)


# ---------------------------------------------------------------------------- groups
def test_group_partition_relabels_any_integers():
    p = group_partition(torch.tensor([7, -2, 7, 1000, -2, 7]))
    assert torch.equal(p.labels, torch.tensor([1, 0, 1, 2, 0, 1]))
    assert torch.equal(p.sizes, torch.tensor([2, 3, 1]))
    q = group_partition([[3.0], [1.0], [3.0]])  # gpytorch-style float (n, 1) input
    assert torch.equal(q.labels, torch.tensor([1, 0, 1]))


@pytest.mark.parametrize(
    "ids, match",
    [
        ([0.5, 1.0], "whole numbers"),
        ([], "empty"),
        ([[1, 2], [3, 4]], "shape"),
        ([True, False], "dtype"),
        ([float("nan")], "whole numbers"),
    ],
)
def test_group_partition_bad_input(ids, match):
    with pytest.raises(ValueError, match=match):
        group_partition(ids)


def test_group_partition_accepts_string_ids():
    """Group names (a list, a numpy array, a pandas column, an (n, 1) column) number in sorted order; strings mixed
    with other objects are refused (numpy would read ["a", 1] as the strings "a" and "1")."""
    names = ["subject_b", "subject_a", "subject_b", "subject_c", "subject_a"]
    expected = torch.tensor([1, 0, 1, 2, 0])
    for ids in (names, tuple(names), np.array(names), np.array(names, dtype=object), np.array(names)[:, None]):
        assert torch.equal(group_partition(ids).labels, expected)
    pandas = pytest.importorskip("pandas")
    assert torch.equal(group_partition(pandas.Series(names)).labels, expected)
    with pytest.raises(ValueError, match="mix strings with other objects"):
        group_partition(["a", 1, "a"])
    assert torch.equal(group_partition([3, 1, 3]).labels, torch.tensor([1, 0, 1]))  # numbers as before
