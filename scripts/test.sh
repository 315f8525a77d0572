#!/usr/bin/env bash
# Runs the test suite once per Keras backend, each in its own process
# (Keras reads KERAS_BACKEND once, at import).
#   bash scripts/test.sh                 # every backend
#   bash scripts/test.sh -k saving       # extra arguments go to pytest
#   JAXLAYER_TEST_BACKENDS="jax torch" bash scripts/test.sh
set -u
cd "$(dirname "$0")/.."
backends="${JAXLAYER_TEST_BACKENDS:-jax tensorflow torch numpy}"
python="${PYTHON:-python}"
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
