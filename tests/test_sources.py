"""Model sources without a network: local paths, a hub cache laid out here exactly as huggingface_hub
lays it out (checked with huggingface_hub's own cache functions), offline mode, pinned revisions,
pickle refusal, licence notices, and every download failure turned into one clear message.

Network failures use 127.0.0.1 only: a closed port (no network) or a tiny local HTTP server
answering like the hub does for gated / missing repos (status code + X-Error-Code header).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

from huggingface_hub import constants as hf_constants  # noqa: E402
from huggingface_hub import scan_cache_dir, try_to_load_from_cache  # noqa: E402

from trt_bgswap.errors import ModelError, UsageError  # noqa: E402
from trt_bgswap.export import sources  # noqa: E402
from trt_bgswap.registry import VARIANTS, get_variant  # noqa: E402

COMMIT = "a" * 40
OTHER_COMMIT = "b" * 40


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Our config (licence notices) in tmp_path; no offline switch inherited from the environment."""
    monkeypatch.setenv("TRT_BGSWAP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "default-hub-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # huggingface_hub read HF_HUB_OFFLINE at import; a CI that exports it must not change what these tests see
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


def concrete_files(patterns: tuple[str, ...]) -> list[str]:
    """One real file name per registry pattern (globs as the real repos fill them)."""
    fill = {"scheduler/*.json": "scheduler/scheduler_config.json", "tokenizer/*": "tokenizer/vocab.json"}
    return [fill.get(p, p) for p in patterns]


def make_hub_cache(
    cache: Path, repo_id: str, files: list[str], commit: str = COMMIT, ref: str | None = "main", contents: Mapping[str, bytes] | None = None,
) -> Path:
    """``models--org--name/{refs/<ref>, snapshots/<commit>/<file> -> ../../blobs/<hash>, blobs/<hash>}``.

    ``contents``: the real bytes of some files (e.g. a model's weights); the others hold a short marker."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # the hub writes the bare hash, no newline
    snapshot = repo / "snapshots" / commit
    for rel in files:
        content = (contents or {}).get(rel, f"{repo_id}:{rel}".encode())
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_network() -> str:
    return f"http://127.0.0.1:{closed_port()}"


# ---------------------------------------------------------------- the hub cache layout


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_offline_resolution_finds_the_hub_cache(tmp_path: Path, name: str, no_network: str) -> None:
    v = VARIANTS[name]
    cache = tmp_path / "hub"
    files = concrete_files(v.files)
    snapshot = make_hub_cache(cache, v.repo_id, files)

    got = sources.resolve(name, v.family, offline=True, cache_dir=cache, endpoint=no_network)

    assert got.path == snapshot
    assert (got.repo_id, got.revision, got.commit, got.variant) == (v.repo_id, v.revision, COMMIT, name)
    # huggingface_hub's own functions read the same layout: the cache is the real thing
    for rel in files:
        assert try_to_load_from_cache(v.repo_id, rel, cache_dir=cache, revision=v.revision) == str(snapshot / rel)
    info = {r.repo_id: r for r in scan_cache_dir(cache).repos}
    assert {rev.commit_hash for rev in info[v.repo_id].revisions} == {COMMIT}
    assert {ref for rev in info[v.repo_id].revisions for ref in rev.refs} == {"main"}


def test_hub_id_resolves_like_the_variant_name(tmp_path: Path, no_network: str) -> None:
    v = VARIANTS["rmbg-1.4"]
    snapshot = make_hub_cache(tmp_path, v.repo_id, concrete_files(v.files))
    assert sources.resolve(v.repo_id, "rmbg", offline=True, cache_dir=tmp_path, endpoint=no_network).path == snapshot


def test_hf_hub_offline_env_means_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: str) -> None:
    v = VARIANTS["lcm-lora-sdv1-5"]
    snapshot = make_hub_cache(tmp_path, v.repo_id, concrete_files(v.files))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sources.offline_mode(False)
    assert sources.resolve("lcm-lora-sdv1-5", "lcm-lora", cache_dir=tmp_path, endpoint=no_network).path == snapshot


def test_network_down_but_cached_still_works(tmp_path: Path, no_network: str) -> None:
    """Online mode with the hub unreachable falls back to the cache (huggingface_hub's behaviour)."""
    v = VARIANTS["sd15-inpainting"]
    snapshot = make_hub_cache(tmp_path, v.repo_id, concrete_files(v.files))
    got = sources.resolve("sd15-inpainting", "sd-inpainting", offline=False, cache_dir=tmp_path, endpoint=no_network)
    assert got.path == snapshot and got.commit == COMMIT


def test_default_cache_is_the_hub_cache(tmp_path: Path, no_network: str) -> None:
    v = VARIANTS["rmbg-1.4"]
    snapshot = make_hub_cache(tmp_path / "default-hub-cache", v.repo_id, concrete_files(v.files))
    assert sources.resolve("rmbg-1.4", offline=True, endpoint=no_network).path == snapshot


@pytest.mark.parametrize("how", ["at", "argument"])
def test_pinned_commit(tmp_path: Path, how: str, no_network: str) -> None:
    v = VARIANTS["rmbg-1.4"]
    make_hub_cache(tmp_path, v.repo_id, concrete_files(v.files), COMMIT, "main")
    pinned = make_hub_cache(tmp_path, v.repo_id, concrete_files(v.files), OTHER_COMMIT, None)
    if how == "at":
        got = sources.resolve(f"{v.repo_id}@{OTHER_COMMIT}", "rmbg", offline=True, cache_dir=tmp_path, endpoint=no_network)
    else:
        got = sources.resolve("rmbg-1.4", "rmbg", revision=OTHER_COMMIT, offline=True, cache_dir=tmp_path, endpoint=no_network)
    assert got.path == pinned and got.commit == OTHER_COMMIT and got.revision == OTHER_COMMIT


def test_conflicting_revisions(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="conflicts with revision"):
        sources.resolve("briaai/RMBG-1.4@v1", "rmbg", revision="v2", offline=True, cache_dir=tmp_path)
    with pytest.raises(UsageError, match="nothing after '@'"):
        sources.resolve("briaai/RMBG-1.4@", "rmbg", offline=True, cache_dir=tmp_path)


# ---------------------------------------------------------------- failures


def test_missing_model_offline(tmp_path: Path, no_network: str) -> None:
    with pytest.raises(ModelError) as info:
        sources.resolve("rmbg-1.4", "rmbg", offline=True, cache_dir=tmp_path / "empty", endpoint=no_network).path
    message = str(info.value)
    for part in ("briaai/RMBG-1.4@main", str(tmp_path / "empty"), "offline mode is on", "--rmbg", "tiny-models DIR"):
        assert part in message, f"{part!r} not in {message!r}"
    assert "\n" not in message


@pytest.mark.parametrize("family,option", [("rmbg", "--rmbg"), ("sd-inpainting", "--inpaint"), ("lcm-lora", "--lcm-lora")])
def test_missing_model_without_network(tmp_path: Path, no_network: str, family: str, option: str) -> None:
    name = {"rmbg": "rmbg-1.4", "sd-inpainting": "sd15-inpainting", "lcm-lora": "lcm-lora-sdv1-5"}[family]
    with pytest.raises(ModelError) as info:
        sources.resolve(name, family, cache_dir=tmp_path, endpoint=no_network).path
    message = str(info.value)
    repo = VARIANTS[name].repo_id
    for part in (f"cannot download {repo}: no network", f"point {option} at a local folder", "`trt-bgswap tiny-models DIR`"):
        assert part in message, f"{part!r} not in {message!r}"
    assert "\n" not in message
    assert not (tmp_path / ("models--" + repo.replace("/", "--")) / "snapshots").exists()


def test_incomplete_snapshot_names_the_missing_files(tmp_path: Path, no_network: str) -> None:
    v = VARIANTS["rmbg-1.4"]
    make_hub_cache(tmp_path, v.repo_id, [f for f in concrete_files(v.files) if f != "model.safetensors"])
    with pytest.raises(ModelError, match=r"is missing model\.safetensors; run again with network access"):
        sources.resolve("rmbg-1.4", "rmbg", offline=True, cache_dir=tmp_path, endpoint=no_network).path


class _HubLike(http.server.BaseHTTPRequestHandler):
    """Answers every request the way the hub answers a refused one: a status and an X-Error-Code."""

    status = 403
    error_code = "GatedRepo"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = json.dumps({"error": "refused by the test server"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        if self.error_code:
            self.send_header("X-Error-Code", self.error_code)
            self.send_header("X-Error-Message", "refused by the test server")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence the server
        return


@pytest.fixture
def hub_like() -> Iterator[type[_HubLike]]:
    handler = type("Handler", (_HubLike,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.endpoint = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "status,error_code,expected",
    [
        (403, "GatedRepo", ["access denied (gated or private model)", "accept its licence", "huggingface-cli login"]),
        (401, "GatedRepo", ["access denied", "huggingface-cli login"]),
        (401, "RepoNotFound", ["no such model on the hub", "check the id", "tiny-models"]),
        (404, "RepoNotFound", ["no such model on the hub"]),
        (404, "RevisionNotFound", ["@main: no such revision"]),
        (500, None, ["the hub answered with an error", "try again later", "--rmbg"]),
    ],
)
def test_hub_refusals(tmp_path: Path, hub_like: type[_HubLike], status: int, error_code: str | None, expected: list[str]) -> None:
    hub_like.status, hub_like.error_code = status, error_code
    with pytest.raises(ModelError) as info:
        sources.resolve("rmbg-1.4", "rmbg", cache_dir=tmp_path, endpoint=hub_like.endpoint).path  # type: ignore[attr-defined]
    message = str(info.value)
    assert "briaai/RMBG-1.4" in message
    for part in expected:
        assert part in message, f"{status}/{error_code}: {part!r} not in {message!r}"
    assert "\n" not in message


def test_invalid_hub_id(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a valid hub id"):
        sources.resolve("org/na--me", "rmbg", offline=True, cache_dir=tmp_path).path


# ---------------------------------------------------------------- names and local paths


@pytest.mark.parametrize(
    "name,family,listed,not_listed",
    [
        ("rmbg-3.0", "rmbg", ["rmbg-1.4", "rmbg-2.0", "birefnet"], ["sd15-inpainting"]),
        ("sdxl", None, ["rmbg-1.4", "sd15-inpainting", "lcm-lora-sdv1-5"], []),
    ],
)
def test_unknown_names_list_the_valid_ones(name: str, family: str | None, listed: list[str], not_listed: list[str]) -> None:
    with pytest.raises(UsageError) as info:
        sources.resolve(name, family).path
    message = str(info.value)
    assert f"unknown model {name!r}" in message
    assert all(n in message for n in listed) and not any(n in message for n in not_listed), message


def test_variant_of_the_wrong_family() -> None:
    with pytest.raises(UsageError, match="--rmbg sd15-inpainting: sd15-inpainting is a sd-inpainting model; give one of birefnet, rmbg-1.4, rmbg-2.0"):
        sources.resolve("sd15-inpainting", "rmbg").path


def test_local_paths_pass_through(tmp_path: Path) -> None:
    folder = tmp_path / "my-rmbg"
    (folder / "onnx").mkdir(parents=True)
    (folder / "onnx" / "model.onnx").write_bytes(b"onnx")
    assert sources.resolve(str(folder), "rmbg").path == folder
    assert sources.resolve(folder / "onnx" / "model.onnx", "rmbg").path == folder / "onnx" / "model.onnx"
    got = sources.resolve(folder, "rmbg")
    assert got.repo_id is None and got.commit is None


def test_local_folder_shadows_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative folder spelled like org/name is the user's folder, not a download."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "briaai" / "RMBG-1.4").mkdir(parents=True)
    assert sources.resolve("briaai/RMBG-1.4", "rmbg").path == Path("briaai/RMBG-1.4")


@pytest.mark.parametrize("text", ["./missing-folder", "missing.onnx", "/nonexistent/model.safetensors", "~/nope/x.json"])
def test_missing_local_paths(text: str) -> None:
    with pytest.raises(ModelError, match="no such file or folder; check the path"):
        sources.resolve(text, "rmbg").path


def test_missing_pathlike(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file or folder"):
        sources.resolve(tmp_path / "nope", "rmbg").path


# ---------------------------------------------------------------- pickles


@pytest.mark.parametrize(
    "layout,refused",
    [
        ({"unet/diffusion_pytorch_model.bin": b"pickle"}, "unet/diffusion_pytorch_model.bin"),
        ({"unet/diffusion_pytorch_model.bin": b"p", "unet/diffusion_pytorch_model.safetensors": b"s"}, None),
        ({"model.pth": b"p", "model.safetensors": b"s", "pytorch_model.bin": b"p"}, None),  # RMBG-1.4's repo
        ({"text_encoder/pytorch_model.bin": b"p", "unet/diffusion_pytorch_model.safetensors": b"s"}, "text_encoder/pytorch_model.bin"),
        ({"weights.ckpt": b"p"}, "weights.ckpt"),
    ],
)
def test_pickled_folders(tmp_path: Path, layout: dict[str, bytes], refused: str | None) -> None:
    folder = tmp_path / "model"
    for rel, content in layout.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    if refused is None:
        assert sources.resolve(folder).path == folder
        return
    with pytest.raises(ModelError) as info:
        sources.resolve(folder).path
    message = str(info.value)
    for part in (refused, "can run code when loaded", "safetensors", "--allow-pickle"):
        assert part in message, f"{part!r} not in {message!r}"
    assert sources.resolve(folder, allow_pickle=True).path == folder


@pytest.mark.parametrize("suffix,refused", [(".ckpt", True), (".pt", True), (".pth", True), (".bin", True), (".safetensors", False), (".onnx", False)])
def test_pickled_files(tmp_path: Path, suffix: str, refused: bool) -> None:
    f = tmp_path / f"weights{suffix}"
    f.write_bytes(b"x")
    if refused:
        with pytest.raises(ModelError, match="is a pickled checkpoint"):
            sources.resolve(f).path
        assert sources.resolve(f, allow_pickle=True).path == f
    else:
        assert sources.resolve(f).path == f


def test_download_patterns_fetch_no_pickles_unless_allowed() -> None:
    v = VARIANTS["sd15-inpainting"]
    safe = sources.download_patterns(v, "sd-inpainting", allow_pickle=False)
    assert safe == list(v.files)
    assert not any(p.endswith(sources.PICKLE_SUFFIXES) for p in safe)
    unsafe = sources.download_patterns(v, "sd-inpainting", allow_pickle=True)
    assert "unet/*.bin" in unsafe and "text_encoder/*.bin" in unsafe and "vae/*.bin" in unsafe
    # hub ids outside the registry use their family's file list, or configs + safetensors only
    assert sources.download_patterns(None, "lcm-lora", allow_pickle=False) == list(VARIANTS["lcm-lora-sdv1-5"].files)
    assert sources.download_patterns(None, None, allow_pickle=False) == list(sources.GENERIC_PATTERNS)


def test_cached_pickle_only_snapshot_with_allow_pickle(tmp_path: Path, no_network: str) -> None:
    v = VARIANTS["lcm-lora-sdv1-5"]
    snapshot = make_hub_cache(tmp_path, v.repo_id, ["pytorch_lora_weights.bin"])
    with pytest.raises(ModelError, match="missing pytorch_lora_weights.safetensors"):
        sources.resolve("lcm-lora-sdv1-5", offline=True, cache_dir=tmp_path, endpoint=no_network).path
    got = sources.resolve("lcm-lora-sdv1-5", offline=True, allow_pickle=True, cache_dir=tmp_path, endpoint=no_network).path
    assert got == snapshot


# ---------------------------------------------------------------- licence notices


def test_licence_notice_once_per_user(tmp_path: Path, caplog: pytest.LogCaptureFixture, no_network: str) -> None:
    v = VARIANTS["rmbg-1.4"]
    make_hub_cache(tmp_path / "hub", v.repo_id, concrete_files(v.files))
    with caplog.at_level(logging.WARNING, logger="trt_bgswap.export.sources"):
        sources.resolve("rmbg-1.4", offline=True, cache_dir=tmp_path / "hub", endpoint=no_network).path
    first = [r.getMessage() for r in caplog.records if "licence" in r.getMessage()]
    assert len(first) == 1 and "not licensed for commercial use" in first[0] and v.license in first[0]
    state = tmp_path / "home" / "config" / sources.NOTICES_FILE
    assert json.loads(state.read_text())["shown"] == ["rmbg-1.4"]
    assert [p.name for p in state.parent.iterdir()] == [sources.NOTICES_FILE], "atomic write left a temp file"

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trt_bgswap.export.sources"):
        sources.resolve("rmbg-1.4", offline=True, cache_dir=tmp_path / "hub", endpoint=no_network).path
    assert not [r for r in caplog.records if "licence" in r.getMessage()]


def test_licence_notice_is_shown_even_when_the_download_fails(tmp_path: Path, caplog: pytest.LogCaptureFixture, no_network: str) -> None:
    with caplog.at_level(logging.WARNING, logger="trt_bgswap.export.sources"), pytest.raises(ModelError):
        sources.resolve("rmbg-1.4", cache_dir=tmp_path, endpoint=no_network).path
    assert "non-commercial" in caplog.text


@pytest.mark.parametrize("name", ["sd15-inpainting", "lcm-lora-sdv1-5"])
def test_no_notice_for_commercially_usable_open_models(name: str) -> None:
    assert sources.licence_notice(get_variant(name)) is False


def test_sources_module_does_not_import_the_hub_eagerly() -> None:
    code = "import sys, trt_bgswap.export.sources; print('huggingface_hub' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
