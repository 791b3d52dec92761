#!/usr/bin/env bash
# One prepared check for a CUDA machine (issue 5, item 3): the CUDA tests, then the benchmark
# suite at GPU sizes (n = 10^8 matvec, n = 10^6 kernel sums, GP iterations up to n = 10^6),
# within a total budget (default 480 s). Run from anywhere:
#
#     bash scripts/gpu_check.sh                # results in $OUT if set, else docs/results/gpu/
#     BUDGET_S=300 bash scripts/gpu_check.sh   # a shorter budget
#     PYTHON=/path/to/python bash scripts/gpu_check.sh
#
# Python: $PYTHON if set, else the first of python3 / .venv/bin/python whose torch sees CUDA.
# Nothing is installed when one is found (the project runs from the checkout via PYTHONPATH).
# Only when none sees CUDA and ALLOW_INSTALL=1 is set does it build .venv-gpu with a CUDA torch
# from the PyTorch index (a multi-GB download: never on a CPU-only machine, so off by default). gpytorch / linear_operator missing there can come as
# wheels in .whl/ (see the device README); they are installed into /tmp/site.
#
# Output (at most 8 files, so it fits a device tool's $OUT): gpu_check.log (this script's log,
# nvidia-smi, versions), pytest_cuda.log, summary.md, results.jsonl, gp_iteration.png,
# bench_logs.tar.gz (every script's raw output).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEST=${OUT:-$REPO/docs/results/gpu}
BUDGET_S=${BUDGET_S:-480}
PYTEST_S=${PYTEST_S:-120}
START=$(date +%s)
LOG=/dev/null  # until a CUDA Python is found: a CPU machine gets no output folder
say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
export PYTHONUNBUFFERED=1

has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in python3 "$REPO/.venv/bin/python" "$REPO/.venv-gpu/bin/python"; do
        if command -v "$candidate" >/dev/null 2>&1 && has_cuda "$candidate"; then PY=$candidate; break; fi
    done
fi
if [ -z "$PY" ] && [ "${ALLOW_INSTALL:-0}" = 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
    say "no Python here has a CUDA torch; building .venv-gpu (needs a reachable package index)"
    python3 -m venv --system-site-packages .venv-gpu \
        && .venv-gpu/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cu126 \
        && .venv-gpu/bin/python -m pip install -q -e ".[test,examples]" \
        && has_cuda .venv-gpu/bin/python && PY=.venv-gpu/bin/python
fi
if [ -z "$PY" ]; then
    say "no CUDA device or no CUDA torch: nothing to check (this is not a failure on a CPU machine)"
    exit 0
fi
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
: > "$LOG"

if ! "$PY" -c "import gpytorch, linear_operator" >/dev/null 2>&1 && ls .whl/*.whl >/dev/null 2>&1; then
    say "installing carried wheels from .whl/ into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
{
    nvidia-smi 2>&1 | head -20
    "$PY" -c "import sys, torch, gpytorch, linear_operator; print('python', sys.version.split()[0], sys.executable); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, \
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE'); \
print('gpytorch', gpytorch.__version__, 'linear_operator', linear_operator.__version__)"
} >>"$LOG" 2>&1 || { say "imports failed; see $LOG"; exit 1; }
say "python: $PY"

STATUS=0
say "pytest -m cuda (limit ${PYTEST_S}s)"
timeout -k 10 "$PYTEST_S" "$PY" -m pytest -m cuda -q -p no:cacheprovider tests >"$DEST/pytest_cuda.log" 2>&1
RC=$?
say "pytest -m cuda exit $RC: $(tail -n 1 "$DEST/pytest_cuda.log")"
[ $RC -ne 0 ] && STATUS=1

BENCH_DIR=$(mktemp -d /tmp/bma_gp_gpu_bench.XXXXXX)
REMAIN=$(left)
if [ "$REMAIN" -lt 60 ]; then
    say "only ${REMAIN}s left of the budget: skipping the benchmark suite"
else
    # --budget: the suite stops starting scripts, and cuts the running one, when the time is spent,
    # and still writes its summary of what finished; timeout is only the last resort
    say "examples/benchmarks.py --device cuda (budget $((REMAIN - 20))s)"
    timeout -k 10 $((REMAIN - 5)) "$PY" examples/benchmarks.py --device cuda --out-dir "$BENCH_DIR" \
        --budget $((REMAIN - 20)) --timeout $(( (REMAIN - 20) / 2 )) >>"$LOG" 2>&1
    RC=$?
    say "benchmarks exit $RC"
    [ $RC -ne 0 ] && STATUS=1
    for f in summary.md results.jsonl gp_iteration.png; do
        [ -f "$BENCH_DIR/$f" ] && cp "$BENCH_DIR/$f" "$DEST/$f"
    done
    [ -d "$BENCH_DIR/logs" ] && tar -czf "$DEST/bench_logs.tar.gz" -C "$BENCH_DIR" logs
fi
rm -rf "$BENCH_DIR"
say "done in $(( $(date +%s) - START ))s, status $STATUS; results in $DEST"
exit $STATUS
