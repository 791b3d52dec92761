"""``BlockMeanKernel``'s progress bars: off by default in a training loop (a user trial's two training steps at
n = 32,000 wrote 23 tqdm bars to stderr, with no way to turn them off but tqdm's environment variable)."""

from __future__ import annotations

import importlib

import gpytorch
import pytest
import torch
import tqdm.auto

from bma_gp import BlockMeanKernel, Partition


@pytest.fixture
def bars(monkeypatch):
    """Every tqdm bar the block-sum passes open, by description; the automatic threshold lowered to 0 entries."""
    opened: list[str] = []

    def fake_tqdm(items, desc="", **kwargs):
        opened.append(desc)
        return items

    monkeypatch.setattr(tqdm.auto, "tqdm", fake_tqdm)
    monkeypatch.setattr(importlib.import_module("bma_gp.kernel_block_mean"), "_PROGRESS_ENTRIES", 0)
    return opened


def _step(**options):
    torch.manual_seed(0)
    x = torch.rand(64, 2, dtype=torch.float64)
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    kernel = BlockMeanKernel(base, x, Partition.from_labels(torch.arange(64) % 5), **options)
    kernel(x).evaluate_kernel().logdet().backward()
    return base.base_kernel.raw_lengthscale.grad


def test_no_progress_bar_by_default(bars):
    assert _step() is not None
    assert bars == []


@pytest.mark.parametrize("progress", [True, None])
def test_progress_bars_on_request(bars, progress):
    _step(progress=progress)
    assert "kernel block sums" in bars and "kernel block sums (backward)" in bars


@pytest.mark.parametrize("bad", ["yes", 1, 0.0])
def test_progress_must_be_a_flag(bad):
    x = torch.rand(8, 1)
    with pytest.raises(TypeError, match="progress must be False"):
        BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, Partition.from_labels(torch.arange(8) % 2), progress=bad)
