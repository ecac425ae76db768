from __future__ import annotations

import torch

from adtr.confetti import blob_mask, confetti


def test_blob_mask_area_and_rotation():
    square = blob_mask(64, (32.0, 32.0), 10.0, 0.0)
    assert 100 <= int(square.sum()) <= 121
    rotated = blob_mask(64, (32.0, 32.0), 10.0, torch.pi / 4)
    assert abs(int(rotated.sum()) - int(square.sum())) < 15 and not torch.equal(square, rotated)


def test_confetti_changes_pixels_and_labels_exactly_them():
    image = torch.full((3, 96, 96), 0.5)
    for seed in range(5):
        corrupted, label = confetti(image, torch.Generator().manual_seed(seed))
        assert corrupted.shape == image.shape and label.shape == (96, 96)
        assert label.any(), "at least one blob"
        assert corrupted.min() >= 0 and corrupted.max() <= 1
        changed = (corrupted - image).abs().amax(0) > 1.0 / 255
        assert torch.equal(changed, label)


def test_confetti_is_reproducible_and_grey_is_grey():
    image = torch.rand(3, 64, 64)
    a = confetti(image, torch.Generator().manual_seed(3))[0]
    b = confetti(image, torch.Generator().manual_seed(3))[0]
    c = confetti(image, torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    flat = torch.full((3, 64, 64), 0.5)
    grey, label = confetti(flat, torch.Generator().manual_seed(0), grey=True)
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])
