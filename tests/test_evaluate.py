"""``evaluate``: its scores, maps and metrics recomputed independently (sklearn, the mask files)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from adtr.data import index_mvtec
from adtr.detector import Detector
from adtr.evaluate import evaluate


def test_metrics_overall_and_per_type_match_an_independent_computation(tiny_run, tiny_category):
    """Each defect type is ranked against all good images; the maps line up with the masks of
    the same samples; metrics are plain floats (JSON-ready), as `adtr test` writes them."""
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "test")
    det = Detector.load(tiny_run, device="cpu")
    res = evaluate(det, samples, batch_size=3)  # batches that do not divide the set

    predicted = np.array([p.score for p in det.predict([s.image for s in samples])])
    np.testing.assert_allclose(res.scores, predicted, rtol=1e-5)
    labels = np.array([s.label for s in samples])
    kinds = np.array([s.defect_type for s in samples])
    np.testing.assert_array_equal(res.labels, labels)
    assert res.metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, predicted), abs=1e-9)
    assert set(res.per_type) == set(kinds[labels == 1]) and len(res.per_type) >= 2
    for kind, metrics in res.per_type.items():
        chosen = (labels == 0) | (kinds == kind)
        assert metrics["n_images"] == chosen.sum()
        assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels[chosen], predicted[chosen]), abs=1e-9)

    size = det.image_size
    truth = np.stack([np.array(Image.open(s.mask).convert("L").resize((size, size), Image.Resampling.NEAREST)) > 0
                      if s.mask else np.zeros((size, size), bool) for s in samples])
    assert res.maps.shape == truth.shape and truth.any()
    np.testing.assert_array_equal(res.masks, truth)
    assert res.metrics["pixel_auroc"] == pytest.approx(roc_auc_score(truth.ravel(), res.maps.ravel()), abs=1e-6)
    for name in ("image_auroc", "image_f1_max", "pixel_auroc", "aupro", "fpr_at_threshold", "fnr_at_threshold"):
        assert type(res.metrics[name]) is float, name
