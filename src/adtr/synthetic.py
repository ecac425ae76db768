"""Synthetic industrial-inspection dataset in MVTec AD layout.

The demo and the tests need data that looks like a real inspection task (a
repetitive texture with lighting drift, plus small defects with exact masks)
without downloading MVTec AD. Everything is drawn with numpy from per-image seeds,
so a given ``seed`` always produces byte-identical PNGs.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from adtr.errors import AdtrError

DEFECTS: tuple[str, ...] = ("scratch", "spot", "hole", "crack")
KINDS: tuple[str, ...] = ("fabric", "metal")
_TINTS = {"fabric": (1.12, 0.97, 0.80), "metal": (0.96, 1.0, 1.06)}
_MASK_DELTA = 0.05  # ~13 grey levels: below this a change is not a visible defect
_SPLITS = {"train": 0, "test_good": 1, "test_defect": 2}


def texture_kind(category: str) -> str:
    """Map a category name to a texture kind, so names like ``metal_plate`` work."""
    name = category.lower()
    if "metal" in name or "steel" in name:
        return "metal"
    if any(k in name for k in ("fabric", "cloth", "textile", "carpet")):
        return "fabric"
    raise AdtrError(f"unknown synthetic category {category!r}: name must contain 'fabric' or 'metal'")


def _fabric(rng: np.random.Generator, n: int) -> np.ndarray:
    """Plain weave: warp/weft threads alternate over/under, with jitter so no two match."""
    p = max(5.0, n * 0.035) * rng.uniform(0.97, 1.03)
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    dx, dy = rng.uniform(0, 2 * p, size=2)  # pattern translation
    wob = rng.uniform(0.03, 0.08, size=2)
    u = (x + dx) / p + wob[0] * np.sin(2 * np.pi * y / (p * rng.uniform(6, 12)) + rng.uniform(0, 6.3))
    v = (y + dy) / p + wob[1] * np.sin(2 * np.pi * x / (p * rng.uniform(6, 12)) + rng.uniform(0, 6.3))
    iu, iv = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = u - iu, v - iv
    iu -= iu.min()
    iv -= iv.min()
    thick_u = rng.uniform(0.75, 1.3, size=iu.max() + 1)  # thread-thickness jitter
    thick_v = rng.uniform(0.75, 1.3, size=iv.max() + 1)
    shade_u = rng.uniform(0.9, 1.0, size=iu.max() + 1)
    shade_v = rng.uniform(0.9, 1.0, size=iv.max() + 1)
    warp = np.sin(np.pi * fu) ** (0.7 / thick_u[iu]) * shade_u[iu]
    weft = np.sin(np.pi * fv) ** (0.7 / thick_v[iv]) * shade_v[iv]
    warp_top = (iu + iv) % 2 == 0
    top = np.where(warp_top, warp * (0.7 + 0.3 * np.sin(np.pi * fv)), weft * (0.7 + 0.3 * np.sin(np.pi * fu)))
    under = np.where(warp_top, weft, warp) * 0.45
    img = np.maximum(top, under)
    fibre = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma=(0.6, 0.6))
    return 0.22 + 0.5 * img + 0.05 * fibre


def _metal(rng: np.random.Generator, n: int) -> np.ndarray:
    """Brushed metal: noise smeared along x (the brushing direction) plus vignetting."""
    fine = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma=(0.5, n * 0.06), mode="wrap")
    coarse = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma=(2.5, n * 0.2), mode="wrap")
    fine /= fine.std() + 1e-9
    coarse /= coarse.std() + 1e-9
    y, x = np.mgrid[0:n, 0:n].astype(np.float64) / n
    cx, cy = rng.uniform(0.35, 0.65, size=2)
    vignette = 1.0 - rng.uniform(0.2, 0.35) * ((x - cx) ** 2 + (y - cy) ** 2) / 0.5
    grain = 0.012 * rng.standard_normal((n, n))
    return (0.55 + 0.045 * fine + 0.035 * coarse) * vignette + grain


def render_good(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one defect-free RGB float image in [0, 1] with per-image lighting drift."""
    gray = _fabric(rng, size) if kind == "fabric" else _metal(rng, size)
    y, x = (np.mgrid[0:size, 0:size].astype(np.float64) - size / 2) / size
    theta = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0.0, 0.1) * (x * np.cos(theta) + y * np.sin(theta))
    gray = (gray - 0.5) * rng.uniform(0.9, 1.1) + 0.5 + rng.uniform(-0.05, 0.05) + gradient
    tint = np.asarray(_TINTS[kind]) + rng.uniform(-0.02, 0.02, size=3)
    return np.clip(gray[..., None] * tint, 0.0, 1.0)


def _stroke_alpha(points: np.ndarray, width: float, n: int) -> np.ndarray:
    """Anti-aliased coverage of a polyline of the given width (distance-field raster)."""
    seg = np.diff(points, axis=0)
    steps = np.maximum(1, np.ceil(np.hypot(seg[:, 0], seg[:, 1]) * 3).astype(int))
    dense = np.concatenate(
        [p0 + np.linspace(0, 1, k, endpoint=False)[:, None] * d for p0, d, k in zip(points[:-1], seg, steps)]
        + [points[-1:]]
    )
    ij = np.round(dense).astype(int)
    ij = ij[(ij >= 0).all(1) & (ij < n).all(1)]
    line = np.ones((n, n), dtype=bool)
    line[ij[:, 1], ij[:, 0]] = False
    dist = ndimage.distance_transform_edt(line)
    return np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)


def _bezier(rng: np.random.Generator, n: int, length: float) -> np.ndarray:
    """Random cubic Bezier of roughly ``length`` px, fully inside the image."""
    start = rng.uniform(0.15 * n, 0.85 * n, size=2)
    ang = rng.uniform(0, 2 * np.pi)
    end = np.clip(start + length * np.array([np.cos(ang), np.sin(ang)]), 2, n - 3)
    ctrl = start + (end - start) * np.array([[1 / 3], [2 / 3]]) + rng.normal(0, length * 0.25, size=(2, 2))
    t = np.linspace(0, 1, 64)[:, None]
    return (1 - t) ** 3 * start + 3 * (1 - t) ** 2 * t * ctrl[0] + 3 * (1 - t) * t**2 * ctrl[1] + t**3 * end


def _scratch(img: np.ndarray, rng: np.random.Generator, area: float) -> np.ndarray:
    """Thin bright or dark curve; additive/multiplicative so every covered pixel changes."""
    n = img.shape[0]
    width = rng.uniform(2.0, 4.0)
    alpha = _stroke_alpha(_bezier(rng, n, float(np.clip(area / width, 0.12 * n, 0.7 * n))), width, n)[..., None]
    if rng.random() < 0.5:
        img[:] = img + alpha * rng.uniform(0.3, 0.45)
    else:
        img[:] = img * (1 - alpha * rng.uniform(0.5, 0.7))
    return alpha[..., 0]


def _blob_radius(rng: np.random.Generator, r: float, theta: np.ndarray) -> np.ndarray:
    """Irregular outline: a circle perturbed by a few low-frequency harmonics."""
    out = np.ones_like(theta)
    for k in range(2, 5):
        out += rng.uniform(0, 0.25 / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return r * out


def _polar(rng: np.random.Generator, n: int, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Distance and angle to a random centre that keeps a radius-``r`` shape inside the image."""
    cx, cy = rng.uniform(r + 2, n - r - 2, size=2)
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    return np.hypot(x - cx, y - cy), np.arctan2(y - cy, x - cx)


def _spot(img: np.ndarray, rng: np.random.Generator, area: float) -> np.ndarray:
    """Dark or coloured stain with an irregular, soft outline."""
    n = img.shape[0]
    r = np.sqrt(area / np.pi)
    dist, theta = _polar(rng, n, r * 1.3)
    edge = _blob_radius(rng, r, theta)
    soft = rng.uniform(1.0, 3.0) * min(1.0, r / 6)  # small stains have a proportionally soft rim
    alpha = np.clip((edge - dist) / soft, 0.0, 1.0)  # soft edge falls off inside the outline
    colours = [(0.22, 0.14, 0.07), (0.45, 0.32, 0.05), (0.12, 0.16, 0.3), (0.1, 0.1, 0.1)]
    colour = np.asarray(colours[rng.integers(len(colours))])
    strength = rng.uniform(0.7, 0.9)
    a = (alpha * strength)[..., None]
    img[:] = img * (1 - a) + colour * a
    return alpha


def _hole(img: np.ndarray, rng: np.random.Generator, area: float) -> np.ndarray:
    """Dark elliptical hole with a lit raised rim."""
    n = img.shape[0]
    ecc = rng.uniform(1.0, 1.8)
    rx = np.sqrt(area * 0.75 / np.pi * ecc)
    ry = rx / ecc
    rim = max(1.0, rx * rng.uniform(0.15, 0.3))
    dist, theta = _polar(rng, n, rx + rim)
    phi = rng.uniform(0, np.pi)
    t = theta - phi
    edge = rx * ry / np.hypot(ry * np.cos(t), rx * np.sin(t))  # ellipse radius at angle
    inner = np.clip(edge - dist + 0.5, 0.0, 1.0)[..., None]
    ring = np.clip(edge + rim - dist + 0.5, 0.0, 1.0)[..., None] - inner
    lit = 0.25 + 0.1 * np.cos(theta - rng.uniform(0, 2 * np.pi))[..., None]
    img[:] = img + ring * lit
    depth = 0.03 + 0.03 * rng.random((n, n, 1))
    img[:] = img * (1 - inner) + depth * inner
    return np.clip(inner + ring, 0.0, 1.0)[..., 0]


def _crack(img: np.ndarray, rng: np.random.Generator, area: float) -> np.ndarray:
    """Jagged dark line that may branch, like a fracture."""
    n = img.shape[0]
    width = rng.uniform(1.5, 3.0)
    length = float(np.clip(area / width, 0.12 * n, 0.6 * n))
    step = max(2.0, n / 40)
    start = rng.uniform(0.25 * n, 0.75 * n, size=2)
    heading = rng.uniform(0, 2 * np.pi)
    alpha = np.zeros((n, n))
    branches = [(start, heading, length, width)]
    while branches:
        pos, ang, remaining, w = branches.pop()
        pts = [pos]
        for _ in range(int(remaining / step)):
            ang += rng.normal(0, 0.15)  # slow drift of the overall direction
            seg = ang + rng.normal(0, 0.6)  # jagged zig-zag around it
            pos = np.clip(pos + step * np.array([np.cos(seg), np.sin(seg)]), 1, n - 2)
            pts.append(pos)
            if w > 1.4 and len(branches) < 3 and rng.random() < 0.08:
                side = ang + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
                branches.append((pos, side, remaining * 0.4, w * 0.7))
        if len(pts) > 1:
            alpha = np.maximum(alpha, _stroke_alpha(np.asarray(pts), w, n))
    img[:] = img * (1 - alpha[..., None] * rng.uniform(0.65, 0.85))
    return alpha


_DRAW = {"scratch": _scratch, "spot": _spot, "hole": _hole, "crack": _crack}


def render_pair(
    category: str, size: int, seed: int, defect: str, index: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(clean, defective, mask)`` as uint8 arrays; the clean image lets tests check the mask."""
    if defect not in _DRAW:
        raise AdtrError(f"unknown defect type {defect!r}; expected one of {', '.join(DEFECTS)}")
    kind = texture_kind(category)
    ss = _seed(seed, category, "test_defect", DEFECTS.index(defect), index)
    base_rng, defect_rng = (np.random.default_rng(s) for s in ss.spawn(2))
    clean = render_good(kind, size, base_rng)
    img = clean.copy()
    area = size * size * np.exp(defect_rng.uniform(np.log(0.001), np.log(0.03)))
    area = max(area, 12.0)  # keep tiny test images visibly defective
    alpha = _DRAW[defect](img, defect_rng, area)
    # The mask is exactly the pixels the defect changed visibly (>= _MASK_DELTA in some channel).
    changed = np.abs(img - clean).max(axis=2) >= _MASK_DELTA
    mask = (changed & (alpha > 0)).astype(np.uint8) * 255
    return _to_u8(clean), _to_u8(img), mask


def _seed(seed: int, category: str, split: str, *index: int) -> np.random.SeedSequence:
    """Per-image seed; the category's CRC keeps fabric and metal defects from sharing geometry."""
    return np.random.SeedSequence([seed, zlib.crc32(category.encode()), _SPLITS[split], *index])


def _to_u8(img: np.ndarray) -> np.ndarray:
    """Quantise a [0, 1] float image to uint8."""
    return np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def _save(arr: np.ndarray, path: Path) -> None:
    """Write a PNG (fast compression: the demo writes ~100 files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, compress_level=1)  # uint8 HxW -> "L", HxWx3 -> "RGB"


def make_dataset(
    root: Path,
    category: str = "fabric",
    size: int = 256,
    n_train: int = 60,
    n_test_good: int = 12,
    n_test_defect: int = 6,
    seed: int = 0,
) -> Path:
    """Write a synthetic MVTec-AD-style category under ``root`` and return its folder.

    Each image gets its own seed derived from ``(seed, split, index)``, so the
    output is reproducible and independent of how many images are requested.
    ``n_test_defect`` is per defect type (see :data:`DEFECTS`).
    """
    if size < 16:
        raise AdtrError(f"synthetic image size must be at least 16 px, got {size}")
    kind = texture_kind(category)
    out = Path(root) / category
    for split, count, folder in (("train", n_train, "train/good"), ("test_good", n_test_good, "test/good")):
        for i in range(count):
            rng = np.random.default_rng(_seed(seed, category, split, i))
            _save(_to_u8(render_good(kind, size, rng)), out / folder / f"{i:03d}.png")
    for defect in DEFECTS:
        for i in range(n_test_defect):
            _, img, mask = render_pair(category, size, seed, defect, i)
            _save(img, out / "test" / defect / f"{i:03d}.png")
            _save(mask, out / "ground_truth" / defect / f"{i:03d}_mask.png")
    return out
