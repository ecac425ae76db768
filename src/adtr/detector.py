"""Load a finished run and score images: the Python API behind ``adtr predict``.

    >>> from adtr import Detector
    >>> det = Detector.load("runs/bottle")
    >>> result = det.predict("part.png")
    >>> result.score, result.is_anomalous, result.anomaly_map.shape
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from adtr import checkpoint as ckpt_io
from adtr.calibrate import active_expected_fpr
from adtr.config import ENGINES, INFERENCE_PRECISIONS, RunConfig
from adtr.data.images import image_to_tensor
from adtr.data.inputs import ImageLike, is_one_image, iter_images, to_pil
from adtr.engine import resolve_device, resolve_precision, restore_networks
from adtr.errors import AdtrError
from adtr.export import ScoringModel
from adtr.models.adtr import ADTRDetector
from adtr.postprocess import ExpectedFpr, normalize_scores

if TYPE_CHECKING:
    from adtr.compiled import CompiledScorer
    from adtr.export import OnnxScorer

#: One image: a file path, a PIL image, an RGB (H, W) or (H, W, C) numpy array, a (C, H, W) tensor.
ImageInput = ImageLike
#: ``predict``'s ``on_error``: stop at the first unreadable input, or return an :class:`Unreadable` in its place.
ON_ERROR = ("raise", "skip")


@dataclass(frozen=True)
class Prediction:
    """One image's result, at the input image's own resolution (H, W). Arrays are read as RGB,
    HxWxC (a BGR array scores differently; see :meth:`Detector.predict`).

    score: raw image score (pooled maximum of the map, Eq. 3's units).
    normalized_score: ``score`` mapped to [0, 1] with the threshold at 0.5
        (:func:`adtr.postprocess.normalize_scores`); comparable across runs.
    threshold, is_anomalous: the calibrated decision ``score > threshold``.
    anomaly_map: (H, W) float32 per-pixel error s(u) (Eq. 2), resized to the input.
    defect_mask: (H, W) bool, ``anomaly_map > pixel_threshold`` (empty when the image
        is judged normal, so a mask never contradicts the decision).
    source: the file path, or for an in-memory image its type (``ndarray``), with its
        position in a collection (``ndarray[3]``).
    """

    score: float
    normalized_score: float
    threshold: float
    is_anomalous: bool
    anomaly_map: np.ndarray
    defect_mask: np.ndarray
    source: str

    def __repr__(self) -> str:
        """One line for a notebook or a log: the decision and the arrays' sizes, not their values."""
        verdict = "anomalous" if self.is_anomalous else "normal"
        height, width = self.anomaly_map.shape[:2]
        return (f"Prediction({verdict}, score={self.score:.4g}, threshold={self.threshold:.4g}, "
                f"normalized_score={self.normalized_score:.3f}, map={height}x{width}, "
                f"defect_pixels={int(np.count_nonzero(self.defect_mask))}, source={self.source!r})")


@dataclass(frozen=True)
class Unreadable:
    """An input that ``predict(..., on_error="skip")`` could not read, in its place among the
    results: ``adtr predict --skip-unreadable``'s ``unreadable`` row, whose score is null."""

    source: str  # as Prediction.source
    error: str  # the one-line message that on_error="raise" would have raised

    @property
    def score(self) -> None:
        """None, so that ``[r.score for r in results]`` works on a list holding both kinds."""
        return None


@dataclass(frozen=True)
class Scored:
    """One input as :meth:`Detector.score_chunk` scored it, before it becomes a :class:`Prediction`
    (or a row and an overlay of ``adtr predict``)."""

    source: str
    image: torch.Tensor  # (3, S, S) in [0, 1]: what the model saw
    size: tuple[int, int]  # the input's own (H, W)
    anomaly_map: torch.Tensor  # (S, S)
    score: float


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
        """Any supported input -> RGB PIL image at its own size (:func:`adtr.data.inputs.to_pil`)."""
        return to_pil(image)

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

    @overload
    def predict(self, images: Image.Image, threshold: float | None = None, batch_size: int = 16, *,
                on_error: Literal["raise"] = "raise") -> Prediction: ...

    @overload
    def predict(self, images: str | Path | np.ndarray | torch.Tensor, threshold: float | None = None,
                batch_size: int = 16, *, on_error: Literal["raise"] = "raise") -> Prediction | list[Prediction]: ...

    @overload
    def predict(self, images: Iterable[ImageInput], threshold: float | None = None, batch_size: int = 16, *,
                on_error: Literal["raise"] = "raise") -> list[Prediction]: ...

    @overload
    def predict(self, images: ImageInput | Iterable[ImageInput], threshold: float | None = None,
                batch_size: int = 16, *,
                on_error: Literal["skip"]) -> Prediction | Unreadable | list[Prediction | Unreadable]: ...

    def predict(self, images: ImageInput | Iterable[ImageInput], threshold: float | None = None,
                batch_size: int = 16, *, on_error: str = "raise") -> Any:
        """Score one image (returns a :class:`Prediction`) or many (returns a list, in input order).

        One image: a file path, a PIL image, a numpy array in RGB, HxWxC (C 1, 3 or 4: grey, RGB,
        RGBA) or HxW (grey), or a torch tensor (C, H, W). A BGR array (OpenCV's) scores
        differently: convert it, ``a[..., ::-1]``. A channels-first array is refused with the
        transpose that fixes it. Arrays: uint8; uint16 (as 16-bit files); other numbers in
        [0, 1] or [0, 255]. Many, returning a list: a folder (its images), a glob
        pattern, an (N, H, W, C) array or (N, C, H, W) tensor (one value range for the batch),
        or a list or any iterable of any of these (a generator is read batch by batch).
        ``batch_size``: images per forward pass. ``on_error="skip"``: an input that cannot be
        read (a file that does not decode, an array that is no image) becomes an
        :class:`Unreadable` in its place, as ``adtr predict --skip-unreadable`` lists it; a
        folder or glob that names nothing still raises.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise AdtrError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        if on_error not in ON_ERROR:
            raise AdtrError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        single = is_one_image(images)
        thr = self.threshold if threshold is None else float(threshold)
        results: list[Prediction | Unreadable] = []
        for chunk in chunks(iter_images(images), int(batch_size)):
            results.extend(r if isinstance(r, Unreadable) else
                           self.make_prediction(r.score, r.anomaly_map, r.size, thr, r.source)
                           for r in self.score_chunk(chunk, on_error, errors_name_the_input=single))
        return results[0] if single else results

    def score_chunk(self, chunk: list[tuple[str, ImageInput]], on_error: str = "raise",
                    errors_name_the_input: bool = False) -> list[Scored | Unreadable]:
        """Decode and score one forward pass's worth of ``(source, image)`` pairs, in order: the
        loop behind both ``predict`` and ``adtr predict``. An input that cannot be read raises
        :class:`AdtrError` naming it, or with ``on_error="skip"`` becomes an :class:`Unreadable`."""
        slots: list[Scored | Unreadable | None] = [None] * len(chunk)
        decoded = []  # (slot, source, RGB image)
        for j, (source, item) in enumerate(chunk):
            try:
                decoded.append((j, source, to_pil(item)))
            except AdtrError as exc:
                named = errors_name_the_input or isinstance(item, (str, Path))  # a file's errors name it already
                if on_error == "raise":
                    if named:
                        raise
                    raise AdtrError(f"{source}: {exc}") from exc
                slots[j] = Unreadable(source, str(exc) if named else f"{source}: {exc}")
        if decoded:
            images = torch.stack([image_to_tensor(pil, self.image_size) for _, _, pil in decoded])
            maps, scores = self.score_tensors(images)
            for (j, source, pil), image, amap, score in zip(decoded, images, maps, scores.tolist()):
                slots[j] = Scored(source, image, (pil.height, pil.width), amap, score)
        return slots  # type: ignore[return-value]  # every slot is filled

    def make_prediction(self, score: float, amap: torch.Tensor, size: tuple[int, int], threshold: float,
                        source: str) -> Prediction:
        """A :class:`Prediction` from a model-size map (S, S), resized bilinearly to ``size`` (H, W)."""
        if tuple(amap.shape) != size:
            amap = F.interpolate(amap[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
        amap_np = amap.float().numpy()
        anomalous = score > threshold
        mask = amap_np > self.pixel_threshold if anomalous else np.zeros(size, dtype=bool)
        return Prediction(score, normalize_scores(score, threshold), threshold, anomalous, amap_np, mask, source)


def chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last shorter), reading ``items`` lazily."""
    while chunk := list(itertools.islice(items, size)):
        yield chunk
