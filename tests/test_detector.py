"""The Python API's fast path (bf16 autocast) against the fp32 reference."""

from __future__ import annotations

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
