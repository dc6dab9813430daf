"""Per-user cache and config folders, by each platform's convention.

Linux follows the XDG Base Directory spec (``$XDG_CACHE_HOME`` / ``$XDG_CONFIG_HOME``,
relative values ignored as the spec says); macOS uses ``~/Library/Caches`` and
``~/Library/Application Support``; Windows uses ``%LOCALAPPDATA%``. The same
conventions as the ``platformdirs`` package, without the dependency.
``TRT_BGSWAP_HOME`` overrides all of them (``$TRT_BGSWAP_HOME/cache`` and
``$TRT_BGSWAP_HOME/config``), for appliances that keep everything in one place.

Layout of the cache folder::

    models/<name>/   exported ONNX folders (``default_export_dir``)
    engines/         TensorRT plans and optimized ORT graphs

The Hugging Face hub cache is not ours: ``hub_cache_dir`` finds it the way
``huggingface_hub.constants`` does, but from the environment at call time, so
downloads and ``cache_report`` agree even if the environment changed after import.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

APP_NAME = "trt-bgswap"
HOME_ENV = "TRT_BGSWAP_HOME"
DEFAULT_EXPORT_NAME = "default"


def _home_override() -> Path | None:
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser().absolute() if home else None


def _xdg(var: str, fallback: str) -> Path:
    """An XDG base folder; the spec says relative values are invalid and must be ignored."""
    value = os.environ.get(var, "")
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def _windows_local_appdata() -> Path:
    value = os.environ.get("LOCALAPPDATA", "")
    return Path(value) if value else Path.home() / "AppData" / "Local"


def _user_dir(kind: str, platform: str | None, macos_library: str, xdg_var: str, xdg_fallback: str) -> Path:
    """``$TRT_BGSWAP_HOME/<kind>``, else the platform's per-user folder for ``kind`` ("cache" or "config")."""
    override = _home_override()
    if override is not None:
        return override / kind
    platform = platform or sys.platform
    if platform == "darwin":
        return Path.home() / "Library" / macos_library / APP_NAME
    if platform.startswith("win"):
        return _windows_local_appdata() / APP_NAME / kind.capitalize()
    return _xdg(xdg_var, xdg_fallback) / APP_NAME


def cache_dir(platform: str | None = None) -> Path:
    """Where exported models and engines go unless the user says otherwise."""
    return _user_dir("cache", platform, "Caches", "XDG_CACHE_HOME", ".cache")


def config_dir(platform: str | None = None) -> Path:
    """Small per-user state (e.g. which licence notices were already shown)."""
    return _user_dir("config", platform, "Application Support", "XDG_CONFIG_HOME", ".config")


def models_dir() -> Path:
    return cache_dir() / "models"


def default_export_dir(name: str = DEFAULT_EXPORT_NAME) -> Path:
    """The exported-model folder `export` writes and `run` reads when no folder is given."""
    return models_dir() / name


def engines_dir() -> Path:
    return cache_dir() / "engines"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved like ``huggingface_hub.constants.HF_HUB_CACHE``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = os.environ.get(var)
        if value:
            return Path(os.path.expandvars(os.path.expanduser(value)))
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    return Path(os.path.expandvars(os.path.expanduser(hf_home))) / "hub"


def hub_repo_dir(repo_id: str, cache: Path | None = None) -> Path:
    """``models--org--name``: the hub cache's folder for one model repo."""
    return (cache if cache is not None else hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def tree_size(path: Path) -> int:
    """Bytes on disk under ``path``; symlinks are not followed, so hub snapshots are not counted twice."""
    if path.is_symlink():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if not os.path.islink(p):
                total += st.st_size
    return total


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    size: int  # bytes
    kind: str  # "model" | "engines" | "hub" | "other"


@dataclass
class CacheReport:
    root: Path
    hub_cache: Path
    entries: list[CacheEntry] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(e.size for e in self.entries)


def cache_report(root: Path | None = None, hub_repos: tuple[str, ...] | None = None) -> CacheReport:
    """What `trt-bgswap info` shows: each exported model, the engine cache, and our models in the hub cache.

    ``hub_repos`` defaults to the registry's repo ids; other hub repos are not ours to report.
    """
    root = root if root is not None else cache_dir()
    hub = hub_cache_dir()
    report = CacheReport(root=root, hub_cache=hub)
    models = root / "models"
    if models.is_dir():
        for child in sorted(models.iterdir()):
            report.entries.append(CacheEntry(child, tree_size(child), "model"))
    engines = root / "engines"
    if engines.is_dir():
        report.entries.append(CacheEntry(engines, tree_size(engines), "engines"))
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.name not in ("models", "engines"):
                report.entries.append(CacheEntry(child, tree_size(child), "other"))
    if hub_repos is None:
        from trt_bgswap.registry import VARIANTS

        hub_repos = tuple(sorted({v.repo_id for v in VARIANTS.values()}))
    for repo_id in hub_repos:
        repo = hub_repo_dir(repo_id, hub)
        if repo.is_dir():
            report.entries.append(CacheEntry(repo, tree_size(repo), "hub"))
    return report
