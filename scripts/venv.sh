# Sourced by test.sh and demo.sh: make (or reuse) the venv $VENV and install the project with the extras in $1.
#
# What it downloads on a fresh machine (nothing when pip's cache or a local wheel folder has it):
# - torch's CPU-only wheel (about 190 MB) from PyTorch's own index, https://download.pytorch.org/whl/cpu,
#   unless pip already finds `torch==<pinned>+cpu` locally (this workplace keeps one in /opt/wheels).
#   The constraints pin the `+cpu` build: plain `torch` from PyPI is a CUDA build of several GB.
# - everything else from PyPI at the versions in constraints/test.txt (about 350 MB of wheels:
#   onnxruntime, diffusers, transformers, scikit-image, ...).
set -euo pipefail
VENV="${VENV:-.venv}"
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
torch_pin=$(grep -E '^torch==' constraints/test.txt)
torch_index=()
if ! "$PY" -m pip install --quiet --dry-run --no-deps --no-index "$torch_pin" >/dev/null 2>&1; then
    echo "fetching $torch_pin from PyTorch's CPU index (https://download.pytorch.org/whl/cpu)" >&2
    torch_index=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
"$PY" -m pip install --quiet "${torch_index[@]}" -c constraints/test.txt -e ".[$1]"
