"""Partition: construction, validation, block sums / expansion against the dense indicator matrix."""

import functools
import pickle

import numpy as np
import pytest
import torch

from bma_gp import BlockMeanLinearOperator, Partition


def indicator(partition):
    return torch.nn.functional.one_hot(partition.labels, partition.num_blocks).double()


@pytest.mark.parametrize("labels", [[0, 1, 0, 2, 1], [0, 0, 1, 1, 1, 2], [3, 2, 1, 0], [0] * 4, [0]])
def test_from_labels_attributes(labels):
    p = Partition.from_labels(labels)
    assert len(p) == len(labels) == p.n
    assert p.labels.dtype == torch.long and p.sizes.dtype == torch.long
    assert p.num_blocks == max(labels) + 1
    assert p.sizes.tolist() == [labels.count(i) for i in range(p.num_blocks)]
    assert p.is_contiguous == (sorted(labels) == labels)


def test_from_labels_accepts_tensors_numpy_and_num_blocks():
    p = Partition.from_labels(np.array([1, 0, 1], dtype=np.int32), num_blocks=2)
    assert p.labels.dtype == torch.long and p.num_blocks == 2
    p = Partition(torch.tensor([0, 1, 1]))
    assert p.sizes.tolist() == [1, 2]


def test_from_sizes_is_contiguous():
    p = Partition.from_sizes([2, 1, 3])
    assert p.labels.tolist() == [0, 0, 1, 2, 2, 2]
    assert p.is_contiguous and p.num_blocks == 3 and len(p) == 6
    assert Partition.from_sizes(torch.tensor([4])).labels.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: Partition.from_labels([0, 2, 2]), r"block\(s\) 1 are empty"),
        (lambda: Partition.from_labels([0, 1], num_blocks=3), r"block\(s\) 2 are empty"),
        (lambda: Partition.from_labels([0, 3], num_blocks=2), "label 3 is out of range for num_blocks=2"),
        (lambda: Partition.from_labels([0, -1]), "non-negative"),
        (lambda: Partition.from_labels([0.0, 1.0]), "must hold integers"),
        (lambda: Partition.from_labels([True, False]), "must hold integers"),
        (lambda: Partition.from_labels([[0, 1]]), "1-dimensional"),
        (lambda: Partition.from_labels([]), "must not be empty"),
        (lambda: Partition.from_labels(["a", "b"]), "sequence of integers"),
        (lambda: Partition.from_labels([0, 1], num_blocks=0), "num_blocks must be positive"),
        (lambda: Partition.from_labels([0, 1], num_blocks=2.0), "num_blocks must be a positive int"),
        (lambda: Partition.from_sizes([2, 0, 1]), r"sizes\[1\] = 0"),
        (lambda: Partition.from_sizes([2, -1]), r"sizes\[1\] = -1"),
        (lambda: Partition.from_sizes([1.5, 2]), "must hold integers"),
        (lambda: Partition.from_sizes([]), "must not be empty"),
    ],
)
def test_invalid_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "labels, num_blocks",
    [([0, 1, 10**12], None), ([0, 1, 2**62], None), ([5, 0], None), ([0, 1], 10**12), ([10**6, 3, 3], None)],
)
def test_a_label_of_n_or_more_raises_before_counting(labels, num_blocks):
    """A label >= n (raw ids: years, user ids) leaves a block empty: the ValueError comes before bincount
    allocates max_label + 1 counters (8 TB for 10**12, which died with a RuntimeError)."""
    from largest_tensor import LargestTensor

    with LargestTensor() as mode, pytest.raises(ValueError, match=r"are empty.*relabel"):
        Partition.from_labels(labels, num_blocks=num_blocks)
    assert mode.largest <= 2 * len(labels) + 2, mode.where


@pytest.mark.parametrize("labels", [[0, 7, 3], [9, 4, 0, 2], [3, 1, 5], [6, 6], [0, 1, 2, 12, 13]])
def test_empty_blocks_are_named_the_same_with_more_blocks_than_indices(labels):
    """The k > n path (no counters) names the same empty blocks as counting does (padded to k <= n)."""
    k = max(labels) + 1
    with pytest.raises(ValueError) as fast:
        Partition.from_labels(labels)
    padded = labels + [labels[0]] * (k - len(labels))  # k <= n: counted with bincount, same empty ids
    with pytest.raises(ValueError) as counted:
        Partition.from_labels(padded)
    assert str(fast.value) == str(counted.value)


@pytest.mark.parametrize("labels", [[2, 0, 1, 0, 2, 2, 1], [0, 0, 1, 2, 2, 2, 2]])
@pytest.mark.parametrize("shape_before", [(), (3,), (2, 3)])
def test_block_sum_and_expand_match_indicator(labels, shape_before):
    p = Partition.from_labels(labels)
    P = indicator(p)
    x = torch.randn(*shape_before, len(labels), 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(p.block_sum(x, dim=-2), P.T @ x)
    g = torch.randn(*shape_before, p.num_blocks, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad((p.block_sum(x, dim=-2) * g).sum(), x)
    torch.testing.assert_close(grad, P @ g)
    y = torch.randn(*shape_before, p.num_blocks, dtype=torch.float64)
    torch.testing.assert_close(p.expand(y, dim=-1), y @ P.T)
    torch.testing.assert_close(p.block_average(x.detach(), dim=-2), (P.T @ x.detach()) / p.sizes.double()[:, None])
    with pytest.warns(DeprecationWarning, match="block_average"):
        torch.testing.assert_close(p.block_mean(x.detach(), dim=-2), p.block_average(x.detach(), dim=-2))


def test_block_sum_shape_errors():
    p = Partition.from_sizes([2, 2])
    with pytest.raises(ValueError, match="expected size 4"):
        p.block_sum(torch.ones(5))
    with pytest.raises(ValueError, match="expected size 2"):
        p.expand(torch.ones(3))


def test_equality_pickle_and_to():
    p = Partition.from_labels([1, 0, 1])
    q = Partition.from_labels(torch.tensor([1, 0, 1]))
    assert p == q and p.same_as(q) and p != Partition.from_labels([0, 1, 1])
    r = pickle.loads(pickle.dumps(p))
    assert r == p and r.is_contiguous == p.is_contiguous
    assert p.to("cpu") is p and p.to(torch.float64) is p and p.to(dtype=torch.float32) is p
    assert "num_blocks=2" in repr(p)


@pytest.mark.cuda
def test_partition_and_operator_follow_cuda():
    p = Partition.from_labels([1, 0, 1, 2]).to("cuda")
    assert p.labels.is_cuda and p.sizes.is_cuda
    lam = torch.rand(3, device="cuda", dtype=torch.float64) + 1
    B = torch.eye(3, device="cuda", dtype=torch.float64)
    op = BlockMeanLinearOperator(lam, B, Partition.from_labels([1, 0, 1, 2]))  # CPU partition follows lam
    assert op.partition.labels.is_cuda
    x = torch.randn(4, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(op.solve(op @ x), x)
    torch.testing.assert_close(op.matrix_inv_sqrt().cpu().to_dense(), op.cpu().matrix_inv_sqrt().to_dense())


# ---------------------------------------------------------------------------- fast paths (issue 5)
def _random_sizes(k, mean, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 2 * mean, (k,), generator=gen)


@functools.lru_cache
def _layouts(n_large=40_000):
    """Partitions that take each route of block_sum / expand_addcmul:
    equal-size runs (reshape), many runs (segment_reduce + gather), scattered small (one gather),
    scattered large (chunked gather on CPU: n above twice the chunk)."""
    gen = torch.Generator().manual_seed(5)
    scattered_large = torch.cat([torch.arange(7), torch.randint(0, 7, (n_large - 7,), generator=gen)])
    return {
        "one_run": Partition.from_sizes([4] * 5),
        "two_runs": Partition.from_sizes([3, 3, 3, 2, 2]),
        "many_runs": Partition.from_sizes(_random_sizes(30, 4, seed=1)),
        "scattered": Partition.from_labels([2, 0, 1, 0, 3, 1, 1, 0, 2, 4, 1, 0]),
        "scattered_large": Partition.from_labels(scattered_large[torch.randperm(n_large, generator=gen)]),
        "contiguous_large_many_runs": Partition.from_sizes(_random_sizes(500, 80, seed=2)),
    }


def test_equal_size_runs_table():
    assert Partition.from_sizes([3, 3, 2, 2, 2])._runs == ((0, 0, 2, 3), (6, 2, 3, 2))
    assert Partition.from_labels([0, 0, 1, 1])._runs == ((0, 0, 2, 2),)
    assert Partition.from_sizes([1, 2] * 5)._runs is None  # 10 runs: gather instead
    assert Partition.from_labels([1, 0, 1])._runs is None  # scattered
    p = Partition.from_sizes([2, 2, 5])
    assert pickle.loads(pickle.dumps(p))._runs == p._runs == ((0, 0, 2, 2), (4, 2, 1, 5))


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("shape_before,t", [((), None), ((), 1), ((), 3), ((2,), 1), ((2, 1), 3)])
def test_fast_block_sum_and_expand_addcmul_match_reference(layout, shape_before, t):
    p = _layouts()[layout]
    n, k = len(p), p.num_blocks
    trail = () if t is None else (t,)
    dim = -1 if t is None else -2
    x = torch.randn(*shape_before, n, *trail, dtype=torch.float64)
    want = torch.zeros(*shape_before, k, *trail, dtype=torch.float64).index_add_(dim, p.labels, x)
    torch.testing.assert_close(p.block_sum(x, dim=dim), want)
    # shift carries the batch; scale broadcasts over the trailing columns and has no batch
    shift = torch.randn(*shape_before, k, *trail, dtype=torch.float64)
    scale = torch.randn(k, *([1] if t else []), dtype=torch.float64)
    ref = shift.index_select(dim, p.labels) + scale.index_select(dim if t else -1, p.labels) * x
    with torch.no_grad():
        torch.testing.assert_close(p.expand_addcmul(shift, scale, x, dim=dim), ref)
    # the same under autograd, with gradients against the unfused formula
    leaves = [a.clone().requires_grad_(True) for a in (shift, scale, x)]
    res = p.expand_addcmul(*leaves, dim=dim)
    torch.testing.assert_close(res, ref)
    g = torch.randn_like(ref)
    got = torch.autograd.grad((res * g).sum(), leaves)
    ref_leaves = [a.clone().requires_grad_(True) for a in (shift, scale, x)]
    ref2 = (
        ref_leaves[0].index_select(dim, p.labels)
        + ref_leaves[1].index_select(dim if t else -1, p.labels) * ref_leaves[2]
    )
    want_grads = torch.autograd.grad((ref2 * g).sum(), ref_leaves)
    for a, b in zip(got, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layout", ["two_runs", "many_runs", "scattered_large"])
def test_fast_paths_keep_low_precision_dtypes(layout):
    p = _layouts()[layout]
    x = torch.randn(len(p), 1, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16):
        got = p.block_sum(x.to(dtype), dim=-2)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), p.block_sum(x, dim=-2), rtol=1e-2, atol=1e-2 * len(p) ** 0.5)
        shift = torch.randn(p.num_blocks, 1, dtype=dtype)
        out = p.expand_addcmul(shift, shift, x.to(dtype), dim=-2)
        assert out.dtype == dtype and out.shape == (len(p), 1)


def test_expand_addcmul_shape_errors():
    p = Partition.from_sizes([2, 2])
    with pytest.raises(ValueError, match="expected shift with size 2"):
        p.expand_addcmul(torch.ones(3), torch.ones(2), torch.ones(4))
    with pytest.raises(ValueError, match="expected x with size 4"):
        p.expand_addcmul(torch.ones(2), torch.ones(2), torch.ones(5))
    with pytest.raises(ValueError, match="out of range"):
        p.expand_addcmul(torch.ones(2), torch.ones(2), torch.ones(4), dim=1)


def test_layouts_reach_every_route():
    from bma_gp.partition import _GATHER_CHUNK

    layouts = _layouts()
    assert layouts["one_run"]._runs is not None and len(layouts["two_runs"]._runs) == 2
    assert layouts["many_runs"]._runs is None and layouts["contiguous_large_many_runs"]._runs is None
    assert layouts["contiguous_large_many_runs"].is_contiguous
    for name in ("scattered_large", "contiguous_large_many_runs"):
        assert len(layouts[name]) > 2 * _GATHER_CHUNK  # the chunked gather runs


def test_hash_follows_equality():
    # equal partitions hash alike, also when one was built from labels and one from sizes
    p, q = Partition.from_sizes([2, 1, 3]), Partition.from_labels([0, 0, 1, 2, 2, 2])
    assert p == q and hash(p) == hash(q)
    assert len({p, q, Partition.from_labels([1, 0, 1])}) == 2
    assert {p: "a"}[q] == "a"


def test_private_constructor_is_not_public():
    import inspect

    assert list(inspect.signature(Partition).parameters) == ["labels", "num_blocks"]
    p = Partition._trusted(torch.tensor([2, 3]), contiguous=True)
    assert p == Partition.from_sizes([2, 3]) and p.labels.tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="needs its labels"):
        Partition._trusted(torch.tensor([2, 3]), contiguous=False)


def test_from_sizes_builds_labels_only_when_asked():
    p = Partition.from_sizes([3, 3])
    assert p._labels is None and len(p) == 6 and p.block_sum(torch.ones(6)).tolist() == [3.0, 3.0]
    assert p._labels is None  # the run views need no labels
    assert p.labels.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "labels,bounds",
    [
        ([0, 0, 1, 1, 1, 2, 3, 3], [0, 2, 2, 5, 8]),  # contiguous, with an empty range
        ([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3], [0, 6, 12]),  # a range over two runs of equal-size blocks
        ([1, 0, 1, 0, 2, 3, 2, 2], [0, 4, 8]),  # scattered inside each range
    ],
)
def test_split_matches_the_labels_of_each_range(labels, bounds):
    p = Partition.from_labels(labels)
    parts = p.split(bounds)
    first = 0
    for a, b, part in zip(bounds, bounds[1:], parts):
        if a == b:
            assert part is None
            continue
        assert part.labels.tolist() == [c - first for c in labels[a:b]]
        assert part == Partition.from_labels([c - first for c in labels[a:b]])
        x = torch.randn(b - a, dtype=torch.float64)
        torch.testing.assert_close(part.block_sum(x), indicator(part).T @ x)
        first += part.num_blocks
    assert first == p.num_blocks


@pytest.mark.parametrize(
    "labels,bounds,match",
    [
        ([0, 0, 1, 1], [0, 1, 4], "cuts a block"),
        ([0, 1, 0, 1], [0, 2, 4], r"block 0 has indices in the range 0 \.\. 1 and outside it"),
        # no block crosses a bound, but the ranges' blocks are not numbered in range order (user trial: the error
        # said blocks had indices in two ranges, and "split at block boundaries", which they were)
        ([1, 1, 0, 0], [0, 2, 4], r"holds whole blocks \(\[1\]\).*must be 0 \.\. 0.*order of their first index"),
        ([0, 2, 2, 0, 1, 1], [0, 4, 6], r"holds whole blocks \(\[0, 2\]\).*must be 0 \.\. 1"),
        ([0, 0, 1, 1], [0, 3, 2, 4], "non-decreasing"),
        ([0, 0, 1, 1], [0, 4, 5], "from 0 to n = 4"),
    ],
)
def test_split_refuses_cut_blocks(labels, bounds, match):
    with pytest.raises(ValueError, match=match):
        Partition.from_labels(labels).split(bounds)


def test_row_shape_and_as_rows():
    p = Partition.from_sizes([4] * 3)
    assert p.row_shape == (3, 4)
    x = torch.arange(12.0)
    rows = p.as_rows(x)
    assert rows.shape == (3, 4) and rows.data_ptr() == x.data_ptr()
    assert torch.equal(p.as_rows(x.view(3, 4).T.contiguous().T), x.view(3, 4))  # non-contiguous: a copy
    assert Partition.from_sizes([4, 4, 2]).row_shape is None
    assert Partition.from_labels([1, 0, 1, 0]).row_shape is None
    with pytest.raises(ValueError, match="no row view"):
        Partition.from_sizes([4, 2]).as_rows(torch.ones(6))
    with pytest.raises(ValueError, match="expected 12 entries"):
        p.as_rows(torch.ones(11))


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_dot_and_addcmul_match_indicator(layout, dtype):
    p = _layouts()[layout]
    P = indicator(p).to(dtype)
    x, y = torch.randn(2, p.n, dtype=dtype).unbind(0)
    c = torch.randn(p.num_blocks, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(p.block_dot(x, y), P.T @ (x * y), **tol)
    out = y.clone()
    assert p.addcmul_(out, c, x, value=-0.5) is out
    torch.testing.assert_close(out, y - 0.5 * (P @ c) * x, **tol)
    with pytest.raises(ValueError, match="block_dot expected"):
        p.block_dot(x[:-1], y[:-1])
    with pytest.raises(ValueError, match="addcmul_ expected"):
        p.addcmul_(out, c[:-1], x)


def test_read_only_numpy_labels_do_not_warn():
    """pandas' ``to_numpy()`` is read-only (copy-on-write): torch warned that it cannot write to the array."""
    import warnings

    import numpy as np

    labels, counts = np.array([0, 1, 1, 0, 2]), np.array([1, 1, 2])
    labels.flags.writeable = counts.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        part = Partition.from_labels(labels)
        sizes = Partition.from_sizes(counts)
    assert part.labels.tolist() == [0, 1, 1, 0, 2] and sizes.sizes.tolist() == [1, 1, 2]


def test_meta_partitions_compare_and_hash_by_their_origin():
    import copy

    p = Partition.from_labels(torch.tensor([0, 1, 0, 2]))
    q = Partition.from_labels(torch.tensor([0, 1, 0, 2]))
    r = Partition.from_labels(torch.tensor([0, 1, 2, 0]))
    pm, qm, rm = p.to("meta"), q.to("meta"), r.to("meta")
    assert pm == qm and hash(pm) == hash(qm) == hash(p)
    assert pm != rm and pm == p and p == pm  # a meta partition equals the partition it came from, on any device
    assert len({pm, qm, p}) == 1
    sized = [Partition.from_sizes([2, 2], device="meta") for _ in range(2)]
    assert sized[0] == sized[1] and hash(sized[0]) == hash(sized[1]) == hash(Partition.from_sizes([2, 2]))
    assert sized[0] != Partition.from_sizes([1, 3], device="meta")
    assert pm.to("cpu") is p  # back to a device with values: the origin
    for copied in (copy.deepcopy(pm), pickle.loads(pickle.dumps(pm))):
        assert copied.device.type == "meta" and copied == pm
    # operator algebra compares partitions: equal but distinct meta partitions add as one block mean operator
    ones = dict(device="meta")
    S = BlockMeanLinearOperator(torch.ones(3, **ones), torch.ones(3, 3, **ones), pm) + BlockMeanLinearOperator(
        torch.ones(3, **ones), torch.ones(3, 3, **ones), qm
    )
    assert type(S).__name__ == "BlockMeanLinearOperator" and S.shape == (4, 4)


def test_meta_partition_without_origin_refuses_to_move():
    p = Partition.from_labels(torch.tensor([0, 1, 0, 2])).to("meta")
    p._values = None  # e.g. a partition built on the meta device by the package from other meta tensors
    assert p == p and p != Partition.from_labels(torch.tensor([0, 1, 0, 2])).to("meta")
    hash(p)
    with pytest.raises(ValueError, match="holds no values.*cannot move to cpu"):
        p.to("cpu")


def _layouts_of_two_big_blocks(n):
    """Two blocks of n / 2 points, as the three block_sum paths see them: labels that alternate (index_add), sorted
    labels with a tail of singletons (more than a few runs: segment_reduce), and two equal runs (reshaped sums)."""
    half = n // 2
    scattered = Partition.from_labels(torch.arange(n) % 2)
    many_runs = Partition.from_sizes([half, half - 10] + [1] * 10)
    two_runs = Partition.from_sizes([half, half])
    return {"scattered": scattered, "many_runs": many_runs, "two_runs": two_runs}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["scattered", "many_runs", "two_runs"])
def test_block_sum_of_16_bit_floats_does_not_stall(dtype, layout):
    # float16 adding one term at a time stalls at 2048 (2048 + 1 rounds to 2048): a block of 2500 ones summed to 2048
    p = _layouts_of_two_big_blocks(5000)[layout]
    for x in (torch.ones(5000, dtype=dtype), torch.ones(3, 5000, dtype=dtype)):  # (n,): torch's 1-d index_add
        exact = p.block_sum(x.double())
        for res in (
            p.block_sum(x),
            p.block_sum(x.unsqueeze(-1), dim=-2).squeeze(-1),
            p.block_sum(x.movedim(-1, 0), dim=0).movedim(0, -1),
        ):
            assert res.dtype == dtype
            assert torch.equal(res, exact.to(dtype))


@pytest.mark.parametrize("layout", ["scattered", "many_runs", "two_runs"])
def test_block_sum_of_float32_is_accurate_in_large_blocks(layout):
    # one term at a time in float32 the error grows with the block: 4e-6 relative at 5e5 uniform terms per block,
    # where torch.sum (pairwise) and float64 accumulation keep ~1e-8
    n = 1_000_000
    p = _layouts_of_two_big_blocks(n)[layout]
    x = torch.rand(n, generator=torch.Generator().manual_seed(3))
    exact = p.block_sum(x.double())
    res = p.block_sum(x)
    assert res.dtype == torch.float32
    assert ((res.double() - exact) / exact).abs().max() < 1e-7
    y = torch.stack([x, -x], dim=-1).requires_grad_()
    sums = p.block_sum(y, dim=0)
    assert sums.dtype == torch.float32 and torch.allclose(sums[:, 0].double(), exact, rtol=1e-7)
    sums.sum().backward()  # the widening is differentiable: the gradient is the (float32) indicator's
    assert y.grad.dtype == torch.float32 and torch.equal(y.grad, torch.ones_like(y))


def test_16_bit_operator_products_match_the_exact_sums():
    n = 5000
    for dtype in (torch.float16, torch.bfloat16):
        p = Partition.from_labels(torch.arange(n) % 2)
        M = BlockMeanLinearOperator(torch.ones(2, dtype=dtype), torch.ones(2, 2, dtype=dtype), p)
        res = M @ torch.ones(n, 1, dtype=dtype)
        # (M 1)_a = lam + sum_b B = 1 + 2500 + 2500 = 5001 (the other block's 2500 too: B is all ones)
        assert torch.equal(res, torch.full((n, 1), 5001.0).to(dtype))


@pytest.mark.parametrize("shape_dim", [((-1,), -1), ((3, -1), -1), ((-1, 2), 0), ((2, -1, 3), 1)])
def test_widened_block_sums_of_many_unequal_contiguous_blocks(shape_dim):
    # a contiguous partition of unequal blocks widens float32 slab by slab into segment sums: the slabs' bounds cut
    # blocks, which each slab sums in part (checked against float64 sums over the scattered labels)
    shape, dim = shape_dim
    n, gen = 400_003, torch.Generator().manual_seed(5)
    sizes = torch.randint(1, 60, (20_000,), generator=gen)
    sizes = sizes[: int((sizes.cumsum(0) < n).sum())]
    sizes = torch.cat([sizes, (n - sizes.sum()).view(1)])
    p = Partition.from_sizes(sizes)
    assert p.is_contiguous and p._runs is None
    x = torch.randn([n if s == -1 else s for s in shape], generator=gen)
    scattered = Partition.from_labels(p.labels.clone())
    scattered.is_contiguous = False  # the index_add path, in float64
    exact = scattered.block_sum(x.double(), dim=dim)
    res = p.block_sum(x, dim=dim)
    assert res.dtype == torch.float32 and res.shape == exact.shape
    torch.testing.assert_close(res.double(), exact, rtol=0, atol=1e-5)
    y = x.double().requires_grad_()
    p.block_sum(y.float(), dim=dim).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))
    again = pickle.loads(pickle.dumps(p))  # the cached boundaries are rebuilt, not carried
    assert again._offset_table is None and torch.equal(again.block_sum(x, dim=dim), res)


@pytest.mark.parametrize("n, dtype", [(400, torch.float64), (300_000, torch.float32)])
def test_block_sums_of_contiguous_blocks_have_second_and_forward_derivatives(n, dtype):
    # segment_reduce's backward has no derivative of its own: where derivatives are tracked the sums take index_add
    gen = torch.Generator().manual_seed(7)
    sizes = torch.randint(16, 33, (n // 24,), generator=gen)  # segment sums' sizes (_SEGMENT_MIN_SIZE)
    p = Partition.from_sizes(sizes)
    n = len(p)
    x = torch.randn(n, generator=gen, dtype=dtype, requires_grad=True)
    weights = torch.linspace(0.5, 1.5, p.num_blocks, dtype=dtype)
    (g,) = torch.autograd.grad((weights * p.block_sum(x).square()).sum(), x, create_graph=True)
    # sum_i g_i^2 = sum_c s_c (2 w_c S_c)^2, whose derivative is 8 s_c w_c^2 S_c at each index of block c
    (h,) = torch.autograd.grad(g.square().sum(), x)
    want = p.expand(8 * sizes.to(dtype) * weights.square() * p.block_sum(x.detach().double()).to(dtype))
    torch.testing.assert_close(h, want, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-3)
    tangent = torch.randn(n, generator=gen, dtype=dtype)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x.detach(), tangent)
        got = torch.autograd.forward_ad.unpack_dual(p.block_sum(dual)).tangent
    torch.testing.assert_close(got, p.block_sum(tangent), rtol=1e-6, atol=1e-4)
