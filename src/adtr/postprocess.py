"""From grid-level reconstruction error to pixel maps and image scores (Eq. 2-3)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from adtr.config import THRESHOLD_RULES


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, truncated at 4 sigma (scipy's default)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps with reflect padding."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma).to(maps)
    return blur_along(blur_along(maps, k, -2), k, -1)


def blur_along(maps: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D convolution of (B, 1, H, W) maps with an odd ``kernel`` along ``dim`` (-2: H, -1: W),
    reflect padding; the kernel is truncated where the map is too small to reflect."""
    r = kernel.numel() // 2
    pad = min(r, maps.shape[dim] - 1)  # reflect padding needs pad < size
    if pad:
        maps = F.pad(maps, (0, 0, pad, pad) if dim == -2 else (pad, pad, 0, 0), mode="reflect")
    k = kernel[r - pad: r + pad + 1]
    return F.conv2d(maps, k.view(1, 1, -1, 1) if dim == -2 else k.view(1, 1, 1, -1))


@functools.lru_cache(maxsize=16)
def upsample_blur_matrix(n_in: int, n_out: int, sigma: float) -> torch.Tensor:
    """(n_out, n_in): 1-D bilinear upsampling followed by :func:`gaussian_blur` along one axis.

    Both operations are linear and separable, so applying this matrix along each axis of a
    grid map gives exactly the upsampled, smoothed map: two small matrix products instead
    of a full-resolution upsampling and two 33-tap convolutions (the same map to float
    rounding, a few times faster; ``tests/test_postprocess.py`` compares the two).
    """
    basis = torch.eye(n_in).view(n_in, 1, n_in, 1)  # column images e_i of size (n_in, 1)
    up = F.interpolate(basis, size=(n_out, 1), mode="bilinear", align_corners=False)  # (n_in, 1, n_out, 1)
    if sigma > 0:
        up = blur_along(up, gaussian_kernel1d(sigma), -2)
    return up[:, 0, :, 0].T.contiguous()


def pixel_anomaly_map(grid_map: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Upsample (B, 1, h, w) grid errors bilinearly to ``size`` and smooth: (B, 1, H, W)."""
    rows = upsample_blur_matrix(grid_map.shape[-2], size[0], float(sigma))  # (H, h)
    cols = upsample_blur_matrix(grid_map.shape[-1], size[1], float(sigma))  # (W, w)
    return upsample_blur(grid_map, rows, cols)


def upsample_blur(grid_map: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) -> (B, 1, H, W) with the :func:`upsample_blur_matrix` of each axis."""
    return rows.to(grid_map.device) @ grid_map.float() @ cols.to(grid_map.device).T


def image_score(pixel_map: torch.Tensor, pool_size: int) -> torch.Tensor:
    """Max of the average-pooled map (stride 1): (B, 1, H, W) -> (B,).

    Averaging first makes the score respond to a defect's area, not to one noisy pixel.
    The k x k box average is computed as two 1-D passes (k times cheaper than 2-D).
    """
    k = min(pool_size, pixel_map.shape[-2], pixel_map.shape[-1])
    if k > 1:
        pixel_map = F.avg_pool2d(pixel_map, kernel_size=(k, 1), stride=1)  # (B, 1, H-k+1, W)
        pixel_map = F.avg_pool2d(pixel_map, kernel_size=(1, k), stride=1)  # (B, 1, H-k+1, W-k+1)
    return pixel_map.flatten(1).amax(dim=1)


def conformal_rank(n: int, target_fpr: float) -> int:
    """1-based rank k of the held-out score that the conformal rule takes as the threshold.

    A new good image exceeds the k-th smallest of n held-out scores with mean probability
    (n + 1 - k) / (n + 1); the smallest k that keeps this at or under the target is
    ceil((n + 1)(1 - target)) (split-conformal prediction). Fewer than 1/target - 1 held-out
    images cannot keep the target: k is then n, the highest score, the nearest they reach.
    """
    return min(n, max(1, math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9)))


def conformal_min_images(target_fpr: float) -> int | None:
    """Fewest held-out good images with which the conformal rule keeps ``target_fpr`` (None for 0)."""
    return math.ceil((1.0 - target_fpr) / target_fpr - 1e-9) if target_fpr > 0 else None


def check_threshold_rule(rule: str) -> None:
    """Refuse a threshold rule other than those of :data:`adtr.config.THRESHOLD_RULES` (ValueError)."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r} (use {' or '.join(THRESHOLD_RULES)})")


def quantile_threshold(good_scores: torch.Tensor, target_fpr: float, rule: str = "quantile") -> float:
    """Score above which a fraction ``target_fpr`` of good images would fall.

    ``quantile``: the (1 - target_fpr) quantile of the held-out scores, interpolated linearly
    between order statistics; new good images exceed it more often than the target, by
    (1 - 2 target) / (n + 1) on average (:func:`expected_fpr`). ``conformal``: the held-out
    score of rank :func:`conformal_rank`, which keeps the average rate at or under the target
    whatever the score distribution, and so flags fewer defects where n is small.
    """
    check_threshold_rule(rule)
    if good_scores.numel() == 0:
        return math.inf
    scores = good_scores.double().flatten()
    if rule == "conformal":
        return float(scores.sort().values[conformal_rank(scores.numel(), target_fpr) - 1])
    return float(torch.quantile(scores, 1.0 - target_fpr))


@dataclass(frozen=True)
class ExpectedFpr:
    """What a :func:`quantile_threshold` over n held-out good images promises for new good images."""

    expected: float  # mean false-positive rate (exact for the conformal rule and for uniform scores)
    low: float  # the rate lies in [low, high] with probability at least ``confidence``
    high: float
    confidence: float


def expected_fpr(n: int, target_fpr: float, confidence: float = 0.9, rule: str = "quantile") -> ExpectedFpr | None:
    """The false-positive rate on new good images of the ``target_fpr`` threshold of ``n`` held-out ones.

    The threshold is itself random: a good image exceeds the j-th smallest of n held-out scores
    with probability F̄(X_(j)) ~ Beta(n - j + 1, j), whatever the score distribution (continuous,
    the new image drawn like the held-out ones). The conformal rule takes one order statistic.
    The quantile rule interpolates between two neighbouring ones, so the rate lies between
    theirs; the interval takes the outer tail of each, and the expected rate is
    target + (1 - 2 target) / (n + 1): with 21 held-out images and a 1% target the threshold
    sits between the two highest scores and new good images exceed it about 5.5% of the time
    (conformal: the highest score, 4.5%); 99 held-out images still expect about 2% (conformal: 1%).
    """
    check_threshold_rule(rule)
    if n <= 0:
        return None
    from scipy.stats import beta

    tail = (1.0 - confidence) / 2
    if rule == "conformal":
        j = conformal_rank(n, target_fpr)  # 1-based
        law = beta(n - j + 1, j)
        return ExpectedFpr(expected=(n - j + 1) / (n + 1), low=float(law.ppf(tail)), high=float(law.ppf(1.0 - tail)),
                           confidence=confidence)
    position = (1.0 - target_fpr) * (n - 1)  # 0-based, torch.quantile's linear interpolation
    below = min(int(math.floor(position)), n - 1)  # 0-based index of the lower order statistic
    above = min(below + 1, n - 1)
    low = float(beta.ppf(tail, n - above, above + 1))  # the higher score bounds the rate from below
    high = float(beta.ppf(1.0 - tail, n - below, below + 1))
    return ExpectedFpr(expected=(n - position) / (n + 1), low=low, high=high, confidence=confidence)


def pixel_quantile_threshold(good_maps: torch.Tensor, target_fpr: float) -> float:
    """Map value above which a fraction ``target_fpr`` of good pixels would fall.

    The pixel-level twin of :func:`quantile_threshold`, over every pixel of the held-out
    good maps (N, H, W); numpy's quantile has no size limit, unlike torch's.
    """
    if good_maps.numel() == 0:
        return math.inf
    return float(np.quantile(good_maps.double().flatten().numpy(), 1.0 - target_fpr))


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of ``score > threshold`` against binary ``labels``.

    Candidate thresholds lie halfway between consecutive distinct scores (and below
    the lowest), so the decision rule ``score > threshold`` reproduces the best split.
    """
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
    if not labels.any() or labels.all():
        raise ValueError("the F1-optimal threshold needs both normal and anomalous examples")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)  # predicted positive = the first i+1 scores
    fp = np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # only split between distinct scores
    f1 = np.where(last, 2 * tp / (tp + fp + y.sum()), -1.0)
    i = int(np.argmax(f1))
    below = s[i + 1] if i + 1 < len(s) else s[i] - max(1e-6, abs(s[i]) * 1e-6)
    return float((s[i] + below) / 2), float(f1[i])


def normalize_scores(x: np.ndarray | torch.Tensor | float, threshold: float):
    """Scores or maps mapped to [0, 1] with the threshold at 0.5: ``clip(0.5 * x / threshold, 0, 1)``.

    Anomaly scores are non-negative error norms, so this fixed linear map keeps 0 at 0
    and puts twice the threshold at 1: readable, monotone and the same for every run.
    """
    if not math.isfinite(threshold) or threshold <= 0:
        scale = 0.0 if not math.isfinite(threshold) else math.inf
    else:
        scale = 0.5 / threshold
    if isinstance(x, torch.Tensor):
        return (x * scale).clamp(0.0, 1.0) if math.isfinite(scale) else (x > 0).to(x.dtype)
    arr = np.asarray(x, dtype=np.float64)
    out = np.clip(arr * scale, 0.0, 1.0) if math.isfinite(scale) else (arr > 0).astype(np.float64)
    return float(out) if np.ndim(x) == 0 else out.astype(np.float32)
