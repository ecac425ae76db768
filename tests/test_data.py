"""Tests for adtr.data: layouts, image modes, mask binarisation and user errors."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from torch.utils.data import DataLoader

from adtr.data import (
    ImageDataset,
    has_masks,
    image_to_tensor,
    index_folder,
    index_mvtec,
    index_test_folder,
    list_images,
    list_mvtec_categories,
    read_image,
    read_mask,
    validate_readable,
)
from adtr.data.images import decode_image
from adtr.errors import AdtrError

SIZE = 16


def save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def rgb(value: tuple[int, int, int] = (90, 120, 150)) -> Image.Image:
    return Image.new("RGB", (32, 32), value)


def mask_img(top_rows: int = 8) -> Image.Image:
    arr = np.zeros((32, 32), np.uint8)
    arr[:top_rows] = 255
    return Image.fromarray(arr)


def error_text(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    """bottle: crack has masks, scratch has none; cable exists for category listing."""
    cat = tmp_path / "bottle"
    for name in ("000", "001"):
        save(cat / "train" / "good" / f"{name}.png", rgb())
        save(cat / "test" / "crack" / f"{name}.png", rgb())
        save(cat / "ground_truth" / "crack" / f"{name}_mask.png", mask_img())
    save(cat / "test" / "good" / "000.png", rgb())
    save(cat / "test" / "scratch" / "000.jpg", rgb())
    save(tmp_path / "cable" / "train" / "good" / "000.png", rgb())
    (tmp_path / "notes").mkdir()
    return tmp_path


def test_mvtec_train_and_categories(mvtec: Path) -> None:
    assert list_mvtec_categories(mvtec) == ["bottle", "cable"]
    train = index_mvtec(mvtec, "bottle", "train")
    assert [(s.image.name, s.label, s.defect_type, s.mask) for s in train] == [
        ("000.png", 0, "good", None),
        ("001.png", 0, "good", None),
    ]


def test_mvtec_test_labels_and_masks(mvtec: Path) -> None:
    test = index_mvtec(mvtec, "bottle", "test")
    got = [(s.defect_type, s.image.name, s.label, s.mask.name if s.mask else None) for s in test]
    assert got == [
        ("crack", "000.png", 1, "000_mask.png"),
        ("crack", "001.png", 1, "001_mask.png"),
        ("good", "000.png", 0, None),
        ("scratch", "000.jpg", 1, None),
    ]
    assert not has_masks(test)
    assert has_masks([s for s in test if s.defect_type != "scratch"])
    assert not has_masks([s for s in test if s.label == 0])


def test_mvtec_missing_mask_names_image(mvtec: Path) -> None:
    (mvtec / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(AdtrError) as excinfo:
        index_mvtec(mvtec, "bottle", "test")
    assert "crack/001.png" in error_text(excinfo)


def test_mvtec_orphan_mask_names_mask(mvtec: Path) -> None:
    save(mvtec / "bottle" / "ground_truth" / "crack" / "007_mask.png", mask_img())
    with pytest.raises(AdtrError) as excinfo:
        index_mvtec(mvtec, "bottle", "test")
    assert "007_mask.png" in error_text(excinfo)


def test_mvtec_duplicate_stems_names_both(mvtec: Path) -> None:
    save(mvtec / "bottle" / "train" / "good" / "001.jpg", rgb())
    with pytest.raises(AdtrError) as excinfo:
        index_mvtec(mvtec, "bottle", "train")
    text = error_text(excinfo)
    assert "001.jpg" in text and "001.png" in text


def test_mvtec_missing_category_lists_found(mvtec: Path) -> None:
    with pytest.raises(AdtrError) as excinfo:
        index_mvtec(mvtec, "zipper", "test")
    text = error_text(excinfo)
    assert "'zipper'" in text and "bottle, cable" in text
    with pytest.raises(AdtrError, match="unknown split"):
        index_mvtec(mvtec, "bottle", "val")


def test_plain_folder_layout(tmp_path: Path) -> None:
    save(tmp_path / "good" / "a.png", rgb())
    save(tmp_path / "good" / "b.BMP", rgb())
    (tmp_path / "good" / "readme.txt").write_text("ignored")
    save(tmp_path / "good" / ".hidden.png", rgb())
    assert [s.image.name for s in index_folder(tmp_path / "good")] == ["a.png", "b.BMP"]

    test, masks = tmp_path / "test", tmp_path / "masks"
    save(test / "good" / "g.png", rgb())
    save(test / "dent" / "d1.png", rgb())
    save(test / "dent" / "d2.png", rgb())
    save(test / "stain" / "s1.png", rgb())
    save(masks / "dent" / "d1.png", mask_img())  # plain name
    save(masks / "dent" / "d2_mask.bmp", mask_img())  # _mask name, other suffix
    samples = index_test_folder(test, masks)
    got = [(s.defect_type, s.label, s.mask.name if s.mask else None) for s in samples]
    assert got == [("dent", 1, "d1.png"), ("dent", 1, "d2_mask.bmp"), ("good", 0, None), ("stain", 1, None)]
    assert [s.label for s in index_test_folder(test)] == [1, 1, 0, 1]

    save(masks / "dent" / "zz.png", mask_img())
    with pytest.raises(AdtrError) as excinfo:
        index_test_folder(test, masks)
    assert "zz.png" in error_text(excinfo)


def test_plain_folder_layout_errors(tmp_path: Path) -> None:
    save(tmp_path / "flat" / "x.png", rgb())
    with pytest.raises(AdtrError) as excinfo:
        index_test_folder(tmp_path / "flat")
    assert "flat" in error_text(excinfo) and "good/" in str(excinfo.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(AdtrError) as excinfo:
        index_folder(tmp_path / "empty")
    assert "empty" in error_text(excinfo) and ".png" in str(excinfo.value)
    with pytest.raises(AdtrError, match="does not exist"):
        list_images(tmp_path / "nope")

    save(tmp_path / "t" / "dent" / "d1.png", rgb())
    save(tmp_path / "t" / "dent" / "d2.png", rgb())
    save(tmp_path / "m" / "dent" / "d1.png", mask_img())
    with pytest.raises(AdtrError) as excinfo:
        index_test_folder(tmp_path / "t", tmp_path / "m")
    assert "d2.png" in error_text(excinfo)


def _palette_transparent() -> Image.Image:
    img = Image.new("P", (32, 32), 1)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(0, (0, 0, 16, 32))
    img.info["transparency"] = 0
    return img


def _rgba() -> Image.Image:
    img = Image.new("RGBA", (32, 32), (200, 100, 50, 255))
    img.paste((200, 100, 50, 0), (0, 0, 16, 32))
    return img


@pytest.mark.parametrize(
    ("name", "make", "left", "right", "tol"),
    [
        ("l.png", lambda: Image.new("L", (32, 32), 100), (100,) * 3, (100,) * 3, 0),
        ("rgba.png", _rgba, (0, 0, 0), (200, 100, 50), 0),
        ("p.png", _palette_transparent, (0, 0, 0), (0, 255, 0), 0),
        ("i16.png", lambda: Image.new("I;16", (32, 32), 257 * 200), (200,) * 3, (200,) * 3, 0),
        ("f01.tif", lambda: Image.new("F", (32, 32), 0.4), (102,) * 3, (102,) * 3, 0),
        ("f255.tif", lambda: Image.new("F", (32, 32), 300.0), (255,) * 3, (255,) * 3, 0),
        ("cmyk.jpg", lambda: Image.new("CMYK", (32, 32), (0, 255, 255, 0)), (255, 0, 0), (255, 0, 0), 4),
        ("rgb.bmp", lambda: rgb((10, 20, 30)), (10, 20, 30), (10, 20, 30), 0),
    ],
)
def test_read_image_modes(tmp_path: Path, name, make, left, right, tol) -> None:
    img = read_image(save(tmp_path / name, make()))
    assert img.mode == "RGB" and img.size == (32, 32)
    np.testing.assert_allclose(img.getpixel((2, 2)), left, atol=tol)
    np.testing.assert_allclose(img.getpixel((30, 2)), right, atol=tol)


def test_image_to_tensor() -> None:
    img = Image.new("RGB", (40, 32), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 32))
    t = image_to_tensor(img, SIZE)
    assert t.shape == (3, SIZE, SIZE) and t.dtype == torch.float32
    assert t[0, 0, 0].item() == 1.0 and t[2, 0, 0].item() == 0.0
    assert t[2, 0, -1].item() == 1.0 and t[0, 0, -1].item() == 0.0
    assert 0.0 <= t.min().item() and t.max().item() <= 1.0
    with pytest.raises(AdtrError, match="positive integer"):
        image_to_tensor(img, 0)


@pytest.mark.parametrize(
    ("dtype", "values", "expected"),
    [
        (np.uint8, [0, 1], [False, True]),  # 0/1 mask
        (np.uint8, [127, 128], [False, True]),
        (np.uint16, [30000, 40000], [False, True]),  # I;16
        (np.float32, [0.0, 0.2], [False, True]),  # F, 0..1
    ],
)
def test_read_mask_binarises(tmp_path: Path, dtype, values, expected) -> None:
    arr = np.array([[values[0]] * 2 + [values[1]] * 2] * 2, dtype=dtype)
    img = Image.fromarray(arr)
    path = save(tmp_path / ("m.tif" if dtype == np.float32 else "m.png"), img)
    m = read_mask(path, 4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    assert m[0, :2].tolist() == [expected[0]] * 2 and m[0, 2:].tolist() == [expected[1]] * 2


def test_read_mask_nearest_resize(tmp_path: Path) -> None:
    pattern = np.array([[0, 255, 0, 0], [0, 0, 255, 0], [255, 0, 0, 0], [0, 0, 0, 255]], np.uint8)
    path = save(tmp_path / "m.png", Image.fromarray(pattern))
    up = read_mask(path, 8)
    expected = np.kron(pattern > 0, np.ones((2, 2), bool))
    assert np.array_equal(up.numpy(), expected)


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (_truncated_png(), "cannot read image"),
        (b"", "empty"),
        (b"this is not an image\n", "cannot read image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot read image"),
    ],
    ids=["truncated", "zero-byte", "text", "corrupt-header"],
)
def test_bad_files_raise_adtr_error(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad_file.png"
    path.write_bytes(content)
    for read in (read_image, lambda p: read_mask(p, 8)):
        with pytest.raises(AdtrError) as excinfo:
            read(path)
        text = error_text(excinfo)
        assert "bad_file.png" in text and reason in text
    if content:  # verify() is header-level, but these are all caught too.
        samples = index_folder(tmp_path)
        with pytest.raises(AdtrError, match="bad_file.png"):
            validate_readable(samples)


def test_image_dataset(mvtec: Path) -> None:
    samples = index_mvtec(mvtec, "bottle", "test")
    validate_readable(samples)
    ds = ImageDataset(samples, SIZE)
    assert len(ds) == 4
    item = ds[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["label"].item() == 1 and item["index"] == 0
    assert item["mask"].shape == (1, SIZE, SIZE) and item["mask"].dtype == torch.float32
    assert item["mask"][0, :, 0].tolist() == [1.0] * 4 + [0.0] * 12  # top 8 of 32 rows
    good = ds[2]
    assert good["label"].item() == 0 and good["mask"].sum().item() == 0
    assert ds[3]["mask"].sum().item() == 0  # defect without mask file
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE)
    assert batch["label"].tolist() == [1, 1, 0, 1] and batch["index"].tolist() == [0, 1, 2, 3]
    with pytest.raises(AdtrError):
        ImageDataset([], SIZE)


# ---------------------------------------------------------------- properties (hypothesis)

SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}
HYPOTHESIS_MODES = ("L", "RGB", "RGBA", "P", "I;16", "I", "F", "1", "CMYK")


def _pil_can_write(mode: str, fmt: str) -> bool:
    try:
        Image.new(mode, (1, 1)).save(io.BytesIO(), fmt)
    except (OSError, KeyError, ValueError):
        return False
    return True


# Asked from PIL instead of hard-coded, so a Pillow upgrade that adds or drops a
# writer (Pillow 13 dropped I -> PNG) changes what is tested, not whether it runs.
WRITABLE = [(mode, fmt) for fmt in SUFFIX for mode in HYPOTHESIS_MODES if _pil_can_write(mode, fmt)]

_PIXEL = {  # mode -> (numpy dtype, channels, elements); None = hypothesis' default for the dtype
    "L": (np.uint8, 1, None),
    "P": (np.uint8, 1, None),
    "1": (np.bool_, 1, None),
    "RGB": (np.uint8, 3, None),
    "RGBA": (np.uint8, 4, None),
    "CMYK": (np.uint8, 4, None),
    "I;16": (np.dtype("<u2"), 1, None),
    "I": (np.int32, 1, None),
    "F": (np.float32, 1, st.floats(width=32)),  # NaN and +-inf included: TIFF stores them
}


@st.composite
def image_files(draw) -> tuple[Image.Image, str]:
    """Any image PIL can write in one of the accepted formats, and that format."""
    mode, fmt = draw(st.sampled_from(WRITABLE))
    width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    dtype, channels, elements = _PIXEL[mode]
    shape = (height, width) if channels == 1 else (height, width, channels)
    arr = draw(hnp.arrays(dtype, shape, elements=elements))
    if mode == "1":
        img = Image.fromarray(arr)
    else:
        img = Image.frombytes(mode, (width, height), np.ascontiguousarray(arr).tobytes())
    if mode == "P":
        img.putpalette(draw(st.binary(min_size=768, max_size=768)))
        transparency = draw(st.one_of(st.none(), st.integers(0, 255), st.binary(min_size=1, max_size=256)))
        if transparency is not None:
            img.info["transparency"] = transparency
    return img, fmt


# Derandomized and without an example database: CI runs the same ~8 examples per
# (mode, format) pair every time and nothing is written into the checkout.
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(case=image_files(), size=st.integers(1, 96))
def test_any_writable_image_reads_as_rgb_tensor_and_mask(case, size: int) -> None:
    img, fmt = case
    with tempfile.TemporaryDirectory() as tmp:  # not tmp_path: it is shared by all examples
        path = Path(tmp) / f"img{SUFFIX[fmt]}"
        img.save(path, fmt)
        t = image_to_tensor(read_image(path), size)
        assert t.dtype == torch.float32 and t.shape == (3, size, size)
        assert not torch.isnan(t).any()
        assert 0.0 <= t.min().item() and t.max().item() <= 1.0
        # The upload path decodes the same bytes with the same rules.
        uploaded = image_to_tensor(decode_image(path.read_bytes(), path.name), size)
        assert torch.equal(uploaded, t)
        m = read_mask(path, size)
        assert m.dtype == torch.bool and m.shape == (size, size)
