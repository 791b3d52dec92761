#!/usr/bin/env bash
# The test command of the README's Quickstart (also what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest -q "$@"
