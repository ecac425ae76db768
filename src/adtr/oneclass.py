"""The one-class protocol of the paper's CIFAR-10 experiment (section 4.3, Table 3).

Train on every training image of one class; test on that class's test images plus
1000 test images of the other classes (fixed seed); report image AUROC. ADTR+ then
fine-tunes with outlier exposure: as many outlier images as normal training images,
labelled anomalous at image level (Eq. 8-9).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from adtr.config import PAPER_MODEL, PAPER_TRAIN, RunConfig, plus_config, with_overrides
from adtr.data.dataset import ArrayDataset
from adtr.detector import Detector
from adtr.engine import fit
from adtr.errors import AdtrError
from adtr.metrics import image_auroc


#: The paper's CIFAR-10 input side (section 4.3): 32x32 images on an 8x8 grid.
PAPER_CIFAR_SIZE = 32
#: Tokens per side in the one-class protocol at any input size (the paper's 8x8 grid).
CIFAR_GRID = 8


def one_class_config(image_size: int = PAPER_CIFAR_SIZE, **train: object) -> RunConfig:
    """The 8x8 grid of the paper's CIFAR-10 protocol, batch 128 as in the paper.

    ``image_size``: the images are resized to it before the backbone, the grid staying 8x8
    (stride ``image_size / 8``), so only the backbone's cost grows. The paper's 32 (as written in
    section 4.3) feeds an ImageNet CNN images 7x smaller than it was trained on; the authors'
    later code (UniAD) upsamples CIFAR-10 to 224.

    The paper's model and optimiser: all five stages, no feature jitter, AdamW (the MVTec
    defaults, stages 1-3 with jitter and Muon, were chosen for a 16 px grid). The image score is the
    mean of the anomaly map (a pool as large as the image), the score the authors' later
    code uses for CIFAR; no smoothing at this size.
    """
    if image_size < CIFAR_GRID or image_size % CIFAR_GRID:
        raise AdtrError(f"the one-class image size must be a multiple of {CIFAR_GRID}, got {image_size}")
    cfg = with_overrides(RunConfig(), "model", image_size=image_size, grid_stride=image_size // CIFAR_GRID,
                         **PAPER_MODEL)
    cfg = with_overrides(cfg, "train", **{"batch_size": 128, **PAPER_TRAIN, **train})
    return with_overrides(cfg, "score", sigma=0.0, pool_size=image_size)


@torch.no_grad()
def score_images(detector: Detector, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Image scores of a uint8 (N, H, W, 3) array."""
    scores = []
    for batch in DataLoader(ArrayDataset(images, detector.image_size), batch_size=batch_size):
        scores.append(detector.score_tensors(batch["image"])[1].numpy())
    return np.concatenate(scores)


@dataclass
class OneClassResult:
    image_auroc: float
    fit_seconds: float
    epochs: int


def fit_and_score(config: RunConfig, train: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                  run_dir: Path, outliers: np.ndarray | None = None) -> OneClassResult:
    """Fit one run (ADTR, or ADTR+ when ``config.plus`` is set) and its image AUROC on the test split."""
    t0 = time.perf_counter()
    result = fit(config, train, run_dir, anomalies=outliers)
    seconds = time.perf_counter() - t0
    scores = score_images(Detector.load(run_dir), test)
    return OneClassResult(image_auroc(test_labels, scores), seconds, result.epochs)


def run_one_class(train: np.ndarray, test: np.ndarray, test_labels: np.ndarray, run_dir: Path,
                  config: RunConfig, outliers: np.ndarray | None = None,
                  plus_epochs: int | None = None) -> dict[str, OneClassResult]:
    """ADTR on one class, then ADTR+ from it when ``outliers`` are given.

    Returns ``{"adtr": ..., "adtr_plus": ...}`` (the latter only with outliers).
    """
    run_dir = Path(run_dir)
    results = {"adtr": fit_and_score(config, train, test, test_labels, run_dir / "adtr")}
    if outliers is not None:
        plus_cfg = plus_config(config, loss="image", init=str(run_dir / "adtr"), source="outliers",
                               data="outlier image array")
        if plus_epochs is not None:
            plus_cfg = with_overrides(plus_cfg, "train", epochs=plus_epochs)
        results["adtr_plus"] = fit_and_score(plus_cfg, train, test, test_labels, run_dir / "adtr_plus", outliers)
    return results
