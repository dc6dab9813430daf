#!/usr/bin/env bash
# Offline end-to-end demo: set up a venv, write tiny random-weight models in the real formats,
# export them to ONNX, and replace the background of a real photo with the lean runtime.
# (Random weights: the new background is noise; the point is the whole loop running offline.
#  For real models see README "Real models".)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh export   # what it downloads: see scripts/venv.sh
BGSWAP="$VENV/bin/trt-bgswap"
"$BGSWAP" tiny-models models/tiny
"$BGSWAP" export --inpaint models/tiny/sd-inpainting --lcm-lora models/tiny/lcm-lora --rmbg models/tiny/rmbg \
    --out models/tiny-export --force
"$BGSWAP" run examples/astronaut.jpg --models models/tiny-export --prompt "a sunny beach, photograph" \
    --seed 42 --size 256x256 -o out/astronaut_bgswap.png --save-mask out/astronaut_mask.png --overwrite --progress
echo "wrote out/astronaut_bgswap.png and out/astronaut_mask.png"
