"""``adtr serve``'s app through FastAPI's TestClient: routes, decisions, and every 4xx it promises."""

from __future__ import annotations

import base64
import io
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import fastapi  # noqa: F401  a core dependency (adtr serve): a broken install fails here, not skips
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("httpx", reason="fastapi.testclient needs httpx (the test extra)")

from fastapi.testclient import TestClient  # noqa: E402

from adtr import cli  # noqa: E402
from adtr.detector import Detector  # noqa: E402
from adtr.serve import create_app, safe_name  # noqa: E402
from adtr.webpage import PAGE_CSP, PAGE_HTML  # noqa: E402


@pytest.fixture(scope="module")
def detector(tiny_run) -> Detector:
    return Detector.load(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def client(detector) -> TestClient:
    with TestClient(create_app(detector, max_upload_bytes=200_000)) as c:
        yield c


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def post(client: TestClient, data: bytes, name: str = "part.png", ctype: str = "image/png",
         headers: dict[str, str] | None = None):
    return client.post("/predict", files={"file": (name, data, ctype)}, headers=headers)


def assert_error(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for word in words:
        assert word in detail, detail
    return detail


def test_health_reports_the_loaded_model(client, detector):
    r = client.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok"
    assert h["model"] == {"backbone": detector.config.model.backbone, "image_size": 64,
                          "threshold": pytest.approx(detector.threshold),
                          "calibrated_threshold": pytest.approx(detector.threshold)}
    assert h["max_upload_bytes"] == 200_000
    assert r.headers["x-content-type-options"] == "nosniff"


def test_predict_good_image_matches_the_python_api(client, detector, tiny_category):
    path = tiny_category / "test" / "good" / "000.png"
    r = post(client, path.read_bytes(), "000.png")
    assert r.status_code == 200, r.text
    body = r.json()
    ref = detector.predict(path)
    assert body["score"] == pytest.approx(ref.score, rel=1e-5)
    assert body["normalized_score"] == pytest.approx(ref.normalized_score, rel=1e-5)
    assert 0.0 <= body["normalized_score"] <= 1.0
    assert body["threshold"] == pytest.approx(detector.threshold)
    assert body["is_anomalous"] is (body["score"] > body["threshold"]) is ref.is_anomalous
    assert body["verdict"] == ("anomalous" if body["is_anomalous"] else "normal")
    assert (body["source"], body["width"], body["height"]) == ("000.png", 64, 64)
    panel = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert panel.format == "PNG" and panel.size == (4 * 64 + 3 * 4, 64)  # image | map | overlay | mask


def test_any_size_and_mode_keeps_its_aspect_in_the_overlay(client):
    grey = np.random.default_rng(0).integers(0, 256, (48, 96), dtype=np.uint8)  # (H, W), mode L
    r = post(client, png_bytes(grey), "wide.png")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (96, 48)
    panel = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert panel.size == (4 * 96 + 3 * 4, 48)
    big = np.zeros((800, 400, 3), np.uint8)  # overlay tiles are capped at 384 px on the longer side
    panel = Image.open(io.BytesIO(base64.b64decode(post(client, png_bytes(big)).json()["overlay_png"])))
    assert panel.size == (4 * 192 + 3 * 4, 384)


@pytest.mark.parametrize("data, words", [
    (b"this is plain text, not an image\n", ("notes.png", "not a recognised image file")),
    (b"", ("notes.png", "empty")),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ("notes.png", "cannot read image")),
])
def test_non_images_are_422_with_a_clear_message(client, data, words):
    assert_error(post(client, data, "notes.png"), 422, *words)


def test_truncated_png_is_422(client):
    data = png_bytes(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert_error(post(client, data[: len(data) // 2], "cut.png"), 422, "cut.png", "cannot read image")


def test_formats_outside_the_accepted_set_are_refused(client):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")  # PIL reads GIF, the server does not
    assert_error(post(client, buf.getvalue(), "x.gif", "image/gif"), 422, "PNG, JPEG, BMP, TIFF")


def test_oversized_bodies_are_413_before_being_read(detector):
    app = create_app(detector, max_upload_bytes=10_000)
    with TestClient(app) as c:
        detail = assert_error(post(c, b"\0" * 200_000), 413, "10000 bytes")  # Content-Length over the limit
        assert "too large" in detail

        def chunks():  # no Content-Length: counted as it arrives
            yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
            for _ in range(100):
                yield b"\0" * 4096

        r = c.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert_error(r, 413, "too large")
        # Over the file limit but within the multipart allowance: refused by the route.
        assert_error(post(c, b"\0" * 10_001), 413, "part.png", "10000 bytes")
        assert c.get("/health").status_code == 200  # the server is still fine


def test_huge_pixel_counts_are_refused_from_the_header(detector):
    with TestClient(create_app(detector, max_pixels=1000)) as c:
        assert_error(post(c, png_bytes(np.zeros((64, 64), np.uint8))), 422, "64x64 pixels", "1000")


def test_missing_or_wrong_form_fields(client):
    assert_error(client.post("/predict", files={"image": ("a.png", b"x", "image/png")}), 422, "'file'")
    assert_error(client.post("/predict", data={"file": "not a file"}, files={"other": ("a", b"", "text/plain")}),
                 422, "'file'")
    assert_error(client.post("/predict", json={"file": "x"}), 415, "multipart/form-data", "application/json")
    assert_error(client.post("/predict"), 415, "multipart/form-data")
    r = client.post("/predict", files=[("file", ("a.png", b"1", "image/png")), ("file", ("b.png", b"2", "image/png"))])
    assert 400 <= r.status_code < 500 and r.json()["detail"]


def test_no_route_serves_files(client):
    for path in ("/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/../pyproject.toml", "/predict/..%2f..%2fx",
                 "/docs/../../etc/passwd"):
        r = client.get(path)
        assert r.status_code in (404, 405), (path, r.status_code)
        assert "root:" not in r.text and "[project]" not in r.text
    assert client.get("/predict").status_code == 405
    assert client.get("/docs").status_code == 200 and client.get("/openapi.json").json()["paths"]["/predict"]


def test_file_names_are_reduced_to_a_plain_base_name():
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("C:\\Users\\x\\part.png") == "part.png"
    assert safe_name("a\x00b\nc.png") == "abc.png"
    assert safe_name(None) == safe_name("") == safe_name("../") == "upload"
    assert len(safe_name("x" * 1000)) == 200


def test_hostile_file_name_comes_back_as_data(client, tiny_category):
    data = (tiny_category / "test" / "good" / "001.png").read_bytes()
    body = post(client, data, "../../<img src=x onerror=alert(1)>.png").json()
    assert body["source"] == "<img src=x onerror=alert(1)>.png"  # shown with textContent, never parsed as HTML
    assert "innerHTML" not in PAGE_HTML and "insertAdjacentHTML" not in PAGE_HTML


def test_page_has_the_elements_and_a_strict_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for element_id in ("drop", "file", "verdict", "score", "normalized-score", "threshold", "source", "overlay",
                       "error", "result", "model"):
        assert f'id="{element_id}"' in html, element_id
    assert 'type="file"' in html and 'fetch("predict"' in html and "dataTransfer" in html
    assert r.headers["content-security-policy"] == PAGE_CSP
    assert "'unsafe-inline'" not in PAGE_CSP and "connect-src 'self'" in PAGE_CSP
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"(?!data:)", html)  # self-contained: nothing to load


def test_host_allow_list(detector):
    app = create_app(detector, allowed_hosts=["127.0.0.1", "localhost", "::1"])
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/health").status_code == 200
    with TestClient(app, base_url="http://[::1]:8000") as c:
        assert c.get("/health").status_code == 200
    with TestClient(app, base_url="http://attacker.example") as c:
        assert_error(c.get("/health"), 400, "Host")


def test_a_page_elsewhere_cannot_post_to_a_loopback_server(detector, tiny_category):
    """A cross-site form POST reaches 127.0.0.1 from the user's browser without a preflight;
    its Origin gives it away. The server's own page (same origin) and clients that send no
    Origin (curl, scripts) are served."""
    app = create_app(detector, allowed_hosts=["127.0.0.1", "localhost", "::1"])
    blob = (tiny_category / "test" / "good" / "000.png").read_bytes()
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        for origin in ("https://attacker.example", "http://127.0.0.1:9999", "null"):
            assert_error(post(c, blob, headers={"Origin": origin}), 403, "cross-origin")
        assert post(c, blob, headers={"Origin": "http://127.0.0.1:8000"}).status_code == 200
        assert post(c, blob).status_code == 200


def test_concurrent_requests_are_served_one_model_safely(client, tiny_category):
    paths = [tiny_category / "test" / "good" / "000.png", tiny_category / "test" / "hole" / "000.png"]
    blobs = [p.read_bytes() for p in paths]
    single = [post(client, b).json()["score"] for b in blobs]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: post(client, blobs[i % 2]), range(16)))
    assert all(r.status_code == 200 for r in results)
    assert [r.json()["score"] for r in results] == [single[i % 2] for i in range(16)]


def test_cli_serve_binds_localhost_by_default(monkeypatch, tiny_run, capsys):
    import uvicorn

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    assert cli.main(["serve", str(tiny_run), "--port", "8123", "--max-upload-mb", "1"]) == 0
    assert (calls["host"], calls["port"]) == ("127.0.0.1", 8123)
    with TestClient(calls["app"], base_url="http://127.0.0.1:8123") as c:
        assert c.get("/health").json()["max_upload_bytes"] == 2**20
    with TestClient(calls["app"], base_url="http://evil.example") as c:
        assert c.get("/health").status_code == 400  # DNS-rebinding guard on a loopback bind
    assert "http://127.0.0.1:8123/" in capsys.readouterr().out
    assert cli.main(["serve", str(tiny_run), "--max-upload-mb", "0"]) == 2


def test_run_without_pixel_threshold_reports_no_mask(tiny_run, tiny_category):
    """Runs saved before pixel calibration: the verdict still comes, the mask is absent, not empty."""
    det = Detector.load(tiny_run, device="cpu")
    det.calibration = {k: v for k, v in det.calibration.items() if not k.startswith("pixel_threshold")}
    with TestClient(create_app(det)) as c:
        body = post(c, (tiny_category / "test" / "good" / "000.png").read_bytes()).json()
    assert body["defect_fraction"] is None and body["verdict"] in ("normal", "anomalous")
    panel = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert panel.size == (3 * 64 + 2 * 4, 64)  # image | map | overlay, no mask tile


def load_benchmark():
    """benchmarks/serve_load.py as a module: the test runs the very code that made docs/server-load.md."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_real_server_under_load_and_abuse(tiny_run, tiny_category):
    """500 requests from 8 clients over loopback against `adtr serve` itself (uvicorn in a child
    process), in 5 rounds: no errors, memory flat after the first round; then every hostile
    request gets its 4xx and the server keeps serving."""
    bench = load_benchmark()
    images = bench.image_files(tiny_category / "test" / "hole") + bench.image_files(tiny_category / "test" / "good")
    server = bench.start_server(tiny_run, max_upload_mb=1, threads=1)
    try:
        rounds = bench.load_rounds(server, images, requests=100, clients=8, rounds=5)
        abuse = bench.abuse(server, images[0][1], 2**20)
    finally:
        server.stop()
    assert all(r["errors"] == 0 for r in rounds), rounds
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in rounds)
    # Flat memory: the rounds after the first (which pays for allocator warm-up) stay within 16 MB of it.
    rss = [r["rss_mb"] for r in rounds]
    assert max(rss[1:]) - rss[1] < 16, rss
    bad = [a for a in abuse if not (a["ok"] and a["still_serving"])]
    assert not bad, bad
