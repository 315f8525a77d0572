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
# Backends run JAXLAYER_TEST_JOBS at a time (default 2: most of a test's
# time is one busy thread, so two processes use two cores); each one's
# output is printed when it ends. With a virtual environment active (CI:
# .ci/run) or PYTHON set, that interpreter is used as it is and nothing is
# installed.
set -u
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_python.sh
. scripts/_python.sh
jaxlayer_python all "torch==2.13.0" -e ".[all]" || exit 1
backends="${JAXLAYER_TEST_BACKENDS:-jax tensorflow torch numpy}"
jobs="${JAXLAYER_TEST_JOBS:-2}"
# The tests marked slow (a fresh virtual environment installed from the
# package index) run on request; a `-m` given on the command line wins.
select=(-m "not slow")
if [ -n "${JAXLAYER_SLOW:-}" ]; then select=(); fi

run_backend() {
  KERAS_BACKEND=$1 "$python" -m pytest -q -p no:cacheprovider "${select[@]}" "${@:2}"
}

# One JAX compilation cache for every backend's process and the processes
# the tests start: a function compiled once (by the jax, torch or numpy
# bridge, or by Keras on the jax backend) is read back, not compiled again.
cache=""
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  cache="$(mktemp -d)"
  export JAX_COMPILATION_CACHE_DIR="$cache"
fi
# Likewise one folder of load-safety reports (a `.keras` file's artifacts
# verified once, by sha256, whichever backend's process loads it first),
# inside the same temporary folder.
if [ -z "${JAXLAYER_CACHE_DIR:-}" ] && [ -n "$cache" ]; then
  export JAXLAYER_CACHE_DIR="$cache/jaxlayer"
fi

# A time budget for the whole run (CI sets one; see tests/conftest.py): one
# deadline shared by every backend's process.
if [ -n "${JAXLAYER_TEST_BUDGET:-}" ] && [ -z "${JAXLAYER_TEST_DEADLINE:-}" ]; then
  export JAXLAYER_TEST_DEADLINE=$(($(date +%s) + ${JAXLAYER_TEST_BUDGET%.*}))
fi

failed=""
check() {
  # 5: no test collected for this backend (after -k filtering, say).
  if [ "$2" -ne 0 ] && [ "$2" -ne 5 ]; then failed="$failed $1"; fi
}

if [ "$jobs" -le 1 ]; then
  trap 'rm -rf $cache' EXIT
  for backend in $backends; do
    echo "=== KERAS_BACKEND=$backend ==="
    run_backend "$backend" "$@"
    check "$backend" $?
  done
else
  # Two processes on few cores: one thread each for torch's and TF's own
  # pools unless the environment says otherwise.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  logs="$(mktemp -d)"
  trap 'rm -rf "$logs" $cache' EXIT
  for backend in $backends; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
    echo "=== KERAS_BACKEND=$backend: started ==="
    (
      start=$SECONDS
      run_backend "$backend" "$@" >"$logs/$backend.log" 2>&1
      code=$?
      echo "$code" >"$logs/$backend.rc"
      {
        echo "=== KERAS_BACKEND=$backend ($((SECONDS - start)) s) ==="
        cat "$logs/$backend.log"
      } >"$logs/$backend.out"
      # One backend's whole output at once, never interleaved.
      flock "$logs/.lock" cat "$logs/$backend.out"
    ) &
  done
  wait
  for backend in $backends; do
    check "$backend" "$(cat "$logs/$backend.rc" 2>/dev/null || echo 1)"
  done
fi
if [ -n "$failed" ]; then
  echo "FAILED on:$failed"
  exit 1
fi
echo "all backends passed: $backends"
