"""Area under the per-region-overlap (PRO) curve, as defined for MVTec AD.

Follows Bergmann et al., "The MVTec Anomaly Detection Dataset" (IJCV 2021) and
their evaluation code: ground-truth regions are 8-connected components; for a
threshold, a region's overlap is the fraction of its pixels predicted anomalous
and PRO is the mean overlap over all regions of all images; FPR is the fraction
of all normal pixels predicted anomalous. The (FPR, PRO) curve is integrated
with the trapezoidal rule up to ``fpr_limit`` (the value there is linearly
interpolated) and divided by ``fpr_limit``, so a perfect map scores 1.0.

The curve is exact: every distinct score is a threshold. Instead of looping
over thresholds, all pixels are sorted once and each pixel's contribution to
FPR (``1 / num_normal``) or PRO (``1 / (region_size * num_regions)``) is summed
cumulatively; only the last point of each run of equal scores is kept, because
a threshold moves all tied pixels at once.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from adtr.errors import AdtrError
from adtr.metrics.auroc import check_masks_and_maps

# 3x3 structure of ones = 8-connectivity, as in the official evaluation code.
_STRUCTURE = np.ones((3, 3), dtype=int)


def pro_curve(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve over all thresholds.

    Args:
        masks: Ground truth, shape (N, H, W), bool or 0/1, True = anomalous.
        maps: Anomaly maps, shape (N, H, W), higher = more anomalous.

    Returns:
        ``(fprs, pros)``, each shape (K,), FPR non-decreasing, starting at
        (0, 0) and ending at (1, 1) like the official curve.

    Raises:
        AdtrError: If there is no anomalous region or no normal pixel, or on
            malformed inputs.
    """
    m, a = check_masks_and_maps(masks, maps)
    # Per-pixel PRO increment before dividing by the number of regions:
    # 1 / size of the pixel's region, 0 for normal pixels.
    pro_inc = np.zeros(m.shape, dtype=np.float64)
    num_regions = 0
    for i in range(m.shape[0]):
        labeled, n = ndimage.label(m[i], structure=_STRUCTURE)
        if n == 0:
            continue
        sizes = np.bincount(labeled.ravel())
        inv = np.zeros(n + 1, dtype=np.float64)
        inv[1:] = 1.0 / sizes[1:]
        pro_inc[i] = inv[labeled]
        num_regions += n
    num_ok = int(m.size - m.sum())
    if num_regions == 0:
        raise AdtrError("AUPRO is undefined: the ground truth masks contain no anomalous region")
    if num_ok == 0:
        raise AdtrError("AUPRO is undefined: the ground truth masks contain no normal pixel")

    order = np.argsort(a.ravel(), kind="stable")[::-1]
    scores = a.ravel()[order]
    pros = pro_inc.ravel()[order]
    del pro_inc
    np.cumsum(pros, out=pros)  # in place: saves one (N*H*W,) float64 array
    fps = np.cumsum(~m.ravel()[order], dtype=np.int64)
    del order
    keep = np.append(np.flatnonzero(np.diff(scores)), scores.size - 1)
    fprs = fps[keep] / num_ok
    pros = pros[keep] / num_regions
    # Summing many small floats can overshoot 1 by rounding; clip it away.
    np.clip(pros, None, 1.0, out=pros)
    fprs = np.concatenate(([0.0], fprs, [1.0]))
    pros = np.concatenate(([0.0], pros, [1.0]))
    return fprs, pros


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area of y(x) on [x[0], x_max], interpolating y at ``x_max``.

    Args:
        x: Shape (K,), non-decreasing, with x[0] <= x_max <= x[-1]; repeated x
            values (vertical steps) are allowed and add no area.
        y: Shape (K,).
    """
    # First index with x > x_max; the segment [ins-1, ins] contains x_max.
    ins = int(np.searchsorted(x, x_max, side="right"))
    area = float(np.sum(0.5 * (y[1:ins] + y[: ins - 1]) * np.diff(x[:ins])))
    if ins < x.size and x[ins - 1] < x_max:
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD AU-PRO).

    Unlike pixel AUROC, every defect region weighs the same regardless of its
    size, so small defects are not drowned out by large ones. There is no
    ``num_thresholds``: the curve is computed exactly at every distinct score.

    Args:
        masks: Ground truth, shape (N, H, W), bool or 0/1, True = anomalous.
        maps: Anomaly maps, shape (N, H, W), higher = more anomalous.
        fpr_limit: Upper FPR integration limit in (0, 1]; 0.3 as in the paper.

    Returns:
        AU-PRO in [0, 1].

    Raises:
        AdtrError: If the masks contain no anomalous region (or no normal
            pixel); callers decide whether to skip the metric. Also on
            malformed inputs or an ``fpr_limit`` outside (0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise AdtrError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fprs, pros = pro_curve(masks, maps)
    return _trapezoid_to(fprs, pros, fpr_limit) / fpr_limit
