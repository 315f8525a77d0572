#!/usr/bin/env bash
# Runs the side-by-side benchmark on every installed Keras backend (each in its
# own process) and writes benchmarks/results.md. Extra arguments are passed on,
# e.g. `benchmarks/run_all.sh --rounds 7 --note "machine shared"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec "$PYTHON" -m benchmarks.fit_step --backend all "$@"
