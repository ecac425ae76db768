"""The page ``adtr serve`` shows at ``/``: one self-contained HTML string, inline CSS and JS.

Drop an image (or pick one); the page POSTs it to ``predict`` and shows the verdict, the
raw and normalised score and the overlay. Everything the server sends back is written
with ``textContent`` or as a ``data:`` image, never as HTML, so a crafted file name or
error message cannot inject markup. Stable element ids (``verdict``, ``score``,
``normalized-score``, ``threshold``, ``source``, ``defect-area``, ``overlay``, ``error``) and the
``data-state`` of ``#result`` (idle, busy, done, error) are what the browser test reads.
The Content-Security-Policy allows exactly this script and style (by hash), images from
``data:`` URLs and requests to the same origin.
"""

from __future__ import annotations

import base64
import hashlib

_STYLE = """
body { font: 16px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1.5rem; color: #1d232a; }
h1 { font-size: 1.4rem; margin: 0 0 .25rem; }
#model { color: #5b6570; font-size: .9rem; margin: 0 0 1rem; }
#drop { display: block; border: 2px dashed #8a96a3; border-radius: 10px; padding: 2rem; text-align: center;
        cursor: pointer; background: #f6f8fa; }
#drop.over { border-color: #1f6feb; background: #eaf2ff; }
#drop input { margin-top: .75rem; }
#status { min-height: 1.5rem; margin: .75rem 0; color: #5b6570; }
#error { color: #b42318; font-weight: 600; }
#result[data-state="idle"] .out, #result[data-state="busy"] .out { opacity: .35; }
#verdict { display: inline-block; font-size: 1.6rem; font-weight: 700; padding: .1rem .8rem; border-radius: 6px; }
#verdict.anomalous { background: #fde2e1; color: #b42318; }
#verdict.normal { background: #dcfce7; color: #166534; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: 1rem 0; }
dt { color: #5b6570; }
dd { margin: 0; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
#overlay { width: 100%; height: auto; border: 1px solid #d0d7de; }
#overlay:not([src]) { display: none; }
figcaption { color: #5b6570; font-size: .85rem; }
"""

_SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
let maxBytes = null;
let latest = 0;

function setState(state) { $("result").dataset.state = state; }

function showError(message) {
  $("error").textContent = message;
  $("status").textContent = "";
  setState("error");
}

function show(r) {
  const verdict = $("verdict");
  verdict.textContent = r.verdict;
  verdict.className = r.verdict;
  $("score").textContent = r.score === null ? "n/a" : r.score.toFixed(4);
  $("normalized-score").textContent = r.normalized_score === null ? "n/a" : r.normalized_score.toFixed(3);
  $("threshold").textContent = r.threshold === null ? "n/a" : r.threshold.toFixed(4);
  $("source").textContent = r.source + " (" + r.width + " x " + r.height + " px)";
  $("defect-area").textContent = r.defect_fraction === null ? "not calibrated (run predates pixel thresholds)"
    : (100 * r.defect_fraction).toFixed(1) + "% of the image";
  $("overlay").src = "data:image/png;base64," + r.overlay_png;
  const result = $("result");
  result.dataset.source = r.source;
  result.dataset.verdict = r.verdict;
  result.dataset.score = String(r.score);
  result.dataset.normalizedScore = String(r.normalized_score);
  $("error").textContent = "";
  $("status").textContent = "Scored " + r.source + " in " + r.seconds.toFixed(2) + " s.";
  setState("done");
}

async function upload(file) {
  if (!file) return;
  if (maxBytes !== null && file.size > maxBytes) {
    showError(file.name + " is " + (file.size / 1048576).toFixed(1) + " MiB; the upload limit is "
              + (maxBytes / 1048576).toFixed(1) + " MiB.");
    return;
  }
  const ticket = ++latest;
  setState("busy");
  $("error").textContent = "";
  $("status").textContent = "Scoring " + file.name + " ...";
  const form = new FormData();
  form.append("file", file, file.name);
  let response, body;
  try {
    response = await fetch("predict", { method: "POST", body: form });
    body = await response.json();
  } catch (err) {
    if (ticket === latest) showError("No usable answer from the server: " + err);
    return;
  }
  if (ticket !== latest) return;  // a newer upload is on its way
  if (!response.ok) { showError(body.detail || ("HTTP " + response.status)); return; }
  show(body);
}

const drop = $("drop");
$("file").addEventListener("change", (e) => upload(e.target.files[0]));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  $("file").value = "";  // the picker no longer names what is shown
  upload(e.dataTransfer.files[0]);
});
window.addEventListener("dragover", (e) => e.preventDefault());  // a missed drop must not navigate away
window.addEventListener("drop", (e) => e.preventDefault());

fetch("health").then((r) => r.json()).then((h) => {
  maxBytes = h.max_upload_bytes;
  const m = h.model;
  $("model").textContent = "Model: " + m.backbone + ", " + m.image_size + " px input, threshold "
    + (m.threshold === null ? "n/a" : m.threshold.toFixed(4)) + ". Uploads up to "
    + (maxBytes / 1048576).toFixed(1) + " MiB (" + h.formats.join(", ") + ").";
}).catch(() => { $("model").textContent = "Model information unavailable."; });
"""

_BODY = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>adtr: anomaly check</title>
<link rel="icon" href="data:,">
<style>{style}</style>
</head>
<body>
<h1>adtr: anomaly check</h1>
<p id="model">Loading model information ...</p>
<label id="drop" for="file">
  Drop an image here, or choose a file<br>
  <input id="file" name="file" type="file" accept="image/png,image/jpeg,image/bmp,image/tiff">
</label>
<p id="status" aria-live="polite"></p>
<p id="error" role="alert"></p>
<section id="result" data-state="idle" aria-live="polite">
  <div class="out">
    <span id="verdict">no image yet</span>
    <dl>
      <dt>score (raw)</dt><dd id="score">-</dd>
      <dt>normalised score</dt><dd id="normalized-score">-</dd>
      <dt>threshold</dt><dd id="threshold">-</dd>
      <dt>image</dt><dd id="source">-</dd>
      <dt>defect mask</dt><dd id="defect-area">-</dd>
    </dl>
    <figure>
      <img id="overlay" alt="image, anomaly map, overlay and defect mask">
      <figcaption>image | anomaly map (blue low, red high; red from twice the threshold) | overlay |
        defect mask (when the run has a pixel threshold)</figcaption>
    </figure>
  </div>
</section>
<script>{script}</script>
</body>
</html>
"""


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


PAGE_HTML = _BODY.replace("{style}", _STYLE).replace("{script}", _SCRIPT)
PAGE_CSP = (f"default-src 'none'; script-src '{_sha256(_SCRIPT)}'; style-src '{_sha256(_STYLE)}'; "
            "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
