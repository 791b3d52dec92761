"""Packaging facts a user relies on: one version, type hints declared, deprecated names still work."""

import importlib
import importlib.metadata
import pathlib
import sys
import tomllib

import pytest

import bma_gp
import bma_gp.partition_builders as builders

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_is_the_installed_metadata():
    assert bma_gp.__version__ == importlib.metadata.version("bma-gp")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" in pyproject["project"]["dynamic"]  # written once, in bma_gp/_version.py


@pytest.mark.parametrize("package", ["bma_gp", "optim"])
def test_type_hints_are_declared_and_shipped(package):
    """Both packages: ``from optim import BlockMeanAdagrad`` (the README's import) was untyped to mypy."""
    assert (ROOT / package / "py.typed").is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"][package]


def test_the_source_distribution_carries_the_test_helpers_and_docs():
    """The sdist shipped ``tests/test_*.py`` without ``conftest.py`` and the helpers they import (every test module
    failed to collect), and none of the docs the README links to."""
    manifest = (ROOT / "MANIFEST.in").read_text(encoding="utf-8").splitlines()
    assert "recursive-include tests *.py" in manifest
    assert any(line.startswith("recursive-include docs") and "*.md" in line for line in manifest)
    assert any(
        line.startswith("include ") and "CHANGELOG.md" in line and "constraints.txt" in line for line in manifest
    )


def test_declared_minimums_cover_what_the_code_uses():
    """A user trial installed the declared minimums: ``torch.uint64`` (partition labels) needs torch 2.3, and the
    prediction strategies' ``exact_prediction(test_mean, test_test_covar, test_train_covar)`` is GPyTorch 1.15.2's
    call (1.13 - 1.15.1 crashed on every prediction)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    floors = {}
    for line in pyproject["project"]["dependencies"]:
        req = Requirement(line)
        floors[req.name] = min((Version(s.version) for s in req.specifier if s.operator == ">="), default=None)
    assert floors["torch"] >= Version("2.3")
    assert floors["gpytorch"] >= Version("1.15.2")


def test_old_partitioning_module_warns_and_gives_the_same_builders():
    sys.modules.pop("bma_gp.partitioning", None)
    with pytest.warns(DeprecationWarning, match="bma_gp.partition_builders"):
        old = importlib.import_module("bma_gp.partitioning")
    for name in old.__all__:
        assert getattr(old, name) is getattr(builders, name)
    assert set(builders.__all__) <= set(old.__all__)
