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


def test_type_hints_are_declared_and_shipped():
    assert (ROOT / "bma_gp" / "py.typed").is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["bma_gp"]


def test_old_partitioning_module_warns_and_gives_the_same_builders():
    sys.modules.pop("bma_gp.partitioning", None)
    with pytest.warns(DeprecationWarning, match="bma_gp.partition_builders"):
        old = importlib.import_module("bma_gp.partitioning")
    for name in old.__all__:
        assert getattr(old, name) is getattr(builders, name)
    assert set(builders.__all__) <= set(old.__all__)
