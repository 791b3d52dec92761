#!/usr/bin/env bash
# The main job of the README's Quickstart: set up .venv (pinned CPU torch where torch is
# missing, the project installed) and run the bma-gp demo. With no arguments it fits exact,
# block mean and inducing-point GPs to the bundled Mauna Loa CO2 series, prints the table and
# writes ./bma_gp_out/fits.png (relative to the directory it is started from); any arguments
# go to bma-gp (try --help), relative paths included.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
exec "$ROOT/.venv/bin/bma-gp" "$@"
