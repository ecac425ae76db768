"""MVTec AD benchmark: fit and test each category at the default settings.

    python benchmarks/mvtec.py --root ../shared/data/mvtec_ad --categories bottle grid

Each category runs in its own process (so peak memory is its own) and writes one
row; the script then writes ``benchmarks/results/mvtec.json`` (a list with one
object per category) and ``benchmarks/results/mvtec.md`` (a markdown table).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import (git_commit, machine_description, short_commit,  # benchmarks/ is on sys.path when run
                        write_results)

HERE = Path(__file__).resolve().parent
PAPER = "ADTR paper (EfficientNet-B4, 500 epochs): mean of 15 MVTec categories, image AUROC about 96, pixel AUROC 97.2"


def time_inference(det, images, batch_size: int, repeats: int) -> dict[str, float]:
    """ms/image for backbone, transformer (+ map and score) and total at one batch size."""
    import torch

    from adtr.postprocess import image_score, pixel_anomaly_map

    x = images[:batch_size]
    while len(x) < batch_size:
        x = torch.cat([x, images[: batch_size - len(x)]])
    net, cfg = det.network, det.config.score
    timings = {"backbone": [], "transformer": [], "total": []}
    with torch.no_grad():
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            feats = net.backbone(x)
            t1 = time.perf_counter()
            out = net.model(feats)
            pmap = pixel_anomaly_map(out.anomaly_map, tuple(x.shape[-2:]), cfg.sigma)
            image_score(pmap, cfg.pool_size)
            t2 = time.perf_counter()
            if i >= 2:  # warm-up excluded
                timings["backbone"].append(t1 - t0)
                timings["transformer"].append(t2 - t1)
                timings["total"].append(t2 - t0)
    return {k: 1000 * sorted(v)[len(v) // 2] / batch_size for k, v in timings.items()}


def run_category(root: Path, category: str, fit_args: list[str], out_json: Path) -> None:
    import torch

    from adtr.cli import build_parser, config_from_args
    from adtr.config import to_dict
    from adtr.data import ImageDataset, index_mvtec
    from adtr.detector import Detector
    from adtr.engine import fit
    from adtr.evaluate import evaluate

    args = build_parser().parse_args(["fit", str(root / category), "--out", "x", *fit_args])
    cfg = config_from_args(args)
    train = index_mvtec(root, category, "train")
    test = index_mvtec(root, category, "test")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = fit(cfg, train, Path(tmp) / "run")
        fit_seconds = time.perf_counter() - t0
        det = Detector.load(Path(tmp) / "run", device="cpu")
    res = evaluate(det, test)
    images = torch.stack([ImageDataset(test, det.image_size)[i]["image"] for i in range(32)])
    b1 = time_inference(det, images, 1, 20)
    b32 = time_inference(det, images, 32, 3)
    m = res.metrics
    row = {
        "category": category, "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"],
        "image_f1_max": m["image_f1_max"], "fpr_at_threshold": m["fpr_at_threshold"],
        "fnr_at_threshold": m["fnr_at_threshold"], "fit_seconds": round(fit_seconds, 1), "epochs": result.epochs,
        "selected_epoch": result.selected_epoch,
        "ms_per_image_b1": round(b1["total"], 2), "ms_per_image_b32": round(b32["total"], 2),
        "ms_backbone_b1": round(b1["backbone"], 2), "ms_transformer_b1": round(b1["transformer"], 2),
        "ms_backbone_b32": round(b32["backbone"], 2), "ms_transformer_b32": round(b32["transformer"], 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "per_type": res.per_type, "config": to_dict(cfg),
        "commit": git_commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": machine_description(),
    }
    out_json.write_text(json.dumps(row, indent=2))


def markdown(rows: list[dict]) -> str:
    f = lambda v: "absent" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "| category | image AUROC | pixel AUROC | AUPRO | fit (s) | epochs | ms/img b1 (backbone + transformer, map, score) "
        "| ms/img b32 | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['category']} | {f(r['image_auroc'])} | {f(r['pixel_auroc'])} | {f(r['aupro'])} | "
            f"{r['fit_seconds']:.0f} | {r['epochs']} | {r['ms_per_image_b1']:.1f} ({r['ms_backbone_b1']:.1f} + "
            f"{r['ms_transformer_b1']:.1f}) | {r['ms_per_image_b32']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="MVTec AD root folder")
    parser.add_argument("--categories", nargs="+", default=["bottle", "grid"])
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where mvtec.json/.md go")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--row-json", type=Path, help=argparse.SUPPRESS)
    args, fit_args = parser.parse_known_args()
    if args.single:
        run_category(args.root, args.single, fit_args, args.row_json)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cat in args.categories:
            row_json = Path(tmp) / f"{cat}.json"
            cmd = [sys.executable, __file__, "--root", str(args.root), "--single", cat, "--row-json", str(row_json),
                   *fit_args]
            print(f"== {cat}: {' '.join(fit_args) or 'default settings'}", flush=True)
            subprocess.run(cmd, check=True)
            rows.append(json.loads(row_json.read_text()))
            print(markdown(rows[-1:]), flush=True)
    write_results(args.out, "mvtec", rows, report(rows, fit_args))


def report(rows: list[dict], fit_args: list[str]) -> str:
    """The markdown file: header, overall table, per-defect-type table."""
    extra = f" (extra fit options: `{' '.join(fit_args)}`)" if fit_args else ""
    f = lambda v: "absent" if v is None else f"{v:.3f}"  # noqa: E731
    per_type = ["| category | defect type | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|"]
    for r in rows:
        for t, m in r["per_type"].items():
            per_type.append(f"| {r['category']} | {t} | {f(m['image_auroc'])} | {f(m['pixel_auroc'])} | {f(m['aupro'])} |")
    return (f"# MVTec AD, adtr defaults{extra}\n\nCommit `{short_commit(rows[0]['commit'])}`, torch {rows[0]['torch']}, "
            f"{rows[0]['threads']} threads, {rows[0]['machine']}. Timings: median over repeats, image already "
            f"decoded; fit time includes feature caching and calibration.\n\n" + markdown(rows)
            + "\nPer defect type (each type against all good test images):\n\n" + "\n".join(per_type)
            + f"\n\nFor scale: {PAPER}.\n")


if __name__ == "__main__":
    main()
