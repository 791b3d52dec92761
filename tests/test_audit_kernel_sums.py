"""Audit of kernel_block_mean's engines: regressions found against dense references."""

import importlib
from unittest import mock

import torch
from gpytorch.kernels import PeriodicKernel, ScaleKernel

from bma_gp import Partition
from bma_gp.kernel_block_mean import kernel_block_mean

generic = importlib.import_module("bma_gp._kernel_sums.generic")
kbm = importlib.import_module("bma_gp.kernel_block_mean")


def test_generic_default_chunk_counts_the_kernels_batch_shape():
    """The default chunk holds about ``_CHUNK_BYTES`` of kernel values whatever carries the batch: a batch
    kernel on unbatched inputs (4 hyperparameter settings) evaluates 4 ``chunk x n`` matrices per chunk, so the
    chunk must be 4 times shorter than for one kernel. It used to count the batch of ``x`` only, so a batch of
    8 kernels on n = 20,000 points took 8 times the memory (at n = 8,000 and a batch of 4, 5 GB: more than the
    dense batch of kernel matrices)."""
    n, batch = 200, 4
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    partition = Partition.from_labels(torch.arange(n) % 5)
    kernel = ScaleKernel(PeriodicKernel(batch_shape=torch.Size([batch])), batch_shape=torch.Size([batch])).double()
    budget = 20 * n * x.element_size() * batch  # 20 rows of a batch of 4
    largest = []
    evaluate = generic.evaluate

    def recording(kernel, x1, x2):
        values = evaluate(kernel, x1, x2)
        largest.append(values.numel() * values.element_size())
        return values

    with mock.patch.object(kbm, "_CHUNK_BYTES", budget), mock.patch.object(generic, "evaluate", recording):
        op = kernel_block_mean(kernel, x, partition)
        op.B.sum().backward()
    assert op.B.shape == (batch, 5, 5)
    assert max(largest) <= budget
