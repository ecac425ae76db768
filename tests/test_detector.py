"""The Python API: its fast path (bf16 autocast) against the fp32 reference, and its inputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from adtr.data import index_mvtec
from adtr.detector import Detector
from adtr.engine import fit
from adtr.errors import AdtrError

from conftest import tiny_config


def test_bf16_inference_matches_fp32_within_tolerance(tiny_category, tmp_path):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    result = fit(tiny_config(), samples, tmp_path / "run")
    images = [s.image for s in index_mvtec(tiny_category.parent, tiny_category.name, "test")]
    ref = result.detector(device="cpu").predict(images)  # FitResult's shortcut to Detector.load
    fast = Detector.load(tmp_path / "run", device="cpu", precision="bf16").predict(images)
    ref_scores = np.array([p.score for p in ref])
    fast_scores = np.array([p.score for p in fast])
    # Stated tolerance: bf16 keeps 8 mantissa bits; scores agree to 2% relative, maps to 5% of their range.
    np.testing.assert_allclose(fast_scores, ref_scores, rtol=2e-2)
    for a, b in zip(ref, fast):
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 5e-2 * a.anomaly_map.max()
    assert np.corrcoef(ref_scores, fast_scores)[0, 1] > 0.99
    assert not np.array_equal(fast_scores, ref_scores)  # the fast path really ran in bf16
    with pytest.raises(AdtrError, match="unknown precision"):
        Detector.load(tmp_path / "run", device="cpu", precision="fp8")


def test_arrays_are_read_as_files_of_their_depth_are(tiny_run, tmp_path):
    """A uint16 frame scores as the same frame saved as a 16-bit PNG (it used to be clipped
    to 255, nearly white); floats in [0, 1] or [0, 255] and wide integers in 0..255 as uint8."""
    from PIL import Image

    det = Detector.load(tiny_run, device="cpu")
    rng = np.random.default_rng(0)
    frame16 = rng.integers(0, 65536, (40, 48), dtype=np.uint16)
    Image.fromarray(frame16).save(tmp_path / "frame16.png")
    assert Image.open(tmp_path / "frame16.png").mode.startswith("I")
    assert det.predict(frame16).score == pytest.approx(det.predict(tmp_path / "frame16.png").score, rel=1e-6)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    reference = det.predict(rgb).score
    for same in (rgb / 255.0, rgb.astype(np.float32), rgb.astype(np.int64)):
        assert det.predict(same).score == pytest.approx(reference, rel=1e-6), same.dtype
    for bad, says in ((rgb.astype(np.int64) * 16, r"values in \[0, 4080\]"), (rgb - 300.0, "values in"),
                      (np.zeros((0, 48, 3), np.uint8), "not an image"), (rgb.astype(str), "holds no pixel values")):
        with pytest.raises(AdtrError, match=says):
            det.predict(bad)


def test_a_prediction_prints_as_one_line_without_its_arrays(tiny_run, tiny_category):
    image = next((tiny_category / "test").rglob("*.png"))
    prediction = Detector.load(tiny_run, device="cpu").predict(str(image))
    text = repr(prediction)
    height, width = prediction.anomaly_map.shape
    assert "\n" not in text and "array" not in text and len(text) < 300
    assert f"score={prediction.score:.4g}" in text and f"threshold={prediction.threshold:.4g}" in text
    assert ("anomalous" if prediction.is_anomalous else "normal") in text.split(",")[0]
    assert f"map={height}x{width}" in text and f"defect_pixels={prediction.defect_mask.sum()}" in text
    assert repr(str(image)) in text


def test_score_tensors_refuses_batches_that_would_score_wrongly(tiny_run):
    """A 0-255, integer, channels-last or wrongly sized batch used to score without complaint."""
    import torch

    det = Detector.load(tiny_run, device="cpu")
    s = det.image_size
    good = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    maps, scores = det.score_tensors(good)
    assert maps.shape == (2, s, s) and scores.shape == (2,)
    np.testing.assert_array_equal(det.score_tensors(good.numpy())[1], scores)  # numpy is taken as it is
    cases = {
        "divide by 255": good * 255,
        "uint8 (divide by 255)": (good * 255).to(torch.uint8),
        "channels last?": good.permute(0, 2, 3, 1),
        f"(B, 3, {s}, {s}) batch, got (2, 1, {s}, {s})": good[:, :1],
        f"got (3, {s}, {s})": good[0],
        f"got (2, 3, {s + 1}, {s + 1})": torch.rand(2, 3, s + 1, s + 1),
        "got -1 to": good * 2 - 1,
        "not a list": [good],
    }
    for expected, batch in cases.items():
        with pytest.raises(AdtrError, match=re.escape(expected)):
            det.score_tensors(batch)


def test_load_refuses_a_device_it_cannot_use(tiny_run, monkeypatch):
    import torch

    with pytest.raises(AdtrError, match=re.escape("unknown device 'gpu'")):
        Detector.load(tiny_run, device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AdtrError, match="torch sees no CUDA GPU here"):
        Detector.load(tiny_run, device="cuda")
    assert Detector.load(tiny_run, device="cpu").device == torch.device("cpu")
def test_predict_takes_folders_globs_batches_tensors_and_iterables(tiny_run, tiny_category):
    """One image gives one Prediction; a folder, a glob, a 4-D batch or any iterable gives a
    list, in input order, scored as the files themselves are."""
    import torch
    from PIL import Image

    from adtr.detector import Prediction

    det = Detector.load(tiny_run, device="cpu")
    good = tiny_category / "test" / "good"
    paths = sorted(good.glob("*.png"))
    ref = [p.score for p in det.predict(paths)]
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # (N, H, W, 3), RGB
    tensors = torch.from_numpy(arrays).permute(0, 3, 1, 2)  # (N, C, H, W), torchvision's layout
    for many in (good, str(good), str(good / "*.png"), [good], arrays, tensors, arrays / 255.0,
                 (a for a in arrays), iter(list(tensors))):
        got = det.predict(many, batch_size=3)
        assert isinstance(got, list) and all(isinstance(p, Prediction) for p in got), type(many)
        np.testing.assert_allclose([p.score for p in got], ref, rtol=1e-5)
    assert [p.source for p in det.predict(good)] == [str(p) for p in paths]
    assert [p.source for p in det.predict(arrays[:2])] == ["ndarray[0]", "ndarray[1]"]
    for one in (paths[0], str(paths[0]), Image.open(paths[0]), arrays[0], tensors[0]):
        got = det.predict(one)
        assert isinstance(got, Prediction) and got.score == pytest.approx(ref[0], rel=1e-5)
        assert got.anomaly_map.shape == got.defect_mask.shape == arrays.shape[1:3]
    assert det.predict(arrays[:3], batch_size=np.int64(2))[2].score == pytest.approx(ref[2], rel=1e-5)
    assert det.predict([]) == []


def test_predict_refuses_a_batch_size_that_is_not_a_whole_number(tiny_run, tiny_category):
    det = Detector.load(tiny_run, device="cpu")
    image = sorted((tiny_category / "test" / "good").glob("*.png"))[0]
    for bad in (2.5, 0, True, "2"):
        with pytest.raises(AdtrError, match=f"batch_size must be a whole number of at least 1, got {bad!r}"):
            det.predict([image], batch_size=bad)
    with pytest.raises(AdtrError, match="on_error must be 'raise' or 'skip'"):
        det.predict(image, on_error="ignore")


def test_channels_first_arrays_are_refused_with_the_fix(tiny_run):
    det = Detector.load(tiny_run, device="cpu")
    chw = np.zeros((3, 40, 48), np.uint8)
    with pytest.raises(AdtrError, match=r"looks channels-first: use a\.transpose\(1, 2, 0\)"):
        det.predict(chw)
    with pytest.raises(AdtrError, match=r"^ndarray\[1\]: array of shape \(3, 40, 48\).*channels-first"):
        det.predict([chw.transpose(1, 2, 0), chw])  # in a collection the message says which one
    with pytest.raises(AdtrError, match=r"shape \(2, 3, 40, 48\) is not a batch.*transpose\(0, 2, 3, 1\)"):
        det.predict(np.stack([chw, chw]))


def test_predict_can_skip_unreadable_inputs(tiny_run, tiny_category, tmp_path):
    """on_error="skip" mirrors `adtr predict --skip-unreadable`: an Unreadable with score None
    where the input was, the others scored; by default the first one raises, naming it."""
    import shutil

    from adtr.detector import Prediction, Unreadable

    det = Detector.load(tiny_run, device="cpu")
    folder = tmp_path / "in"
    shutil.copytree(tiny_category / "test" / "good", folder)
    (folder / "001b_text.png").write_text("not an image")
    with pytest.raises(AdtrError, match="001b_text.png: cannot read image"):
        det.predict(folder)
    got = det.predict(folder, on_error="skip", batch_size=2)
    names = sorted(p.name for p in folder.iterdir())
    assert [Path(r.source).name for r in got] == names
    skipped = [r for r in got if isinstance(r, Unreadable)]
    assert [Path(r.source).name for r in skipped] == ["001b_text.png"] and skipped[0].score is None
    assert "001b_text.png: cannot read image" in skipped[0].error
    assert sum(isinstance(r, Prediction) for r in got) == len(names) - 1
    mixed = det.predict([np.zeros((40, 48, 3), np.uint8), np.full((40, 48), np.nan)], on_error="skip")
    assert isinstance(mixed[0], Prediction) and mixed[1] == Unreadable("ndarray[1]",
                                                                       "ndarray[1]: image array contains NaN or inf")
    assert isinstance(det.predict(folder / "001b_text.png", on_error="skip"), Unreadable)
    with pytest.raises(AdtrError, match="no such file, folder or matching pattern"):
        det.predict(str(folder / "*.jpg"), on_error="skip")  # naming nothing is not an unreadable image
