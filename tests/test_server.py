"""`trt-bgswap serve`: a real uvicorn process on 127.0.0.1, real HTTP, the tiny exported models, real photos.

Three servers: ``server`` (roomy queue, batches of up to 4 within 500 ms) for the routes, the
answers and the 4xx statuses; ``tight`` (one queued request, batches of one, a 2 s timeout, a
bearer token) for 503/504/disconnects/auth; and one per SIGTERM test. Every status the issue
lists is produced by a real request here; answers are compared with the library
(``BackgroundReplacer``) on the same models, bit for bit.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import socket
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")

from server_process import Reply, ServerProcess, multipart, png_bytes, wait_for  # noqa: E402

from trt_bgswap.api import BackgroundReplacer  # noqa: E402
from trt_bgswap.cli.main import main as cli_main  # noqa: E402

MAX_PIXELS = 300_000
MAX_BYTES = 3 * 1024 * 1024
LONG_JOB = {"size": "256x256", "steps": "40"}  # several seconds of UNet on one thread, far over the tight server's 2 s timeout


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB").resize(size, Image.Resampling.LANCZOS))


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {n: png_bytes(photo(n, s)) for n, s in (("astronaut", (150, 110)), ("chelsea", (96, 140)), ("coffee", (120, 120)), ("rocket", (100, 130)))}


@pytest.fixture(scope="module")
def server(exported_dir: Path):
    s = ServerProcess([
        "--models", str(exported_dir), "--provider", "cpu", "--threads", "2", "--max-batch", "4", "--batch-wait-ms", "500",
        "--max-queue", "16", "--max-pixels", str(MAX_PIXELS), "--max-bytes", str(MAX_BYTES), "--timeout", "120",
    ]).start()
    yield s
    assert s.stop() == 0, s.log
    assert "Traceback" not in s.log, s.log


@pytest.fixture(scope="module")
def library(exported_dir: Path) -> BackgroundReplacer:
    return BackgroundReplacer(exported_dir, provider="cpu", threads=2)


def error_of(reply: Reply) -> str:
    assert reply.headers["content-type"] == "application/json", reply
    msg = reply.json()["error"]
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# --- routes ---


def test_health_ready_metrics_docs_page(server: ServerProcess) -> None:
    assert server.get("/healthz").json() == {"status": "alive"}
    assert server.get("/readyz").json() == {"status": "ready"}
    # while the models loaded (seconds, in a background thread) the port was open and /readyz said so
    loading = server.readyz[0]
    assert loading.status == 503 and loading.json() == {"status": "loading"} and loading.headers["retry-after"] == "5"
    metrics = server.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.body.decode()
    for family in ("bgswap_requests_total counter", "bgswap_queue_depth gauge", "bgswap_batch_size histogram", "bgswap_stage_seconds histogram", "bgswap_images_per_second gauge", "process_resident_memory_bytes gauge"):
        assert f"# TYPE {family}" in text, family
    assert 'bgswap_batching_exact{stage="generate"} 1.0' in text and 'bgswap_batching_exact{stage="mask"} 1.0' in text
    docs = server.get("/docs").body.decode()
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn." not in docs  # works without internet
    assert server.get("/docs-assets/swagger-ui-bundle.js").status == 200
    spec = server.get("/openapi.json").json()
    body = spec["paths"]["/v1/replace"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"} and "prompt" in body["multipart/form-data"]["schema"]["properties"]
    assert "/v1/mask" in spec["paths"] and "/healthz" in spec["paths"]
    page = server.get("/").body.decode()
    assert 'id="image"' in page and "/static/app.js" in page
    assert server.get("/static/app.js").status == 200
    assert server.get("/nope").status == 404


def test_replace_matches_the_library_and_is_reproducible(server: ServerProcess, library: BackgroundReplacer, photos: dict[str, bytes]) -> None:
    fields = {"image": photos["astronaut"], "prompt": "a sunny beach", "seed": "11", "steps": "3"}
    first = server.post_form("/v1/replace", fields)
    assert first.status == 200, first.body[:300]
    assert first.headers["content-type"] == "image/png"
    assert first.headers["x-seed"] == "11" and first.headers["x-generation-size"] == "128x128"
    got = np.asarray(first.image())
    want = library.replace(Image.open(io.BytesIO(photos["astronaut"])), "a sunny beach", seed=11, steps=3).image
    np.testing.assert_array_equal(got, np.asarray(want), err_msg="server result != BackgroundReplacer.replace")
    assert server.post_form("/v1/replace", fields).body == first.body, "same seed, different bytes"
    as_json = {**fields, "image": base64.b64encode(photos["astronaut"]).decode(), "seed": 11, "steps": 3}
    by_json = server.request("POST", "/v1/replace", json.dumps(as_json).encode(), {"Content-Type": "application/json"})
    assert by_json.status == 200 and by_json.body == first.body, "JSON base64 request differs from the multipart one"


def test_composite_options_match_the_library(server: ServerProcess, library: BackgroundReplacer, photos: dict[str, bytes]) -> None:
    """The form's composite fields mean what `run`'s flags and the API's CompositeOptions mean: the same bytes."""
    from trt_bgswap.cli.composite_options import build_composite_options

    fields = {"image": photos["chelsea"], "prompt": "a beach", "seed": "4", "steps": "2", "harmonize": "0.6", "shadow": "true", "shadow_opacity": "0.8", "grain": "yes"}
    r = server.post_form("/v1/replace", fields)
    assert r.status == 200, r.body[:300]
    options = build_composite_options(harmonize=0.6, shadow=True, shadow_opacity=0.8, grain=True)
    want = library.replace(Image.open(io.BytesIO(photos["chelsea"])), "a beach", seed=4, steps=2, composite_options=options).image
    np.testing.assert_array_equal(np.asarray(r.image()), np.asarray(want), err_msg="server composite != BackgroundReplacer.replace with the same CompositeOptions")
    plain = server.post_form("/v1/replace", {k: v for k, v in fields.items() if k in ("image", "prompt", "seed", "steps")})
    assert plain.status == 200 and plain.body != r.body, "the composite fields changed nothing"


def test_seed_is_drawn_and_reported(server: ServerProcess, photos: dict[str, bytes]) -> None:
    r = server.post_form("/v1/replace", {"image": photos["coffee"], "prompt": "a forest", "steps": "1"})
    assert r.status == 200 and int(r.headers["x-seed"]) >= 0
    again = server.post_form("/v1/replace", {"image": photos["coffee"], "prompt": "a forest", "steps": "1", "seed": r.headers["x-seed"]})
    assert again.body == r.body


@pytest.mark.parametrize("fmt, mime", [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_formats(server: ServerProcess, photos: dict[str, bytes], fmt: str, mime: str) -> None:
    r = server.post_form("/v1/replace", {"image": photos["chelsea"], "bg_color": "#00ff00", "format": fmt})
    assert r.status == 200 and r.headers["content-type"] == mime
    assert r.image().format == fmt.upper() and r.image().size == (96, 140)


def test_user_mask_keeps_the_subject_exactly(server: ServerProcess, photos: dict[str, bytes]) -> None:
    rgb = np.asarray(Image.open(io.BytesIO(photos["rocket"])))
    m = np.zeros(rgb.shape[:2], np.uint8)
    m[30:100, 20:80] = 255
    r = server.post_form("/v1/replace", {"image": photos["rocket"], "mask": png_bytes(m), "prompt": "mars", "seed": "2", "steps": "2"})
    assert r.status == 200, r.body[:300]
    out = np.asarray(r.image())
    np.testing.assert_array_equal(out[m == 255], rgb[m == 255], err_msg="the subject under the user's mask was changed")
    assert not np.array_equal(out[m == 0], rgb[m == 0])


def test_mask_and_cutout_match_the_library(server: ServerProcess, library: BackgroundReplacer, photos: dict[str, bytes]) -> None:
    r = server.post_form("/v1/mask", {"image": photos["chelsea"]})
    assert r.status == 200 and r.image().mode == "L"
    want = np.asarray(library.mask(Image.open(io.BytesIO(photos["chelsea"]))))
    np.testing.assert_array_equal(np.asarray(r.image()), want)
    cut = server.post_form("/v1/mask", {"image": photos["chelsea"], "cutout": "true", "format": "webp"})
    assert cut.status == 200 and cut.image().mode == "RGBA"
    assert error_of(server.post_form("/v1/mask", {"image": photos["chelsea"], "cutout": "true", "format": "jpeg"})).startswith("cutout=true with format=jpeg")


# --- dynamic batching ---


def test_batched_requests_equal_each_request_alone(server: ServerProcess, photos: dict[str, bytes]) -> None:
    """Four requests arriving together run as one batch (same size/steps/guidance) and answer exactly what each gets alone."""
    requests = [
        {"image": photos[n], "prompt": p, "seed": s, "steps": "2", "size": "128x64"}
        for n, p, s in (("astronaut", "a beach", "1"), ("chelsea", "a forest at night", "2"), ("coffee", "a beach", "3"), ("rocket", "snow", "4"))
    ]
    before = server.metric("bgswap_batch_size_sum", 'stage="generate"'), server.metric("bgswap_batch_size_count", 'stage="generate"')
    together: list[Reply | None] = [None] * len(requests)

    def send(i: int) -> None:
        together[i] = server.post_form("/v1/replace", requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sizes = [int(r.headers["x-batch-size"]) for r in together if r is not None]
    assert all(r is not None and r.status == 200 for r in together), [r.status if r else None for r in together]
    assert max(sizes) >= 2, f"requests sent together were not batched: {sizes}"
    after = server.metric("bgswap_batch_size_sum", 'stage="generate"'), server.metric("bgswap_batch_size_count", 'stage="generate"')
    assert after[0] - before[0] == 4 and after[1] - before[1] < 4, "the generate-stage batch histogram did not record a batch"
    for i, req in enumerate(requests):
        alone = server.post_form("/v1/replace", req)
        assert alone.headers["x-batch-size"] == "1"
        assert alone.body == together[i].body, f"request {i}: batched answer differs from the request alone"  # type: ignore[union-attr]
    assert len({r.body for r in together if r}) == 4


# --- 4xx: every message is the CLI's one line ---


@pytest.mark.parametrize(
    "field, value, cli_args",
    [
        ("seed", "abc", ["--seed", "abc"]),
        ("steps", "0", ["--steps", "0"]),
        ("guidance", "31", ["--guidance", "31"]),
        ("size", "wide", ["--size", "wide"]),
        ("bg_color", "no-such-colour", ["--bg-color", "no-such-colour"]),
    ],
)
def test_bad_option_is_400_with_the_cli_message(server: ServerProcess, photos: dict[str, bytes], capsys: pytest.CaptureFixture[str], field: str, value: str, cli_args: list[str]) -> None:
    fields = {"image": photos["coffee"], "prompt": "x", field: value}
    if field == "bg_color":
        del fields["prompt"]
    r = server.post_form("/v1/replace", fields)
    assert r.status == 400
    msg = error_of(r)
    assert cli_main(["run", "photo.jpg", "--prompt", "x", *cli_args]) == 2
    cli_line = capsys.readouterr().err.strip()
    assert msg in cli_line, f"server {msg!r} is not the CLI's {cli_line!r}"


def test_unreadable_image_is_400_with_the_cli_message(server: ServerProcess, tmp_path: Path, exported_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = b"garbage\nnot an image at all"
    msg = error_of(server.post_form("/v1/mask", {"image": junk}))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(junk)
    assert cli_main(["mask", str(bad), "--rmbg", str(exported_dir), "-o", str(tmp_path / "out")]) == 1
    cli = capsys.readouterr().err
    assert msg.split(": ", 1)[1] in cli, f"{msg!r} vs CLI {cli!r}"


@pytest.mark.parametrize(
    "fields, expect",
    [
        ({"prompt": "x"}, "no 'image' field"),
        ({"image": "text, not a file", "prompt": "x"}, "must be a file upload"),
        ({"image": b"IMAGE", "prompt": "x", "colour": "red"}, "unknown field(s) 'colour'"),
        ({"image": b"IMAGE"}, "give a prompt"),
        ({"image": b"IMAGE", "prompt": "x", "bg_color": "red"}, "alternatives"),
        ({"image": b"IMAGE", "prompt": "x", "size": "100x100"}, "multiples of 64"),
        ({"image": b"IMAGE", "prompt": "x", "format": "gif"}, "choose png, jpeg or webp"),
        ({"image": b"IMAGE", "prompt": "x", "mask": png_bytes(np.zeros((20, 20), np.uint8))}, "give a mask of the same size"),
        ({"image": b"IMAGE", "prompt": "x", "shadow_blur": "0.1"}, "shadow_blur=... shape the shadow: add shadow=true"),
        ({"image": b"IMAGE", "prompt": "x", "shadow": "maybe"}, "shadow must be true or false"),
        ({"image": b"IMAGE", "prompt": "x", "harmonize": "2"}, "--harmonize"),
        ({"image": b"IMAGE", "prompt": "x", "shadow": "true", "shadow_offset": "1"}, "--shadow-offset"),
    ],
)
def test_bad_request_is_400(server: ServerProcess, photos: dict[str, bytes], fields: dict, expect: str) -> None:
    fields = {k: (photos["coffee"] if v == b"IMAGE" else v) for k, v in fields.items()}
    r = server.post_form("/v1/replace", fields)
    assert r.status == 400 and expect in error_of(r)


def test_malformed_bodies(server: ServerProcess, photos: dict[str, bytes]) -> None:
    r = server.request("POST", "/v1/replace", b"--x\r\nno headers", {"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status == 400
    assert server.request("POST", "/v1/replace", b"{not json", {"Content-Type": "application/json"}).status == 400
    assert "base64" in error_of(server.request("POST", "/v1/replace", b'{"image": "***", "prompt": "x"}', {"Content-Type": "application/json"}))
    r = server.request("POST", "/v1/replace", photos["coffee"], {"Content-Type": "image/png"})
    assert r.status == 415 and "multipart/form-data" in error_of(r)


# --- 413 ---


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's shape)."""
    raw = png_bytes(np.zeros((1, 1, 3), np.uint8))
    ihdr = struct.pack(">II", width, height) + raw[24:29]
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def test_too_many_bytes_is_413(server: ServerProcess) -> None:
    big = b"\0" * (MAX_BYTES + 1)
    r = server.post_form("/v1/mask", {"image": big})
    assert r.status == 413 and "--max-bytes" in error_of(r)
    # without Content-Length (chunked): the limit holds while reading
    conn = server.connection()
    body, ctype = multipart({"image": big})
    conn.request("POST", "/v1/mask", body=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]), headers={"Content-Type": ctype}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()


def test_too_many_pixels_and_decompression_bomb_are_413(server: ServerProcess) -> None:
    r = server.post_form("/v1/mask", {"image": png_bytes(np.zeros((480, 640, 3), np.uint8))})
    assert r.status == 413 and "decompression-bomb guard" in error_of(r)
    bomb = _png_declaring(100_000, 100_000)
    assert len(bomb) < 100
    r = server.post_form("/v1/replace", {"image": bomb, "prompt": "x"})
    assert r.status == 413 and "10000.0 MP" in error_of(r)
    r = server.post_form("/v1/replace", {"image": png_bytes(np.zeros((60, 60, 3), np.uint8)), "mask": bomb, "prompt": "x"})
    assert r.status == 413


# --- fuzz: bodies and form values get 4xx (or a real answer), never a 5xx ---

FIELD_NAMES = st.sampled_from(["image", "mask", "prompt", "negative_prompt", "seed", "steps", "guidance", "bg_color", "size", "format", "cutout", "x"])
TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["1", "0", "-1", "nan", "inf", "1e309", "64x64", "0x0", "#fff", "true", "png", "2" * 40]))
TINY_PNG = png_bytes(np.full((20, 24, 3), 90, np.uint8))
FILES = st.one_of(st.binary(max_size=200), st.just(TINY_PNG), st.just(_png_declaring(70_000, 3)), st.just(TINY_PNG[:40]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    route=st.sampled_from(["/v1/replace", "/v1/mask"]),
    fields=st.dictionaries(FIELD_NAMES, st.one_of(TEXT, FILES), max_size=6),
    raw=st.one_of(st.none(), st.binary(max_size=300)),
    ctype=st.sampled_from(["multipart/form-data; boundary=b", "multipart/form-data", "application/json", "text/plain", ""]),
)
def test_fuzzed_requests_get_4xx_never_5xx(server: ServerProcess, route: str, fields: dict, raw: bytes | None, ctype: str) -> None:
    if "image" in fields and "prompt" in fields and route == "/v1/replace":
        fields["steps"] = "1"  # a valid generation stays quick
    if raw is None:
        body, content_type = multipart(fields)
    else:
        body, content_type = raw, ctype
    r = server.request("POST", route, body, {"Content-Type": content_type} if content_type else {})
    assert r.status < 500, (r.status, r.body[:300])
    if r.status != 200:
        assert 400 <= r.status < 500
        error_of(r)


def test_fuzzed_json_gets_4xx_never_5xx(server: ServerProcess) -> None:
    for body in (b"[]", b"null", b'{"image": 5}', b'{"image": "", "prompt": "x"}', b'{"image": "' + base64.b64encode(TINY_PNG) + b'", "seed": {"a": 1}, "prompt": "x"}', b"\xff\xfe"):
        r = server.request("POST", "/v1/replace", body, {"Content-Type": "application/json"})
        assert r.status == 400, (body, r.status, r.body)


# --- the page, in a real headless Chromium ---

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver are not installed (scripts/test.sh installs them as root: apt-get install chromium chromium-driver)")
def test_page_in_headless_chromium(server: ServerProcess, photos: dict[str, bytes], tmp_path: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pinned in constraints/test.txt)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    upload = tmp_path / "astronaut.png"
    upload.write_bytes(photos["astronaut"])
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        driver.find_element(By.ID, "image").send_keys(str(upload))
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a quiet lake")
        driver.find_element(By.ID, "seed").send_keys("5")
        driver.find_element(By.ID, "steps").clear()
        driver.find_element(By.ID, "steps").send_keys("2")
        driver.find_element(By.ID, "harmonize").clear()
        driver.find_element(By.ID, "harmonize").send_keys("0.5")
        driver.find_element(By.ID, "shadow").click()
        driver.find_element(By.ID, "go").click()
        loaded = "const i = document.getElementById(arguments[0]); return i.complete && i.naturalWidth"
        WebDriverWait(driver, 120).until(lambda d: d.execute_script(loaded, "result-view") or "error" in d.find_element(By.ID, "status").get_attribute("class"))
        status = driver.find_element(By.ID, "status").text
        assert driver.execute_script(loaded, "result-view") == 150, status
        assert driver.execute_script(loaded, "mask-view") == 150 and driver.execute_script(loaded, "input-view") == 150
        link = driver.find_element(By.ID, "download")
        assert link.is_displayed() and link.get_attribute("download") == "astronaut_bgswap.png" and link.get_attribute("href").startswith("blob:")
        assert "seed 5" in status
        # the page sent the composite options it shows: its result is the server's answer to the same fields
        read_blob = "const done = arguments[arguments.length - 1]; fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => done(Array.from(new Uint8Array(b))))"
        shown = bytes(driver.execute_async_script(read_blob, link.get_attribute("href")))
        fields = {"image": photos["astronaut"], "prompt": "a quiet lake", "seed": "5", "steps": "2", "guidance": "1", "harmonize": "0.5", "shadow": "true"}
        assert shown == server.post_form("/v1/replace", fields).body, "the page's result differs from a request with its fields"
        driver.save_screenshot(str(tmp_path / "page.png"))  # to look at: pytest --basetemp
    finally:
        driver.quit()


# --- the tight server: full queue, timeouts, disconnects, the token ---

TOKEN = "s3cret-token-for-the-tests-0123456789"


@pytest.fixture(scope="module")
def tight(exported_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    s = ServerProcess([
        "--models", str(exported_dir), "--provider", "cpu", "--threads", "1", "--max-batch", "1", "--batch-wait-ms", "0",
        "--max-queue", "1", "--timeout", "2", "--token-file", str(token_file), "--memory-budget", "1G",
    ], token=TOKEN).start()
    yield s
    assert s.stop() == 0, s.log
    assert "Traceback" not in s.log, s.log


def test_token_on_every_route_but_healthz(tight: ServerProcess, photos: dict[str, bytes]) -> None:
    assert tight.get("/healthz", auth=False).status == 200
    for path in ("/readyz", "/metrics", "/", "/docs", "/openapi.json", "/static/app.js"):
        r = tight.get(path, auth=False)
        assert r.status == 401 and r.headers["www-authenticate"].startswith("Bearer"), path
        assert "missing bearer token" in error_of(r)
    r = tight.post_form("/v1/mask", {"image": photos["coffee"]}, auth=False)
    assert r.status == 401
    wrong = tight.request("GET", "/readyz", headers={"Authorization": "Bearer not-the-token"}, auth=False)
    assert wrong.status == 401 and "wrong bearer token" in error_of(wrong)
    assert tight.get("/readyz").status == 200
    assert tight.post_form("/v1/mask", {"image": photos["coffee"]}).status == 200


def test_a_size_over_the_memory_budget_is_400_naming_one_that_fits(tight: ServerProcess, photos: dict[str, bytes]) -> None:
    """--memory-budget 1G: 512x512 on the tiny models needs about 1.4 GiB (benchmarks/results/memory_by_size.json), refused before it runs."""
    r = tight.post_form("/v1/replace", {"image": photos["coffee"], "prompt": "x", "size": "512x512"})
    assert r.status == 400, r
    msg = error_of(r)
    assert msg.startswith("--size 512x512 needs about ") and "the budget (--memory-budget) is 1.0 GiB: use --size " in msg, msg


def test_full_queue_503_timeout_504_and_disconnect_drops_queued_work(tight: ServerProcess, photos: dict[str, bytes]) -> None:
    long_job = {"image": photos["coffee"], "prompt": "a long one", **LONG_JOB}
    generated_before = tight.metric("bgswap_batch_size_sum", 'stage="generate"')
    first: list[Reply] = []
    runner = threading.Thread(target=lambda: first.append(tight.post_form("/v1/replace", long_job)))
    runner.start()
    wait_for(lambda: tight.metric("bgswap_jobs_running") == 1, what="the long job to run")
    # a second request waits in the queue (size 1); its client will hang up
    body, ctype = multipart({**long_job, "prompt": "never runs"})
    leaving = socket.create_connection(("127.0.0.1", tight.port))
    leaving.sendall(
        f"POST /v1/replace HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    wait_for(lambda: tight.metric("bgswap_queue_depth") == 1, what="the second request to queue")
    full = tight.post_form("/v1/replace", long_job)
    assert full.status == 503 and int(full.headers["retry-after"]) >= 1 and "queue is full" in error_of(full)
    leaving.close()
    wait_for(lambda: tight.metric("bgswap_dropped_jobs_total", 'reason="disconnected"') == 1, what="the disconnected request to be dropped")
    runner.join(60)
    assert first and first[0].status == 504 and "--timeout 2" in error_of(first[0])
    # the running job finishes unread; the dropped one never runs
    wait_for(lambda: tight.metric("bgswap_jobs_running") == 0 and tight.metric("bgswap_queue_depth") == 0, 120, "the worker to go idle")
    # the requests the generate stage ran (the sum of its batch sizes): the running job's, not the dropped one's
    assert tight.metric("bgswap_batch_size_sum", 'stage="generate"') == generated_before + 1
    assert tight.metric("bgswap_requests_total", 'route="/v1/replace",status="503"') >= 1
    assert tight.metric("bgswap_requests_total", 'route="/v1/replace",status="504"') == 1


# --- SIGTERM: stop accepting, finish what is in flight, exit 0 ---


def test_sigterm_drains_in_flight_requests_and_exits_0(exported_dir: Path, photos: dict[str, bytes]) -> None:
    s = ServerProcess(["--models", str(exported_dir), "--provider", "cpu", "--threads", "1", "--max-batch", "1", "--batch-wait-ms", "0"]).start()
    try:
        answers: list[Reply] = []
        t = threading.Thread(target=lambda: answers.append(s.post_form("/v1/replace", {"image": photos["astronaut"], "prompt": "in flight", "seed": "3", "size": "256x256", "steps": "8"})))
        t.start()
        wait_for(lambda: s.metric("bgswap_jobs_running") == 1, what="the request to run")
        s.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
                return False
            except OSError:
                return True

        wait_for(refused, 30, "the server to stop accepting connections")
        t.join(120)
        assert answers and answers[0].status == 200 and answers[0].image().size == (150, 110), answers
        assert s.proc.wait(60) == 0, s.log  # type: ignore[union-attr]
        assert "Traceback" not in s.log
    finally:
        s.stop(signal.SIGKILL)


def test_serve_refuses_a_folder_without_an_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["serve", "--models", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
