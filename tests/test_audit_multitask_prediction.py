"""Prediction of GPyTorch's batch-independent multi-output models (``MultitaskMultivariateNormal.from_batch_mvn`` with a
``MultitaskGaussianLikelihood(rank=0)``) on block mean and group kernels, and indexing / batch sums of the layout
operators their covariances are.
"""

from __future__ import annotations

import pytest
import torch
from linear_operator.operators import BlockDiagLinearOperator, BlockInterleavedLinearOperator, DiagLinearOperator

from bma_gp import BlockMeanLinearOperator, ClosedFormFallbackWarning, Partition
from bma_gp._composition import (
    BlockMeanBlockDiagLinearOperator,
    BlockMeanInterleavedLinearOperator,
    FallbackIndexedLinearOperator,
)
from closed_form_guard import closed_forms_only

DTYPE = torch.float64
T = 3


# ---------------------------------------------------------------- indexing and batch sums of the layout operators
def layout_operators():
    generator = torch.Generator().manual_seed(2)
    partition = Partition.from_labels(torch.arange(12) % 4)
    W = torch.randn(2, T, 4, 4, generator=generator, dtype=DTYPE)
    tasks = BlockMeanLinearOperator(torch.rand(2, T, 4, generator=generator, dtype=DTYPE), W @ W.mT, partition)
    d = torch.rand(2, T * 12, generator=generator, dtype=DTYPE) + 0.5
    with closed_forms_only(12):
        return [
            layout(tasks) + DiagLinearOperator(d)
            for layout in (BlockDiagLinearOperator, BlockInterleavedLinearOperator)
        ]


def test_layout_operator_slices_are_right_and_say_when_they_leave_the_closed_form():
    # linear_operator's BlockLinearOperator read the slices of a block-diagonal layout as the interleaved layout's
    # points (wrong entries), and gave other indices a silent generic operator
    rhs = torch.randn(2, 6, 1, dtype=DTYPE)
    for op in layout_operators():
        dense = op.to_dense()
        cls = type(op)
        assert cls in (BlockMeanBlockDiagLinearOperator, BlockMeanInterleavedLinearOperator)
        # whole points (interleaved) or whole tasks (block-diagonal): the layout and its closed forms
        whole = slice(0, 6) if cls is BlockMeanInterleavedLinearOperator else slice(12, 36)
        kept = op[:, whole, whole]
        assert type(kept) is cls
        torch.testing.assert_close(kept.to_dense(), dense[:, whole, whole])
        with closed_forms_only(12):
            kept.logdet()
        # anything else: the right entries, and a warning when factorised
        idx = torch.tensor([0, 5, 7, 13, 20, 30])
        for part, expected in [
            (op[:, 2:8, 2:8] if cls is BlockMeanInterleavedLinearOperator else op[:, :6, :6], None),
            (op[..., idx, :][..., idx], dense[..., idx, :][..., idx]),
        ]:
            if expected is None:
                expected = dense[:, 2:8, 2:8] if cls is BlockMeanInterleavedLinearOperator else dense[:, :6, :6]
            assert isinstance(part, FallbackIndexedLinearOperator)
            torch.testing.assert_close(part.to_dense(), expected)
            with pytest.warns(ClosedFormFallbackWarning, match="other than one principal slice"):
                part.solve(rhs)


def test_layout_operator_batch_sum_stays_in_closed_form():
    # linear_operator's SumBatchLinearOperator solved it by CG / a dense Cholesky, without a warning
    rhs = torch.randn(T * 12, 2, dtype=DTYPE)
    for op in layout_operators():
        dense = op.to_dense()
        for dim in [0, -3]:
            summed = op.sum(dim)
            assert type(summed) is type(op)
            torch.testing.assert_close(summed.to_dense(), dense.sum(0))
            with closed_forms_only(12):
                solved = summed.solve(rhs)
            torch.testing.assert_close(solved, torch.linalg.solve(dense.sum(0), rhs))
