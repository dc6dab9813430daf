#!/usr/bin/env bash
# gpu-check.sh: what a user with an NVIDIA GPU runs to confirm trt-bgswap's TensorRT path (meant to take <= 10 minutes:
# the GPU tests get a 600 s budget, GPU_CHECK_BUDGET; not yet timed on a GPU).
#
#   pip install -e '.[export,test,trt-cu13]'    # or trt-cu12 (driver < 580, JetPack-era CUDA 12); see README, "TensorRT"
#   scripts/gpu-check.sh [OUT_DIR]              # default ./gpu-check
#
# 1. versions: `trt-bgswap info` (TensorRT, CUDA runtime, driver, and whether they fit);
# 2. builds the tiny engines: tiny models with the real architectures, exported with the fused step and the
#    device graphs, then `trt-bgswap build --backend trt --precision fp16` (strongly typed: the fp16 graphs
#    with fp32 islands; the VAE stays fp32);
# 3. runs `pytest -m gpu`: among them the device loop vs ONNX Runtime (fp32 and fp16), fp16 CUDA-graph replay
#    vs eager, guidance alternating 1/2/1/2 on shared scratch with a VAE call in between, the device chain vs
#    the host pipeline, TrtEngine on real plans;
# 4. writes OUT_DIR/gpu-check.json: versions, each step's status and seconds, pytest's pass/fail/skip counts
#    and every failure's name. Exit status 0 only when every step passed and no GPU test was skipped.
#
# Nothing here has been run on a GPU by the authors (there was none); it has been run on CPU, where step 2
# stops at the build ("needs TensorRT") and every GPU test shows as SKIPPED with its reason.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mkdir -p "${1:-gpu-check}" && cd "${1:-gpu-check}" && pwd)"
PY="${PYTHON:-python}"
CLI=("$PY" -c 'import sys; from trt_bgswap.cli.main import main; sys.exit(main(sys.argv[1:]))')
BUDGET="${GPU_CHECK_BUDGET:-600}"   # seconds for pytest -m gpu
STEPS_JSON="$OUT/steps.jsonl"
: > "$STEPS_JSON"

step() {  # step NAME CMD...: run, log to OUT/NAME.log, record status and seconds
    local name="$1"; shift
    local start end rc
    start=$(date +%s)
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    end=$(date +%s)
    tail -n 5 "$OUT/$name.log"
    printf '{"step": "%s", "rc": %d, "seconds": %d, "log": "%s"}\n' "$name" "$rc" "$((end - start))" "$OUT/$name.log" >> "$STEPS_JSON"
    return $rc
}

cd "$ROOT"
step versions "${CLI[@]}" info
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi: not available" > "$OUT/nvidia-smi.txt"

if step tiny-models "${CLI[@]}" tiny-models "$OUT/tiny" &&
   step export "${CLI[@]}" export --inpaint "$OUT/tiny/sd-inpainting" --lcm-lora "$OUT/tiny/lcm-lora" --rmbg "$OUT/tiny/rmbg" \
        --out "$OUT/export" --fused-step --device-graphs --force; then
    step build "${CLI[@]}" build "$OUT/export" --backend trt --precision fp16 --size 192x128 --opt-level 1
fi

step pytest-gpu timeout "$BUDGET" "$PY" -m pytest -m gpu -p no:cacheprovider -q -rs \
    --junitxml="$OUT/pytest-gpu.xml" tests/

"$PY" - "$OUT" <<'EOF'
import json, subprocess, sys, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
report = {"steps": steps, "versions": (out / "versions.log").read_text().splitlines() if (out / "versions.log").exists() else []}
report["nvidia_smi"] = (out / "nvidia-smi.txt").read_text().splitlines()[:20]
junit = out / "pytest-gpu.xml"
if junit.exists():
    cases = ET.parse(junit).getroot().iter("testcase")
    tests = {"passed": [], "failed": [], "skipped": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            tests["failed"].append(name)
        elif case.find("skipped") is not None:
            tests["skipped"].append(f"{name}: {case.find('skipped').get('message', '')}")
        else:
            tests["passed"].append(name)
    report["gpu_tests"] = {k: len(v) for k, v in tests.items()} | {"failures": tests["failed"], "skips": tests["skipped"]}
ok = all(s["rc"] == 0 for s in steps) and report.get("gpu_tests", {}).get("skipped", 1) == 0
report["ok"] = ok
(out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
print(f"report: {out / 'gpu-check.json'} (ok: {ok})")
sys.exit(0 if ok else 1)
EOF
