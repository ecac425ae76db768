"""Data loading: index dataset layouts into samples, decode images and masks."""

from __future__ import annotations

from adtr.data.dataset import ImageDataset, validate_readable
from adtr.data.folder import index_folder, index_test_folder
from adtr.data.images import (
    IMAGE_SUFFIXES,
    image_to_tensor,
    list_images,
    read_image,
    read_mask,
    verify_image,
)
from adtr.data.mvtec import index_mvtec, list_mvtec_categories
from adtr.data.samples import Sample, has_masks

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "Sample",
    "has_masks",
    "image_to_tensor",
    "index_folder",
    "index_mvtec",
    "index_test_folder",
    "list_images",
    "list_mvtec_categories",
    "read_image",
    "read_mask",
    "validate_readable",
    "verify_image",
]
