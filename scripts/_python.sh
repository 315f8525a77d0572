# Sourced by scripts/demo.sh and scripts/test.sh: sets $python, the
# interpreter to run with.
#   - $PYTHON when set, else the active virtual environment's python
#     ($VIRTUAL_ENV, as in CI): used as they are, nothing is installed;
#   - else .venv/bin/python of the clone, created and installed on first use
#     (`jaxlayer_python MARKER PIP_ARGS...`: reinstalls until an install with
#     these arguments has succeeded once; the `all` install serves every use).
jaxlayer_python() {
  local marker="$1"
  shift
  if [ -n "${PYTHON:-}" ]; then
    python="$PYTHON"
    return 0
  fi
  if [ -n "${VIRTUAL_ENV:-}" ]; then
    python="$VIRTUAL_ENV/bin/python"
    [ -x "$python" ] || python=python
    return 0
  fi
  python=.venv/bin/python
  if [ -e ".venv/.jaxlayer-$marker" ] || [ -e .venv/.jaxlayer-all ]; then
    return 0
  fi
  if [ ! -x .venv/bin/python ]; then
    local base
    base="$(command -v python3 || command -v python)" || {
      echo "scripts: no python3 found on PATH" >&2
      return 1
    }
    echo "=== creating .venv with $base ===" >&2
    "$base" -m venv .venv || return 1
  fi
  echo "=== .venv: pip install $* ===" >&2
  .venv/bin/python -m pip install "$@" || return 1
  touch ".venv/.jaxlayer-$marker"
}
