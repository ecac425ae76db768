"""Feature cache: the backbone is frozen, so each image's features are computed once.

Training then costs only the transformer per epoch. Small caches live in memory;
large ones (over ``MEMORY_LIMIT_BYTES``) in a memory-mapped ``.npy`` file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from adtr.data.dataset import ImageSource, as_dataset
from adtr.models.backbone import FrozenBackbone
from adtr.progress import batches

MEMORY_LIMIT_BYTES = 4 * 1024**3


def loader(samples: ImageSource, image_size: int, batch_size: int, workers: int = 0) -> DataLoader:
    """Ordered loader over samples or an image array (decoding in ``workers`` processes)."""
    return DataLoader(as_dataset(samples, image_size), batch_size=batch_size, shuffle=False,
                      num_workers=workers, persistent_workers=False)


def extract_features(backbone: FrozenBackbone, samples: ImageSource, image_size: int,
                     device: torch.device, mode: str = "auto", cache_file: Path | None = None,
                     batch_size: int = 16, desc: str = "features") -> torch.Tensor:
    """Features of every sample, (N, C, h, w) float32, in sample order.

    Args:
        mode: ``memory``, ``disk`` (memory-mapped ``cache_file``) or ``auto``
            (disk only when the cache would exceed ``MEMORY_LIMIT_BYTES``).
    """
    h = backbone.grid_size(image_size)
    shape = (len(samples), backbone.out_channels, h, h)
    nbytes = int(np.prod(shape)) * 4
    use_disk = mode == "disk" or (mode == "auto" and nbytes > MEMORY_LIMIT_BYTES)
    if use_disk:
        if cache_file is None:
            raise ValueError("a disk feature cache needs cache_file")
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Scratch space of this process only: always rewritten, never read back by a later
        # one, so a file half-written by a killed fit is never trusted (`fit --resume` redoes it).
        store = np.lib.format.open_memmap(cache_file, mode="w+", dtype=np.float32, shape=shape)
        out = torch.from_numpy(store)
    else:
        out = torch.empty(shape, dtype=torch.float32)
    backbone.to(device)
    start = 0
    for batch in batches(loader(samples, image_size, batch_size), desc):
        feats = backbone(batch["image"].to(device)).float().cpu()
        out[start:start + len(feats)] = feats
        start += len(feats)
    if use_disk:
        store.flush()
    return out
