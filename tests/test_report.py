"""The HTML report: self-contained, complete, escaped; from ``adtr test``/``adtr report`` and from Python."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adtr.cli import main
from adtr.data import Sample
from adtr.errors import AdtrError
from adtr.evaluate import EvalResult, compute_metrics
from adtr.report import RunInfo, render_report, write_report

from conftest import TINY_FIT_ARGS

URL_ATTRS = {"src", "href", "srcset", "data", "action", "poster", "background", "xlink:href", "formaction"}
DATA_PNG = "data:image/png;base64,"


class Tags(HTMLParser):
    """Every start tag and its attributes, and every figure caption's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.captions: list[str] = []
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "figcaption":
            self._in_caption = True
            self.captions.append("")

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data):
        if self._in_caption:
            self.captions[-1] += data


def check_self_contained(text: str) -> Tags:
    """Fail unless ``text`` loads nothing from outside: only data: PNGs, no scripts, links or URLs."""
    tags = Tags()
    tags.feed(text)
    names = {t for t, _ in tags.tags}
    assert not names & {"script", "link", "iframe", "object", "embed", "base", "a", "source"}, names
    for tag, attrs in tags.tags:
        for key, value in attrs.items():
            if key in URL_ATTRS:
                assert key == "src" and value.startswith(DATA_PNG), (tag, key, value[:80])
            assert not key.startswith("on"), (tag, key)  # no event handlers
    low = text.lower()
    for needle in ("http://", "https://", "file:", "url(", "@import", "<script", "javascript:"):
        assert needle not in low, needle
    return tags


def embedded_pngs(tags: Tags) -> list[Image.Image]:
    """Decode every ``<img>``; each must be a complete PNG."""
    images = []
    for tag, attrs in tags.tags:
        if tag == "img":
            img = Image.open(io.BytesIO(base64.b64decode(attrs["src"][len(DATA_PNG):], validate=True)))
            assert img.format == "PNG"
            img.load()  # raises on truncated data
            images.append(img)
    return images


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells after the first of the metrics-table row whose first cell is ``first_cell`` (HTML)."""
    match = re.search(rf"<tr><td>{re.escape(first_cell)}</td>(.*?)</tr>", text)
    assert match, f"no row {first_cell!r}"
    return re.findall(r"<td[^>]*>(.*?)</td>", match.group(1))


def expected_cells(m: dict) -> list[str]:
    keys = ("n_images", "n_anomalous", "image_auroc", "image_f1_max", "pixel_auroc", "aupro",
            "fpr_at_threshold", "fnr_at_threshold")
    return [str(m[k]) if isinstance(m[k], int) else "absent" if m[k] is None else f"{m[k]:.4f}" for k in keys]


@pytest.fixture(scope="module")
def run(tiny_category, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "run"
    assert main(["fit", str(tiny_category), "--out", str(path), *TINY_FIT_ARGS, "--epochs", "1"]) == 0
    return path


def test_adtr_test_writes_a_complete_self_contained_report(run, tiny_category, tmp_path, capsys):
    out = tmp_path / "t"
    capsys.readouterr()
    assert main(["test", str(run), "--data", str(tiny_category), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = out / "report.html"
    assert f"report written to {report}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html"]  # no temporary files left
    text = report.read_text(encoding="utf-8")
    tags = check_self_contained(text)
    images = embedded_pngs(tags)
    alts = [a["alt"] for t, a in tags.tags if t == "img"]
    for figure in ("image-level ROC curve", "pixel-level ROC curve", "PRO curve up to FPR 0.3",
                   "histogram of image scores, good vs defective, with the threshold"):
        assert figure in alts
    # Gallery: all 4 good test images (fewer than 8) and the 8 lowest-scoring of the 8 defective ones,
    # each with image | map | overlay | ground truth (4 tiles of 64 px scaled to >= 160 px high).
    assert len(images) == 4 + 4 + 8
    assert all(img.height >= 160 and img.width > 3.9 * img.height for img in images[4:])
    saved = json.loads((out / "metrics.json").read_text())
    assert table_row(text, "<b>all types</b>") == expected_cells(saved["metrics"])
    assert set(saved["per_type"]) == {"crack", "hole", "scratch", "spot"}
    for name, m in saved["per_type"].items():
        assert table_row(text, name) == expected_cells(m)
    thr, m = saved["threshold"], saved["metrics"]
    assert f"<td>image-score threshold</td><td>{thr:.4f}</td>" in text
    assert f"<td>FPR obtained on the test set</td><td>{m['fpr_at_threshold']:.4f} (" in text
    assert f"<td>FNR obtained on the test set</td><td>{m['fnr_at_threshold']:.4f} (" in text
    rate = saved["expected_fpr"]
    assert (f"<td>FPR expected from the calibration</td><td>{rate['expected']:.4f} (90% interval "
            f"{rate['low']:.4f}-{rate['high']:.4f}") in text
    good = [c for c in tags.captions if re.match(r"#\d+ good / ", c)]
    bad = [c for c in tags.captions if re.match(r"#\d+ (crack|hole|scratch|spot) / ", c)]
    assert sorted(c.split(" / ")[1].split("score")[0] for c in good) == [f"00{i}.png" for i in range(4)]
    assert len(bad) == 8 and [c.split(" ")[0] for c in bad] == [f"#{i}" for i in range(1, 9)]
    assert all("ground truth" in c for c in good + bad)

    assert main(["test", str(run), "--data", str(tiny_category), "--out", str(tmp_path / "n"), "--no-report"]) == 0
    assert not (tmp_path / "n" / "report.html").exists() and (tmp_path / "n" / "metrics.json").is_file()


def test_report_verb_escapes_names_and_shows_absent_pixel_metrics(run, tiny_category, tmp_path, capsys):
    # A plain test folder without masks, a defect type and a file name that are HTML.
    test = tmp_path / "data"
    shutil.copytree(tiny_category / "test" / "good", test / "good")
    evil = test / "<script>alert(1)"
    shutil.copytree(tiny_category / "test" / "hole", evil)
    shutil.copy(evil / "000.png", evil / '<img src=x onerror="alert(2)">.png')
    out = tmp_path / "r" / "custom.html"
    capsys.readouterr()
    assert main(["report", str(run), "--data", str(test), "--out", str(out), "--top-k", "2"]) == 0
    assert f"report written to {out}" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["custom.html"]  # only the report, nothing else
    text = out.read_text(encoding="utf-8")
    tags = check_self_contained(text)  # fails on a raw <script> or an <img src=x ...>
    assert "&lt;script&gt;alert(1)" in text
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;.png" in text
    assert len(embedded_pngs(tags)) == 2 + 2 + 2  # image ROC, histogram, 2 + 2 gallery panels
    alts = [a["alt"] for t, a in tags.tags if t == "img"]
    assert "pixel-level ROC curve" not in alts and "PRO curve up to FPR 0.3" not in alts
    assert "Pixel ROC and PRO curves absent" in text and "Pixel metrics are absent (not zero)" in text
    for first in ("<b>all types</b>", "&lt;script&gt;alert(1)"):
        cells = table_row(text, first)
        assert cells[4:6] == ["absent", "absent"]  # pixel AUROC, AUPRO
        assert cells[2] != "absent" and float(cells[2]) >= 0.0  # image AUROC is there
    assert '<td class="absent">absent</td>' in text
    assert "<td>AUPRO</td><td>absent</td>" in text
    assert not [c for c in tags.captions if "ground truth" in c]  # no masks: three tiles


def synthetic(tmp_path: Path, threshold: float = 0.5):
    """6 tiny images with chosen scores: good 0.1, 0.9, 0.4; defective 0.3, 0.8, 0.95.

    The defect types are matplotlib hazards: ``$x^$`` would be (broken) mathtext, a leading
    ``_`` hides a legend entry.
    """
    rng = np.random.default_rng(0)
    samples = []
    for i, (label, kind) in enumerate([(0, "good")] * 3 + [(1, "a$x^$")] * 2 + [(1, "_u")]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(path, label, kind, None))
    scores = np.array([0.1, 0.9, 0.4, 0.3, 0.8, 0.95])
    labels = np.array([s.label for s in samples])
    maps = rng.random((6, 16, 16)).astype(np.float32)
    metrics = compute_metrics(labels, scores, None, maps, threshold)
    per_type = {}
    for t in ("_u", "a$x^$"):
        sel = np.array([s.label == 0 or s.defect_type == t for s in samples])
        per_type[t] = compute_metrics(labels[sel], scores[sel], None, maps[sel], threshold)
    result = EvalResult(metrics, per_type, scores, labels, maps, None)
    return result, RunInfo("syn<run>", threshold, 16, {"model": {"backbone": "x"}}), samples


def test_gallery_order_and_verdicts_and_rates(tmp_path):
    result, info, samples = synthetic(tmp_path)
    path = write_report(result, info, samples, tmp_path / "out" / "report.html", top_k=2)
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]
    text = path.read_text(encoding="utf-8")
    tags = check_self_contained(text)
    assert "<title>adtr report: syn&lt;run&gt;</title>" in text
    captions = [c.replace("\xa0", " ") for c in tags.captions]
    assert len(captions) == 4
    # Worst false positives: the highest-scoring good images first; worst false negatives: the lowest defective.
    expected = [("#1 good / img1.png", "score 0.9000, above the threshold: false positive"),
                ("#2 good / img2.png", "score 0.4000, at or below the threshold: correctly good"),
                ("#1 a$x^$ / img3.png", "score 0.3000, at or below the threshold: false negative"),
                ("#2 a$x^$ / img4.png", "score 0.8000, above the threshold: correctly detected")]
    for caption, (head, verdict) in zip(captions, expected):
        assert caption.startswith(head) and verdict in caption, caption
    assert text.count('class="miss"') == 2
    assert "<td>0.3333 (1 of 3 good images above the threshold)</td>" in text
    assert "<td>0.3333 (1 of 3 defective images at or below it)</td>" in text
    assert "<td>image-score threshold</td><td>0.5000</td>" in text
    assert table_row(text, "<b>all types</b>")[:3] == ["6", "3", f"{result.metrics['image_auroc']:.4f}"]
    assert table_row(text, "_u")[:3] == ["4", "1", "1.0000"] and table_row(text, "a$x^$")[:2] == ["5", "2"]
    embedded_pngs(tags)


def test_no_threshold_and_bad_arguments(tmp_path):
    result, info, samples = synthetic(tmp_path, threshold=float("inf"))
    text = render_report(result, info, samples, top_k=0)
    assert "<td>image-score threshold</td><td>none (every image is good)</td>" in text
    assert "<figcaption>" not in text  # an empty gallery
    with pytest.raises(AdtrError, match="top-k"):
        render_report(result, info, samples, top_k=-1)
    with pytest.raises(AdtrError, match="evaluated samples"):
        render_report(result, info, samples[:-1])
