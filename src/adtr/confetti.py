"""Synthetic "confetti" anomalies for pixel-level ADTR+ (FCDD's recipe, NOTES.md).

Random axis-aligned squares, rotated by up to 45 degrees, 8-54 px wide at 224 px (scaled
to the image size), filled with a random colour per blob (or a random grey), added to a
good image, smoothed with a Gaussian (std 5 px at 224 px), clamped to [0, 1]. At least one
blob per image. The pixel label is "this pixel changed". ``adtr.anomalies`` draws the
cached pool of corrupted training images from it.
"""

from __future__ import annotations

import math

import torch

from adtr.postprocess import gaussian_blur

#: FCDD's blob density per pixel at 224 px (about 0.9 blobs per image, at least one).
BLOB_DENSITY = 1.8e-5


def blob_mask(size: int, center: tuple[float, float], side: float, angle: float) -> torch.Tensor:
    """(size, size) bool mask of a square of ``side`` px rotated by ``angle`` radians."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    dy, dx = ys - center[0], xs - center[1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # coordinates in the square's own frame
    return (u.abs() <= side / 2) & (v.abs() <= side / 2)


def confetti(image: torch.Tensor, generator: torch.Generator, grey: bool = False,
             change_tol: float = 1.0 / 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Add confetti noise to one image.

    Args:
        image: (3, S, S) float in [0, 1].
        generator: the source of randomness (seeded by the caller for reproducibility).
        grey: one grey value per blob instead of a colour.
        change_tol: a pixel is labelled anomalous where some channel changed by more.

    Returns:
        The corrupted image (3, S, S) and its pixel label (S, S) bool.
    """
    size = image.shape[-1]
    scale = size / 224.0

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    n_blobs = max(1, int(torch.binomial(torch.tensor(float(size * size)), torch.tensor(BLOB_DENSITY),
                                        generator=generator)))
    noise = torch.zeros_like(image)
    for _ in range(n_blobs):
        side = uniform(8, 54) * scale
        mask = blob_mask(size, (uniform(0, size), uniform(0, size)), side, math.radians(uniform(-45, 45)))
        if not mask.any():  # a blob centred off the image edge: put one pixel in so the image changes
            mask[int(uniform(0, size)), int(uniform(0, size))] = True
        colour = torch.full((3,), uniform(-1, 1)) if grey else torch.rand(3, generator=generator) * 2 - 1
        noise[:, mask] = colour.view(3, 1)
    noise = gaussian_blur(noise.unsqueeze(1), sigma=5.0 * scale).squeeze(1)  # (3, S, S)
    corrupted = (image + noise).clamp(0.0, 1.0)
    label = (corrupted - image).abs().amax(dim=0) > change_tol
    return corrupted, label
