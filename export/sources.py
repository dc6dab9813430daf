"""Model sources: a local file or folder, a Hugging Face hub id (``org/name[@revision]``) or a registry variant.

Hub downloads go through ``huggingface_hub.snapshot_download`` and its cache
(the layout ``models--org--name/{refs,snapshots/<commit>,blobs}``), which gives
progress bars, resumable ``.incomplete`` downloads and offline look-ups for free.
Only the files a variant lists in `trt_bgswap.registry` are fetched (safetensors,
configs, tokenizer), so pickled checkpoints never reach the disk; a local folder
holding only pickles is refused unless the user opts in, because unpickling runs
arbitrary code (the reason the safetensors format exists).

``huggingface_hub`` is imported lazily: it is part of the ``export`` extra.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from trt_bgswap import paths
from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.errors import BackendUnavailable, BgSwapError, ModelError, UsageError
from trt_bgswap.registry import DEFAULTS, VARIANTS, Variant, get_variant

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MODEL_SUFFIXES = (".onnx", ".safetensors", ".json", *PICKLE_SUFFIXES)
# For hub ids outside the registry: configs, tokenizer files and safetensors weights only.
GENERIC_PATTERNS = ("*.json", "*.txt", "*.model", "*.safetensors")
# The CLI option that takes each family, for messages that tell the user what to pass.
FAMILY_OPTION = {"rmbg": "--rmbg", "sd-inpainting": "--inpaint", "lcm-lora": "--lcm-lora", "tiny-vae": "--taesd"}
NOTICES_FILE = "licence-notices.json"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Source:
    """Where a model was found; the hub fields feed the export manifest's provenance."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None  # what was asked for (branch, tag or commit)
    commit: str | None = None  # what it resolved to (the snapshot folder's name)
    variant: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "path": str(self.path),
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "variant": self.variant,
        }


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline_mode(offline: bool = False) -> bool:
    """Offline if asked, or if ``HF_HUB_OFFLINE`` says so (read now, not at huggingface_hub's import)."""
    return offline or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _option(family: str | None) -> str:
    return FAMILY_OPTION.get(family or "", "the model option")


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def download_patterns(variant: Variant | None, family: str | None, allow_pickle: bool) -> list[str]:
    """``allow_patterns`` for snapshot_download: the variant's files (or the family default's), plus pickles if allowed."""
    if variant is None and family in DEFAULTS:
        variant = VARIANTS[DEFAULTS[family]]
    patterns = list(variant.files) if variant is not None else list(GENERIC_PATTERNS)
    if allow_pickle:
        folders = sorted({os.path.dirname(p) for p in patterns if p.endswith(".safetensors")})
        for folder in folders:
            patterns += [f"{folder}/*{ext}" if folder else f"*{ext}" for ext in PICKLE_SUFFIXES]
    return patterns


def _check_pickles(path: Path, allow_pickle: bool, label: str) -> None:
    """Refuse weights that exist only as pickles: loading them runs arbitrary code."""
    if allow_pickle:
        return
    hint = "convert them to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust the source"
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelError(f"{label}: {path.name} is a pickled checkpoint, which can run code when loaded; {hint}")
        return
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        pickled = sorted(f for f in files if Path(f).suffix.lower() in PICKLE_SUFFIXES)
        if pickled and not any(f.endswith(".safetensors") for f in files):
            rel = Path(root).relative_to(path) / pickled[0]
            raise ModelError(f"{label}: {rel} has no safetensors counterpart and pickled weights can run code when loaded; {hint}")


def _check_complete(folder: Path, variant: Variant, allow_pickle: bool, label: str) -> None:
    """A snapshot can be partial (interrupted download, older cache); say which files are missing."""
    missing = []
    for pattern in variant.files:
        found = any(folder.glob(pattern)) if _is_glob(pattern) else (folder / pattern).exists()
        if not found and allow_pickle and pattern.endswith(".safetensors"):
            parent = (folder / pattern).parent
            found = parent.is_dir() and any(p.suffix.lower() in PICKLE_SUFFIXES for p in parent.iterdir())
        if not found:
            missing.append(pattern)
    if missing:
        raise ModelError(
            f"{label}: the cached snapshot {folder} is missing {', '.join(missing)}; "
            f"run again with network access to complete it (the download resumes)"
        )


def _load_notices(path: Path) -> set[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(n) for n in data.get("shown", [])}
    except (OSError, ValueError, AttributeError):
        return set()


def licence_notice(variant: Variant) -> bool:
    """Log a non-commercial / gated variant's licence once per user; True if it was shown now."""
    if variant.commercial_use and not variant.gated:
        return False
    state = paths.config_dir() / NOTICES_FILE
    shown = _load_notices(state)
    if variant.name in shown:
        return False
    terms = "not licensed for commercial use" if not variant.commercial_use else "licensed"
    log.warning(
        "licence: %s (%s) is %s under %s. %s (shown once; remembered in %s)",
        variant.name,
        variant.repo_id,
        terms,
        variant.license,
        variant.note,
        state,
    )
    try:
        write_text_atomic(state, json.dumps({"shown": sorted(shown | {variant.name})}, indent=1) + "\n")
    except OSError as e:
        log.debug("could not remember the licence notice in %s: %s", state, e)
    return True


def _parse(source: str, family: str | None) -> tuple[Variant | None, str, str | None]:
    """(variant or None, repo id, revision from ``@rev`` or None); an unknown name lists the valid ones."""
    base, at, rev = source.partition("@")
    if at and not rev:
        raise UsageError(f"{source!r}: nothing after '@'; write org/name@REVISION (a branch, tag or commit)")
    variant: Variant | None = None
    if base in VARIANTS or any(v.repo_id == base for v in VARIANTS.values()):
        variant = get_variant(base)
    elif not _HUB_ID.fullmatch(base):
        looks_like_path = (
            os.sep in source or "/" in source or source.startswith((".", "~")) or Path(source).suffix.lower() in MODEL_SUFFIXES
        )
        if looks_like_path:
            raise ModelError(f"{source}: no such file or folder; check the path")
        names = ", ".join(sorted(v.name for v in VARIANTS.values() if family is None or v.family == family))
        raise UsageError(f"unknown model {source!r}; choose one of {names}, a hub id (org/name[@revision]) or a local path")
    if variant is not None and family is not None and variant.family != family:
        names = ", ".join(sorted(v.name for v in VARIANTS.values() if v.family == family))
        raise UsageError(f"{_option(family)} {source}: {variant.name} is a {variant.family} model; give one of {names}")
    repo_id = variant.repo_id if variant is not None else base
    return variant, repo_id, (rev or None)


def _hub_error(
    e: Exception, repo_id: str, revision: str, family: str | None, offline: bool, cache: Path
) -> BgSwapError:
    """One clear message per way a hub download fails."""
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    option = _option(family)
    fallback = f"point {option} at a local folder, or run `trt-bgswap tiny-models DIR` for an offline smoke test"
    detail = " ".join(str(e).split())[:300]
    if isinstance(e, HFValidationError):
        return UsageError(f"{option} {repo_id}: not a valid hub id ({detail}); write org/name[@revision] or give a local path")
    if isinstance(e, GatedRepoError) or (
        isinstance(e, HfHubHTTPError) and getattr(e.response, "status_code", None) in (401, 403) and not isinstance(e, RepositoryNotFoundError)
    ):
        return ModelError(
            f"cannot download {repo_id}: access denied (gated or private model); accept its licence on "
            f"https://huggingface.co/{repo_id} and log in with `huggingface-cli login` (or set HF_TOKEN), or {fallback}"
        )
    if isinstance(e, RepositoryNotFoundError):
        return ModelError(
            f"cannot download {repo_id}: no such model on the hub, no local path of that name either "
            f"(or it is private: log in with `huggingface-cli login`); check the id, or {fallback}"
        )
    if isinstance(e, RevisionNotFoundError):
        return ModelError(f"cannot download {repo_id}@{revision}: no such revision; use a branch, tag or commit that exists (e.g. main)")
    if isinstance(e, LocalEntryNotFoundError):
        cause = e.__cause__ or e.__context__
        if offline or isinstance(cause, OfflineModeIsEnabled):
            return ModelError(
                f"cannot find {repo_id}@{revision} in the hub cache {cache} and offline mode is on "
                f"(--offline / HF_HUB_OFFLINE=1); download it once with network access, or {fallback}"
            )
        why = " ".join(str(cause).split())[:200] if cause is not None else detail
        if isinstance(cause, HfHubHTTPError):
            return ModelError(f"cannot download {repo_id}: the hub answered with an error ({why}); try again later, or {fallback}")
        return ModelError(f"cannot download {repo_id}: no network ({why}); {fallback}")
    if isinstance(e, HfHubHTTPError):
        return ModelError(f"cannot download {repo_id}: the hub answered with an error ({detail}); try again later, or {fallback}")
    if isinstance(e, OSError):
        return ModelError(f"cannot download {repo_id} into {cache}: {detail}; check free space and permissions, or set HF_HUB_CACHE")
    return ModelError(f"cannot download {repo_id}: {type(e).__name__}: {detail}; {fallback}")


def _download(
    repo_id: str,
    revision: str,
    patterns: list[str],
    cache: Path,
    offline: bool,
    token: str | bool | None,
    endpoint: str | None,
    family: str | None,
) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise BackendUnavailable(
            f"downloading {repo_id} needs huggingface_hub ({e}); pip install 'trt-bgswap[export]', or give a local folder"
        ) from None
    log.info("resolving %s@%s (%s) in %s", repo_id, revision, "offline" if offline else "online", cache)
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            allow_patterns=patterns,
            local_files_only=offline,
            token=token,
            endpoint=endpoint,
        )
    except Exception as e:  # noqa: BLE001 - every failure becomes one message naming the fix
        raise _hub_error(e, repo_id, revision, family, offline, cache) from e
    return Path(folder)


def resolve(
    source: str | os.PathLike[str],
    family: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
    allow_pickle: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> Source:
    """A local path as given (checked for pickles), or a hub snapshot folder (downloaded or cached).

    ``family`` ("rmbg", "sd-inpainting", "lcm-lora", "tiny-vae") picks the file list for hub ids
    outside the registry and checks registry names belong to it. ``revision`` overrides
    the registry's pin; ``org/name@rev`` in ``source`` does the same. ``endpoint`` is the
    hub URL (default: ``HF_ENDPOINT``).
    """
    text = os.fspath(source)
    local = Path(text).expanduser()
    if isinstance(source, os.PathLike) or local.exists():
        if not local.exists():
            raise ModelError(f"{text}: no such file or folder; check the path")
        _check_pickles(local, allow_pickle, text)
        log.info("using local model %s", local)
        return Source(path=local)
    variant, repo_id, at_rev = _parse(text, family)
    if revision is not None and at_rev is not None and revision != at_rev:
        raise UsageError(f"{text}: revision {at_rev!r} conflicts with revision={revision!r}; give one")
    rev = revision or at_rev or (variant.revision if variant is not None else "main")
    if variant is not None:
        licence_notice(variant)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else paths.hub_cache_dir()
    is_offline = offline_mode(offline)
    folder = _download(repo_id, rev, download_patterns(variant, family, allow_pickle), cache, is_offline, token, endpoint, family)
    label = f"{repo_id}@{rev}"
    if variant is not None:
        _check_complete(folder, variant, allow_pickle, label)
    elif not any(folder.iterdir()):
        raise ModelError(f"{label}: the download matched no files ({', '.join(download_patterns(None, family, allow_pickle))}); check the id and family")
    _check_pickles(folder, allow_pickle, label)
    commit = folder.name if _COMMIT.fullmatch(folder.name) else None
    return Source(path=folder, repo_id=repo_id, revision=rev, commit=commit, variant=variant.name if variant else None)
