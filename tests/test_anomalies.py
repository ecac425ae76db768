from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adtr.anomalies import AnomalyPool, confetti_pool, grid_labels, labelled_pool, mix_anomalies
from adtr.data import Sample, index_mvtec
from adtr.errors import AdtrError


class PoolBackbone(nn.Module):
    """Stand-in backbone: 16 px average pooling (3 channels on a 4x4 grid at 64 px)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, 16)


def test_grid_labels_mark_any_touched_cell():
    masks = torch.zeros(1, 1, 64, 64)
    masks[0, 0, 20, 40] = 1  # one pixel in cell (row 1, column 2) of a 4x4 grid
    labels = grid_labels(masks, 4)
    assert labels.shape == (1, 4, 4) and labels.sum() == 1 and labels[0, 1, 2]


def test_mix_replaces_with_the_given_probability():
    feats = torch.zeros(64, 3, 4, 4)
    pool = AnomalyPool(torch.ones(5, 3, 4, 4), torch.ones(5, 4, 4, dtype=torch.bool), True)
    x, pixel, image = mix_anomalies(feats, pool, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.ones_like(x)) and pixel.all() and image.all()
    x, pixel, image = mix_anomalies(feats, pool, 0.5, torch.Generator().manual_seed(0))
    replaced = image.bool()
    assert 10 < replaced.sum() < 54  # about half of 64
    assert torch.equal(x[replaced], torch.ones_like(x[replaced])) and (x[~replaced] == 0).all()
    assert (pixel[~replaced] == 0).all()
    assert feats.abs().sum() == 0  # the cached features are never modified in place
    again = mix_anomalies(feats, pool, 0.5, torch.Generator().manual_seed(0))[2]
    assert torch.equal(again, image)


def test_confetti_pool_is_a_function_of_seed_and_draw():
    images = (torch.rand(3, 3, 64, 64) * 255).to(torch.uint8)
    a = confetti_pool(PoolBackbone(), images, 4, 2, seed=0, draw=0, device=torch.device("cpu"))
    b = confetti_pool(PoolBackbone(), images, 4, 2, seed=0, draw=0, device=torch.device("cpu"))
    c = confetti_pool(PoolBackbone(), images, 4, 2, seed=0, draw=1, device=torch.device("cpu"))
    assert a.features.shape == (6, 3, 4, 4) and a.labels.shape == (6, 4, 4) and a.has_pixel_labels
    assert torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.features, c.features)
    assert a.labels.flatten(1).any(dim=1).all()  # every corrupted image has an anomalous cell
    clean = PoolBackbone()(images.float() / 255)
    # A cell left normal has no pixel changed by more than 1/255, so its mean cannot move more.
    changed = (a.features[:3] - clean).abs().amax(dim=1) > 1.01 / 255  # (3, 4, 4)
    assert changed.any() and (changed <= a.labels[:3]).all()


def test_labelled_pool_uses_masks_and_refuses_missing_ones(tiny_category):
    test = index_mvtec(tiny_category.parent, tiny_category.name, "test")
    defects = [s for s in test if s.label == 1]
    pool = labelled_pool(PoolBackbone(), defects, 64, 4, torch.device("cpu"), need_masks=True)
    assert len(pool) == len(defects) and pool.has_pixel_labels
    assert pool.labels.flatten(1).any(dim=1).all() and not pool.labels.all()
    unmasked = [Sample(image=s.image, mask=None, label=1, defect_type="x") for s in defects]
    with pytest.raises(AdtrError, match="has no defect mask"):
        labelled_pool(PoolBackbone(), unmasked, 64, 4, torch.device("cpu"), need_masks=True)
    image_only = labelled_pool(PoolBackbone(), unmasked, 64, 4, torch.device("cpu"), need_masks=False)
    assert not image_only.has_pixel_labels and image_only.labels.all()
