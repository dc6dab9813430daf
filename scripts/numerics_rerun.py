"""Re-run the float-parity tests (``pytest -m numerics``) under another arithmetic configuration.

The default test run uses this machine's fastest kernels on all its cores. A tolerance tuned
to the roundings those kernels happen to make (instead of derived from the arithmetic, see
``tests/tolerance.py``) passes there and fails on the next machine; this re-run changes what
can be changed from outside the processes, so such a tolerance fails here first:

- one thread for OpenMP (PyTorch), MKL, OpenBLAS and ONNX Runtime's intra-op pool
  (``ORT_INTRA_OP_NUM_THREADS``: the pinned ONNX Runtime reads it for sessions that set no
  count of their own, as the product's do by default): parallel reductions are no longer split;
- PyTorch's portable ATen kernels (``ATEN_CPU_CAPABILITY=default``: no AVX2/AVX-512 vector
  paths, and with them no FMA-contracted arithmetic);
- oneDNN, PyTorch's convolution library, limited to SSE4.1 (``ONEDNN_MAX_CPU_ISA``);
- MKL, PyTorch's GEMMs, on its portable code path (``MKL_CBWR=COMPATIBLE``);
- numpy's baseline SIMD only (``NPY_DISABLE_CPU_FEATURES`` = every dispatch target this numpy
  has, e.g. ``X86_V3 X86_V4 AVX512_ICL AVX512_SPR`` for numpy 2.4 on x86-64);
- numpy's OpenBLAS on its SSE4.2 "Nehalem" kernels (``OPENBLAS_CORETYPE``).

ONNX Runtime's MLAS chooses its kernels from CPUID and has no switch: only its thread count
changes. Each setting is checked in a child process with the same environment, and the
findings (not the requests) are printed as one line; a setting that did not take effect is an
error, never a silent no-op.

Usage: ``python scripts/numerics_rerun.py [pytest args]`` (``scripts/test.sh`` passes its own).
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import subprocess
import sys

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_INTRA_OP_NUM_THREADS")
PROBE_MARK = "numerics-rerun-probe:"


def numpy_dispatch_targets() -> list[str]:
    """The SIMD targets this numpy dispatches to at run time (all of them above its compiled-in baseline)."""
    from numpy._core._multiarray_umath import __cpu_dispatch__

    return list(__cpu_dispatch__)


def configuration() -> dict[str, str]:
    env = {name: "1" for name in THREAD_VARIABLES}
    env.update(
        ATEN_CPU_CAPABILITY="default",
        ONEDNN_MAX_CPU_ISA="SSE41",
        MKL_CBWR="COMPATIBLE",
        NPY_DISABLE_CPU_FEATURES=" ".join(numpy_dispatch_targets()),
        OPENBLAS_CORETYPE="Nehalem",
    )
    return env


def _openblas() -> tuple[str, int] | None:
    """(core name, threads) of the OpenBLAS numpy loaded, via its exported getters."""
    import numpy as np

    for path in glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*")):
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "")):
            name = getattr(lib, f"{prefix}_get_corename{suffix}", None)
            threads = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            if name is not None and threads is not None:
                name.restype = ctypes.c_char_p
                return name().decode(), int(threads())
    return None


def _ort_intra_op_threads() -> int:
    """Threads an ONNX Runtime session's intra-op pool runs on: the threads it starts, plus the caller's."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = len(os.listdir("/proc/self/task"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones(4, np.float32)})
    return len(os.listdir("/proc/self/task")) - before + 1


def probe() -> None:
    """In the configured environment: report what each library actually does (oneDNN and MKL report through their verbose logs)."""
    import numpy as np
    import torch
    from numpy._core._multiarray_umath import __cpu_features__

    with torch.no_grad():  # a convolution large enough for oneDNN, a GEMM for MKL: their verbose lines name ISA and CNR mode
        torch.nn.functional.conv2d(torch.randn(2, 32, 32, 48), torch.randn(32, 32, 3, 3), padding=1)
        torch.randn(64, 64) @ torch.randn(64, 64)
    found = {
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "numpy_dispatch_on": [t for t in numpy_dispatch_targets() if __cpu_features__.get(t)],
        "numpy_dispatch": numpy_dispatch_targets(),
        "openblas": _openblas(),
        "ort_threads": _ort_intra_op_threads(),
        "numpy": np.__version__,
    }
    print(PROBE_MARK + json.dumps(found), flush=True)


def check(env: dict[str, str]) -> str:
    """Probe a child with ``env`` (plus verbose logging); the one-line summary, or SystemExit naming what did not take effect."""
    child = {**os.environ, **env, "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1"}
    out = subprocess.run([sys.executable, __file__, "--probe"], env=child, capture_output=True, text=True, check=True).stdout
    found = json.loads(next(line for line in out.splitlines() if line.startswith(PROBE_MARK))[len(PROBE_MARK) :])
    isa = next((line.split("isa:", 1)[1].strip() for line in out.splitlines() if line.startswith("onednn_verbose") and ",isa:" in line), None)
    mkl = [line for line in out.splitlines() if line.startswith("MKL_VERBOSE") and "CNR:" in line]
    cnr = mkl[0].split("CNR:", 1)[1].split()[0] if mkl else None
    mkl_threads = mkl[0].split("NThr:", 1)[1].split()[0] if mkl and "NThr:" in mkl[0] else None
    problems = []
    if found["torch_capability"] != "DEFAULT":
        problems.append(f"PyTorch still runs {found['torch_capability']} kernels (ATEN_CPU_CAPABILITY=default ignored)")
    if found["torch_threads"] != 1:
        problems.append(f"PyTorch runs {found['torch_threads']} threads")
    if isa is None or "AVX" in isa:
        problems.append(f"oneDNN ISA {isa!r} (ONEDNN_MAX_CPU_ISA=SSE41 ignored, or oneDNN never ran)")
    if cnr != "COMPATIBLE" or mkl_threads != "1":
        problems.append(f"MKL CNR {cnr!r} with {mkl_threads!r} threads (MKL_CBWR / MKL_NUM_THREADS ignored, or MKL never ran)")
    if found["numpy_dispatch_on"]:
        problems.append(f"numpy still dispatches {found['numpy_dispatch_on']} (NPY_DISABLE_CPU_FEATURES ignored)")
    if found["openblas"] is not None and (found["openblas"][0] != "Nehalem" or found["openblas"][1] != 1):
        problems.append(f"OpenBLAS core {found['openblas'][0]} with {found['openblas'][1]} threads")
    if found["ort_threads"] != 1:
        problems.append(f"ONNX Runtime runs {found['ort_threads']} intra-op threads (ORT_INTRA_OP_NUM_THREADS ignored)")
    if problems:
        raise SystemExit("numerics re-run: the arithmetic configuration did not take effect: " + "; ".join(problems))
    blas = f"OpenBLAS {found['openblas'][0]}" if found["openblas"] else "no OpenBLAS found"
    return (
        f"numerics re-run (-m numerics): 1 thread (PyTorch, MKL, OpenBLAS, ONNX Runtime); PyTorch {found['torch_capability']} kernels; "
        f"oneDNN {isa}; MKL CNR {cnr}; numpy {found['numpy']} without {' '.join(found['numpy_dispatch']) or 'any dispatch'}; {blas}; "
        "ONNX Runtime MLAS kernels as CPUID picks (no switch)"
    )


def main(argv: list[str]) -> int:
    env = configuration()
    print(check(env), flush=True)
    # the last -m wins over pytest.ini's and the caller's: only the float-parity tests, never the slow ones
    proc = subprocess.run([sys.executable, "-m", "pytest", *argv, "-m", "numerics and not slow"], env={**os.environ, **env})
    if proc.returncode == 5:  # the caller's selection holds no numerics test: nothing to re-run
        print("numerics re-run: no numerics test in this selection")
        return 0
    return proc.returncode


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        probe()
    else:
        sys.exit(main(sys.argv[1:]))
