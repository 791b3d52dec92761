"""Robustness of ``BlockMeanSumLinearOperator`` and ``closed_form`` found by an audit, against dense float64.

* block matrices or a root on another device than ``d`` were accepted silently by the constructor (the failure
  came later, deep inside a solve), and a sum of summands on different devices failed inside torch or not at all;
* summands of different floating dtypes: a float32 diagonal joined a float64 sum, but a float32 block mean
  operator or low-rank root (or a float64 one with a float32 sum) raised a ``TypeError`` about the sum's internal
  ``blocks[j]`` / ``diag``; they now follow torch's type promotion, as ``M1 + M2`` over one partition does;
* ``closed_form`` of a sum of diagonals and low-rank roots alone said it was not such a sum;
* ``root_inv_decomposition`` with a non-positive ``d`` blamed ``root_decomposition``;
* batch shapes of the parts that do not broadcast failed inside torch without naming the parts;
* in float32 a capacitance with a non-positive determinant said only "not positive definite", though the root's
  products run in float32 and an ill-conditioned positive definite sum can get there by rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from linear_operator.operators import DiagLinearOperator, LowRankRootLinearOperator, SumLinearOperator

import bma_gp
from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, Partition

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems

N = 24


def pieces(dtype=torch.float64, seed=0):
    """Two crossed partitions (6 and 4 blocks), their PSD ``B_j``, a positive ``d`` and a rank-2 root."""
    gen = torch.Generator().manual_seed(seed)
    parts = [Partition.from_labels(torch.arange(N) % k) for k in (6, 4)]
    blocks = []
    for k in (6, 4):
        W = torch.randn(k, k, generator=gen, dtype=torch.float64)
        blocks.append((W @ W.mT / k).to(dtype))
    d = (torch.rand(N, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    U = (torch.randn(N, 2, generator=gen, dtype=torch.float64) / math.sqrt(2)).to(dtype)
    return parts, blocks, d, U


def indicator(part: Partition) -> torch.Tensor:
    return torch.nn.functional.one_hot(part.labels, part.num_blocks).double()


def check_against(op, dense: torch.Tensor) -> None:
    b = torch.randn(N, 3, dtype=torch.float64)
    torch.testing.assert_close(op.to_dense().double(), dense)
    torch.testing.assert_close(op.solve(b.to(op.dtype)).double(), torch.linalg.solve(dense, b))
    torch.testing.assert_close(op.logdet().double(), torch.logdet(dense))


# ---------------------------------------------------------------------------- devices
def test_blocks_or_root_on_another_device_are_refused_by_name():
    parts, blocks, d, U = pieces()
    with pytest.raises(ValueError, match=r"blocks\[1\] is on meta but diag is on cpu"):
        BlockMeanSumLinearOperator(d, blocks[0], blocks[1].to("meta"), partitions=parts, root=U)
    with pytest.raises(ValueError, match="root is on meta but diag is on cpu"):
        BlockMeanSumLinearOperator(d, *blocks, partitions=parts, root=U.to("meta"))


@pytest.mark.parametrize("summand", ["diagonal", "root"])
def test_summands_on_different_devices_name_the_devices(summand):
    parts, blocks, d, U = pieces()
    total = BlockMeanSumLinearOperator(d, *blocks, partitions=parts)
    other = DiagLinearOperator(d.to("meta")) if summand == "diagonal" else LowRankRootLinearOperator(U.to("meta"))
    with pytest.raises(ValueError, match=r"different devices \(cpu, meta\).*\.to\(device\)"):
        total + other
    with pytest.raises(ValueError, match="different devices"):
        bma_gp.closed_form(SumLinearOperator(total, other))


# ---------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("low", ["block", "root", "sum"])
def test_summands_of_mixed_dtype_follow_type_promotion(low):
    """float32 and float64 summands give a float64 sum with the float32 values exactly, whichever is first."""
    parts, blocks, d, U = pieces()
    lam = [torch.full((p.num_blocks,), 0.25, dtype=torch.float64) for p in parts]
    cast = {name: (torch.float32 if name == low else torch.float64) for name in ("block", "root", "sum")}
    first = BlockMeanLinearOperator(lam[0].to(cast["sum"]), blocks[0].to(cast["sum"]), parts[0])
    second = BlockMeanLinearOperator(lam[1].to(cast["block"]), blocks[1].to(cast["block"]), parts[1])
    root = U.to(cast["root"])
    dense = DiagLinearOperator(d.to(cast["sum"]))
    total = first + second + dense + LowRankRootLinearOperator(root)
    assert isinstance(total, BlockMeanSumLinearOperator) and total.dtype == torch.float64
    reference = torch.diag_embed(d.to(cast["sum"]).double()) + root.double() @ root.double().mT
    for B, part, lam_j, dt in (
        (blocks[0], parts[0], lam[0], cast["sum"]),
        (blocks[1], parts[1], lam[1], cast["block"]),
    ):
        P = indicator(part)
        reference = reference + torch.diag_embed(lam_j.to(dt).double()[part.labels]) + P @ B.to(dt).double() @ P.mT
    check_against(total, reference)
    # the same pieces in another order and through closed_form
    nested = bma_gp.closed_form(SumLinearOperator(LowRankRootLinearOperator(root), SumLinearOperator(dense, second)))
    assert nested.dtype == torch.float64
    P = indicator(parts[1])
    check_against(
        nested,
        torch.diag_embed(d.to(cast["sum"]).double() + lam[1].to(cast["block"]).double()[parts[1].labels])
        + P @ blocks[1].to(cast["block"]).double() @ P.mT
        + root.double() @ root.double().mT,
    )


# ---------------------------------------------------------------------------- closed_form without partitions
def test_closed_form_of_diagonals_and_roots_alone():
    _, _, d, U = pieces()
    for op, dense in (
        (LowRankRootLinearOperator(U) + DiagLinearOperator(d), torch.diag_embed(d) + U @ U.mT),
        (SumLinearOperator(DiagLinearOperator(d), DiagLinearOperator(d)), torch.diag_embed(2 * d)),
    ):
        res = bma_gp.closed_form(op)
        assert isinstance(res, BlockMeanSumLinearOperator) and res.partitions == ()
        check_against(res, dense)


# ---------------------------------------------------------------------------- error messages
def test_root_inv_decomposition_names_itself_for_a_non_positive_diagonal():
    parts, blocks, d, U = pieces()
    d = d.clone()
    d[5] = 0.0
    op = BlockMeanSumLinearOperator(d, *blocks, partitions=parts, root=U)
    with pytest.raises(ValueError, match=r"^root_inv_decomposition needs a positive per-point diagonal d, but d\[5\]"):
        op.root_inv_decomposition()
    with pytest.raises(ValueError, match=r"^root_decomposition needs a positive"):
        op.root_decomposition()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_float32_capacitance_failure_mentions_rounding(dtype):
    """One negative eigenvalue of ``B``: the capacitance's determinant is negative. Only float32 mentions that an
    ill-conditioned positive definite sum can get there by rounding; a negative diagonal entry of a diagonal
    ``B`` (no rounding can make one) does not."""
    part = Partition.from_labels(torch.arange(N) % 2)
    B = torch.tensor([[-10.0, 1.0], [1.0, 2.0]], dtype=dtype)
    op = BlockMeanSumLinearOperator(torch.ones(N, dtype=dtype), B, partitions=[part])
    with pytest.raises(ValueError, match="not positive definite") as info:
        op.logdet()
    assert ("too ill-conditioned for single precision" in str(info.value)) == (dtype == torch.float32)
    assert "float64 (.double())" in str(info.value) or dtype == torch.float64
    diagonal = BlockMeanSumLinearOperator(
        torch.ones(N, dtype=dtype), torch.tensor([-10.0, 2.0], dtype=dtype), partitions=[part], diagonal=[True]
    )
    with pytest.raises(ValueError, match="negative diagonal entry") as info:
        diagonal.logdet()
    assert "single precision" not in str(info.value)


def test_batch_shapes_that_do_not_broadcast_are_named():
    parts, blocks, d, U = pieces()
    with pytest.raises(
        ValueError, match=r"do not broadcast: diag \(3,\), blocks\[0\] \(2,\), blocks\[1\] \(\), root \(\)"
    ):
        BlockMeanSumLinearOperator(d.expand(3, N), blocks[0].expand(2, 6, 6), blocks[1], partitions=parts, root=U)
