"""Shared fixtures: a tiny generated MVTec-layout dataset and small CPU configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adtr.config import RunConfig, with_overrides
from adtr.data import ImageArray
from adtr.synthetic import make_dataset

torch.set_num_threads(2)

MVTEC_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"


@pytest.fixture(scope="session")
def tiny_category(tmp_path_factory) -> Path:
    """A 64 px fabric dataset: 12 train, 4 good + 2x4 defective test images."""
    root = tmp_path_factory.mktemp("tiny")
    return make_dataset(root, "fabric", size=64, n_train=12, n_test_good=4, n_test_defect=2, seed=1)


def tiny_config(**train) -> RunConfig:
    """64 px input, 4x4 grid, a few epochs: seconds on a CPU."""
    cfg = with_overrides(RunConfig(), "model", image_size=64, weights="none")
    return with_overrides(cfg, "train", **{"epochs": 3, "batch_size": 4, "lr": 5e-4, **train})


def assert_compiled_agrees_with_eager(run: Path, precision: str, rtol: float, det=None):
    """Score three random 64 px images eagerly in fp32 and with the compiled engine in
    ``precision`` (``det``, or one loaded here); assert maps within ``rtol`` of their largest
    value, scores within ``rtol``, and not identical (the precision really ran). Returns the
    compiled detector, the images and its maps and scores."""
    import numpy as np

    from adtr.detector import Detector

    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    ref_maps, ref_scores = Detector.load(run, device="cpu").score_tensors(images)
    det = det or Detector.load(run, device="cpu", engine="compile", precision=precision)
    maps, scores = det.score_tensors(images)
    assert maps.shape == ref_maps.shape and maps.dtype == torch.float32
    assert float((maps - ref_maps).abs().max()) <= rtol * float(ref_maps.abs().max())
    np.testing.assert_allclose(scores, ref_scores, rtol=rtol)
    assert not torch.equal(scores, ref_scores)
    return det, images, maps, scores


def error_of(capsys, argv: list[str]) -> str:
    """Run the CLI on ``argv`` and return its error: exit status 2 and one ``error: ...`` line, no traceback."""
    from adtr.cli import main

    capsys.readouterr()  # drop what earlier calls printed
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


TINY_FIT_ARGS = ["--image-size", "64", "--weights", "none", "--epochs", "3", "--batch-size", "4"]


@pytest.fixture(scope="session")
def tiny_run(tiny_category, tmp_path_factory) -> Path:
    """A finished run on ``tiny_category`` (shared: copy it before changing it)."""
    from adtr.data import index_mvtec
    from adtr.engine import fit

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    fit(tiny_config(), index_mvtec(tiny_category.parent, tiny_category.name, "train"), run)
    return run


def tiny_cifar(seed: int = 0) -> tuple[ImageArray, ImageArray]:
    """Three classes of 32x32 images that differ in mean colour, so one class is separable."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.repeat(np.arange(3), n)
        base = np.array([[40, 40, 40], [200, 60, 60], [60, 200, 60]])[labels]
        images = np.clip(base[:, None, None, :] + rng.normal(0, 20, (len(labels), 32, 32, 3)), 0, 255)
        return ImageArray(images.astype(np.uint8), labels.astype(np.int64), ("a", "b", "c"))

    return split(12), split(6)
