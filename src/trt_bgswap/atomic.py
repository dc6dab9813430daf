"""Atomic file writes: a crash or an error never leaves a partial output or cache entry.

Write to a temporary file in the destination folder, then ``os.replace`` it over
the target (atomic on POSIX and Windows within one filesystem).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-global, not safe to toggle from threads


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``target``; rename it over ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix if suffix is not None else ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes owner-only files; give the result the permissions a plain open() would
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def make_staging_dir(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new temporary folder in ``parent``, to be renamed into place, with the permissions a plain mkdir gives.

    ``tempfile.mkdtemp`` makes owner-only (0700) folders; a finished export renamed from one
    would stay unreadable to the other users of an appliance.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_UMASK)
    return path


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def existing_ancestor(folder: Path) -> Path:
    """``folder`` itself or its nearest ancestor that exists (where a later mkdir will create it)."""
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def require_free_space(folder: str | os.PathLike[str], need: int, what: str, fix: str) -> None:
    """Refuse work whose files cannot fit before it starts.

    Some writers do not report a full disk: onnx's C++ ``infer_shapes_path`` leaves an empty file,
    which then loads as an empty model; so the space is checked up front instead.
    """
    free = shutil.disk_usage(existing_ancestor(Path(folder))).free
    if need > free:
        from trt_bgswap.errors import OutputError

        raise OutputError(
            f"{folder}: {what} needs about {need / 2**20:.0f} MiB but only {free / 2**20:.0f} MiB are free there; {fix}"
        )
