"""A torch Dataset over indexed samples.

Decoding happens lazily per item (so workers share the cost); call
:func:`validate_readable` first to make a long job fail before it starts if a
file is unreadable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from adtr.data.images import check_mask_fits, image_size, image_to_tensor, read_image, read_mask, verify_image
from adtr.data.samples import Sample
from adtr.errors import AdtrError


class ImageDataset(Dataset):
    """Images (and masks, all-zero when absent) resized to ``image_size`` squared."""

    def __init__(self, samples: Sequence[Sample], image_size: int) -> None:
        if not samples:
            raise AdtrError("no images to load: the sample list is empty")
        self.samples = list(samples)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return ``image`` (3,S,S), ``mask`` (1,S,S) float 0/1, ``label`` and ``index``."""
        sample = self.samples[index]
        size = self.image_size
        pil = read_image(sample.image)
        image = image_to_tensor(pil, size)
        if sample.mask is None:
            mask = torch.zeros(1, size, size)
        else:
            check_mask_fits(pil.size, image_size(sample.mask), sample.mask, sample.image)
            mask = read_mask(sample.mask, size).unsqueeze(0).float()
        return {
            "image": image,
            "mask": mask,
            "label": torch.tensor(sample.label, dtype=torch.long),
            "index": index,
        }


class ArrayDataset(Dataset):
    """In-memory uint8 RGB images, e.g. CIFAR, with the same items as :class:`ImageDataset`: one
    (N, H, W, 3) array, or a list of (H, W, 3) arrays of any sizes."""

    def __init__(self, images: np.ndarray | Sequence[np.ndarray], image_size: int) -> None:
        if isinstance(images, np.ndarray):
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise AdtrError(f"image array must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        elif not all(isinstance(a, np.ndarray) and a.ndim == 3 and a.shape[-1] == 3 and a.dtype == np.uint8
                     for a in images):
            raise AdtrError("image list must hold uint8 (H, W, 3) arrays")
        if len(images) == 0:
            raise AdtrError("no images to load: the image array is empty")
        self.images = images
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = self.image_size
        return {
            "image": image_to_tensor(Image.fromarray(self.images[index]), size),
            "mask": torch.zeros(1, size, size),
            "label": torch.tensor(0, dtype=torch.long),
            "index": index,
        }


#: What training and feature extraction accept: indexed files, or in-memory uint8 RGB images (one
#: (N, H, W, 3) array, or a list of (H, W, 3) arrays); :func:`adtr.data.inputs.training_images`
#: makes one of them from anything ``fit`` accepts.
ImageSource = Sequence[Sample] | np.ndarray | Sequence[np.ndarray]


def in_memory(source: ImageSource) -> bool:
    """Whether ``source`` holds decoded images rather than samples of files."""
    return isinstance(source, np.ndarray) or (len(source) > 0 and isinstance(source[0], np.ndarray))


def as_dataset(source: ImageSource, image_size: int) -> Dataset:
    """The right Dataset for a list of samples or in-memory images."""
    if in_memory(source):
        return ArrayDataset(source, image_size)
    return ImageDataset(source, image_size)


def validate_readable(samples: Iterable[Sample]) -> None:
    """Check every image and mask header up front; raise on the first bad file."""
    for sample in samples:
        verify_image(sample.image)
        if sample.mask is not None:
            verify_image(sample.mask)
            check_mask_fits(image_size(sample.image), image_size(sample.mask), sample.mask, sample.image)
