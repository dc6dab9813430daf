"""Will TensorRT's ONNX parser take this graph? Everything that can be checked without TensorRT.

Checked against the data in :mod:`trt_bgswap.engines.trt_onnx_ops` (onnx-tensorrt's
operator matrix for TensorRT 10.1):

- external weight files are present (TensorRT's ``parse_from_file`` reads them
  from beside the graph);
- the default-domain opset lies in TensorRT's documented range;
- every node is a default-domain operator TensorRT lists as supported
  (custom domains such as ``com.microsoft`` need plugins);
- no tensor has a type TensorRT lacks (string, complex, 16/32/64-bit unsigned,
  int16); DOUBLE is reported because TensorRT casts it down with clamping;
- an operator's data input has a type the matrix lists for it;
- ONNX shape inference completes (strict mode) and gives every tensor a type
  and a rank, which TensorRT needs to build profiles;
- optionally, the graph's inputs and outputs match the model's declared
  :class:`~trt_bgswap.specs.ModelSpec` (names, ranks, dtypes, fixed dims), since
  the optimization profiles derive from that spec.

Errors mean TensorRT will refuse the graph; warnings mean it may work, with
caveats. Uses the ``onnx`` package only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_bgswap.errors import ModelError
from trt_bgswap.onnx_graph import DEFAULT_DOMAINS, external_data_files, iter_graphs, spec_mismatches, type_name
from trt_bgswap.specs import ModelSpec

from trt_bgswap.engines.trt_onnx_ops import OPSET_RANGE, SUPPORTED_OPS, TENSORRT_ONNX_DOC, UNSUPPORTED_OPS

log = logging.getLogger(__name__)

# ONNX TensorProto element type names -> the names TensorRT's operator matrix uses.
TRT_TYPE_NAMES: dict[str, str] = {
    "FLOAT": "FP32",
    "FLOAT16": "FP16",
    "BFLOAT16": "BF16",
    "INT32": "INT32",
    "INT64": "INT64",
    "INT8": "INT8",
    "INT4": "INT4",
    "UINT8": "UINT8",
    "BOOL": "BOOL",
    "FLOAT8E4M3FN": "FP8",
}
CAST_DOWN_TYPES = ("DOUBLE",)  # TensorRT casts these to FLOAT, clamping to +-FLT_MAX


@dataclass(frozen=True)
class Issue:
    severity: str  # "error" | "warning"
    check: str  # which check found it: external-data, opset, operator, dtype, shape-inference, spec
    message: str


@dataclass(frozen=True)
class CheckReport:
    path: Path
    issues: tuple[Issue, ...]

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        if self.errors:
            first = self.errors[0]
            more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            raise ModelError(
                f"{self.path}: TensorRT cannot parse this graph: {first.message}{more}; "
                f"re-export it for TensorRT or use --backend ort (checked against {TENSORRT_ONNX_DOC})"
            )


def _value_types(graph: Any) -> dict[str, Any]:
    """name -> TypeProto for every typed value of the graph (inputs, outputs, value_info)."""
    types = {}
    for vi in (*graph.input, *graph.output, *graph.value_info):
        types[vi.name] = vi.type
    return types


def _check_opset(model: Any) -> list[Issue]:
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    if not versions:
        return [Issue("error", "opset", "the graph imports no default-domain opset")]
    v = versions[0]
    lo, hi = OPSET_RANGE
    if v < lo:
        return [Issue("error", "opset", f"opset {v} is older than TensorRT's minimum {lo}; re-export with opset {lo}..{hi}")]
    if v > hi:
        return [
            Issue(
                "warning",
                "opset",
                f"opset {v} is newer than the {hi} documented for TensorRT 10.1; newer TensorRT may parse it, else re-export with opset <= {hi}",
            )
        ]
    return []


def _check_operators(model: Any, types: dict[str, Any], initializers: dict[str, int]) -> list[Issue]:
    issues: list[Issue] = []
    seen: set[tuple[str, str, str]] = set()
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            if node.domain not in DEFAULT_DOMAINS:
                k = ("domain", node.domain, node.op_type)
                if k not in seen:
                    seen.add(k)
                    issues.append(
                        Issue("error", "operator", f"{node.domain}::{node.op_type} (node {node.name!r}) is a custom-domain op; TensorRT needs a plugin for it")
                    )
                continue
            if node.op_type not in SUPPORTED_OPS:
                k = ("op", "", node.op_type)
                if k not in seen:
                    seen.add(k)
                    why = "listed as unsupported" if node.op_type in UNSUPPORTED_OPS else "not in TensorRT's operator list"
                    issues.append(Issue("error", "operator", f"{node.op_type} (node {node.name!r}) is {why}"))
                continue
            allowed = SUPPORTED_OPS[node.op_type]
            if not allowed or not node.input or not node.input[0]:
                continue
            first = node.input[0]
            elem = initializers.get(first)
            if elem is None and first in types and types[first].HasField("tensor_type"):
                elem = types[first].tensor_type.elem_type
            if not elem:
                continue
            trt_name = TRT_TYPE_NAMES.get(type_name(elem))
            if trt_name is not None and trt_name not in allowed:
                k = ("optype", node.op_type, trt_name)
                if k not in seen:
                    seen.add(k)
                    issues.append(
                        Issue(
                            "warning",
                            "dtype",
                            f"{node.op_type} (node {node.name!r}) takes {trt_name} input {first!r}; TensorRT lists only {', '.join(allowed)}",
                        )
                    )
    return issues


def _check_dtypes(model: Any, types: dict[str, Any]) -> list[Issue]:
    issues = []
    found: dict[str, str] = {}
    for graph in iter_graphs(model.graph):
        for t in graph.initializer:
            found.setdefault(type_name(t.data_type), t.name)
    for name, tp in types.items():
        if tp.HasField("tensor_type") and tp.tensor_type.elem_type:
            found.setdefault(type_name(tp.tensor_type.elem_type), name)
    for kind, example in sorted(found.items()):
        if kind in TRT_TYPE_NAMES:
            continue
        if kind in CAST_DOWN_TYPES:
            issues.append(Issue("warning", "dtype", f"{kind} tensors (e.g. {example!r}): TensorRT casts them to FLOAT, clamping to +-FLT_MAX"))
        else:
            issues.append(Issue("error", "dtype", f"{kind} tensors (e.g. {example!r}): TensorRT has no such type"))
    return issues


def _check_shapes(model: Any, types: dict[str, Any]) -> list[Issue]:
    issues = []
    missing = []
    for graph in iter_graphs(model.graph):
        produced = [o for node in graph.node for o in node.output if o]
        for name in produced + [o.name for o in graph.output]:
            tp = types.get(name)
            if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.elem_type or not tp.tensor_type.HasField("shape"):
                missing.append(name)
    if missing:
        issues.append(
            Issue(
                "error",
                "shape-inference",
                f"{len(missing)} tensors have no inferred type/rank (first: {missing[:3]}); TensorRT needs static ranks",
            )
        )
    return issues


def _check_spec(model: Any, spec: ModelSpec) -> list[Issue]:
    """The graph against its spec (one check, shared with the export): a symbolic input dim the graph froze is a
    warning here (the profiles cannot vary it), every other mismatch an error."""
    issues = []
    for m in spec_mismatches(model, spec):
        if m.kind == "frozen":
            if m.is_input:
                issues.append(Issue("warning", "spec", m.message.replace("it must stay dynamic", "profiles cannot vary it")))
            continue
        issues.append(Issue("error", "spec", m.message))
    return issues


def check_onnx_for_tensorrt(path: str | Path, spec: ModelSpec | None = None) -> CheckReport:
    """Run every check on one graph file; never raises for a graph problem (see :meth:`CheckReport.raise_for_errors`)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: ONNX file missing; re-run `trt-bgswap export`")
    issues: list[Issue] = []
    for f in external_data_files(path):
        if not f.is_file():
            issues.append(Issue("error", "external-data", f"external data file {f.name} is missing beside {path.name}"))
    model = onnx.load(str(path), load_external_data=False)
    issues += _check_opset(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # onnx raises InferenceError / ValidationError
        issues.append(Issue("error", "shape-inference", f"ONNX shape inference fails: {str(e).splitlines()[0]}"))
        inferred = model
    types: dict[str, Any] = {}
    for graph in iter_graphs(inferred.graph):
        types.update(_value_types(graph))
    initializers = {t.name: t.data_type for graph in iter_graphs(inferred.graph) for t in graph.initializer}
    issues += _check_operators(inferred, types, initializers)
    issues += _check_dtypes(inferred, types)
    if not any(i.check == "shape-inference" for i in issues):
        issues += _check_shapes(inferred, types)
    if spec is not None:
        issues += _check_spec(inferred, spec)
    report = CheckReport(path, tuple(issues))
    for i in report.issues:
        (log.error if i.severity == "error" else log.warning)("%s: %s: %s", path, i.check, i.message)
    return report
