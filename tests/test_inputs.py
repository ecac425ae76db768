"""adtr.data.inputs: what fit, predict and the CLI accept, read one way for all three."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adtr.data import Sample, index_mvtec, resolve_training_samples
from adtr.data.inputs import (
    array_to_pil,
    expand_inputs,
    is_one_image,
    iter_images,
    to_pil,
    training_images,
)
from adtr.data.dataset import as_dataset
from adtr.engine import image_list
from adtr.errors import AdtrError

RNG = np.random.default_rng(0)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def rgb_images(n: int, h: int = 12, w: int = 16) -> np.ndarray:
    return RNG.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    """A MVTec-like category ``cat`` (train/good, test/good, test/dent) and a plain folder ``plain``."""
    images = rgb_images(3)
    for i, a in enumerate(images):
        save(tmp_path / "cat" / "train" / "good" / f"{i:03d}.png", a)
        save(tmp_path / "cat" / "test" / "good" / f"{i:03d}.png", a)
        save(tmp_path / "cat" / "test" / "dent" / f"{i:03d}.png", a)
        save(tmp_path / "plain" / f"{i:03d}.png", a)
    return tmp_path


def test_training_folders_resolve_as_the_cli_does(folders):
    """A category folder means its train/good; any other folder is a folder of good images."""
    cat = resolve_training_samples(folders / "cat")
    assert cat == index_mvtec(folders, "cat", "train")
    assert [s.image for s in training_images(str(folders / "plain"))] == sorted((folders / "plain").glob("*.png"))
    assert training_images(folders / "cat") == cat
    with pytest.raises(AdtrError, match="training folder does not exist"):
        training_images(str(folders / "nope"))


def test_training_paths_become_good_samples(folders):
    """Files, folders and globs, in the order given (fit used to fail with AttributeError on a str)."""
    one = folders / "plain" / "001.png"
    samples = training_images([str(one), folders / "plain", str(folders / "cat" / "train" / "good" / "00[02].png")])
    assert [s.image for s in samples] == [one, *sorted((folders / "plain").glob("*.png")),
                                          folders / "cat" / "train" / "good" / "000.png",
                                          folders / "cat" / "train" / "good" / "002.png"]
    assert all(s.label == 0 and s.defect_type == "good" and s.mask is None for s in samples)
    with pytest.raises(AdtrError, match="no such file, folder or matching pattern"):
        training_images([folders / "plain" / "missing.png"])


def test_defective_samples_are_refused_with_their_count_and_types(folders):
    test = index_mvtec(folders, "cat", "test")
    with pytest.raises(AdtrError) as excinfo:
        training_images(test)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "fit needs good images only" in message and "3 of the 6 training samples" in message
    assert "(dent)" in message and str(folders / "cat" / "test" / "dent" / "000.png") in message
    good = [s for s in test if s.label == 0]
    assert training_images(good) == good


def test_training_arrays_are_read_as_predict_reads_them():
    """Grey, float and RGBA batches and lists of arrays become the RGB uint8 images that
    predict's conversion makes of each one; a uint8 RGB batch is used as it is."""
    rgb = rgb_images(5)
    assert training_images(rgb) is rgb
    grey = rgb[..., 0]
    expected = np.stack([np.asarray(array_to_pil(g)) for g in grey])
    for same in (grey, grey[..., None], grey / 255.0, grey.astype(np.float32), list(grey)):
        got = training_images(same)
        assert got.dtype == np.uint8 and got.shape == (5, 12, 16, 3)
        np.testing.assert_array_equal(got, expected)
    rgba = np.concatenate([rgb, np.full((5, 12, 16, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(training_images(rgba), rgb)
    np.testing.assert_array_equal(training_images(torch.from_numpy(rgb).permute(0, 3, 1, 2)), rgb)
    np.testing.assert_array_equal(training_images([Image.fromarray(a) for a in rgb]), rgb)
    ragged = training_images([rgb[0], rgb_images(1, 20, 8)[0]])  # sizes differ: a list, not a batch
    assert isinstance(ragged, list) and [a.shape for a in ragged] == [(12, 16, 3), (20, 8, 3)]
    item = as_dataset(ragged, 16)[1]  # what feature caching reads: each resized on its own
    assert item["image"].shape == (3, 16, 16) and item["label"] == 0
    assert len(set(image_list(ragged))) == 2 and image_list(ragged) == image_list(list(ragged))  # resume's identity


def test_a_training_array_of_the_wrong_shape_names_its_real_count():
    """The shape is checked before the held-out split (which used to report 7 of 8 images)."""
    with pytest.raises(AdtrError, match=r"shape \(8, 3, 12, 16\) is not a batch of images.*channels-first: "
                                        r"use a\.transpose\(0, 2, 3, 1\)"):
        training_images(rgb_images(8).transpose(0, 3, 1, 2))
    with pytest.raises(AdtrError, match=r"shape \(8, 12, 16, 5\) is not a batch"):
        training_images(RNG.integers(0, 256, (8, 12, 16, 5), dtype=np.uint8))
    with pytest.raises(AdtrError, match=r"no training images: the array of shape \(0, 12, 16, 3\) is empty"):
        training_images(rgb_images(0))
    with pytest.raises(AdtrError, match=r"values in \[300, 300\]"):
        training_images(np.full((4, 8, 8), 300.0))


def test_mixed_or_unknown_training_inputs_are_refused(folders):
    with pytest.raises(AdtrError, match="not a mix"):
        training_images([folders / "plain" / "000.png", rgb_images(1)[0]])
    with pytest.raises(AdtrError, match="the list is empty"):
        training_images([])
    with pytest.raises(AdtrError, match="cannot train on a int"):
        training_images(3)
    with pytest.raises(AdtrError, match=r"training image 1 \(ndarray\): array of shape \(3, 12, 16\).*channels-first"):
        training_images([rgb_images(1)[0], rgb_images(1)[0].transpose(2, 0, 1)])


def test_channels_first_arrays_and_channels_last_tensors_say_how_to_fix_them():
    image = rgb_images(1)[0]
    for chw in (image.transpose(2, 0, 1), image[..., :1].transpose(2, 0, 1)):
        with pytest.raises(AdtrError, match=r"is not an image .*looks channels-first: use a\.transpose\(1, 2, 0\)"):
            array_to_pil(chw)
    with pytest.raises(AdtrError, match="is not an image") as excinfo:
        array_to_pil(np.zeros((5, 7, 9)))  # neither end holds channels: no hint
    assert "channels" not in str(excinfo.value)
    tensor = torch.from_numpy(image).permute(2, 0, 1)  # torchvision's layout
    np.testing.assert_array_equal(np.asarray(to_pil(tensor)), np.asarray(to_pil(image)))
    np.testing.assert_array_equal(np.asarray(to_pil(tensor.float() / 255)), image)
    np.testing.assert_array_equal(np.asarray(to_pil(tensor.to(torch.bfloat16) / 255)), np.asarray(to_pil(
        (tensor.to(torch.bfloat16) / 255).float().permute(1, 2, 0).numpy())))
    with pytest.raises(AdtrError, match=r"looks channels-last: use t\.permute\(2, 0, 1\)"):
        to_pil(torch.from_numpy(image))


def test_one_image_or_many(folders):
    """What predict returns one result for, and what it expands into a list."""
    image = rgb_images(1)[0]
    one = [folders / "plain" / "000.png", str(folders / "plain" / "000.png"), Image.fromarray(image), image,
           image[..., 0], torch.zeros(3, 8, 8)]
    many = [folders / "plain", str(folders / "plain" / "*.png"), rgb_images(2), torch.zeros(2, 3, 8, 8),
            [image], (image,), (x for x in [image])]
    assert all(is_one_image(x) for x in one) and not any(is_one_image(x) for x in many)
    assert [s for s, _ in iter_images(str(folders / "plain"))] == [str(p) for p in
                                                                   sorted((folders / "plain").glob("*.png"))]
    mixed = iter_images([folders / "plain" / "001.png", rgb_images(2), image, str(folders / "plain" / "00[02].png")])
    assert [s for s, _ in mixed] == [str(folders / "plain" / "001.png"), "ndarray[1]", "ndarray[2]", "ndarray[3]",
                                     str(folders / "plain" / "000.png"), str(folders / "plain" / "002.png")]
    with pytest.raises(AdtrError, match="no such file, folder or matching pattern"):
        list(iter_images(str(folders / "plain" / "*.jpg")))
    with pytest.raises(AdtrError, match="cannot predict on a int"):
        list(iter_images(3))
    with pytest.raises(AdtrError, match="item 1: cannot predict on a dict"):
        list(iter_images([image, {}]))


def test_a_batch_is_read_with_one_value_range():
    """A float batch in [0, 255] holding one dark image (all values <= 1) is not rescaled per image."""
    batch = np.stack([np.full((4, 4, 3), 200.0), np.full((4, 4, 3), 1.0)])
    images = [np.asarray(to_pil(item)) for _, item in iter_images(batch)]
    assert images[0].max() == 200 and images[1].max() == 1


def test_expand_inputs_keeps_the_order_given(folders):
    plain = sorted((folders / "plain").glob("*.png"))
    assert expand_inputs([str(plain[2]), str(folders / "plain")]) == [plain[2], *plain]
    with pytest.raises(AdtrError, match="nothing.png: no such file"):
        expand_inputs([str(folders / "nothing.png")])
