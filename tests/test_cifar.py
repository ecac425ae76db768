"""Tests for adtr.data.cifar: the three CIFAR layouts, the one-class split, user errors."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adtr.data import (
    CIFAR10_CLASSES,
    ImageArray,
    load_cifar,
    one_class_split,
    save_cifar_pickle,
    save_class_folders,
)
from adtr.errors import AdtrError

CLASSES = ("ant", "bee", "cow")  # Alphabetical, so class folders keep the labels.
CIFAR10_JPEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_jpeg"


def make_split(n_per_class: int, seed: int) -> ImageArray:
    """Random 32x32 images, classes interleaved so order matters."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(len(CLASSES)), n_per_class).astype(np.int64)
    images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    return ImageArray(images, labels, CLASSES)


@pytest.fixture(scope="module")
def data() -> tuple[ImageArray, ImageArray]:
    return make_split(6, seed=1), make_split(4, seed=2)


def error_text(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def by_class(arr: ImageArray) -> list[tuple[int, bytes]]:
    """Order-free content: class folders group by class, pickles keep the given order."""
    return sorted((int(label), img.tobytes()) for img, label in zip(arr.images, arr.labels))


def assert_same(got: ImageArray, want: ImageArray, *, ordered: bool = True) -> None:
    assert got.classes == want.classes
    assert got.images.dtype == np.uint8 and got.labels.dtype == np.int64
    assert got.images.shape == want.images.shape and len(got) == len(want)
    if ordered:
        np.testing.assert_array_equal(got.images, want.images)
        np.testing.assert_array_equal(got.labels, want.labels)
    else:
        assert by_class(got) == by_class(want)


# --------------------------------------------------------------------------- layouts


def test_cifar10_pickle_round_trip(tmp_path: Path, data) -> None:
    train, test = data
    folder = save_cifar_pickle(tmp_path, train, test, "cifar10")
    assert folder == tmp_path / "cifar-10-batches-py"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for root in (folder, tmp_path):  # The folder itself or its parent.
        assert_same(load_cifar(root, "train"), train)
        assert_same(load_cifar(root, "test"), test)


def test_cifar10_batches_split_evenly(tmp_path: Path, data) -> None:
    import pickle

    folder = save_cifar_pickle(tmp_path, data[0], data[1], "cifar10")
    sizes = []
    for i in range(1, 6):
        with (folder / f"data_batch_{i}").open("rb") as f:
            sizes.append(len(pickle.load(f, encoding="bytes")[b"labels"]))
    assert sum(sizes) == 18 and max(sizes) - min(sizes) <= 1


def test_cifar100_pickle_fine_labels(tmp_path: Path, data) -> None:
    train, test = data
    folder = save_cifar_pickle(tmp_path, train, test, "cifar100")
    assert folder == tmp_path / "cifar-100-python"
    for root in (folder, tmp_path):
        assert_same(load_cifar(root, "train"), train)
        assert_same(load_cifar(root, "test"), test)


def test_class_folders_png_exact(tmp_path: Path, data) -> None:
    train, test = data
    assert save_class_folders(tmp_path, train, test) == tmp_path
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == list(CLASSES)
    assert len(list((tmp_path / "train" / "bee").glob("*.png"))) == 6
    got = load_cifar(tmp_path, "train")
    assert_same(got, train, ordered=False)
    assert list(got.labels) == sorted(got.labels)  # Grouped by class, in class order.
    assert_same(load_cifar(tmp_path, "test"), test, ordered=False)


def test_all_layouts_agree(tmp_path: Path, data) -> None:
    train, test = data
    save_cifar_pickle(tmp_path / "p10", train, test, "cifar10")
    save_cifar_pickle(tmp_path / "p100", train, test, "cifar100")
    save_class_folders(tmp_path / "folders", train, test)
    for split in ("train", "test"):
        a, b, c = (load_cifar(tmp_path / name, split) for name in ("p10", "p100", "folders"))
        assert_same(a, b)
        assert_same(c, a, ordered=False)


def test_chw_rows_become_hwc(tmp_path: Path) -> None:
    """Official rows are 1024 red, 1024 green, 1024 blue values."""
    import pickle

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.arange(1024) % 256]).astype(np.uint8)
    batch = {b"data": row[None], b"fine_labels": [0]}
    for name, value in (("train", batch), ("test", batch), ("meta", {b"fine_label_names": [b"x"]})):
        with (folder / name).open("wb") as f:
            pickle.dump(value, f, protocol=2)
    img = load_cifar(tmp_path, "train").images[0]
    assert img.shape == (32, 32, 3)
    assert (img[..., 0] == 10).all() and (img[..., 1] == 20).all()
    assert img[0, 5, 2] == 5 and img[1, 0, 2] == 32  # Blue ramps along rows, row-major.
    # And back: save_cifar_pickle writes the same CHW order.
    arr = ImageArray(img[None].copy(), np.zeros(1, np.int64), ("x",))
    out = save_cifar_pickle(tmp_path / "again", arr, arr, "cifar10")
    with (out / "test_batch").open("rb") as f:
        np.testing.assert_array_equal(pickle.load(f, encoding="bytes")[b"data"][0], row)


def test_cifar10_names_keep_official_order(tmp_path: Path) -> None:
    for name in CIFAR10_CLASSES:
        path = tmp_path / "test" / name / "0000.png"
        path.parent.mkdir(parents=True)
        Image.new("RGB", (32, 32), (1, 2, 3)).save(path)
    got = load_cifar(tmp_path, "test")
    assert got.classes == CIFAR10_CLASSES
    assert list(got.labels) == list(range(10))


def test_grey_image_in_folders_becomes_rgb(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("L", (8, 8), 77).save(tmp_path / "train" / "a" / "0.png")
    got = load_cifar(tmp_path, "train")
    assert got.images.shape == (1, 8, 8, 3) and (got.images == 77).all()


# --------------------------------------------------------------------------- one-class split


def test_one_class_split_sizes_and_labels(data) -> None:
    train, test = data
    split = one_class_split(train, test, "bee", n_anomalous=5, seed=0)
    assert split.normal_class == "bee"
    np.testing.assert_array_equal(split.train, train.images[train.labels == 1])
    assert split.train.shape == (6, 32, 32, 3) and split.test.shape == (9, 32, 32, 3)
    assert split.test.dtype == np.uint8 and split.test_labels.dtype == np.int64
    assert int((split.test_labels == 0).sum()) == 4 and int(split.test_labels.sum()) == 5
    np.testing.assert_array_equal(split.test, test.images[split.test_indices])
    np.testing.assert_array_equal(split.test_labels, (test.labels[split.test_indices] != 1).astype(np.int64))
    assert len(set(split.test_indices.tolist())) == 9  # Without replacement.


def test_one_class_split_seed(data) -> None:
    train, test = data
    a = one_class_split(train, test, 0, n_anomalous=4, seed=3)
    b = one_class_split(train, test, 0, n_anomalous=4, seed=3)
    np.testing.assert_array_equal(a.test_indices, b.test_indices)
    np.testing.assert_array_equal(a.test, b.test)
    others = {tuple(one_class_split(train, test, 0, n_anomalous=4, seed=s).test_indices) for s in range(10)}
    assert len(others) > 1


def test_one_class_split_name_or_index(data) -> None:
    train, test = data
    by_name = one_class_split(train, test, "cow", n_anomalous=3, seed=1)
    by_index = one_class_split(train, test, 2, n_anomalous=3, seed=1)
    assert by_index.normal_class == "cow"
    np.testing.assert_array_equal(by_name.test_indices, by_index.test_indices)
    np.testing.assert_array_equal(by_name.train, by_index.train)


def test_one_class_split_takes_all_when_too_few(data) -> None:
    train, test = data
    split = one_class_split(train, test, "ant", n_anomalous=1000)
    assert len(split.test) == len(test) and int(split.test_labels.sum()) == 8
    np.testing.assert_array_equal(split.test, test.images)


def test_one_class_split_unknown_class(data) -> None:
    train, test = data
    for bad in ("dog", 3, -1, True):
        with pytest.raises(AdtrError) as excinfo:
            one_class_split(train, test, bad)
        assert "0=ant, 1=bee, 2=cow" in error_text(excinfo)


# --------------------------------------------------------------------------- errors


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(AdtrError) as excinfo:
        load_cifar(tmp_path / "nope", "train")
    assert "nope" in error_text(excinfo) and "does not exist" in error_text(excinfo)


def test_unrecognised_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(AdtrError) as excinfo:
        load_cifar(tmp_path, "train")
    text = error_text(excinfo)
    assert str(tmp_path) in text
    assert "cifar-10-batches-py" in text and "cifar-100-python" in text and "train/<class>" in text


def test_bad_split_name(tmp_path: Path) -> None:
    with pytest.raises(AdtrError, match="split must be one of"):
        load_cifar(tmp_path, "val")


def test_missing_split(tmp_path: Path, data) -> None:
    folder = save_cifar_pickle(tmp_path / "p", data[0], data[1], "cifar10")
    (folder / "test_batch").unlink()
    with pytest.raises(AdtrError) as excinfo:
        load_cifar(folder, "test")
    assert "test_batch" in error_text(excinfo) and "missing" in error_text(excinfo)
    save_class_folders(tmp_path / "f", data[0], data[1])
    for path in sorted((tmp_path / "f" / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "f" / "test").rmdir()
    with pytest.raises(AdtrError) as excinfo:
        load_cifar(tmp_path / "f", "test")
    assert "test" in error_text(excinfo) and "missing" in error_text(excinfo)


@pytest.mark.parametrize(
    "kind, name", [("cifar10", "data_batch_3"), ("cifar100", "train"), ("cifar10", "batches.meta")]
)
def test_truncated_batch(tmp_path: Path, data, kind: str, name: str) -> None:
    folder = save_cifar_pickle(tmp_path, data[0], data[1], kind)
    raw = (folder / name).read_bytes()
    (folder / name).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AdtrError) as excinfo:
        load_cifar(tmp_path, "train")
    assert name in error_text(excinfo) and "CIFAR pickle" in error_text(excinfo)


def test_garbage_batch(tmp_path: Path, data) -> None:
    folder = save_cifar_pickle(tmp_path, data[0], data[1], "cifar10")
    (folder / "test_batch").write_bytes(b"this is not a pickle at all")
    with pytest.raises(AdtrError) as excinfo:
        load_cifar(folder, "test")
    assert "test_batch" in error_text(excinfo)


@pytest.mark.parametrize(
    "batch, problem",
    [
        ([1, 2, 3], "expected a dict"),
        ({b"labels": [0]}, "no 'data' entry"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 0]}, "should be (N, 3072)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 'labels'"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [7]}, "labels outside 0..2"),
        ({b"data": np.full((1, 3072), 300), b"labels": [0]}, "0..255"),
    ],
)
def test_malformed_batch(tmp_path: Path, data, batch, problem: str) -> None:
    import pickle

    folder = save_cifar_pickle(tmp_path, data[0], data[1], "cifar10")
    with (folder / "test_batch").open("wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(AdtrError) as excinfo:
        load_cifar(folder, "test")
    assert "test_batch" in error_text(excinfo) and problem in error_text(excinfo)


def test_mixed_image_sizes(tmp_path: Path) -> None:
    for name, size in (("a/0.png", 32), ("a/1.png", 32), ("b/0.png", 16), ("b/1.png", 8)):
        path = tmp_path / "train" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size)).save(path)
    with pytest.raises(AdtrError) as excinfo:
        load_cifar(tmp_path, "train")
    text = error_text(excinfo)
    assert str(Path("b") / "0.png") in text and "16x16" in text and "32x32" in text


def test_corrupt_image_in_folders(tmp_path: Path) -> None:
    (tmp_path / "test" / "a").mkdir(parents=True)
    (tmp_path / "test" / "a" / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(AdtrError) as excinfo:
        load_cifar(tmp_path, "test")
    assert "0.jpg" in error_text(excinfo) and "cannot read image" in error_text(excinfo)


def test_bad_image_array() -> None:
    with pytest.raises(AdtrError, match="uint8"):
        ImageArray(np.zeros((1, 4, 4, 3), np.float32), np.zeros(1, np.int64), ("a",))
    with pytest.raises(AdtrError, match="labels must lie"):
        ImageArray(np.zeros((1, 4, 4, 3), np.uint8), np.ones(1, np.int64), ("a",))


def test_pickle_needs_32px(tmp_path: Path) -> None:
    small = ImageArray(np.zeros((1, 8, 8, 3), np.uint8), np.zeros(1, np.int64), ("a",))
    with pytest.raises(AdtrError, match="32x32"):
        save_cifar_pickle(tmp_path, small, small, "cifar10")


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.skipif(not CIFAR10_JPEG.is_dir(), reason=f"CIFAR-10 JPEG folders not found at {CIFAR10_JPEG}")
def test_real_cifar10_jpeg_test_split() -> None:
    start = time.perf_counter()
    test = load_cifar(CIFAR10_JPEG, "test")
    elapsed = time.perf_counter() - start
    assert test.classes == CIFAR10_CLASSES
    assert test.images.shape == (10000, 32, 32, 3) and test.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10
    split = one_class_split(test, test, "cat", n_anomalous=1000, seed=0)
    assert split.test.shape == (2000, 32, 32, 3) and int(split.test_labels.sum()) == 1000
    assert elapsed < 60, f"reading 10,000 JPEGs took {elapsed:.1f} s"
