"""Fig. 5: t-SNE of the feature difference vectors d(:, u) = f(u) - f_hat(u) (Eq. 2).

The paper samples 600 grid cells from test images, half inside defects and half
on normal texture, embeds their raw difference vectors with t-SNE and colours each
point by its anomaly score s(u) = ||d(:, u)||_2. If the model has learnt to
reconstruct only normal features, normal cells form a tight cluster near d = 0 and
defect cells lie far from it.

Labels come from the defect masks, pooled to the feature grid by area: a cell is
anomalous when at least half of its pixels are defect pixels, normal when none
is; cells in between are ambiguous (their vectors mix both) and left out.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from adtr.checkpoint import atomic_write_bytes
from adtr.data.dataset import ImageDataset
from adtr.data.samples import Sample
from adtr.detector import Detector
from adtr.errors import AdtrError

ANOMALOUS_FRACTION = 0.5  # a cell is anomalous when at least this share of its pixels is defect
NORMAL_POOL_FACTOR = 20  # normal candidates kept per requested vector (bounds memory on big test sets)
SCORE_LABEL = "anomaly score s(u)"


@dataclass(frozen=True)
class DifferenceVectors:
    """Sampled grid cells: ``vectors`` (n, C) d(:, u), ``anomalous`` (n,), ``scores`` (n,) s(u).

    ``scores`` is the model's own grid-level anomaly map (before upsampling and
    smoothing), so ``scores == ||vectors||_2`` row by row.
    """

    vectors: np.ndarray
    anomalous: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def _difference(detector: Detector, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) -> d (B, C, h, w) and s (B, h, w), both float32 on the detector's device.

    With ``error_space='standardized'`` the model scores the difference in per-channel
    std units, so d is taken in those units too: the embedded vectors are exactly the
    ones whose norm is the anomaly score.
    """
    out = detector.network(images.to(detector.device))
    diff = (out.features - out.reconstruction).float()
    model = getattr(detector.network, "model", None)
    if getattr(model, "error_space", "features") == "standardized":
        diff = diff / model.feature_std.float()
    return diff, out.anomaly_map[:, 0].float()


def _keep_smallest(keys: np.ndarray, rows: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``cap`` rows with the smallest random keys: a uniform subset, merged batch by batch."""
    if len(keys) <= cap:
        return keys, rows
    keep = np.argpartition(keys, cap - 1)[:cap]
    return keys[keep], rows[keep]


def sample_difference_vectors(detector: Detector, samples: Sequence[Sample], n: int = 600, seed: int = 0,
                              batch_size: int = 16) -> DifferenceVectors:
    """Run the model over ``samples`` and draw ``n`` cells, half anomalous and half normal.

    When there are fewer than ``n // 2`` anomalous cells all of them are taken and
    normal cells make up the rest (and vice versa), so the result has ``n`` rows
    whenever the images hold that many usable cells. Defective images without a
    mask are skipped: their defect cells would be counted as normal.
    """
    if n < 2:
        raise AdtrError(f"t-SNE needs at least 2 difference vectors, got n={n}")
    samples = list(samples)
    usable = [s for s in samples if s.mask is not None or s.label == 0]
    if not any(s.mask is not None for s in usable):
        raise AdtrError(f"t-SNE needs test images with defect masks to label grid cells; "
                        f"none of the {len(samples)} images has one")
    rng = np.random.default_rng(seed)
    cap = NORMAL_POOL_FACTOR * n
    anom_vec: list[np.ndarray] = []
    anom_score: list[np.ndarray] = []
    norm_keys = np.empty(0)
    norm_rows = np.empty((0, 0), np.float32)  # [score, d...] per normal candidate
    grid = (0, 0)
    loader = DataLoader(ImageDataset(usable, detector.image_size), batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        for batch in loader:
            diff, amap = _difference(detector, batch["image"])
            grid = tuple(amap.shape[-2:])
            frac = F.adaptive_avg_pool2d(batch["mask"].float(), grid)[:, 0].to(diff.device)  # (B, h, w)
            d = diff.permute(0, 2, 3, 1)  # (B, h, w, C): cells as rows
            is_anom = frac >= ANOMALOUS_FRACTION
            if is_anom.any():
                anom_vec.append(d[is_anom].cpu().numpy())
                anom_score.append(amap[is_anom].cpu().numpy())
            is_norm = frac == 0
            k = int(is_norm.sum())
            if k:
                rows = torch.cat([amap[is_norm][:, None], d[is_norm]], dim=1).cpu().numpy()
                if norm_rows.size == 0:
                    norm_rows = np.empty((0, rows.shape[1]), np.float32)
                norm_keys, norm_rows = _keep_smallest(np.concatenate([norm_keys, rng.random(k)]),
                                                      np.concatenate([norm_rows, rows]), cap)
    if not anom_vec:
        raise AdtrError(f"t-SNE needs test images with defect masks that cover at least half of a "
                        f"{grid[0]}x{grid[1]} grid cell ({detector.image_size // max(grid[0], 1)} px); "
                        f"no mask among the {len(usable)} images does")
    anom = np.concatenate(anom_vec).astype(np.float32)
    anom_s = np.concatenate(anom_score).astype(np.float32)
    n_anom = min(len(anom), n // 2)
    n_norm = min(len(norm_rows), n - n_anom)
    n_anom = min(len(anom), n - n_norm)  # too few normal cells: fill with anomalous ones
    pick_a = np.sort(rng.choice(len(anom), n_anom, replace=False))
    pick_n = np.sort(rng.choice(len(norm_rows), n_norm, replace=False)) if n_norm else np.empty(0, int)
    normal = norm_rows[pick_n] if n_norm else np.empty((0, anom.shape[1] + 1), np.float32)
    return DifferenceVectors(
        vectors=np.ascontiguousarray(np.concatenate([normal[:, 1:], anom[pick_a]]), dtype=np.float32),
        anomalous=np.concatenate([np.zeros(n_norm, bool), np.ones(n_anom, bool)]),
        scores=np.concatenate([normal[:, 0], anom_s[pick_a]]).astype(np.float32),
    )


def embed_tsne(vectors: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """(n, C) raw difference vectors -> (n, 2) t-SNE embedding (no standardisation, as in the paper).

    The perplexity is capped at (n - 1) / 3, the largest sklearn's neighbour search
    supports, so small samples still embed.
    """
    from sklearn.manifold import TSNE  # noqa: PLC0415 - heavy import, only needed here

    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or len(x) < 4:
        raise AdtrError(f"t-SNE needs at least 4 vectors as an (n, C) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise AdtrError("difference vectors contain NaN or inf; the model's output is broken")
    tsne = TSNE(n_components=2, perplexity=min(float(perplexity), (len(x) - 1) / 3.0), init="pca",
                random_state=seed)
    return tsne.fit_transform(x).astype(np.float32)


def plot_tsne(embedding: np.ndarray, anomalous: np.ndarray, scores: np.ndarray, path: str | Path,
              title: str = "") -> None:
    """Fig. 5 as a PNG: circles normal, triangles anomalous, colour = s(u) on one shared scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - no pyplot state
    from matplotlib.cm import ScalarMappable  # noqa: PLC0415
    from matplotlib.colors import Normalize  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415

    emb = np.asarray(embedding, dtype=np.float64)
    anom = np.asarray(anomalous, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[1] != 2 or anom.shape != (len(emb),) or s.shape != (len(emb),):
        raise ValueError(f"embedding (n, 2), anomalous (n,) and scores (n,) must agree; got "
                         f"{emb.shape}, {anom.shape}, {s.shape}")
    fig = Figure(figsize=(6, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lo, hi = (float(s.min()), float(s.max())) if len(s) else (0.0, 1.0)
    norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
    cmap = "jet"  # blue = low, red = high, as in the paper and the overlays
    style = {"cmap": cmap, "norm": norm, "s": 22, "edgecolors": "black", "linewidths": 0.3}
    ax.scatter(emb[~anom, 0], emb[~anom, 1], c=s[~anom], marker="o", **style)
    ax.scatter(emb[anom, 0], emb[anom, 1], c=s[anom], marker="^", **style)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=SCORE_LABEL)
    marker = {"linestyle": "none", "markerfacecolor": "lightgrey", "markeredgecolor": "black", "markersize": 7}
    ax.legend(handles=[Line2D([], [], marker="o", label="normal", **marker),
                       Line2D([], [], marker="^", label="anomalous", **marker)], loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(buf.getvalue(), Path(path))


def tsne_figure(run: str | Path, samples: Sequence[Sample], out_png: str | Path, n: int = 600, seed: int = 0,
                device: str | torch.device | None = None) -> DifferenceVectors:
    """Load ``run``, sample ``n`` difference vectors from ``samples``, embed and plot them to ``out_png``."""
    detector = Detector.load(run, device=device)
    diffs = sample_difference_vectors(detector, samples, n=n, seed=seed)
    embedding = embed_tsne(diffs.vectors, seed=seed)
    k = int(diffs.anomalous.sum())
    plot_tsne(embedding, diffs.anomalous, diffs.scores, out_png,
              title=f"t-SNE of d(:, u): {len(diffs) - k} normal, {k} anomalous cells")
    return diffs
