#!/usr/bin/env bash
# Sets up and runs the test suite, from a fresh clone with only Python and pip:
# creates .venv with `pip install "torch==2.13.0" -e ".[all]"` when it is
# missing, then runs the suite once per Keras backend, each in its own process
# (Keras reads KERAS_BACKEND once, at import).
#   bash scripts/test.sh                 # every backend
#   bash scripts/test.sh -k saving       # extra arguments go to pytest
#   JAXLAYER_TEST_BACKENDS="jax torch" bash scripts/test.sh
# With a virtual environment active (CI: .ci/run) or PYTHON set, that
# interpreter is used as it is and nothing is installed.
set -u
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_python.sh
. scripts/_python.sh
jaxlayer_python all "torch==2.13.0" -e ".[all]" || exit 1
backends="${JAXLAYER_TEST_BACKENDS:-jax tensorflow torch numpy}"
failed=""
for backend in $backends; do
  echo "=== KERAS_BACKEND=$backend ==="
  KERAS_BACKEND=$backend "$python" -m pytest -q -p no:cacheprovider "$@"
  code=$?
  # 5: no test collected for this backend (after -k filtering, say).
  if [ $code -ne 0 ] && [ $code -ne 5 ]; then failed="$failed $backend"; fi
done
if [ -n "$failed" ]; then
  echo "FAILED on:$failed"
  exit 1
fi
echo "all backends passed: $backends"
