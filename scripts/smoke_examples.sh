#!/usr/bin/env bash
# Run every script under examples/ with --smoke (each finishes in seconds and writes only to a
# temporary directory). Assumes scripts/setup_env.sh has run.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for script in examples/*.py; do
    case "$(basename "$script")" in _*) continue ;; esac  # modules the scripts import (examples/_common.py)
    start=$(date +%s)
    if .venv/bin/python "$script" --smoke > "/tmp/smoke_$(basename "$script" .py).log" 2>&1; then
        echo "smoke ok   $script ($(( $(date +%s) - start )) s)"
    else
        echo "smoke FAIL $script (log follows)"
        tail -n 30 "/tmp/smoke_$(basename "$script" .py).log"
        status=1
    fi
done
exit $status
