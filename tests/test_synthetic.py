"""Tests for the synthetic MVTec-style dataset generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adtr.errors import AdtrError
from adtr.synthetic import DEFECTS, make_dataset, render_pair

SIZE = 64


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return make_dataset(root, "fabric", size=SIZE, n_train=3, n_test_good=2, n_test_defect=2, seed=7)


def test_layout_and_counts(fabric: Path) -> None:
    assert fabric.name == "fabric"
    assert sorted(p.name for p in (fabric / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
    assert sorted(p.name for p in (fabric / "test" / "good").iterdir()) == ["000.png", "001.png"]
    assert sorted(p.name for p in (fabric / "test").iterdir()) == sorted(["good", *DEFECTS])
    assert sorted(p.name for p in (fabric / "ground_truth").iterdir()) == sorted(DEFECTS)
    for defect in DEFECTS:
        images = sorted(p.name for p in (fabric / "test" / defect).iterdir())
        masks = sorted(p.name for p in (fabric / "ground_truth" / defect).iterdir())
        assert images == ["000.png", "001.png"]
        assert masks == ["000_mask.png", "001_mask.png"]


def test_images_rgb_and_masks_binary(fabric: Path) -> None:
    for path in fabric.glob("test/*/*.png"):
        with Image.open(path) as img:
            assert img.mode == "RGB" and img.size == (SIZE, SIZE)
        if path.parent.name == "good":
            continue
        with Image.open(fabric / "ground_truth" / path.parent.name / f"{path.stem}_mask.png") as mask_img:
            assert mask_img.mode == "L" and mask_img.size == (SIZE, SIZE)
            mask = np.asarray(mask_img)
        assert set(np.unique(mask)) <= {0, 255}
        assert (mask == 255).sum() > 0


def test_good_images_vary_but_are_same_texture(fabric: Path) -> None:
    a, b = (_load(fabric / "train" / "good" / f"00{i}.png").astype(float) for i in (0, 1))
    assert np.abs(a - b).mean() > 3.0
    assert abs(a.mean() - b.mean()) < 40.0


def test_deterministic(tmp_path: Path) -> None:
    kw = dict(size=SIZE, n_train=2, n_test_good=1, n_test_defect=1)
    a = make_dataset(tmp_path / "a", "metal", seed=3, **kw)
    b = make_dataset(tmp_path / "b", "metal", seed=3, **kw)
    c = make_dataset(tmp_path / "c", "metal", seed=4, **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert not np.array_equal(_load(a / "train/good/000.png"), _load(c / "train/good/000.png"))
    assert not np.array_equal(_load(a / "ground_truth/spot/000_mask.png"), _load(c / "ground_truth/spot/000_mask.png"))


def test_written_defect_matches_render_pair(fabric: Path) -> None:
    _, img, mask = render_pair("fabric", SIZE, 7, "hole", 1)
    assert np.array_equal(_load(fabric / "test/hole/001.png"), img)
    assert np.array_equal(_load(fabric / "ground_truth/hole/001_mask.png"), mask)


@pytest.mark.parametrize("category", ["fabric", "metal"])
@pytest.mark.parametrize("defect", DEFECTS)
def test_mask_marks_exactly_the_changed_pixels(category: str, defect: str) -> None:
    for index in range(3):
        clean, img, mask = render_pair(category, SIZE, 0, defect, index)
        diff = np.abs(img.astype(int) - clean.astype(int)).max(axis=2)
        inside = mask == 255
        assert 0 < inside.mean() < 0.1
        assert diff[inside].mean() > 30  # clearly visible
        assert diff[inside].min() >= 12  # every masked pixel really changed
        assert diff[~inside].max() <= 13  # nothing visible left outside the mask


def test_defect_sizes_vary() -> None:
    fractions = [(render_pair("metal", 128, 1, "spot", i)[2] > 0).mean() for i in range(12)]
    assert max(fractions) > 4 * min(fractions)  # small to medium
    assert 0.0005 < min(fractions) and max(fractions) < 0.05


def test_unknown_category_and_tiny_size_rejected(tmp_path: Path) -> None:
    with pytest.raises(AdtrError, match="unknown synthetic category"):
        make_dataset(tmp_path, "bottle", size=SIZE, n_train=1)
    with pytest.raises(AdtrError, match="at least 16"):
        make_dataset(tmp_path, "fabric", size=8, n_train=1)
    with pytest.raises(AdtrError, match="unknown defect"):
        render_pair("fabric", SIZE, 0, "dent")
