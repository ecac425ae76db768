"""Labelled anomalies for ADTR+ (paper section 3.3), as cached backbone features.

The backbone is frozen, so an anomalous image's features, like a good image's, need
computing only once. Synthetic confetti anomalies are therefore drawn as a pool of
``variants`` corrupted copies of every training image whose features are cached, and
the pool is redrawn every ``refresh_every`` epochs (a fresh draw costs one backbone
pass over ``variants`` x N images). Real defects and outlier images are cached once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from adtr.confetti import confetti
from adtr.data import Sample
from adtr.data.dataset import ImageSource, as_dataset
from adtr.errors import AdtrError, file_error


@dataclass
class AnomalyPool:
    """Features of anomalous images and their labels on the feature grid.

    features: (M, C, h, w). labels: (M, h, w) bool, True = anomalous cell; all True when
    only the image label is known (outliers, defects without masks). ``has_pixel_labels``
    says which, so the pixel-level loss can refuse image-only labels.
    """

    features: torch.Tensor
    labels: torch.Tensor
    has_pixel_labels: bool

    def __len__(self) -> int:
        return len(self.features)


def grid_labels(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, 1, S, S) pixel labels -> (N, grid, grid) bool: a cell is anomalous if any of its pixels is.

    Any rather than a majority: a cell that holds part of a defect must not be pulled
    towards reconstructing it (that would teach the model to reproduce anomalies).
    """
    return F.adaptive_max_pool2d(masks.float(), grid)[:, 0] > 0


def decode_images(source: ImageSource, image_size: int, batch_size: int = 32) -> torch.Tensor:
    """Every image of ``source`` once, as uint8 (N, 3, S, S): the input of each confetti draw."""
    batches = DataLoader(as_dataset(source, image_size), batch_size=batch_size, shuffle=False)
    return torch.cat([(b["image"] * 255).round().to(torch.uint8) for b in batches])


@torch.no_grad()
def confetti_pool(backbone: nn.Module, images: torch.Tensor, grid: int, variants: int, seed: int, draw: int,
                  device: torch.device, batch_size: int = 16) -> AnomalyPool:
    """``variants`` confetti copies of every image (uint8 (N, 3, S, S)), as features and grid labels.

    A pure function of (seed, draw): a resumed run redraws exactly the pool it had. Even
    variants use a random colour per blob, odd ones a grey, like FCDD's two sets.
    """
    if variants < 1:
        raise AdtrError(f"confetti needs at least one variant per image, got {variants}")
    feats, labels = [], []
    for k in range(variants):
        g = torch.Generator().manual_seed(((seed * 1_000_003 + draw) * 997 + k) % (2**63))
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].float() / 255
            pairs = [confetti(img, g, grey=bool(k % 2)) for img in chunk]
            corrupted = torch.stack([p[0] for p in pairs])
            masks = torch.stack([p[1] for p in pairs]).unsqueeze(1)
            feats.append(backbone(corrupted.to(device)).float().cpu())
            labels.append(grid_labels(masks, grid))
    return AnomalyPool(torch.cat(feats), torch.cat(labels), has_pixel_labels=True)


@torch.no_grad()
def labelled_pool(backbone: nn.Module, source: ImageSource, image_size: int, grid: int, device: torch.device,
                  need_masks: bool, batch_size: int = 16) -> AnomalyPool:
    """Real defective images (with masks where given) or outlier images, all labelled anomalous."""
    if isinstance(source, Sequence) and not isinstance(source, str):
        if len(source) == 0:
            raise AdtrError("no anomalous images were given for ADTR+")
        missing = [s for s in source if isinstance(s, Sample) and s.mask is None]
        if need_masks and missing:
            raise file_error(missing[0].image, "has no defect mask, which the pixel-level loss needs "
                             "(use --plus image for images labelled only as defective)")
        has_pixel_labels = not missing
    else:
        if need_masks:
            raise AdtrError("an image array has no defect masks, which the pixel-level loss needs")
        has_pixel_labels = False
    feats, labels = [], []
    for batch in DataLoader(as_dataset(source, image_size), batch_size=batch_size, shuffle=False):
        feats.append(backbone(batch["image"].to(device)).float().cpu())
        if has_pixel_labels:
            labels.append(grid_labels(batch["mask"], grid))
        else:
            labels.append(torch.ones(len(batch["image"]), grid, grid, dtype=torch.bool))
    return AnomalyPool(torch.cat(feats), torch.cat(labels), has_pixel_labels)


def mix_anomalies(features: torch.Tensor, pool: AnomalyPool, prob: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace each sample of a batch by a random pool entry with probability ``prob`` (FCDD: 0.5).

    Returns features (B, C, h, w), pixel labels (B, h, w) float and image labels (B,) float.
    """
    b, _, h, w = features.shape
    replace = torch.rand(b, generator=generator) < prob
    pick = torch.randint(len(pool), (b,), generator=generator)
    pixel = torch.zeros(b, h, w)
    if replace.any():
        features = features.clone()
        features[replace] = pool.features[pick[replace]]
        pixel[replace] = pool.labels[pick[replace]].float()
    return features, pixel, replace.float()
