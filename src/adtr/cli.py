"""Command line: ``adtr fit | test | report | predict | export | tsne | serve | demo``.

Parse, build config, call the engine.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import shlex
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adtr import __version__
from adtr.checkpoint import atomic_write_bytes
from adtr.config import (CROSS_INITS, ENGINES, INFERENCE_PRECISIONS, OPTIMIZERS, POS_INITS, RECONSTRUCTORS,
                          SCHEDULES, THRESHOLD_RULES, RunConfig, resume_ignores, with_overrides)
from adtr.errors import AdtrError

log = logging.getLogger("adtr")


def resolve_defect_samples(data: Path, masks: Path | None):
    """Defective images for ADTR+: the defect folders of a MVTec category's test split or a test-layout folder."""
    from adtr.data import resolve_test_samples

    samples = [s for s in resolve_test_samples(Path(data), masks) if s.label == 1]
    if not samples:
        raise AdtrError(f"{data}: no defective images found (expected defect-type folders beside good/)")
    return samples


def resolve_outlier_samples(data: Path):
    """Outlier images for image-level ADTR+: images in ``data`` and in its immediate subfolders."""
    from adtr.data import Sample, list_images
    from adtr.data.images import require_dir

    data = require_dir(data, "outlier folder")
    paths = list_images(data, allow_empty=True)
    for sub in sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")):
        paths += list_images(sub, allow_empty=True)
    if not paths:
        raise AdtrError(f"{data}: no outlier images found in it or its subfolders")
    return [Sample(image=p, label=1, defect_type="outlier", mask=None) for p in paths]


def json_safe(obj: Any) -> Any:
    """``obj`` with inf and NaN floats as None: JSON has no such numbers (an uncalibrated
    threshold is inf), and strict parsers refuse Python's ``Infinity``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj, path: Path) -> None:
    atomic_write_bytes((json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode(), path)


MODEL_OPTIONS = ("backbone", "weights", "image_size", "grid_stride", "stages", "dropout", "error_space",
                 "reconstructor", "target", "neighbour_mask", "jitter", "pos_init",
                 "cross_init", "cells_per_token")

def plus_base_config(args: argparse.Namespace) -> RunConfig:
    """ADTR+ starts from the init run's config; the model options are the init run's own."""
    from adtr import checkpoint as ckpt_io
    from adtr.config import from_dict, plus_config

    given = [f"--{name.replace('_', '-')}" for name in MODEL_OPTIONS if getattr(args, name) is not None]
    if given:
        raise AdtrError(f"{', '.join(given)}: with --plus the model is the --init run's; drop these options")
    if args.init is None:
        raise AdtrError("--plus fine-tunes a trained ADTR run: give it with --init RUN")
    path = ckpt_io.find_run_file(Path(args.init))
    init = from_dict(ckpt_io.load_checkpoint(path)["config"])
    if init.plus.loss != "none":
        raise AdtrError(f"{path}: is already an ADTR+ run; start ADTR+ from a plain ADTR run")
    return plus_config(init)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    plus = getattr(args, "plus", None)
    cfg = plus_base_config(args) if plus else RunConfig()
    if not plus:
        cfg = with_overrides(cfg, "model", backbone=args.backbone, weights=args.weights, image_size=args.image_size,
                             grid_stride=args.grid_stride, stages=tuple(args.stages) if args.stages else None,
                             dropout=args.dropout, error_space=args.error_space,
                             reconstructor=args.reconstructor, target=args.target,
                             neighbour_mask=args.neighbour_mask, jitter=args.jitter, pos_init=args.pos_init,
                             cross_init=args.cross_init, cells_per_token=args.cells_per_token)
    cfg = with_overrides(cfg, "train", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, optimizer=args.optimizer, muon_rms=args.muon_rms,
                         schedule=args.schedule,
                         step_at=args.step_at,
                         warmup_fraction=args.warmup_fraction,
                         grad_clip=args.grad_clip, val_fraction=args.val_fraction, seed=args.seed,
                         precision=args.precision, max_minutes=args.max_minutes, feature_cache=args.feature_cache,
                         select=args.select, patience=args.patience,
                         checkpoint_seconds=args.checkpoint_every, compile=args.compile or None)
    cfg = with_overrides(cfg, "score", sigma=args.sigma, pool_size=args.pool_size, target_fpr=args.target_fpr,
                         threshold_rule=args.threshold_rule)
    if plus:
        source, data, masks = "confetti", None, None
        if args.defects and args.outliers:
            raise AdtrError("give --defects or --outliers, not both")
        if args.defect_masks and not args.defects:
            raise AdtrError("--defect-masks goes with --defects")
        if args.defects:
            source, data = "defects", str(Path(args.defects).resolve())
            masks = str(Path(args.defect_masks).resolve()) if args.defect_masks else None
        elif args.outliers:
            source, data = "outliers", str(Path(args.outliers).resolve())
        cfg = with_overrides(cfg, "plus", loss=plus, init=str(Path(args.init).resolve()), source=source, data=data, masks=masks,
                             alpha=args.alpha, topk=args.topk, anomaly_prob=args.anomaly_prob,
                             variants=args.variants, refresh_every=args.refresh_every)
    elif any(getattr(args, n, None) is not None for n in ("init", "defects", "defect_masks", "outliers")):
        raise AdtrError("--init, --defects, --defect-masks and --outliers belong to ADTR+: add --plus pixel or "
                        "--plus image")
    return cfg


def load_anomalies(config: RunConfig):
    """The known anomalies of an ADTR+ run (none for confetti, which is drawn from the training images)."""
    from adtr.data import validate_readable

    plus = config.plus
    if plus.loss == "none" or plus.source == "confetti":
        return None
    if plus.source == "defects":
        anomalies = resolve_defect_samples(Path(plus.data), Path(plus.masks) if plus.masks else None)
    else:
        anomalies = resolve_outlier_samples(Path(plus.data))
    validate_readable(anomalies)
    return anomalies


def options_a_resume_ignores(args: argparse.Namespace, saved: RunConfig) -> list[str]:
    """The options given with ``--resume`` that ask for another value than the run has, as
    ``section.field VALUE (run: VALUE)``: resuming keeps the run's own config."""
    try:
        asked = config_from_args(args)
    except AdtrError:  # an impossible value: nothing it could have changed
        return []
    return resume_ignores(asked, saved, ("model", "train", "score"), only_non_default=True)


def cmd_fit(args: argparse.Namespace) -> int:
    from adtr import checkpoint as ckpt_io
    from adtr.data import resolve_training_samples, validate_readable
    from adtr.engine import fit

    if args.data is None:
        raise AdtrError("fit needs the training data folder (also with --resume: the same folder as before)")
    last = Path(args.out) / ckpt_io.LAST_FILE
    saved = ckpt_io.load_checkpoint(last) if args.resume and last.is_file() else None
    if saved is not None:
        ckpt_io.check_compatible(saved, last, args.backbone, args.image_size, args.grid_stride)
    if saved is not None:
        from adtr.config import from_dict

        config = from_dict(saved["config"])  # a resumed run keeps its own config
        ignored = options_a_resume_ignores(args, config)
        if ignored:
            log.warning("warning: --resume continues the run with its own settings; ignored: %s "
                        "(to change them, start a new run in another folder)", ", ".join(ignored))
    else:
        config = config_from_args(args)  # bad option values fail here, before the images are read
    samples = resolve_training_samples(args.data)
    validate_readable(samples)
    anomalies = load_anomalies(config)
    result = fit(config, samples, Path(args.out), resume=args.resume, anomalies=anomalies)
    threshold = f"image threshold {result.threshold:.4f}" if math.isfinite(result.threshold) else \
        "no image threshold (nothing held out; set one with `adtr calibrate`)"
    print(f"fitted {result.epochs} {plural(result.epochs, 'epoch')} in {result.seconds:.0f} s; {threshold}")
    print_expected_fpr(result.calibration)
    print(f"run saved to {Path(args.out) / 'model.pt'}")
    return 0


def fit_interrupted_message(args: argparse.Namespace, argv: list[str]) -> str:
    """One line for Ctrl-C during ``fit``: what is saved and the exact command that goes on.

    The command is the one given plus ``--resume``: a resumed run keeps its saved config,
    and one interrupted before its first checkpoint starts afresh with these options.
    """
    from adtr import checkpoint as ckpt_io

    out = Path(args.out)
    resume = "adtr " + shlex.join(argv if args.resume else [*argv, "--resume"])
    last = out / ckpt_io.LAST_FILE
    with contextlib.suppress(AdtrError):  # written atomically, so loadable; still, never fail here
        if last.is_file():
            ckpt = ckpt_io.load_checkpoint(last)
            return f"interrupted: {ckpt['epoch']} of {ckpt['epochs']} epochs saved in {last}; continue with: {resume}"
    if (out / ckpt_io.MODEL_FILE).is_file():
        return f"interrupted after the run was saved to {out / ckpt_io.MODEL_FILE}"
    if out.is_dir():
        return f"interrupted before the first checkpoint (no epoch saved); continue with: {resume}"
    return f"interrupted before anything was saved; start again with: adtr {shlex.join(argv)}"


def evaluate_run(args: argparse.Namespace):
    """Load ``args.run`` and evaluate it on ``args.data`` (+ ``args.masks``): detector, samples, result."""
    from adtr.data import resolve_test_samples, validate_readable
    from adtr.detector import Detector
    from adtr.evaluate import evaluate

    if getattr(args, "top_k", 0) < 0:
        raise AdtrError(f"--top-k {args.top_k}: the gallery size must be >= 0")
    det = Detector.load(args.run, precision=args.precision, engine=args.engine)
    samples = resolve_test_samples(Path(args.data), Path(args.masks) if args.masks else None)
    validate_readable(samples)
    warn_if_trained_on(det.config.plus, Path(args.data))
    return det, samples, evaluate(det, samples)


def warn_if_trained_on(plus, data: Path) -> None:
    """Warn when an ADTR+ run learnt from images in ``data``: its metrics there are not held out."""
    if plus.loss == "none" or plus.source == "confetti" or not plus.data:
        return
    seen, scored = Path(plus.data).resolve(), data.resolve()
    if seen == scored or seen in scored.parents or scored in seen.parents:
        log.warning("warning: this ADTR+ run trained on the %s in %s; metrics on %s include images it has seen, "
                    "so they are not held-out figures", plus.source, plus.data, data)


def write_html_report(args: argparse.Namespace, det, samples, res, path: Path) -> None:
    from adtr.report import RunInfo, write_report

    write_report(res, RunInfo.from_detector(det, args.run, args.data, args.masks), samples, path, top_k=args.top_k)


def cmd_report(args: argparse.Namespace) -> int:
    det, samples, res = evaluate_run(args)
    out = Path(args.out) if args.out else Path(args.run) / "test" / "report.html"
    write_html_report(args, det, samples, res, out)
    print(f"report written to {out}")
    return 0


def print_expected_fpr(calibration: dict) -> None:
    from adtr.calibrate import describe_expected_fpr

    line = describe_expected_fpr(calibration)
    if line is not None:
        print(f"  {line}")


def cmd_test(args: argparse.Namespace) -> int:
    det, samples, res = evaluate_run(args)
    out = Path(args.out) if args.out else Path(args.run) / "test"
    with staged_outputs(out) as stage:  # metrics.json and report.html land together or not at all
        rate = det.expected_fpr  # what held-out calibration expects of the FPR measured here
        write_json({"metrics": res.metrics, "per_type": res.per_type, "threshold": det.threshold,
                    "expected_fpr": None if rate is None else dataclasses.asdict(rate)},
                   stage / "metrics.json")
        if not args.no_report:
            write_html_report(args, det, samples, res, stage / "report.html")
    fmt = lambda v: "absent" if v is None else f"{v:.4f}"  # noqa: E731
    m = res.metrics
    print(f"image AUROC {fmt(m['image_auroc'])}  pixel AUROC {fmt(m['pixel_auroc'])}  AUPRO {fmt(m['aupro'])}  "
          f"F1-max {fmt(m['image_f1_max'])}")
    print(f"at threshold {det.threshold:.4f}: FPR {fmt(m['fpr_at_threshold'])}  FNR {fmt(m['fnr_at_threshold'])}")
    print_expected_fpr(det.calibration)
    for t, pm in res.per_type.items():
        print(f"  {t:<24} image AUROC {fmt(pm['image_auroc'])}  pixel AUROC {fmt(pm['pixel_auroc'])}  "
              f"AUPRO {fmt(pm['aupro'])}  FNR {fmt(pm['fnr_at_threshold'])}")
    unmasked = sorted({s.defect_type for s in samples if s.label == 1 and s.mask is None})
    if m["pixel_auroc"] is None and unmasked:
        print(f"pixel metrics need a mask for every defect image; none for: {', '.join(unmasked)}"
              + ("" if args.masks else " (give --masks DIR)"))
    print(f"metrics written to {out / 'metrics.json'}")
    if not args.no_report:
        print(f"report written to {out / 'report.html'}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from adtr.calibrate import calibrate
    from adtr.data import resolve_test_samples, validate_readable

    samples, good = None, None
    if args.data:
        samples = resolve_test_samples(Path(args.data), Path(args.masks) if args.masks else None)
        validate_readable(samples)
    elif args.masks:
        raise AdtrError("--masks needs --data")
    if args.confetti:
        from adtr.data import list_images, verify_image

        good = list_images(Path(args.confetti))
        for p in good:
            verify_image(p)
    # A rule change alone switches to the target-FPR thresholds it recomputes; otherwise F1, as before.
    mode = args.mode or ("fpr" if args.threshold_rule and not (args.data or args.confetti) else "f1")
    cal = calibrate(Path(args.run), mode, samples, good, args.threshold_rule)
    fmt = lambda k: f"{cal[k]:.4f}" if k in cal else "-"  # noqa: E731
    print(f"mode {cal['mode']}: image threshold {cal['threshold']:.4f}, pixel threshold {cal['pixel_threshold']:.4f}")
    print(f"  target-FPR thresholds ({cal.get('threshold_rule', 'quantile')} rule): "
          f"image {fmt('threshold_fpr')}, pixel {fmt('pixel_threshold_fpr')}")
    print_expected_fpr(cal)
    print(f"  F1-optimal thresholds: image {fmt('threshold_f1')} (F1 {fmt('f1_image')}), "
          f"pixel {fmt('pixel_threshold_f1')} (F1 {fmt('f1_pixel')})")
    onnx = Path(args.run) / "model.onnx"
    if onnx.is_file():  # adtr predict --engine onnx reads the new threshold from the run; a bare onnxruntime does not
        print(f"note: {onnx} still carries the old threshold in its metadata; run `adtr export {args.run}` again "
              "for deployments that read it")
    return 0


@contextlib.contextmanager
def staged_outputs(out: Path, replaces: tuple[str, ...] = ()) -> Iterator[Path]:
    """Write a command's files into a hidden folder inside ``out`` and move them into place
    only when the command succeeds: a failure half-way leaves ``out`` as it was (and
    removes it if this command created it). The folders named in ``replaces`` are the
    command's own: an earlier run's are removed first, so none of its files stay among the new."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".adtr-partial-", dir=out))
    try:
        yield stage
        for name in replaces:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        for src in sorted(stage.rglob("*")):
            if src.is_file():
                dst = out / src.relative_to(stage)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    from adtr.data import expand_inputs, verify_image
    from adtr.detector import Detector, Unreadable
    from adtr.postprocess import normalize_scores
    from adtr.progress import batches
    from adtr.visualize import overlay_panel, save_png, tensor_to_uint8

    det = Detector.load(args.run, precision=args.precision, engine=args.engine)
    paths = expand_inputs(args.inputs)
    unreadable: dict[Path, str] = {}  # with --skip-unreadable: file -> why; without, the first ends the command
    for p in paths:  # headers first, so that a bad file stops the command before any scoring
        try:
            verify_image(p)
        except AdtrError as exc:
            if not args.skip_unreadable:
                raise
            unreadable[p] = str(exc)
    out = Path(args.out)
    thr = det.threshold if args.threshold is None else args.threshold
    vmax = 2 * thr if np.isfinite(thr) and thr > 0 else None  # one colour scale for every overlay
    rows: list[dict[str, Any]] = [{} for _ in paths]  # in input order, filled batch by batch
    # An image that fails to decode half-way leaves nothing behind; a success replaces the
    # overlays of an earlier predict into ``out`` (the rows name the ones they go with).
    with staged_outputs(out, replaces=("overlays",)) as stage:
        for i in batches(range(0, len(paths), args.batch_size), "predict", leave=True):
            readable = [k for k in range(i, min(i + args.batch_size, len(paths))) if paths[k] not in unreadable]
            scored = det.score_chunk([(str(paths[k]), paths[k]) for k in readable],
                                     on_error="skip" if args.skip_unreadable else "raise")
            for k, result in zip(readable, scored, strict=True):
                if isinstance(result, Unreadable):
                    unreadable[paths[k]] = result.error
                    continue
                score, amap = result.score, result.anomaly_map.numpy()
                overlay = "" if args.no_overlays else f"overlays/{k:05d}_{paths[k].stem}.png"
                rows[k] = {"image": str(paths[k]), "score": score, "normalized_score": normalize_scores(score, thr),
                           "threshold": thr, "label": "anomalous" if score > thr else "good", "overlay": overlay}
                if overlay:
                    panel = overlay_panel(tensor_to_uint8(result.image), amap, 0.0, vmax or float(amap.max()))
                    save_png(panel, stage / overlay)
        for k, p in enumerate(paths):
            if p in unreadable:
                rows[k] = {"image": str(p), "score": None, "normalized_score": None, "threshold": thr,
                           "label": "unreadable", "overlay": ""}
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["image", "score", "normalized_score", "threshold", "label", "overlay"])
        writer.writeheader()
        writer.writerows(rows)
        # surrogateescape: a file name that is not UTF-8 goes back out as the bytes it came in as
        atomic_write_bytes(buf.getvalue().encode("utf-8", "surrogateescape"), stage / "results.csv")
        write_json(rows, stage / "results.json")
    n_bad = sum(r["label"] == "anomalous" for r in rows)
    n_good = sum(r["label"] == "good" for r in rows)
    skipped = f", {len(unreadable)} unreadable (skipped)" if unreadable else ""
    print(f"{len(rows)} {plural(len(rows), 'image')}: {n_bad} anomalous, {n_good} good{skipped} "
          f"(threshold {thr:.4f})")
    for why in unreadable.values():  # each names its file
        log.warning("skipped %s", why)
    print(f"results written to {out / 'results.csv'}")
    return 0


def plural(n: int, word: str) -> str:
    return word if n == 1 else f"{word}s"


def cmd_export(args: argparse.Namespace) -> int:
    from adtr.export import DEFAULT_OPSET, export_onnx

    opset = DEFAULT_OPSET if args.opset is None else args.opset
    path = export_onnx(args.run, args.out, opset=opset)
    print(f"exported {args.run} to {path} ({path.stat().st_size / 2**20:.1f} MB, ONNX opset {opset}): "
          "images (B, 3, S, S) in [0, 1] -> anomaly_map (B, 1, S, S), score (B,)")
    if args.out is None:
        print(f"score with it: `adtr predict {args.run} IMAGES --engine onnx`, or with onnxruntime alone")
    return 0


def cmd_tsne(args: argparse.Namespace) -> int:
    from adtr.data import resolve_test_samples, validate_readable
    from adtr.tsne import tsne_figure

    samples = resolve_test_samples(Path(args.data), Path(args.masks) if args.masks else None)
    validate_readable(samples)
    vectors = tsne_figure(args.run, samples, Path(args.out), n=args.n, seed=args.seed)
    print(f"t-SNE of {len(vectors)} difference vectors ({int(vectors.anomalous.sum())} anomalous) "
          f"written to {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from adtr.serve import serve

    serve(args.run, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, threshold=args.threshold,
          precision=args.precision, engine=args.engine)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from adtr.demo import run_demo

    run_demo(Path(args.out), minutes=args.minutes, seed=args.seed)
    return 0


def add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=[*INFERENCE_PRECISIONS, "auto"], default="fp32",
                   help="fp32 (default: the reference the threshold was calibrated with), bf16 autocast "
                        "(faster on AMX/AVX512-BF16 CPUs and GPUs; scores within 2%% of fp32, the parity test's "
                        "bound, typically a few tenths of 1%%) or int8 "
                        "(--engine compile on x86 CPUs: the transformer's linear layers in int8; maps within "
                        "about 1e-3 of fp32)")
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="torch (default); onnx: onnxruntime with RUN/model.onnx from `adtr export` (fp32); "
                        "compile: torch.compile, fastest after about 30 s of compilation per batch size")


def add_fit_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--backbone", help="timm model name (default tf_efficientnet_lite0)")
    g.add_argument("--weights", help="packaged (default, offline) | hub | none | path to a state-dict file")
    g.add_argument("--image-size", type=int, help="input side in pixels (default 256)")
    g.add_argument("--grid-stride", type=int, help="feature grid stride (default 16)")
    g.add_argument("--stages", type=int, nargs="+",
                   help="backbone stages to use (default 1 2 3, strides 4-16; the paper's: 0 1 2 3 4)")
    g.add_argument("--dropout", type=float, help="transformer dropout (default 0)")
    g.add_argument("--error-space", choices=["features", "standardized"], help="where the error is measured")
    g.add_argument("--reconstructor", choices=RECONSTRUCTORS,
                   help="Table 4 ablations: the transformer (default), without attention (concatenation + "
                        "projection), without the auxiliary query (decoder fed the encoder output), or a "
                        "ResNet-style CNN of similar size")
    g.add_argument("--target", choices=["features", "pixels"],
                   help="reconstruct backbone features (default) or raw stride x stride pixel patches (ablation)")
    g.add_argument("--neighbour-mask", type=int, metavar="K",
                   help="hide each token's K x K neighbourhood (odd K) in every attention, as UniAD does (default 0: off)")
    g.add_argument("--jitter", type=float,
                   help="UniAD feature jitter: training noise of std JITTER x ||token|| / 256 on the tokens "
                        "(default 20, UniAD's; 0: off, the paper's)")
    g.add_argument("--pos-init", choices=POS_INITS,
                   help="initial value of the learned position embedding: normal (default: N(0, 1), nearly "
                        "orthogonal codes: off the initial plateau sooner, then faster to converge), uniform "
                        "(DETR's), sincos, or fourier (random Fourier features of the cell: nearly orthogonal, "
                        "neighbours alike)")
    g.add_argument("--cross-init", choices=CROSS_INITS,
                   help="decoder cross-attention keys at init: independent (default, DETR's), aligned "
                        "(key projection = query projection, so each query starts reading its own cell) or "
                        "aligned-last (the same in the last decoder layer only)")
    g.add_argument("--cells-per-token", type=int, metavar="P",
                   help="one token embeds P x P cells of the feature grid (default 1, as the paper); "
                        "with --grid-stride 8, P=2 keeps 16 x 16 tokens and an 8 px map")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="epochs (default 60; paper: 500)")
    g.add_argument("--max-minutes", type=float, help="wall-clock budget; epochs are fitted to it (default none)")
    g.add_argument("--batch-size", type=int, help="default 8 (paper: 16)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 5e-4; paper: 1e-4 with --schedule step)")
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay (default 1e-4)")
    g.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="muon (default): Muon on the transformer's weight matrices, AdamW on the rest, one "
                        "learning rate | adamw: the paper's")
    g.add_argument("--muon-rms", type=float,
                   help="RMS of a Muon update per unit of learning rate (default 0.8, four times AdamW's "
                        "0.2, so Muon's matrices move further in a short budget)")
    g.add_argument("--schedule", choices=SCHEDULES,
                   help="learning-rate schedule: warmup-stable-decay (default: the full rate until --step-at, then a "
                        "linear decay), warmup-cosine or step (the paper's)")
    g.add_argument("--step-at", type=float,
                   help="fraction of training after which --schedule step divides lr by 10, or "
                        "warmup-stable-decay starts its decay (default 0.8)")
    g.add_argument("--warmup-fraction", type=float,
                   help="share of the steps over which --schedule warmup-cosine or warmup-stable-decay raises lr "
                        "linearly from 0 (default 0.05)")
    g.add_argument("--grad-clip", type=float, help="max gradient norm (default off)")
    g.add_argument("--val-fraction", type=float, help="good images held out for calibration (default 0.1)")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="transformer precision in training (default auto: bf16 on AMX/AVX512-BF16 CPUs and GPUs)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training step after a one-off compilation (default off: 19%% "
                        "slower on a 2-core AVX2 CPU; meant for GPUs, where kernel launches bound a step). "
                        "Without a C++ compiler (CPU) or Triton (GPU) it warns and trains eagerly")
    g.add_argument("--select", choices=["best-val", "last"],
                   help="keep the epoch with the lowest held-out loss (default) or the last one")
    g.add_argument("--patience", type=int, help="stop after N epochs without validation improvement (default 0: off)")
    g.add_argument("--feature-cache", choices=["auto", "memory", "disk"], help="where cached features live")
    g.add_argument("--checkpoint-every", type=float, metavar="SECONDS",
                   help="write the resumable last.pt after the first epoch that ends this long after the previous "
                        "write (default 30; 0: after every epoch)")
    g = p.add_argument_group("ADTR+ (anomalies known; section 3.3)",
                             "fine-tune a trained ADTR run with the push-pull loss; training defaults become "
                             "20 epochs, lr 1e-4 x0.1 for the last third (--schedule step --step-at 0.667), "
                             "final epoch; the model options are the --init run's")
    g.add_argument("--plus", choices=["pixel", "image"],
                   help="pixel: Eq. 7 with pixel labels (confetti or --defects with masks); "
                        "image: Eq. 9 with image labels (confetti, --defects or --outliers)")
    g.add_argument("--init", help="run folder of the trained ADTR model to start from")
    g.add_argument("--defects", help="real defective images: a MVTec category folder (its test defects) or a "
                                     "test-layout folder (good/ + one folder per defect type)")
    g.add_argument("--defect-masks", help="mask folder for a test-layout --defects folder")
    g.add_argument("--outliers", help="folder of images unrelated to the normal class (image-level labels)")
    g.add_argument("--alpha", type=float, help="weight of the push term (default 0.003)")
    g.add_argument("--topk", type=int, help="k of the image-level score q (default 20)")
    g.add_argument("--anomaly-prob", type=float, help="chance to replace a sample by an anomaly (default 0.5; 0 = no anomalies, a "
                        "control that fine-tunes with the pull term alone)")
    g.add_argument("--variants", type=int, help="confetti variants cached per training image (default 4)")
    g.add_argument("--refresh-every", type=int, help="epochs between confetti redraws (default 10; 0 = never)")
    g = p.add_argument_group("scoring")
    g.add_argument("--sigma", type=float, help="Gaussian smoothing of maps in pixels (default 0 = off)")
    g.add_argument("--pool-size", type=int, help="average-pool window in pixels for the image score (default 32)")
    g.add_argument("--target-fpr", type=float, help="false-positive rate on held-out good images (default 0.01)")
    g.add_argument("--threshold-rule", choices=THRESHOLD_RULES,
                   help="image threshold from the held-out scores: quantile (default; exceeds the target by about "
                        "1/(n+1) with n held out) or conformal (keeps the target on average once n >= 1/target - 1)")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (a batch size, a count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adtr", description="ADTR anomaly detection: fit on good images, "
                                     "test, predict.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"adtr {__version__}")
    # -v also after the command (adtr fit ... -v); SUPPRESS keeps a -v given before it.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[verbose], **kwargs)

    p = command("fit", help="train on good images")
    p.add_argument("data", nargs="?", type=Path,
                   help="MVTec category folder (with train/good) or a folder of good images")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fit in --out")
    add_fit_options(p)
    p.set_defaults(func=cmd_fit)
    p = command("calibrate", help="switch a run's thresholds: target-FPR (default) or F1-optimal on labelled data")
    p.add_argument("run", help="run folder")
    p.add_argument("--mode", choices=["fpr", "f1"],
                   help="f1: F1-optimal thresholds on --data (default); fpr: back to the target-FPR ones from fit "
                        "(default when only --threshold-rule is given)")
    p.add_argument("--threshold-rule", choices=THRESHOLD_RULES,
                   help="recompute the target-FPR image threshold from the held-out scores fit kept, under this rule")
    p.add_argument("--data", help="labelled images (good/ and defect folders, or a MVTec category's test split); "
                                  "never the test set you report on")
    p.add_argument("--masks", help="mask folder mirroring the defect folders (for the pixel threshold)")
    p.add_argument("--confetti", metavar="GOOD_DIR",
                   help="no real defects: F1 on these good images and a confetti-corrupted copy of each (a proxy)")
    p.set_defaults(func=cmd_calibrate)
    p = command("test", help="metrics on labelled test images")
    p.add_argument("run", help="run folder")
    p.add_argument("--data", required=True, help="MVTec category folder, or a test folder with good/ and defect folders")
    p.add_argument("--masks", help="mask folder mirroring the defect folders (plain layout)")
    p.add_argument("--out", help="where to write metrics.json and report.html (default RUN/test)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--top-k", type=int, default=8,
                   help="report gallery: worst false positives and negatives (default 8)")
    add_inference_options(p)  # measure the engine and precision that will be deployed
    p.set_defaults(func=cmd_test)
    p = command("report", help="metrics, curves and worst cases of a run as one self-contained HTML file")
    p.add_argument("run", help="run folder")
    p.add_argument("--data", required=True, help="MVTec category folder, or a test folder with good/ and defect folders")
    p.add_argument("--masks", help="mask folder mirroring the defect folders (plain layout)")
    p.add_argument("--out", help="HTML file to write (default RUN/test/report.html)")
    p.add_argument("--top-k", type=int, default=8, help="gallery: worst false positives and negatives (default 8)")
    add_inference_options(p)
    p.set_defaults(func=cmd_report)
    p = command("predict", help="score new images, write CSV/JSON and overlays")
    p.add_argument("run", help="run folder")
    p.add_argument("inputs", nargs="+", help="images, folders or glob patterns")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions)")
    p.add_argument("--threshold", type=float, help="score threshold (default: the run's calibrated one)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--no-overlays", action="store_true", help="skip heat-map PNGs")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="score the readable images and list the others as 'unreadable' (default: stop at the "
                        "first, writing nothing)")
    add_inference_options(p)
    p.set_defaults(func=cmd_predict)
    p = command("export", help="write the run as one ONNX graph: image -> (anomaly map, score)")
    p.add_argument("run", help="run folder")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default onnx)")
    p.add_argument("--out", help="file to write (default RUN/model.onnx)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 20; 18 or newer)")
    p.set_defaults(func=cmd_export)
    p = command("tsne", help="t-SNE of feature-difference vectors, normal vs anomalous pixels (Fig. 5)")
    p.add_argument("run", help="run folder")
    p.add_argument("--data", required=True, help="MVTec category folder, or a test folder with masks")
    p.add_argument("--masks", help="mask folder mirroring the defect folders (plain layout)")
    p.add_argument("--out", default="tsne.png", help="PNG to write (default ./tsne.png)")
    p.add_argument("--n", type=positive_int, default=600,
                   help="difference vectors to embed, half anomalous (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tsne)
    p = command("serve", help="HTTP API and web page: POST an image, get its score, decision and overlay")
    p.add_argument("run", help="run folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it, unauthenticated)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload in MiB (default 20)")
    p.add_argument("--threshold", type=float, help="score threshold (default: the run's calibrated one)")
    add_inference_options(p)
    p.set_defaults(func=cmd_serve)
    p = command("demo", help="generate a dataset, fit, test and predict in a few minutes")
    p.add_argument("--out", default="demo_results", help="results folder")
    p.add_argument("--minutes", type=float, default=2.0, help="training budget in minutes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("adtr.progress").setLevel(logging.INFO)  # progress lines where there is no bar (a log)
    try:
        return args.func(args)
    except AdtrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # Free the interrupted frames first: their progress bars close and end their line,
        # so the message below is the last line, not glued to (or followed by) a bar.
        traceback.clear_frames(exc.__traceback__)
        message = fit_interrupted_message(args, argv) if args.command == "fit" else "interrupted"
        print(message, file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read the output left (`adtr test ... | head`): what was written stands, and the
        # interpreter's final flush of stdout must not fail again with a traceback.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (captured in-process)
            pass
        return 141  # 128 + SIGPIPE, as a shell reports a program killed by it


if __name__ == "__main__":
    sys.exit(main())
