"""Inputs refused in words: complex right-hand sides (cast to real they lost their imaginary part), a factor of
another dtype on the same partition, diagonalization methods linear_operator does not know, and Partition methods
given something that is not a tensor or an integer dimension."""

import numpy as np
import pytest
import torch
from linear_operator.operators import DiagLinearOperator

from bma_gp import BlockMeanLinearOperator, Partition


def _op(dtype=torch.float64, diagonal=False):
    g = torch.Generator().manual_seed(0)
    p = Partition.from_labels(torch.tensor([0, 1, 0, 2, 1, 1, 3]))
    W = torch.randn(4, 4, generator=g, dtype=torch.float64)
    B = (W @ W.T / 4).to(dtype)
    lam = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return BlockMeanLinearOperator(lam, B.diagonal() if diagonal else B, p, diagonal=diagonal)


def _sum():
    M = _op()
    return (
        M
        + DiagLinearOperator(torch.full((7,), 0.3, dtype=torch.float64))
        + BlockMeanLinearOperator(
            torch.ones(2, dtype=torch.float64),
            torch.eye(2, dtype=torch.float64),
            Partition.from_labels(torch.arange(7) % 2),
        )
    )


@pytest.mark.parametrize("make", [_op, _sum], ids=["operator", "sum"])
def test_complex_right_hand_sides_are_refused(make):
    M = make()
    x = torch.randn(7, dtype=torch.complex128)
    calls = {
        "solve": lambda: M.solve(x),
        "inv_quad": lambda: M.inv_quad(x),
        "inv_quad_logdet": lambda: M.inv_quad_logdet(x.unsqueeze(-1), logdet=True),
        "matmul": lambda: M @ x,
    }
    for call in calls.values():
        with pytest.raises(TypeError, match="complex128, but block mean operators are real"):
            call()


def test_same_partition_factors_of_another_dtype():
    for diagonal in (False, True):
        M32, M64 = _op(torch.float32, diagonal), _op(torch.float64, diagonal)
        with pytest.raises(TypeError, match="must share a dtype, got torch.float32 and torch.float64"):
            M32 @ M64
    assert (_op() @ _op()).dtype == torch.float64


@pytest.mark.parametrize("make", [_op, _sum], ids=["operator", "sum"])
def test_diagonalization_method_checked(make):
    M = make()
    with pytest.raises(ValueError, match="diagonalization\\(method='bogus'\\)"):
        M.diagonalization(method="bogus")
    if make is _op:  # the sum's diagonalization is linear_operator's (warned); the operator's is closed form
        for method in (None, "symeig", "lanczos"):
            evals, evecs = M.diagonalization(method=method)
            torch.testing.assert_close(evecs.to_dense() @ torch.diag_embed(evals) @ evecs.to_dense().mT, M.to_dense())


def test_partition_methods_name_a_non_tensor_or_a_bad_dim():
    p = Partition.from_labels(torch.tensor([0, 1, 0, 2]))
    for method in (p.block_sum, p.block_average):
        with pytest.raises(TypeError, match="takes a tensor, got list"):
            method([1.0, 2.0, 3.0, 4.0])
        with pytest.raises(TypeError, match="dim must be an integer"):
            method(torch.ones(4), dim="a")
        with pytest.raises(TypeError, match="dim must be an integer"):
            method(torch.ones(4), dim=None)
    with pytest.raises(TypeError, match="takes a tensor, got ndarray"):
        p.expand(np.ones(3))
    with pytest.raises(TypeError, match="block_dot takes tensors"):
        p.block_dot([1.0] * 4, torch.ones(4))
    with pytest.raises(TypeError, match="bounds must be a sequence of integers"):
        p.split(None)
    with pytest.raises(TypeError, match="bounds must be a sequence of integers"):
        p.split([0, 2.5, 4])
    # NumPy integers and integer tensors are integers
    torch.testing.assert_close(p.block_sum(torch.ones(4), dim=np.int64(-1)), torch.tensor([2.0, 1.0, 1.0]))
    assert len(p.split([0, torch.tensor(3), np.int64(4)])) == 2
