#!/usr/bin/env bash
# Set up a venv (.venv, or $VENV) with the project, its export extra and test tools, then run the tests twice:
#  1. the default suite (pytest.ini's selection: everything but -m slow), with this machine's fastest kernels;
#  2. the float-parity tests (-m numerics) again under another arithmetic configuration: one thread everywhere,
#     portable PyTorch/oneDNN/MKL/numpy/OpenBLAS kernels (scripts/numerics_rerun.py checks that each setting took
#     effect and prints one line saying what runs). A tolerance tuned to one CPU's rounding fails here, not on the
#     next machine.
# What it downloads: pip installs from the package index(es) and find-links it is configured with. It upgrades pip
# itself, then installs the project with its export and test extras and whatever of their dependencies is not
# installed yet, at the versions constraints/test.txt pins. On the public index the Linux x86-64 wheel of
# torch==2.13.0 is the CUDA build (several GB with its nvidia-* dependencies); a machine whose pip finds the CPU
# wheel (torch 2.13.0+cpu) in its find-links gets that one.
# The tests themselves download nothing: they build tiny models and use scikit-image's bundled photos.
# Pytest options pass through to both runs (e.g. -k parity); the second run keeps only numerics tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c constraints/test.txt -e '.[export,test]'
"$VENV/bin/python" -m pytest "$@"
exec "$VENV/bin/python" scripts/numerics_rerun.py "$@"
