"""Layers point one way, read from the source (AST), every import counted - also those inside functions.

core (specs, manifest, errors, ...) <- runtime <- engines / export / training <- CLI / API / server / benchmarking.

- a module imports only its own layer or the ones below it (engines, export and training do not import each other);
- no import cycle between modules, anywhere in the product;
- nothing reachable from the runtime (or the core) imports torch, diffusers, transformers or peft.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> folder, as pyproject.toml's package-dir maps them
PACKAGE_DIRS = {
    "trt_bgswap": ROOT / "src" / "trt_bgswap",
    "trt_bgswap.runtime": ROOT / "runtime",
    "trt_bgswap.engines": ROOT / "engines",
    "trt_bgswap.export": ROOT / "export",
    "trt_bgswap.training": ROOT / "training",
}
MIDDLE = ("engines", "export", "training")  # peers above the runtime: none imports another
CORE = {"trt_bgswap", "trt_bgswap.specs", "trt_bgswap.manifest", "trt_bgswap.errors", "trt_bgswap.atomic", "trt_bgswap.registry", "trt_bgswap.colors", "trt_bgswap.paths", "trt_bgswap.build_index", "trt_bgswap.onnx_graph", "trt_bgswap.memory", "trt_bgswap.attention_pattern", "trt_bgswap.mixed_precision", "trt_bgswap.families", "trt_bgswap.graph_parts"}
RANK = {"core": 0, "runtime": 1, "engines": 2, "export": 2, "training": 2, "top": 3}
HEAVY = ("torch", "diffusers", "transformers", "peft")


def layer(module: str) -> str:
    if module in CORE:
        return "core"
    for name in ("runtime", *MIDDLE):
        if module == f"trt_bgswap.{name}" or module.startswith(f"trt_bgswap.{name}."):
            return name
    return "top"


def product_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "trt_bgswap" and parts and parts[0] in ("runtime", *MIDDLE):
                continue  # mapped from the top-level folders
            found[name] = path
    return found


MODULES = product_modules()


def imports_of(path: Path, module: str) -> Iterator[tuple[str, int]]:
    """Every module an import statement names (module-level or inside functions), with its line."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from trt_bgswap.cli import batch` imports the module batch; `from trt_bgswap.specs import X` the module specs.
                # (Python also runs a package's __init__ before any of its modules; like `import a.b`, that is not an edge here.)
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), node.lineno


def product_target(name: str) -> str | None:
    """The product module an imported name resolves to (a module, or the package of an imported attribute)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


MISSING: list[str] = []
for _mod, _path in MODULES.items():
    for _name, _line in imports_of(_path, _mod):
        if _name.startswith("trt_bgswap") and _name not in MODULES:
            MISSING.append(f"{_mod} line {_line}: {_name}")

GRAPH: dict[str, set[str]] = {}
EXTERNAL: dict[str, set[str]] = {}
LINES: dict[tuple[str, str], int] = {}
for _mod, _path in MODULES.items():
    GRAPH[_mod], EXTERNAL[_mod] = set(), set()
    for _name, _line in imports_of(_path, _mod):
        _target = product_target(_name) if _name.startswith("trt_bgswap") else None
        if _target is not None and _target != _mod:
            GRAPH[_mod].add(_target)
            LINES.setdefault((_mod, _target), _line)
        elif not _name.startswith("trt_bgswap"):
            EXTERNAL[_mod].add(_name.split(".")[0])


def test_the_walk_sees_the_product() -> None:
    """Precondition: the modules and edges this test reasons about exist (a broken walk would pass everything)."""
    assert {"trt_bgswap.specs", "trt_bgswap.runtime.pipeline", "trt_bgswap.engines.build", "trt_bgswap.export.exporter", "trt_bgswap.cli.main"} <= set(MODULES)
    assert "trt_bgswap.runtime.engine" in GRAPH["trt_bgswap.runtime.pipeline"] | GRAPH["trt_bgswap.runtime.assemble"]
    assert "torch" in EXTERNAL["trt_bgswap.export.exporter"] | EXTERNAL["trt_bgswap.export.onnx_export"]


def test_every_product_import_names_a_module() -> None:
    """A moved or deleted module is caught here even when the import sits in a function no test calls."""
    assert not MISSING, f"imports of modules that do not exist: {MISSING}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    mine = layer(module)
    wrong = []
    for target in sorted(GRAPH[module]):
        theirs = layer(target)
        upward = RANK[theirs] > RANK[mine]
        sideways = mine != theirs and mine in MIDDLE and theirs in MIDDLE
        if upward or sideways:
            wrong.append(f"{target} ({theirs}, line {LINES[(module, target)]})")
    assert not wrong, f"{module} ({mine}) imports against the layers: {wrong}"


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the whole product's import graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def reachable(start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for w in GRAPH[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) in ("core", "runtime")))
def test_no_heavy_stack_reachable_from_the_runtime(module: str) -> None:
    heavy = {f"{m} imports {x}" for m in reachable(module) for x in EXTERNAL[m] if x in HEAVY}
    assert not heavy, f"{module} reaches the heavy stack: {sorted(heavy)}"
