#!/usr/bin/env bash
# Offline end-to-end demo: set up a venv, write tiny random-weight models in the real formats,
# export them with the demo masker (examples/demo-rmbg: a tiny RMBG-1.4-format IS-Net fitted to four
# photos, this one among them), and replace the background of a real photo with the lean runtime.
# (The SD weights are random: the new background is noise; the point is the whole loop running
#  offline with the subject kept. For real models see README "Real models".)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh export   # what it downloads: see scripts/venv.sh
BGSWAP="$VENV/bin/trt-bgswap"
"$BGSWAP" tiny-models models/tiny
"$BGSWAP" export --inpaint models/tiny/sd-inpainting --lcm-lora models/tiny/lcm-lora --rmbg examples/demo-rmbg \
    --out models/tiny-export --force
"$BGSWAP" run examples/astronaut.jpg --models models/tiny-export --prompt "a sunny beach, photograph" \
    --seed 42 --size 256x256 -o out/astronaut_bgswap.png --save-mask out/astronaut_mask.png \
    --save-cutout out/astronaut_cutout.png --overwrite --progress
"$VENV/bin/python" scripts/demo_panel.py examples/astronaut.jpg out/astronaut_mask.png out/astronaut_bgswap.png \
    -o out/astronaut_panel.png
cat <<'EOF'
wrote out/astronaut_panel.png: input | mask | result, side by side
  out/astronaut_mask.png    the subject mask (white = kept), from examples/demo-rmbg: a tiny masker fitted
                            to four photos, this one among them - a demo, not a real background remover
  out/astronaut_cutout.png  the subject alone (RGBA)
  out/astronaut_bgswap.png  the result: where the mask is white the pixels are the photo's, exactly; the
                            background is what the tiny random-weight SD1.5 painted - noise-like, because
                            its weights are random (real models paint the prompt: README "Real models")
EOF
