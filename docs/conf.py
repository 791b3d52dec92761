"""Sphinx configuration: autodoc + napoleon (Google style) + MathJax, Markdown pages via MyST.

Build (warnings are errors, as in CI)::

    .venv/bin/python -m sphinx -W -b html docs docs/_build/html
"""

import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # document the checkout, installed or not

import bma_gp  # noqa: E402

project = "bma-gp"
author = "the bma-gp authors"
copyright = "the bma-gp authors, MIT licence"
release = bma_gp.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# results/ holds benchmark output (JSON, text, PNG): the pages include its figures, but none of
# its files is a page.
exclude_patterns = ["_build", "_generated", "results/**", "Thumbs.db", ".DS_Store"]

# Markdown: $...$ and $$...$$ math, \begin{align} blocks, heading anchors for [text](page.md#anchor).
myst_enable_extensions = ["dollarmath", "amsmath", "deflist"]
myst_heading_anchors = 3

# Google-style docstrings (STYLE.md); the math in them is `.. math::` blocks.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_class_signature = "separated"
autodoc_default_options = {"show-inheritance": True}

html_theme = "alabaster"
html_title = f"bma-gp {release}"
html_theme_options = {"description": "Block mean matrices for GPyTorch and block-mean AdaGrad", "fixed_sidebar": True}


def _write_cli_help(app):
    """Render ``bma-gp --help`` into _generated/ so the CLI page never goes stale."""
    from bma_gp.cli import build_parser

    os.environ["COLUMNS"] = "100"
    out = os.path.join(app.srcdir, "_generated")
    os.makedirs(out, exist_ok=True)
    ignore = os.path.join(out, ".gitignore")
    if not os.path.exists(ignore):
        with open(ignore, "w", encoding="utf-8") as handle:
            handle.write("# written by docs/conf.py at build time\n*\n")
    text = build_parser().format_help()
    path = os.path.join(out, "cli_help.txt")
    if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)


_SHAPE = re.compile(r"#\s*shape:\s*(.+?)\s*$")
_QUOTED = re.compile(r"(``.*?``|`[^`]*`)")


def _render_shapes(app, what, name, obj, options, lines):
    """Render the shape notes of the docstrings (STYLE.md) as reStructuredText.

    ``# shape: (*batch, n, n)`` becomes "(shape ``(*batch, n, n)``)", and a ``(*batch``
    in running text is escaped: plain, its ``*`` would open an emphasis. Runs before napoleon,
    which would otherwise read the colon of ``shape:`` in a property's docstring as a type.
    """
    for i, line in enumerate(lines):
        line = _SHAPE.sub(lambda match: f"(shape ``{match.group(1)}``)", line)
        pieces = _QUOTED.split(line)
        pieces[::2] = [piece.replace("(*", "(\\*") for piece in pieces[::2]]
        lines[i] = "".join(pieces)


def setup(app):
    app.connect("builder-inited", _write_cli_help)
    app.connect("autodoc-process-docstring", _render_shapes, priority=400)
