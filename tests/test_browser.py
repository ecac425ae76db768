"""End to end: ``adtr serve`` in its own process, its page driven by headless Chromium.

Needs Selenium (a test dependency), Debian's ``chromium`` and ``chromium-driver`` (``make test``
installs them where it runs as root with apt-get; elsewhere this test skips and says why).
The screenshots go to pytest's ``tmp_path``, and also to ``$ADTR_SCREENSHOT_DIR`` when set.

The model is a tiny run on the 64 px generated fabric (packaged ImageNet weights, 3 epochs).
It ranks a hole far above a good image, but a threshold calibrated on its one held-out image
is too coarse to trust, so the server gets ``--threshold`` halfway between the two scores:
the test then checks that the page shows one verdict of each kind, and that every verdict
and score on the page is exactly what ``/predict`` answers for the same file.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from adtr.config import with_overrides
from adtr.data import index_mvtec
from adtr.detector import Detector
from adtr.engine import fit

from conftest import tiny_config

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM_HINT = ("install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                 "`make test` does it when run as root where apt-get exists)")


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or skip with the reason."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -r requirements.lock)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None:
        pytest.skip(f"no chromium on PATH: {CHROMIUM_HINT}")
    if driver is None:
        pytest.skip(f"no chromedriver on PATH: {CHROMIUM_HINT}")
    return chromium, driver


@pytest.fixture(scope="module")
def browser_run(tiny_category, tmp_path_factory) -> Path:
    find_browser()  # skip before paying for a fit
    run = tmp_path_factory.mktemp("browser_run") / "run"
    cfg = with_overrides(tiny_config(), "model", weights="packaged")  # random weights do not separate them
    fit(cfg, index_mvtec(tiny_category.parent, tiny_category.name, "train"), run)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, data: bytes | None = None, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def post_file(base: str, path: Path) -> dict:
    """POST ``path`` as multipart field ``file``, the way the page does."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return http_json(f"{base}/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


@pytest.fixture(scope="module")
def images(browser_run, tiny_category, tmp_path_factory) -> dict[str, Path]:
    """A good and a defective test image, under distinct names."""
    folder = tmp_path_factory.mktemp("upload")
    test = tiny_category / "test"
    picks = {"good": test / "good" / "000.png", "defective": test / "hole" / "000.png"}
    out = {}
    for kind, src in picks.items():
        out[kind] = folder / f"{kind}_{src.parent.name}_{src.name}"
        shutil.copyfile(src, out[kind])
    not_image = folder / "notes.png"
    not_image.write_text("not an image\n")
    out["text"] = not_image
    return out


@pytest.fixture(scope="module")
def server(browser_run, images, tmp_path_factory):
    """``adtr serve`` in a subprocess on a free localhost port, threshold between the two images."""
    det = Detector.load(browser_run, device="cpu")
    good, bad = (det.predict(images[k]).score for k in ("good", "defective"))
    assert bad > 1.2 * good, f"the tiny model should rank the hole ({bad:.3f}) well above the good image ({good:.3f})"
    threshold = (good + bad) / 2
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    cmd = [sys.executable, "-m", "adtr.cli", "serve", str(browser_run), "--port", str(port),
           "--threshold", repr(threshold), "--max-upload-mb", "1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"adtr serve exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                health = http_json(f"{base}/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"adtr serve did not answer within 180 s:\n{log_path.read_text()}")
                time.sleep(0.3)
        assert health["model"]["threshold"] == pytest.approx(threshold)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def driver():
    chromium, chromedriver = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1100", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        drv = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    except Exception as exc:  # a browser that is installed but cannot start here (no shm, missing libraries)
        pytest.skip(f"headless Chromium did not start: {str(exc).splitlines()[0]}")
    yield drv
    drv.quit()


def wait_for_result(drv, source: str, state: str = "done") -> dict[str, str]:
    """Wait until ``#result`` shows ``source`` in ``state``; return what the page shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        r = d.find_element(By.ID, "result")
        return r.get_attribute("data-state") == state and (state == "error" or r.get_attribute("data-source") == source)

    WebDriverWait(drv, 120, poll_frequency=0.2).until(ready)
    r = drv.find_element(By.ID, "result")
    text = {i: drv.find_element(By.ID, i).text for i in ("verdict", "score", "normalized-score", "threshold",
                                                          "source", "error")}
    return {**text, "data_score": r.get_attribute("data-score"), "data_verdict": r.get_attribute("data-verdict"),
            "overlay": drv.find_element(By.ID, "overlay").get_attribute("src") or ""}


def screenshot(drv, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert drv.save_screenshot(str(path)), "Chromium took no screenshot"
    if os.environ.get("ADTR_SCREENSHOT_DIR"):
        keep = Path(os.environ["ADTR_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, keep / name)
    return path


def check_against_api(shown: dict[str, str], api: dict) -> None:
    assert shown["verdict"] == shown["data_verdict"] == api["verdict"]
    assert float(shown["data_score"]) == api["score"]  # the exact number, round-tripped through JS
    assert float(shown["score"]) == pytest.approx(api["score"], abs=1e-4)  # shown with 4 decimals
    assert float(shown["normalized-score"]) == pytest.approx(api["normalized_score"], abs=1e-3)
    assert float(shown["threshold"]) == pytest.approx(api["threshold"], abs=1e-4)
    assert shown["overlay"] == "data:image/png;base64," + api["overlay_png"]


def test_page_shows_each_verdict_like_the_api(driver, server, images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.perf_counter()
    driver.get(server + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text.startswith("Model:"))

    # 1. The good image through the file picker.
    driver.find_element(By.ID, "file").send_keys(str(images["good"]))
    good = wait_for_result(driver, images["good"].name)
    screenshot(driver, tmp_path, "serve_good.png")

    # 2. The defective image dropped onto the drop zone (a synthetic drop event carrying the file).
    b64 = base64.b64encode(images["defective"].read_bytes()).decode()
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], arguments[1], {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
    """, b64, images["defective"].name)
    bad = wait_for_result(driver, images["defective"].name)
    shot = screenshot(driver, tmp_path, "serve_defective.png")
    assert shot.stat().st_size > 10_000

    assert (good["verdict"], bad["verdict"]) == ("normal", "anomalous")
    check_against_api(good, post_file(server, images["good"]))
    check_against_api(bad, post_file(server, images["defective"]))
    assert images["defective"].name in bad["source"] and "64 x 64 px" in bad["source"]

    # 3. A text file named .png: the server's 4xx message appears on the page.
    driver.find_element(By.ID, "file").send_keys(str(images["text"]))
    err = wait_for_result(driver, images["text"].name, state="error")
    assert "notes.png" in err["error"] and "not a recognised image file" in err["error"]

    csp = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not csp, csp  # the inline script and style are allowed by hash, nothing else is needed
    print(f"browser test: {time.perf_counter() - t0:.1f} s in the page")
