"""CIFAR-10 / CIFAR-100 readers and the one-class anomaly-detection protocol.

The one-class benchmark (used by ADTR and most of the field) trains on every
training image of one class and tests on that class against the others. The
images are tiny (32x32), so whole splits are held in memory as uint8 arrays
rather than indexed as files like MVTec.

:func:`load_cifar` reads three layouts, detected from the folder contents:

* ``cifar-10-batches-py``: the official CIFAR-10 python release (pickles);
* ``cifar-100-python``: the official CIFAR-100 python release (fine labels);
* class folders ``<root>/<split>/<class>/*.png|jpg|...`` (e.g. a JPEG export).

:func:`save_cifar_pickle` and :func:`save_class_folders` write the same layouts,
so tests and benchmarks can generate small fixtures without the real data.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from adtr.data.images import IMAGE_FORMATS, IMAGE_SUFFIXES, list_images, read_image, require_dir, to_rgb
from adtr.errors import AdtrError, file_error, first_line

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

SPLITS = ("train", "test")

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_FILES = (*_CIFAR10_TRAIN, "test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")
_SIDE = 32
_FLAT = 3 * _SIDE * _SIDE  # One CIFAR row: 1024 red, then 1024 green, then 1024 blue.

_LOOKED_FOR = (
    f"{CIFAR10_DIR} ({', '.join(_CIFAR10_FILES)}) or {CIFAR100_DIR} ({', '.join(_CIFAR100_FILES)}),"
    " as this folder or inside it, or class folders train/<class>/*.png and test/<class>/*.png"
)


@dataclass(frozen=True, eq=False)
class ImageArray:
    """A whole split in memory: (N,H,W,3) uint8 images, (N,) int64 labels into ``classes``.

    ``eq=False``: comparing numpy arrays with ``==`` is elementwise, so the
    generated ``__eq__`` would be ambiguous; compare the fields explicitly.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise AdtrError(f"images must be a uint8 array of shape (N, H, W, 3), got {_describe(images)}")
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != (len(images),):
            raise AdtrError(f"labels must be an int64 array of shape ({len(images)},), got {_describe(labels)}")
        classes = tuple(self.classes)
        if not classes or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
            raise AdtrError(f"classes must be distinct non-empty names, got {classes!r}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise AdtrError(f"labels must lie in 0..{len(classes) - 1} for {len(classes)} classes")
        object.__setattr__(self, "classes", classes)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class OneClassSplit:
    """One-class protocol data: train on ``normal_class`` only, test it against the rest.

    ``test_labels`` is 0 for normal, 1 for anomalous; ``test_indices`` says which
    images of the full test split were used (in order), so per-class results can be
    traced back to the original labels.
    """

    train: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    normal_class: str
    test_indices: np.ndarray


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


# --------------------------------------------------------------------------- reading


def load_cifar(root: str | Path, split: str) -> ImageArray:
    """Read the ``split`` ("train" or "test") of a CIFAR dataset under ``root``.

    ``root`` may be the official ``cifar-10-batches-py`` or ``cifar-100-python``
    folder, a folder containing one of them, or a folder with class folders
    ``train/<class>/*`` and ``test/<class>/*``. The official releases are pickles,
    and unpickling can run arbitrary code: only point this at the official files
    (or ones written by :func:`save_cifar_pickle`), never at pickles from elsewhere.
    """
    if split not in SPLITS:
        raise AdtrError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    root = require_dir(root, "CIFAR root folder")
    kind, folder = _detect(root)
    if kind == "cifar10":
        return _load_cifar10(folder, split)
    if kind == "cifar100":
        return _load_cifar100(folder, split)
    return _load_class_folders(folder, split)


def _is_cifar10(folder: Path) -> bool:
    return folder.name == CIFAR10_DIR or any((folder / name).is_file() for name in _CIFAR10_FILES)


def _is_cifar100(folder: Path) -> bool:
    return folder.name == CIFAR100_DIR or (
        (folder / "meta").is_file() and any((folder / s).is_file() for s in SPLITS)
    )


def _detect(root: Path) -> tuple[str, Path]:
    """Which layout ``root`` holds, and the folder that holds it."""
    if _is_cifar10(root):
        return "cifar10", root
    if _is_cifar100(root):
        return "cifar100", root
    found = [(kind, root / name) for kind, name in (("cifar10", CIFAR10_DIR), ("cifar100", CIFAR100_DIR))]
    found = [(kind, path) for kind, path in found if path.is_dir()]
    if len(found) > 1:
        raise file_error(root, f"holds both {CIFAR10_DIR} and {CIFAR100_DIR}; pass the one to use as the root")
    if found:
        return found[0]
    if any((root / s).is_dir() for s in SPLITS):
        return "folders", root
    raise file_error(root, f"no CIFAR data found; looked for {_LOOKED_FOR}")


def _unpickle(path: Path) -> dict:
    """Load one official batch/meta file as a dict with bytes keys."""
    if not path.is_file():
        raise file_error(path, "file is missing from the CIFAR folder")
    try:
        with path.open("rb") as f:
            # The user's own copy of the official release, which is only distributed
            # as pickles; see load_cifar's docstring about untrusted files.
            data = pickle.load(f, encoding="bytes")
    except Exception as exc:  # Truncated or garbage files raise many unrelated types.
        raise file_error(path, f"not a readable CIFAR pickle ({first_line(exc)})") from exc
    if not isinstance(data, dict):
        raise file_error(path, f"not a CIFAR pickle: expected a dict, found {type(data).__name__}")
    return data


def _field(data: dict, key: str, path: Path) -> Any:
    """``data[key]``, accepting bytes or str keys (python 2 vs 3 pickles)."""
    for k in (key.encode(), key):
        if k in data:
            return data[k]
    raise file_error(path, f"malformed CIFAR pickle: no '{key}' entry")


def _names(data: dict, key: str, path: Path) -> tuple[str, ...]:
    raw = _field(data, key, path)
    try:
        names = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw)
    except (TypeError, UnicodeDecodeError) as exc:
        raise file_error(path, f"malformed CIFAR pickle: cannot read '{key}' ({exc})") from exc
    if not names or len(set(names)) != len(names) or not all(names):
        raise file_error(path, f"malformed CIFAR pickle: '{key}' must be distinct non-empty names")
    return names


def _batch(path: Path, label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N,32,32,3) and labels (N,) of one batch file, validated."""
    data = _unpickle(path)
    try:
        flat = np.asarray(_field(data, "data", path))
        labels = np.asarray(_field(data, label_key, path))
    except (TypeError, ValueError) as exc:
        raise file_error(path, f"malformed CIFAR pickle: {exc}") from exc
    if flat.ndim != 2 or flat.shape[1] != _FLAT:
        raise file_error(path, f"malformed CIFAR pickle: 'data' should be (N, {_FLAT}), found {_describe(flat)}")
    if flat.dtype != np.uint8:
        if flat.dtype.kind not in "iu" or (flat.size and (flat.min() < 0 or flat.max() > 255)):
            raise file_error(path, f"malformed CIFAR pickle: 'data' should hold 0..255 bytes, found {flat.dtype}")
        flat = flat.astype(np.uint8)
    if labels.shape != (len(flat),) or (labels.size and labels.dtype.kind not in "iu"):
        raise file_error(
            path, f"malformed CIFAR pickle: {len(flat)} images but '{label_key}' is {_describe(labels)}"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise file_error(path, f"malformed CIFAR pickle: labels outside 0..{n_classes - 1}")
    # Rows are channel-major (CHW); the rest of the code wants HWC.
    images = flat.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return images, labels


def _load_cifar10(folder: Path, split: str) -> ImageArray:
    classes = _names(_unpickle(folder / "batches.meta"), "label_names", folder / "batches.meta")
    names = _CIFAR10_TRAIN if split == "train" else ("test_batch",)
    parts = [_batch(folder / name, "labels", len(classes)) for name in names]
    images = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    return ImageArray(images, np.concatenate([p[1] for p in parts]), classes)


def _load_cifar100(folder: Path, split: str) -> ImageArray:
    classes = _names(_unpickle(folder / "meta"), "fine_label_names", folder / "meta")
    images, labels = _batch(folder / split, "fine_labels", len(classes))
    return ImageArray(np.ascontiguousarray(images), labels, classes)


def _class_order(names: list[str]) -> tuple[str, ...]:
    """Alphabetical, except CIFAR-10's own names keep their official label order."""
    if set(names) == set(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    return tuple(sorted(names))


def _decode(path: Path) -> np.ndarray:
    """RGB uint8 pixels of ``path``; a lean path for the common case (50,000 tiny files)."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            return np.asarray(img if img.mode == "RGB" else to_rgb(img))
    except Exception:
        # Let the careful reader produce the proper one-line error (or succeed on
        # something the fast path could not handle).
        return np.asarray(read_image(path))


def _load_class_folders(root: Path, split: str) -> ImageArray:
    split_dir = root / split
    if not split_dir.is_dir():
        raise file_error(split_dir, f"split folder is missing (expected {split}/<class>/*.png next to the other split)")
    names = [p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not names:
        raise file_error(split_dir, "no class folders found (expected <class>/*.png inside)")
    classes = _class_order(names)
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = list_images(split_dir / name, allow_empty=True)
        files += found
        labels += [index] * len(found)
    if not files:
        raise file_error(split_dir, f"no images in any class folder (accepted suffixes: {', '.join(IMAGE_SUFFIXES)})")
    first = _decode(files[0])
    images = np.empty((len(files), *first.shape), np.uint8)
    images[0] = first
    for i in range(1, len(files)):
        pixels = _decode(files[i])
        if pixels.shape != first.shape:
            raise file_error(
                files[i],
                f"image is {pixels.shape[1]}x{pixels.shape[0]} but {files[0].name} is"
                f" {first.shape[1]}x{first.shape[0]}; every image must have the same size",
            )
        images[i] = pixels
    return ImageArray(images, np.asarray(labels, np.int64), classes)


# --------------------------------------------------------------------------- protocol


def _class_index(classes: tuple[str, ...], normal_class: int | str) -> int:
    if isinstance(normal_class, str):
        if normal_class in classes:
            return classes.index(normal_class)
    elif isinstance(normal_class, (int, np.integer)) and not isinstance(normal_class, bool):
        if 0 <= normal_class < len(classes):
            return int(normal_class)
    listing = ", ".join(f"{i}={c}" for i, c in enumerate(classes))
    raise AdtrError(f"unknown class {normal_class!r}; the classes are {listing}")


def one_class_split(
    train: ImageArray,
    test: ImageArray,
    normal_class: int | str,
    n_anomalous: int = 1000,
    seed: int = 0,
) -> OneClassSplit:
    """The one-class protocol for ``normal_class`` (a name or an index).

    Train on every training image of the class; test on all its test images plus
    ``n_anomalous`` test images of the other classes, drawn without replacement
    with ``np.random.default_rng(seed)`` (all of them when fewer exist). The test
    images keep their order in the full test split.
    """
    if train.classes != test.classes:
        raise AdtrError(f"train and test have different classes: {train.classes} vs {test.classes}")
    if isinstance(n_anomalous, bool) or not isinstance(n_anomalous, (int, np.integer)) or n_anomalous < 0:
        raise AdtrError(f"n_anomalous must be a non-negative integer, got {n_anomalous!r}")
    index = _class_index(train.classes, normal_class)
    name = train.classes[index]
    normal_train = np.flatnonzero(train.labels == index)
    normal_test = np.flatnonzero(test.labels == index)
    others = np.flatnonzero(test.labels != index)
    if not len(normal_train):
        raise AdtrError(f"class {name!r} has no training images")
    if not len(normal_test):
        raise AdtrError(f"class {name!r} has no test images")
    if n_anomalous > 0 and not len(others):
        raise AdtrError(f"no test images outside class {name!r} to use as anomalies")
    if n_anomalous < len(others):
        others = np.random.default_rng(seed).choice(others, size=int(n_anomalous), replace=False)
    chosen = np.sort(np.concatenate([normal_test, others]))
    return OneClassSplit(
        train=train.images[normal_train],
        test=test.images[chosen],
        test_labels=(test.labels[chosen] != index).astype(np.int64),
        normal_class=name,
        test_indices=chosen.astype(np.int64),
    )


# --------------------------------------------------------------------------- writing


def _rows(images: np.ndarray, what: str) -> np.ndarray:
    """HWC images as official CHW rows; the pickle layout only holds 32x32."""
    if images.shape[1:3] != (_SIDE, _SIDE):
        raise AdtrError(f"{what} images are {images.shape[2]}x{images.shape[1]}; the CIFAR pickle layout holds 32x32")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), _FLAT)


def _dump(path: Path, data: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(data, f, protocol=2)  # The protocol of the official (python 2) files.


def _batch_dict(label: str, rows: np.ndarray, labels: np.ndarray, label_key: str, start: int) -> dict:
    extra = {b"coarse_labels": [0] * len(labels)} if label_key == "fine_labels" else {}
    return {
        b"batch_label": label.encode(),
        b"filenames": [f"image_{start + i:05d}.png".encode() for i in range(len(labels))],
        b"data": rows,
        label_key.encode(): [int(v) for v in labels],
        **extra,
    }


def save_cifar_pickle(root: str | Path, train: ImageArray, test: ImageArray, kind: str) -> Path:
    """Write ``train``/``test`` in the official python layout; return the new folder.

    ``kind`` "cifar10" writes ``root/cifar-10-batches-py`` (five data batches as even
    as possible, test_batch, batches.meta); "cifar100" writes ``root/cifar-100-python``
    (train, test, meta) with ``classes`` as fine labels and one placeholder coarse class.
    For fixtures: the images must be 32x32, like the real data.
    """
    if kind not in ("cifar10", "cifar100"):
        raise AdtrError(f"kind must be 'cifar10' or 'cifar100', got {kind!r}")
    if train.classes != test.classes:
        raise AdtrError(f"train and test have different classes: {train.classes} vs {test.classes}")
    train_rows, test_rows = _rows(train.images, "train"), _rows(test.images, "test")
    names = [c.encode() for c in train.classes]
    folder = Path(root) / (CIFAR10_DIR if kind == "cifar10" else CIFAR100_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "cifar10":
        parts = np.array_split(np.arange(len(train)), len(_CIFAR10_TRAIN))
        for i, (name, part) in enumerate(zip(_CIFAR10_TRAIN, parts), start=1):
            start = int(part[0]) if len(part) else 0
            batch = _batch_dict(f"training batch {i} of 5", train_rows[part], train.labels[part], "labels", start)
            _dump(folder / name, batch)
        _dump(folder / "test_batch", _batch_dict("testing batch 1 of 1", test_rows, test.labels, "labels", 0))
        meta = {b"label_names": names, b"num_cases_per_batch": max(len(p) for p in parts), b"num_vis": _FLAT}
        _dump(folder / "batches.meta", meta)
    else:
        _dump(folder / "train", _batch_dict("training batch 1 of 1", train_rows, train.labels, "fine_labels", 0))
        _dump(folder / "test", _batch_dict("testing batch 1 of 1", test_rows, test.labels, "fine_labels", 0))
        _dump(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"all"]})
    return folder


def save_class_folders(root: str | Path, train: ImageArray, test: ImageArray, ext: str = "png") -> Path:
    """Write ``root/<split>/<class>/NNNN.<ext>`` (a folder for every class); return ``root``.

    PNG keeps pixels exact; JPEG is lossy. Reading back orders classes
    alphabetically (CIFAR-10's names excepted), so labels only survive a round
    trip when ``classes`` already is in that order.
    """
    suffix = "." + ext.lower().lstrip(".")
    if suffix not in IMAGE_SUFFIXES:
        raise AdtrError(f"ext must be one of {', '.join(s[1:] for s in IMAGE_SUFFIXES)}, got {ext!r}")
    for name in train.classes + test.classes:
        if name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise AdtrError(f"class name {name!r} cannot be used as a folder name")
    root = Path(root)
    for split, data in (("train", train), ("test", test)):
        width = max(4, len(str(len(data) - 1)))
        for index, name in enumerate(data.classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n, i in enumerate(np.flatnonzero(data.labels == index)):
                Image.fromarray(data.images[i]).save(folder / f"{n:0{width}d}{suffix}")
    return root
