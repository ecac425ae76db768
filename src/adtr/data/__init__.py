"""Data loading: index dataset layouts into samples, decode images and masks."""

from __future__ import annotations

from adtr.data.cifar import (
    CIFAR10_CLASSES,
    ImageArray,
    OneClassSplit,
    load_cifar,
    one_class_split,
    save_cifar_pickle,
    save_class_folders,
)
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
from adtr.data.inputs import (
    array_to_pil,
    expand_inputs,
    resolve_test_samples,
    resolve_training_samples,
    to_pil,
    training_images,
)
from adtr.data.mvtec import index_mvtec, list_mvtec_categories
from adtr.data.samples import Sample, has_masks

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGE_SUFFIXES",
    "ImageArray",
    "ImageDataset",
    "OneClassSplit",
    "Sample",
    "array_to_pil",
    "expand_inputs",
    "has_masks",
    "image_to_tensor",
    "index_folder",
    "index_mvtec",
    "index_test_folder",
    "list_images",
    "list_mvtec_categories",
    "load_cifar",
    "one_class_split",
    "read_image",
    "read_mask",
    "resolve_test_samples",
    "resolve_training_samples",
    "save_cifar_pickle",
    "save_class_folders",
    "to_pil",
    "training_images",
    "validate_readable",
    "verify_image",
]
