#!/usr/bin/env bash
# Build the Sphinx site with warnings as errors. Assumes scripts/setup_env.sh has run.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m sphinx -W -q -b html docs docs/_build/html
echo "docs ok: docs/_build/html/index.html"
