"""The API surface of each emulated release, read from ``data/*.json``, and the rules that enforce it.

``data/tensorrt_api.json`` is derived from NVIDIA's pybind11 binding sources per TensorRT
tag (``extract_tensorrt_api.py``); ``data/cuda_api.json`` from NVIDIA's cuda-bindings wheels
(``extract_cuda_api.py``). Every name carries the file and line (or wheel) it came from.

An emulated class offers exactly its release's names: a name the release lacks raises
``AttributeError`` (so ``hasattr`` is False, as on the real module); a name the release has
but the emulation does not model raises :class:`NotEmulated` when used, so a test can never
pass by touching an API the emulation only pretends to have.
"""

from __future__ import annotations

import enum
import functools
import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("data")


class EmulationError(AssertionError):
    """The code under test did something the emulated library forbids or cannot honour (a test failure, never caught)."""


class UndocumentedBehaviour(EmulationError):
    """The code under test relies on behaviour NVIDIA does not document; the emulation refuses to guess."""


class NotEmulated(EmulationError):
    """The release has this API, but the emulation does not model it: extend the emulation before relying on it."""


class Hazard(EmulationError):
    """A data race or use-after-free the real device would turn into wrong results or a crash."""


@functools.cache
def tensorrt_releases() -> dict[str, dict]:
    """``{version: api}`` for every extracted TensorRT tag (version as ``trt.__version__`` prints it)."""
    raw = json.loads((DATA / "tensorrt_api.json").read_text())
    return {entry["version"]: entry for entry in raw.values()}


@functools.cache
def cuda_releases() -> dict[str, dict]:
    """``{version: api}`` for every introspected cuda-bindings wheel."""
    return json.loads((DATA / "cuda_api.json").read_text())


def cite(entry: dict, tag: str) -> str:
    """``file@tag:line`` of one extracted name."""
    return f"{entry['source']}@{tag}:{entry['line']}"


class _Missing:
    """A name this release does not have: reading it raises ``AttributeError``, like the real binding."""

    def __init__(self, owner: str, name: str, release: str) -> None:
        self.owner, self.name, self.release = owner, name, release

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        raise AttributeError(f"'{self.owner}' has no attribute '{self.name}' in {self.release}")

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"'{self.owner}' has no attribute '{self.name}' in {self.release}")


class _Unmodelled:
    """A name this release has that the emulation does not model: any use raises :class:`NotEmulated`."""

    def __init__(self, owner: str, name: str, kind: str, where: str) -> None:
        self.owner, self.name, self.kind, self.where = owner, name, kind, where

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise NotEmulated(f"{self.owner}.{self.name} ({self.where}) exists in this release but is not emulated")

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if self.kind in ("def", "def_static"):
            return self._fail
        return self._fail()

    def __set__(self, obj: Any, value: Any) -> None:
        self._fail()


def restrict(impl: type, pyname: str, members: dict[str, dict], release: str, where: str, module: str = "tensorrt") -> type:
    """A subclass of ``impl`` named ``pyname`` exposing exactly ``members`` (name -> {kind, line})."""
    cls = type(pyname, (impl,), {"__module__": module, "__qualname__": pyname})
    public = {n for n in dir(impl) if not n.startswith("_")} | set(getattr(impl, "_attrs", ()))
    for name in {n for n in dir(impl) if not n.startswith("_")} - set(members):
        setattr(cls, name, _Missing(f"{module}.{pyname}", name, release))
    for name, info in members.items():
        if name.startswith("_"):
            continue
        if name not in public:
            setattr(cls, name, _Unmodelled(f"{module}.{pyname}", name, info.get("kind", "def"), f"{where}:{info.get('line')}"))
    return cls


class _BindingEnum(enum.IntEnum):
    """Prints like a pybind11 / cuda-python enum member (``DataType.FLOAT``), compares like an int."""

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


def int_enum(name: str, members: dict[str, int | None], module: str) -> type[enum.IntEnum]:
    """An ``IntEnum`` with the release's members and values (members whose value was not found get the next free ones)."""
    known = {k: v for k, v in members.items() if v is not None}
    nxt = max(known.values(), default=-1) + 1
    values = {}
    for key in members:
        if members[key] is None:
            values[key] = nxt
            nxt += 1
        else:
            values[key] = members[key]
    # several names may share a value (deprecated aliases such as BuilderFlag.WEIGHTLESS = STRIP_PLAN): IntEnum keeps them as aliases
    ordered = sorted(values.items(), key=lambda kv: (kv[1], kv[0]))
    cls = _BindingEnum(name, ordered, module=module)  # type: ignore[misc]
    cls.__qualname__ = name
    return cls
