"""Which backbone stages localise: metrics of a trained run with the map built from
subsets of its reconstruction error.

    python benchmarks/stage_errors.py --root ../shared/data/mvtec_ad --run bottle=runs/bottle grid=runs/grid

ADTR's map (Eq. 2-3) is the L2 norm of f - f_hat over all channels of all stages, in the
backbone's units, so the stages with the largest errors on normal images dominate it.
This measures, on one trained run per category and without retraining, the map
  * as the paper defines it, over all stages of the run (``all stages (Eq. 2-3)``);
  * from each stage's channels alone;
  * with every stage's squared error divided by its mean on the run's own held-out good
    images (``stages balanced on held-out good``), so each stage counts about equally on
    normal images: a choice made from training data only.
Each map is then upsampled, smoothed and scored exactly as ``adtr test`` does. The
output (``stage_errors.md`` and ``.json``) is for understanding where the error comes
from, not for choosing a map on test data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from adtr.data import ImageDataset, index_mvtec
from adtr.detector import Detector
from adtr.engine import split_train_val
from adtr.evaluate import compute_metrics
from adtr.postprocess import image_score, pixel_anomaly_map

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def stage_sq_errors(detector: Detector, samples, channels: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray]:
    """Per-stage squared reconstruction error (N, stages, h, w) and the masks (N, S, S)."""
    network = detector.scoring.network.eval()
    bounds = np.cumsum((0, *channels))
    errors, masks = [], []
    loader = torch.utils.data.DataLoader(ImageDataset(samples, detector.image_size), batch_size=16)
    for batch in loader:
        out = network(batch["image"])
        diff = out.features - out.reconstruction
        if network.model.error_space == "standardized":  # the map's own units (see ADTR.forward)
            diff = diff / network.model.feature_std
        sq = diff.pow(2)
        errors.append(torch.stack([sq[:, a:b].sum(1) for a, b in zip(bounds[:-1], bounds[1:])], dim=1))
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
    return torch.cat(errors), np.concatenate(masks)


def metrics_of(grid_sq: torch.Tensor, labels: np.ndarray, masks: np.ndarray, detector: Detector) -> dict:
    """Image AUROC, pixel AUROC and AUPRO of the map sqrt(grid_sq) (N, h, w), scored as ``adtr test`` does."""
    score_cfg = detector.config.score
    size = (detector.image_size, detector.image_size)
    pmap = pixel_anomaly_map(grid_sq.sqrt()[:, None], size, score_cfg.sigma)
    scores = image_score(pmap, score_cfg.pool_size).numpy()
    m = compute_metrics(labels, scores, masks, pmap[:, 0].numpy(), float("inf"))
    return {k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro")}


def analyse(root: Path, category: str, run: Path) -> list[dict]:
    detector = Detector.load(run, device="cpu")
    config = detector.config
    channels = detector.scoring.network.backbone.channels
    test = index_mvtec(root, category, "test")
    labels = np.array([s.label for s in test])
    errors, masks = stage_sq_errors(detector, test, channels)
    # The held-out good images of the run's own fit (same split, seed and fraction).
    _, val = split_train_val(index_mvtec(root, category, "train"), config.train.val_fraction, config.train.seed)
    val_errors, _ = stage_sq_errors(detector, val, channels)
    val_mean = val_errors.mean(dim=(0, 2, 3))  # (stages,)
    stages = config.model.stages
    variants = [("all stages (Eq. 2-3)", errors.sum(1))]
    variants += [(f"stage {s} alone", errors[:, i]) for i, s in enumerate(stages)]
    variants.append(("stages balanced on held-out good", (errors / val_mean.view(1, -1, 1, 1)).sum(1)))
    rows = []
    for name, grid_sq in variants:
        rows.append({"category": category, "map": name, **metrics_of(grid_sq, labels, masks, detector)})
        print(rows[-1], flush=True)
    share = (val_mean / val_mean.sum()).tolist()
    rows.append({"category": category, "map": "held-out good: share of the squared error per stage",
                 "share": dict(zip(map(str, stages), share)), "channels": dict(zip(map(str, stages), channels))})
    return rows


def markdown(rows: list[dict], runs: dict[str, str], commit: str) -> str:
    lines = ["# Which stages localise: the map from parts of the reconstruction error",
             "", f"Commit `{commit}`; runs: " + ", ".join(f"{c} `{r}`" for c, r in runs.items())
             + ". Same trained model per category, only the map changes; image AUROC / pixel AUROC / AUPRO.",
             "", "| category | map | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|"]
    for r in rows:
        if "share" in r:
            continue
        lines.append(f"| {r['category']} | {r['map']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | "
                     f"{r['aupro']:.3f} |")
    lines += ["", "Share of the squared error on held-out good images, per stage (channels):", ""]
    for r in rows:
        if "share" in r:
            parts = [f"stage {s}: {100 * v:.0f}% ({r['channels'][s]} ch)" for s, v in r["share"].items()]
            lines.append(f"- {r['category']}: " + ", ".join(parts))
    return "\n".join(lines) + "\n"


def main() -> None:
    from provenance import git_commit, short_commit, write_results

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="MVTec AD root folder")
    p.add_argument("--run", nargs="+", required=True, metavar="CATEGORY=RUN", help="a trained run per category")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    runs = dict(item.split("=", 1) for item in args.run)
    rows = [row for category, run in runs.items() for row in analyse(args.root, category, Path(run))]
    commit = git_commit()
    write_results(args.out, "stage_errors", {"commit": commit, "runs": runs, "rows": rows},
                  markdown(rows, runs, short_commit(commit)))


if __name__ == "__main__":
    main()
