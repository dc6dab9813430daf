#!/usr/bin/env bash
# Set up a venv (.venv, or $VENV) with the project, its export extra and test tools, then run the tests.
# The constraints file pins the CPU torch wheel and the library versions the suite was verified with.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c constraints/test.txt -e '.[export,test]'
exec "$VENV/bin/python" -m pytest "$@"
