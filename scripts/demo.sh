#!/usr/bin/env bash
# Sets up and runs the demo, from a fresh clone with only Python and pip:
# creates .venv with `pip install -e ".[demo]"` when it is missing, then runs
# `python -m jaxlayer demo`. Arguments go to the demo:
#   bash scripts/demo.sh
#   bash scripts/demo.sh --epochs 2
#   KERAS_BACKEND=torch bash scripts/demo.sh    # needs the torch extra
# With a virtual environment active (or PYTHON set), that one is used as it is.
set -eu
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_python.sh
. scripts/_python.sh
jaxlayer_python demo -e ".[demo]"
exec "$python" -m jaxlayer demo "$@"
