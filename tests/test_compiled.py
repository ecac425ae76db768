"""The torch.compile engine against the eager fp32 reference, from Python and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adtr.cli import main
from adtr.data import index_mvtec
from adtr.detector import Detector
from adtr.errors import AdtrError

from conftest import assert_compiled_agrees_with_eager


@pytest.fixture(scope="module")
def test_images(tiny_category) -> list[Path]:
    return [s.image for s in index_mvtec(tiny_category.parent, tiny_category.name, "test")]


def predictions(out: Path) -> dict[str, dict]:
    return {r["image"]: r for r in json.loads((out / "results.json").read_text())}


def test_predict_with_the_compiled_engine_matches_eager_fp32(tiny_run, test_images, tmp_path):
    """`adtr predict --engine compile` (fp32): scores within 1e-4 relative, same decisions."""
    common = [str(tiny_run), *map(str, test_images), "--no-overlays", "--batch-size", "5"]
    assert main(["predict", *common, "--out", str(tmp_path / "eager")]) == 0
    assert main(["predict", *common, "--out", str(tmp_path / "compiled"), "--engine", "compile"]) == 0
    eager, compiled = predictions(tmp_path / "eager"), predictions(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and len(eager) == len(test_images) == 12  # 5 + 5 + 2: the last batch padded
    for name, ref in eager.items():
        assert compiled[name]["score"] == pytest.approx(ref["score"], rel=1e-4), name
        assert compiled[name]["label"] == ref["label"], name


def test_compiled_bf16_agrees_with_fp32_and_pads_smaller_batches(tiny_run):
    """bf16 inside the compiled graph: maps within 2% of their largest value and scores
    within 2% of the fp32 eager reference; a smaller batch reuses the compiled graph."""
    det, images, maps, scores = assert_compiled_agrees_with_eager(tiny_run, "bf16", rtol=2e-2)
    one_map, one_score = det.score_tensors(images[1:2])
    assert det.scorer.batch_sizes == {3}  # padded to the compiled batch, not compiled again
    assert torch.equal(one_map[0], maps[1]) and float(one_score[0]) == float(scores[1])


def test_a_compiler_failure_is_one_clear_error(tiny_run, monkeypatch):
    def no_compiler(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nlong details")
        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    det = Detector.load(tiny_run, device="cpu", engine="compile")
    with pytest.raises(AdtrError, match=r"^torch.compile failed \(RuntimeError: InvalidCxxCompiler: No working "
                                        r"C\+\+ compiler found\); .* use --engine torch$"):
        det.score_tensors(torch.rand(1, 3, 64, 64))


def test_unknown_engine_is_refused(tiny_run):
    with pytest.raises(AdtrError, match="unknown engine 'tensorrt' \\(use torch, onnx, compile\\)"):
        Detector.load(tiny_run, engine="tensorrt")
