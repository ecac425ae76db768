"""The Python API: its fast path (bf16 autocast) against the fp32 reference, and its inputs."""

from __future__ import annotations

import re

import numpy as np
import pytest

from adtr.data import index_mvtec
from adtr.detector import Detector
from adtr.engine import fit
from adtr.errors import AdtrError

from conftest import tiny_config


def test_bf16_inference_matches_fp32_within_tolerance(tiny_category, tmp_path):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    fit(tiny_config(), samples, tmp_path / "run")
    images = [s.image for s in index_mvtec(tiny_category.parent, tiny_category.name, "test")]
    ref = Detector.load(tmp_path / "run", device="cpu").predict(images)
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
