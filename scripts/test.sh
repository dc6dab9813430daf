#!/usr/bin/env bash
# Set up a venv (.venv, or $VENV) with the project, its export, serve and ray extras and test tools, then run the tests twice:
#  1. the default suite (pytest.ini's selection: everything but -m slow), with this machine's fastest kernels;
#  2. the float-parity tests (-m numerics) again under another arithmetic configuration: one thread everywhere,
#     portable PyTorch/oneDNN/MKL/numpy/OpenBLAS kernels (scripts/numerics_rerun.py checks that each setting took
#     effect and prints one line saying what runs). A tolerance tuned to one CPU's rounding fails here, not on the
#     next machine.
# What it downloads: see scripts/venv.sh. The tests themselves download nothing: they build tiny models and use
# scikit-image's bundled photos. Pytest options pass through to both runs (e.g. -k parity); the second run keeps
# only numerics tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh export,test,serve,ray   # what it downloads: see scripts/venv.sh (the ray extra adds Ray: 240 MB installed)
"$VENV/bin/python" -m pip install --quiet -c constraints/test.txt selenium   # drives the page's browser test
# The page's browser test drives Debian's Chromium (no browser downloads work here): install it when
# missing and we may (root with apt, as CI is); elsewhere the test is skipped and says why.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  else
    echo "note: no chromium/chromedriver; the browser test will be skipped (as root: apt-get install chromium chromium-driver)" >&2
  fi
fi
# Both runs spread the tests over the cores (pytest-xdist, one worker per core, at most 4; work stealing evens out the
# long tests): the suite is CPU-bound, and much of it single-threaded (exports, process start-ups). tests/conftest.py
# builds each shared export once for all workers. `-n 0` (passed through) runs everything in one process.
PARALLEL=(-n auto --maxprocesses 4 --dist worksteal)
"$VENV/bin/python" -m pytest "${PARALLEL[@]}" "$@"
exec "$VENV/bin/python" scripts/numerics_rerun.py "${PARALLEL[@]}" "$@"
