#!/usr/bin/env bash
# The test command of the README's Quickstart (also what .ci/run calls): the whole suite on two worker
# processes (pytest-xdist; PYTEST_WORKERS=0 runs it in this process, any other number on that many).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
