"""int8 inference (``--engine compile --precision int8``) against compiled and eager fp32.

    python benchmarks/int8.py [--runs RUN ...] [--root ../shared/data/mvtec_ad] --name int8

1. Speed: the full model (backbone, transformer, map, score; image already decoded) of
   the default config (packaged backbone, untrained transformer: speed does not depend
   on the weights), compiled once in fp32 and once in int8, then timed in turns in one
   process (this machine's speed drifts by more than their difference): ms/image at
   batch 1 and 32 (int8 scores a batch one image at a time), and the largest map and
   score differences from eager fp32.
2. Quality: for each trained run in ``--runs`` (its category in ``--categories``), the
   MVTec test split scored by eager fp32, compiled fp32 and compiled int8: image AUROC,
   pixel AUROC, AUPRO, the largest score difference from eager fp32, and the test images
   whose decision at the run's threshold changed.

Writes ``NAME.json`` and ``NAME.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from provenance import (git_commit, machine_description, short_commit,  # benchmarks/ is on sys.path when run
                        write_results)
from speed import build, interleaved_median_seconds

HERE = Path(__file__).resolve().parent


def speed(batches: list[int]) -> dict:
    from adtr.compiled import CompiledScorer
    from adtr.export import ScoringModel
    from adtr.models.adtr import ADTRDetector

    backbone, model, cfg = build(None)
    scoring = ScoringModel(ADTRDetector(backbone, model), cfg.model.image_size, cfg.score.sigma,
                           cfg.score.pool_size).eval()
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    images = torch.rand(max(batches), 3, cfg.model.image_size, cfg.model.image_size)
    with torch.no_grad():
        ref_maps, ref_scores = scoring(images)
    scorers = {p: CompiledScorer(scoring, p, cpu) for p in ("fp32", "int8")}
    result = {}
    for bs in batches:
        x = images[:bs]
        row = {}
        for precision, scorer in scorers.items():
            t = time.perf_counter()
            maps, scores = scorer.score_tensors(x)  # compiles for this batch size (int8: once, for 1)
            row[precision] = {
                "compile_seconds": time.perf_counter() - t,
                "max_relative_map_difference": float((maps - ref_maps[:bs, 0]).abs().max() / ref_maps.abs().max()),
                "max_relative_score_difference":
                    float(((scores - ref_scores[:bs]).abs() / ref_scores[:bs].abs()).max()),
            }
        fns = {p: (lambda s=s: s.score_tensors(x)) for p, s in scorers.items()}
        for precision, seconds in interleaved_median_seconds(fns, 30 if bs == 1 else 5).items():
            row[precision]["ms_per_image"] = 1000 * seconds / bs
        result[f"b{bs}"] = row
    return result


def agreement(scores: np.ndarray, ref: np.ndarray, threshold: float) -> dict:
    """Largest score difference relative to each reference score, and the images whose
    decision (score > threshold) differs from the reference's."""
    return {"max_relative_score_difference": float((np.abs(scores - ref) / np.abs(ref)).max()),
            "decisions_changed": int(((scores > threshold) != (ref > threshold)).sum())}


def quality(run: Path, root: Path, category: str) -> dict:
    from adtr.data import index_mvtec
    from adtr.detector import Detector
    from adtr.evaluate import evaluate

    samples = index_mvtec(root, category, "test")
    rows = {}
    for name, engine, precision in (("eager fp32", "torch", "fp32"), ("compiled fp32", "compile", "fp32"),
                                    ("compiled int8", "compile", "int8")):
        det = Detector.load(run, device="cpu", engine=engine, precision=precision)
        t = time.perf_counter()
        res = evaluate(det, samples)
        rows[name] = {"metrics": {k: res.metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
                      "scores": res.scores.tolist(), "seconds": time.perf_counter() - t,
                      "threshold": det.threshold}
    ref = np.array(rows["eager fp32"]["scores"])
    for row in rows.values():
        row.update(agreement(np.array(row.pop("scores")), ref, rows["eager fp32"]["threshold"]))
    return {"run": str(run), "category": category, "n_images": len(samples), "engines": rows}


def markdown(r: dict) -> str:
    lines = [f"# int8 inference (cpu: {r['machine']}, {r['threads']} threads, torch {r['torch']})", "",
             f"Commit `{short_commit(r['commit'])}`. `--engine compile --precision int8`: the transformer's "
             "linear layers dynamically quantised to int8 (adtr.quantize), the rest fp32.", "",
             "## Speed (default model, 256x256, untrained transformer; fp32 and int8 timed in turns)", ""]
    lines += ["| batch | compiled fp32 ms/img | compiled int8 ms/img | fp32 / int8 | int8 max map difference | "
              "int8 max score difference | int8 compile (s) |", "|---|---|---|---|---|---|---|"] if r["speed"] else [
              "Not timed in this run (`--no-speed`)."]
    for key, row in r["speed"].items():
        f, i = row["fp32"], row["int8"]
        lines.append(f"| {key[1:]} | {f['ms_per_image']:.1f} | {i['ms_per_image']:.1f} | "
                     f"{f['ms_per_image'] / i['ms_per_image']:.2f}x | {i['max_relative_map_difference']:.1e} | "
                     f"{i['max_relative_score_difference']:.1e} | {i['compile_seconds']:.0f} |")
    if r["speed"]:
        lines += ["", "(differences from eager fp32: maps relative to their largest value, scores to each score)"]
    if r["quality"]:
        lines += ["", "## Quality on trained runs (MVTec test split)", "",
                  "| category | engine | image AUROC | pixel AUROC | AUPRO | max score difference | "
                  "decisions changed | seconds |", "|---|---|---|---|---|---|---|---|"]
        for q in r["quality"]:
            for name, row in q["engines"].items():
                m = row["metrics"]
                lines.append(f"| {q['category']} ({q['n_images']}) | {name} | {m['image_auroc']:.4f} | "
                             f"{m['pixel_auroc']:.4f} | {m['aupro']:.4f} | {row['max_relative_score_difference']:.1e} "
                             f"| {row['decisions_changed']} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="trained runs to evaluate")
    parser.add_argument("--categories", nargs="*", default=[], help="each run's MVTec category, in order")
    parser.add_argument("--root", type=Path, default=HERE.parent.parent / "shared" / "data" / "mvtec_ad")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--no-speed", action="store_true", help="quality on --runs only")
    parser.add_argument("--name", default="int8")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if len(args.categories) != len(args.runs):
        parser.error(f"{len(args.runs)} runs need as many --categories, got {len(args.categories)}")
    result = {"commit": git_commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": machine_description(), "speed": {} if args.no_speed else speed(args.batches),
              "quality": [quality(run, args.root, c) for run, c in zip(args.runs, args.categories)]}
    write_results(args.out, args.name, result, markdown(result))


if __name__ == "__main__":
    main()
