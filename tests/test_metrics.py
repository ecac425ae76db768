"""Tests for adtr.metrics: AUROC, F1-max and AU-PRO against independent references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from adtr.errors import AdtrError
from adtr.metrics import aupro, f1_max, image_auroc, pixel_auroc, pixel_roc_curve, pro_curve, roc_curve


# ---------------------------------------------------------------- AUROC / F1


def test_image_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + 0.7 * labels, 1)  # rounding -> ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_perfect_and_inverted_not_flipped() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert image_auroc(labels, scores) == 1.0
    assert image_auroc(labels, -scores) == 0.0
    assert image_auroc(labels, np.ones(5)) == 0.5


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_image_auroc_single_class_raises(labels: list[int]) -> None:
    with pytest.raises(AdtrError, match="both normal and anomalous"):
        image_auroc(labels, [0.1, 0.2, 0.3])


def test_image_auroc_rejects_bad_input() -> None:
    with pytest.raises(AdtrError):
        image_auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(AdtrError):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(AdtrError):
        image_auroc([0, 1], [0.1, np.nan])


def test_pixel_auroc_matches_sklearn_on_flattened() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((4, 16, 16)) > 0.8
    maps = (rng.random((4, 16, 16)) + 0.5 * masks).astype(np.float32)
    maps = np.round(maps, 2)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)
    assert pixel_auroc(masks.astype(np.uint8), maps) == pytest.approx(expected, abs=1e-9)


def test_pixel_auroc_single_class_and_shape_errors() -> None:
    with pytest.raises(AdtrError, match="pixel AUROC"):
        pixel_auroc(np.zeros((2, 4, 4)), np.random.rand(2, 4, 4))
    with pytest.raises(AdtrError, match="does not match"):
        pixel_auroc(np.zeros((2, 4, 4)), np.random.rand(2, 4, 5))
    with pytest.raises(AdtrError, match=r"\(N, H, W\)"):
        pixel_auroc(np.zeros((4, 4)), np.random.rand(4, 4))


def test_f1_max_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 150)
    scores = np.round(rng.normal(size=150) + labels, 1)
    best = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    f1, thr = f1_max(labels, scores)
    assert f1 == pytest.approx(best, abs=1e-12)
    assert f1_score(labels, scores >= thr) == pytest.approx(best, abs=1e-12)


def test_f1_max_perfect_and_no_positive() -> None:
    f1, thr = f1_max([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert f1 == 1.0 and 0.2 < thr <= 0.7
    with pytest.raises(AdtrError, match="no anomalous"):
        f1_max([0, 0], [0.1, 0.2])


# ---------------------------------------------------------------- AU-PRO


def reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """Slow, obvious AU-PRO: one threshold per unique score, then np.trapezoid."""
    masks = masks.astype(bool)
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append(pred[~masks].mean())
        pros.append(np.mean([pred[i][r].mean() for i, r in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    x, y = np.array(fprs), np.array(pros)
    assert np.all(np.diff(x) >= 0)
    inside = x <= limit
    if inside.all():  # limit == 1: the whole curve
        return float(np.trapezoid(y, x) / limit)
    j = np.argmax(x > limit)  # first point past the limit
    y_lim = np.interp(limit, x[j - 1 : j + 1], y[j - 1 : j + 1])
    xs = np.append(x[inside], limit)
    ys = np.append(y[inside], y_lim)
    return float(np.trapezoid(ys, xs) / limit)


def test_aupro_hand_computed_with_tie() -> None:
    # Image A: region R1 = {(0,0): .9, (0,1): .3}, size 2; normals .6, .1.
    # Image B: region R2 = {(0,0): .8}, size 1; normals .3, .2, .1.  5 normals.
    # Thresholds (score >= t), points (FPR, PRO):
    #   .9 -> (0, .25)   .8 -> (0, .75)   .6 -> (.2, .75)
    #   .3 -> (.4, 1.0)  (tie: a normal and R1's 2nd pixel move together)
    #   .2 -> (.6, 1)    .1 -> (1, 1)
    # Area to .3: .2*.75 + .1*(.75 + .875)/2 = .15 + .08125 = .23125
    # AU-PRO = .23125 / .3 = 0.7708333...
    masks = np.array([[[1, 1], [0, 0]], [[1, 0], [0, 0]]])
    maps = np.array([[[0.9, 0.3], [0.6, 0.1]], [[0.8, 0.3], [0.2, 0.1]]])
    assert aupro(masks, maps) == pytest.approx(0.23125 / 0.3, abs=1e-12)
    fprs, pros = pro_curve(masks, maps)
    np.testing.assert_allclose(fprs, [0, 0, 0, 0.2, 0.4, 0.6, 1, 1])
    np.testing.assert_allclose(pros, [0, 0.25, 0.75, 0.75, 1, 1, 1, 1])


def test_aupro_uses_8_connectivity() -> None:
    # Mask pixels (0,0), (0,1), (1,2): one 8-connected region of size 3
    # (two regions under 4-connectivity). Only (1,2) scores high.
    # Curve: (0,0), (0,1/3), (1,1) -> PRO(.3) = 1/3 + .3*2/3 = 8/15,
    # AU-PRO = (1/3 + 8/15) / 2 = 13/30 (4-connectivity would give .575).
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = True
    maps = np.zeros((1, 3, 3))
    maps[0, 1, 2] = 1.0
    assert aupro(masks, maps) == pytest.approx(13 / 30, abs=1e-12)


def test_aupro_perfect_map_is_one() -> None:
    rng = np.random.default_rng(3)
    masks = ndimage.gaussian_filter(rng.random((3, 20, 20)), (0, 2, 2)) > 0.53
    assert masks.any() and not masks.all()
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, -masks.astype(float)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", [4, 5, 6])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference(seed: int, limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.random((3, 16, 16)), (0, 1.5, 1.5)) > 0.52
    masks[2] = False  # an all-normal image must also be handled
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 2)  # rounding -> ties
    got = aupro(masks, maps, fpr_limit=limit)
    assert got == pytest.approx(reference_aupro(masks, maps, limit), abs=1e-9)
    assert 0.0 <= got <= 1.0


def test_aupro_in_unit_interval_for_random_maps() -> None:
    rng = np.random.default_rng(7)
    masks = rng.random((5, 12, 12)) > 0.9
    for _ in range(5):
        value = aupro(masks, rng.normal(size=masks.shape))
        assert 0.0 <= value <= 1.0


def test_aupro_errors() -> None:
    with pytest.raises(AdtrError, match="no anomalous region"):
        aupro(np.zeros((2, 4, 4)), np.random.rand(2, 4, 4))
    with pytest.raises(AdtrError, match="no normal pixel"):
        aupro(np.ones((1, 4, 4)), np.random.rand(1, 4, 4))
    with pytest.raises(AdtrError, match="fpr_limit"):
        aupro(np.eye(4)[None], np.random.rand(1, 4, 4), fpr_limit=0.0)
    with pytest.raises(AdtrError, match="0/1"):
        aupro(np.full((1, 4, 4), 255), np.random.rand(1, 4, 4))


def test_roc_curves_match_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounding -> ties
    fpr, tpr = roc_curve(labels, scores)
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    assert np.trapezoid(tpr, fpr) == pytest.approx(image_auroc(labels, scores), abs=1e-12)
    masks = rng.random((3, 8, 8)) > 0.7
    maps = np.round(rng.random((3, 8, 8)) + 0.5 * masks, 2).astype(np.float32)
    fpr, tpr = pixel_roc_curve(masks, maps)
    sk_fpr, sk_tpr, _ = sk_roc_curve(masks.ravel(), maps.ravel(), drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    with pytest.raises(AdtrError, match="both normal and anomalous"):
        roc_curve([1, 1], [0.1, 0.2])


# ---------------------------------------------------------------- properties (hypothesis)
#
# Derandomized and without an example database, so CI runs the same examples every
# time and nothing is written into the checkout; example counts keep each test < ~2 s.

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)

# Strictly increasing maps: they keep ties as ties and the order of distinct scores, so
# every threshold splits the samples exactly as before and the ROC curve is unchanged.
MONOTONE = {
    "exp": np.exp,
    "affine": lambda x: 3.0 * x + 7.0,
    "cube": lambda x: x**3,
    "shifted_log": lambda x: np.log(x + 51.0),  # scores are > -51
}

# Small grid values give many ties; the floats stay where all transforms above are
# finite. allow_subnormal=False: cubing a subnormal underflows to 0 (a float artefact,
# not a property of the metric); the dense-rank check below rejects the rest.
SCORE = st.one_of(
    st.integers(-20, 20).map(lambda k: k / 4),
    st.floats(-50.0, 50.0, allow_nan=False, allow_subnormal=False),
)


def dense_ranks(x: np.ndarray) -> np.ndarray:
    """Rank of each value among the distinct values: equal iff same ties and order."""
    return np.unique(x.ravel(), return_inverse=True)[1]


@st.composite
def labels_and_scores(draw, score=SCORE, max_size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Labels with at least one normal and one anomalous sample, and one score each."""
    rest = draw(st.lists(st.booleans(), max_size=max_size - 2))
    labels = np.array(draw(st.permutations([True, False, *rest])))
    scores = np.array(draw(st.lists(score, min_size=labels.size, max_size=labels.size)))
    return labels, scores


@st.composite
def pixel_masks(draw, max_side: int = 10) -> np.ndarray:
    """(N, H, W) bool masks with at least one anomalous and one normal pixel."""
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, max_side)), draw(st.integers(2, max_side))
    masks = draw(hnp.arrays(np.bool_, (n, h, w)))
    i, j = draw(st.lists(st.integers(0, masks.size - 1), min_size=2, max_size=2, unique=True))
    masks.flat[i], masks.flat[j] = True, False
    return masks


@PROPERTY_SETTINGS
@given(data=labels_and_scores(), name=st.sampled_from(sorted(MONOTONE)))
def test_image_auroc_invariant_to_strictly_increasing_transforms(data, name: str) -> None:
    labels, scores = data
    transformed = MONOTONE[name](scores)
    # Distinct floats may round to one value after the transform; that changes the ties.
    assume(np.array_equal(dense_ranks(scores), dense_ranks(transformed)))
    assert image_auroc(labels, transformed) == image_auroc(labels, scores)


@PROPERTY_SETTINGS
@given(data=labels_and_scores())
def test_image_auroc_of_negated_scores_is_one_minus_auroc(data) -> None:
    # Holds with ties too: a tied (anomalous, normal) pair is one diagonal ROC step
    # and counts 1/2 either way, as in the Mann-Whitney U statistic.
    labels, scores = data
    assert image_auroc(labels, -scores) == pytest.approx(1.0 - image_auroc(labels, scores), abs=1e-12)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    labels=st.lists(st.booleans(), max_size=38).map(lambda rest: np.array([True, False, *rest])),
    seed=st.integers(0, 2**32 - 1),
    tied=st.booleans(),
)
def test_image_auroc_of_label_independent_scores_is_half_on_average(labels, seed: int, tied: bool) -> None:
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    draws = 500
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, (draws, labels.size)) if tied else rng.normal(size=(draws, labels.size))
    mean = np.mean([image_auroc(labels, s) for s in scores])
    # AUROC = U / (n_pos n_neg). With scores independent of the labels its mean is
    # exactly 1/2 (exchangeability; ties count 1/2) and, without ties, its variance is
    # sigma^2 = (n + 1) / (12 n_pos n_neg); ties only lower it. Bernstein's inequality for
    # the mean of K iid values in [0, 1]: P(|mean - 1/2| >= t) <= 2 exp(-K t^2 / (2 sigma^2 + 2t/3)).
    # Solving for a failure probability delta = 1e-6 gives
    # t = (L/3 + sqrt(L^2/9 + 2 K L sigma^2)) / K with L = ln(2 / delta);
    # e.g. t ~ 0.13 for n = 2 and ~ 0.04 for 20 + 20 samples.
    var = (labels.size + 1) / (12 * n_pos * n_neg)
    log_term = np.log(2 / 1e-6)
    bound = (log_term / 3 + np.sqrt(log_term**2 / 9 + 2 * draws * log_term * var)) / draws
    assert abs(mean - 0.5) < bound


@PROPERTY_SETTINGS
@given(masks=pixel_masks(max_side=8), data=st.data(), name=st.sampled_from(sorted(MONOTONE)))
def test_pixel_auroc_invariant_to_strictly_increasing_transforms(masks, data, name: str) -> None:
    maps = data.draw(hnp.arrays(np.float64, masks.shape, elements=SCORE))
    transformed = MONOTONE[name](maps)
    # pixel_auroc works in float32: the transform must keep ties and order after that cast.
    assume(np.array_equal(dense_ranks(maps.astype(np.float32)), dense_ranks(transformed.astype(np.float32))))
    assert pixel_auroc(masks, transformed) == pixel_auroc(masks, maps)


FPR_LIMIT = st.one_of(st.just(0.3), st.just(1.0), st.floats(0.0, 1.0, exclude_min=True))


@PROPERTY_SETTINGS
@given(
    masks=pixel_masks(),
    data=st.data(),
    limit=FPR_LIMIT,
)
def test_aupro_in_unit_interval_for_arbitrary_maps(masks, data, limit: float) -> None:
    elements = st.one_of(st.integers(-3, 3).map(float), st.floats(allow_nan=False, allow_infinity=False))
    maps = data.draw(hnp.arrays(np.float64, masks.shape, elements=elements))
    assert 0.0 <= aupro(masks, maps, fpr_limit=limit) <= 1.0


@PROPERTY_SETTINGS
@given(masks=pixel_masks(), data=st.data(), offset=st.floats(-100.0, 100.0), limit=FPR_LIMIT)
def test_aupro_perfect_map_is_one_for_any_separating_noise(masks, data, offset: float, limit: float) -> None:
    # mask + noise in [0, 0.999] puts every defect pixel (>= 1) above every normal
    # pixel (<= 0.999); |offset| <= 100 is small enough not to merge the two.
    noise = data.draw(hnp.arrays(np.float64, masks.shape, elements=st.floats(0.0, 1.0)))
    maps = masks + 0.999 * noise + offset
    assert maps[masks].min() > maps[~masks].max()
    # PRO reaches 1 at FPR 0, so the area up to any limit is the limit itself; only the
    # rounding of the cumulative sum of 1 / (region size * regions) (clipped above 1,
    # not below) can leave it a few ulps short, hence the tolerance as in
    # test_aupro_perfect_map_is_one.
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(1.0, abs=1e-12)
