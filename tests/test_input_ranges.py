"""Inputs out of the range the package can hold, refused in words: ``active_dims`` beyond the columns of ``x``,
``x`` on the meta device or away from the kernel, integer labels and sizes beyond int64, device strings torch does
not know; and kernels whose own ``diag=True`` mode fails, taken exactly from their full evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gpytorch.kernels import ProductStructureKernel, RBFKernel, ScaleKernel

from bma_gp import BlockMeanKernel, Partition, block_mean, kernel_block_mean
from bma_gp._kernel_sums import generic


def _data(n=12, d=2):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x, Partition.from_labels(torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2][:n]))


@pytest.mark.parametrize(
    ("kernel", "match"),
    [
        (RBFKernel(active_dims=[5]), r"kernel has active_dims = \[5\], but x has 2 columns"),
        (RBFKernel(active_dims=[-1]), r"active_dims = \[-1\]"),
        (ScaleKernel(RBFKernel(active_dims=[4])), r"kernel has active_dims = \[4\]"),  # ScaleKernel takes them
        (RBFKernel() + RBFKernel(active_dims=[2]), r"kernel.kernels.1 has active_dims = \[2\]"),
    ],
)
def test_active_dims_beyond_the_columns_are_refused_by_name(kernel, match):
    x, partition = _data()
    with pytest.raises(ValueError, match=match):
        kernel_block_mean(kernel.double(), x, partition)


def test_block_mean_kernel_names_train_x_for_bad_active_dims():
    x, partition = _data()
    with pytest.raises(ValueError, match=r"train_x has 2 columns"):
        BlockMeanKernel(RBFKernel(active_dims=[3]).double(), x, partition)(x, x).to_dense()


def test_nested_active_dims_within_range_still_work():
    x, partition = _data(d=3)
    kernel = (ScaleKernel(RBFKernel(active_dims=[1]), active_dims=[0, 2]) + RBFKernel(active_dims=[2])).double()
    dense = kernel(x, x).to_dense()
    assert torch.allclose(kernel_block_mean(kernel, x, partition).to_dense(), block_mean(dense, partition).to_dense())


def test_meta_x_is_refused_in_words():
    x, partition = _data()
    with pytest.raises(ValueError, match="meta device"):
        kernel_block_mean(RBFKernel(), x.float().to("meta"), partition)


def test_kernel_on_the_meta_device_is_refused_in_words():
    x, partition = _data()
    with pytest.raises(ValueError, match=r"x is on cpu but the kernel's parameters are on meta"):
        kernel_block_mean(RBFKernel().to("meta"), x.float(), partition)


@pytest.mark.parametrize("rows", [5, 12])
def test_kernel_whose_diag_mode_fails_takes_the_diagonal_of_full_evaluations(monkeypatch, rows):
    # ProductStructureKernel's own diag=True mode raises inside GPyTorch; its block means are still exact
    monkeypatch.setattr(generic, "DIAGONAL_CHUNK_ROWS", rows)
    x, partition = _data()
    kernel = ProductStructureKernel(RBFKernel(), num_dims=2).double()
    with pytest.raises(ValueError):
        kernel(x, x, diag=True)  # what the fallback is for: if GPyTorch mends this, the test still checks values
    got = kernel_block_mean(kernel, x, partition).to_dense()
    assert torch.allclose(got, block_mean(kernel(x, x).to_dense(), partition).to_dense(), atol=1e-14)


def test_diag_error_of_a_kernel_that_also_fails_fully_is_its_own():
    class Broken(RBFKernel):
        def forward(self, x1, x2, diag=False, **params):
            raise RuntimeError("broken kernel")

    x, _ = _data()
    with pytest.raises(RuntimeError, match="broken kernel"):
        generic.kernel_diagonal(Broken().double(), x, x, torch.Size([]))


def test_uint64_labels_above_int64_are_refused_not_wrapped():
    labels = torch.tensor([0, 1, 2**63 + 4], dtype=torch.uint64)
    with pytest.raises(ValueError, match=r"labels\[2\] = 9223372036854775812 is above 2\^63 - 1"):
        Partition.from_labels(labels)
    with pytest.raises(ValueError, match=r"labels\[1\] = 9223372036854775808"):
        Partition.from_labels(np.array([0, 2**63], dtype=np.uint64))
    assert torch.equal(
        Partition.from_labels(torch.tensor([1, 0, 1], dtype=torch.uint64)).labels, torch.tensor([1, 0, 1])
    )


def test_sizes_whose_total_overflows_int64_are_refused():
    with pytest.raises(ValueError, match=r"sizes add up to 9223372036854775808 indices"):
        Partition.from_sizes([2**62, 2**62])
    assert Partition.from_sizes([2**61, 2**61]).n == 2**62  # large, but it fits


def test_unknown_device_strings_name_the_argument():
    with pytest.raises(ValueError, match=r"device must be a torch.device.*'gpu'"):
        Partition.from_sizes([2, 3], device="gpu")
    with pytest.raises(ValueError, match=r"device must be a torch.device.*'gpu'"):
        Partition.from_sizes([2, 3]).to("gpu")


@pytest.mark.parametrize(
    "kernel",
    [
        RBFKernel(active_dims=[0]) + RBFKernel(active_dims=[1]),
        RBFKernel(active_dims=[0]) * RBFKernel(active_dims=[1]),
        ScaleKernel(RBFKernel(active_dims=[0]) + RBFKernel(active_dims=[1])),
    ],
    ids=["sum", "product", "scaled_sum"],
)
def test_nan_in_a_column_no_nested_kernel_reads_is_accepted(kernel):
    """Only the outermost kernel's active_dims were read: NaN in a bookkeeping column no kernel reads was refused."""
    x, partition = _data(d=3)
    x[4, 2] = float("nan")
    kernel = kernel.double()
    dense = kernel(x, x).to_dense()
    assert bool(torch.isfinite(dense).all())
    torch.testing.assert_close(
        kernel_block_mean(kernel, x, partition).to_dense(), block_mean(dense, partition).to_dense()
    )
    x[3, 1] = float("nan")  # a column that is read: refused, named
    with pytest.raises(ValueError, match=r"x\[3, 1\] = nan"):
        kernel_block_mean(kernel, x, partition)


def test_block_mean_kernel_with_a_negative_active_dim_is_named():
    x, partition = _data()
    with pytest.raises(ValueError, match=r"active_dims = \[-1\]"):
        BlockMeanKernel(RBFKernel(active_dims=[-1]).double(), x, partition)(x, x).to_dense()
