"""The package version: the one place it is written.

``pyproject.toml`` reads it at build time (``[tool.setuptools.dynamic]``), so the installed
metadata (``importlib.metadata.version("bma-gp")``) and ``bma_gp.__version__`` cannot disagree.
"""

__version__ = "0.2.0.dev0"  # the changes under "Unreleased" in CHANGELOG.md, on top of 0.1.0
