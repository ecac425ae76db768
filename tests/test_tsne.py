from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adtr.config import with_overrides
from adtr.data import Sample, index_mvtec
from adtr.detector import Detector
from adtr.engine import fit
from adtr.errors import AdtrError
from adtr.tsne import DifferenceVectors, embed_tsne, plot_tsne, sample_difference_vectors, tsne_figure

from conftest import tiny_config

# 64 px images on a 4x4 grid: every cell is 16x16 pixels.
KNOWN_ANOMALOUS = {(0, 0), (0, 1), (1, 0), (1, 1), (3, 3)}  # full cells, and (3, 3) exactly half
AMBIGUOUS = (3, 0)  # 16 of 256 pixels: neither anomalous nor normal


@pytest.fixture(scope="module")
def tiny_run(tiny_category, tmp_path_factory) -> Path:
    """A one-epoch run with a small transformer: the tests need a working model, not a good one."""
    run = tmp_path_factory.mktemp("tsne") / "run"
    cfg = with_overrides(tiny_config(epochs=1), "model", dim=32, num_heads=2, num_encoder_layers=1,
                         num_decoder_layers=1, ffn_dim=64)
    fit(cfg, index_mvtec(tiny_category.parent, tiny_category.name, "train"), run, device=torch.device("cpu"))
    return run


@pytest.fixture(scope="module")
def detector(tiny_run) -> Detector:
    return Detector.load(tiny_run, device="cpu")


def _mask(path: Path, *boxes: tuple[int, int, int, int]) -> Path:
    m = np.zeros((64, 64), np.uint8)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = 255
    Image.fromarray(m).save(path)
    return path


@pytest.fixture(scope="module")
def samples(tiny_category, tmp_path_factory) -> dict[str, list[Sample]]:
    """known: one image with a mask we drew; halves: two top-half masks; good: 4 test goods; unmasked: a defect."""
    folder = tmp_path_factory.mktemp("masks")
    test = tiny_category / "test"
    known = _mask(folder / "known.png", (0, 32, 0, 32), (48, 56, 48, 64), (48, 52, 0, 4))
    half = _mask(folder / "half.png", (0, 32, 0, 64))
    good = [Sample(p, 0, "good", None) for p in sorted((test / "good").glob("*.png"))]
    return {
        "known": [Sample(test / "hole" / "000.png", 1, "hole", known)],
        "halves": [Sample(test / "spot" / f"00{i}.png", 1, "spot", half) for i in (0, 1)],
        "good": good,
        "unmasked": [Sample(test / "crack" / "000.png", 1, "crack", None)],
    }


def _all(samples) -> list[Sample]:
    return samples["known"] + samples["halves"] + samples["good"] + samples["unmasked"]


def test_sampling_balances_classes_and_respects_n(detector, samples):
    # 21 anomalous cells (5 + 2 x 8); 90 normal (10 + 2 x 8 + 4 x 16); the unmasked defect is skipped.
    d = sample_difference_vectors(detector, _all(samples), n=20, seed=0, batch_size=3)
    assert isinstance(d, DifferenceVectors) and len(d) == 20
    assert d.vectors.dtype == np.float32 and d.scores.dtype == np.float32 and d.anomalous.dtype == bool
    assert d.vectors.shape[0] == 20 and d.vectors.ndim == 2 and int(d.anomalous.sum()) == 10
    few = sample_difference_vectors(detector, _all(samples), n=60, seed=0)
    assert len(few) == 60 and int(few.anomalous.sum()) == 21  # every anomalous cell, normal ones fill up
    everything = sample_difference_vectors(detector, _all(samples), n=1000, seed=0)
    assert len(everything) == 111 and int(everything.anomalous.sum()) == 21
    assert len(np.unique(everything.vectors, axis=0)) == 111  # without replacement


def test_anomalous_cells_lie_inside_the_mask(detector, samples):
    d = sample_difference_vectors(detector, samples["known"] + samples["good"], n=1000, seed=1)
    with torch.no_grad():
        out = detector.network(detector.to_tensor(samples["known"][0].image)[None])
    cells = (out.features - out.reconstruction)[0].permute(1, 2, 0).numpy()  # (h, w, C)
    assert cells.shape[:2] == (4, 4)

    def cell_of(v: np.ndarray) -> tuple[int, int] | None:
        hits = [(r, c) for r in range(4) for c in range(4) if np.allclose(cells[r, c], v, atol=1e-5)]
        return hits[0] if hits else None

    assert {cell_of(v) for v in d.vectors[d.anomalous]} == KNOWN_ANOMALOUS
    normal_cells = {cell_of(v) for v in d.vectors[~d.anomalous]} - {None}
    assert len(normal_cells) == 16 - len(KNOWN_ANOMALOUS) - 1 and AMBIGUOUS not in normal_cells
    assert int((~d.anomalous).sum()) == 10 + 4 * 16


def test_scores_are_the_norm_of_the_vectors(detector, samples):
    d = sample_difference_vectors(detector, _all(samples), n=40, seed=0)
    np.testing.assert_allclose(np.linalg.norm(d.vectors, axis=1), d.scores, rtol=1e-4, atol=1e-5)
    assert d.scores[d.anomalous].mean() > 0


def test_sampling_is_seeded(detector, samples):
    a = sample_difference_vectors(detector, _all(samples), n=20, seed=3)
    b = sample_difference_vectors(detector, _all(samples), n=20, seed=3, batch_size=5)
    c = sample_difference_vectors(detector, _all(samples), n=20, seed=4)
    for x, y in ((a.vectors, b.vectors), (a.scores, b.scores), (a.anomalous, b.anomalous)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.vectors, c.vectors)


def test_no_masks_is_an_error(detector, samples, tmp_path):
    with pytest.raises(AdtrError, match="defect masks"):
        sample_difference_vectors(detector, samples["good"] + samples["unmasked"])
    speck = _mask(tmp_path / "speck.png", (0, 4, 0, 4))  # masked, but no cell is half defect
    with pytest.raises(AdtrError, match="defect masks"):
        sample_difference_vectors(detector, [Sample(samples["known"][0].image, 1, "hole", speck)])


def test_embed_shape_and_finiteness(detector, samples):
    d = sample_difference_vectors(detector, _all(samples), n=40, seed=0)
    emb = embed_tsne(d.vectors, seed=0)
    assert emb.shape == (40, 2) and np.isfinite(emb).all()
    with pytest.raises(AdtrError):
        embed_tsne(d.vectors[:3])


def test_plot_writes_a_png_atomically(tmp_path):
    rng = np.random.default_rng(0)
    anomalous = np.arange(30) >= 15
    out = tmp_path / "figs" / "tsne.png"
    plot_tsne(rng.normal(size=(30, 2)), anomalous, rng.uniform(0, 5, 30).astype(np.float32), out, title="t")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (720, 600)
    assert [p.name for p in out.parent.iterdir()] == ["tsne.png"]  # no temp file left behind
    with pytest.raises(ValueError):
        plot_tsne(np.zeros((3, 2)), np.zeros(2, bool), np.zeros(3), tmp_path / "bad.png")


def test_tsne_figure_end_to_end(tiny_run, samples, tmp_path):
    out = tmp_path / "fig5.png"
    d = tsne_figure(tiny_run, _all(samples), out, n=40, seed=0, device="cpu")
    assert len(d) == 40 and int(d.anomalous.sum()) == 20
    with Image.open(out) as img:
        assert img.format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["fig5.png"]


def test_vectors_follow_the_error_space_the_model_scores_in(tiny_run, samples):
    det = Detector.load(tiny_run, device="cpu")
    det.network.model.error_space = "standardized"  # s(u) in per-channel std units: d must be too
    d = sample_difference_vectors(det, _all(samples), n=40, seed=0)
    np.testing.assert_allclose(np.linalg.norm(d.vectors, axis=1), d.scores, rtol=1e-4, atol=1e-5)
