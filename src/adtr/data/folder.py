"""Indexing plain user folders, for data that is not in MVTec layout.

Training needs one folder of good images. Testing needs ``test/good/`` and one
subfolder per defect type, plus an optional mask folder mirroring the defect
subfolders (``masks/<type>/<stem>.png`` or ``<stem>_mask.png``).
"""

from __future__ import annotations

from pathlib import Path

from adtr.data.images import list_images, require_dir
from adtr.data.samples import Sample, good_samples, index_by_type, subfolders
from adtr.errors import file_error


def index_folder(good: str | Path) -> list[Sample]:
    """Every image directly in ``good`` as a defect-free training sample."""
    return good_samples(require_dir(good, "training folder"))


def index_test_folder(test: str | Path, masks: str | Path | None = None) -> list[Sample]:
    """Index ``test/<type>/`` folders: ``good`` is label 0, any other name label 1.

    Args:
        test: Folder whose subfolders are ``good`` and the defect types.
        masks: Optional folder with a ``<type>/`` subfolder of masks per defect type.
            Types without a mask subfolder are evaluated at image level only.
    """
    test = require_dir(test, "test folder")
    if not subfolders(test):
        if list_images(test, allow_empty=True):
            raise file_error(
                test,
                "holds images directly; expected subfolders: good/ for normal images "
                "and one folder per defect type (e.g. test/good/, test/scratch/)",
            )
        raise file_error(test, "no subfolders; expected good/ and one folder per defect type")
    mask_root = require_dir(masks, "mask folder") if masks is not None else None
    return index_by_type(test, mask_root, plain_names=True)
