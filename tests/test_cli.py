"""Every CLI verb on a tiny generated dataset, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from adtr import checkpoint as ckpt_io
from adtr.cli import main
from adtr.postprocess import expected_fpr

from conftest import TINY_FIT_ARGS, error_of


@pytest.fixture(scope="module")
def tiny_run(tiny_category, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["fit", str(tiny_category), "--out", str(run), *TINY_FIT_ARGS]) == 0
    return run


def assert_rows_are_the_models(run: Path, rows: list[dict], out: Path) -> None:
    """Each scored row holds the Python API's score for its own image, the label that score
    gets at the row's threshold, ``0.5 * score / threshold`` clipped to [0, 1], and the CSV
    says what the JSON says."""
    import csv

    from adtr.detector import Detector

    scored = [r for r in rows if r["label"] != "unreadable"]
    reference = Detector.load(run, device="cpu").predict([Path(r["image"]) for r in scored])
    for row, ref in zip(scored, reference, strict=True):
        assert row["score"] == pytest.approx(ref.score, rel=1e-5), row["image"]
        assert row["label"] == ("anomalous" if row["score"] > row["threshold"] else "good")
        assert row["normalized_score"] == pytest.approx(min(max(0.5 * row["score"] / row["threshold"], 0), 1))
    with open(out / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(t["image"], t["label"], t["overlay"]) for t in table] == [(r["image"], r["label"], r["overlay"])
                                                                       for r in rows]
    assert [float(t["score"]) if t["score"] else None for t in table] == pytest.approx([r["score"] for r in rows])


def test_fit_test_predict(tiny_run, tiny_category, tmp_path, capsys):
    assert (tiny_run / "model.pt").is_file()
    assert main(["test", str(tiny_run), "--data", str(tiny_category), "--out", str(tmp_path / "t")]) == 0
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "fpr_at_threshold"):
        assert 0.0 <= metrics["metrics"][key] <= 1.0
    assert set(metrics["per_type"]) == {"crack", "hole", "scratch", "spot"}
    # The FPR measured on the test set sits beside what the held-out calibration expects of it.
    cal = ckpt_io.load_checkpoint(tiny_run / "model.pt")["calibration"]
    expected = metrics["expected_fpr"]
    assert expected == dataclasses.asdict(expected_fpr(cal["val_images"], cal["target_fpr"]))
    assert f"from {cal['val_images']} held-out good images" in capsys.readouterr().out
    out = tmp_path / "p"
    assert main(["predict", str(tiny_run), str(tiny_category / "test" / "good"),
                 str(tiny_category / "test" / "hole" / "*.png"), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 6 and {r["label"] for r in rows} <= {"good", "anomalous"}
    assert_rows_are_the_models(tiny_run, rows, out)
    # At a threshold inside the score range both labels occur, and each follows its own score.
    median = sorted(r["score"] for r in rows)[2]
    assert main(["predict", str(tiny_run), str(tiny_category / "test" / "good"),
                 str(tiny_category / "test" / "hole" / "*.png"), "--out", str(out), "--threshold", str(median)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {r["label"] for r in rows} == {"good", "anomalous"} and {r["threshold"] for r in rows} == {median}
    assert_rows_are_the_models(tiny_run, rows, out)
    assert (out / "results.csv").read_text().splitlines()[0] == \
        "image,score,normalized_score,threshold,label,overlay"
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 6 and Image.open(overlays[0]).size == (64 * 3 + 8, 64)
    assert sorted(out / r["overlay"] for r in rows) == overlays  # each row names its overlay
    assert "6 images" in capsys.readouterr().out
    # Predicting again into the same folder replaces the earlier overlays, not adds to them.
    assert main(["predict", str(tiny_run), str(tiny_category / "test" / "hole"), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert sorted(out / r["overlay"] for r in rows) == sorted((out / "overlays").glob("*.png")) and len(rows) == 2
    assert main(["predict", str(tiny_run), str(tiny_category / "test" / "hole"), "--out", str(out),
                 "--no-overlays"]) == 0
    assert not (out / "overlays").exists()
    assert {r["overlay"] for r in json.loads((out / "results.json").read_text())} == {""}


def test_plain_folder_layout(tiny_category, tmp_path, capsys):
    good = tmp_path / "good_parts"
    shutil.copytree(tiny_category / "train" / "good", good)
    test = tmp_path / "new"
    shutil.copytree(tiny_category / "test", test)
    masks = tmp_path / "masks"
    shutil.copytree(tiny_category / "ground_truth", masks)
    run = tmp_path / "run"
    assert main(["fit", str(good), "--out", str(run), *TINY_FIT_ARGS, "--epochs", "1"]) == 0
    assert main(["test", str(run), "--data", str(test), "--masks", str(masks), "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["metrics"]["pixel_auroc"] is not None
    assert "pixel metrics need a mask" not in capsys.readouterr().out
    # Without masks the pixel metrics are absent, not zero, and the output says why.
    assert main(["test", str(run), "--data", str(test), "--out", str(tmp_path / "t2")]) == 0
    m = json.loads((tmp_path / "t2" / "metrics.json").read_text())["metrics"]
    assert m["pixel_auroc"] is None and m["aupro"] is None and m["image_auroc"] is not None
    assert "pixel metrics need a mask for every defect image; none for: crack, hole, scratch, spot (give --masks DIR)" \
        in capsys.readouterr().out


def test_bad_inputs_give_one_line_errors(tiny_run, tiny_category, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in error_of(capsys, ["fit", str(empty), "--out", str(tmp_path / "r1"), *TINY_FIT_ARGS])
    assert not (tmp_path / "r1").exists()

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("hello")
    assert "notes" in error_of(capsys, ["fit", str(notes), "--out", str(tmp_path / "r2"), *TINY_FIT_ARGS])

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_category / "train" / "good", corrupt)
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert "broken.png" in error_of(capsys, ["fit", str(corrupt), "--out", str(tmp_path / "r3"), *TINY_FIT_ARGS])
    assert not (tmp_path / "r3").exists()

    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    assert "fake.png" in error_of(capsys, ["predict", str(tiny_run), str(fake), "--out", str(tmp_path / "p")])
    assert not (tmp_path / "p").exists()

    orphan = tmp_path / "orphan"
    shutil.copytree(tiny_category, orphan / "cat")
    (orphan / "cat" / "ground_truth" / "hole" / "999_mask.png").write_bytes(
        (orphan / "cat" / "ground_truth" / "hole" / "000_mask.png").read_bytes())
    assert "999_mask.png" in error_of(capsys, ["test", str(tiny_run), "--data", str(orphan / "cat")])

    assert "no such file" in error_of(capsys, ["predict", str(tiny_run), str(tmp_path / "nope*.png")])


def test_a_zero_batch_size_or_grid_stride_is_refused_up_front(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tiny_run), str(tiny_run), "--batch-size", "0"])
    assert exit_info.value.code == 2 and "--batch-size: must be at least 1, got 0" in capsys.readouterr().err
    err = error_of(capsys, ["fit", str(tmp_path / "never-read"), "--out", str(tmp_path / "r"), "--grid-stride", "0"])
    assert err == "error: model.grid_stride (--grid-stride) must be at least 1, got 0"


def test_a_run_without_held_out_images_says_it_has_no_threshold_and_writes_strict_json(tiny_category, tmp_path,
                                                                                      capsys):
    """With --val-fraction 0 the threshold is inf: every image is good, fit says so, and the
    JSON files carry null (JSON has no inf) instead of Python's non-standard ``Infinity``."""
    run = tmp_path / "run"
    assert main(["fit", str(tiny_category / "train" / "good"), "--out", str(run), "--val-fraction", "0",
                 *TINY_FIT_ARGS]) == 0
    assert "no image threshold (nothing held out" in capsys.readouterr().out
    assert main(["test", str(run), "--data", str(tiny_category), "--no-report"]) == 0

    def strict(path):
        return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{path}: {name}"))

    assert strict(run / "test" / "metrics.json")["threshold"] is None
    assert main(["predict", str(run), str(tiny_category / "test" / "good"), "--out", str(tmp_path / "p"),
                 "--no-overlays"]) == 0
    rows = strict(tmp_path / "p" / "results.json")
    assert rows and all(r["threshold"] is None and r["label"] == "good" for r in rows)


def test_predict_can_skip_unreadable_images(tiny_run, tiny_category, tmp_path, capsys, caplog):
    """One truncated file among many: by default nothing is written (and the error names it);
    with --skip-unreadable the others are scored and it is listed, in input order."""
    import io

    folder = tmp_path / "in"
    shutil.copytree(tiny_category / "test" / "good", folder)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "JPEG")
    (folder / "001b_cut.jpg").write_bytes(buf.getvalue()[:300])  # a header, then nothing: decoding fails
    (folder / "001c_text.png").write_text("not an image")
    names = sorted(p.name for p in folder.iterdir())
    err = error_of(capsys, ["predict", str(tiny_run), str(folder), "--out", str(tmp_path / "p1")])
    assert "001b_cut.jpg" in err or "001c_text.png" in err
    assert not (tmp_path / "p1").exists()
    out = tmp_path / "p2"
    assert main(["predict", str(tiny_run), str(folder), "--out", str(out), "--skip-unreadable",
                 "--batch-size", "2"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [Path(r["image"]).name for r in rows] == names
    skipped = [r for r in rows if r["label"] == "unreadable"]
    assert [Path(r["image"]).name for r in skipped] == ["001b_cut.jpg", "001c_text.png"]
    assert all(r["score"] is None and r["overlay"] == "" for r in skipped)
    scored = [r for r in rows if r["label"] != "unreadable"]
    assert scored and all(isinstance(r["score"], float) and (out / r["overlay"]).is_file() for r in scored)
    assert_rows_are_the_models(tiny_run, rows, out)  # batches of 2 with gaps: each score still on its row
    printed = capsys.readouterr().out
    assert f"{len(rows)} images: " in printed and ", 2 unreadable (skipped)" in printed
    assert "001b_cut.jpg" in caplog.text and "001c_text.png" in caplog.text


def test_verbose_before_or_after_the_command():
    from adtr.cli import build_parser

    parse = build_parser().parse_args
    assert not parse(["predict", "run", "x.png"]).verbose
    assert parse(["-v", "predict", "run", "x.png"]).verbose and parse(["predict", "run", "x.png", "-v"]).verbose
    assert parse(["fit", "good", "--out", "r", "--verbose"]).verbose


def test_resume_names_the_options_it_ignores():
    """A resume keeps the run's config; options asking for something else are named, not
    silently dropped (options equal to the run's, or left at today's defaults, are not)."""
    from adtr.cli import build_parser, options_a_resume_ignores
    from adtr.config import RunConfig, with_overrides

    run = with_overrides(with_overrides(RunConfig(), "model", image_size=64), "train", epochs=3, optimizer="adamw")
    parse = build_parser().parse_args
    args = parse(["fit", "good", "--out", "r", "--resume", "--image-size", "64", "--epochs", "2", "--lr", "0.1"])
    assert options_a_resume_ignores(args, run) == ["train.epochs 2 (run: 3)", "train.lr 0.1 (run: 0.0005)"]
    assert options_a_resume_ignores(parse(["fit", "good", "--out", "r", "--resume"]), run) == []


def test_checkpoint_from_another_backbone(tiny_run, tmp_path, capsys):
    ckpt = ckpt_io.load_checkpoint(tiny_run / "model.pt")
    ckpt["config"]["model"]["backbone"] = "resnet18"
    other = tmp_path / "other"
    ckpt_io.atomic_save(ckpt, other / "model.pt")
    err = error_of(capsys, ["predict", str(other), str(tiny_run)])
    assert "model.pt" in err and "resnet18" in err


def test_checkpoint_without_its_calibration(tiny_run, tmp_path, capsys):
    """A model.pt made or edited elsewhere, lacking an entry: one line naming the file and the entry."""
    ckpt = ckpt_io.load_checkpoint(tiny_run / "model.pt")
    del ckpt["calibration"]
    ckpt_io.atomic_save(ckpt, tmp_path / "cut" / "model.pt")
    err = error_of(capsys, ["predict", str(tmp_path / "cut"), str(tiny_run)])
    assert "model.pt" in err and "incomplete model checkpoint (no calibration)" in err


def test_checkpoint_whose_weights_do_not_fit_its_grid(tiny_run, tmp_path, capsys):
    """A model.pt whose config names another grid than its position embeddings were trained on."""
    ckpt = ckpt_io.load_checkpoint(tiny_run / "model.pt")
    ckpt["config"]["model"]["grid_stride"] = 8  # 64 px: an 8x8 grid instead of the 4x4 it was trained with
    ckpt_io.atomic_save(ckpt, tmp_path / "other" / "model.pt")
    err = error_of(capsys, ["predict", str(tmp_path / "other"), str(tiny_run)])
    assert "model.pt" in err and "do not fit" in err


def test_malicious_model_file_never_runs_from_the_cli(tmp_path, capsys):
    """A model.pt that would create a marker file when unpickled: refused, marker never made."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    run = tmp_path / "evil"
    run.mkdir()
    with open(run / "model.pt", "wb") as fh:
        torch.save({"format_version": ckpt_io.FORMAT_VERSION, "kind": "model", "x": Payload()}, fh,
                   pickle_module=pickle)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    for argv in (["predict", str(run), str(image)], ["test", str(run), "--data", str(tmp_path)],
                 ["export", str(run)], ["calibrate", str(run), "--mode", "fpr"]):
        err = error_of(capsys, argv)
        assert "model.pt" in err and "refused" in err, err
        assert not marker.exists()


def test_resume_refuses_other_backbone(tiny_category, tmp_path, capsys):
    run = tmp_path / "run"
    ckpt_io.atomic_save({"format_version": ckpt_io.FORMAT_VERSION,
                         "config": {"model": {"backbone": "tf_efficientnet_lite0", "image_size": 64}}},
                        run / "last.pt")
    err = error_of(capsys, ["fit", str(tiny_category), "--out", str(run), "--resume", "--backbone", "resnet18"])
    assert "last.pt" in err and "resnet18" in err


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "adtr.cli", "predict", str(tmp_path), "x.png"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "not an adtr run" in proc.stderr


def test_python_api_mirrors_cli(tiny_run, tiny_category):
    import numpy as np

    from adtr import Detector

    det = Detector.load(tiny_run, device="cpu")
    path = sorted((tiny_category / "test" / "hole").glob("*.png"))[0]
    r_path = det.predict(path)
    r_pil = det.predict(Image.open(path))
    r_arr = det.predict(np.asarray(Image.open(path).convert("RGB")))
    assert r_path.anomaly_map.shape == (64, 64)
    assert r_path.score == pytest.approx(r_pil.score, rel=1e-5) == pytest.approx(r_arr.score, rel=1e-5)
    batch = det.predict([path, path])
    assert len(batch) == 2 and batch[0].score == pytest.approx(r_path.score, rel=1e-5)
    assert r_path.is_anomalous == (r_path.score > det.threshold)
    with torch.no_grad():
        assert det.predict(path, threshold=-1.0).is_anomalous


def test_fit_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for option in ("--plus", "--init", "--defects", "--defect-masks", "--outliers", "--alpha", "--topk",
                   "--anomaly-prob", "--variants", "--refresh-every", "--reconstructor", "--target", "--stages",
                   "--step-at", "--warmup-fraction", "--backbone", "--compile"):
        assert option in text, option


def test_compile_flag_reaches_the_training_config():
    from adtr.cli import build_parser, config_from_args

    parser = build_parser()
    assert config_from_args(parser.parse_args(["fit", "good", "--out", "r", "--compile"])).train.compile
    assert not config_from_args(parser.parse_args(["fit", "good", "--out", "r"])).train.compile


def test_plus_from_the_cli(tiny_run, tiny_category, tmp_path, capsys):
    plus = tmp_path / "plus"
    args = ["fit", str(tiny_category), "--plus", "pixel", "--init", str(tiny_run), "--epochs", "1", "--variants", "1"]
    assert main([*args, "--out", str(plus)]) == 0
    saved = ckpt_io.load_checkpoint(plus / "model.pt")["config"]
    assert saved["plus"]["loss"] == "pixel" and saved["plus"]["source"] == "confetti"
    assert saved["train"]["schedule"] == "step" and saved["train"]["lr"] == 1e-4
    assert main(["test", str(plus), "--data", str(tiny_category), "--out", str(tmp_path / "t")]) == 0
    outliers = tiny_category / "test" / "good"
    assert main(["fit", str(tiny_category), "--plus", "image", "--init", str(tiny_run), "--epochs", "1",
                 "--outliers", str(outliers), "--out", str(tmp_path / "img")]) == 0
    assert ckpt_io.load_checkpoint(tmp_path / "img" / "model.pt")["config"]["plus"]["source"] == "outliers"
    assert "the model is the --init run's" in error_of(capsys, [*args, "--image-size", "64", "--out", str(tmp_path / "a")])
    assert "only image labels" in error_of(capsys, [*args, "--outliers", str(outliers), "--out", str(tmp_path / "b")])
    assert "add --plus" in error_of(capsys, ["fit", str(tiny_category), "--init", str(tiny_run), "--out",
                                             str(tmp_path / "c")])
    assert "--init" in error_of(capsys, ["fit", str(tiny_category), "--plus", "pixel", "--out", str(tmp_path / "d")])
    assert "already an ADTR+ run" in error_of(capsys, ["fit", str(tiny_category), "--plus", "pixel", "--init",
                                                       str(plus), "--out", str(tmp_path / "e")])


def test_plus_with_real_defects_from_the_cli(tiny_run, tiny_category, tmp_path, caplog):
    assert main(["fit", str(tiny_category), "--plus", "pixel", "--init", str(tiny_run), "--epochs", "1",
                 "--defects", str(tiny_category), "--out", str(tmp_path / "px")]) == 0
    saved = ckpt_io.load_checkpoint(tmp_path / "px" / "model.pt")["config"]["plus"]
    assert saved["source"] == "defects" and saved["data"] == str(tiny_category.resolve())
    # Testing on the category it learnt the defects from is allowed, and says what it means.
    caplog.clear()
    assert main(["test", str(tmp_path / "px"), "--data", str(tiny_category / "test"), "--no-report"]) == 0
    assert "not held-out figures" in caplog.text
    caplog.clear()
    assert main(["test", str(tiny_run), "--data", str(tiny_category / "test"), "--no-report"]) == 0
    assert "not held-out" not in caplog.text


def test_ablation_options_are_saved(tiny_category, tmp_path):
    run = tmp_path / "run"
    assert main(["fit", str(tiny_category), "--out", str(run), *TINY_FIT_ARGS, "--epochs", "1",
                 "--reconstructor", "no-query", "--stages", "4"]) == 0
    model = ckpt_io.load_checkpoint(run / "model.pt")["config"]["model"]
    assert model["reconstructor"] == "no-query" and list(model["stages"]) == [4]
    assert main(["predict", str(run), str(tiny_category / "test" / "good"), "--out", str(tmp_path / "p")]) == 0


def test_tsne_from_the_cli(tiny_run, tiny_category, tmp_path, capsys):
    test = tmp_path / "test"
    (test / "good").mkdir(parents=True)
    (test / "spot").mkdir()
    (tmp_path / "masks" / "spot").mkdir(parents=True)
    goods = sorted((tiny_category / "test" / "good").iterdir())
    for i, src in enumerate(goods[:2]):
        shutil.copy(src, test / "good" / f"g{i}.png")
        shutil.copy(src, test / "spot" / f"s{i}.png")
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 32))  # a quarter of the image: four whole grid cells
        mask.save(tmp_path / "masks" / "spot" / f"s{i}.png")
    out = tmp_path / "tsne.png"
    assert main(["tsne", str(tiny_run), "--data", str(test), "--masks", str(tmp_path / "masks"), "--n", "16",
                 "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"
    assert "defect masks" in error_of(capsys, ["tsne", str(tiny_run), "--data", str(tiny_category / "train"),
                                               "--out", str(tmp_path / "x.png")])


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """`adtr ... | head`: the closed pipe gives exit status 141 and no traceback."""
    script = ("import sys\nimport adtr.cli as cli\n"
              "def flood(args):\n    for i in range(200_000):\n        print('line', i)\n    return 0\n"
              "cli.cmd_calibrate = flood\nsys.exit(cli.main(['calibrate', 'run']))\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.readline() == b"line 0\n"
    child.stdout.close()  # the reader leaves
    err = child.stderr.read().decode()
    assert child.wait(timeout=60) == 141 and "Traceback" not in err, err
