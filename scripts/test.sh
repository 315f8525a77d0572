#!/usr/bin/env bash
# Sets up and runs the test suite, from a fresh clone with only Python and pip:
# creates .venv with `pip install "torch==2.13.0" -e ".[all]"` when it is
# missing, then runs the suite once per Keras backend, each in its own process
# (Keras reads KERAS_BACKEND once, at import).
#   bash scripts/test.sh                 # every backend
#   bash scripts/test.sh -k saving       # extra arguments go to pytest
#   JAXLAYER_TEST_BACKENDS="jax torch" bash scripts/test.sh
#   JAXLAYER_SLOW=1 bash scripts/test.sh # also the tests marked slow
#   JAXLAYER_TEST_JOBS=1 bash scripts/test.sh  # one backend at a time
# With a virtual environment active (CI: .ci/run) or PYTHON set, that
# interpreter is used as it is and nothing is installed.
set -u
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_python.sh
. scripts/_python.sh
jaxlayer_python all "torch==2.13.0" -e ".[all]" || exit 1
backends="${JAXLAYER_TEST_BACKENDS:-jax tensorflow torch numpy}"
# scripts/_pool.py runs the processes: JAXLAYER_TEST_JOBS at a time (default
# 2: most of a test's time is one busy thread, so two processes use two
# cores), the heaviest first, each one's output printed when it ends. A
# backend's tests can be split into several processes by measured time
# (tests/durations.json), which keeps every core busy to the end:
# JAXLAYER_TEST_SHARDS="jax:2 tensorflow:2 torch:2" (CI sets it).
# It also gives every process one JAX compilation cache, one folder of
# load-safety reports and, with JAXLAYER_TEST_BUDGET, one deadline.
exec "$python" scripts/_pool.py --jobs "${JAXLAYER_TEST_JOBS:-2}" \
  --suite "$backends" "$@"
