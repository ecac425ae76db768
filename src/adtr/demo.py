"""``adtr demo``: generate a textured-surface dataset, fit, test, predict, all offline.

Everything it prints is measured on the generated test split, which training never sees.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from adtr.config import RunConfig, with_overrides
from adtr.data import image_to_tensor, index_mvtec, read_image, read_mask
from adtr.detector import Detector
from adtr.engine import fit
from adtr.evaluate import evaluate
from adtr.synthetic import make_dataset
from adtr.visualize import montage, overlay_panel, save_png, tensor_to_uint8


def run_demo(out: Path, minutes: float = 2.0, seed: int = 0, category: str = "fabric", size: int = 256,
             n_train: int = 60, config: RunConfig | None = None) -> dict:
    """Run the whole pipeline into ``out``; returns the test metrics.

    ``size``, ``n_train`` and ``config`` exist so tests can run a miniature demo.
    """
    out = Path(out)
    t0 = time.perf_counter()
    print(f"[1/4] generating a synthetic '{category}' dataset in {out / 'data'}")
    cat_dir = make_dataset(out / "data", category, size=size, n_train=n_train, seed=seed)
    train = index_mvtec(cat_dir.parent, cat_dir.name, "train")
    test = index_mvtec(cat_dir.parent, cat_dir.name, "test")
    print(f"[2/4] fitting on {len(train)} good images ({minutes:g} min budget)")
    cfg = with_overrides(config or RunConfig(), "train", max_minutes=minutes, seed=seed)
    run_dir = out / "run"
    if (run_dir / "model.pt").exists():
        print(f"      reusing the finished run in {run_dir}")
    else:
        fit(cfg, train, run_dir, resume=(run_dir / "last.pt").exists())
    det = Detector.load(run_dir)
    print(f"[3/4] testing on {len(test)} images ({sum(s.label for s in test)} defective)")
    res = evaluate(det, test)
    m = res.metrics
    print(f"      image AUROC {m['image_auroc']:.3f}  pixel AUROC {m['pixel_auroc']:.3f}  AUPRO {m['aupro']:.3f}")
    print(f"      at the calibrated threshold: FPR {m['fpr_at_threshold']:.2f}  FNR {m['fnr_at_threshold']:.2f}")
    from adtr.cli import write_json

    write_json({"metrics": m, "per_type": res.per_type}, out / "metrics.json")
    print("[4/4] writing overlays (image | map | overlay | ground truth)")
    panels = []
    order = np.argsort(-res.scores)
    picks = [i for i in order if test[i].label == 1][:6] + [i for i in order if test[i].label == 0][:2]
    vmax = 2 * det.threshold if np.isfinite(det.threshold) else float(res.maps.max())
    for i in picks:
        s = test[i]
        img = tensor_to_uint8(image_to_tensor(read_image(s.image), det.image_size))
        mask = read_mask(s.mask, det.image_size).numpy() if s.mask else np.zeros(img.shape[:2], bool)
        panels.append(overlay_panel(img, res.maps[i], 0.0, vmax, mask))
    save_png(montage(panels, columns=2), out / "montage.png")
    print(f"done in {time.perf_counter() - t0:.0f} s: see {out / 'montage.png'} and {out / 'metrics.json'}")
    return m
