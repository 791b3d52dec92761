"""Partition builders: turn inputs (or given group ids) into a :class:`~bma_gp.Partition`.

Block mean approximations are only as good as the partition: points in one block
should be similar, so that the within-block average the block-exchangeable process
takes loses little. The builders here cover the usual cases:

* :func:`kmeans_partition` -- k-means clusters (k-means++ seeding, Lloyd iterations
  with GEMM-based distances, chunked so ``n = 10**6`` runs in seconds);
* :func:`kdtree_partition` -- balanced recursive median bisection on the widest
  dimension, every block holding between ``leaf_size / 2`` and ``leaf_size`` points;
* :func:`sorted_partition` -- equal-count runs along one input dimension (time series);
* :func:`group_partition` -- blocks given by group ids, integers or strings (exact for group effects).

Every builder returns a partition without empty blocks.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings

import numpy as np
import torch
from torch import Tensor

from bma_gp.partition import Partition, _as_array

__all__ = ["kmeans_partition", "kdtree_partition", "sorted_partition", "group_partition", "kmeans_objective"]

# Bytes of distance matrix evaluated at once by the chunked nearest-centre search.
_CHUNK_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------- validation
def _as_points(x, name: str = "x", keep_integers: bool = False) -> Tensor:
    """Return ``x`` as a finite tensor of shape ``(n, d)`` (1-d input becomes ``(n, 1)``).

    Integer input becomes float64, whose integers are exact up to :math:`2^{53}` (the default float32 merges
    neighbouring Unix times in seconds), or stays integer with ``keep_integers`` (for builders that only compare
    values, or that convert them with :func:`_integers_as_float64`, which keeps differences beyond :math:`2^{53}`).
    """
    if not isinstance(x, Tensor):
        try:
            # a pandas frame by position, not by index label; host data on the CPU, not torch's default device
            x = torch.as_tensor(_as_array(x), device="cpu")
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a tensor of shape (n, d); could not convert it ({err}).") from None
    if x.is_meta:
        raise ValueError(
            f"{name} is on the meta device, which holds no values, and a partition depends on the values; build it "
            f"from {name} on a real device (a CPU partition works with meta tensors in block_mean and in the "
            "operators' products; solves, sums and validation read values)."
        )
    if not x.dtype.is_floating_point:
        if x.dtype == torch.bool or x.dtype.is_complex:
            raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}.")
        if not keep_integers:
            x = x.to(torch.float64)
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (n, d) or (n,), got shape {tuple(x.shape)}.")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one point, got shape {tuple(x.shape)}.")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values; remove or impute them before partitioning.")
    return x.detach()


def _as_int64(x: Tensor) -> Tensor:
    """Integer ``x`` as int64 with its order and its differences kept: uint64 is translated by :math:`-2^{63}` (its
    top bit flipped, which int64 holds for every uint64 value), the other integer dtypes are converted as they are."""
    if x.dtype == torch.uint64:
        return x.view(torch.int64) ^ -(2**63)
    return x.to(torch.int64)


def _exact_differences(high: Tensor, low: Tensor) -> tuple[Tensor, Tensor]:
    r"""``high - low`` for int64 tensors with ``high >= low``, as ``(upper, lower)`` with
    ``high - low = upper * 2**32 + lower`` exactly, without overflow: the difference reaches :math:`2^{64} - 1`, which
    int64 does not hold, so the 32-bit halves are subtracted apart (``upper`` in :math:`[0, 2^{32})`, ``lower`` in
    :math:`(-2^{32}, 2^{32})`)."""
    return (high >> 32) - (low >> 32), (high & 0xFFFFFFFF) - (low & 0xFFFFFFFF)


def _integers_as_float64(x: Tensor) -> Tensor:
    r"""Integer points ``x`` as float64, for builders that do arithmetic on them (k-means).

    float64 holds integers exactly only up to :math:`2^{53}`: Unix times in nanoseconds (about :math:`1.7 \cdot
    10^{18}`) are 256 apart there, so neighbouring stamps became one number and k-means saw one point. k-means only
    uses differences between points (it is invariant to shifting a column), so a column with a value beyond
    :math:`2^{53}` is shifted by its minimum first, exactly in integer arithmetic, and the differences are rounded to
    float64 once: they stay exact while they span at most :math:`2^{53}` (104 days in nanoseconds), and beyond that
    lose only float64's relative resolution of the span, not of the values. Columns within :math:`\pm 2^{53}` convert
    exactly, as before."""
    out = x.to(torch.float64)
    # rounding to float64 is monotone and 2**53 is a float64, so an integer is within +-2**53 iff its float64 is
    beyond = ~(out.abs() <= 2.0**53).all(0)
    if bool(beyond.any()):
        columns = _as_int64(x[:, beyond])
        upper, lower = _exact_differences(columns, columns.amin(0))
        # both parts are exact in float64 (upper * 2**32 has at most 32 significant bits): one rounding, in the sum
        out[:, beyond] = upper.to(torch.float64) * 2.0**32 + lower.to(torch.float64)
    return out


def _as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer (a Python or NumPy integer, a one-element integer tensor),
    else ``None`` (also for bools, which are no counts)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
            return None
        return int(value)
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


#: The seeds that give distinct random draws, ``0 .. 2**32 - 1``: torch's CPU generator
#: (``torch.Generator().manual_seed``) takes -2**63 .. 2**64 - 1 but keeps only the low 32 bits of a seed, so seeds
#: 2**32 apart (and -1 and 2**64 - 1) gave the same draws. Shared with ``bma-gp --seed`` (:mod:`bma_gp.cli.arguments`).
_SEED_RANGE = (0, 2**32 - 1)

#: Why a seed is refused outside ``_SEED_RANGE``, for the messages (here and the CLI's).
_SEED_REASON = "torch's random generator keeps 32 bits of a seed"


def _seed(value, name: str = "seed") -> int:
    """Return ``value`` as a Python int in ``_SEED_RANGE`` or raise a ValueError naming ``name``, the range and
    why (a seed outside it would repeat the draws of one inside)."""
    seed = _as_int(value)
    if seed is None:
        raise ValueError(f"{name} must be an int, got {value!r}.")
    low, high = _SEED_RANGE
    if not low <= seed <= high:
        raise ValueError(
            f"{name} must be an int in {low} .. 2**32 - 1 = {high}, got {value!r}: {_SEED_REASON}, so a larger "
            "or negative seed would repeat the result of one in that range."
        )
    return seed


def _positive_int(value, name: str) -> int:
    """Return ``value`` as a positive Python int or raise a ValueError naming ``name``."""
    count = _as_int(value)
    if count is None:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    value = count
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}.")
    return value


def _relabel(labels: Tensor) -> Partition:
    """Partition from labels that may skip ids: empty ids are dropped, the rest renumbered in order."""
    _, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    return Partition.from_labels(inverse)


# ---------------------------------------------------------------------------- k-means
def _nearest_centre(x: Tensor, centres: Tensor, x_sq: Tensor) -> tuple[Tensor, Tensor]:
    r"""Index of and squared distance to the nearest centre for every point.

    Uses :math:`\|x - c\|^2 = \|x\|^2 - 2 x^\top c + \|c\|^2` (one GEMM per chunk of points),
    in chunks of rows so the ``n x k`` distance matrix never exists at once.
    """
    n, k = x.shape[0], centres.shape[0]
    c_sq = centres.square().sum(-1)
    rows = max(1, _CHUNK_BYTES // (x.element_size() * k))
    idx = torch.empty(n, dtype=torch.long, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        d2 = torch.addmm(c_sq.unsqueeze(0), x[start:stop], centres.T, alpha=-2.0)
        best, arg = d2.min(dim=-1)
        idx[start:stop] = arg
        dist[start:stop] = (best + x_sq[start:stop]).clamp_min_(0.0)
    return idx, dist


def _power_of_two_scale(x: Tensor) -> float:
    """The power of two :math:`2^{-e}` with :math:`\\max |x| \\cdot 2^{-e}` in :math:`[1/2, 1)` (1 for a zero ``x``;
    at most the largest power of two of ``x``'s dtype for subnormal ``x``): multiplying by it is exact."""
    largest = float(torch.linalg.vector_norm(x, ord=math.inf))
    if largest == 0.0:
        return 1.0
    return math.ldexp(1.0, -max(math.frexp(largest)[1], 2 - math.frexp(torch.finfo(x.dtype).max)[1]))


def _kmeans_pp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii, 2007): each new centre drawn with probability ~ D(x)^2."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device="cpu"))
    centres = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centres[0] = x[first]
    d2 = (x - centres[0]).square().sum(-1)
    # one uniform draw per centre, taken on the CPU generator so the result is device independent (on the
    # generator's device, not torch's default device: under torch.set_default_device("meta") they held no values)
    draws = torch.rand(k, generator=generator, dtype=torch.float64, device=generator.device)
    for j in range(1, k):
        cum = torch.cumsum(d2.double(), 0)
        total = cum[-1]
        if float(total) <= 0.0:  # every point coincides with a centre: pick any point not yet used
            pick = j % n
        else:
            pick = int(torch.searchsorted(cum, (draws[j] * total).to(cum.device).reshape(1)).clamp_max(n - 1))
        centres[j] = x[pick]
        d2 = torch.minimum(d2, (x - centres[j]).square().sum(-1))
    return centres


def _lloyd(work: Tensor, centres: Tensor, iters: int, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd iterations from ``centres``; returns (centres, labels, squared distances) with labels from the last
    centres."""
    n, k = work.shape[0], centres.shape[0]
    x_sq = work.square().sum(-1)
    labels, d2 = _nearest_centre(work, centres, x_sq)
    for _ in range(iters):
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, work)
        centres = sums / counts.clamp_min(1).unsqueeze(-1).to(work.dtype)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():  # re-seed empty clusters at the worst-served points
            far = torch.topk(d2, min(n, empty.numel())).indices
            centres[empty[: far.numel()]] = work[far]
        new_labels, d2 = _nearest_centre(work, centres, x_sq)
        changed = int((new_labels != labels).sum())
        labels = new_labels
        if changed <= tol * n and not empty.numel():
            break
    return centres, labels, d2


def _first_copies(points: Tensor) -> Tensor:
    """For every point the index of its first exact copy in ``points`` (itself for the first or only copy).

    A lexicographic sort of the rows (one stable sort per column, from the last column to the first, starting from
    the input order, so every run of equal rows starts with its smallest index) and a comparison of neighbours:
    :math:`O(d \\, n \\log n)`, about a fifth of ``torch.unique(points, dim=0)``'s time."""
    n = points.shape[0]
    order = torch.arange(n, device=points.device)
    for column in range(points.shape[1] - 1, -1, -1):
        order = order[torch.argsort(points[order, column], stable=True)]
    rows = points[order]
    starts = torch.ones(n, dtype=torch.bool, device=points.device)
    starts[1:] = (rows[1:] != rows[:-1]).any(-1)
    first = torch.empty_like(order)
    first[order] = order[starts][torch.cumsum(starts, 0) - 1]
    return first


def _fill_empty(labels: Tensor, d2: Tensor, k: int, points: Tensor) -> Tensor:
    """Labels where every empty cluster takes the point farthest from its centre, with all its exact copies in
    ``points``, among the clusters that keep another distinct point (greedily, from the largest squared distance
    ``d2`` down; taking copies of one point out of a cluster that keeps another point never raises the sum of squares,
    and they form a cluster of sum of squares 0). A cluster stays empty only when every cluster holds copies of one
    point: then ``x`` has fewer than ``k`` distinct points, and the partition has one block for each.

    Copies move together, so exact duplicates always share a block. Candidates were the points with ``d2 > 0``, meant
    as "not on their centre", but the expanded distances round: a point on its centre has a ``d2`` of about ``eps``
    (4 copies of one point went to 3 clusters), and two distinct points near their centre can have 0 (their cluster
    kept both, and another stayed empty with a false "fewer than k distinct points" warning).

    Copies are found only here, when a cluster is empty (rare for distinct points): a sort of all rows on every call
    costs about a tenth of a k-means run (``n = 10**6``, ``d = 3``, ``k = 200``). Elsewhere copies share a cluster as
    their rows give the same distances; here copies also take the cluster of their first copy, should rounding have
    split them.
    """
    counts = torch.bincount(labels, minlength=k)
    if bool((counts > 0).all()):
        return labels
    first = _first_copies(points)
    labels = labels[first]
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().flatten()
    if not empty.numel():
        return labels
    heads = (first == torch.arange(first.numel(), device=first.device)).nonzero().flatten()  # one per distinct point
    distinct = torch.bincount(labels[heads], minlength=k)  # distinct points per cluster
    order = heads[torch.argsort(d2[heads], descending=True, stable=True)]  # candidates, farthest first
    cluster = labels[order]
    by_cluster = torch.argsort(cluster, stable=True)  # candidates grouped by cluster, farthest first in each
    grouped = cluster[by_cluster]
    rank = torch.empty_like(by_cluster)
    rank[by_cluster] = torch.arange(grouped.numel(), device=labels.device) - torch.searchsorted(grouped, grouped)
    # the greedy pass takes a candidate while its cluster keeps a distinct point: the first distinct - 1 of each
    moved = order[rank < distinct[cluster] - 1][: empty.numel()]
    target = torch.full_like(labels, -1)
    target[moved] = empty[: moved.numel()]
    target = target[first]  # every copy follows its first copy
    return torch.where(target >= 0, target, labels)


def kmeans_partition(
    x: Tensor,
    k: int,
    seed: int = 0,
    iters: int = 25,
    *,
    sample_size: int | None = None,
    full_iters: int = 2,
    tol: float = 1e-4,
) -> Partition:
    r"""Partition points into ``k`` k-means clusters.

    Minimises the within-block sum of squares

    .. math::
        \sum_i \sum_{m \in \text{block } i} \| x_m - \mu_i \|^2

    by Lloyd iterations from a k-means++ start (Arthur and Vassilvitskii, 2007).
    Distances are one GEMM per chunk of points (about 64 MB at a time whatever ``n``
    is). When ``n`` exceeds ``sample_size``, seeding and the first ``iters`` iterations
    run on a random subsample of that size and at most ``full_iters`` iterations then
    refine the centres on all points, so large ``n`` costs a few passes over the
    ``n x k`` distances. A cluster that loses all its points is re-seeded at the point
    farthest from its centre; a cluster still empty after the last iteration takes the
    point farthest from its centre, with all its exact copies, among the clusters with
    more than one distinct point. Exact duplicates always share a block. Clusters are
    left empty, and dropped with a warning, only when ``x`` has fewer than ``k`` distinct
    points: the partition then has one block per distinct point, fewer than ``k``, never
    an empty one.

    Integer ``x`` is converted to float64. A column with values beyond :math:`2^{53}`
    (where float64 no longer holds every integer: nanosecond time stamps) is first
    shifted by its minimum, exactly, since k-means depends only on differences; they
    are exact while a column spans at most :math:`2^{53}`, and rounded to float64's
    relative precision of the span beyond.

    Args:
        x: the points. # shape: (n, d) or (n,)
        k: number of clusters, ``1 <= k <= n``.
        seed: seed of the random generator, an int in ``0 .. 2**32 - 1``; the result is a
            deterministic function of the arguments. torch's generator keeps only the low 32
            bits of a seed, so a larger or negative seed, which would repeat the partition of
            the seed in that range with the same low 32 bits, is refused (a ValueError).
        iters: maximum number of Lloyd iterations (on the subsample when there is one);
            iterations stop once at most a fraction ``tol`` of the points change cluster.
        sample_size: subsample size for seeding and the first iterations; default
            ``max(20_000, 40 * k)``.
        full_iters: maximum number of Lloyd iterations on all points after the
            subsample phase (unused when ``n <= sample_size``).
        tol: fraction of reassigned points below which iterations stop.

    Returns:
        Partition whose block ``i`` holds the points of cluster ``i``.

    Raises:
        ValueError: ``x`` is not a finite ``(n, d)`` array, ``k`` is not in ``1 .. n``,
            ``seed`` is not an int in ``0 .. 2**32 - 1``, or ``iters`` / ``full_iters`` /
            ``sample_size`` / ``tol`` are invalid.

    Example:
        >>> x = torch.randn(1000, 2)
        >>> kmeans_partition(x, 10).num_blocks
        10
    """
    x = _as_points(x, keep_integers=True)
    points = x  # duplicates are copies in x itself, integers unrounded (distinct points may round to one in work)
    if not x.dtype.is_floating_point:
        x = _integers_as_float64(x)  # exact differences beyond 2**53, where a cast merges neighbouring integers
    n = x.shape[0]
    k = _positive_int(k, "k")
    if k > n:
        raise ValueError(f"k = {k} exceeds the number of points n = {n}; choose k <= n.")
    counts = []
    for name, value in (("iters", iters), ("full_iters", full_iters)):
        count = _as_int(value)
        if count is None or count < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}.")
        counts.append(count)
    iters, full_iters = counts
    seed_value = _seed(seed)
    if isinstance(tol, (bool, np.bool_)) or not isinstance(tol, numbers.Real) or not 0.0 <= tol < math.inf:
        raise ValueError(f"tol must be a non-negative number (a fraction of the points), got {tol!r}.")
    sample_size = max(20_000, 40 * k) if sample_size is None else _positive_int(sample_size, "sample_size")
    sample_size = min(n, max(k, sample_size))

    generator = torch.Generator().manual_seed(seed_value)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    # powers of two that bring |work| to at most 1 keep the sums and squared distances in range (in float32 they
    # overflow from coordinates of 1e19 and underflow below 1e-19, and k-means++ saw all points as one) and change
    # no rounding; centring keeps the GEMM distance expansion accurate
    work = work * _power_of_two_scale(work)  # a new tensor: x itself is never changed
    work = work - work.mean(0, keepdim=True)
    work.mul_(_power_of_two_scale(work))
    if sample_size < n:
        sample = work[torch.randperm(n, generator=generator, device=generator.device)[:sample_size].to(x.device)]
        centres, _, _ = _lloyd(sample, _kmeans_pp(sample, k, generator), iters, tol)
        _, labels, d2 = _lloyd(work, centres, full_iters, tol)
    else:
        _, labels, d2 = _lloyd(work, _kmeans_pp(work, k, generator), iters, tol)
    partition = _relabel(_fill_empty(labels, d2, k, points))
    if partition.num_blocks < k:
        warnings.warn(
            f"kmeans_partition: x has fewer than k = {k} distinct points, so {k - partition.num_blocks} clusters "
            f"stayed empty and were dropped; the partition has {partition.num_blocks} blocks. Choose k <= the number "
            "of distinct points to silence this warning.",
            UserWarning,
            stacklevel=2,
        )
    return partition


def kmeans_objective(x: Tensor, partition: Partition) -> Tensor:
    r"""Within-block sum of squares :math:`\sum_m \| x_m - \mu_{c_m} \|^2` of a partition of ``x``.

    What :func:`kmeans_partition` lowers, to compare partitions of the same points (say two seeds), in float64
    (integer columns beyond :math:`2^{53}` shifted by their minimum first, exactly, as in :func:`kmeans_partition`:
    the objective depends only on differences).

    Args:
        x: the points, shape ``(n, d)`` (or ``(n,)``).
        partition: a :class:`~bma_gp.Partition` of the ``n`` points.

    Returns:
        A 0-d float64 tensor.

    Example:
        >>> import torch
        >>> from bma_gp import Partition
        >>> x = torch.tensor([[0.0], [1.0], [10.0], [12.0]])
        >>> float(kmeans_objective(x, Partition.from_labels(torch.tensor([0, 0, 1, 1]))))
        2.5
    """
    x = _as_points(x, keep_integers=True)
    if not x.dtype.is_floating_point:
        x = _integers_as_float64(x)
    if not isinstance(partition, Partition):
        raise TypeError(f"partition must be a bma_gp.Partition, got {type(partition).__name__}.")
    if len(partition) != x.shape[0]:
        raise ValueError(f"partition has {len(partition)} indices but x has {x.shape[0]} points.")
    partition = partition.to(x.device)  # a partition built on the CPU follows the points, as in block_mean
    means = partition.block_average(x.T.double(), dim=-1).T
    return (x.double() - means[partition.labels]).square().sum()


# ---------------------------------------------------------------------------- kd-tree
def _integer_spans(xs: Tensor, members: Tensor) -> Tensor:
    r"""Widths ``max - min`` of every column in every cell of int64 points ``xs``, shifted by :math:`-2^{63}` so that
    int64 holds them exactly (a width reaches :math:`2^{64} - 1`; the order of the widths, all ``argmax`` needs, is
    kept). ``members`` holds, for every cell, positions in ``xs`` of its points only (padded with repeats).

    ``torch.segment_reduce`` takes no integers; the padded ``(cells, width, d)`` gather is about ``n * d`` values."""
    points = xs[members]  # (cells, width, d)
    upper, lower = _exact_differences(points.amax(1), points.amin(1))  # upper in [0, 2**32), lower in (-2**32, 2**32)
    # (upper - 2**31) * 2**32 lies in [-2**63, 2**63 - 2**32] and the sum, width - 2**63, in int64's range
    return (upper - 2**31) * 2**32 + lower


def kdtree_partition(x: Tensor, leaf_size: int) -> Partition:
    r"""Balanced kd-tree partition: recursive median bisection along the widest dimension.

    Starting from all points, every cell with more than ``leaf_size`` points is split
    at the median of its widest coordinate into halves of sizes
    :math:`\lfloor m/2 \rfloor` and :math:`\lceil m/2 \rceil`, until every cell holds at
    most ``leaf_size`` points. All cells of one level are split together (one sort of
    the ``n`` points per level), so the cost is :math:`O(n \log n \log(n / \text{leaf\_size}))`.
    Leaves end with between :math:`\lceil \text{leaf\_size} / 2 \rceil` and ``leaf_size``
    points (fewer only if ``n`` itself is smaller); blocks are numbered in tree order, so
    neighbouring block ids are neighbouring cells.

    The tree only compares coordinates, so integer ``x`` is compared exactly, at any size
    (as in :func:`sorted_partition`): a float64 copy merged int64 values beyond
    :math:`2^{53}`, such as nanosecond time stamps, and split them at the wrong median.
    Widths are exact too (``max - min`` of int64 reaches :math:`2^{64} - 1`).

    Args:
        x: the points. # shape: (n, d) or (n,)
        leaf_size: the largest number of points in a block.

    Raises:
        ValueError: ``x`` is not a finite ``(n, d)`` array or ``leaf_size`` is not a positive int.
    """
    x = _as_points(x, keep_integers=True)
    integer = not x.dtype.is_floating_point
    if integer:
        x = _as_int64(x)  # uint64 translated into int64's range: the same order and widths
    n = x.shape[0]
    # a leaf of n points is the whole set; past int64 the comparisons with the sizes wrapped (2**63 never stopped)
    leaf_size = min(_positive_int(leaf_size, "leaf_size"), n)
    device = x.device
    order = torch.arange(n, device=device)  # points in tree order; cells are contiguous runs
    sizes = torch.tensor([n], device=device)
    xs = x  # x[order], kept up to date with local (cache-friendly) moves
    while bool((sizes > leaf_size).any()):
        # halving floor/ceil keeps all cell sizes of one level within one of each other,
        # so the level is sorted as a padded (cells, width) batch
        width = int(sizes.max())
        starts = torch.cumsum(sizes, 0) - sizes
        slot = torch.arange(width, device=device)
        valid = slot.unsqueeze(0) < sizes.unsqueeze(-1)  # (cells, width)
        flat = (starts.unsqueeze(-1) + slot).clamp_max(n - 1)  # positions in `order`
        lengths = sizes
        if integer:
            span = _integer_spans(xs, torch.where(valid, flat, starts.unsqueeze(-1)))
        else:
            span = torch.segment_reduce(xs, "max", lengths=lengths, axis=0) - torch.segment_reduce(
                xs, "min", lengths=lengths, axis=0
            )
        widest = span.argmax(-1)  # (cells,)
        key = xs[flat, widest.unsqueeze(-1)]  # (cells, width)
        split = sizes > leaf_size
        key = torch.where(split.unsqueeze(-1), key, torch.zeros_like(key))  # cells that stay keep their order
        key = key.masked_fill(~valid, torch.iinfo(key.dtype).max if integer else float("inf"))
        rank = torch.sort(key, dim=-1, stable=True).indices
        moved = (starts.unsqueeze(-1) + rank)[valid]
        order, xs = order[moved], xs[moved]
        lo = sizes // 2
        halves = torch.stack([lo, sizes - lo], dim=-1)
        sizes = torch.where(split.unsqueeze(-1), halves, torch.stack([sizes, torch.zeros_like(sizes)], -1))
        sizes = sizes.flatten()
        sizes = sizes[sizes > 0]
    labels = torch.empty(n, dtype=torch.long, device=device)
    labels[order] = torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes, output_size=n)
    return Partition.from_labels(labels, sizes.numel())


# ---------------------------------------------------------------------------- sorting
def sorted_partition(x: Tensor, num_blocks: int, dim: int = 0) -> Partition:
    r"""Equal-count runs along one input dimension (for time series and 1-d inputs).

    The points are sorted by coordinate ``dim`` (ties keep their input order) and cut
    into ``num_blocks`` consecutive runs whose sizes differ by at most one: the point
    at sorted position :math:`p` goes to block :math:`\lfloor p \cdot k / n \rfloor`.
    Block ids increase with the coordinate.

    Args:
        x: the points. # shape: (n, d) or (n,)
        num_blocks: number of blocks ``k``, ``1 <= k <= n``.
        dim: the input column to sort by.

    Raises:
        ValueError: bad ``x``, ``num_blocks`` outside ``1 .. n``, or ``dim`` out of range.
    """
    x = _as_points(x, keep_integers=True)  # integers are sorted exactly, at any size
    n, d = x.shape
    num_blocks = _positive_int(num_blocks, "num_blocks")
    if num_blocks > n:
        raise ValueError(f"num_blocks = {num_blocks} exceeds the number of points n = {n}; choose num_blocks <= n.")
    column = _as_int(dim)
    if column is None or not -d <= column < d:
        raise ValueError(f"dim must be an int in {-d} .. {d - 1} for inputs with {d} column(s), got {dim!r}.")
    dim = column
    order = torch.argsort(x[:, dim], stable=True)
    position = torch.arange(n, device=x.device)
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    labels[order] = position * num_blocks // n
    return Partition.from_labels(labels, num_blocks)


# ---------------------------------------------------------------------------- groups
def _categorical_codes(ids) -> Tensor | None:
    """A pandas ``Categorical`` or a column of category dtype (``pandas.cut`` / ``qcut`` bins, R factors): its codes
    as a ``(n,)`` integer tensor, the levels numbered in the order of its categories; None for anything else. A
    missing value (code -1) is refused: it belongs to no level."""
    if type(getattr(ids, "dtype", None)).__name__ != "CategoricalDtype":
        return None
    codes = getattr(ids, "codes", None)  # a Categorical; a Series holds them under .cat
    if codes is None:
        codes = ids.cat.codes
    codes = np.asarray(codes).astype(np.int64)
    if codes.size and bool((codes < 0).any()):
        position = int(np.flatnonzero(codes < 0)[0])
        raise ValueError(
            f"ids (a pandas categorical) hold a missing value at position {position}; every point needs a group: give "
            "those points a category of their own or drop them."
        )
    return torch.as_tensor(codes, device="cpu")


def _ids_shape_message(shape: tuple[int, ...]) -> str:
    """The error for ids that are not one id per point (pairs or tuples of ids: several columns)."""
    hint = ""
    if len(shape) == 2:
        hint = (
            f" Each point has {shape[1]} values: for one group per combination (a nested or interaction id) "
            "number the combinations first, codes, _ = pandas.factorize(pandas.MultiIndex.from_arrays(columns)), "
            "or give each column its own partition (one GroupKernel per grouping)."
        )
    return f"ids must have shape (n,) or (n, 1), got shape {tuple(shape)}.{hint}"


def _string_ids_as_integers(ids):
    """String ids (in any sequence numpy reads, pandas columns included) as their positions in sorted order, a
    ``(n,)`` or ``(n, 1)`` integer tensor; numbers held as Python objects as a numeric array; anything else is
    returned unchanged."""
    try:
        array = np.asarray(ids)
        if array.dtype.kind in "iufb":  # numbers: the integer path (a nullable pandas column reads NA as NaN)
            # a pandas column reads as a read-only view (copy-on-write), which torch.as_tensor warns about
            return array if array.flags.writeable else array.copy()
        if array.dtype.kind not in "USO":
            return ids
        array = np.asarray(ids, dtype=object)  # numpy reads ["a", 1] as two strings: look at the objects themselves
    except (TypeError, ValueError):  # ragged input: left to the conversion's own message
        return ids
    if array.size == 0:
        raise ValueError("ids must not be empty: a partition needs at least one index.")
    if array.ndim > 2 or (array.ndim == 2 and array.shape[1] != 1):  # pairs (a nested id): before their kinds
        raise ValueError(_ids_shape_message(array.shape))
    flat = array.reshape(-1)
    strings = [isinstance(x, str) for x in flat]
    if not any(strings):
        numeric = np.asarray(array.tolist())  # numbers held as objects (a pandas object column): as numbers
        if numeric.dtype.kind in "iuf":
            return numeric
        if any(x is None or type(x).__name__ == "NAType" for x in flat):
            raise ValueError(
                "ids hold missing values (None or pandas NA); drop those rows or give them a group id of their own."
            )
        return ids
    if not all(strings):
        for position, x in enumerate(flat):  # None, NaN and pandas' NA: a missing label, not another kind of id
            if x is None or (isinstance(x, float) and x != x) or type(x).__name__ == "NAType":
                raise ValueError(
                    f"ids hold a missing label ({x!r}) at position {position}; every point needs a group: fill the "
                    "missing labels in (for example with a level of their own, such as 'unknown') or drop those rows."
                )
        raise ValueError(
            "ids mix strings with other objects; pass one kind of group id (all strings, or all integers)."
        )
    _, inverse = np.unique(array.reshape(-1).astype(str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(array.shape), dtype=torch.long, device="cpu")


def group_partition(ids) -> Partition:
    """Partition by given group ids: one block per distinct id.

    Any integers are accepted (negative, sparse, unsorted); blocks are numbered
    ``0 .. k-1`` in increasing order of the id. Floating ids are accepted when they are
    whole numbers (gpytorch passes inputs as floats), and an ``(n, 1)`` column is
    treated as a vector. Strings (a list, a numpy array or a pandas column of names)
    are accepted too, numbered in sorted order. A pandas categorical (a ``Categorical`` or a
    column of category dtype, such as the bins of ``pandas.qcut(x, 40)``) is read by its codes:
    blocks in the order of its categories (unused categories get none), a missing value refused.

    Args:
        ids: group id of every point. # shape: (n,) or (n, 1)

    Raises:
        ValueError: empty ids, a non-numeric dtype, a shape other than ``(n,)`` /
            ``(n, 1)``, floating ids that are not whole numbers, strings mixed with
            other objects, or a missing value in a pandas categorical.

    Example:
        >>> group_partition(["b", "a", "b", "c"]).labels
        tensor([1, 0, 1, 2])
    """
    if not isinstance(ids, Tensor):
        codes = _categorical_codes(ids)
        ids = codes if codes is not None else _string_ids_as_integers(ids)
    if not isinstance(ids, Tensor):
        try:
            ids = torch.as_tensor(ids, device="cpu")  # host data: on the CPU, not torch's default device
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"ids must be a 1-d sequence of integers; could not convert it ({err}).") from None
    if ids.dim() == 2 and ids.shape[-1] == 1:
        ids = ids.squeeze(-1)
    if ids.dim() != 1:
        raise ValueError(_ids_shape_message(tuple(ids.shape)))
    if ids.numel() == 0:
        raise ValueError("ids must not be empty: a partition needs at least one index.")
    if ids.dtype == torch.bool or ids.dtype.is_complex:
        raise ValueError(f"ids must hold integers, got dtype {ids.dtype}.")
    if ids.is_meta:
        raise ValueError(
            "ids are on the meta device, which hold no values, and a partition depends on the values; build it "
            "from ids on a real device (a CPU partition works with meta tensors in block_mean and in the operators' "
            "products; solves, sums and validation read values)."
        )
    ids = ids.detach()  # only the values matter (no "requires_grad tensor to a scalar" warning below)
    if ids.dtype.is_floating_point:
        if not bool(torch.isfinite(ids).all()) or not bool((ids == ids.round()).all()):
            raise ValueError(
                "ids must be whole numbers; found a fractional, NaN or infinite value "
                "(pass integer group ids, e.g. from pandas.factorize)."
            )
        # integers below 2 / eps are exact (2^53 in float64, 2^24 in float32, 2048 in float16, 256 in bfloat16); from
        # there on a stored id may be a neighbouring id rounded (2049 is stored as 2048 in float16)
        exact = int(2 / torch.finfo(ids.dtype).eps)  # from here on neighbouring integers round together
        if float(ids.abs().max()) >= exact:
            raise ValueError(
                f"ids of dtype {ids.dtype} from {exact} on are not exact integers (ids {exact} and {exact + 1} are one "
                "number there); pass them as an integer tensor."
            )
    return _relabel(ids)
