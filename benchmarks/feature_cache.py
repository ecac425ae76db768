"""How much the feature cache saves: one training epoch with and without it.

    python benchmarks/feature_cache.py --root ../shared/data/mvtec_ad --category bottle

Without the cache every step decodes the images and runs the frozen backbone before the
transformer; with it, a step is the transformer alone (features computed once before
training). Both are measured in this one run; the table goes to
``benchmarks/results/feature_cache.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from adtr.checkpoint import atomic_write_bytes
from adtr.config import RunConfig
from adtr.data import ImageDataset, index_mvtec
from adtr.engine import autocast, batch_order, build_backbone, build_model, fit_optimizer, resolve_precision
from adtr.features import extract_features
from adtr.models.adtr import reconstruction_loss

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--category", default="bottle")
    p.add_argument("--out", type=Path, default=HERE / "results" / "feature_cache.md")
    args = p.parse_args()
    cfg = RunConfig()
    mc, tc = cfg.model, cfg.train
    device = torch.device("cpu")
    precision = resolve_precision(tc.precision, device)
    samples = index_mvtec(args.root, args.category, "train")
    backbone = build_backbone(mc)
    ds = ImageDataset(samples, mc.image_size)

    t0 = time.perf_counter()
    feats = extract_features(backbone, samples, mc.image_size, device, "memory")
    cache_s = time.perf_counter() - t0

    def epoch(use_cache: bool) -> float:
        torch.manual_seed(0)
        model = build_model(mc, backbone.out_channels)
        model.set_feature_stats(feats)
        opt = fit_optimizer(model, tc, device)
        t = time.perf_counter()
        for idx in batch_order(len(samples), tc.batch_size, 0, 0):
            if use_cache:
                x = feats[idx]
            else:
                x = backbone(torch.stack([ds[int(i)]["image"] for i in idx]))
            with autocast(precision, device):
                loss = reconstruction_loss(model(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t

    cached = epoch(True)
    uncached = epoch(False)
    text = (
        f"# Feature cache: one training epoch on {args.category} ({len(samples)} images, "
        f"batch {tc.batch_size}, {precision}, {torch.get_num_threads()} threads)\n\n"
        "| | seconds |\n|---|---|\n"
        f"| build the cache once (decode + backbone, all images) | {cache_s:.1f} |\n"
        f"| epoch without cache (decode + backbone + transformer) | {uncached:.1f} |\n"
        f"| epoch with cache (transformer only) | {cached:.1f} |\n"
        f"| speed-up per epoch | {uncached / cached:.2f}x |\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(text.encode(), args.out)
    print(text)


if __name__ == "__main__":
    main()
