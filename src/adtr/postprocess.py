"""From grid-level reconstruction error to pixel maps and image scores (Eq. 2-3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
    r = k.numel() // 2
    # Reflect padding needs r < size; clamp so tiny inputs still work.
    pad_h, pad_w = min(r, maps.shape[-2] - 1), min(r, maps.shape[-1] - 1)
    x = F.pad(maps, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else maps
    x = F.conv2d(x, k[r - pad_h: r + pad_h + 1].view(1, 1, -1, 1))  # along H
    x = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else x
    return F.conv2d(x, k[r - pad_w: r + pad_w + 1].view(1, 1, 1, -1))  # along W


def pixel_anomaly_map(grid_map: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Upsample (B, 1, h, w) grid errors bilinearly to ``size`` and smooth: (B, 1, H, W)."""
    up = F.interpolate(grid_map.float(), size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(up, sigma)


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


def quantile_threshold(good_scores: torch.Tensor, target_fpr: float) -> float:
    """Score above which a fraction ``target_fpr`` of good images would fall.

    With n held-out good images the finest achievable rate is 1/n; the threshold is
    the (1 - target_fpr) quantile, interpolated linearly between order statistics.
    """
    if good_scores.numel() == 0:
        return math.inf
    return float(torch.quantile(good_scores.double(), 1.0 - target_fpr))
