"""int8 inference (adtr.quantize through the compiled engine) against the eager fp32 reference."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from adtr.cli import main
from adtr.config import with_overrides
from adtr.detector import Detector
from adtr.errors import AdtrError
from adtr.quantize import quantize_linear_layers, require_int8_support

from conftest import assert_compiled_agrees_with_eager, tiny_config

pytestmark = pytest.mark.skipif("x86" not in torch.backends.quantized.supported_engines,
                                reason="int8 inference needs an x86 CPU")


@pytest.fixture(scope="module")
def small_run(tiny_category, tmp_path_factory) -> Path:
    """A run with a one-layer encoder and decoder: the int8 graph compiles in seconds, not a minute."""
    from adtr.data import index_mvtec
    from adtr.engine import fit

    cfg = with_overrides(tiny_config(epochs=2), "model", dim=64, num_heads=4, ffn_dim=128,
                         num_encoder_layers=1, num_decoder_layers=1)
    run = tmp_path_factory.mktemp("small_run") / "run"
    fit(cfg, index_mvtec(tiny_category.parent, tiny_category.name, "train"), run)
    return run


def test_only_the_linear_layers_are_quantised(small_run):
    """Every nn.Linear gets int8 weights (one per-channel dequantize each) and int8 inputs
    (scales chosen at run time); the convolutions keep fp32 weights."""
    det = Detector.load(small_run, device="cpu")
    graph, extra = quantize_linear_layers(det.scoring, torch.zeros(1, 3, 64, 64))
    assert [tuple(t.shape) for t in extra] == [tuple(det.network.model.query_embed.shape)]
    ops = Counter(str(n.target) for n in graph.graph.nodes if n.op == "call_function")
    linears = sum(isinstance(m, nn.Linear) for m in det.scoring.modules())
    assert linears > 0 and ops["aten.linear.default"] == linears
    assert ops["quantized_decomposed.dequantize_per_channel.default"] == linears
    assert ops["quantized_decomposed.choose_qparams.tensor"] > 0  # dynamic: activation scales at run time
    assert ops["aten.conv2d.default"] > 0 and not any("conv" in op and "quantized" in op for op in ops)


def test_int8_from_the_cli_and_python_agrees_with_fp32(small_run, tiny_category, tmp_path, monkeypatch):
    """`adtr test --engine compile --precision int8`: metrics close to fp32's, and the report
    says which inference produced them. Its detector (compiled once: the slow part) then
    gives maps within 1% of their largest value and scores within 1% of eager fp32 (measured
    on this run: about 8e-4 and 1e-4), and an image's result depends neither on its batch
    nor on how many calls came before (Inductor's in-place residual add, see QueryAsInput)."""
    loaded = []
    load = Detector.load.__func__
    monkeypatch.setattr(Detector, "load", classmethod(lambda cls, *a, **k: loaded.append(load(cls, *a, **k))
                                                      or loaded[-1]))
    assert main(["test", str(small_run), "--data", str(tiny_category), "--out", str(tmp_path / "fp32"),
                 "--no-report"]) == 0
    assert main(["test", str(small_run), "--data", str(tiny_category), "--out", str(tmp_path / "int8"),
                 "--engine", "compile", "--precision", "int8"]) == 0
    ref = json.loads((tmp_path / "fp32" / "metrics.json").read_text())["metrics"]
    got = json.loads((tmp_path / "int8" / "metrics.json").read_text())["metrics"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert got[key] == pytest.approx(ref[key], abs=0.02), key
    assert "int8, engine compile" in (tmp_path / "int8" / "report.html").read_text()

    det = loaded[1]
    assert (det.precision, det.engine) == ("int8", "compile")
    det, images, maps, scores = assert_compiled_agrees_with_eager(small_run, "int8", rtol=1e-2, det=det)
    for _ in range(2):  # the same result every call: nothing the graph holds changes between calls
        one_map, one_score = det.score_tensors(images[1:2])
        assert torch.equal(one_map[0], maps[1]) and float(one_score[0]) == float(scores[1])
    assert det.scorer.batch_sizes == {1}  # one graph, one image at a time


def test_int8_needs_the_compiled_engine(small_run):
    for engine in ("torch", "onnx"):
        with pytest.raises(AdtrError, match=r"^precision int8 runs in the compiled engine only: add --engine compile$"):
            Detector.load(small_run, device="cpu", engine=engine, precision="int8")
    det = Detector.load(small_run, device="cpu")
    det.precision = "int8"  # built by hand, without the compiled engine
    with pytest.raises(AdtrError, match="compiled engine only"):
        det.score_tensors(torch.rand(1, 3, 64, 64))


def test_int8_off_the_cpu_or_without_torchao_is_one_clear_error(monkeypatch):
    with pytest.raises(AdtrError, match=r"^precision int8 runs on x86 CPUs only \(device meta\): use bf16 there$"):
        require_int8_support(torch.device("meta"))
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.quantize_pt2e", None)  # as if not installed
    with pytest.raises(AdtrError, match=r"^precision int8 needs torchao \(.*\): pip install torchao$"):
        require_int8_support(torch.device("cpu"))


def test_cli_refuses_int8_without_the_compiled_engine(small_run, tiny_category, tmp_path, capsys):
    image = next((tiny_category / "test" / "good").iterdir())
    assert main(["predict", str(small_run), str(image), "--out", str(tmp_path), "--precision", "int8"]) != 0
    assert "precision int8 runs in the compiled engine only" in capsys.readouterr().err
