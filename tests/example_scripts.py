"""Loading the example scripts (``examples/NAME.py``) in this process, for the tests of their options."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str, prefix: str):
    """``examples/NAME.py`` as a fresh module named ``PREFIX_NAME`` (registered in ``sys.modules``: dataclasses
    resolve annotations through it)."""
    spec = importlib.util.spec_from_file_location(f"{prefix}_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Stop(Exception):
    """Raised by a patched expensive call: the script got this far."""


def stop(*args, **kwargs):
    raise Stop
