"""Derive the emulated TensorRT Python API from NVIDIA's binding sources, one entry per release tag.

A development tool, not run by the tests: it writes ``data/tensorrt_api.json``, which the
emulation (:mod:`emulation.tensorrt_api`) reads so that an emulated ``tensorrt`` module has
exactly the classes, methods, properties and enum members of the release it stands for.

What it reads, at each git tag of github.com/NVIDIA/TensorRT (a local mirror, e.g. the one
the ``fetch`` tool brings):

- ``python/src/infer/pyCore.cpp``, ``pyGraph.cpp``, ``pyFoundationalTypes.cpp`` and
  ``python/src/parsers/pyOnnx.cpp``: every pybind11 ``py::class_<...>(m, "Name")`` and
  ``py::enum_<...>(m, "Name")`` with its ``.def*("member")`` / ``.value("MEMBER")`` calls,
  and ``m.attr("name")`` / ``m.def("name")`` module attributes;
- ``include/*.h``: the C++ enumerator values, so ``int(trt.X.MEMBER)`` is the real value;
- ``python/packaging/bindings_wheel/tensorrt/__init__.py``: the pure-Python module
  functions (``nptype``, ``volume``, ...).

Every name is stored with the file and line it was read from, so the data cites its source.

Usage: python tests/emulation/extract_tensorrt_api.py /path/to/TensorRT-mirror v10.0.1 v10.16 v11.1
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BINDINGS = (
    "python/src/infer/pyCore.cpp",
    "python/src/infer/pyGraph.cpp",
    "python/src/infer/pyFoundationalTypes.cpp",
    "python/src/parsers/pyOnnx.cpp",
)
PACKAGE_INIT = "python/packaging/bindings_wheel/tensorrt/__init__.py"
OUT = Path(__file__).with_name("data") / "tensorrt_api.json"

_MEMBER = re.compile(r'\.(def|def_property|def_property_readonly|def_readwrite|def_readonly|def_static|def_property_static)\(\s*"(\w+)"')
_VALUE = re.compile(r'\.value\(\s*"(\w+)"\s*,\s*([\w:]+)')
_MODULE_ATTR = re.compile(r'\bm\.(attr|def)\(\s*"(\w+)"\s*\)?\s*(?:=\s*([\w:]+))?')


def git_show(repo: Path, tag: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "show", f"{tag}:{path}"], capture_output=True, text=True, check=True).stdout


def git_ls(repo: Path, tag: str, folder: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), "ls-tree", "--name-only", f"{tag}:{folder}"], capture_output=True, text=True, check=True).stdout
    return [f"{folder}/{name}" for name in out.split()]


def _strip_comments(text: str) -> str:
    """Blank out // and /* */ comments and the contents of string literals, keeping offsets (and so line numbers)."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out[i:j] = " " * (j - i)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out[i:j] = [ch if ch == "\n" else " " for ch in text[i:j]]
            i = j
        elif text.startswith('R"trtdoc(', i):
            j = text.find(')trtdoc"', i)
            j = n if j < 0 else j + len(')trtdoc"')
            out[i:j] = [ch if ch == "\n" else " " for ch in text[i:j]]
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            i = j + 1  # keep string contents: member names live in them
        elif c == "'":
            j = i + 1
            while j < n and text[j] != "'":
                j += 2 if text[j] == "\\" else 1
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _statement_end(code: str, start: int) -> int:
    """Index of the ';' ending the statement that starts at ``start`` (brackets balanced, strings skipped)."""
    depth, i, n = 0, start, len(code)
    while i < n:
        c = code[i]
        if c == '"':
            i += 1
            while i < n and code[i] != '"':
                i += 2 if code[i] == "\\" else 1
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == ";" and depth <= 0:
            return i
        i += 1
    return n


def _template_end(code: str, start: int) -> int:
    """Index just past the '>' closing the template argument list opened at ``start`` ('<')."""
    depth, i = 0, start
    while i < len(code):
        if code[i] == "<":
            depth += 1
        elif code[i] == ">":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced template arguments")


def _line(code: str, offset: int) -> int:
    return code.count("\n", 0, offset) + 1


def header_enums(repo: Path, tag: str) -> dict[str, dict[str, dict[str, int]]]:
    """``{EnumName: {header: {kENUMERATOR: value}}}`` from every ``enum class`` in include/*.h (aliases resolved)."""
    enums: dict[str, dict[str, dict[str, int]]] = {}
    for path in git_ls(repo, tag, "include"):
        if not path.endswith(".h"):
            continue
        code = _strip_comments(git_show(repo, tag, path))
        for m in re.finditer(r"\benum\s+class\s+(\w+)\s*(?::\s*[\w:]+)?\s*\{([^}]*)\}", code):
            name, body = m.group(1), m.group(2)
            values: dict[str, int] = {}
            nxt = 0
            for item in body.split(","):
                item = item.replace("TRT_DEPRECATED_ENUM", " ").strip()
                if not item:
                    continue
                key, _, rhs = (s.strip() for s in item.partition("="))
                key = key.split()[0]
                if rhs:
                    rhs = rhs.replace("U", "") if re.fullmatch(r"\d+U", rhs) else rhs
                    try:
                        value = int(eval(rhs, {}, dict(values)))  # noqa: S307 - integer literals, shifts and earlier enumerators from NVIDIA's headers
                    except Exception:  # noqa: BLE001 - an expression we cannot evaluate: leave the enumerator unknown
                        continue
                else:
                    value = nxt
                values[key] = value
                nxt = value + 1
            enums.setdefault(name, {})[path] = values
    return enums


def _enum_values(enum_values: dict[str, dict[str, dict[str, int]]], name: str, binding: str) -> dict[str, int]:
    """The enumerators of ``name``; the ONNX parser's bindings prefer its own header (its ErrorCode is not nvinfer1's)."""
    found = enum_values.get(name, {})
    preferred = "include/NvOnnxParser.h" if binding.endswith("pyOnnx.cpp") else None
    if preferred in found:
        return found[preferred]
    others = [v for k, v in sorted(found.items()) if k != "include/NvOnnxParser.h"]
    return others[0] if others else {}


def bindings(repo: Path, tag: str, path: str, enum_values: dict[str, dict[str, dict[str, int]]]) -> tuple[dict, dict, dict]:
    """Classes, enums and module attributes bound in one pybind11 source file."""
    code = _strip_comments(git_show(repo, tag, path))
    classes: dict[str, dict] = {}
    enums: dict[str, dict] = {}
    module: dict[str, dict] = {}
    variables: dict[str, str] = {}  # a binding held in a C++ variable -> its Python class name

    for m in re.finditer(r"py::(class_|enum_)<", code):
        kind = m.group(1)
        close = _template_end(code, m.end() - 1)
        cxx = code[m.end() : close - 1].split(",")[0].strip()
        head = re.match(r'\s*(\w+)?\s*[({]\s*(\w+)\s*,\s*"(\w+)"', code[close:])
        if head is None:
            continue
        var, parent, pyname = head.groups()
        qual = pyname if parent == "m" else f"{variables.get(parent, parent)}.{pyname}"
        end = _statement_end(code, close)
        body = code[close:end]
        entry = {"source": path, "line": _line(code, m.start())}
        if kind == "class_":
            members = {mm.group(2): {"kind": mm.group(1), "line": _line(code, close + mm.start())} for mm in _MEMBER.finditer(body)}
            classes.setdefault(qual, {**entry, "members": {}})["members"].update(members)
            if var:
                variables[var] = qual
        else:
            cxx_enum = cxx.split("::")[-1]
            known = _enum_values(enum_values, cxx_enum, path)
            members = {}
            for mm in _VALUE.finditer(body):
                enumerator = mm.group(2).split("::")[-1]
                members[mm.group(1)] = {"value": known.get(enumerator), "line": _line(code, close + mm.start())}
            enums[qual] = {**entry, "members": members}
    # statements on a held binding: `var.def("name", ...)`
    for var, qual in variables.items():
        for m in re.finditer(rf"\b{re.escape(var)}\s*\.", code):
            end = _statement_end(code, m.start())
            for mm in _MEMBER.finditer(code[m.start() : end]):
                classes[qual]["members"].setdefault(mm.group(2), {"kind": mm.group(1), "line": _line(code, m.start() + mm.start())})
    for m in _MODULE_ATTR.finditer(code):
        value = m.group(3)
        entry = {"source": path, "line": _line(code, m.start()), "kind": m.group(1)}
        if value and "::" in value:
            entry["value"] = value.split("::")[-1]
        module[m.group(2)] = entry
    return classes, enums, module


def python_functions(repo: Path, tag: str) -> dict[str, dict]:
    text = git_show(repo, tag, PACKAGE_INIT)
    return {m.group(1): {"source": PACKAGE_INIT, "line": _line(text, m.start()), "kind": "python"} for m in re.finditer(r"^def (\w+)\(", text, re.M) if not m.group(1).startswith("_")}


def extract(repo: Path, tag: str) -> dict:
    commit = subprocess.run(["git", "-C", str(repo), "rev-list", "-n1", tag], capture_output=True, text=True, check=True).stdout.strip()
    values = header_enums(repo, tag)
    classes: dict = {}
    enums: dict = {}
    module: dict = {}
    for path in BINDINGS:
        c, e, m = bindings(repo, tag, path, values)
        classes.update(c)
        enums.update(e)
        module.update(m)
    module.update(python_functions(repo, tag))
    version = tag.lstrip("v")
    return {"tag": tag, "commit": commit, "version": version if version.count(".") == 2 else f"{version}.0", "classes": classes, "enums": enums, "module": module}


def main(argv: list[str]) -> None:
    repo, tags = Path(argv[1]), argv[2:]
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for tag in tags:
        data[tag] = extract(repo, tag)
        print(f"{tag}: {len(data[tag]['classes'])} classes, {len(data[tag]['enums'])} enums, {len(data[tag]['module'])} module names")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv)
