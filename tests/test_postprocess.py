from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from adtr.postprocess import (conformal_min_images, conformal_rank, expected_fpr, gaussian_blur, image_score,
                               pixel_anomaly_map, quantile_threshold)


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_blur_matches_scipy(sigma):
    x = torch.rand(1, 1, 40, 33)
    ours = gaussian_blur(x, sigma)[0, 0].numpy()
    ref = ndimage.gaussian_filter(x[0, 0].numpy().astype(np.float64), sigma, mode="mirror", truncate=4.0)
    assert np.allclose(ours, ref, atol=1e-5)


def test_blur_off_and_tiny_maps():
    x = torch.rand(2, 1, 3, 3)
    assert torch.equal(gaussian_blur(x, 0.0), x)
    assert gaussian_blur(x, 4.0).shape == x.shape


def test_pixel_map_upsamples_to_image_size():
    grid = torch.zeros(1, 1, 4, 4)
    grid[0, 0, 1, 2] = 1.0
    m = pixel_anomaly_map(grid, (64, 64), sigma=0.0)
    assert m.shape == (1, 1, 64, 64)
    y, x = np.unravel_index(int(m.flatten().argmax()), (64, 64))
    assert 16 <= y < 32 and 32 <= x < 48


@pytest.mark.parametrize("grid, size, sigma", [((16, 16), (256, 256), 4.0), ((7, 5), (56, 40), 1.5),
                                              ((16, 16), (256, 256), 0.0), ((2, 3), (8, 12), 4.0)])
def test_pixel_map_equals_upsampling_then_blurring(grid, size, sigma):
    """The two matrix products are the full-resolution upsampling and blur, to float rounding."""
    torch.manual_seed(0)
    g = torch.rand(3, 1, *grid) * 50
    ref = gaussian_blur(torch.nn.functional.interpolate(g, size=size, mode="bilinear", align_corners=False), sigma)
    ours = pixel_anomaly_map(g, size, sigma)
    assert ours.shape == ref.shape == (3, 1, *size)
    assert float((ours - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_image_score_is_max_of_average_pooled_map():
    m = torch.zeros(2, 1, 32, 32)
    m[0, 0, 5, 5] = 16.0  # one hot pixel: pooled over 4x4 -> 1.0
    m[1, 0, 10:14, 10:14] = 2.0  # a 4x4 patch of 2 -> 2.0
    s = image_score(m, pool_size=4)
    assert torch.allclose(s, torch.tensor([1.0, 2.0]))
    assert torch.allclose(image_score(m, pool_size=1), torch.tensor([16.0, 2.0]))


def test_quantile_threshold():
    scores = torch.arange(101, dtype=torch.float32)
    assert quantile_threshold(scores, 0.01) == pytest.approx(99.0)
    assert quantile_threshold(torch.empty(0), 0.01) == float("inf")


@pytest.mark.parametrize("n, target", [(21, 0.01), (26, 0.01), (99, 0.01), (50, 0.1)])
def test_expected_fpr_matches_simulated_held_out_sets(n, target):
    """Draw many held-out sets, set quantile_threshold on each and measure its true FPR."""
    rate = expected_fpr(n, target)
    g = torch.Generator().manual_seed(n)
    trials = 20_000
    uniform = torch.rand(trials, n, generator=g, dtype=torch.float64)
    per_set = torch.tensor([quantile_threshold(s, target) for s in uniform[:200]], dtype=torch.float64)
    batched = torch.quantile(uniform, 1.0 - target, dim=1)
    assert torch.allclose(per_set, batched[:200])  # the batched draw is quantile_threshold's
    fpr = 1.0 - batched  # uniform scores: P(new good score > t) = 1 - t
    assert float(fpr.mean()) == pytest.approx(rate.expected, abs=4 * float(fpr.std()) / trials ** 0.5)
    assert rate.expected > target  # the interpolated quantile overshoots the target by about 1/(n+1)
    # The interval holds whatever the score distribution: exponential scores, P(score > t) = exp(-t).
    fpr = torch.exp(-torch.quantile(-torch.log(uniform), 1.0 - target, dim=1))
    inside = ((fpr >= rate.low) & (fpr <= rate.high)).double().mean()
    assert float(inside) >= rate.confidence - 0.01
    # ... and is no wider than it must be: each end is the exact tail of the order statistic on its side.
    ordered = uniform.sort(dim=1).values
    below = int((1.0 - target) * (n - 1))
    tail = (1 - rate.confidence) / 2
    assert float((1.0 - ordered[:, below + 1] < rate.low).double().mean()) == pytest.approx(tail, abs=0.006)
    assert float((1.0 - ordered[:, below] > rate.high).double().mean()) == pytest.approx(tail, abs=0.006)
    assert expected_fpr(0, target) is None


def test_conformal_rank_by_hand():
    assert conformal_rank(99, 0.01) == 99  # (99 + 1) * 0.99 = 99: the highest score keeps exactly 1%
    assert conformal_rank(199, 0.01) == 198  # 200 * 0.99 = 198
    assert conformal_rank(21, 0.01) == 21  # too few to keep 1%: the highest, the nearest they reach
    assert conformal_rank(21, 0.05) == 21 and conformal_rank(39, 0.05) == 38  # 22 * 0.95 = 20.9, 40 * 0.95 = 38
    assert conformal_rank(10, 0.0) == 10 and conformal_rank(10, 0.99) == 1
    assert conformal_min_images(0.01) == 99 and conformal_min_images(0.05) == 19 and conformal_min_images(0.0) is None
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    assert quantile_threshold(scores, 0.2, "conformal") == 5.0  # rank ceil(6 * 0.8) = 5
    assert quantile_threshold(scores, 0.4, "conformal") == 4.0  # rank ceil(6 * 0.6) = 4
    assert quantile_threshold(torch.empty(0), 0.01, "conformal") == float("inf")
    for refuse in (lambda: quantile_threshold(scores, 0.2, "median"), lambda: expected_fpr(21, 0.01, rule="median"),
                   lambda: expected_fpr(0, 0.01, rule="median")):
        with pytest.raises(ValueError, match="unknown threshold rule 'median'"):
            refuse()


@pytest.mark.parametrize("n, target", [(21, 0.01), (99, 0.01), (120, 0.05), (50, 0.1)])
def test_conformal_threshold_keeps_the_target_on_simulated_held_out_sets(n, target):
    """The conformal rule's mean FPR is at most the target once n >= 1/target - 1 (and 1/(n+1)
    below that), for any continuous scores; its interval is the exact law of one order statistic."""
    rate = expected_fpr(n, target, rule="conformal")
    g = torch.Generator().manual_seed(1000 + n)
    trials = 20_000
    uniform = torch.rand(trials, n, generator=g, dtype=torch.float64)
    rank = conformal_rank(n, target)
    per_set = torch.tensor([quantile_threshold(s, target, "conformal") for s in uniform[:200]], dtype=torch.float64)
    ordered = uniform.sort(dim=1).values
    assert torch.equal(per_set, ordered[:200, rank - 1])  # the batched draw is quantile_threshold's
    fpr = 1.0 - ordered[:, rank - 1]
    assert float(fpr.mean()) == pytest.approx(rate.expected, abs=4 * float(fpr.std()) / trials ** 0.5)
    if n >= conformal_min_images(target):
        assert rate.expected <= target + 1e-12
    else:
        assert rate.expected == pytest.approx(1 / (n + 1))
    assert rate.expected < expected_fpr(n, target).expected  # always below the interpolated quantile's
    # Exponential scores, the same law: each tail of the interval holds its share.
    fpr = torch.exp(-(-torch.log(uniform)).sort(dim=1).values[:, rank - 1])
    tail = (1 - rate.confidence) / 2
    assert float((fpr < rate.low).double().mean()) == pytest.approx(tail, abs=0.006)
    assert float((fpr > rate.high).double().mean()) == pytest.approx(tail, abs=0.006)


def test_separable_pooling_equals_2d_box_average():
    m = torch.rand(3, 1, 40, 37)
    ref = torch.nn.functional.avg_pool2d(m, kernel_size=8, stride=1).flatten(1).amax(1)
    assert torch.allclose(image_score(m, 8), ref, atol=1e-6)
