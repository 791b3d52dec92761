"""The ``Example`` sections of the public docstrings run as written (doctest): a user copies them first.

Before this test the ``BlockMeanKernel`` example used names it never defined and failed on every line."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "bma_gp._precision",
    "bma_gp.block_mean_linear_operator",
    "bma_gp.datasets",
    "bma_gp.kernel_block_mean",
    "bma_gp.kernels.block_mean_kernel",
    "bma_gp.kernels.group_kernel",
    "bma_gp.likelihoods",
    "bma_gp.optim",
    "bma_gp.optim.block_mean_adagrad",
    "bma_gp.partition",
    "bma_gp.partition_builders",
    "optim",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no examples any more: update MODULES"
    assert result.failed == 0


def test_every_module_with_examples_is_listed():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    found = set()
    for path in [*root.joinpath("bma_gp").rglob("*.py"), *root.joinpath("optim").rglob("*.py")]:
        if ">>>" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(root).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert found == set(MODULES)
