#!/usr/bin/env bash
# Set up a venv (.venv, or $VENV) with the project, its export extra and test tools, then run the tests.
# The constraints file pins the CPU torch wheel and the library versions the suite was verified with.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh export,test   # what it downloads: see scripts/venv.sh
exec "$VENV/bin/python" -m pytest "$@"
