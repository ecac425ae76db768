"""``adtr serve``: an HTTP API and a web page over one loaded :class:`~adtr.detector.Detector`.

Routes: ``GET /`` the page (one self-contained HTML string: nothing is served from disk),
``POST /predict`` (multipart field ``file``), ``GET /health``, and FastAPI's ``/docs``
and ``/openapi.json``. One model is loaded once; inference runs in a worker thread under
a lock, one image at a time, so memory stays bounded however many clients there are.
Request bodies are counted while they arrive and refused with 413 past the limit; every
error is JSON ``{"detail": "<message>"}`` with a 4xx status.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from adtr import __version__
from adtr.data.images import IMAGE_FORMATS, decode_image
from adtr.errors import AdtrError
from adtr.visualize import overlay_panel
from adtr.webpage import PAGE_CSP, PAGE_HTML

if TYPE_CHECKING:
    from adtr.detector import Detector

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # about 6300 x 6300; refused from the header, before decoding
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and part headers around the file
OVERLAY_TILE = 384  # longer side of each overlay tile, px; the overlay is for display
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def safe_name(filename: str | None) -> str:
    """An upload's file name for display: base name only, no control characters, at most 200 chars."""
    name = PureWindowsPath(Path(filename or "").name).name  # drops "/" and "\\" directories alike
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip()[:200]
    return name if name.strip(".") else "upload"


def _finite(x: float) -> float | None:
    """JSON has no inf/NaN: report them as null."""
    return float(x) if np.isfinite(x) else None


def overlay_png(image: Image.Image, amap: np.ndarray, vmax: float, mask: np.ndarray | None,
                tile: int = OVERLAY_TILE) -> bytes:
    """PNG of image | map | overlay (| mask), each tile at most ``tile`` px on its longer side.

    ``amap`` (h, w) and ``mask`` (h, w) may be at any resolution (the model's or the image's):
    both are resized onto the display tile, keeping the image's aspect ratio.
    """
    scale = min(1.0, tile / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))  # (W, H)
    shown = np.asarray(image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))  # (H, W, 3)
    heat = np.asarray(Image.fromarray(np.asarray(amap, np.float32)).resize(size, Image.Resampling.BILINEAR))
    small_mask = None
    if mask is not None:
        mask_image = Image.fromarray(np.asarray(mask, np.uint8) * 255)  # (h, w) 0/255
        small_mask = np.asarray(mask_image.resize(size, Image.Resampling.NEAREST))
    buf = io.BytesIO()
    overlay_panel(shown, heat, 0.0, vmax, small_mask).save(buf, format="PNG")
    return buf.getvalue()


class Scorer:
    """Decode, score and draw one upload at a time (the lock keeps one model safe across threads)."""

    def __init__(self, detector: Detector, threshold: float | None = None, max_pixels: int = MAX_PIXELS) -> None:
        self.detector = detector
        self.threshold = detector.threshold if threshold is None else float(threshold)
        self.max_pixels = max_pixels
        self._lock = threading.Lock()

    def __call__(self, data: bytes, name: str) -> dict[str, Any]:
        with self._lock:
            t0 = time.perf_counter()
            image = decode_image(data, name, self.max_pixels)
            pred = self.detector.predict(image, threshold=self.threshold)
            thr = pred.threshold
            vmax = 2 * thr if np.isfinite(thr) and thr > 0 else float(np.max(pred.anomaly_map))  # as `adtr predict`
            # Runs from before pixel calibration have no pixel threshold: no mask rather than an empty one.
            mask = pred.defect_mask if np.isfinite(self.detector.pixel_threshold) else None
            png = overlay_png(image, pred.anomaly_map, vmax, mask)
            seconds = time.perf_counter() - t0
        return {
            "source": name,
            "width": image.width,
            "height": image.height,
            "score": _finite(pred.score),
            "normalized_score": _finite(pred.normalized_score),
            "threshold": _finite(thr),
            "is_anomalous": bool(pred.is_anomalous),
            "verdict": "anomalous" if pred.is_anomalous else "normal",
            "defect_fraction": None if mask is None else float(np.mean(mask)),
            "overlay_png": base64.b64encode(png).decode("ascii"),
            "seconds": round(seconds, 4),
        }


def _host_name(host_header: str) -> str:
    """``example:8000`` -> ``example``; ``[::1]:8000`` -> ``::1``."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Guard:
    """Pure ASGI middleware: a Host allow-list and a request-body limit counted as bytes arrive.

    A declared ``Content-Length`` over the limit is refused before any body is read; a body
    without one (chunked) is counted and refused once it passes the limit. Either way the
    answer is a JSON 413. Every response gets ``X-Content-Type-Options: nosniff``.
    """

    def __init__(self, app, max_body_bytes: int, allowed_hosts: Sequence[str] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    def _too_large(self) -> str:
        return (f"request body too large: the upload limit is {self.max_body_bytes - FORM_OVERHEAD_BYTES} bytes "
                f"({(self.max_body_bytes - FORM_OVERHEAD_BYTES) / 2**20:.1f} MiB)")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = None
        if self.allowed_hosts is not None and _host_name(headers.get("host", "")).lower() not in self.allowed_hosts:
            error = (400, "invalid Host header: this server only answers requests addressed to "
                          + ", ".join(sorted(self.allowed_hosts)))
        elif self.allowed_hosts is not None and "origin" in headers and \
                urlsplit(headers["origin"]).netloc.lower() != headers.get("host", "").lower():
            # On loopback the threat is a web page elsewhere posting to this server from the
            # user's browser (a cross-site form POST needs no preflight): only this page may.
            error = (403, "cross-origin request refused: only the page this server serves may call it")
        elif "content-length" in headers:
            try:
                declared = int(headers["content-length"])
            except ValueError:
                declared = -1
            if declared < 0:
                error = (400, "invalid Content-Length header")
            elif declared > self.max_body_bytes:
                error = (413, self._too_large())
        if error is not None:
            await self._send_error(send, *error)
            return

        received, overflow, started = 0, False, False

        async def counted_receive():
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    overflow = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if overflow:
                return  # the app's answer to an aborted read is replaced by the 413 below
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]}
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not overflow:
                raise
        if overflow and not started:
            await self._send_error(send, 413, self._too_large())

    @staticmethod
    async def _send_error(send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"x-content-type-options", b"nosniff")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class ErrorOut(BaseModel):
    detail: str


class PredictionOut(BaseModel):
    """``/predict``'s answer. Scores are null where not finite (JSON has no inf)."""

    source: str  # the upload's base file name, as data (the page writes it with textContent)
    width: int  # of the uploaded image, px
    height: int
    score: float | None  # raw image score
    normalized_score: float | None  # in [0, 1], 0.5 at the threshold
    threshold: float | None
    is_anomalous: bool
    verdict: str  # "anomalous" | "normal"
    defect_fraction: float | None  # share of the image's pixels in the defect mask; None: no pixel threshold
    overlay_png: str  # base64 PNG: image | anomaly map | overlay | defect mask
    seconds: float  # decode + score + drawing


class _BodyTooLarge(Exception):
    """Raised inside the app's receive() when the body passes the limit."""


def create_app(detector: Detector, max_upload_bytes: int = MAX_UPLOAD_BYTES, threshold: float | None = None,
               max_pixels: int = MAX_PIXELS, allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The FastAPI app over ``detector`` (no server is started; test it with ``fastapi.testclient``).

    ``threshold`` overrides the run's calibrated one; ``allowed_hosts`` (``None``: any) is the
    Host-header allow-list that keeps a localhost server from answering DNS-rebound pages.
    """
    if max_upload_bytes < 1:
        raise AdtrError(f"the upload limit must be at least 1 byte, got {max_upload_bytes}")
    scorer = Scorer(detector, threshold, max_pixels)
    model = detector.config.model

    errors: dict[int | str, dict[str, Any]] = {
        413: {"model": ErrorOut, "description": f"the upload is over the limit ({max_upload_bytes} bytes)"},
        415: {"model": ErrorOut, "description": "the request is not multipart/form-data"},
        422: {"model": ErrorOut, "description": "the file is not a readable image, or the form has no 'file' field"},
    }
    app = FastAPI(title="adtr", version=__version__,
                  description="ADTR anomaly detection: POST an image to /predict, get its score, decision and "
                              "overlay.", form_limits={"max_files": 1, "max_fields": 4, "max_part_size": 4096})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            return JSONResponse({"detail": f"send the image as multipart/form-data in a field named 'file' "
                                           f"(got content type {ctype or 'none'!r})"}, status_code=415)
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": f"send the image as a file in the multipart field 'file' ({problems})"},
                            status_code=422)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE_HTML, headers={"Content-Security-Policy": PAGE_CSP, "X-Frame-Options": "DENY",
                                                "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and what is loaded."""
        return {"status": "ok", "version": __version__,
                "model": {"backbone": model.backbone, "image_size": model.image_size,
                          "threshold": _finite(scorer.threshold),
                          "calibrated_threshold": _finite(detector.threshold)},
                "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "formats": list(IMAGE_FORMATS)}

    @app.post("/predict", response_model=PredictionOut, responses=errors)
    async def predict(file: UploadFile = File(..., description="the image (PNG, JPEG, BMP or TIFF)")) -> dict:
        """Score one image: raw and normalised score, decision, and image | map | overlay | defect mask as PNG."""
        name = safe_name(file.filename)
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: file too large: the upload limit is {max_upload_bytes} bytes")
        try:
            return await run_in_threadpool(scorer, data, name)
        except AdtrError as exc:
            raise HTTPException(422, str(exc)) from exc

    app.add_middleware(Guard, max_body_bytes=max_upload_bytes + FORM_OVERHEAD_BYTES, allowed_hosts=allowed_hosts)
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 20.0,
          threshold: float | None = None, device: str | None = None, precision: str = "fp32",
          engine: str = "torch") -> None:
    """Load ``run`` once (``precision`` and ``engine`` as in :meth:`Detector.load`) and
    serve it with uvicorn until interrupted."""
    import uvicorn

    from adtr.detector import Detector

    if max_upload_mb <= 0:
        raise AdtrError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    detector = Detector.load(run, device=device, precision=precision, engine=engine)
    warm = np.zeros((detector.image_size, detector.image_size, 3), np.uint8)
    detector.predict(warm)  # the first request should not pay for lazy initialisation (or compilation)
    local = is_loopback(host)
    if not local:
        log.warning("serving on %s: anyone who can reach this address can use the model (no authentication)", host)
    allowed = [*LOOPBACK_HOSTS, host] if local else None
    app = create_app(detector, int(max_upload_mb * 2**20), threshold, allowed_hosts=allowed)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {run} on http://{shown}:{port}/ (API docs at /docs); Ctrl-C stops", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False, timeout_keep_alive=5,
                limit_concurrency=64)
