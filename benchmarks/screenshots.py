"""The README's screenshots: the HTML report and the served page, on a real run.

    python benchmarks/screenshots.py RUN --data ../shared/data/mvtec_ad/bottle --image PATH [--out docs]

Writes ``report.png`` (the top of ``adtr test``'s report.html) and ``serve.png`` (the page
of ``adtr serve`` after dropping ``--image`` on it), both taken by headless Chromium.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def chrome(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path="/usr/bin/chromedriver"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="labelled test data for the report")
    parser.add_argument("--image", type=Path, required=True, help="image dropped on the served page")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "adtr.cli", "test", str(args.run), "--data", str(args.data),
                        "--out", tmp], check=True)
        drv = chrome(1280, 1500)
        try:
            drv.get(Path(tmp, "report.html").resolve().as_uri())
            drv.save_screenshot(str(args.out / "report.png"))
        finally:
            drv.quit()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "adtr.cli", "serve", str(args.run), "--port", str(port)])
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        drv = chrome(1280, 1000)
        try:
            drv.get(f"http://127.0.0.1:{port}/")
            drv.find_element(By.ID, "file").send_keys(str(args.image.resolve()))
            WebDriverWait(drv, 120).until(lambda d: d.find_element(By.ID, "result").get_attribute("data-state") == "done")
            print("verdict on the page:", drv.find_element(By.ID, "verdict").text)
            drv.save_screenshot(str(args.out / "serve.png"))
        finally:
            drv.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out / 'report.png'} and {args.out / 'serve.png'}")


if __name__ == "__main__":
    main()
