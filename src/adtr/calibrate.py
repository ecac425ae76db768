"""Re-calibrate a finished run's decision thresholds (``adtr calibrate``).

``fit`` always calibrates without anomalies: the image and pixel thresholds are the
(1 - target FPR) quantiles of held-out good images (interpolated; with ``--threshold-rule
conformal`` the image one is the order statistic that keeps the target on average, and
``adtr calibrate --threshold-rule`` switches a finished run from its stored held-out
scores). When labelled anomalies become available (a few real defects, with or without
masks), the F1-optimal thresholds on them are the usual alternative; without real defects,
confetti noise on good images (ADTR+'s synthetic anomalies, labels known by construction)
gives a proxy. Both sets are kept in the run, so switching back is one command. The images
used must not be the test set you report on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adtr import checkpoint as ckpt_io
from adtr.data import Sample
from adtr.errors import AdtrError
from adtr.postprocess import (ExpectedFpr, check_threshold_rule, conformal_min_images, expected_fpr,
                              f1_optimal_threshold, quantile_threshold)

MODES = ("fpr", "f1")


def f1_calibration(samples: Sequence[Sample], run: Path) -> dict[str, Any]:
    """F1-optimal image threshold (and pixel threshold when every defect has a mask) on ``samples``."""
    from adtr.detector import Detector
    from adtr.evaluate import evaluate

    labels = [s.label for s in samples]
    if 0 not in labels or 1 not in labels:
        raise AdtrError(f"F1 calibration needs good and defective images; the data has "
                        f"{labels.count(0)} good and {labels.count(1)} defective")
    res = evaluate(Detector.load(run, device="cpu"), samples)
    thr, f1 = f1_optimal_threshold(res.scores, res.labels)
    out: dict[str, Any] = {"threshold_f1": thr, "f1_image": f1, "f1_images": len(samples)}
    if res.masks is not None and res.masks.any():
        pthr, pf1 = f1_optimal_threshold(res.maps.ravel(), res.masks.ravel())
        out.update(pixel_threshold_f1=pthr, f1_pixel=pf1)
    return out


def confetti_f1_calibration(good_images: Sequence[Path], run: Path, seed: int = 0) -> dict[str, Any]:
    """F1-optimal thresholds on good images and a confetti-corrupted copy of each (labels and
    masks known by construction, as for ADTR+). A proxy: synthetic defects are not real ones,
    so check the result on real defects before trusting it on a line."""
    import numpy as np
    import torch

    from adtr.confetti import confetti
    from adtr.data.images import image_to_tensor, read_image
    from adtr.detector import Detector

    if len(good_images) < 2:
        raise AdtrError(f"confetti calibration needs at least 2 good images, got {len(good_images)}")
    det = Detector.load(run, device="cpu")
    g = torch.Generator().manual_seed(seed)
    scores, labels, maps, masks = [], [], [], []
    for path in good_images:
        image = image_to_tensor(read_image(path), det.image_size)  # (3, S, S)
        corrupted, mask = confetti(image, g)
        m, sc = det.score_tensors(torch.stack([image, corrupted]))
        scores += sc.tolist()
        labels += [0, 1]
        maps.append(m.numpy())
        masks.append(np.stack([np.zeros_like(mask.numpy()), mask.numpy()]))
    thr, f1 = f1_optimal_threshold(np.array(scores), np.array(labels))
    pthr, pf1 = f1_optimal_threshold(np.concatenate(maps).ravel(), np.concatenate(masks).ravel())
    return {"threshold_f1": thr, "f1_image": f1, "pixel_threshold_f1": pthr, "f1_pixel": pf1,
            "f1_images": 2 * len(good_images), "f1_source": "confetti"}


def active_expected_fpr(calibration: dict[str, Any]) -> ExpectedFpr | None:
    """What the active image threshold promises for new good images, when it is the target-FPR
    one of held-out good images (None after ``--mode f1``, or without held-out images)."""
    if calibration.get("mode", "fpr") != "fpr" or "val_images" not in calibration:
        return None
    return expected_fpr(int(calibration["val_images"]), float(calibration["target_fpr"]),
                        rule=threshold_rule(calibration))


def threshold_rule(calibration: dict[str, Any]) -> str:
    """The rule of the target-FPR image threshold (runs from before the option: quantile)."""
    return str(calibration.get("threshold_rule", "quantile"))


def rule_calibration(calibration: dict[str, Any], rule: str) -> dict[str, Any]:
    """The target-FPR image threshold under ``rule``, from the held-out scores that fit stored."""
    try:
        check_threshold_rule(rule)
    except ValueError as e:
        raise AdtrError(str(e)) from None
    scores = calibration.get("val_scores") or []
    if not scores:
        raise AdtrError("this run kept no held-out good scores (fit with --val-fraction above 0), "
                        "so its target-FPR threshold cannot be recomputed")
    import torch

    thr = quantile_threshold(torch.tensor(scores, dtype=torch.float64), float(calibration["target_fpr"]), rule)
    return {"threshold_fpr": thr, "threshold_rule": rule}


def describe_expected_fpr(calibration: dict[str, Any]) -> str | None:
    """One line for the CLI: the false-positive rate to expect on new good images, and the
    advice to hold out more good images where the held-out set is too small for the target."""
    rate = active_expected_fpr(calibration)
    if rate is None:
        return None
    n, target, rule = int(calibration["val_images"]), float(calibration["target_fpr"]), threshold_rule(calibration)
    line = (f"new good images exceed it about {rate.expected:.1%} of the time ({rate.confidence:.0%} interval "
            f"{rate.low:.1%}-{rate.high:.1%}): a {target:.1%} target from {n} held-out good images")
    needed = conformal_min_images(target)
    if rule == "conformal":
        line += " (conformal rule)"
        if needed is not None and n < needed:
            line += f"; {needed} held-out good images (--val-fraction) would keep the target on average"
    elif rate.expected > 2 * target:
        line += "; hold out more good images (--val-fraction) for a rate nearer the target"
        if needed is not None:
            line += f", or take --threshold-rule conformal, which keeps it on average from {needed} held-out images"
    return line


def apply_mode(calibration: dict[str, Any], mode: str) -> dict[str, Any]:
    """Calibration with the active thresholds switched to ``mode`` (fpr | f1)."""
    if mode not in MODES:
        raise AdtrError(f"unknown calibration mode {mode!r} (use {' or '.join(MODES)})")
    cal = dict(calibration)
    # Runs from before pixel calibration have only "threshold": it is the target-FPR one.
    cal.setdefault("threshold_fpr", cal["threshold"])
    cal.setdefault("pixel_threshold_fpr", cal.get("pixel_threshold", math.inf))
    if mode == "f1":
        if "threshold_f1" not in cal:
            raise AdtrError("no F1 calibration in this run yet: give labelled images with --data")
        cal["threshold"] = cal["threshold_f1"]
        cal["pixel_threshold"] = cal.get("pixel_threshold_f1", cal["pixel_threshold_fpr"])
    else:
        cal["threshold"] = cal["threshold_fpr"]
        cal["pixel_threshold"] = cal["pixel_threshold_fpr"]
    cal["mode"] = mode
    return cal


def calibrate(run: str | Path, mode: str, samples: Sequence[Sample] | str | Path | None = None,
              confetti_images: Sequence[Path] | str | Path | None = None, rule: str | None = None,
              masks: str | Path | None = None) -> dict[str, Any]:
    """Switch ``run``'s active thresholds to ``mode``, first computing the F1 ones from labelled
    ``samples`` or from confetti on ``confetti_images`` when given, and the target-FPR image
    threshold under ``rule`` when given; rewrites ``model.pt`` atomically and returns the calibration.

    ``samples`` may be a folder, read as ``adtr calibrate --data DIR [--masks DIR]`` reads it
    (a MVTec category or a test-layout folder, ``masks`` beside it); ``confetti_images`` a
    folder of good images. A :class:`~adtr.detector.Detector` loaded before keeps the thresholds
    it was loaded with (load it again), and so does an exported ``model.onnx`` (export again).
    """
    from adtr.data import list_images, resolve_test_samples

    if masks is not None and not isinstance(samples, (str, Path)):
        raise AdtrError("masks go with a folder of labelled images (samples='path/to/test')")
    if isinstance(samples, (str, Path)):
        samples = resolve_test_samples(samples, masks)
    if isinstance(confetti_images, (str, Path)):
        confetti_images = list_images(confetti_images)
    path = ckpt_io.find_run_file(Path(run))
    ckpt = ckpt_io.load_checkpoint(path)
    if ckpt.get("kind") != "model":
        raise AdtrError(f"{path}: not a finished model; finish training first (adtr fit --resume)")
    cal = dict(ckpt["calibration"])
    if samples is not None and confetti_images is not None:
        raise AdtrError("give labelled data or good images for confetti, not both")
    if samples is not None:
        cal.update(f1_calibration(samples, path), f1_source="labelled")
    if confetti_images is not None:
        cal.update(confetti_f1_calibration(confetti_images, path))
    if rule is not None:
        cal.update(rule_calibration(cal, rule))
    cal = apply_mode(cal, mode)
    ckpt["calibration"] = cal
    ckpt_io.atomic_save(ckpt, path)
    return cal
