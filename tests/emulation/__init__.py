"""A version-aware, CPU-only stand-in for NVIDIA's ``tensorrt`` and ``cuda-python`` (``cuda-bindings``).

Why: this project's TensorRT code must work on TensorRT 10.0 .. 10.x (edge boxes, JetPack) and
11.x (data-centre GPUs), with cuda-bindings 12 and 13, and no GPU is available to test it.
The emulation offers exactly the names of each release (derived from NVIDIA's sources, see
``SOURCES.md`` and ``data/``), models the behaviour the code depends on (asynchronous streams,
device memory with leak accounting, stream-capture rules, driver/runtime version errors), and
executes a "plan" by running the ONNX graph it was built from with ONNX Runtime.

- :mod:`emulation.install`: :func:`emulate` / :class:`StackSpec` / :data:`STACKS` (what the tests use);
- :mod:`emulation.cuda_api`: the device and ``cuda.bindings.runtime``;
- :mod:`emulation.tensorrt_api`: ``tensorrt`` (builder, runtime, engine, execution context);
- :mod:`emulation.api_data`: the per-release name tables and the errors the emulation raises
  (:class:`UndocumentedBehaviour`, :class:`Hazard`, :class:`NotEmulated`);
- ``extract_tensorrt_api.py`` / ``extract_cuda_api.py``: how ``data/`` was derived (developer tools).
"""

from emulation.api_data import EmulationError, Hazard, NotEmulated, UndocumentedBehaviour
from emulation.cuda_api import Machine
from emulation.install import STACKS, Emulation, StackSpec, emulate

__all__ = ["STACKS", "Emulation", "EmulationError", "Hazard", "Machine", "NotEmulated", "StackSpec", "UndocumentedBehaviour", "emulate"]
