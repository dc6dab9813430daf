"""One 3x3 convolution alone, direct (ONNX Runtime's Conv) vs Winograd F(2x2, 3x3) (engines/winograd.py), per layer shape.

    python benchmarks/winograd_layers.py --threads 2 --runs 7 --out benchmarks/results/winograd_layers.json

The shapes are the SD1.5 UNet's and VAE's (channels in, out, side of the square input, batch 1);
both graphs are optimized by ONNX Runtime at level ``all`` (as the CPU build saves them) and run
alternately, so a slow spell of a shared machine hits both; each figure is a median. Also
reports the largest difference between the two outputs, and the memory the rewrite's tile
buffers take (the gathered tiles and the products: 4x the layer's input and output).

A layer alone overstates the gain: inside the built SD1.5 graphs the same rewrite made the UNet step
0.98x, the VAE decoder 0.95x and the encoder 0.93x (benchmarks/README.md, "Winograd convolutions").
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

# (cin, cout, side): SD1.5 UNet at 512x512 (latent 64), VAE decoder/encoder levels, and the narrow layers left alone
SHAPES = [
    (320, 320, 64), (320, 640, 32), (640, 640, 32), (640, 1280, 16), (1280, 1280, 16), (1280, 1280, 8),
    (512, 512, 64), (512, 512, 128), (256, 256, 128), (256, 256, 256), (128, 128, 512),
]  # fmt: skip


def _graph(weight: np.ndarray, bias: np.ndarray):  # noqa: ANN202 - an onnx.ModelProto
    from onnx import TensorProto, helper, numpy_helper

    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weight.shape[1], "H", "W"])
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    graph = helper.make_graph([conv], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main() -> int:
    import onnxruntime as ort

    from trt_bgswap.atomic import write_text_atomic
    from trt_bgswap.engines.winograd import winograd_convolutions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    load_before = os.getloadavg()
    for cin, cout, side in SHAPES:
        weight = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
        bias = rng.standard_normal(cout).astype(np.float32)
        direct, winograd = _graph(weight, bias), _graph(weight, bias)
        winograd_convolutions(winograd, ".", least_channels=1, most_pairs=cin * cout)  # every layer, even those the build leaves alone
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.enable_mem_pattern = False  # as the runtime opens its sessions
        sessions = [ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]) for m in (direct, winograd)]
        x = rng.standard_normal((1, cin, side, side)).astype(np.float32)
        outs = [s.run(None, {"x": x})[0] for s in sessions]  # warm-up
        times: list[list[float]] = [[], []]
        for _ in range(args.runs):
            for k, s in enumerate(sessions):
                t0 = time.perf_counter()
                s.run(None, {"x": x})
                times[k].append(time.perf_counter() - t0)
        d, w = (float(np.median(t)) for t in times)
        gflop = 2 * 9 * cin * cout * side * side / 1e9
        row = {
            "cin": cin, "cout": cout, "side": side, "direct_s": d, "winograd_s": w, "ratio": w / d,
            "direct_gflops": gflop / d, "max_abs_diff": float(np.max(np.abs(outs[0] - outs[1]))), "max_abs": float(np.max(np.abs(outs[0]))),
            "tile_buffers_mb": 4 * 4 * (cin + cout) * side * side / 1e6,
        }  # fmt: skip
        rows.append(row)
        print(f"{cin:5d} -> {cout:5d} @ {side:3d}^2: direct {d * 1e3:7.1f} ms ({row['direct_gflops']:5.0f} GFLOP/s)  winograd {w * 1e3:7.1f} ms  "
              f"{row['ratio']:.2f}x  max diff {row['max_abs_diff']:.1e} of {row['max_abs']:.1f}  tiles {row['tile_buffers_mb']:.0f} MB", flush=True)  # fmt: skip
    if args.out:
        doc = {"threads": args.threads, "runs": args.runs, "load_before": load_before, "load_after": os.getloadavg(), "onnxruntime": ort.__version__, "rows": rows}
        write_text_atomic(args.out, json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
