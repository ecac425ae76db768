"""Calibration: target-FPR thresholds from good images, F1-optimal ones from labelled data."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from adtr.calibrate import (active_expected_fpr, apply_mode, calibrate, confetti_f1_calibration,
                            describe_expected_fpr, rule_calibration)
from adtr.checkpoint import load_checkpoint
from adtr.cli import main
from adtr.config import with_overrides
from adtr.confetti import confetti
from adtr.data import index_mvtec
from adtr.data.images import image_to_tensor, read_image
from adtr.detector import Detector
from adtr.engine import fit, split_train_val
from adtr.errors import AdtrError
from adtr.postprocess import (conformal_rank, expected_fpr, f1_optimal_threshold, normalize_scores,
                              pixel_quantile_threshold)

from conftest import error_of, tiny_config

HELD_OUT_FPR = 0.3


@pytest.fixture(scope="module")
def held_out_run(tiny_category, tmp_path_factory):
    """A run that holds out half of its 12 training images, at a 30% target and with a smoothed map
    (shared: copy it before changing it). ``tiny_run`` holds out one image, whose score is then every
    threshold at once (quantile, conformal, any level), so it can test none of them; with 6 the
    quantile falls between two scores and the conformal rule takes the higher one."""
    cfg = with_overrides(tiny_config(val_fraction=0.5), "score", sigma=4.0, target_fpr=HELD_OUT_FPR)
    run = tmp_path_factory.mktemp("held_out_run") / "run"
    fit(cfg, index_mvtec(tiny_category.parent, tiny_category.name, "train"), run)
    return run


def test_f1_optimal_threshold_by_hand():
    thr, f1 = f1_optimal_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    assert thr == pytest.approx(0.5) and f1 == 1.0
    # One anomaly scores below both good images: above 0.5 gives 2 TP, 0 FP, 1 FN -> F1 = 4/5;
    # below 0.3 gives 3 TP, 2 FP -> 3/4; so the split is halfway between 0.5 and 0.8.
    thr, f1 = f1_optimal_threshold(np.array([0.3, 0.5, 0.4, 0.9, 0.8]), np.array([1, 0, 0, 1, 1]))
    assert f1 == pytest.approx(0.8) and thr == pytest.approx(0.65)
    # Ties are never split: equal scores fall on the same side.
    thr, _ = f1_optimal_threshold(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0]))
    assert thr == pytest.approx(0.3)
    with pytest.raises(ValueError):
        f1_optimal_threshold(np.array([0.1, 0.2]), np.array([1, 1]))


def test_the_expected_fpr_belongs_to_the_target_fpr_threshold_only():
    cal = {"mode": "fpr", "threshold": 2.0, "threshold_fpr": 2.0, "pixel_threshold": 1.0,
           "target_fpr": 0.01, "val_images": 21, "threshold_f1": 3.0}
    assert active_expected_fpr(cal) == expected_fpr(21, 0.01)
    line = describe_expected_fpr(cal)
    assert "about 5.5%" in line and "from 21 held-out good images" in line and "--val-fraction" in line
    # Enough held-out images for the target: the numbers, no advice.
    assert "--val-fraction" not in describe_expected_fpr({**cal, "val_images": 1000})
    # An F1-optimal threshold, or none held out: nothing to promise.
    assert active_expected_fpr(apply_mode(cal, "f1")) is None
    assert describe_expected_fpr({**cal, "val_images": 0}) is None
    assert describe_expected_fpr({k: v for k, v in cal.items() if k != "val_images"}) is None
    # The advice names the conformal rule and how many images keep the target under it.
    assert "--threshold-rule conformal" in line and "from 99 held-out images" in line


def test_the_conformal_rule_states_its_own_promise():
    cal = {"mode": "fpr", "threshold": 2.0, "threshold_fpr": 2.0, "target_fpr": 0.01, "val_images": 21,
           "threshold_rule": "conformal"}
    assert active_expected_fpr(cal) == expected_fpr(21, 0.01, rule="conformal")
    line = describe_expected_fpr(cal)
    assert "about 4.5%" in line and "(conformal rule)" in line and "99 held-out good images" in line
    assert "--val-fraction" not in describe_expected_fpr({**cal, "val_images": 99})  # enough: no advice
    assert "about 1.0%" in describe_expected_fpr({**cal, "val_images": 99})


def test_normalized_scores_put_the_threshold_at_one_half():
    assert normalize_scores(2.0, 2.0) == 0.5
    assert normalize_scores(0.0, 2.0) == 0.0
    assert normalize_scores(8.0, 2.0) == 1.0
    np.testing.assert_allclose(normalize_scores(np.array([1.0, 3.0]), 2.0), [0.25, 0.75])
    assert torch.equal(normalize_scores(torch.tensor([1.0, 5.0]), 2.0), torch.tensor([0.25, 1.0]))
    assert normalize_scores(5.0, math.inf) == 0.0  # no calibration: nothing is above the threshold


def test_pixel_threshold_is_the_good_pixel_quantile():
    maps = torch.arange(10000, dtype=torch.float32).view(4, 50, 50)
    thr = pixel_quantile_threshold(maps, 0.01)
    assert (maps > thr).float().mean().item() == pytest.approx(0.01, abs=1e-4)
    assert pixel_quantile_threshold(torch.empty(0), 0.01) == math.inf


def test_fit_stores_image_and_pixel_thresholds(held_out_run, tiny_category):
    """The held-out scores fit stores (scored from cached features) are those the Detector gives the
    same images, and the thresholds are their (1 - target FPR) quantiles, recomputed here with numpy
    from the Detector's scores and maps: a wrong level, image set, map or interpolation shows."""
    cal = load_checkpoint(held_out_run / "model.pt")["calibration"]
    assert cal["mode"] == "fpr" and cal["threshold_rule"] == "quantile" and cal["target_fpr"] == HELD_OUT_FPR
    assert cal["threshold"] == cal["threshold_fpr"] and cal["pixel_threshold"] == cal["pixel_threshold_fpr"]
    det = Detector.load(held_out_run, device="cpu")
    train = det.config.train
    _, held_out = split_train_val(index_mvtec(tiny_category.parent, tiny_category.name, "train"),
                                  train.val_fraction, train.seed)
    assert len(held_out) == cal["val_images"] == len(cal["val_scores"]) == 6
    predictions = det.predict([s.image for s in held_out])
    scores = np.array([p.score for p in predictions])
    np.testing.assert_allclose(cal["val_scores"], scores, rtol=1e-5)
    # Linear interpolation between order statistics: the 70% point of 6 sorted scores lies at
    # 0-based position 0.7 * 5 = 3.5, halfway between the 4th and 5th smallest.
    ordered = np.sort(scores)
    assert len(set(ordered)) == 6  # distinct, so the quantile is strictly between two of them
    assert cal["threshold"] == pytest.approx((ordered[3] + ordered[4]) / 2, rel=1e-5)
    assert ordered[3] < cal["threshold"] < ordered[4]
    # The pixel threshold: the same quantile over every pixel of the held-out maps together.
    maps = np.stack([p.anomaly_map for p in predictions]).astype(np.float64)
    assert maps.shape == (6, 64, 64)
    assert cal["pixel_threshold"] == pytest.approx(np.quantile(maps, 1 - HELD_OUT_FPR), rel=1e-5)
    assert (maps > cal["pixel_threshold"]).mean() == pytest.approx(HELD_OUT_FPR, abs=1e-3)


def test_prediction_at_the_input_resolution(tiny_run, tiny_category):
    det = Detector.load(tiny_run, device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (37, 90, 3), dtype=np.uint8)
    p = det.predict(image)
    assert p.anomaly_map.shape == (37, 90) and p.defect_mask.shape == (37, 90)
    assert p.anomaly_map.dtype == np.float32 and p.defect_mask.dtype == bool
    assert p.normalized_score == pytest.approx(min(1.0, 0.5 * p.score / p.threshold))
    # The mask never contradicts the decision: at an unreachable threshold the image is normal.
    q = det.predict(image, threshold=1e9)
    assert not q.is_anomalous and not q.defect_mask.any()
    r = det.predict(image, threshold=0.0)
    assert r.is_anomalous and np.array_equal(r.defect_mask, r.anomaly_map > det.pixel_threshold)
    with pytest.raises(AdtrError, match="batch_size must be a whole number of at least 1, got 0"):
        det.predict([image], batch_size=0)


def test_calibrate_f1_and_back(tiny_run, tiny_category, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = load_checkpoint(run / "model.pt")["calibration"]
    assert main(["calibrate", str(run), "--data", str(tiny_category)]) == 0
    cal = load_checkpoint(run / "model.pt")["calibration"]
    assert cal["mode"] == "f1" and cal["threshold"] == cal["threshold_f1"] != before["threshold"]
    assert "pixel_threshold_f1" in cal and cal["pixel_threshold"] == cal["pixel_threshold_f1"]
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "test")
    scores = np.array([p.score for p in Detector.load(run, device="cpu").predict([s.image for s in samples])])
    labels = np.array([s.label for s in samples])
    pred = scores > cal["threshold"]
    tp = (pred & (labels == 1)).sum()
    assert 2 * tp / (pred.sum() + labels.sum()) == pytest.approx(cal["f1_image"])
    printed = capsys.readouterr().out
    assert "F1-optimal" in printed and "model.onnx" not in printed  # nothing exported, nothing to say
    (run / "model.onnx").write_bytes(b"stands in for an export")
    assert main(["calibrate", str(run), "--mode", "fpr"]) == 0
    assert f"note: {run / 'model.onnx'} still carries the old threshold" in capsys.readouterr().out
    back = load_checkpoint(run / "model.pt")["calibration"]
    assert back["threshold"] == before["threshold"] and back["pixel_threshold"] == before["pixel_threshold"]


def test_calibrate_switches_the_threshold_rule_from_stored_scores(held_out_run, tmp_path, capsys):
    """From the 6 stored held-out scores at a 30% target, the conformal rule takes the 5th smallest
    (rank ceil(7 * 0.7) = 5), above the quantile threshold (halfway between the 4th and 5th); switching
    back restores the quantile one. The pixel threshold keeps its quantile under either rule."""
    run = tmp_path / "run"
    shutil.copytree(held_out_run, run)
    before = load_checkpoint(run / "model.pt")["calibration"]
    assert before["threshold_rule"] == "quantile"
    ordered = sorted(before["val_scores"])
    quantile = float(np.quantile(ordered, 1 - HELD_OUT_FPR))
    assert before["threshold"] == pytest.approx(quantile, rel=1e-12)
    assert conformal_rank(6, HELD_OUT_FPR) == 5
    assert main(["calibrate", str(run), "--threshold-rule", "conformal"]) == 0  # no --mode: the target-FPR one
    cal = load_checkpoint(run / "model.pt")["calibration"]
    assert cal["mode"] == "fpr" and cal["threshold_rule"] == "conformal"
    assert cal["threshold"] == cal["threshold_fpr"] == ordered[4] > quantile
    assert cal["pixel_threshold"] == before["pixel_threshold"]  # the pixel threshold keeps its quantile
    out = capsys.readouterr().out
    assert "(conformal rule)" in out and "new good images exceed it about" in out
    assert Detector.load(run, device="cpu").expected_fpr == expected_fpr(6, HELD_OUT_FPR, rule="conformal")
    assert main(["calibrate", str(run), "--threshold-rule", "quantile"]) == 0
    back = load_checkpoint(run / "model.pt")["calibration"]
    assert back["threshold_rule"] == "quantile" and back["threshold"] == back["threshold_fpr"]
    assert back["threshold"] == pytest.approx(quantile, rel=1e-12)
    no_scores = {**before, "val_scores": []}
    with pytest.raises(AdtrError, match="no held-out good scores"):
        rule_calibration(no_scores, "conformal")
    with pytest.raises(AdtrError, match="unknown threshold rule 'median'"):  # the user's error type, not ValueError
        rule_calibration(before, "median")


def test_calibrate_errors(tiny_run, tiny_category, tmp_path, capsys):
    """Mistakes are one ``error:`` line naming the problem (exit status 2), and change nothing."""
    with pytest.raises(AdtrError, match="no F1 calibration"):
        apply_mode({"threshold": 1.0}, "f1")
    before = (tiny_run / "model.pt").read_bytes()
    with pytest.raises(AdtrError, match="needs good and defective"):
        calibrate(tiny_run, "f1", index_mvtec(tiny_category.parent, tiny_category.name, "train"))
    good_only = tmp_path / "good_only"
    shutil.copytree(tiny_category / "test" / "good", good_only / "good")
    err = error_of(capsys, ["calibrate", str(tiny_run), "--data", str(good_only)])
    assert "needs good and defective images" in err and "4 good and 0 defective" in err
    assert (tiny_run / "model.pt").read_bytes() == before
    nowhere = tmp_path / "nowhere"
    err = error_of(capsys, ["calibrate", str(nowhere), "--mode", "fpr"])
    assert str(nowhere) in err and "not an adtr run" in err


def test_calibrate_f1_on_confetti(tiny_run, tiny_category, tmp_path, capsys):
    """The confetti F1 is that of the stored threshold on each good image (label 0) and its corrupted
    copy (label 1), redrawn here as calibrate draws them: one generator seeded 0, the images in sorted
    order. Swapped labels, another seed or another image order give another F1 or threshold."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    good = tiny_category / "test" / "good"
    assert main(["calibrate", str(run), "--confetti", str(good)]) == 0
    cal = load_checkpoint(run / "model.pt")["calibration"]
    assert cal["mode"] == "f1" and cal["f1_source"] == "confetti" and cal["f1_images"] == 2 * 4
    assert cal["threshold"] == cal["threshold_f1"] and cal["pixel_threshold"] == cal["pixel_threshold_f1"]
    assert 0 < cal["f1_image"] <= 1 and 0 < cal["f1_pixel"] <= 1
    images = sorted(good.glob("*.png"))
    det = Detector.load(run, device="cpu")
    generator = torch.Generator().manual_seed(0)
    maps, scores, masks = [], [], []
    for path in images:  # each pair a batch of its own, as calibrate scores them: the same floats
        image = image_to_tensor(read_image(path), det.image_size)
        corrupted, mask = confetti(image, generator)
        pair_maps, pair_scores = det.score_tensors(torch.stack([image, corrupted]))
        maps.append(pair_maps.numpy())
        scores += pair_scores.tolist()
        masks += [torch.zeros_like(mask), mask]
    maps, scores = np.concatenate(maps), np.array(scores)
    labels = np.tile([0, 1], len(images))
    thr = cal["threshold_f1"]
    assert f1_score(labels, scores > thr) == pytest.approx(cal["f1_image"])
    # ... no threshold does better on these labels, and it is the midpoint of two of these very
    # scores (F1 takes few values on 8 images; the scores of other confetti are other numbers).
    best = max(f1_score(labels, scores > t, zero_division=0) for t in np.r_[scores, -np.inf])
    assert cal["f1_image"] == pytest.approx(best)
    assert thr == pytest.approx((scores[scores < thr].max() + scores[scores > thr].min()) / 2, rel=1e-6)
    pixel_f1 = f1_score(torch.stack(masks).numpy().ravel(), maps.ravel() > cal["pixel_threshold_f1"])
    assert pixel_f1 == pytest.approx(cal["f1_pixel"])
    # Seeded: the same images give the same thresholds; another seed draws other confetti.
    again = calibrate(run, "f1", confetti_images=images)
    assert again["threshold_f1"] == cal["threshold_f1"]
    other = confetti_f1_calibration(images, run, seed=1)
    assert (other["threshold_f1"], other["pixel_threshold_f1"]) != (cal["threshold_f1"], cal["pixel_threshold_f1"])
    with pytest.raises(AdtrError, match="not both"):
        calibrate(run, "f1", index_mvtec(tiny_category.parent, tiny_category.name, "test"), [good / "000.png"])


def test_calibrate_from_python_takes_the_folders_the_cli_takes(tiny_run, tiny_category, tmp_path):
    """``calibrate(run, "f1", "path/to/category")`` reads the folder as ``--data`` does (the
    string used to be iterated character by character), and confetti takes a folder of good images."""
    for name in ("folder", "samples", "confetti_folder", "confetti_list"):
        shutil.copytree(tiny_run, tmp_path / name)
    by_folder = calibrate(tmp_path / "folder", "f1", str(tiny_category))
    by_samples = calibrate(tmp_path / "samples", "f1", index_mvtec(tiny_category.parent, tiny_category.name, "test"))
    assert by_folder["threshold_f1"] == by_samples["threshold_f1"] and by_folder["f1_images"] == 12
    good = tiny_category / "train" / "good"
    by_confetti_folder = calibrate(tmp_path / "confetti_folder", "f1", confetti_images=str(good))
    by_confetti_list = calibrate(tmp_path / "confetti_list", "f1", confetti_images=sorted(good.glob("*.png")))
    assert by_confetti_folder["threshold_f1"] == by_confetti_list["threshold_f1"]
    with pytest.raises(AdtrError, match="masks go with a folder"):
        calibrate(tmp_path / "folder", "f1", index_mvtec(tiny_category.parent, tiny_category.name, "test"),
                  masks=tmp_path)
