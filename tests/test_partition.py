"""Partition: construction, validation, block sums / expansion against the dense indicator matrix."""

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
    torch.testing.assert_close(p.block_mean(x.detach(), dim=-2), (P.T @ x.detach()) / p.sizes.double()[:, None])


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
    torch.testing.assert_close(op.matrix_inv_sqrt().cpu().to_dense(),
                               op.cpu().matrix_inv_sqrt().to_dense())
