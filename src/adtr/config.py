"""Typed configuration: what a run is, saved with its weights.

Defaults follow the paper (section 4.2, appendix A) except where a choice is ours,
which the field's comment says. The CLI fills these dataclasses; the checkpoint
stores them, so predict and export rebuild the model from the run alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from adtr.errors import AdtrError

#: Inference engines of ``Detector.load`` and ``adtr predict/serve --engine``.
ENGINES = ("torch", "onnx", "compile")
#: Precisions of ``Detector.load`` and ``adtr predict/serve/test --precision`` (besides ``auto``);
#: int8 with the compile engine only (see ``adtr.quantize``).
INFERENCE_PRECISIONS = ("fp32", "bf16", "int8")
#: Reconstruction networks (``ModelConfig.reconstructor``): the paper's model and its Table-4 ablations.
RECONSTRUCTORS = ("transformer", "no-attention", "no-query", "cnn")
#: Initial values of the learned position embedding (``ModelConfig.pos_init``; see ``adtr.models.adtr.ADTR``).
POS_INITS = ("uniform", "sincos", "normal", "fourier")
#: Learning-rate schedules (``TrainConfig.schedule``; see ``adtr.engine.lr_factor``).
SCHEDULES = ("warmup-cosine", "step", "warmup-stable-decay")
#: Initial key projections of the decoder's cross-attention (``ModelConfig.cross_init``).
CROSS_INITS = ("independent", "aligned", "aligned-last")
#: Optimisers (``TrainConfig.optimizer``; see ``adtr.optim.make_optimizer``).
OPTIMIZERS = ("adamw", "muon")
#: Where the reconstruction error is measured (``ModelConfig.error_space``).
ERROR_SPACES = ("features", "standardized")
#: What the transformer reconstructs (``ModelConfig.target``; pixels is a Table-4 ablation).
TARGETS = ("features", "pixels")
#: Training precisions (``TrainConfig.precision``; auto = bf16 where it is fast).
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
#: Which epoch a fit keeps (``TrainConfig.select``).
SELECTIONS = ("best-val", "last")
#: Where the cached training features live (``TrainConfig.feature_cache``).
FEATURE_CACHES = ("auto", "memory", "disk")
#: Rules that turn held-out good scores into the image threshold (``ScoreConfig.threshold_rule``;
#: see ``adtr.postprocess.quantile_threshold``).
THRESHOLD_RULES = ("quantile", "conformal")


def refuse_failed_checks(section: str, config: Any, checks: tuple[tuple[str, bool, str, str], ...]) -> None:
    """Raise for the first (field, passed, requirement, CLI flag or "") check that failed."""
    for name, ok, requirement, flag in checks:
        if not ok:
            where = f"{section}.{name} ({flag})" if flag else f"{section}.{name}"
            raise AdtrError(f"{where} must be {requirement}, got {getattr(config, name)}")


def one_of(name: str, value: Any, allowed: tuple[str, ...], flag: str) -> tuple[str, bool, str, str]:
    """A check for :func:`refuse_failed_checks`: ``value`` must be one of ``allowed``."""
    return name, value in allowed, f"one of {', '.join(allowed)}", flag


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and reconstruction transformer."""

    backbone: str = "tf_efficientnet_lite0"  # paper: tf_efficientnet_b4 (hub weights)
    weights: str = "packaged"  # packaged | hub | none | path to a state-dict file
    stages: tuple[int, ...] = (1, 2, 3)  # ours: strides 4-16 (PaDiM's); paper: layers 1-5 (0-4), which localise worse
    grid_stride: int = 16  # 16x16 grid at 256x256 (section 4.2)
    image_size: int = 256
    dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.0  # ours: the paper gives none; 0.1 (DETR) costs 1.5x per step on CPU
    error_space: str = "features"  # features (Eq. 1-3 as written) | standardized (per-channel std units)
    # Table 4 ablations: transformer | no-attention (concatenation + projection) | no-query (the decoder
    # is fed the encoder output) | cnn (ResNet-style conv stack of similar size)
    reconstructor: str = "transformer"
    target: str = "features"  # features (paper) | pixels (Table 4 ablation: reconstruct stride x stride patches)
    neighbour_mask: int = 0  # ours, off: odd k hides each token's k x k neighbourhood in every attention (UniAD)
    jitter: float = 20.0  # ours (UniAD's value): training noise on the tokens, so stages 1-3 cannot learn to copy; paper: 0
    pos_init: str = "normal"  # ours: N(0, 1) codes, nearly orthogonal, so training converges sooner; DETR: uniform
    cross_init: str = "independent"  # decoder cross-attention keys: independent (DETR) | aligned (W_k = W_q at init)
    cells_per_token: int = 1  # ours: a token embeds p x p grid cells (ViT patch); paper: 1

    def __post_init__(self) -> None:
        """Refuse sizes that would fail deep inside torch (a zero stride divides by zero); the
        options that need the backbone or the grid are checked when the model is built."""
        checks = (
            ("image_size", self.image_size >= 1, "at least 1", "--image-size"),
            ("grid_stride", self.grid_stride >= 1, "at least 1", "--grid-stride"),
            ("stages", len(self.stages) >= 1, "at least one stage", "--stages"),
            ("dim", self.dim >= 1, "at least 1", ""),
            ("num_heads", self.num_heads >= 1, "at least 1", ""),
            ("num_encoder_layers", self.num_encoder_layers >= 1, "at least 1", ""),
            ("num_decoder_layers", self.num_decoder_layers >= 1, "at least 1", ""),
            ("ffn_dim", self.ffn_dim >= 1, "at least 1", ""),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)", "--dropout"),
            ("cells_per_token", self.cells_per_token >= 1, "at least 1", "--cells-per-token"),
            one_of("error_space", self.error_space, ERROR_SPACES, "--error-space"),
            one_of("reconstructor", self.reconstructor, RECONSTRUCTORS, "--reconstructor"),
            one_of("target", self.target, TARGETS, "--target"),
            one_of("pos_init", self.pos_init, POS_INITS, "--pos-init"),
            one_of("cross_init", self.cross_init, CROSS_INITS, "--cross-init"),
            ("neighbour_mask", self.neighbour_mask >= 0, "0 (off) or an odd size", "--neighbour-mask"),
            ("jitter", self.jitter >= 0, "0 (off) or more", "--jitter"),
        )
        refuse_failed_checks("model", self, checks)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of L_norm (Eq. 1)."""

    epochs: int = 60  # ours, with best-val selection: ~10 min per MVTec category on 2 AMX cores (paper: 500)
    batch_size: int = 8  # ours: twice the updates per epoch, faster to the same quality (paper: 16)
    lr: float = 5e-4  # ours, after a linear warm-up (paper: 1e-4 with its step schedule)
    weight_decay: float = 1e-4  # paper
    optimizer: str = "muon"  # ours: Muon on the transformer's matrices, AdamW on the rest | adamw (paper)
    muon_rms: float = 0.8  # ours: RMS of a Muon update per unit of lr, 4x AdamW's 0.2 (Liu et al., 2025)
    # warmup-stable-decay (ours: the most steps at the peak rate in a short budget) | warmup-cosine | step (paper)
    schedule: str = "warmup-stable-decay"
    step_at: float = 0.8  # fraction of training after which ``step`` divides lr by 10 (paper: 400/500) or WSD decays
    warmup_fraction: float = 0.05  # ours: share of the steps over which the warmup-* schedules ramp lr up from 0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    val_fraction: float = 0.1  # held-out good images for monitoring and calibration
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where the hardware has fast bf16) | fp32 | bf16; training only
    select: str = "best-val"  # best-val (lowest held-out L_norm; ours) | last (the paper's final epoch)
    patience: int = 0  # stop after this many epochs without a better validation loss; 0 = never
    max_minutes: float = 0.0  # wall-clock budget for the epochs; 0 = none
    feature_cache: str = "auto"  # auto | memory | disk
    checkpoint_seconds: float = 30.0  # last.pt at the first epoch end this long after the previous; 0 = every epoch
    compile: bool = False  # ours: torch.compile the training forward and backward (a one-off compilation first)

    def __post_init__(self) -> None:
        """Refuse values that would fail deep inside training, naming the field and its CLI flag."""
        checks = (
            ("epochs", self.epochs >= 1, "at least 1", "--epochs"),
            ("batch_size", self.batch_size >= 1, "at least 1", "--batch-size"),
            ("lr", self.lr > 0, "positive", "--lr"),
            one_of("schedule", self.schedule, SCHEDULES, "--schedule"),
            ("weight_decay", self.weight_decay >= 0, "0 or more", "--weight-decay"),
            one_of("optimizer", self.optimizer, OPTIMIZERS, "--optimizer"),
            ("muon_rms", self.muon_rms > 0, "positive", "--muon-rms"),
            ("step_at", 0 < self.step_at <= 1, "in (0, 1]", "--step-at"),
            ("warmup_fraction", 0 <= self.warmup_fraction < 1, "in [0, 1)", "--warmup-fraction"),
            ("grad_clip", self.grad_clip >= 0, "0 (off) or more", "--grad-clip"),
            ("val_fraction", 0 <= self.val_fraction < 1, "in [0, 1)", "--val-fraction"),
            ("patience", self.patience >= 0, "0 (off) or more", "--patience"),
            ("max_minutes", self.max_minutes >= 0, "0 (none) or more", "--max-minutes"),
            ("checkpoint_seconds", self.checkpoint_seconds >= 0, "0 or more", "--checkpoint-every"),
            one_of("precision", self.precision, TRAIN_PRECISIONS, "--precision"),
            one_of("select", self.select, SELECTIONS, "--select"),
            one_of("feature_cache", self.feature_cache, FEATURE_CACHES, "--feature-cache"),
        )
        refuse_failed_checks("train", self, checks)


@dataclass(frozen=True)
class ScoreConfig:
    """Anomaly map and image score (Eq. 2-3)."""

    # Gaussian smoothing of the upsampled map, pixels; 0 = off (ours: bilinear upsampling of the 16 px grid is
    # smooth already, and a further blur spreads errors past defect edges: AUPRO -0.2 to -0.35 points at
    # sigma 4 on both categories, benchmarks/results/score_options*.md; PatchCore and PaDiM use 4)
    sigma: float = 0.0
    pool_size: int = 32  # average-pool window (px) for the image score: 2x2 cells of the 16 px grid
    target_fpr: float = 0.01  # image threshold: the rate of held-out good images above it
    # quantile (the (1 - target_fpr) quantile; new good images exceed it more often than the target
    # when few are held out) | conformal (ours, opt-in: the order statistic that keeps the mean rate <= target)
    threshold_rule: str = "quantile"

    def __post_init__(self) -> None:
        """Refuse values that would fail only at calibration, after a whole training run."""
        checks = (
            ("sigma", self.sigma >= 0, "0 (off) or more", "--sigma"),
            ("pool_size", self.pool_size >= 1, "at least 1", "--pool-size"),
            ("target_fpr", 0 <= self.target_fpr < 1, "in [0, 1)", "--target-fpr"),
            one_of("threshold_rule", self.threshold_rule, THRESHOLD_RULES, "--threshold-rule"),
        )
        refuse_failed_checks("score", self, checks)


@dataclass(frozen=True)
class PlusConfig:
    """ADTR+ (section 3.3): fine-tune a trained ADTR run when some anomalies are known."""

    loss: str = "none"  # none (plain ADTR) | pixel (Eq. 6-7, needs pixel labels) | image (Eq. 8-9)
    init: str = ""  # run folder of the trained ADTR model to start from (paper: ADTR+ starts from ADTR)
    source: str = "confetti"  # confetti (synthetic, FCDD) | defects (real images with masks) | outliers
    data: str = ""  # folder of the defects or outlier images (recorded so a resume finds them again)
    masks: str = ""  # mask folder of a test-layout defects folder
    alpha: float = 0.003  # weight of the push term (paper)
    topk: int = 20  # k of the image-level score q (Eq. 8; paper: 20)
    anomaly_prob: float = 0.5  # chance that a sample is replaced by an anomaly (FCDD: 0.5); 0 = pull term only
    variants: int = 4  # confetti: corrupted variants per training image whose features are cached
    refresh_every: int = 10  # confetti: epochs between redraws of the cached variants; 0 = never


#: The paper's model where our defaults differ from it (all five stages, no feature jitter,
#: DETR's initialisation, which the paper inherits): the paper's protocols (CIFAR-10
#: one-class, the Table 4 ablations) run it.
PAPER_MODEL = {"stages": (0, 1, 2, 3, 4), "jitter": 0.0, "pos_init": "uniform", "cross_init": "independent"}
#: ... and the paper's optimiser: Muon takes only the transformer's matrices, so Table 4's
#: CNN and transformer would not train alike under it.
PAPER_TRAIN = {"optimizer": "adamw"}

#: ADTR+ training defaults: the paper's fine-tuning (AdamW, lr 1e-4, x0.1 for the last
#: third, final epoch) on a CPU-sized epoch budget (paper: 300 epochs). Overridable.
PLUS_TRAIN_DEFAULTS = {"epochs": 20, "lr": 1e-4, "optimizer": "adamw", "schedule": "step", "step_at": 2 / 3,
                       "warmup_fraction": 0.0, "select": "last", "max_minutes": 0.0, "patience": 0}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    plus: PlusConfig = field(default_factory=PlusConfig)


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise AdtrError(f"unknown config key(s) in {where}: {', '.join(unknown)} (known: {', '.join(known)})")
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


#: RMS of a typical AdamW update per unit of learning rate (Liu et al., 2025): the size of
#: a Muon update before ``--muon-rms``, and the default of ``adtr.optim.Muon``.
ADAMW_UPDATE_RMS = 0.2

#: What runs saved before a field existed used, where that differs from today's default.
SAVED_BEFORE_THE_FIELD = {"train": {"optimizer": "adamw", "muon_rms": ADAMW_UPDATE_RMS}}


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a :class:`RunConfig`, refusing unknown keys (runs saved before a section existed
    get its defaults; before a field existed, what :data:`SAVED_BEFORE_THE_FIELD` says they used)."""
    train = {**SAVED_BEFORE_THE_FIELD["train"], **data["train"]} if "train" in data else {}
    return RunConfig(
        model=_build(ModelConfig, data.get("model", {}), "model"),
        train=_build(TrainConfig, train, "train"),
        score=_build(ScoreConfig, data.get("score", {}), "score"),
        plus=_build(PlusConfig, data.get("plus", {}), "plus"),
    )


def resume_ignores(asked: RunConfig, saved: RunConfig, sections: tuple[str, ...],
                   only_non_default: bool = False) -> list[str]:
    """``section.field ASKED (run: SAVED)`` for each value of ``asked`` that differs from the run's
    ``saved`` one, which a resume keeps; with ``only_non_default``, only values that differ
    from today's defaults too (the options a command line actually gave)."""
    today = RunConfig()
    ignored = []
    for section in sections:
        wanted, kept, default = (dataclasses.asdict(getattr(c, section)) for c in (asked, saved, today))
        ignored += [f"{section}.{name} {value} (run: {kept[name]})" for name, value in wanted.items()
                    if value != kept[name] and not (only_non_default and value == default[name])]
    return ignored


def plus_config(base: RunConfig, **plus: Any) -> RunConfig:
    """The config of an ADTR+ run started from a run configured as ``base``: its model and
    scoring, ADTR+ training defaults, and ``plus`` (e.g. ``loss='pixel', init='runs/bottle'``)."""
    if base.plus.loss != "none":
        raise AdtrError("start ADTR+ from a plain ADTR run, not from another ADTR+ run")
    config = with_overrides(base, "train", **PLUS_TRAIN_DEFAULTS)
    return with_overrides(config, "plus", **plus)


def with_overrides(config: RunConfig, section: str, **values: Any) -> RunConfig:
    """Copy of ``config`` with fields of one section replaced (``None`` values are skipped)."""
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return config
    part = getattr(config, section)
    return dataclasses.replace(config, **{section: _build(type(part), {**dataclasses.asdict(part), **values}, section)})
