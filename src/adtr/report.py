"""``adtr test`` / ``adtr report``: one self-contained HTML report of a test run.

The file opens offline and can be mailed: CSS is inline, figures (matplotlib, Agg,
no pyplot state) and gallery panels are base64 PNG ``data:`` URIs, and there are no
scripts and no links. Every string that comes from the user's files or the run
(file names, defect-type folder names, paths, config values) passes through
:func:`html.escape`. The file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from adtr.checkpoint import atomic_write_bytes, package_version
from adtr.config import to_dict
from adtr.data import Sample, image_to_tensor, read_image, read_mask
from adtr.errors import AdtrError
from adtr.evaluate import EvalResult
from adtr.metrics import pixel_roc_curve, pro_curve, roc_curve
from adtr.postprocess import ExpectedFpr
from adtr.visualize import overlay_panel, tensor_to_uint8

if TYPE_CHECKING:
    from adtr.detector import Detector

PRO_FPR_LIMIT = 0.3  # as AUPRO
MAX_CURVE_POINTS = 2000  # pixel curves have up to N*H*W points; more would not show
MAX_ROC_TYPES = 12  # per-type ROC lines beyond this would be unreadable
PANEL_HEIGHT = (160, 256)  # gallery panels are scaled into this range of heights (px)
COLUMNS = (("n_images", "images"), ("n_anomalous", "defective"), ("image_auroc", "image AUROC"),
           ("image_f1_max", "image F1-max"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO (FPR ≤ 0.3)"),
           ("fpr_at_threshold", "FPR at threshold"), ("fnr_at_threshold", "FNR at threshold"))
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}td.absent{color:#888;font-style:italic}
table.kv td{text-align:left}.figs{display:flex;flex-wrap:wrap;gap:1em}.figs img{max-width:100%}
.note{color:#555}.gallery{display:flex;flex-wrap:wrap;gap:1.2em}figure{margin:0}
figcaption{font-size:.9em;max-width:60em;overflow-wrap:anywhere}.miss{color:#b00020;font-weight:bold}
pre{background:#f6f6f6;padding:.6em;overflow:auto}
"""


def expected_fpr_row(rate: ExpectedFpr | None) -> str:
    """The FPR that the held-out calibration promised, beside the one obtained (empty without one)."""
    if rate is None:
        return ""
    return (f"<tr><td>FPR expected from the calibration</td><td>{rate.expected:.4f} ({rate.confidence:.0%} "
            f"interval {rate.low:.4f}-{rate.high:.4f}: the threshold is a quantile of few held-out "
            f"good images)</td></tr>")


@dataclass(frozen=True)
class RunInfo:
    """What the report says about the run; :meth:`from_detector` fills it from a loaded run."""

    name: str
    threshold: float  # image-score threshold; inf when the run has none
    image_size: int  # model input side: maps and gallery panels are at this size
    config: dict[str, Any] = field(default_factory=dict)  # the run's config, shown in full
    details: dict[str, str] = field(default_factory=dict)  # extra "label: value" rows (paths, calibration)
    expected_fpr: ExpectedFpr | None = None  # what the held-out calibration promises (target-FPR threshold only)

    @classmethod
    def from_detector(cls, detector: Detector, run: str | Path, data: str | Path | None = None,
                      masks: str | Path | None = None) -> RunInfo:
        run = Path(run)
        cfg = detector.config
        details = {"run": str(run.resolve())}
        if data is not None:
            details["test data"] = str(Path(data).resolve())
        if masks is not None:
            details["masks"] = str(Path(masks).resolve())
        m, t = cfg.model, cfg.train
        details["model"] = (f"{m.backbone} ({m.weights} weights), {m.image_size} px, grid stride {m.grid_stride}, "
                            f"stages {list(m.stages)}, {m.reconstructor} reconstructing {m.target}")
        details["training"] = (f"{t.epochs} epochs max, batch {t.batch_size}, lr {t.lr:g} ({t.schedule}), "
                               f"select {t.select}")
        if cfg.plus.loss != "none":
            details["ADTR+"] = f"{cfg.plus.loss} loss, {cfg.plus.source} anomalies"
        details["scoring"] = f"sigma {cfg.score.sigma:g} px, pool {cfg.score.pool_size} px"
        details["inference"] = f"{detector.precision}, engine {detector.engine}"
        cal = detector.calibration
        if cal.get("mode") == "f1":  # switched by `adtr calibrate`
            details["calibration"] = f"F1-optimal threshold on {cal.get('f1_images', '?')} labelled images"
        else:
            n_val = len(cal.get("val_scores", []))
            details["calibration"] = (f"threshold at target FPR {cal.get('target_fpr', cfg.score.target_fpr):g} on "
                                      f"{n_val} held-out good training image{'' if n_val == 1 else 's'} "
                                      f"({cal.get('threshold_rule', 'quantile')} rule)")
        if math.isfinite(cal.get("pixel_threshold", math.inf)):
            details["pixel threshold"] = f"{cal['pixel_threshold']:.4f} (not used by the image metrics)"
        name = run.parent.name if run.is_file() else run.resolve().name
        return cls(name, detector.threshold, detector.image_size, to_dict(cfg), details, detector.expected_fpr)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: float | int | None) -> str:
    if value is None:
        return "absent"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def cell(value: float | int | None) -> str:
    return '<td class="absent">absent</td>' if value is None else f"<td>{fmt(value)}</td>"


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return png_uri(buf.getvalue())


def figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    """A fresh Agg figure and its axes (no pyplot: no global state, no GUI backend)."""
    fig = Figure(figsize=(4.6, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def figure_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return png_uri(buf.getvalue())


def mpl_text(text: str) -> str:
    """User text for a matplotlib label: ``$`` would start mathtext."""
    return text.replace("$", r"\$")


def thin(x: np.ndarray, y: np.ndarray, n: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``n`` points, evenly spaced along the curve's length, ends kept."""
    if x.size <= n:
        return x, y
    cum = np.concatenate(([0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))))  # (K,) arc length
    idx = np.searchsorted(cum, np.linspace(0.0, cum[-1], n)).clip(0, x.size - 1)
    idx = np.unique(np.concatenate(([0], idx, [x.size - 1])))
    return x[idx], y[idx]


def roc_figures(result: EvalResult, samples: Sequence[Sample]) -> list[str]:
    """HTML of the image ROC (overall and per type) and the pixel ROC and PRO curves, or why absent."""
    out = []
    m, labels = result.metrics, result.labels
    if m["image_auroc"] is None:
        out.append('<p class="note">Image ROC absent: it needs both good and defective test images.</p>')
    else:
        fig, ax = figure("Image ROC", "false-positive rate (good images)", "true-positive rate (defective)")
        fpr, tpr = roc_curve(labels, result.scores)
        ax.plot(fpr, tpr, color="black", lw=2, label=f"{m['image_auroc']:.3f}  all types")
        types = list(result.per_type)
        if 1 < len(types) <= MAX_ROC_TYPES:
            kinds = np.array([s.defect_type for s in samples])
            for t in types:
                sel = (labels == 0) | (kinds == t)
                f, r = roc_curve(labels[sel], result.scores[sel])
                ax.plot(f, r, lw=1, alpha=0.8, label=f"{result.per_type[t]['image_auroc']:.3f}  {mpl_text(t)}")
        if m["fpr_at_threshold"] is not None and m["fnr_at_threshold"] is not None:
            ax.plot([m["fpr_at_threshold"]], [1 - m["fnr_at_threshold"]], "o", color="red", label="at threshold")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        ax.legend(title="AUROC", fontsize="small", loc="lower right")
        out.append(f'<img src="{figure_uri(fig)}" alt="image-level ROC curve">')
    if m["pixel_auroc"] is None or result.masks is None:
        out.append('<p class="note">Pixel ROC and PRO curves absent: they need ground-truth masks for every '
                   "defect type.</p>")
        return out
    fig, ax = figure("Pixel ROC", "false-positive rate (normal pixels)", "true-positive rate (defect pixels)")
    fpr, tpr = thin(*pixel_roc_curve(result.masks, result.maps))
    ax.plot(fpr, tpr, color="black", lw=2, label=f"AUROC {m['pixel_auroc']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.legend(loc="lower right")
    out.append(f'<img src="{figure_uri(fig)}" alt="pixel-level ROC curve">')
    fig, ax = figure("Per-region overlap (PRO)", "false-positive rate (normal pixels)", "mean region overlap")
    fprs, pros = pro_curve(result.masks, result.maps)
    end = int(np.searchsorted(fprs, PRO_FPR_LIMIT, side="right")) + 1  # one point past the limit, clipped by xlim
    fprs, pros = thin(fprs[:end], pros[:end])
    ax.plot(fprs, pros, color="black", lw=2, label=f"AUPRO {m['aupro']:.3f}")
    ax.set_xlim(0, PRO_FPR_LIMIT)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    out.append(f'<img src="{figure_uri(fig)}" alt="PRO curve up to FPR 0.3">')
    return out


def histogram_figure(result: EvalResult, threshold: float) -> str:
    fig, ax = figure("Image scores", "image score", "images")
    scores, labels = result.scores, result.labels
    span = scores if not math.isfinite(threshold) else np.append(scores, threshold)
    edges = np.histogram_bin_edges(span, bins=int(np.clip(len(scores) // 2, 10, 40)))
    ax.hist(scores[labels == 0], bins=edges, alpha=0.6, color="tab:blue", label=f"good ({int((labels == 0).sum())})")
    ax.hist(scores[labels == 1], bins=edges, alpha=0.6, color="tab:red", label=f"defective ({int(labels.sum())})")
    if math.isfinite(threshold):
        ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.4f}")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    return f'<img src="{figure_uri(fig)}" alt="histogram of image scores, good vs defective, with the threshold">'


def gallery_picks(result: EvalResult, top_k: int) -> tuple[list[int], list[int]]:
    """Indices of the ``top_k`` highest-scoring good and lowest-scoring defective images."""
    order = np.argsort(-result.scores, kind="stable")  # (N,) highest score first
    fps = [int(i) for i in order if result.labels[i] == 0][:top_k]
    fns = [int(i) for i in order[::-1] if result.labels[i] == 1][:top_k]
    return fps, fns


def panel(result: EvalResult, sample: Sample, i: int, size: int, vmax: float) -> tuple[Image.Image, bool]:
    """image | map | overlay (| ground truth) of test image ``i``, scaled to a readable height; and
    whether it has the ground-truth tile."""
    image = tensor_to_uint8(image_to_tensor(read_image(sample.image), size))  # (S, S, 3)
    if result.masks is not None:
        mask = result.masks[i]
    elif sample.mask is not None:
        mask = read_mask(sample.mask, size).numpy() > 0.5
    else:
        mask = None
    img = overlay_panel(image, result.maps[i], 0.0, vmax, mask)
    height = int(np.clip(img.height, *PANEL_HEIGHT))
    if height != img.height:
        img = img.resize((round(img.width * height / img.height), height),
                         Image.NEAREST if height > img.height else Image.LANCZOS)
    return img, mask is not None


def gallery(result: EvalResult, samples: Sequence[Sample], picks: list[int], size: int, threshold: float,
            vmax: float, kind: str) -> str:
    if not picks:
        return f'<p class="note">No {"good" if kind == "fp" else "defective"} test images.</p>'
    items = []
    for rank, i in enumerate(picks, 1):
        s, score = samples[i], float(result.scores[i])
        img, has_mask = panel(result, s, i, size, vmax)
        tiles = "image | anomaly map | overlay" + (" | ground truth" if has_mask else "")
        if kind == "fp":
            wrong, verdict = score > threshold, "above the threshold: false positive"
            ok = "at or below the threshold: correctly good"
        else:
            wrong, verdict = score <= threshold, "at or below the threshold: false negative"
            ok = "above the threshold: correctly detected"
        status = f'<span class="miss">{verdict}</span>' if wrong else ok
        items.append(
            f'<figure><img src="{image_uri(img)}" alt="{esc(s.image.name)}: {tiles}">'
            f"<figcaption>#{rank} <b>{esc(s.defect_type)}</b> / {esc(s.image.name)}<br>"
            f'<span title="{esc(s.image)}">score {score:.4f}</span>, {status}<br>'
            f'<span class="note">{tiles}</span></figcaption></figure>')
    return '<div class="gallery">' + "".join(items) + "</div>"


def metrics_table(result: EvalResult) -> str:
    head = "<tr><th>defect type</th>" + "".join(f"<th>{esc(label)}</th>" for _, label in COLUMNS) + "</tr>"
    rows = [("all types", result.metrics)] + list(result.per_type.items())
    body = "".join(f"<tr><td>{'<b>all types</b>' if n == 0 else esc(name)}</td>"
                   + "".join(cell(vals.get(key)) for key, _ in COLUMNS) + "</tr>"
                   for n, (name, vals) in enumerate(rows))
    return f"<table>{head}{body}</table>"


def render_report(result: EvalResult, run: RunInfo, samples: Sequence[Sample], top_k: int = 8) -> str:
    """The report as one HTML string (see the module docstring)."""
    if len(samples) != len(result.scores):
        raise AdtrError(f"the report needs the {len(result.scores)} evaluated samples, got {len(samples)}")
    if top_k < 0:
        raise AdtrError(f"--top-k {top_k}: the gallery size must be >= 0")
    m, thr, labels = result.metrics, run.threshold, result.labels
    n_good, n_bad = int((labels == 0).sum()), int(labels.sum())
    n_fp, n_fn = int((result.scores[labels == 0] > thr).sum()), int((result.scores[labels == 1] <= thr).sum())
    thr_text = f"{thr:.4f}" if math.isfinite(thr) else "none (every image is good)"
    fps, fns = gallery_picks(result, top_k)
    if math.isfinite(thr) and thr > 0:
        vmax = 2 * thr
    else:
        vmax = max([float(result.maps[i].max()) for i in fps + fns] + [1e-6])
    details = {"run": run.name, **run.details, "adtr": package_version(),
               "generated": datetime.now().isoformat(timespec="seconds")}
    kv = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in details.items())
    config = json.dumps(run.config, indent=2, default=str)
    pixel_note = ("" if m["pixel_auroc"] is not None else
                  '<p class="note">Pixel metrics are absent (not zero): ground-truth masks were not given for '
                  "every defect type.</p>")
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>adtr report: {esc(run.name)}</title>'
        f"<style>{CSS}</style></head><body>",
        f"<h1>adtr test report: {esc(run.name)}</h1>",
        f'<h2>Run</h2><table class="kv">{kv}</table>',
        f"<details><summary>full config</summary><pre>{esc(config)}</pre></details>",
        "<h2>Threshold</h2>",
        f'<table class="kv"><tr><td>image-score threshold</td><td>{thr_text}</td></tr>'
        f"<tr><td>FPR obtained on the test set</td><td>{fmt(m['fpr_at_threshold'])} "
        f"({n_fp} of {n_good} good images above the threshold)</td></tr>"
        f"<tr><td>FNR obtained on the test set</td><td>{fmt(m['fnr_at_threshold'])} "
        f"({n_fn} of {n_bad} defective images at or below it)</td></tr>"
        f"{expected_fpr_row(run.expected_fpr)}"
        f"<tr><td>image AUROC</td><td>{fmt(m['image_auroc'])}</td></tr>"
        f"<tr><td>pixel AUROC</td><td>{fmt(m['pixel_auroc'])}</td></tr>"
        f"<tr><td>AUPRO</td><td>{fmt(m['aupro'])}</td></tr></table>",
        '<p class="note">An image is anomalous when its score is above the threshold.</p>',
        "<h2>Metrics</h2>", metrics_table(result),
        '<p class="note">Each defect type is evaluated against all good test images, as usual for MVTec AD.</p>',
        pixel_note,
        '<h2>Curves</h2><div class="figs">', *roc_figures(result, samples), histogram_figure(result, thr), "</div>",
        f"<h2>Worst false positives: the {len(fps)} highest-scoring good images</h2>",
        '<p class="note">Marked in red: images the threshold gets wrong; the others are the closest calls it '
        "gets right.</p>",
        gallery(result, samples, fps, run.image_size, thr, vmax, "fp"),
        f"<h2>Worst false negatives: the {len(fns)} lowest-scoring defective images</h2>",
        gallery(result, samples, fns, run.image_size, thr, vmax, "fn"),
        f'<p class="note">Anomaly maps share one colour scale (jet): 0 (blue) to {vmax:.4f} (red)'
        f"{', twice the threshold' if math.isfinite(thr) and thr > 0 else ''}.</p>",
        "</body></html>\n",
    ]
    return "\n".join(parts)


def write_report(result: EvalResult, run: RunInfo, samples: Sequence[Sample], path: str | Path,
                 top_k: int = 8) -> Path:
    """Write :func:`render_report` to ``path`` atomically (never a half-written file); return the path.

    Args:
        result: What :func:`adtr.evaluate.evaluate` returned for ``samples``.
        run: The run's name, threshold, input size and description (:meth:`RunInfo.from_detector`).
        samples: The evaluated samples, in the same order.
        path: The HTML file to write; its folder is created.
        top_k: Gallery size: the ``top_k`` highest-scoring good and lowest-scoring defective images.
    """
    path = Path(path)
    atomic_write_bytes(render_report(result, run, samples, top_k).encode("utf-8", "backslashreplace"), path)
    return path
