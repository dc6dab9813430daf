"""pytest fixtures for the emulation (imported by tests/conftest.py so every test module can use them).

``emulated`` installs one :data:`~emulation.install.STACKS` entry per parametrized test id
(``trt10.0.1-cu12-...``, ``trt10.16.0-cu13-...``, ``trt11.1.0-cu13-...``); a test that needs
another combination (an old driver, another cuda-bindings) uses :func:`emulation.emulate`
directly.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from emulation.install import STACKS, Emulation, StackSpec, emulate


@pytest.fixture(params=STACKS, ids=lambda s: s.id)
def emulated_stack(request: pytest.FixtureRequest) -> StackSpec:
    return request.param


@pytest.fixture()
def emulated(emulated_stack: StackSpec) -> Iterator[Emulation]:
    """The emulated TensorRT + cuda-python of ``emulated_stack``, importable as ``tensorrt`` / ``cuda`` during the test."""
    with emulate(emulated_stack) as emulation:
        yield emulation
