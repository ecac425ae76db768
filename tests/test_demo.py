from __future__ import annotations

import json

from PIL import Image

from adtr.config import with_overrides
from adtr.demo import run_demo

from conftest import tiny_config


def test_miniature_demo_writes_metrics_and_montage(tmp_path, capsys):
    cfg = with_overrides(tiny_config(), "model", image_size=64)
    metrics = run_demo(tmp_path, minutes=0.05, size=64, n_train=12, config=cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert saved["image_auroc"] == metrics["image_auroc"]
    assert 0.0 <= saved["pixel_auroc"] <= 1.0
    assert Image.open(tmp_path / "montage.png").width == 2 * (64 * 4 + 12)
    out = capsys.readouterr().out
    assert "image AUROC" in out and "montage.png" in out
    # A second call reuses the finished run instead of failing on the existing folder.
    run_demo(tmp_path, minutes=0.05, size=64, n_train=12, config=cfg)
