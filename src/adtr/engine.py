"""Training, scoring and evaluation as plain functions.

``fit`` trains ADTR on cached backbone features of good images (Eq. 1), writing a
resumable checkpoint every ``checkpoint_seconds`` (at an epoch's end) and a calibrated
``model.pt`` at the end.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from adtr import checkpoint as ckpt_io
from adtr.anomalies import AnomalyPool, confetti_pool, decode_images, labelled_pool, mix_anomalies
from adtr.config import (SCHEDULES, ModelConfig, PlusConfig, RunConfig, ScoreConfig, TrainConfig, from_dict,
                         resume_ignores, to_dict)
from adtr.data.dataset import ImageSource
from adtr.data.inputs import training_images
from adtr.errors import AdtrError, compile_failure, first_line
from adtr.features import extract_features
from adtr.losses import image_push_pull_loss, pixel_push_pull_loss, pseudo_huber_map
from adtr.models.adtr import ADTR, RECONSTRUCTORS, ADTROutput, reconstruction_loss
from adtr.models.backbone import FrozenBackbone, PixelPatches
from adtr.optim import MuonAdamW, make_optimizer
from adtr.postprocess import image_score, pixel_anomaly_map, pixel_quantile_threshold, quantile_threshold
from adtr.progress import EpochProgress

if TYPE_CHECKING:
    from adtr.detector import Detector

log = logging.getLogger(__name__)

#: Anything :func:`fit` trains on (see :func:`adtr.data.inputs.training_images`).
TrainingInput = str | Path | ImageSource | Iterable[Any]


def default_device() -> torch.device:
    """CUDA when present, else CPU: no flag needed."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device (None: :func:`default_device`), refused in one line when it
    is not a device name or torch cannot use it here, rather than deep inside the first kernel."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise AdtrError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from exc
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise AdtrError(f"device {device!r}: torch sees no CUDA GPU here (use cpu, or leave the device out)")
        if resolved.index is not None and resolved.index >= count:
            raise AdtrError(f"device {device!r}: torch sees {count} CUDA GPU{'s' if count > 1 else ''} (cuda:0 to "
                            f"cuda:{count - 1})")
    return resolved


def build_backbone(cfg: ModelConfig, weights: str | None = None) -> FrozenBackbone | PixelPatches:
    """The frozen feature extractor, or raw pixel patches for the ``target='pixels'`` ablation."""
    if cfg.target == "pixels":
        return PixelPatches(cfg.grid_stride)
    if cfg.target != "features":
        raise AdtrError(f"unknown reconstruction target {cfg.target!r} (use features or pixels)")
    return FrozenBackbone(cfg.backbone, weights or cfg.weights, cfg.stages, cfg.grid_stride)


def build_model(cfg: ModelConfig, in_channels: int) -> ADTR:
    """The one place that turns a :class:`ModelConfig` into an :class:`ADTR`."""
    if cfg.reconstructor not in RECONSTRUCTORS:
        raise AdtrError(f"unknown reconstructor {cfg.reconstructor!r} (use {', '.join(RECONSTRUCTORS)})")
    grid = cfg.image_size // cfg.grid_stride
    try:
        return ADTR(in_channels, grid, cfg.dim, cfg.num_heads, cfg.num_encoder_layers,
                    cfg.num_decoder_layers, cfg.ffn_dim, cfg.dropout, cfg.error_space, cfg.reconstructor,
                    cfg.neighbour_mask, cfg.jitter, cfg.pos_init, cfg.cells_per_token, cfg.cross_init)
    except ValueError as exc:  # the model validates its own options (mask size, jitter, inits, cells)
        raise AdtrError(f"model options: {exc}") from None


def restore_networks(ckpt: dict[str, Any], path: Path) -> tuple[RunConfig, FrozenBackbone | PixelPatches, ADTR]:
    """Config, backbone and model of a finished run's checkpoint (nothing else is needed)."""
    if ckpt.get("kind") != "model":
        raise AdtrError(f"{path}: a training checkpoint, not a finished model; run `adtr fit --resume`")
    missing = [key for key in ("config", "backbone", "model", "calibration") if key not in ckpt]
    if missing:  # save_model writes them all: the file was made or edited elsewhere
        raise AdtrError(f"{path}: incomplete model checkpoint (no {', '.join(missing)}); fit the run again")
    config = from_dict(ckpt["config"])
    backbone = build_backbone(config.model, weights="none")
    try:
        own = backbone.body.state_dict().keys()  # runs saved before drop_unused_blocks hold blocks past the last stage
        backbone.body.load_state_dict({k: v for k, v in ckpt["backbone"].items() if k in own})
        model = build_model(config.model, backbone.out_channels)
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise AdtrError(f"{path}: weights do not fit the {config.model.backbone} model it names "
                        f"({first_line(exc)})") from exc
    return config, backbone, model


def split_train_val(samples: ImageSource, fraction: float, seed: int) -> tuple[ImageSource, ImageSource]:
    """Seeded hold-out of good images for monitoring and calibration (never test data).

    A positive ``fraction`` holds out at least one image: with none, fit would have no
    threshold and call every image good.
    """
    n_val = max(1, int(round(len(samples) * fraction))) if fraction > 0 else 0
    if len(samples) - n_val < 1:
        raise AdtrError(f"need at least 2 training images to hold out {fraction:.0%}, got {len(samples)}")
    order = np.random.default_rng(seed).permutation(len(samples))
    is_val = np.zeros(len(samples), dtype=bool)
    is_val[order[:n_val]] = True
    if isinstance(samples, np.ndarray):
        return samples[~is_val], samples[is_val]
    train = [s for i, s in enumerate(samples) if not is_val[i]]
    val = [s for i, s in enumerate(samples) if is_val[i]]
    return train, val


def lr_factor(schedule: str, step: int, total: int, warmup: int, step_at: float = 0.8) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``.

    ``step``: the paper's schedule, x0.1 from ``step_at`` of training on (ADTR: 400 of
    500 epochs; ADTR+: the last 100 of 300).
    ``warmup-cosine``: linear warm-up, then cosine decay to 1% (ours: converges in far
    fewer epochs at a higher base rate).
    ``warmup-stable-decay``: linear warm-up, the full rate until ``step_at``, then a linear
    decay to 1% (Hägele et al., 2024): more steps at the full rate than cosine for the same
    budget.
    """
    if schedule == "step":
        return 0.1 if step >= int(step_at * total) else 1.0
    if schedule not in SCHEDULES:
        raise AdtrError(f"unknown schedule {schedule!r} (use one of {', '.join(SCHEDULES)})")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "warmup-stable-decay":
        decay_start = full_rate_end(schedule, total, warmup, step_at)
        if step < decay_start:
            return 1.0
        return 1.0 - 0.99 * min(1.0, (step - decay_start) / max(1, total - decay_start))
    progress = (step - warmup) / max(1, total - warmup)  # warmup-cosine
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def full_rate_end(schedule: str, total: int, warmup: int, step_at: float = 0.8) -> int:
    """The step at which :func:`lr_factor` leaves the peak rate for good: ``step``'s division,
    ``warmup-stable-decay``'s decay, ``warmup-cosine``'s end of warm-up. Until then the total
    step count can change without the rate ever going back up."""
    if schedule == "step":
        return int(step_at * total)
    if schedule == "warmup-stable-decay":
        return max(warmup, int(step_at * total))
    return warmup


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays off on GPUs that support it and on CPUs with AMX or AVX-512-BF16 units."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where it is fast on this hardware, else ``fp32``."""
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for the transformer (``fp32`` is the reference: no autocast)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise AdtrError(f"unknown precision {precision!r} (use auto, fp32 or bf16)")


def newton_schulz_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Muon orthogonalises in the training precision: bf16 where autocast trains in bf16 (a
    Muon step of the default model about 280 -> 155 ms on a 2-core Zen 4 CPU), fp32 for the
    fp32 reference.
    """
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else torch.float32


def fit_optimizer(model: ADTR, cfg: TrainConfig, device: torch.device, lr: float | None = None,
                  precision: str | None = None) -> torch.optim.Optimizer | MuonAdamW:
    """The optimiser `fit` trains ``model`` with, built from ``cfg`` in one place so that the
    epoch estimate and the benchmarks time the same one (``lr`` and ``precision`` override
    ``cfg``'s, for a throwaway probe and for timing each precision).
    """
    precision = cfg.precision if precision is None else precision
    return make_optimizer(model, cfg.lr if lr is None else lr, cfg.weight_decay, device, cfg.optimizer,
                          cfg.muon_rms, newton_schulz_dtype(precision, device))


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Shuffled batches for one epoch, a pure function of (seed, epoch) so resume is exact."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    # Drop a ragged last batch only when it would be tiny; keep all data for small sets.
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size // 2:
        batches = batches[:-1]
    return batches


@torch.no_grad()
def mean_loss(model: ADTR, feats: torch.Tensor, device: torch.device, precision: str, batch_size: int = 32) -> float:
    """Mean L_norm over a feature set (validation monitoring)."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(feats), batch_size):
        x = feats[i:i + batch_size].to(device)
        with autocast(precision, device):
            out = model(x)
        total += float(reconstruction_loss(out)) * len(x)
        n += len(x)
    return total / max(n, 1)


@torch.no_grad()
def score_features(model: ADTR, feats: torch.Tensor, image_size: int, score: ScoreConfig,
                   device: torch.device, precision: str = "fp32", batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel maps (N, H, W) and image scores (N,) from cached features."""
    model.eval()
    maps, scores = [], []
    for i in range(0, len(feats), batch_size):
        with autocast(precision, device):
            out = model(feats[i:i + batch_size].to(device))
        pmap = pixel_anomaly_map(out.anomaly_map, (image_size, image_size), score.sigma)
        maps.append(pmap[:, 0].cpu())
        scores.append(image_score(pmap, score.pool_size).cpu())
    return torch.cat(maps), torch.cat(scores)


def image_list(samples: ImageSource) -> list[str]:
    """Absolute image paths (a digest for an image array, one per array of a list), stored so a
    resume uses the same data."""
    if isinstance(samples, np.ndarray):
        return [array_digest(samples)]
    return [array_digest(s) if isinstance(s, np.ndarray) else str(Path(s.image).resolve()) for s in samples]


def array_digest(images: np.ndarray) -> str:
    return f"array:{images.shape}:{hashlib.sha1(np.ascontiguousarray(images).data).hexdigest()}"


@dataclass
class FitResult:
    """What a fit wrote to ``run_dir/model.pt``; ``Detector.load(result.run_dir)`` scores with it."""

    run_dir: Path
    epochs: int  # trained (fewer than planned when stopped early by patience or the budget)
    seconds: float  # feature caching and training
    # one entry per epoch: epoch, train_loss, lr, seconds (cumulative training time), epochs_planned,
    # and val_loss (the mean reconstruction loss of the held-out good images) when some are held out
    history: list[dict[str, float]]
    threshold: float  # the image threshold (inf when no image was held out: every image is good)
    selected_epoch: int  # the epoch whose weights were kept (--select)
    calibration: dict[str, Any] = field(default_factory=dict, repr=False)  # as saved in model.pt

    def detector(self, device: str | torch.device | None = None, **options: Any) -> Detector:
        """The fitted run, ready to score: ``Detector.load(self.run_dir, device, **options)``."""
        from adtr.detector import Detector  # detector imports engine

        return Detector.load(self.run_dir, device, **options)


def estimate_epochs(model: ADTR, feats: torch.Tensor, cfg: TrainConfig, device: torch.device,
                    spent_seconds: float = 0.0) -> int:
    """Epochs that fit in what is left of ``cfg.max_minutes`` (the whole fit's budget, of which
    ``spent_seconds`` went to feature caching), from timing a few steps on a throwaway copy.

    A first guess: `fit` re-plans after its first epoch, from that epoch's measured time.
    """
    if cfg.max_minutes <= 0:
        return cfg.epochs
    probe = copy.deepcopy(model).train()
    opt = fit_optimizer(probe, cfg, device, lr=0.0)  # lr 0: the probe's steps change nothing
    bs = min(cfg.batch_size, len(feats))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        with autocast(cfg.precision, device):
            out = probe(feats[:bs].to(device))
        loss = reconstruction_loss(out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = min(times[1:])  # the first step pays for one-off allocation
    steps_per_epoch = len(batch_order(len(feats), cfg.batch_size, 0, 0))
    epochs = int((cfg.max_minutes * 60 - spent_seconds) / (step_s * steps_per_epoch * 1.05))
    return max(1, min(cfg.epochs, epochs))


class TrainingForward:
    """The model's forward pass in training, compiled by ``torch.compile`` with ``--compile``.

    Only full batches run the compiled graph (one static-shape compilation); a smaller last
    batch runs eagerly instead of compiling a second graph. Both paths share the model's
    parameters, so checkpoints, validation and selection see one model. :meth:`prepare`
    compiles before training starts, where a failure (no C++ compiler on the CPU, no Triton
    on a GPU) leaves eager training and a warning rather than a lost fit.
    """

    def __init__(self, model: ADTR, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size
        self.graph: Callable[[torch.Tensor], ADTROutput] | None = None

    def prepare(self, batch: torch.Tensor, precision: str, device: torch.device) -> float:
        """Compile forward and backward on ``batch`` (one untaken step); the seconds it took.

        The random state is restored afterwards (jitter draws noise), so a compiled fit and its
        resumed continuation draw the same numbers as without this step.
        """
        t = time.perf_counter()
        graph = torch.compile(self.model, dynamic=False)
        saved = rng_state(device)
        self.model.train()
        try:
            with autocast(precision, device):
                loss = reconstruction_loss(graph(batch.to(device)))
            loss.backward()
        except Exception as exc:  # noqa: BLE001 - a compiler failure is an environment problem, said in one line
            log.warning("%s; training without it", compile_failure(exc))
            graph = None
        finally:
            self.model.zero_grad(set_to_none=True)
            set_rng_state(saved, device)
        self.graph = graph
        return time.perf_counter() - t

    def __call__(self, x: torch.Tensor) -> ADTROutput:
        if self.graph is not None and len(x) == self.batch_size:
            return self.graph(x)
        return self.model(x)


#: A ``max_minutes`` fit re-plans its epoch count after every epoch, a longer plan only while
#: :func:`may_replan` allows it; each plan times an epoch as the median of this many latest epochs.
REPLAN_EPOCHS = 5


def may_replan(cfg: TrainConfig, done: int, steps_per_epoch: int, total_steps: int, warmup: int) -> bool:
    """Whether a ``max_minutes`` fit may take a longer plan after ``done`` epochs (a shorter one
    it takes at any time): always over the first :data:`REPLAN_EPOCHS`, then for as long as
    the rate has not left its peak (:func:`full_rate_end`), which for ``warmup-stable-decay``
    (the default) is most of the fit.
    A plan drawn from a slow first few minutes (other work on a shared machine) would otherwise
    leave the rest of the budget unused: a 40-minute bottle fit on the Intel CPU timed its first
    epochs at 11-16 s and the rest at about 11.7 s, and ended after 30 minutes. Once the rate decays
    the plan may only shrink (``fit``), so that a longer one never sends the rate back up."""
    return done <= REPLAN_EPOCHS or done * steps_per_epoch < full_rate_end(cfg.schedule, total_steps, warmup,
                                                                           cfg.step_at)


def replan_epochs(cfg: TrainConfig, elapsed_seconds: float, epoch_seconds: float, reserve_seconds: float,
                  done: int = 1) -> int:
    """Epochs for a ``max_minutes`` budget once ``done`` whole epochs (training and validation)
    have been timed, ``epoch_seconds`` being the median of the latest :data:`REPLAN_EPOCHS` of
    them: the step probe misses those overheads, so this is the estimate that keeps the fit,
    features and calibration included, within the budget. ``fit`` re-plans after each of the first
    :data:`REPLAN_EPOCHS` epochs, so that a first epoch faster than the rest does not plan a
    schedule that the budget then cuts short before its learning rate has decayed, and on
    while the rate is at its peak (:func:`may_replan`), so that slower first epochs do not
    leave the budget unspent. After that it takes only a plan shorter than the one it has: a
    machine that slows down during the decay then ends the decay sooner instead of being cut
    off in it (a 40-minute grid fit on the Intel CPU stopped 3 epochs short of its plan)."""
    left = cfg.max_minutes * 60 - elapsed_seconds - reserve_seconds
    return max(done, min(cfg.epochs, done + int(left / max(epoch_seconds, 1e-9))))


PLUS_LOSSES = ("pixel", "image")
PLUS_SOURCES = ("confetti", "defects", "outliers")


def check_plus(plus: PlusConfig, anomalies: ImageSource | None) -> None:
    """Refuse an inconsistent ADTR+ set-up before any work is done."""
    if plus.loss not in PLUS_LOSSES:
        raise AdtrError(f"unknown ADTR+ loss {plus.loss!r} (use {' or '.join(PLUS_LOSSES)})")
    if plus.source not in PLUS_SOURCES:
        raise AdtrError(f"unknown anomaly source {plus.source!r} (use {', '.join(PLUS_SOURCES)})")
    if not plus.init:
        raise AdtrError("ADTR+ fine-tunes a trained ADTR run: give it with --init RUN")
    if plus.source != "confetti" and anomalies is None:
        flag = "--defects" if plus.source == "defects" else "--outliers"
        raise AdtrError(f"anomaly source {plus.source!r} needs its images ({flag} DIR)")
    if plus.loss == "pixel" and plus.source == "outliers":
        raise AdtrError("outlier images carry only image labels: use --plus image with --outliers")
    if not 0.0 <= plus.anomaly_prob <= 1.0:
        raise AdtrError(f"anomaly probability must be in [0, 1], got {plus.anomaly_prob}")
    if plus.topk < 1 or plus.alpha <= 0 or plus.variants < 1 or plus.refresh_every < 0:
        raise AdtrError("ADTR+ needs topk >= 1, alpha > 0, variants >= 1 and refresh_every >= 0")


def plus_loss(output: ADTROutput, pixel_labels: torch.Tensor, image_labels: torch.Tensor,
              plus: PlusConfig) -> torch.Tensor:
    """L_px (Eq. 6-7) or L_img (Eq. 8-9) of a batch whose anomalous samples are labelled."""
    phi = pseudo_huber_map(output.features, output.reconstruction)  # (B, h, w)
    if plus.loss == "pixel":
        return pixel_push_pull_loss(phi, pixel_labels, plus.alpha)
    return image_push_pull_loss(phi, image_labels, plus.topk, plus.alpha)


def nothing_to_resume(run_dir: Path) -> bool:
    """``fit --resume`` where there is no ``last.pt``: False (start afresh) or an error.

    A folder without ``last.pt`` or ``model.pt`` is one where a fit was interrupted before
    its first checkpoint (while caching features, which is redone anyway): nothing of value
    is lost by starting again, so the same command goes on with a fresh start rather than
    making the user retype it. A missing folder is more likely a mistyped ``--out`` and a
    finished run has nothing left to do: those stay errors.
    """
    if not run_dir.is_dir():
        raise AdtrError(f"{run_dir}: nothing to resume (no such folder); to start this run, drop --resume")
    if (run_dir / ckpt_io.MODEL_FILE).is_file():
        raise AdtrError(f"{run_dir}: nothing to resume (no {ckpt_io.LAST_FILE}): its training already finished")
    log.warning("%s: nothing to resume (interrupted before its first checkpoint): starting afresh", run_dir)
    return False


def remove_stale_temp_files(run_dir: Path) -> None:
    """Half-written temporary files of checkpoint writes that were killed (never read back)."""
    for name in (ckpt_io.LAST_FILE, ckpt_io.MODEL_FILE):
        for tmp in run_dir.glob(f".{name}.*.tmp"):
            log.info("removing %s, left by an interrupted checkpoint write", tmp)
            tmp.unlink(missing_ok=True)


def holds_training(run_dir: Path) -> bool:
    """Whether a run folder holds work worth keeping: ``model.pt``, or a ``last.pt`` past
    epoch 0 (the epoch-0 one only saves redoing the set-up: a first epoch that diverges
    leaves no folder that would refuse a rerun with other options)."""
    if (run_dir / ckpt_io.MODEL_FILE).exists():
        return True
    last = run_dir / ckpt_io.LAST_FILE
    if not last.exists():
        return False
    try:
        return ckpt_io.load_checkpoint(last)["epoch"] > 0
    except AdtrError:
        return True  # not ours to delete


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global random state, saved with each training checkpoint."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(ckpt: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state` (absent in older checkpoints: nothing to do)."""
    if "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"])
    if "cuda_rng" in ckpt and device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)


def fit(config: RunConfig, samples: TrainingInput, run_dir: str | Path, resume: bool = False,
        device: str | torch.device | None = None, on_epoch: Callable[[dict[str, float]], None] | None = None,
        anomalies: ImageSource | None = None) -> FitResult:
    """Train ADTR on good images and write a calibrated ``run_dir/model.pt`` (see :func:`_fit`).

    ``samples``: a folder (a MVTec category with ``train/good``, or a folder of good images,
    as ``adtr fit``), a list of good :class:`~adtr.data.Sample` or of paths, an image array
    (N, H, W) or (N, H, W, C), RGB(A), channels last, with C 1, 3 or 4, or a list of images
    (PIL, numpy, torch), each read as ``Detector.predict`` reads it
    (:func:`adtr.data.inputs.training_images`). Defective samples are refused.
    A bad input found before anything resumable was saved (an image that does not decode,
    say), or any other failure then, removes the run folder again if this call created it:
    no half-made run is left. ``device``: ``cpu``, ``cuda``, ``cuda:N``; None picks CUDA when present.
    """
    samples = training_images(samples)
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        return _fit(config, samples, run_dir, resume, device, on_epoch, anomalies)
    except Exception:  # not KeyboardInterrupt: the printed --resume command must find the folder
        saved = holds_training(run_dir)
        if created and not saved:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _fit(config: RunConfig, samples: ImageSource, run_dir: Path, resume: bool = False,
         device: torch.device | None = None, on_epoch: Callable[[dict[str, float]], None] | None = None,
         anomalies: ImageSource | None = None) -> FitResult:
    """Train ADTR on good images and write a calibrated ``run_dir/model.pt``.

    With ``config.plus.loss`` set, this is ADTR+ (section 3.3): the model of the run
    ``config.plus.init`` is fine-tuned with the push-pull loss, on batches where each good
    sample is replaced by a labelled anomaly with probability ``plus.anomaly_prob``. The
    anomalies are confetti drawn from the training images, or ``anomalies`` (defective
    samples with masks, or outlier images).
    """
    device = resolve_device(device)
    run_dir = Path(run_dir)
    last_path = run_dir / ckpt_io.LAST_FILE
    state: dict[str, Any] | None = None
    images = image_list(samples)  # resolved once; stored in every training checkpoint
    if resume and not last_path.is_file():
        resume = nothing_to_resume(run_dir)
    if resume:
        state = ckpt_io.load_checkpoint(last_path)
        saved = from_dict(state["config"])
        # An ADTR+ run's model section is its init run's, whatever was asked.
        sections = ("train", "score", "plus") if saved.plus.loss != "none" else ("model", "train", "score", "plus")
        ignored = resume_ignores(config, saved, sections)
        if ignored:
            log.warning("resuming %s with its own config; ignored: %s", run_dir, "; ".join(ignored))
        config = saved  # the run's own config wins: a resumed run ends as the uninterrupted one would
        if state.get("images") != images:
            raise AdtrError(f"{last_path}: was started on other training images (or the same in another order, "
                            "which changes every batch); resume with the same folder")
    elif (run_dir / ckpt_io.MODEL_FILE).exists() or last_path.exists():
        raise AdtrError(f"{run_dir}: already holds a run; use --resume to continue it or pick a new folder")
    plus = config.plus if config.plus.loss != "none" else None
    init_model: ADTR | None = None
    if plus is not None:
        check_plus(plus, anomalies)
        init_path = ckpt_io.find_run_file(Path(plus.init))
        init_config, backbone, init_model = restore_networks(ckpt_io.load_checkpoint(init_path), init_path)
        config = dataclasses.replace(config, model=init_config.model)  # the architecture is the init run's
        held_out = (init_config.train.seed, init_config.train.val_fraction)
        if (config.train.seed, config.train.val_fraction) != held_out:
            # Another split would hold out images the init run trained on: a threshold too low.
            raise AdtrError(f"{init_path}: ADTR+ must hold out the images its init run held out; that run used "
                            f"--seed {held_out[0]} --val-fraction {held_out[1]}, this one --seed "
                            f"{config.train.seed} --val-fraction {config.train.val_fraction}")
    tc, mc = config.train, config.model
    torch.manual_seed(tc.seed)
    t0 = time.perf_counter()

    train_samples, val_samples = split_train_val(samples, tc.val_fraction, tc.seed)
    if not len(val_samples):
        log.warning("no held-out good images (val fraction 0): no image threshold, so every image will be "
                    "called good until `adtr calibrate RUN --data DIR` sets one; nothing selects "
                    "the best epoch either (the last is kept)")
    if plus is None:
        backbone = build_backbone(mc)
    grid = backbone.grid_size(mc.image_size)  # validates the stride
    backbone.to(device)
    # The folder exists from here on, so a fit killed while caching features can be rerun
    # with --resume (see nothing_to_resume); leftovers of a killed checkpoint write go now.
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(run_dir)
    cache = run_dir / "cache" / "train_features.npy"
    train_feats = extract_features(backbone, train_samples, mc.image_size, device, tc.feature_cache, cache,
                                   desc="caching train features")
    val_feats = extract_features(backbone, val_samples, mc.image_size, device, "memory",
                                 desc="caching val features") if len(val_samples) else None
    pool: AnomalyPool | None = None
    pool_draw, clean_images = -1, None
    if plus is not None and plus.source != "confetti":
        pool = labelled_pool(backbone, anomalies, mc.image_size, grid, device, need_masks=plus.loss == "pixel")
    elif plus is not None:
        clean_images = decode_images(train_samples, mc.image_size)
    feature_seconds = time.perf_counter() - t0

    if init_model is not None:
        model = init_model  # ADTR+ starts from the trained ADTR (its feature statistics included)
    else:
        model = build_model(mc, backbone.out_channels)
        model.set_feature_stats(train_feats)
    model.to(device)
    opt = fit_optimizer(model, tc, device)
    history: list[dict[str, float]] = []
    # The model with the lowest held-out reconstruction error (Eq. 1 on good images only):
    # past it the transformer starts to memorise the training images and detection degrades.
    best: dict[str, Any] = {"epoch": 0, "val_loss": math.inf, "model": None}
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        epochs, start_epoch, history = state["epochs"], state["epoch"], state["history"]
        train_seconds, best = state["train_seconds"], state["best"]
        set_rng_state(state, device)
    else:
        start_epoch, train_seconds = 0, 0.0
    forward = TrainingForward(model, min(tc.batch_size, len(train_feats)))
    if tc.compile:
        seconds = forward.prepare(train_feats[:forward.batch_size], tc.precision, device)
        if forward.graph is not None:
            log.info("compiled the training step in %.1f s", seconds)
    if state is None:
        epochs = estimate_epochs(model, train_feats, tc, device, spent_seconds=time.perf_counter() - t0)

    def save_last(done: int) -> None:
        """The resumable state after ``done`` epochs (and the random state, for dropout and jitter)."""
        ckpt_io.atomic_save({
            "format_version": ckpt_io.FORMAT_VERSION, "kind": "training", "config": to_dict(config),
            "versions": ckpt_io.versions(), "model": model.state_dict(), "optimizer": opt.state_dict(),
            "epoch": done, "epochs": epochs, "warmup_steps": warmup, "history": history,
            "train_seconds": train_seconds,
            "best": best, "images": images, **rng_state(device),
        }, last_path)

    steps_per_epoch = len(batch_order(len(train_feats), tc.batch_size, tc.seed, 0))
    total_steps = epochs * steps_per_epoch
    # Kept in the checkpoint: a re-planned budget fixes the warm-up when it ends, not at its final plan.
    warmup = int(tc.warmup_fraction * total_steps)
    if state is not None:
        warmup = state.get("warmup_steps", warmup)
    else:
        # Epoch 0: from now on the folder holds a resumable run, so Ctrl-C or a kill during the
        # first epoch loses no more than that epoch (resuming from it equals a fresh start).
        save_last(0)
    saved_at = time.perf_counter()
    log.info("training %d epochs x %d steps on %d images (%d held out)", epochs, steps_per_epoch,
             len(train_samples), len(val_samples))

    bar = EpochProgress("fit+" if plus else "fit", start_epoch, epochs)
    epoch_times: list[float] = []  # wall time of each epoch run by this call
    for epoch in itertools.count(start_epoch):  # ``epochs`` may be re-planned (may_replan)
        if epoch >= epochs:
            break
        te = time.perf_counter()
        record: dict[str, float] = {"epoch": epoch + 1}
        if clean_images is not None:
            draw = epoch // plus.refresh_every if plus.refresh_every else 0
            if draw != pool_draw:  # a pure function of (seed, draw): resume redraws the same pool
                tp = time.perf_counter()
                pool = confetti_pool(backbone, clean_images, grid, plus.variants, tc.seed, draw, device)
                pool_draw = draw
                record["pool_seconds"] = time.perf_counter() - tp
        mixer = torch.Generator().manual_seed(tc.seed * 7919 + epoch + 1)
        model.train()
        losses = []
        for i, idx in enumerate(batch_order(len(train_feats), tc.batch_size, tc.seed, epoch)):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = tc.lr * lr_factor(tc.schedule, step, total_steps, warmup, tc.step_at)
            x = train_feats[idx]
            if pool is not None:
                x, pixel_labels, image_labels = mix_anomalies(x, pool, plus.anomaly_prob, mixer)
            with autocast(tc.precision, device):
                out = forward(x.to(device, non_blocking=True))
            if pool is not None:
                loss = plus_loss(out, pixel_labels.to(device), image_labels.to(device), plus)
            else:
                loss = reconstruction_loss(out)
            if not torch.isfinite(loss):
                raise AdtrError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            losses.append(loss.item())
        train_seconds += time.perf_counter() - te
        record.update({"train_loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
                       "seconds": train_seconds})
        if val_feats is not None:
            tv = time.perf_counter()
            record["val_loss"] = mean_loss(model, val_feats, device, tc.precision)
            val_seconds = time.perf_counter() - tv
            if record["val_loss"] < best["val_loss"]:
                best = {"epoch": epoch + 1, "val_loss": record["val_loss"],
                        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        # Calibration scores the held-out images once more, at full resolution: reserve
        # twice a validation pass for it.
        reserve = 2 * val_seconds if val_feats is not None else 0.0
        epoch_seconds = time.perf_counter() - te
        epoch_times.append(epoch_seconds)
        if tc.max_minutes > 0 and start_epoch == 0:  # also resumed from epoch 0
            replanned = replan_epochs(tc, time.perf_counter() - t0, float(np.median(epoch_times[-REPLAN_EPOCHS:])),
                                      reserve, done=epoch + 1)
            # At the peak rate the plan follows the machine both ways; once the rate decays it may
            # only shrink, which brings the decay forward (the rate falls sooner, never rises).
            if replanned < epochs or (replanned > epochs and may_replan(tc, epoch + 1, steps_per_epoch,
                                                                         total_steps, warmup)):
                log.log(logging.INFO if epoch < REPLAN_EPOCHS else logging.DEBUG,
                        "budget of %g min: %d epochs instead of %d, after %d epochs", tc.max_minutes, replanned,
                        epochs, epoch + 1)
                epochs, total_steps = replanned, replanned * steps_per_epoch
                if (epoch + 1) * steps_per_epoch < warmup:  # still warming up: the ramp follows the plan
                    warmup = int(tc.warmup_fraction * total_steps)
                bar.replan(epochs)
        record["epochs_planned"] = epochs
        history.append(record)
        bar.epoch_done(record)
        if on_epoch is not None:
            on_epoch(record)
        stop = epoch + 1 >= epochs
        if not stop and tc.max_minutes > 0 and time.perf_counter() - t0 + epoch_seconds + reserve > tc.max_minutes * 60:
            # The machine got slower than planned (other work on it): keep the promise of the
            # budget; the best validated epoch so far is kept.
            log.warning("the %g-minute budget is spent: stopping after %d of %d epochs", tc.max_minutes,
                        epoch + 1, epochs)
            stop = True
        if not stop and tc.patience and val_feats is not None and epoch + 1 - best["epoch"] >= tc.patience:
            log.info("stopping: no improvement of the validation loss for %d epochs", tc.patience)
            stop = True
        if stop:
            # An early stop (budget, patience) ends the plan here, so that a fit killed while
            # calibrating resumes straight to calibration instead of training on.
            epochs = epoch + 1
        # Writing last.pt (about 125 MB for the default model) took 0.3-1 s on the 2-core CPU and
        # 0.36 s of every 0.76 s epoch on an H200: short epochs are checkpointed every
        # ``checkpoint_seconds`` instead, and the final one always (a fit killed while
        # calibrating then resumes without training again).
        if stop or time.perf_counter() - saved_at >= tc.checkpoint_seconds:
            save_last(epoch + 1)
            saved_at = time.perf_counter()
        if stop:
            break
    bar.close()

    use_best = tc.select == "best-val" and best["model"] is not None
    if use_best:
        model.load_state_dict(best["model"])
        log.info("selected epoch %d (validation loss %.4f)", best["epoch"], best["val_loss"])
    selected_epoch = best["epoch"] if use_best else len(history)

    # Calibration on held-out good images only (never test data).
    if val_feats is not None:
        val_maps, val_scores = score_features(model, val_feats, mc.image_size, config.score, device)
    else:
        val_maps, val_scores = torch.empty(0), torch.empty(0)
    calibration = fpr_calibration(val_maps, val_scores, config.score.target_fpr, config.score.threshold_rule)
    calibration["selected_epoch"] = selected_epoch
    threshold = calibration["threshold"]
    seconds = feature_seconds + train_seconds
    save_model(run_dir / ckpt_io.MODEL_FILE, config, backbone, model, calibration, history, seconds)
    last_path.unlink(missing_ok=True)
    if cache.exists():
        cache.unlink()
    return FitResult(run_dir, len(history), seconds, history, threshold, selected_epoch, calibration)


def fpr_calibration(val_maps: torch.Tensor, val_scores: torch.Tensor, target_fpr: float,
                    rule: str = "quantile") -> dict[str, Any]:
    """Image and pixel thresholds at ``target_fpr`` from held-out good images only.

    ``threshold`` and ``pixel_threshold`` are the active ones; ``*_fpr`` keep the
    target-FPR values so that an F1-optimal calibration (``adtr calibrate``) can be undone.
    ``rule`` applies to the image threshold; the pixel one is a plain quantile over many
    thousands of pixels, where interpolation between neighbours changes nothing measurable.
    """
    image_thr = quantile_threshold(val_scores, target_fpr, rule)
    pixel_thr = pixel_quantile_threshold(val_maps, target_fpr)
    return {"mode": "fpr", "target_fpr": target_fpr, "threshold_rule": rule,
            "threshold": image_thr, "threshold_fpr": image_thr,
            "pixel_threshold": pixel_thr, "pixel_threshold_fpr": pixel_thr,
            "val_scores": val_scores.tolist(), "val_images": int(val_scores.numel())}


def save_model(path: Path, config: RunConfig, backbone: FrozenBackbone | PixelPatches, model: ADTR,
               calibration: dict[str, Any], history: list[dict[str, float]], fit_seconds: float) -> None:
    """The finished, self-contained model: predict needs nothing else (not even the weights package)."""
    ckpt_io.atomic_save({
        "format_version": ckpt_io.FORMAT_VERSION, "kind": "model", "config": to_dict(config),
        "versions": ckpt_io.versions(), "backbone_name": config.model.backbone,
        "backbone": {k: v.cpu() for k, v in backbone.body.state_dict().items()},
        "model": {k: v.cpu() for k, v in model.state_dict().items()},
        "calibration": calibration, "history": history, "fit_seconds": fit_seconds,
    }, path)
