#!/usr/bin/env bash
# Static checks: ruff lint, ruff format (check only) and mypy on bma_gp and optim, all configured
# in pyproject.toml. Runs every check and fails if any failed. Assumes scripts/setup_env.sh has run.
# To fix what ruff can fix: .venv/bin/ruff check --fix . && .venv/bin/ruff format .
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
run() {
    echo "== $*"
    "$@" || { echo "FAILED: $*"; status=1; }
}
run .venv/bin/ruff check .
run .venv/bin/ruff format --check .
run .venv/bin/mypy
exit $status
