"""ADTR vs ADTR+ (pixel-level push-pull loss, confetti anomalies) from the same starting run.

    python benchmarks/plus.py --root ../shared/data/mvtec_ad --categories bottle grid --base-runs runs/

For each category: the ADTR run ``<base-runs>/base_<category>`` (fitted at the default
settings when missing), its test metrics, then ADTR+ fine-tuned from it with synthetic
confetti anomalies (``adtr fit --plus pixel --init ...``) and its test metrics; with
``--control``, also the same fine-tuning with no anomalies (``--anomaly-prob 0``: the
pull term alone), which separates the effect of the push term from that of fine-tuning.
No test image is used in training or selection. Writes ``plus.json`` and ``plus.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from provenance import git_commit, short_commit, write_results  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
KEYS = ("image_auroc", "pixel_auroc", "aupro")


def test_metrics(run: Path, root: Path, category: str) -> dict:
    from adtr.data import index_mvtec
    from adtr.detector import Detector
    from adtr.evaluate import evaluate

    res = evaluate(Detector.load(run, device="cpu"), index_mvtec(root, category, "test"))
    return {k: res.metrics[k] for k in KEYS}


def fit_plus(root: Path, category: str, base: Path, run: Path, args: list[str], reuse: bool) -> float | None:
    """Fit an ADTR+ run from ``base`` (seconds), or reuse a finished one (None)."""
    from adtr.cli import main as adtr

    if reuse and (run / "model.pt").is_file():
        return None
    if run.exists():
        shutil.rmtree(run)  # a rerun measures afresh
    t0 = time.perf_counter()
    if adtr(["fit", str(root / category), "--out", str(run), "--plus", "pixel", "--init", str(base), *args]) != 0:
        raise SystemExit(f"ADTR+ fit of {run} failed")
    return time.perf_counter() - t0


def run_category(root: Path, category: str, base: Path, out: Path, plus_args: list[str], control: bool,
                 reuse: bool) -> dict:
    from adtr import checkpoint as ckpt_io
    from adtr.cli import main as adtr

    if not (base / "model.pt").is_file():
        print(f"fitting the starting ADTR run {base}", flush=True)
        if adtr(["fit", str(root / category), "--out", str(base)]) != 0:
            raise SystemExit(f"fit of {base} failed")
    plus_run = out / f"plus_{category}"
    seconds = fit_plus(root, category, base, plus_run, plus_args, reuse)
    saved = ckpt_io.load_checkpoint(plus_run / "model.pt")
    pool = sum(r.get("pool_seconds", 0.0) for r in saved["history"])
    row = {"category": category, "adtr": test_metrics(base, root, category),
           "adtr_plus": test_metrics(plus_run, root, category),
           "plus_fit_seconds": round(seconds if seconds is not None else saved["fit_seconds"], 1),
           "plus_pool_seconds": round(pool, 1), "plus_epochs": len(saved["history"]),
           "plus_config": saved["config"]["plus"], "plus_train": saved["config"]["train"], "commit": git_commit()}
    if control:  # the same fine-tuning without anomalies: what the pull term alone does
        control_run = out / f"control_{category}"
        fit_plus(root, category, base, control_run, [*plus_args, "--anomaly-prob", "0"], reuse)
        row["control"] = test_metrics(control_run, root, category)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| category | model | image AUROC | pixel AUROC | AUPRO | pixel AUROC vs ADTR |",
             "|---|---|---|---|---|---|"]
    names = (("ADTR (starting run)", "adtr"), ("ADTR+ (pixel, confetti)", "adtr_plus"),
             ("control: same fine-tuning, no anomalies (pull term only)", "control"))
    for r in rows:
        for name, key in names:
            m = r.get(key)
            if m is None:
                continue
            delta = m["pixel_auroc"] - r["adtr"]["pixel_auroc"]
            lines.append(f"| {r['category']} | {name} | {m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | "
                         f"{m['aupro']:.4f} | {delta:+.4f} |")
    cost = "; ".join(f"{r['category']}: {r['plus_fit_seconds']:.0f} s for {r['plus_epochs']} epochs, of which "
                     f"{r['plus_pool_seconds']:.0f} s drawing and caching confetti" for r in rows)
    p = rows[0]["plus_config"] if rows else {}
    t = rows[0]["plus_train"] if rows else {}
    return ("# ADTR vs ADTR+ (pixel-level, synthetic confetti) from the same starting run\n\n"
            f"Commit `{short_commit(rows[0]['commit']) if rows else ''}`. ADTR+ settings: {t.get('epochs')} epochs, lr "
            f"{t.get('lr')} x0.1 after {t.get('step_at', 0):.2f} of training, batch {t.get('batch_size')}, alpha "
            f"{p.get('alpha')}, anomaly probability {p.get('anomaly_prob')}, {p.get('variants')} cached confetti "
            f"variants per image redrawn every {p.get('refresh_every')} epochs, final epoch kept.\n\n"
            + "\n".join(lines) + f"\n\nADTR+ cost: {cost}.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="MVTec AD root folder")
    parser.add_argument("--categories", nargs="+", default=["bottle", "grid"])
    parser.add_argument("--base-runs", type=Path, required=True, help="folder of (or for) the base_<category> runs")
    parser.add_argument("--work", type=Path, help="where ADTR+ runs go (default: --base-runs)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--control", action="store_true",
                        help="also fine-tune with --anomaly-prob 0 (the pull term alone) as a control")
    parser.add_argument("--reuse", action="store_true", help="evaluate finished ADTR+ runs instead of refitting")
    args, plus_args = parser.parse_known_args()
    work = args.work or args.base_runs
    json_path = args.out / "plus.json"
    rows = json.loads(json_path.read_text()) if json_path.exists() else []
    for category in args.categories:
        print(f"== {category}", flush=True)
        row = run_category(args.root, category, args.base_runs / f"base_{category}", work, plus_args,
                           args.control, args.reuse)
        rows = [r for r in rows if r["category"] != category] + [row]
        write_results(args.out, "plus", rows, markdown(rows), echo=False)
        print(markdown([row]), flush=True)


if __name__ == "__main__":
    main()
