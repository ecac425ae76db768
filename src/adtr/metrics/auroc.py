"""Image- and pixel-level ROC metrics and the best F1 score.

All functions are pure numpy on already computed scores. They never "fix" a bad
model: an AUROC below 0.5 is reported as is, because flipping it would hide an
inverted anomaly score. Inputs that make a metric undefined (only one class
present) raise :class:`AdtrError` so callers can decide to skip or report.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import precision_recall_curve

from adtr.errors import AdtrError


def _as_labels(labels: ArrayLike, name: str) -> np.ndarray:
    """Return ``labels`` as a bool array, rejecting anything but 0/1 values."""
    arr = np.asarray(labels)
    if arr.dtype != np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise AdtrError(f"{name} must contain only 0/1 (or bool) values")
        arr = arr.astype(bool)
    return arr


def _as_scores(scores: ArrayLike, name: str, dtype: type = np.float64) -> np.ndarray:
    """Return ``scores`` as a float array, rejecting NaN/inf (they break sorting)."""
    arr = np.asarray(scores, dtype=dtype)
    if not np.isfinite(arr).all():
        raise AdtrError(f"{name} contain NaN or infinite values")
    return arr


def check_masks_and_maps(
    masks: ArrayLike, maps: ArrayLike, dtype: type = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Validate pixel-level inputs shared by pixel AUROC and AUPRO.

    Args:
        masks: Ground truth, shape (N, H, W), bool or 0/1; True = anomalous.
        maps: Anomaly maps, shape (N, H, W), higher = more anomalous.
        dtype: Float dtype for the returned maps.

    Returns:
        ``(masks, maps)`` as a bool array and a ``dtype`` array, both (N, H, W).

    Raises:
        AdtrError: On wrong dimensionality, mismatched shapes, non-binary masks
            or non-finite scores.
    """
    m = _as_labels(masks, "masks")
    a = _as_scores(maps, "anomaly maps", dtype)
    if m.ndim != 3 or a.ndim != 3:
        raise AdtrError(
            f"masks and anomaly maps must have shape (N, H, W), got {m.shape} and {a.shape}"
        )
    if m.shape != a.shape:
        raise AdtrError(f"masks shape {m.shape} does not match anomaly maps shape {a.shape}")
    return m, a


def _roc(positive: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact ROC curve by sorting once; ties are one ROC point (as in sklearn).

    Written by hand instead of calling sklearn so that millions of pixels cost
    only a sort and two cumulative sums, without sklearn's extra copies.

    Args:
        positive: Flat bool array, True = anomalous, shape (M,).
        scores: Flat float array, shape (M,).
        what: Name used in the error message.

    Returns:
        ``(fpr, tpr)``, each shape (K,), non-decreasing from (0, 0) to (1, 1).
    """
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise AdtrError(
            f"{what} AUROC is undefined: need both normal and anomalous samples, "
            f"got {n_neg} normal and {n_pos} anomalous"
        )
    order = np.argsort(scores, kind="stable")[::-1]
    s = scores[order]
    tps = np.cumsum(positive[order], dtype=np.int64)
    del order
    # Last index of each group of equal scores: one ROC point per threshold.
    last = np.flatnonzero(np.diff(s))
    last = np.append(last, s.size - 1)
    tps = tps[last]
    fps = (last + 1) - tps
    tpr = np.concatenate(([0.0], tps / n_pos))
    fpr = np.concatenate(([0.0], fps / n_neg))
    return fpr, tpr


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Image-level ROC curve, the one :func:`image_auroc` integrates.

    Args:
        labels: Shape (N,), 0/1 or bool, 1 = anomalous.
        scores: Shape (N,), higher = more anomalous.

    Returns:
        ``(fpr, tpr)``, each shape (K,), from (0, 0) to (1, 1), one point per distinct score.

    Raises:
        AdtrError: If only one class is present or shapes differ.
    """
    y = _as_labels(labels, "labels").ravel()
    s = _as_scores(scores, "scores").ravel()
    if y.shape != s.shape:
        raise AdtrError(f"got {y.size} labels but {s.size} scores")
    return _roc(y, s, "image")


def pixel_roc_curve(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-level ROC curve over all pixels of all images, the one :func:`pixel_auroc` integrates.

    Args:
        masks: Shape (N, H, W), bool or 0/1, True = anomalous pixel.
        maps: Shape (N, H, W), higher = more anomalous.

    Returns:
        ``(fpr, tpr)``, each shape (K,); K can be as large as N * H * W.

    Raises:
        AdtrError: If all pixels are of one class or shapes mismatch.
    """
    m, a = check_masks_and_maps(masks, maps, np.float32)
    return _roc(m.ravel(), a.ravel(), "pixel")


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level AUROC (never flipped: 0.0 means perfectly inverted scores).

    Args:
        labels: Shape (N,), 0/1 or bool, 1 = anomalous.
        scores: Shape (N,), higher = more anomalous.

    Raises:
        AdtrError: If only one class is present or shapes differ.
    """
    fpr, tpr = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel-level AUROC pooled over all pixels of all images.

    Maps are handled as float32 to keep 100 images of 256x256 within ~150 MB.

    Args:
        masks: Shape (N, H, W), bool or 0/1, True = anomalous pixel.
        maps: Shape (N, H, W), higher = more anomalous.

    Raises:
        AdtrError: If all pixels are of one class or shapes mismatch.
    """
    fpr, tpr = pixel_roc_curve(masks, maps)
    return float(np.trapezoid(tpr, fpr))


def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds, used to report a threshold-free F1.

    Args:
        labels: Shape (N,), 0/1 or bool, 1 = anomalous. Works for pixels too
            after flattening.
        scores: Shape (N,), higher = more anomalous.

    Returns:
        ``(best_f1, threshold)``; predicting ``score >= threshold`` as
        anomalous reaches ``best_f1``.

    Raises:
        AdtrError: If there is no anomalous sample (F1 is undefined).
    """
    y = _as_labels(labels, "labels").ravel()
    s = _as_scores(scores, "scores").ravel()
    if y.shape != s.shape:
        raise AdtrError(f"got {y.size} labels but {s.size} scores")
    if not y.any():
        raise AdtrError("F1 is undefined: no anomalous samples in labels")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold; drop it.
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])
