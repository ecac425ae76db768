"""ONNX export: one graph from image tensor to (anomaly map, image score), backbone inside.

    >>> from adtr.export import export_onnx
    >>> path = export_onnx("runs/bottle")            # runs/bottle/model.onnx
    >>> # then: adtr predict runs/bottle images/ --engine onnx

The graph's input ``images`` is (B, 3, S, S) float32 RGB in [0, 1] (S: the run's image
size, B dynamic). Its outputs are ``anomaly_map`` (B, 1, S, S), upsampled and smoothed
exactly as :meth:`adtr.detector.Detector.score_tensors` does, and ``score`` (B,), the
image score; an image is anomalous when ``score > threshold``. ``metadata_props`` carry
the image size and the run's threshold (and the scoring settings), so a deployment needs
the ``.onnx`` file and onnxruntime, nothing else.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript). The
legacy TorchScript exporter cannot export the backbone: timm's 'same' padding
(``Conv2dSame``) computes its padding from the traced input size, so the stage sizes
become unknown and ``adaptive_avg_pool2d`` in :class:`FrozenBackbone` has no static
output size to export ("input size not accessible"), with or without a dynamic batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adtr import checkpoint as ckpt_io
from adtr.engine import autocast
from adtr.errors import AdtrError, file_error, first_line
from adtr.models.adtr import ADTRDetector
from adtr.postprocess import image_score, upsample_blur, upsample_blur_matrix

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
#: Opset of the exported graph: 20 runs on onnxruntime >= 1.17; the dynamo exporter needs >= 18.
DEFAULT_OPSET = 20
MIN_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
#: Parity with PyTorch checked at export: max |map difference| <= RTOL * max |map|, scores likewise.
RTOL = 1e-4


class ScoringModel(nn.Module):
    """Backbone + ADTR + post-processing: the whole of inference as one module.

    Args:
        network: the trained :class:`ADTRDetector`.
        image_size: S, the input side the run was trained with.
        sigma: Gaussian smoothing of the upsampled map in pixels (0 = off).
        pool_size: average-pool window of the image score in pixels.
    """

    def __init__(self, network: ADTRDetector, image_size: int, sigma: float, pool_size: int) -> None:
        super().__init__()
        self.network = network
        self.image_size = image_size
        self.sigma = sigma
        self.pool_size = pool_size
        # The map's upsampling and smoothing as one (S, h) matrix per axis, made once here
        # rather than traced into every compiled or exported graph.
        matrix = upsample_blur_matrix(network.model.grid_size, image_size, float(sigma)).clone()  # (S, h)
        self.register_buffer("upsample", matrix, persistent=False)

    def forward(self, images: torch.Tensor, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) in [0, 1] -> anomaly map (B, 1, S, S), image score (B,).

        ``precision`` ``bf16`` runs the network under bf16 autocast; the map's upsampling,
        smoothing and the score stay fp32 (a bf16 map would round to 3 significant digits).
        """
        with autocast(precision, images.device):
            grid_map = self.network(images).anomaly_map  # (B, 1, h, w)
        pmap = upsample_blur(grid_map, self.upsample, self.upsample)  # (B, 1, S, S), fp32
        return pmap, image_score(pmap, self.pool_size)


def weights_fingerprint(ckpt: dict[str, Any]) -> str:
    """SHA-256 of what fixes the graph's outputs: model config, map/score settings and weights.

    Calibration is left out on purpose: re-calibrating a run changes its threshold,
    not its maps and scores, so an export stays valid for ``--engine onnx``.
    """
    h = hashlib.sha256()
    score = ckpt["config"]["score"]
    h.update(json.dumps([ckpt["config"]["model"], score["sigma"], score["pool_size"]], sort_keys=True).encode())
    for part in ("backbone", "model"):
        for key in sorted(ckpt[part]):
            t = ckpt[part][key].detach().cpu().contiguous().reshape(-1)
            h.update(f"{part}.{key}:{t.dtype}:{tuple(ckpt[part][key].shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_scoring_model(run: str | Path) -> tuple[ScoringModel, dict[str, str]]:
    """A run's :class:`ScoringModel` (CPU, fp32, eval), rebuilt as ``Detector.load`` does, and its metadata."""
    from adtr.engine import restore_networks

    path = ckpt_io.find_run_file(Path(run))
    ckpt = ckpt_io.load_checkpoint(path)
    config, backbone, model = restore_networks(ckpt, path)
    size = config.model.image_size
    scoring = ScoringModel(ADTRDetector(backbone, model), size, config.score.sigma, config.score.pool_size).eval()
    metadata = {
        "image_size": str(size),
        "threshold": repr(float(ckpt["calibration"]["threshold"])),
        # a pixel is marked defective where anomaly_map > pixel_threshold ("inf": a run from before pixel calibration)
        "pixel_threshold": repr(float(ckpt["calibration"].get("pixel_threshold", float("inf")))),
        "threshold_mode": str(ckpt["calibration"].get("mode", "fpr")),
        "input": f"{INPUT_NAME}: (B, 3, {size}, {size}) float32 RGB in [0, 1]",
        "outputs": f"{OUTPUT_NAMES[0]}: (B, 1, {size}, {size}) float32; {OUTPUT_NAMES[1]}: (B,) float32; "
                   "anomalous = score > threshold",
        "sigma": repr(float(config.score.sigma)),
        "pool_size": str(config.score.pool_size),
        "backbone": config.model.backbone,
        "weights_sha256": weights_fingerprint(ckpt),
        "adtr_version": ckpt_io.package_version(),
        "torch_version": str(torch.__version__),
    }
    return scoring, metadata


def check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise AdtrError(f"--opset {opset}: the exporter supports opsets {MIN_OPSET} to {newest}")


def onnx_bytes(scoring: ScoringModel, opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None) -> bytes:
    """Serialised, checked ONNX model of ``scoring`` (on the CPU) with a dynamic batch axis."""
    import onnx

    check_opset(opset)
    size = scoring.image_size
    example = torch.rand(2, 3, size, size)  # batch 2: a batch of 1 would be specialised to a constant
    with torch.no_grad():
        program = torch.onnx.export(
            scoring, (example,), dynamo=True, opset_version=opset, verbose=False, optimize=True,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def parity(scoring: ScoringModel, data: bytes, batch: int = 2, seed: int = 0) -> tuple[float, float]:
    """(max map difference / max |map|, max score difference / max |score|) of ONNX against PyTorch."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, scoring.image_size, scoring.image_size, generator=g)
    with torch.no_grad():
        ref_map, ref_score = scoring(x)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    pmap, score = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
    map_err = float(np.abs(pmap - ref_map.numpy()).max() / max(float(ref_map.abs().max()), 1e-12))
    score_err = float(np.abs(score - ref_score.numpy()).max() / max(float(ref_score.abs().max()), 1e-12))
    return map_err, score_err


def export_onnx(run_dir: str | Path, out_path: str | Path | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """Export a finished run to one ONNX graph (default ``RUN/model.onnx``); returns the path.

    The graph is checked with ``onnx.checker`` and against PyTorch on random images
    (:data:`RTOL`) before it is written, atomically (temporary file, fsync, rename).
    """
    run_dir = Path(run_dir)
    check_opset(opset)
    out = Path(out_path) if out_path is not None else (run_dir.parent if run_dir.is_file() else run_dir) / ONNX_FILE
    if out.is_dir():
        raise file_error(out, "is a folder; give the .onnx file to write")
    scoring, metadata = load_scoring_model(run_dir)
    data = onnx_bytes(scoring, opset, metadata)
    map_err, score_err = parity(scoring, data)
    if not (map_err <= RTOL and score_err <= RTOL):
        raise file_error(out, f"ONNX outputs differ from PyTorch (maps {map_err:.1e}, scores {score_err:.1e} "
                              f"relative; tolerance {RTOL:g}); nothing written")
    ckpt_io.atomic_write_bytes(data, out)
    log.info("exported %s: %.1f MB, opset %d, relative difference to PyTorch: maps %.1e, scores %.1e",
             out, len(data) / 2**20, opset, map_err, score_err)
    return out


class OnnxScorer:
    """An exported model run by onnxruntime: CUDA where onnxruntime has it (and ``device``
    is not the CPU), else the CPU. :meth:`score_tensors` has the signature and meaning of
    :meth:`adtr.detector.Detector.score_tensors`.

    Args:
        path: the ``.onnx`` file written by :func:`export_onnx`.
        device: ``None`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        threads: onnxruntime intra-op threads (``None``: its default, one per core).
    """

    def __init__(self, path: str | Path, device: str | torch.device | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise file_error(path, "no ONNX model: create it with `adtr export RUN --format onnx`")
        want_cuda = device is None or torch.device(device).type == "cuda"
        cuda = want_cuda and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider"] if cuda else []
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[*providers, "CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - any failure is an unusable file to the user
            raise file_error(path, f"cannot load ONNX model ({first_line(exc)})") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        if "image_size" not in meta or "threshold" not in meta:
            raise file_error(path, "not an adtr export (no image_size/threshold metadata); re-run `adtr export`")
        self.path = path
        self.metadata: dict[str, str] = dict(meta)
        try:
            self.image_size = int(meta["image_size"])
            self.threshold = float(meta["threshold"])
        except ValueError:
            raise file_error(path, f"metadata image_size {meta['image_size']!r} or threshold {meta['threshold']!r} "
                                   "is not a number; re-run `adtr export`") from None

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def score_tensors(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> maps (B, S, S) and scores (B,), float32 on the CPU."""
        if tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise AdtrError(f"{self.path}: expects (B, 3, {self.image_size}, {self.image_size}) images, "
                            f"got {tuple(images.shape)}")
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        pmap, score = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})  # (B, 1, S, S), (B,)
        return torch.from_numpy(pmap[:, 0]), torch.from_numpy(score)


def scorer_for_run(run_file: Path, ckpt: dict[str, Any], device: str | torch.device | None = None) -> OnnxScorer:
    """The :class:`OnnxScorer` of ``RUN/model.onnx`` beside ``run_file``, checked against the run's weights."""
    path = Path(run_file).parent / ONNX_FILE
    if not path.is_file():
        raise file_error(path, f"not found: run `adtr export {Path(run_file).parent} --format onnx` first")
    scorer = OnnxScorer(path, device)
    if scorer.metadata.get("weights_sha256") != weights_fingerprint(ckpt):
        raise file_error(path, f"exported from other weights or settings than {run_file.name}: "
                               f"run `adtr export {path.parent} --format onnx` again")
    return scorer
