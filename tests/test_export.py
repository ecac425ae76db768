"""ONNX export: one graph image -> (map, score) that matches PyTorch, and its CLI and engine."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx  # onnx, onnxscript and onnxruntime are core dependencies: a broken install fails here, not skips
import onnxruntime  # noqa: F401
import onnxscript  # noqa: F401
import pytest
import torch

from adtr import checkpoint as ckpt_io
from adtr.cli import main
from adtr.data import index_mvtec
from adtr.detector import Detector
from adtr.engine import fit
from adtr.errors import AdtrError
from adtr.export import RTOL, OnnxScorer, load_scoring_model

from conftest import tiny_config


@pytest.fixture(scope="module")
def run(tiny_category, tmp_path_factory) -> Path:
    """A tiny trained run (64 px) exported with `adtr export RUN --format onnx`."""
    run = tmp_path_factory.mktemp("export") / "run"
    fit(tiny_config(epochs=1), index_mvtec(tiny_category.parent, tiny_category.name, "train"), run)
    assert main(["export", str(run), "--format", "onnx"]) == 0
    return run


@pytest.fixture(scope="module")
def det(run) -> Detector:
    """The run with the torch engine: the reference."""
    return Detector.load(run, device="cpu")


@pytest.fixture(scope="module")
def test_images(tiny_category) -> list[Path]:
    return [s.image for s in index_mvtec(tiny_category.parent, tiny_category.name, "test")]


def test_export_writes_one_checked_graph_with_metadata(run, det):
    path = run / "model.onnx"
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []  # atomic: no leftovers
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and isinstance(dims[0], str) and dims[1:] == [3, 64, 64]  # dynamic batch
    assert [o.name for o in proto.graph.output] == ["anomaly_map", "score"]
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") > 30  # the backbone is inside, not only the transformer
    # attention, the map's upsampling and smoothing (two matmuls), score pooling; no Resize with the
    # default stages 1-3 (none is coarser than the grid, so no feature map is upsampled)
    assert {"Softmax", "MatMul", "AveragePool"} <= set(ops)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert int(meta["image_size"]) == 64 and float(meta["threshold"]) == det.threshold
    # everything an onnxruntime-only deployment needs for the decision and the defect mask
    assert float(meta["pixel_threshold"]) == det.pixel_threshold and meta["threshold_mode"] == "fpr"
    assert float(meta["sigma"]) == det.config.score.sigma and int(meta["pool_size"]) == det.config.score.pool_size


def test_scoring_model_computes_what_the_detector_does(run, det, test_images):
    scoring, _ = load_scoring_model(run)
    images = torch.stack([det.to_tensor(p) for p in test_images[:3]])
    maps, scores = det.score_tensors(images)
    with torch.no_grad():
        pmap, score = scoring(images)
    torch.testing.assert_close(pmap[:, 0], maps, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(score, scores, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_pytorch(run, det, test_images, batch):
    scorer = OnnxScorer(run / "model.onnx", device="cpu")
    real = torch.stack([det.to_tensor(p) for p in test_images[:batch]])
    noise = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    for images in (real, noise):
        ref_maps, ref_scores = det.score_tensors(images)
        maps, scores = scorer.score_tensors(images)
        assert maps.shape == ref_maps.shape == (batch, 64, 64) and scores.shape == ref_scores.shape == (batch,)
        assert maps.dtype == scores.dtype == torch.float32
        assert float(ref_maps.max()) > 0
        # Stated tolerance: maps within 1e-4 of their largest value, scores within 1e-4 relative.
        assert float((maps - ref_maps).abs().max()) <= RTOL * float(ref_maps.abs().max())
        torch.testing.assert_close(scores, ref_scores, rtol=RTOL, atol=0)
        # Same decisions at the run's threshold, and just below and above every score (0.1%, 10x the tolerance).
        for thr in [det.threshold, *(ref_scores * 0.999).tolist(), *(ref_scores * 1.001).tolist()]:
            assert torch.equal(scores > thr, ref_scores > thr), thr


def test_detector_onnx_engine(run, det, test_images):
    ref = det.predict(test_images, batch_size=5)
    fast = Detector.load(run, device="cpu", engine="onnx")
    assert det.scorer is None and fast.scorer is not None and fast.threshold == det.threshold
    out = fast.predict(test_images, batch_size=5)
    np.testing.assert_allclose([p.score for p in out], [p.score for p in ref], rtol=RTOL)
    assert [p.is_anomalous for p in out] == [p.is_anomalous for p in ref]
    for a, b in zip(out, ref):
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= RTOL * np.abs(b.anomaly_map).max()


def predict_both(run, inputs, out, *extra) -> tuple[list[dict], list[dict]]:
    """`adtr predict` with each engine; checks CSV and JSON agree; returns (torch rows, onnx rows) from JSON."""
    rows = {}
    for engine in ("torch", "onnx"):
        dest = out / engine
        argv = ["predict", str(run), *map(str, inputs), "--out", str(dest), "--no-overlays", *extra, "--engine", engine]
        assert main(argv) == 0
        with open(dest / "results.csv", newline="") as fh:
            table = list(csv.DictReader(fh))
        rows[engine] = json.loads((dest / "results.json").read_text())
        assert [(r["image"], r["label"]) for r in table] == [(r["image"], r["label"]) for r in rows[engine]]
    return rows["torch"], rows["onnx"]


def test_cli_predict_with_onnx_engine_gives_torch_labels(run, tiny_category, tmp_path):
    inputs = [tiny_category / "test" / "*" / "*.png"]
    ref, out = predict_both(run, inputs, tmp_path / "calibrated")
    assert len(out) == len(ref) == 12
    assert [(r["image"], r["label"]) for r in out] == [(r["image"], r["label"]) for r in ref]
    np.testing.assert_allclose([r["score"] for r in out], [r["score"] for r in ref], rtol=RTOL)
    # Again at a threshold inside the score range, so that both labels occur.
    median = str(float(np.median([r["score"] for r in ref])))
    ref, out = predict_both(run, inputs, tmp_path / "median", "--threshold", median)
    assert [(r["image"], r["label"]) for r in out] == [(r["image"], r["label"]) for r in ref]
    assert {r["label"] for r in out} == {"good", "anomalous"}


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_or_stale_export_gives_clean_errors(run, test_images, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "model.pt", bare / "model.pt")
    err = one_line_error(capsys, ["predict", str(bare), str(test_images[0]), "--out", str(tmp_path / "p"),
                                  "--engine", "onnx"])
    assert str(bare / "model.onnx") in err and f"adtr export {bare} --format onnx" in err
    with pytest.raises(AdtrError, match="model.onnx"):
        OnnxScorer(bare / "model.onnx")

    # Re-calibration (another threshold) keeps the export valid; other weights do not.
    ckpt = ckpt_io.load_checkpoint(run / "model.pt")
    ckpt["calibration"]["threshold"] = 123.0
    ckpt_io.atomic_save(ckpt, bare / "model.pt")
    shutil.copy(run / "model.onnx", bare / "model.onnx")
    assert Detector.load(bare, device="cpu", engine="onnx").threshold == 123.0
    ckpt["model"]["output_proj.bias"] = ckpt["model"]["output_proj.bias"] + 1.0
    ckpt_io.atomic_save(ckpt, bare / "model.pt")
    with pytest.raises(AdtrError, match="other weights"):
        Detector.load(bare, device="cpu", engine="onnx")
    # Nor do other map or score settings: the graph has them built in.
    for key, value in (("sigma", 2.0), ("pool_size", 16)):
        ckpt = ckpt_io.load_checkpoint(run / "model.pt")
        ckpt["config"]["score"][key] = value
        ckpt_io.atomic_save(ckpt, bare / "model.pt")
        with pytest.raises(AdtrError, match="other weights"):
            Detector.load(bare, device="cpu", engine="onnx")

    # Metadata edited into something that is not a number: one line naming the file.
    proto = onnx.load(str(run / "model.onnx"))
    for prop in proto.metadata_props:
        if prop.key == "image_size":
            prop.value = "abc"
    onnx.save(proto, str(bare / "model.onnx"))
    with pytest.raises(AdtrError, match=r"model\.onnx: metadata image_size 'abc' .* is not a number"):
        OnnxScorer(bare / "model.onnx")


def test_a_graph_that_disagrees_with_pytorch_is_not_written(run, tmp_path, monkeypatch):
    """The parity check is a gate: an exporter that produced wrong outputs would stop here."""
    import adtr.export

    exported = (run / "model.onnx").read_bytes()  # stands in for a new export, which takes a while
    monkeypatch.setattr(adtr.export, "onnx_bytes", lambda *args, **kwargs: exported)
    monkeypatch.setattr(adtr.export, "parity", lambda *args, **kwargs: (1.0, 0.0))
    with pytest.raises(AdtrError, match=r"x\.onnx: ONNX outputs differ from PyTorch .*nothing written"):
        adtr.export.export_onnx(run, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(adtr.export, "parity", lambda *args, **kwargs: (0.0, 2 * RTOL))
    with pytest.raises(AdtrError, match="scores 2"):
        adtr.export.export_onnx(run, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_export_options_give_clean_errors(run, tmp_path, capsys):
    assert "opset" in one_line_error(capsys, ["export", str(run), "--opset", "11"])
    assert "is a folder" in one_line_error(capsys, ["export", str(run), "--out", str(tmp_path)])
    assert "not an adtr run" in one_line_error(capsys, ["export", str(tmp_path)])
    assert "engine torch" in one_line_error(capsys, ["predict", str(run), str(tmp_path), "--engine", "onnx",
                                                     "--precision", "bf16"])
    with pytest.raises(AdtrError, match="unknown engine"):
        Detector.load(run, engine="tensorrt")
