"""from_core refuses lam and C that the constructor would refuse, in its words (they reached torch's own errors)."""

import pytest
import torch

from bma_gp import BlockMeanLinearOperator, Partition


def _partition():
    return Partition.from_labels(torch.tensor([0, 0, 1, 2, 2]))


def test_from_core_refuses_batch_shapes_that_do_not_broadcast():
    with pytest.raises(ValueError, match=r"batch shapes of lam \(2,\) and C \(3,\) do not broadcast"):
        BlockMeanLinearOperator.from_core(torch.ones(2, 3), torch.eye(3).expand(3, 3, 3), _partition())


def test_from_core_refuses_lam_on_another_device():
    with pytest.raises(ValueError, match="lam and C must be on one device, got meta and cpu"):
        BlockMeanLinearOperator.from_core(torch.ones(3, device="meta"), torch.eye(3), _partition())


def test_from_core_broadcasts_batch_shapes_that_do():
    lam = torch.rand(2, 1, 3, dtype=torch.float64) + 1
    C = torch.eye(3, dtype=torch.float64).expand(4, 3, 3) * 3
    op = BlockMeanLinearOperator.from_core(lam, C, _partition())
    assert op.shape == (2, 4, 5, 5)
    _, core = op.core()
    torch.testing.assert_close(core, C.expand(2, 4, 3, 3))


@pytest.mark.parametrize("which", ["lam", "C"])
def test_from_core_refuses_complex_values_naming_them(which):
    lam, C = torch.ones(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64) * 2
    if which == "lam":
        lam = torch.tensor([1 + 2j, 1 - 3j, 1 + 0j])
    else:
        C = C.to(torch.complex128)
    with pytest.raises(TypeError, match=f"{which} must hold real numbers, got dtype torch.complex"):
        BlockMeanLinearOperator.from_core(lam, C, _partition())
