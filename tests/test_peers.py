"""Our PaDiM and PatchCore peers (benchmarks/peers.py) on random features: fast, no dataset."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_peers():
    sys.path.insert(0, str(BENCH))  # as when the script runs: its helpers import from benchmarks/
    spec = importlib.util.spec_from_file_location("adtr_bench_peers", BENCH / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


peers = load_peers()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and on a CPU shared with another job two threads
    can wait on each other for a second per convolution."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- PaDiM


def test_padim_distance_is_zero_at_the_mean_and_peaks_at_an_outlier():
    train = torch.randn(40, 6, 4, 5, generator=gen(0))
    padim = peers.PaDiM(d=100).fit(train)
    assert padim.channels.tolist() == list(range(6))  # fewer channels than d: all kept
    mean = train.mean(dim=0, keepdim=True)  # (1, C, h, w)
    assert padim.score(mean).abs().max() < 1e-3
    probe = mean.repeat(2, 1, 1, 1)
    probe[1, :, 2, 3] += 5.0  # outlier vector at one position of the second image
    dist = padim.score(probe)  # (2, h, w)
    assert dist.shape == (2, 4, 5)
    assert dist[0].max() < 1e-3 and dist[1, 2, 3] > 3.0
    assert divmod(int(dist[1].argmax()), 5) == (2, 3)
    maps, scores = padim.predict(probe, (16, 20), sigma=1.0)
    assert maps.shape == (2, 16, 20) and scores[1] > scores[0]
    assert torch.allclose(scores, maps.flatten(1).amax(dim=1))


def test_padim_keeps_a_seeded_random_subset_of_d_channels():
    a = peers.PaDiM(d=5, seed=3).select_channels(20)
    assert a.tolist() == peers.PaDiM(d=5, seed=3).select_channels(20).tolist()
    assert len(a) == 5 and len(set(a.tolist())) == 5 and a.tolist() == sorted(a.tolist())
    assert a.tolist() != peers.PaDiM(d=5, seed=4).select_channels(20).tolist()
    padim = peers.PaDiM(d=5, seed=3).fit(torch.randn(10, 20, 2, 2, generator=gen(1)))
    assert padim.mean.shape == (4, 5) and padim.whiten.shape == (4, 5, 5)


def test_padim_mahalanobis_matches_a_direct_computation():
    train = torch.randn(30, 4, 2, 3, generator=gen(2)).double()
    padim = peers.PaDiM().fit(train)
    x = torch.randn(1, 4, 2, 3, generator=gen(3)).double()
    got = padim.score(x)
    v = train[:, :, 1, 2]  # (N, C) at position (1, 2)
    cov = torch.cov(v.T) + 0.01 * torch.eye(4, dtype=v.dtype)
    delta = x[0, :, 1, 2] - v.mean(0)
    ref = torch.sqrt(delta @ torch.linalg.inv(cov) @ delta)
    assert math.isclose(float(got[0, 1, 2]), float(ref), rel_tol=1e-4)


@pytest.mark.parametrize("n", [1, 3])
def test_padim_regularisation_keeps_distances_finite_with_fewer_samples_than_dims(n):
    train = torch.randn(n, 32, 3, 3, generator=gen(4))
    padim = peers.PaDiM().fit(train)
    dist = padim.score(torch.randn(2, 32, 3, 3, generator=gen(5)))
    assert torch.isfinite(dist).all() and (dist >= 0).all()


# ----------------------------------------------------------------------- PatchCore


@pytest.mark.parametrize(("n", "ratio", "dim"), [(1000, 0.1, 16), (1000, 0.01, 16), (257, 0.1, 200), (30, 0.1, 8)])
def test_coreset_keeps_ceil_ratio_n_distinct_rows(n, ratio, dim):
    bank = torch.randn(n, dim, generator=gen(6))
    idx = peers.greedy_coreset(bank, ratio, projection_dim=128, seed=0)
    expected = {(1000, 0.1): 100, (1000, 0.01): 10, (257, 0.1): 26, (30, 0.1): 3}[(n, ratio)]
    assert len(idx) == expected == peers.coreset_size(n, ratio)
    assert len(set(idx.tolist())) == expected


@pytest.mark.parametrize("dim", [8, 256])  # without and with the random projection
def test_coreset_selects_the_farthest_points(dim):
    cluster = 0.1 * torch.randn(300, dim, generator=gen(7))
    far = torch.zeros(2, dim)
    far[0, 0], far[1, 1] = 50.0, -80.0
    bank = torch.cat([cluster[:100], far[:1], cluster[100:], far[1:]])  # far rows at 100 and 301
    idx = peers.greedy_coreset(bank, 0.01, projection_dim=128, seed=0)  # 4 rows, the 2 far ones among them
    assert {100, 301} <= set(idx.tolist())


def test_coreset_is_deterministic_for_a_seed():
    bank = torch.randn(500, 200, generator=gen(8))
    a = peers.greedy_coreset(bank, 0.05, seed=1)
    assert torch.equal(a, peers.greedy_coreset(bank, 0.05, seed=1))
    assert not torch.equal(a, peers.greedy_coreset(bank, 0.05, seed=2))
    assert torch.equal(peers.greedy_coreset(bank, 1.0), torch.arange(500))


def test_chunked_nearest_neighbours_equal_an_unchunked_reference():
    queries = torch.randn(53, 12, generator=gen(9))
    bank = torch.randn(40, 12, generator=gen(10))
    dist, idx = peers.nearest_neighbours(queries, bank, chunk_size=7)
    ref = torch.cdist(queries, bank, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
    assert torch.equal(idx, ref.indices)
    assert torch.allclose(dist, ref.values, atol=1e-5)
    assert torch.equal(dist, peers.nearest_neighbours(queries, bank)[0])


def test_patchcore_training_patches_score_zero_and_an_outlier_scores_highest():
    train = torch.randn(6, 8, 5, 5, generator=gen(11))
    core = peers.PatchCore(coreset_ratio=1.0).fit(train)  # full bank
    assert core.bank.shape == (6 * 25, 8)
    assert core.score(train[:2]).max() == 0  # exact: the winning distance is recomputed
    probe = train[:1].clone()
    probe[0, :, 2, 2] += 20.0  # the 3x3 averaging spreads it over the neighbourhood (1..3, 1..3)
    scores = core.score(probe)  # (1, h, w)
    y, x = divmod(int(scores[0].argmax()), 5)
    assert 1 <= y <= 3 and 1 <= x <= 3 and scores[0, 2, 2] > 1.0
    outside = torch.ones(5, 5, dtype=torch.bool)
    outside[1:4, 1:4] = False
    assert scores[0][outside].max() == 0  # untouched patches are still in the bank
    maps, image = core.predict(probe, (20, 20), sigma=1.0)
    assert maps.shape == (1, 20, 20) and torch.allclose(image, scores.flatten(1).amax(dim=1))


def test_patchcore_locally_aware_features_average_a_3x3_neighbourhood():
    x = torch.arange(25.0).view(1, 1, 5, 5)
    y = peers.locally_aware(x)
    assert y.shape == x.shape
    assert y[0, 0, 2, 2] == x[0, 0, 1:4, 1:4].mean()
    assert y[0, 0, 0, 0] == x[0, 0, :2, :2].mean()  # borders: only existing cells


def test_patchcore_reweighting_scales_the_max_patch_score_into_zero_one():
    train = torch.randn(4, 8, 4, 4, generator=gen(12))
    probe = torch.randn(3, 8, 4, 4, generator=gen(13)) * 3
    plain = peers.PatchCore(coreset_ratio=0.5).fit(train)
    weighted = peers.PatchCore(coreset_ratio=0.5, reweight=True).fit(train)
    _, s_plain = plain.predict(probe, (8, 8))
    _, s_weighted = weighted.predict(probe, (8, 8))
    assert (s_weighted > 0).all() and (s_weighted < s_plain).all()


# ---------------------------------------------------------------------- end to end


def test_both_peers_run_end_to_end_on_an_untrained_backbone():
    images = torch.rand(4, 3, 64, 64, generator=gen(14))
    padim_bb = peers.build_backbone(peers.PADIM_STAGES, peers.PADIM_STRIDE, weights="none")
    core_bb = peers.build_backbone(peers.PATCHCORE_STAGES, peers.PATCHCORE_STRIDE, weights="none")
    padim = peers.PaDiM().fit(padim_bb(images[:3]))
    core = peers.PatchCore(coreset_ratio=0.1).fit(core_bb(images[:3]))
    assert padim.whiten.shape == (64, 100, 100)  # 8x8 grid, d = 100 of 24 + 40 + 112 channels
    assert core.bank.shape == (math.ceil(0.1 * 3 * 64), 152)  # 40 + 112 channels (projection is for selection only)
    for backbone, method in ((padim_bb, padim), (core_bb, core)):
        maps, scores = method.predict(backbone(images), (64, 64))
        assert maps.shape == (4, 64, 64) and scores.shape == (4,)
        assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
        assert method.score(backbone(images)).shape == (4, 8, 8)
        t = peers.time_inference(backbone, method, images, batch_size=2, repeats=1, warmup=0)
        assert set(t) == {"backbone", "scoring", "total"} and t["total"] > 0


def test_metrics_and_report_from_scores():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 8, 8), dtype=bool)
    masks[2:, 2:5, 2:5] = True
    test = peers.EvalSplit(torch.zeros(4, 3, 8, 8), masks, np.array([0, 0, 1, 1]), ["good", "good", "cut", "hole"],
                         True)
    maps = rng.random((4, 8, 8)).astype(np.float32) + masks
    overall, per_type = peers.metrics_of(test, maps, np.array([0.1, 0.2, 0.8, 0.9]))
    assert overall["image_auroc"] == 1.0 and overall["pixel_auroc"] > 0.9 and 0 < overall["aupro"] <= 1
    assert set(per_type) == {"cut", "hole"}
    row = {"category": "bottle", "method": "PatchCore", "commit": "abc", "torch": "x", "threads": 2, "machine": "m",
           "settings": {"coreset_ratio": 0.01, "reweight": False, "bank_size": 5}, **overall, "per_type": per_type,
           "fit_seconds": 3.0, "ms_per_image_b1": 5.0, "ms_backbone_b1": 2.0, "ms_scoring_b1": 3.0,
           "ms_per_image_b32": 4.0, "peak_rss_mb": 900.0}
    text = peers.report([row, {**row, "method": "PaDiM", "settings": {"d": 80}}])
    assert "| bottle | PatchCore (1% coreset) | 1.000 |" in text and "| bottle | PaDiM (d=80) |" in text
    assert "| bottle | PaDiM (d=80) | hole |" in text


def test_run_functions_give_rows_on_a_tiny_dataset(tiny_category):
    from adtr.data import index_mvtec

    root, cat = tiny_category.parent, tiny_category.name
    test = peers.load_test_set(index_mvtec(root, cat, "test"), 64)
    train = index_mvtec(root, cat, "train")
    opts = {"image_size": 64, "weights": "none", "timing_repeats": (1, 1)}
    rows = [peers.run_padim(train, test, **opts), *peers.run_patchcore(train, test, ratios=(0.1, 0.01), **opts)]
    assert [r["method"] for r in rows] == ["PaDiM", "PatchCore", "PatchCore"]
    assert [r["settings"]["bank_size"] for r in rows[1:]] == [math.ceil(0.1 * 12 * 64), math.ceil(0.01 * 12 * 64)]
    for r in rows:
        assert 0 <= r["image_auroc"] <= 1 and 0 <= r["pixel_auroc"] <= 1 and 0 <= r["aupro"] <= 1
        assert r["ms_per_image_b1"] > 0 and r["peak_rss_mb"] > 0 and r["per_type"]
    assert "| PaDiM (d=100) |" in peers.markdown([{**r, "category": cat} for r in rows])
