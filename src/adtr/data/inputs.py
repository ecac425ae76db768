"""What the CLI and the Python API accept as images, turned into what the engine reads.

``fit``, ``Detector.predict`` and the CLI read a folder, a glob, a path, a PIL image, a
numpy array or a torch tensor here, in one way: a float array that predict scores is the
image that fit would have trained on, and ``adtr predict DIR`` scores what
``det.predict(DIR)`` scores. Arrays are RGB (or grey, or RGBA), channels last.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from adtr.data.folder import index_folder, index_test_folder
from adtr.data.images import list_images, read_image, to_rgb
from adtr.data.mvtec import index_mvtec
from adtr.data.samples import GOOD, Sample
from adtr.errors import AdtrError

#: One image as the API takes it: a file, a PIL image, an (H, W[, C]) array or a (C, H, W) tensor.
ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor

CHANNELS = (1, 3, 4)  # grey, RGB, RGBA
IN_MEMORY = (Image.Image, np.ndarray, torch.Tensor)


def resolve_training_samples(data: str | Path) -> list[Sample]:
    """A MVTec category folder (``train/good`` inside) or a plain folder of good images."""
    data = Path(data)
    if (data / "train" / GOOD).is_dir():
        return index_mvtec(data.parent, data.name, "train")
    return index_folder(data)


def resolve_test_samples(data: str | Path, masks: str | Path | None = None) -> list[Sample]:
    """A MVTec category folder (``test/`` inside) or a plain test folder (good + defect folders,
    masks in ``masks`` when given), as ``adtr test --data DIR [--masks DIR]`` reads them."""
    data = Path(data)
    if (data / "test").is_dir() and masks is None:
        return index_mvtec(data.parent, data.name, "test")
    return index_test_folder(data, Path(masks) if masks is not None else None)


def is_file_input(item: str | Path) -> bool:
    """Whether ``item`` names one file (so ``expand_inputs`` gives it back as it is), not a
    folder or a glob pattern. A pipe or a dangling link counts: reading it names the problem."""
    path = Path(item)
    return not path.is_dir() and (path.exists() or path.is_symlink())


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files, folders (their images) and glob patterns -> image paths, in order."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += list_images(p)
        elif is_file_input(p):
            paths.append(p)  # read_image names what is wrong with a pipe, a dangling link or a loop
        else:
            files = [Path(m) for m in sorted(glob.glob(str(item))) if Path(m).is_file()]
            if not files:
                raise AdtrError(f"{item}: no such file, folder or matching pattern")
            paths += files
    return paths


def channels_first_hint(shape: tuple[int, ...], batch: bool) -> str:
    """The fix for an image array that looks channels-first ((C, H, W): the first image axis
    holds 1, 3 or 4 and the last does not), as an ending for an error message; else ''."""
    image = shape[1:] if batch else shape
    if len(image) == 3 and image[0] in CHANNELS and image[-1] not in CHANNELS:
        order = "0, 2, 3, 1" if batch else "1, 2, 0"
        return f"; it looks channels-first: use a.transpose({order})"
    return ""


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Pixel values as uint8, read as a file of their depth would be, judged over all of ``a``.

    uint8 as it is; uint16 scaled by 1/257, as 16-bit PNG and TIFF files are; other numbers
    must lie in [0, 1] (scaled by 255) or [0, 255]. Anything else is refused rather than
    clipped, which would turn a camera's 16-bit frame white and score it wrongly.
    """
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return np.rint(a / 257.0).astype(np.uint8)
    if a.dtype.kind not in "biuf":
        raise AdtrError(f"image array of dtype {a.dtype} holds no pixel values")
    if not np.isfinite(a).all():
        raise AdtrError("image array contains NaN or inf")
    low, high = float(a.min()), float(a.max())
    if low < 0 or high > 255:
        raise AdtrError(f"image array of dtype {a.dtype} has values in [{low:g}, {high:g}]: give uint8, uint16, "
                        "or numbers in [0, 1] or [0, 255]")
    return np.rint(a * 255.0 if high <= 1.0 else a).astype(np.uint8)


def array_to_pil(array: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1|3|4) array, RGB(A) channel order -> RGB PIL image (see :func:`to_uint8`).

    A BGR array (OpenCV's) is read as RGB, with red and blue swapped, and scores differently:
    convert it first (``a[..., ::-1]``).
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
        raise AdtrError(f"array of shape {a.shape} is not an image (expected HxW, HxWx3 or HxWx4, none of them 0)"
                        + channels_first_hint(a.shape, batch=False))
    return to_rgb(Image.fromarray(to_uint8(a)))


def tensor_to_array(tensor: torch.Tensor, batch: bool) -> np.ndarray:
    """A torch tensor in torchvision's layout, (C, H, W) or (H, W) (a batch: (N, C, H, W) or
    (N, H, W)), as a channels-last numpy array of the same values."""
    t = tensor.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()  # numpy has no bf16
    image = t.shape[1:] if batch else t.shape
    if len(image) == 3:
        if image[0] not in CHANNELS:
            hint = ""
            if image[-1] in CHANNELS:
                hint = "; it looks channels-last: use t.permute(0, 3, 1, 2)" if batch else \
                    "; it looks channels-last: use t.permute(2, 0, 1)"
            expected = "NxCxHxW or NxHxW" if batch else "CxHxW or HxW"
            raise AdtrError(f"tensor of shape {tuple(t.shape)} is not {'a batch of images' if batch else 'an image'} "
                            f"(expected {expected}, torchvision's layout, with C 1, 3 or 4){hint}")
        t = t.movedim(-3, -1)
    return t.numpy()


def to_pil(image: ImageLike) -> Image.Image:
    """One image (a file, a PIL image, an (H, W[, C]) RGB array, a (C, H, W) tensor) -> RGB PIL image."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        image = tensor_to_array(image, batch=False)
    if isinstance(image, np.ndarray):
        return array_to_pil(image)
    raise AdtrError(f"cannot read an image from a {type(image).__name__}: give a path, folder, glob pattern, "
                    "PIL image, numpy array or torch tensor")


def image_batch(images: np.ndarray | torch.Tensor, grey: bool = False) -> np.ndarray:
    """A batch of images, (N, H, W, C) with C 1, 3 or 4 in RGB(A) order (a tensor: (N, C, H, W)),
    and with ``grey`` also (N, H, W) -> uint8 of the same shape (see :func:`to_uint8`: one
    range for the whole batch, so a dark image among bright ones is not rescaled alone)."""
    a = tensor_to_array(images, batch=True) if isinstance(images, torch.Tensor) else np.asarray(images)
    image_ok = (a.ndim == 4 and a.shape[-1] in CHANNELS) or (grey and a.ndim == 3)
    if not image_ok or 0 in a.shape[1:]:
        expected = "NxHxW or NxHxWxC" if grey else "NxHxWxC"
        raise AdtrError(f"array of shape {a.shape} is not a batch of images (expected {expected} with C 1, 3 or 4, "
                        f"none of them 0){channels_first_hint(a.shape, batch=True)}")
    return to_uint8(a)


def is_one_image(images: object) -> bool:
    """Whether ``images`` is one image (predict returns one result), not a folder, a glob, a
    4-D batch or a collection (predict returns a list)."""
    if isinstance(images, (str, Path)):
        return is_file_input(images)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return images.ndim != 4
    return isinstance(images, Image.Image)


def iter_images(images: object) -> Iterator[tuple[str, ImageLike]]:
    """Each image in ``images`` with its source (the path, or for an in-memory image its type,
    and its position in a collection: ``ndarray[3]``), lazily, so that a generator of frames is
    read batch by batch. Folders, globs and 4-D batches are expanded; unknown types are refused."""
    if is_one_image(images):
        yield (str(images) if isinstance(images, (str, Path)) else type(images).__name__), images
        return
    if isinstance(images, (str, Path, np.ndarray, torch.Tensor)):
        collection: Iterable[Any] = [images]
    elif isinstance(images, Iterable) and not isinstance(images, (bytes, bytearray, dict)):
        collection = images
    else:
        raise AdtrError(f"cannot predict on a {type(images).__name__}: give a path, folder, glob pattern, PIL "
                        "image, numpy array or torch tensor, or a list or other iterable of them")
    k = 0
    for item in collection:
        if isinstance(item, (str, Path)):
            for path in expand_inputs([item]):
                yield str(path), path
                k += 1
            continue
        if not isinstance(item, IN_MEMORY):
            raise AdtrError(f"item {k}: cannot predict on a {type(item).__name__}: give paths, folders, glob "
                            "patterns, PIL images, numpy arrays or torch tensors")
        batch = isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4
        for one in image_batch(item) if batch else [item]:
            yield f"{type(one).__name__}[{k}]", one
            k += 1


def training_images(data: object) -> list[Sample] | np.ndarray | list[np.ndarray]:
    """What ``fit`` trains on, from any training input, checked before any work is done.

    A folder (a MVTec category or a plain folder of good images, as ``adtr fit``); a list of
    :class:`Sample` (all good: label 0) or of paths (files, folders, globs); an image array
    (N, H, W) or (N, H, W, C) with C 1, 3 or 4 (a tensor: (N, C, H, W)), read as predict reads
    arrays; or a list of in-memory images (PIL, arrays, tensors). In-memory images come back
    as one uint8 (N, H, W, 3) array, or a list of (H, W, 3) ones when their sizes differ.
    """
    if isinstance(data, (str, Path)):
        return resolve_training_samples(data)
    if isinstance(data, (np.ndarray, torch.Tensor)):
        batch = image_batch(data, grey=True)
        if not len(batch):
            raise AdtrError(f"no training images: the array of shape {batch.shape} is empty")
        if batch.ndim == 4 and batch.shape[-1] == 3:
            return batch
        return np.stack([np.asarray(array_to_pil(image)) for image in batch])
    if isinstance(data, Image.Image) or not isinstance(data, Iterable):
        raise AdtrError(f"cannot train on a {type(data).__name__}: give a folder, a list of samples, paths or "
                        "images, or an image array (N, H, W, C)")
    items = list(data)
    if not items:
        raise AdtrError("no training images: the list is empty")
    if all(isinstance(item, (str, Path, Sample)) for item in items):
        samples: list[Sample] = []
        for item in items:
            if isinstance(item, Sample):
                samples.append(item)
            else:
                samples += [Sample(path, 0, GOOD, None) for path in expand_inputs([item])]
        return good_only(samples)
    if all(isinstance(item, IN_MEMORY) for item in items):
        arrays = []
        for k, item in enumerate(items):
            try:
                arrays.append(np.asarray(to_pil(item)))
            except AdtrError as exc:
                raise AdtrError(f"training image {k} ({type(item).__name__}): {exc}") from None
        if len({a.shape for a in arrays}) == 1:
            return np.stack(arrays)
        return arrays
    kinds = sorted({type(item).__name__ for item in items})
    raise AdtrError(f"cannot train on a list of {', '.join(kinds)}: give samples or paths, or in-memory images "
                    "(PIL images, numpy arrays, torch tensors), not a mix")


def good_only(samples: list[Sample]) -> list[Sample]:
    """``samples`` if every one is good; fit learns what normal looks like from good images only."""
    defective = [s for s in samples if s.label != 0]
    if defective:
        types = ", ".join(sorted({str(s.defect_type) for s in defective}))
        raise AdtrError(f"fit needs good images only (label 0): {len(defective)} of the {len(samples)} training "
                        f"samples are labelled defective ({types}), the first {defective[0].image}")
    return samples
