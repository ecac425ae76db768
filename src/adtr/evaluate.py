"""``adtr test``: metrics of a run on labelled test images (image and pixel level)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from adtr.data import ImageDataset, Sample, has_masks
from adtr.detector import Detector
from adtr.metrics import aupro, f1_max, image_auroc, pixel_auroc
from adtr.progress import batches


@dataclass
class EvalResult:
    """Scores, maps and metrics of labelled test images, in the order of the samples given.

    ``metrics`` (and each ``per_type[defect type]``, that type against all good images):
    ``n_images``, ``n_anomalous``, ``image_auroc``, ``image_f1_max``, ``fpr_at_threshold``,
    ``fnr_at_threshold`` (at the detector's active threshold), ``pixel_auroc`` and ``aupro``
    (FPR up to 0.3), plain floats; a metric that the data cannot give (pixel metrics without
    masks, AUROC without both classes) is ``None``, never 0.
    """

    metrics: dict[str, float | None]
    per_type: dict[str, dict[str, float | None]]
    scores: np.ndarray  # (N,) float32 image scores
    labels: np.ndarray  # (N,) 0 good, 1 defective
    # (N, S, S) float32 anomaly maps at the model's input size S (Prediction.anomaly_map is at the image's own size)
    maps: np.ndarray = field(repr=False)
    masks: np.ndarray | None = field(repr=False)  # (N, S, S) bool ground truth, None without masks


def compute_metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None, maps: np.ndarray,
                    threshold: float) -> dict[str, float | None]:
    """Image AUROC, F1-max, pixel AUROC, AUPRO (FPR <= 0.3), and the rates at ``threshold``."""
    out: dict[str, float | None] = {"n_images": int(len(labels)), "n_anomalous": int(labels.sum())}
    both = 0 < labels.sum() < len(labels)
    out["image_auroc"] = float(image_auroc(labels, scores)) if both else None
    out["image_f1_max"] = float(f1_max(labels, scores)[0]) if labels.sum() > 0 else None
    pred = scores > threshold
    good, bad = labels == 0, labels == 1
    out["fpr_at_threshold"] = float(pred[good].mean()) if good.any() else None
    out["fnr_at_threshold"] = float((~pred[bad]).mean()) if bad.any() else None
    if masks is not None and masks.any() and (~masks).any():
        out["pixel_auroc"] = float(pixel_auroc(masks, maps))
        out["aupro"] = float(aupro(masks, maps))
    else:
        out["pixel_auroc"] = out["aupro"] = None
    return out


def evaluate(detector: Detector, samples: Sequence[Sample], batch_size: int = 16) -> EvalResult:
    """Score every test sample and compute overall and per-defect-type metrics."""
    ds = ImageDataset(samples, detector.image_size)
    maps, scores, masks = [], [], []
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    for batch in batches(loader, "test"):
        m, s = detector.score_tensors(batch["image"])
        maps.append(m.numpy().astype(np.float32))
        scores.append(s.numpy())
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
    maps_a, scores_a, masks_a = np.concatenate(maps), np.concatenate(scores), np.concatenate(masks)
    labels = np.array([s.label for s in samples])
    pixel_ok = has_masks(samples)
    thr = detector.threshold if math.isfinite(detector.threshold) else float("inf")
    metrics = compute_metrics(labels, scores_a, masks_a if pixel_ok else None, maps_a, thr)
    per_type = {}
    types = sorted({s.defect_type for s in samples if s.label == 1})
    for t in types:
        # Each defect type against all good images, as is usual for MVTec AD.
        sel = np.array([s.label == 0 or s.defect_type == t for s in samples])
        typed_masks = all(s.mask is not None for s in samples if s.defect_type == t)
        per_type[t] = compute_metrics(labels[sel], scores_a[sel], masks_a[sel] if typed_masks else None,
                                      maps_a[sel], thr)
    return EvalResult(metrics, per_type, scores_a, labels, maps_a, masks_a if pixel_ok else None)
