#!/usr/bin/env bash
# Runs the side-by-side benchmark on every installed Keras backend (each in its
# own process), prints the report and a summary, and writes the report and a
# chart to benchmarks/out/ (git-ignored). Runs from any directory. Extra
# arguments are passed on:
#   bash benchmarks/run_all.sh --quick                 # a smoke run
#   bash benchmarks/run_all.sh --rounds 7 --note "machine shared"
#   bash benchmarks/run_all.sh --runs 3 --write   # update benchmarks/results.md and .svg
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec "$PYTHON" -m benchmarks.fit_step --backend all "$@"
