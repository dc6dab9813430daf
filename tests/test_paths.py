"""Per-user cache/config folders by platform convention, the hub cache location, and cache_report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trt_bgswap import paths

ENV_VARS = (
    "TRT_BGSWAP_HOME",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "LOCALAPPDATA",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HOME in tmp_path and none of the overrides set."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


# (platform, env to set relative to HOME or absolute, expected cache dir, expected config dir), with "~" = HOME
PLATFORM_CASES = [
    ("linux", {}, "~/.cache/trt-bgswap", "~/.config/trt-bgswap"),
    ("linux", {"XDG_CACHE_HOME": "~/xc", "XDG_CONFIG_HOME": "~/xg"}, "~/xc/trt-bgswap", "~/xg/trt-bgswap"),
    # the XDG spec: relative paths are invalid and ignored
    ("linux", {"XDG_CACHE_HOME": "rel/cache", "XDG_CONFIG_HOME": "rel/cfg"}, "~/.cache/trt-bgswap", "~/.config/trt-bgswap"),
    ("darwin", {}, "~/Library/Caches/trt-bgswap", "~/Library/Application Support/trt-bgswap"),
    ("darwin", {"XDG_CACHE_HOME": "~/xc"}, "~/Library/Caches/trt-bgswap", "~/Library/Application Support/trt-bgswap"),
    ("win32", {"LOCALAPPDATA": "~/AppDataLocal"}, "~/AppDataLocal/trt-bgswap/Cache", "~/AppDataLocal/trt-bgswap/Config"),
    ("win32", {}, "~/AppData/Local/trt-bgswap/Cache", "~/AppData/Local/trt-bgswap/Config"),
]


def _expand(value: str, home: Path) -> str:
    return str(home) + value[1:] if value.startswith("~") else value


@pytest.mark.parametrize("platform,env,want_cache,want_config", PLATFORM_CASES)
def test_platform_conventions(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, platform: str, env: dict, want_cache: str, want_config: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, _expand(v, clean_env))
    assert paths.cache_dir(platform) == Path(_expand(want_cache, clean_env))
    assert paths.config_dir(platform) == Path(_expand(want_config, clean_env))


@pytest.mark.parametrize("platform", ["linux", "darwin", "win32"])
def test_home_override_wins_everywhere(clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, platform: str) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "lad"))
    monkeypatch.setenv("TRT_BGSWAP_HOME", str(tmp_path / "appliance"))
    assert paths.cache_dir(platform) == tmp_path / "appliance" / "cache"
    assert paths.config_dir(platform) == tmp_path / "appliance" / "config"


def test_model_and_engine_locations_follow_the_cache(clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRT_BGSWAP_HOME", str(tmp_path / "h"))
    assert paths.models_dir() == tmp_path / "h" / "cache" / "models"
    assert paths.default_export_dir() == tmp_path / "h" / "cache" / "models" / "default"
    assert paths.default_export_dir("fp16") == tmp_path / "h" / "cache" / "models" / "fp16"
    assert paths.engines_dir() == tmp_path / "h" / "cache" / "engines"


HUB_ENV_CASES = {
    "defaults": {},
    "xdg": {"XDG_CACHE_HOME": "{tmp}/xdg"},
    "hf_home": {"HF_HOME": "{tmp}/hfhome", "XDG_CACHE_HOME": "{tmp}/xdg"},
    "hf_hub_cache": {"HF_HUB_CACHE": "{tmp}/hubcache", "HF_HOME": "{tmp}/hfhome"},
    "legacy": {"HUGGINGFACE_HUB_CACHE": "{tmp}/legacy", "HF_HOME": "{tmp}/hfhome"},
    "tilde": {"HF_HOME": "~/hf"},
}


@pytest.mark.parametrize("case", sorted(HUB_ENV_CASES))
def test_hub_cache_dir_matches_huggingface_hub(clean_env: Path, tmp_path: Path, case: str) -> None:
    """Parity with huggingface_hub.constants.HF_HUB_CACHE, computed by the library itself in a fresh process."""
    pytest.importorskip("huggingface_hub")
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update({k: v.format(tmp=tmp_path) for k, v in HUB_ENV_CASES[case].items()})
    code = (
        "import json\n"
        "from huggingface_hub import constants\n"
        "from trt_bgswap.paths import hub_cache_dir\n"
        "print(json.dumps([constants.HF_HUB_CACHE, str(hub_cache_dir())]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    theirs, ours = json.loads(proc.stdout)
    assert Path(ours) == Path(theirs), f"{case}: huggingface_hub uses {theirs}, we computed {ours}"


def _write(path: Path, nbytes: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(nbytes))
    return nbytes


def test_cache_report_lists_contents_and_sizes(clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRT_BGSWAP_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    root = paths.cache_dir()
    default_size = _write(root / "models" / "default" / "unet" / "model.onnx", 3000) + _write(
        root / "models" / "default" / "manifest.json", 200
    )
    fp16_size = _write(root / "models" / "fp16" / "unet" / "model.onnx", 1500)
    engines_size = _write(root / "engines" / "abc.plan", 700)
    # a hub repo: the snapshot links to the blob; the blob must be counted once
    repo = paths.hub_repo_dir("briaai/RMBG-1.4")
    blob_size = _write(repo / "blobs" / "deadbeef", 900)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(Path("../../blobs/deadbeef"))
    _write(paths.hub_repo_dir("someone/unrelated") / "blobs" / "x", 10)  # not a registry model: not listed

    report = paths.cache_report()
    got = {(e.kind, e.path): e.size for e in report.entries}
    want = {
        ("model", root / "models" / "default"): default_size,
        ("model", root / "models" / "fp16"): fp16_size,
        ("engines", root / "engines"): engines_size,
        ("hub", repo): blob_size,
    }
    assert got == want
    assert report.root == root
    assert report.total == default_size + fp16_size + engines_size + blob_size


def test_cache_report_of_an_empty_cache(clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRT_BGSWAP_HOME", str(tmp_path / "nothing"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nohub"))
    report = paths.cache_report()
    assert report.entries == []
    assert report.total == 0


def test_info_prints_the_cache_report(clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRT_BGSWAP_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _write(paths.default_export_dir() / "manifest.json", 2048)
    from trt_bgswap.info import info_text

    text = info_text()
    assert f"cache: {paths.cache_dir()}" in text
    assert f"{paths.default_export_dir()}  2.0 KiB" in text
