"""Dtype and device conversions of BlockCrossLinearOperator keep its integer index tensors integer."""

import pytest
import torch

from bma_gp import GroupKernel, Partition
from bma_gp.kernels import BlockCrossLinearOperator

torch.set_num_threads(1)

LABELS = torch.tensor([2, 0, 2, 1, 0, 2, 3, 2, 0])
COLUMNS = torch.tensor([0, 3, -1, 2, 0])

CONVERSIONS = {
    "to_dtype": (lambda x: x.to(torch.float64), torch.float64),
    "to_dtype_kw": (lambda x: x.to(dtype=torch.float64), torch.float64),
    "to_device": (lambda x: x.to(torch.device("cpu")), torch.float32),
    "to_device_str": (lambda x: x.to("cpu"), torch.float32),
    "to_device_dtype": (lambda x: x.to(torch.device("cpu"), torch.float64), torch.float64),
    "to_device_dtype_kw": (lambda x: x.to(device="cpu", dtype=torch.float64), torch.float64),
    "to_tensor": (lambda x: x.to(torch.zeros(1, dtype=torch.float64)), torch.float64),
    "type": (lambda x: x.type(torch.float64), torch.float64),
    "double": (lambda x: x.double(), torch.float64),
    "float": (lambda x: x.float(), torch.float32),
    "half": (lambda x: x.half(), torch.float16),
    "cpu": (lambda x: x.cpu(), torch.float32),
}


def _operators():
    torch.manual_seed(0)
    partition = Partition.from_labels(LABELS)
    return {
        "one_hot": BlockCrossLinearOperator.one_hot(torch.randn(5), COLUMNS, partition),
        "one_hot_transposed": BlockCrossLinearOperator.one_hot(torch.randn(5), COLUMNS, partition, transposed=True),
        "dense": BlockCrossLinearOperator(torch.randn(5, 4), partition),
        "dense_transposed": BlockCrossLinearOperator(torch.randn(5, 4), partition, transposed=True),
        "one_hot_batch": BlockCrossLinearOperator.one_hot(torch.randn(2, 5), COLUMNS, partition),
    }


@pytest.mark.parametrize("form", list(_operators()))
@pytest.mark.parametrize("conversion", list(CONVERSIONS))
def test_block_cross_conversion_matches_dense(form, conversion):
    op = _operators()[form]
    convert, dtype = CONVERSIONS[conversion]
    dense = op.to_dense()
    res = convert(op)
    assert isinstance(res, BlockCrossLinearOperator)
    assert res.is_one_hot == op.is_one_hot
    assert res.dtype == dtype
    if res.is_one_hot:
        assert res.columns.dtype == COLUMNS.dtype
        assert res.row_values.dtype == dtype
    assert res.partition.labels.dtype == torch.long
    expected = convert(dense)
    assert expected.dtype == dtype
    torch.testing.assert_close(res.to_dense(), expected)
    if dtype == torch.float16:
        return  # half-precision matmuls are not supported on every CPU build; the values are checked above
    rhs = torch.randn(res.shape[-1], 3, dtype=dtype)
    torch.testing.assert_close(res @ rhs, expected @ rhs)
    lhs = torch.randn(3, res.shape[-2], dtype=dtype)
    torch.testing.assert_close(lhs @ res, lhs @ expected)
    rhs_t = torch.randn(res.shape[-2], 2, dtype=dtype)
    torch.testing.assert_close(res.mT @ rhs_t, expected.mT @ rhs_t)


def test_block_cross_conversion_round_trip_keeps_columns():
    op = _operators()["one_hot"]
    back = op.to(torch.float64).to(torch.float32)
    assert back.columns.dtype == torch.long
    torch.testing.assert_close(back.columns, COLUMNS)
    torch.testing.assert_close(back.to_dense(), op.to_dense())


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("conversion", ["to_dtype", "to_device_dtype", "type", "double", "to_device"])
def test_group_kernel_cross_conversion(swap, conversion):
    g_train = torch.tensor([[0.0], [1.0], [1.0], [2.0], [0.0], [3.0]])
    g_test = torch.tensor([[1.0], [3.0], [0.0]])
    kernel = GroupKernel(num_groups=4)
    kernel(g_train, g_train).to_dense()
    kernel.eval()
    a, b = (g_train, g_test) if swap else (g_test, g_train)
    with torch.no_grad():
        op = kernel(a, b)
        op = op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op
        assert isinstance(op, BlockCrossLinearOperator) and op.is_one_hot
        convert, dtype = CONVERSIONS[conversion]
        res = convert(op)
        assert res.dtype == dtype and res.columns.dtype in (torch.int32, torch.int64)
        expected = convert(op.to_dense())
        torch.testing.assert_close(res.to_dense(), expected)
        rhs = torch.randn(res.shape[-1], 2, dtype=dtype)
        torch.testing.assert_close(res @ rhs, expected @ rhs)
