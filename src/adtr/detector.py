"""Load a finished run and score images: the Python API behind ``adtr predict``.

    >>> from adtr import Detector
    >>> det = Detector.load("runs/bottle")
    >>> result = det.predict("part.png")
    >>> result.score, result.is_anomalous, result.anomaly_map.shape
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from adtr import checkpoint as ckpt_io
from adtr.calibrate import active_expected_fpr
from adtr.config import ENGINES, INFERENCE_PRECISIONS, RunConfig
from adtr.data.images import image_to_tensor, read_image, to_rgb
from adtr.engine import resolve_device, resolve_precision, restore_networks
from adtr.errors import AdtrError
from adtr.export import ScoringModel
from adtr.models.adtr import ADTRDetector
from adtr.postprocess import ExpectedFpr, normalize_scores

if TYPE_CHECKING:
    from adtr.compiled import CompiledScorer
    from adtr.export import OnnxScorer

ImageInput = str | Path | Image.Image | np.ndarray


@dataclass(frozen=True)
class Prediction:
    """One image's result, at the input image's own resolution (H, W).

    score: raw image score (pooled maximum of the map, Eq. 3's units).
    normalized_score: ``score`` mapped to [0, 1] with the threshold at 0.5
        (:func:`adtr.postprocess.normalize_scores`); comparable across runs.
    threshold, is_anomalous: the calibrated decision ``score > threshold``.
    anomaly_map: (H, W) float32 per-pixel error s(u) (Eq. 2), resized to the input.
    defect_mask: (H, W) bool, ``anomaly_map > pixel_threshold`` (empty when the image
        is judged normal, so a mask never contradicts the decision).
    """

    score: float
    normalized_score: float
    threshold: float
    is_anomalous: bool
    anomaly_map: np.ndarray
    defect_mask: np.ndarray
    source: str


def array_to_pil(array: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1|3|4) array -> RGB PIL image, read as a file of its depth would be.

    uint8 as it is; uint16 scaled by 1/257, as 16-bit PNG and TIFF files are; other numbers
    must lie in [0, 1] (scaled by 255) or [0, 255]. Anything else is refused rather than
    clipped, which would turn a camera's 16-bit frame white and score it wrongly.
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
        raise AdtrError(f"array of shape {a.shape} is not an image (expected HxW, HxWx3 or HxWx4, none of them 0)")
    if a.dtype == np.uint16:
        a = np.rint(a / 257.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.dtype.kind not in "biuf":
            raise AdtrError(f"image array of dtype {a.dtype} holds no pixel values")
        if not np.isfinite(a).all():
            raise AdtrError("image array contains NaN or inf")
        low, high = float(a.min()), float(a.max())
        if low < 0 or high > 255:
            raise AdtrError(f"image array of dtype {a.dtype} has values in [{low:g}, {high:g}]: give uint8, uint16, "
                            "or numbers in [0, 1] or [0, 255]")
        a = np.rint(a * 255.0 if high <= 1.0 else a).astype(np.uint8)
    return to_rgb(Image.fromarray(a))


class Detector:
    """A trained ADTR run ready for inference."""

    #: Set by ``load(..., engine="onnx" | "compile")``: scoring then runs the exported graph
    #: in onnxruntime, or the Inductor-compiled one.
    scorer: OnnxScorer | CompiledScorer | None = None
    #: The engine it scores with (``load``'s ``engine``).
    engine: str = "torch"

    def __init__(self, config: RunConfig, network: ADTRDetector, calibration: dict[str, Any],
                 device: torch.device, precision: str = "fp32") -> None:
        self.config = config
        self.network = network.eval()
        self.calibration = calibration
        self.device = device
        self.precision = resolve_precision(precision, device)
        if self.precision not in INFERENCE_PRECISIONS:
            raise AdtrError(f"unknown precision {precision!r} (use {', '.join(INFERENCE_PRECISIONS)} or auto)")
        self.scoring = ScoringModel(self.network, config.model.image_size, config.score.sigma,
                                    config.score.pool_size).to(device)

    @classmethod
    def load(cls, run: str | Path, device: str | torch.device | None = None, precision: str = "fp32",
             engine: str = "torch") -> Detector:
        """Rebuild the model from ``run`` (a run folder or its ``model.pt``) alone.

        ``precision``: ``fp32`` (the reference, and what the threshold was calibrated
        with) or ``bf16`` autocast (faster where the hardware has bf16 units; image scores
        within 2% of fp32 by the parity test, typically a few tenths of 1%, so a score very
        close to the threshold may flip), or
        ``auto`` (bf16 where it is fast), or ``int8`` with ``engine="compile"`` on an x86
        CPU (the transformer's linear layers in int8, see :mod:`adtr.quantize`: faster
        where there is no fast bf16, maps within about 1e-3 of fp32).
        ``engine``: ``torch``; ``onnx`` to score with onnxruntime and the graph that
        ``adtr export RUN --format onnx`` wrote to ``RUN/model.onnx`` (fp32 only; maps
        within 1e-4 relative of torch); or ``compile`` for ``torch.compile`` (see
        :mod:`adtr.compiled`: fastest, after a compilation of about 30 s per batch size).
        The threshold is still the run's own.
        """
        if engine not in ENGINES:
            raise AdtrError(f"unknown engine {engine!r} (use {', '.join(ENGINES)})")
        if precision == "int8" and engine != "compile":
            raise AdtrError("precision int8 runs in the compiled engine only: add --engine compile")
        if engine == "onnx" and precision != "fp32":
            raise AdtrError(f"the onnx engine runs the exported fp32 graph; precision {precision!r} needs engine torch")
        path = ckpt_io.find_run_file(Path(run))
        ckpt = ckpt_io.load_checkpoint(path)
        config, backbone, model = restore_networks(ckpt, path)
        device = resolve_device(device)
        det = cls(config, ADTRDetector(backbone, model).to(device), ckpt["calibration"], device, precision)
        det.engine = engine
        if engine == "onnx":
            from adtr.export import scorer_for_run

            det.scorer = scorer_for_run(path, ckpt, device)
        elif engine == "compile":
            from adtr.compiled import CompiledScorer

            det.scorer = CompiledScorer(det.scoring, det.precision, device)
        return det

    @property
    def image_size(self) -> int:
        return self.config.model.image_size

    @property
    def threshold(self) -> float:
        """The active image threshold (target-FPR by default, F1-optimal after ``adtr calibrate --mode f1``)."""
        return float(self.calibration["threshold"])

    @property
    def expected_fpr(self) -> ExpectedFpr | None:
        """The false-positive rate on new good images that the active threshold promises (see
        :func:`adtr.postprocess.expected_fpr`); None when it is not the held-out target-FPR one."""
        return active_expected_fpr(self.calibration)

    @property
    def pixel_threshold(self) -> float:
        """Map value above which a pixel is marked defective (runs from before pixel calibration: inf)."""
        return float(self.calibration.get("pixel_threshold", float("inf")))

    def to_tensor(self, image: ImageInput) -> torch.Tensor:
        """Any supported input -> (3, S, S) float in [0, 1]."""
        return image_to_tensor(self.to_pil(image), self.image_size)

    def to_pil(self, image: ImageInput) -> Image.Image:
        """Any supported input -> RGB PIL image at its own size."""
        if isinstance(image, (str, Path)):
            pil = read_image(image)
        elif isinstance(image, Image.Image):
            pil = to_rgb(image)
        elif isinstance(image, np.ndarray):
            pil = array_to_pil(image)
        else:
            raise AdtrError(f"cannot predict on a {type(image).__name__}: give a path, PIL image or numpy array")
        return pil

    def check_batch(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``images`` as a float tensor, refused unless it is (B, 3, S, S) RGB in [0, 1] at the
        model's size: a 0-255 or channels-last batch would score without complaint, and wrongly."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise AdtrError(f"score_tensors takes a (B, 3, S, S) tensor, not a {type(images).__name__}; "
                            "predict() takes paths, PIL images and arrays")
        s = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (s, s):
            channels_last = images.ndim == 4 and images.shape[3] == 3
            hint = " (channels last? use images.permute(0, 3, 1, 2))" if channels_last else ""
            raise AdtrError(f"score_tensors takes a (B, 3, {s}, {s}) batch, got {tuple(images.shape)}{hint}")
        if not images.is_floating_point():
            raise AdtrError(f"score_tensors takes float values in [0, 1], got {images.dtype} (divide by 255)")
        if images.numel() and (images.min() < 0 or images.max() > 1):
            lo, hi = float(images.min()), float(images.max())
            hint = ": divide by 255" if hi > 1 and lo >= 0 else ""
            raise AdtrError(f"score_tensors takes values in [0, 1], got {lo:.3g} to {hi:.3g}{hint}")
        return images

    @torch.no_grad()
    def score_tensors(self, images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) RGB in [0, 1] at the model's size S -> maps (B, S, S) and scores (B,)."""
        images = self.check_batch(images)
        if self.scorer is not None:
            return self.scorer.score_tensors(images)
        if self.precision == "int8":
            raise AdtrError("precision int8 runs in the compiled engine only: Detector.load(..., engine='compile')")
        pmap, score = self.scoring(images.to(self.device), self.precision)
        return pmap[:, 0].cpu(), score.cpu()

    def predict(self, images: ImageInput | Sequence[ImageInput], threshold: float | None = None,
                batch_size: int = 16) -> Prediction | list[Prediction]:
        """Score one image (returns a :class:`Prediction`) or a sequence (returns a list)."""
        if batch_size < 1:
            raise AdtrError(f"batch_size must be at least 1, got {batch_size}")
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        thr = self.threshold if threshold is None else float(threshold)
        results = []
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            pils = [self.to_pil(x) for x in chunk]
            maps, scores = self.score_tensors(torch.stack([image_to_tensor(p, self.image_size) for p in pils]))
            for item, pil, amap, score in zip(chunk, pils, maps, scores):
                source = str(item) if isinstance(item, (str, Path)) else type(item).__name__
                results.append(self.make_prediction(float(score), amap, (pil.height, pil.width), thr, source))
        return results[0] if single else results

    def make_prediction(self, score: float, amap: torch.Tensor, size: tuple[int, int], threshold: float,
                        source: str) -> Prediction:
        """A :class:`Prediction` from a model-size map (S, S), resized bilinearly to ``size`` (H, W)."""
        if tuple(amap.shape) != size:
            amap = F.interpolate(amap[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
        amap_np = amap.float().numpy()
        anomalous = score > threshold
        mask = amap_np > self.pixel_threshold if anomalous else np.zeros(size, dtype=bool)
        return Prediction(score, normalize_scores(score, threshold), threshold, anomalous, amap_np, mask, source)
