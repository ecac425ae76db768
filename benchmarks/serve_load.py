"""`adtr serve` under load and abuse, on loopback: latency, throughput, memory, 4xx answers.

    python benchmarks/serve_load.py --run runs/bottle --images ../shared/data/mvtec_ad/bottle/test/good

Starts the real server (`adtr serve`, uvicorn) as a child process, sends ``--requests``
POST /predict per round from ``--clients`` concurrent clients for ``--rounds`` rounds
(stopping by itself), and records p50/p99 latency, throughput, non-200 answers and the
server's resident memory after each round. Then sends malformed and hostile requests and
checks that each gets a 4xx answer (never a 5xx, never a file) and that the server still
answers /health afterwards. Writes ``docs/server-load.md`` and
``benchmarks/results/serve_load.json``. tests/test_serve.py runs the same functions on a
tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def alive(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(run: Path, max_upload_mb: float = 20.0, threads: int | None = None, timeout: float = 120) -> Server:
    """`adtr serve RUN` on a free loopback port; returns once /health answers."""
    port = free_port()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen([sys.executable, "-m", "adtr.cli", "serve", str(run), "--port", str(port),
                             "--max-upload-mb", str(max_upload_mb)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = Server(proc, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"adtr serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if server.alive():
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError("adtr serve did not answer /health in time")


def load_rounds(server: Server, images: list[tuple[str, bytes]], requests: int, clients: int,
                rounds: int) -> list[dict]:
    """``rounds`` rounds of ``requests`` POST /predict from ``clients`` threads; one record per round."""
    records = []
    with httpx.Client(base_url=server.url, timeout=120,
                      limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients)) as client:
        lock = threading.Lock()
        for r in range(rounds):
            latencies: list[float] = []
            statuses: dict[int, int] = {}

            def one(i: int) -> None:
                name, data = images[i % len(images)]
                t = time.perf_counter()
                try:
                    status = client.post("/predict", files={"file": (name, data, "application/octet-stream")}).status_code
                except httpx.HTTPError:
                    status = -1  # connection-level failure
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    statuses[status] = statuses.get(status, 0) + 1

            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(one, range(requests)))
            wall = time.perf_counter() - t0
            ms = np.array(latencies) * 1000
            records.append({"round": r + 1, "requests": requests, "clients": clients,
                            "errors": sum(n for s, n in statuses.items() if s != 200), "statuses": statuses,
                            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                            "max_ms": float(ms.max()), "requests_per_s": requests / wall, "rss_mb": server.rss_mb()})
    return records


def raw_request(server: Server, request: bytes) -> tuple[int, bytes]:
    """Send bytes exactly as given (no client-side path normalisation); status code and body."""
    host, port = server.url.removeprefix("http://").split(":")
    head, sep, body = request.partition(b"\r\n\r\n")
    chunks = []
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + sep)
        # A server may answer from the headers alone (a declared length over the limit): read
        # that answer instead of pushing a body it will not read (the connection would be reset).
        early, _, _ = select.select([s], [], [], 0.5)
        try:
            if body and not early:
                s.sendall(body)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass  # refused mid-body: what arrived before the reset is the answer
    response = b"".join(chunks)
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else -1
    return status, response.partition(b"\r\n\r\n")[2]


def get(path: str, host: str = "127.0.0.1") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def multipart(field: str, filename: str, data: bytes, boundary: str = "adtrboundary") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post(body: bytes, content_type: str, path: str = "/predict") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def png_header_only(side: int) -> bytes:
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def abuse(server: Server, good_png: bytes, max_upload_bytes: int) -> list[dict]:
    """Hostile requests, each answered 4xx (or 200 where it is harmless), and the server still up."""
    traversals = ["/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2f..%2fetc%2fpasswd",
                  "/static/../../../etc/passwd", "/docs/../../../../etc/passwd", "/predict/../../etc/passwd",
                  "/health/..%2f..%2f..%2fetc%2fpasswd", "/%00/etc/passwd", "//etc/passwd"]
    cases: list[tuple[str, bytes, tuple[int, ...]]] = []
    for path in traversals:
        cases.append((f"GET {path}", get(path), (400, 404, 405, 422)))
    oversized = multipart("file", "big.png", b"\0" * (max_upload_bytes + 1024))
    cases += [
        ("upload over the size limit", post(*oversized), (413,)),
        ("JSON body", post(b'{"file": "x.png"}', "application/json"), (415,)),
        ("raw image body, no form", post(good_png, "image/png"), (415,)),
        ("form without a 'file' field", post(*multipart("image", "a.png", good_png)), (422,)),
        ("truncated PNG", post(*multipart("file", "cut.png", good_png[: len(good_png) // 2])), (422,)),
        ("text file named .png", post(*multipart("file", "notes.png", b"not an image\n")), (422,)),
        ("empty file", post(*multipart("file", "empty.png", b"")), (422,)),
        ("header claims 20000x20000 pixels", post(*multipart("file", "bomb.png", png_header_only(20_000))),
         (413, 422)),
        ("malformed multipart (no boundary)", post(b"garbage", "multipart/form-data"), (400, 415, 422)),
        ("Host header of another site", get("/health", host="evil.example"), (400, 403)),
        ("GET /predict", get("/predict"), (405,)),
        ("file name ../../../../tmp/adtr-pwned.png", post(*multipart("file", "../../../../tmp/adtr-pwned.png",
                                                                     good_png)), (200,)),
    ]
    results = []
    for name, request, expected in cases:
        status, body = raw_request(server, request)
        ok = status in expected and b"root:" not in body
        if name.startswith("file name"):  # accepted as data: shown by its base name, never written anywhere
            ok = ok and json.loads(body)["source"] == "adtr-pwned.png" and not Path("/tmp/adtr-pwned.png").exists()
        results.append({"request": name, "status": status, "expected": list(expected), "ok": ok,
                        "still_serving": server.alive()})
    return results


def markdown(load: list[dict], abuse_rows: list[dict], meta: dict) -> str:
    lines = ["# `adtr serve` under load and abuse", "",
             f"Generated by `benchmarks/serve_load.py` ({meta['note']}). Run: `{meta['run']}` "
             f"({meta['image_size']} px, {meta['backbone']}), images from `{meta['images']}`; server with "
             f"{meta['threads']} inference threads on {meta['machine']}, clients on the same machine over loopback. "
             "Inference is serialised by the server (one model, one lock), so latency grows with the number of "
             "clients waiting while throughput stays that of one model.", "",
             "## Load", "",
             "| round | requests | clients | errors | p50 (ms) | p99 (ms) | max (ms) | requests/s | server RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in load:
        lines.append(f"| {r['round']} | {r['requests']} | {r['clients']} | {r['errors']} | {r['p50_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {r['max_ms']:.0f} | {r['requests_per_s']:.1f} | {r['rss_mb']:.0f} |")
    lines += ["", "## Abuse", "",
              "Each request is sent byte for byte over a raw socket (no client-side clean-up of paths), then "
              "`/health` is asked again.", "",
              "| request | expected | status | server still serving |", "|---|---|---|---|"]
    for a in abuse_rows:
        lines.append(f"| {a['request']} | {' or '.join(map(str, a['expected']))} | {a['status']} | "
                     f"{'yes' if a['still_serving'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def image_files(folder: Path, limit: int = 16) -> list[tuple[str, bytes]]:
    from adtr.data import list_images

    return [(p.name, p.read_bytes()) for p in list_images(folder)[:limit]]


def main() -> None:
    from provenance import machine_description  # benchmarks/ is on sys.path when the script runs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run folder")
    parser.add_argument("--images", type=Path, required=True, help="a folder of images to send")
    parser.add_argument("--requests", type=int, default=500, help="requests per round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="server's OMP threads (default: torch's)")
    parser.add_argument("--note", default="an idle machine")
    parser.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "server-load.md")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    from adtr.checkpoint import atomic_write_bytes, find_run_file, load_checkpoint

    model = load_checkpoint(find_run_file(args.run))["config"]["model"]
    images = image_files(args.images)
    server = start_server(args.run, threads=args.threads)
    try:
        load = load_rounds(server, images, args.requests, args.clients, args.rounds)
        print(json.dumps(load, indent=2), flush=True)  # kept in the log should the abuse part fail
        abuse_rows = abuse(server, images[0][1], 20 * 2**20)
    finally:
        server.stop()
    meta = {"run": str(args.run), "images": str(args.images), "image_size": model["image_size"],
            "backbone": model["backbone"], "threads": args.threads or os.cpu_count(), "note": args.note,
            "machine": f"{machine_description()}, {os.cpu_count()} cores"}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes((json.dumps({"meta": meta, "load": load, "abuse": abuse_rows}, indent=2) + "\n").encode(),
                       args.out / "serve_load.json")
    atomic_write_bytes(markdown(load, abuse_rows, meta).encode(), args.docs)
    print(args.docs.read_text())


if __name__ == "__main__":
    main()
