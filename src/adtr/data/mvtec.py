"""Indexing the MVTec AD directory layout.

``<root>/<category>/train/good/*`` holds training images, ``test/<type>/*`` the
test images and ``ground_truth/<type>/<stem>_mask.png`` the defect masks. The
walk and pairing checks are shared with plain folders (:mod:`adtr.data.samples`).
"""

from __future__ import annotations

from pathlib import Path

from adtr.data.images import require_dir
from adtr.data.samples import GOOD, Sample, good_samples, index_by_type, subfolders
from adtr.errors import AdtrError, file_error

SPLITS = ("train", "test")


def list_mvtec_categories(root: str | Path) -> list[str]:
    """Names of the category folders in ``root`` (those with a train/ or test/ folder)."""
    root = require_dir(root, "dataset root")
    return [
        folder.name
        for folder in subfolders(root)
        if (folder / "train").is_dir() or (folder / "test").is_dir()
    ]


def index_mvtec(root: str | Path, category: str, split: str) -> list[Sample]:
    """List the samples of one MVTec category and split ("train" or "test").

    Train is ``train/good`` only. Test covers every ``test/<type>`` folder; a
    defect type with a ``ground_truth/<type>`` folder must have a mask for every
    image, one without gets ``mask=None`` (image-level evaluation only).
    """
    if split not in SPLITS:
        raise AdtrError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    root = require_dir(root, "dataset root")
    category_dir = root / category
    if not category or Path(category).name != category or not category_dir.is_dir():
        found = ", ".join(list_mvtec_categories(root)) or "none"
        raise file_error(root, f"no category {category!r} (categories found: {found})")
    if split == "train":
        return good_samples(require_dir(category_dir / "train" / GOOD, "training folder"))
    return index_by_type(category_dir / "test", category_dir / "ground_truth", plain_names=False)
