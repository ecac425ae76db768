"""The sample record and the indexing logic shared by every dataset layout.

MVTec AD and plain user folders differ only in where masks live and how they are
named, so the "test/<type>/ + mask folder per type" walk and the image/mask
pairing checks live here once. Pairing is validated up front so that a missing
or misnamed mask fails at indexing time, not halfway through an evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from adtr.data.images import list_images, require_dir
from adtr.errors import file_error

GOOD = "good"
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class Sample:
    """One image to train or evaluate on."""

    image: Path
    label: int  # 0 good, 1 defective
    defect_type: str  # "good" or the defect folder name
    mask: Path | None  # None: good (all-zero mask) OR defect without a mask file


def has_masks(samples: Iterable[Sample]) -> bool:
    """Whether pixel-level metrics are possible: some defects, and all have masks."""
    defective = [s for s in samples if s.label == 1]
    return bool(defective) and all(s.mask is not None for s in defective)


def subfolders(folder: Path) -> list[Path]:
    """Sorted, non-hidden subdirectories of ``folder``."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def good_samples(folder: Path) -> list[Sample]:
    """Every image in ``folder`` as a defect-free sample."""
    return [Sample(path, 0, GOOD, None) for path in list_images(folder)]


def pair_masks(images: list[Path], mask_dir: Path, *, plain_names: bool) -> dict[Path, Path]:
    """Map each image to its mask in ``mask_dir``; raise on missing or orphan masks.

    A mask for ``<stem>.<ext>`` is named ``<stem>_mask.<any ext>``; with
    ``plain_names`` ``<stem>.<any ext>`` is accepted too.
    """
    by_stem = {path.stem: path for path in images}
    pairs: dict[Path, Path] = {}
    for mask in list_images(mask_dir, allow_empty=True):
        stem = mask.stem
        if plain_names and stem in by_stem:
            image = by_stem[stem]
        elif stem.endswith(MASK_SUFFIX) and stem[: -len(MASK_SUFFIX)] in by_stem:
            image = by_stem[stem[: -len(MASK_SUFFIX)]]
        else:
            raise file_error(mask, f"mask has no matching image in {images[0].parent}")
        if image in pairs:
            raise file_error(mask, f"second mask for {image.name} (also {pairs[image].name}); keep one")
        pairs[image] = mask
    for image in images:
        if image not in pairs:
            expected = f"{image.stem}{MASK_SUFFIX}.png"
            if plain_names:
                expected = f"{image.stem}.png or {expected}"
            raise file_error(image, f"no mask for this image in {mask_dir} (expected {expected})")
    return pairs


def index_by_type(test_dir: Path, mask_root: Path | None, *, plain_names: bool) -> list[Sample]:
    """Index ``test_dir/<type>/`` folders; masks come from ``mask_root/<type>/`` if it exists.

    ``good`` images are label 0 with no mask. A defect type without a mask folder
    gets ``mask=None`` (image-level evaluation only); one with a mask folder must
    pair every image with exactly one mask.
    """
    types = subfolders(require_dir(test_dir, "test folder"))
    if not types:
        raise file_error(test_dir, "no subfolders; expected good/ and one folder per defect type")
    if mask_root is not None and mask_root.is_dir():
        known = {t.name for t in types}
        for folder in subfolders(mask_root):
            if folder.name != GOOD and folder.name not in known:
                raise file_error(folder, f"mask folder has no matching test folder in {test_dir}")
    samples: list[Sample] = []
    for folder in types:
        if folder.name == GOOD:
            samples.extend(good_samples(folder))
            continue
        images = list_images(folder)
        mask_dir = mask_root / folder.name if mask_root is not None else None
        if mask_dir is not None and mask_dir.is_dir():
            pairs = pair_masks(images, mask_dir, plain_names=plain_names)
        else:
            pairs = {}
        samples.extend(Sample(path, 1, folder.name, pairs.get(path)) for path in images)
    return samples
