"""PaDiM and PatchCore on ADTR's frozen backbone, input size and data, for a side-by-side benchmark.

    python benchmarks/peers.py --root ../shared/data/mvtec_ad --categories bottle grid

Our own implementations of the two strongest memory-based peers:

* PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly
  Detection and Localization", ICPR 2020): one Gaussian per grid position over the
  first stages' features, a fixed random subset of d channels, Mahalanobis distance.
* PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection",
  CVPR 2022): locally aware (3x3-averaged) mid-level patch features, a greedy
  k-center coreset of the training patches, nearest-neighbour distance.

Both use ``FrozenBackbone("tf_efficientnet_lite0", "packaged", stages, stride)`` at
the same image size as ADTR (256, no centre crop), the same upsampling and Gaussian
smoothing (``pixel_anomaly_map``, sigma 4 as in both papers) and the same metrics.
EfficientNet-Lite0's timm stages 0-4 have strides 2, 4, 8, 16, 32 and 16, 24, 40,
112, 320 channels.

Each (category, method) runs in its own process so its peak RSS is its own (the
PatchCore coreset ratios share one process, and so one peak, since they share the
full patch bank). Rows go to ``peers.json`` and a table to ``peers.md``. Nothing
runs at import time: :func:`run_padim`, :func:`run_patchcore` and the classes can be
called from another benchmark in the same process.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from adtr.postprocess import pixel_anomaly_map

from provenance import (git_commit, machine_description, short_commit,  # benchmarks/ is on sys.path when run
                        write_results)

HERE = Path(__file__).resolve().parent
BACKBONE = "tf_efficientnet_lite0"

#: PaDiM: the paper's "first three layers" of a ResNet have strides 4, 8 and 16; by stride
#: that is our stages (1, 2, 3): 24 + 40 + 112 = 176 channels, on a stride-8 grid (32x32 at
#: 256 px). The paper uses stride-4 maps (56x56 at 224 px); stride 8 keeps the 1024
#: per-position covariances CPU-friendly.
PADIM_STAGES = (1, 2, 3)
PADIM_STRIDE = 8
#: PaDiM's random channel subset (ResNet-18: 100 of 448).
PADIM_DIM = 100
#: PatchCore: the paper's WideResNet-50 layer2 + layer3 have strides 8 and 16; by stride
#: that is our stages (2, 3): 40 + 112 = 152 channels, on the stride-8 grid.
PATCHCORE_STAGES = (2, 3)
PATCHCORE_STRIDE = 8
SIGMA = 4.0  # both papers smooth the upsampled map with a Gaussian of sigma 4


# --------------------------------------------------------------------------- PaDiM


class PaDiM:
    """Per-position multivariate Gaussian of patch features (Defard et al., 2020).

    Args:
        d: number of channels kept, a fixed random subset (the paper's dimensionality
            reduction; random did as well as PCA there). All channels when fewer.
        eps: covariance regulariser ``eps * I`` (paper: 0.01); it also keeps the
            covariance invertible with fewer training images than channels.
        seed: seed of the channel subset.
    """

    def __init__(self, d: int = PADIM_DIM, eps: float = 0.01, seed: int = 0) -> None:
        self.d, self.eps, self.seed = d, eps, seed
        self.channels: torch.Tensor | None = None  # (d,) indices of the kept channels
        self.mean: torch.Tensor | None = None  # (L, d), L = h * w positions
        self.whiten: torch.Tensor | None = None  # (L, d, d): chol(cov)^-1, so dist = ||W (x - mean)||
        self.grid: tuple[int, int] = (0, 0)

    def select_channels(self, num_channels: int) -> torch.Tensor:
        """Sorted seeded random subset of ``min(d, num_channels)`` channel indices."""
        if self.d >= num_channels:
            return torch.arange(num_channels)
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(num_channels, generator=g)[: self.d].sort().values

    def fit(self, features: torch.Tensor, chunk: int = 256) -> PaDiM:
        """Mean and covariance per position from training features (N, C, h, w).

        Statistics are computed in float64, ``chunk`` positions at a time, with the
        unbiased covariance (N - 1) as in the paper; the Cholesky factor's inverse is
        stored so scoring is one batched matmul and distances are never negative.
        """
        n, c, h, w = features.shape
        self.grid = (h, w)
        self.channels = self.select_channels(c).to(features.device)
        x = features.index_select(1, self.channels).flatten(2)  # (N, d, L)
        d, num_pos = x.shape[1], x.shape[2]
        eye = torch.eye(d, dtype=torch.float64, device=features.device)
        means, whitens = [], []
        for start in range(0, num_pos, chunk):
            xs = x[:, :, start:start + chunk].permute(2, 0, 1).double()  # (l, N, d)
            mu = xs.mean(dim=1)  # (l, d)
            centred = xs - mu[:, None]  # (l, N, d)
            cov = centred.transpose(1, 2) @ centred / max(n - 1, 1) + self.eps * eye  # (l, d, d)
            chol = torch.linalg.cholesky(cov)  # (l, d, d) lower
            whitens.append(torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False).float())
            means.append(mu.float())
        self.mean = torch.cat(means)  # (L, d)
        self.whiten = torch.cat(whitens)  # (L, d, d)
        return self

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance per position: (B, C, h, w) -> (B, h, w)."""
        if self.mean is None or self.whiten is None or self.channels is None:
            raise RuntimeError("PaDiM.score before fit")
        b, _, h, w = features.shape
        if (h, w) != self.grid:
            raise ValueError(f"feature grid {(h, w)} differs from the fitted grid {self.grid}")
        x = features.to(self.mean).index_select(1, self.channels).flatten(2)  # (B, d, L), float32
        delta = x.permute(2, 1, 0) - self.mean[:, :, None]  # (L, d, B)
        dist = (self.whiten @ delta).norm(dim=1)  # (L, B)
        return dist.T.reshape(b, h, w)

    def predict(self, features: torch.Tensor, size: tuple[int, int], sigma: float = SIGMA
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel maps (B, H, W) (upsampled, smoothed) and image scores (B,) = map maximum (paper)."""
        maps = pixel_anomaly_map(self.score(features)[:, None], size, sigma)[:, 0]  # (B, H, W)
        return maps, maps.flatten(1).amax(dim=1)


# ----------------------------------------------------------------------- PatchCore


def locally_aware(features: torch.Tensor, patch_size: int = 3) -> torch.Tensor:
    """PatchCore's local neighbourhood aggregation: p x p average, stride 1 (paper: p = 3).

    Borders average only the cells that exist (``count_include_pad=False``), so edge
    patches are not pulled towards zero. (B, C, h, w) -> (B, C, h, w).
    """
    return F.avg_pool2d(features, patch_size, stride=1, padding=patch_size // 2, count_include_pad=False)


def random_projection(dim_in: int, dim_out: int, seed: int) -> torch.Tensor:
    """Seeded Gaussian Johnson-Lindenstrauss matrix (dim_in, dim_out), scaled to keep norms."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim_in, dim_out, generator=g) / math.sqrt(dim_out)


def coreset_size(n: int, ratio: float) -> int:
    """ceil(ratio * n), at least 1 and at most n (rounded first so 0.1 * 30 stays 3)."""
    return min(n, max(1, math.ceil(round(ratio * n, 6))))


def greedy_coreset(bank: torch.Tensor, ratio: float, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``bank`` (N, D) (PatchCore, Algorithm 1).

    Starting from a seeded random patch, repeatedly add the patch farthest from the
    current selection, which approximately minimises the largest distance from any
    patch to its nearest selected one. As in the paper, distances are measured after a
    seeded random projection to ``projection_dim`` dimensions; when D is not larger
    there is nothing to gain and the features are used as they are.

    Returns:
        (M,) int64 indices, M = ceil(ratio * N), in selection order.
    """
    n, dim = bank.shape
    m = coreset_size(n, ratio)
    if m >= n:
        return torch.arange(n, device=bank.device)
    x = bank.float()
    if dim > projection_dim:
        x = x @ random_projection(dim, projection_dim, seed).to(x.device)  # (N, k)
    sq = (x * x).sum(dim=1)  # (N,)
    g = torch.Generator().manual_seed(seed)
    current = int(torch.randint(n, (1,), generator=g))
    selected = torch.empty(m, dtype=torch.long)
    min_dist = torch.full((n,), float("inf"), device=x.device)  # squared distance to the selection
    for i in range(m):
        selected[i] = current
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one mat-vec per step instead of an (N, D) difference.
        d = torch.addmv(sq, x, x[current], alpha=-2).add_(sq[current]).clamp_min_(0)  # (N,)
        torch.minimum(min_dist, d, out=min_dist)
        min_dist[current] = 0  # exact zero despite float rounding: never picked again
        current = int(min_dist.argmax())
    return selected.to(bank.device)


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, chunk_size: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance to, and index of, the nearest bank row: (Q, D), (M, D) -> (Q,), (Q,).

    ``torch.cdist`` over chunks of queries bounds memory at ``chunk_size * M`` floats
    (default: about 16 M). Its fast matmul path loses precision for near-identical
    vectors, so the winning distance is recomputed exactly (a training patch scores 0).
    """
    if chunk_size is None:
        chunk_size = max(1, (1 << 24) // max(1, len(bank)))
    dists, idxs = [], []
    for q in queries.split(chunk_size):
        idx = torch.cdist(q, bank).argmin(dim=1)  # (q,)
        dists.append((q - bank[idx]).norm(dim=1))
        idxs.append(idx)
    return torch.cat(dists), torch.cat(idxs)


class PatchCore:
    """Memory bank of locally aware training patches (Roth et al., CVPR 2022).

    Args:
        coreset_ratio: fraction of training patches kept by the greedy coreset (paper: 0.1, 0.01, 0.001).
        projection_dim: random-projection dimensionality for the coreset distances (paper: 128).
        seed: seed of the projection and of the coreset's first patch.
        reweight: apply the paper's image-score reweighting (Eq. 7). Off by default: the
            paper reports it as a small refinement and many reproductions (anomalib among
            them) show the plain maximum is close; it costs one extra bank search per image.
        num_neighbors: b of the reweighting, neighbours of the nearest bank patch (paper: b = 9).
        chunk_size: queries per ``cdist`` chunk (``None``: about 16 M distances per chunk).
    """

    def __init__(self, coreset_ratio: float = 0.1, projection_dim: int = 128, seed: int = 0, reweight: bool = False,
                 num_neighbors: int = 9, chunk_size: int | None = None) -> None:
        self.coreset_ratio, self.projection_dim, self.seed = coreset_ratio, projection_dim, seed
        self.reweight, self.num_neighbors, self.chunk_size = reweight, num_neighbors, chunk_size
        self.bank: torch.Tensor | None = None  # (M, C)

    @staticmethod
    def patches(features: torch.Tensor) -> torch.Tensor:
        """Locally aware patch vectors, one per grid cell: (B, C, h, w) -> (B * h * w, C)."""
        return locally_aware(features).permute(0, 2, 3, 1).flatten(0, 2)

    def fit(self, features: torch.Tensor) -> PatchCore:
        """Memory bank from training features (N, C, h, w): all patches, then the coreset."""
        full = self.patches(features.float())  # (N * h * w, C)
        self.bank = self.fit_bank(full, self.coreset_ratio)
        return self

    def fit_bank(self, full: torch.Tensor, ratio: float) -> torch.Tensor:
        """Coreset rows of an already built full patch bank (lets several ratios share it)."""
        return full[greedy_coreset(full, ratio, self.projection_dim, self.seed)].contiguous()

    def score_patches(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch scores (B, h, w) = distance to the nearest bank patch, and that patch's index (B, h, w)."""
        if self.bank is None:
            raise RuntimeError("PatchCore.score before fit")
        b, _, h, w = features.shape
        dist, idx = nearest_neighbours(self.patches(features.to(self.bank)), self.bank, self.chunk_size)
        return dist.view(b, h, w), idx.view(b, h, w)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Patch anomaly scores on the grid: (B, C, h, w) -> (B, h, w)."""
        return self.score_patches(features)[0]

    def image_scores(self, features: torch.Tensor, patch_scores: torch.Tensor, nn_index: torch.Tensor
                     ) -> torch.Tensor:
        """Image score (B,): the largest patch score s*, optionally reweighted (paper Eq. 7).

        Reweighting: ``s = s* * (1 - e^{||m - m*||} / sum_{n in N_b(m*)} e^{||m - n||})`` with
        m the worst test patch, m* its nearest bank patch and N_b(m*) the b bank patches
        nearest to m* (m* itself among them). It raises the score when m* lies in a
        sparse part of the bank, where its neighbours are far from m as well.
        """
        flat = patch_scores.flatten(1)  # (B, L)
        s_star, worst = flat.max(dim=1)  # (B,), (B,)
        if not self.reweight:
            return s_star
        assert self.bank is not None
        b = min(self.num_neighbors, len(self.bank))
        rows = worst + torch.arange(len(flat), device=flat.device) * flat.shape[1]
        m_test = self.patches(features.to(self.bank))[rows]  # (B, C)
        m_star = self.bank[nn_index.flatten(1).gather(1, worst[:, None])[:, 0]]  # (B, C)
        neighbours = torch.cdist(m_star, self.bank).topk(b, largest=False).indices  # (B, b), m* (distance 0) first
        dists = (m_test[:, None] - self.bank[neighbours]).norm(dim=2)  # (B, b)
        # e^{d*} / sum_n e^{d_n} computed stably as exp(d* - logsumexp(d_n)); d* = s* is exact.
        weight = 1 - torch.exp(s_star - torch.logsumexp(dists, dim=1))
        return weight * s_star

    def predict(self, features: torch.Tensor, size: tuple[int, int], sigma: float = SIGMA
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel maps (B, H, W) (upsampled, smoothed) and image scores (B,) from the patch grid."""
        patch_scores, nn_index = self.score_patches(features)
        maps = pixel_anomaly_map(patch_scores[:, None], size, sigma)[:, 0]  # (B, H, W)
        return maps, self.image_scores(features, patch_scores, nn_index)


# ---------------------------------------------------------------- benchmark harness


class Peer(Protocol):
    def predict(self, features: torch.Tensor, size: tuple[int, int], sigma: float = SIGMA
                ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class EvalSplit:
    """Decoded test split: images (N, 3, S, S) in [0, 1], masks (N, S, S) bool, labels (N,)."""

    images: torch.Tensor
    masks: np.ndarray
    labels: np.ndarray
    defect_types: list[str]
    has_masks: bool


def load_test_set(samples: Sequence[Any], image_size: int) -> EvalSplit:
    """Decode every test image and mask once (shared by all methods in one process)."""
    from adtr.data import ImageDataset, has_masks

    ds = ImageDataset(samples, image_size)
    items = [ds[i] for i in range(len(ds))]
    return EvalSplit(torch.stack([it["image"] for it in items]),
                   np.stack([it["mask"][0].numpy() > 0.5 for it in items]),
                   np.array([s.label for s in samples]), [s.defect_type for s in samples], has_masks(samples))


def build_backbone(stages: Sequence[int], grid_stride: int, weights: str = "packaged", name: str = BACKBONE):
    """ADTR's frozen backbone with the peer's stages and grid."""
    from adtr.models.backbone import FrozenBackbone

    return FrozenBackbone(name, weights, tuple(stages), grid_stride)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def score_test_set(backbone: torch.nn.Module, method: Peer, test: EvalSplit, device: torch.device, sigma: float,
                   batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Pixel maps (N, S, S) float32 and image scores (N,) for the whole test split."""
    maps, scores = [], []
    size = tuple(test.images.shape[-2:])
    for x in test.images.split(batch_size):
        m, s = method.predict(backbone(x.to(device)), size, sigma)
        maps.append(m.float().cpu().numpy())
        scores.append(s.float().cpu().numpy())
    return np.concatenate(maps), np.concatenate(scores)


@torch.no_grad()
def time_inference(backbone: torch.nn.Module, method: Peer, images: torch.Tensor, batch_size: int, repeats: int,
                   sigma: float = SIGMA, warmup: int = 2) -> dict[str, float]:
    """Median ms/image of backbone, scoring (map + image score) and total at one batch size (decoded images)."""
    x = images[:batch_size]
    while len(x) < batch_size:
        x = torch.cat([x, images[: batch_size - len(x)]])
    device = next(backbone.parameters()).device
    x = x.to(device)
    size = tuple(x.shape[-2:])
    times: dict[str, list[float]] = {"backbone": [], "scoring": [], "total": []}
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        feats = backbone(x)
        sync(device)
        t1 = time.perf_counter()
        method.predict(feats, size, sigma)
        sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            times["backbone"].append(t1 - t0)
            times["scoring"].append(t2 - t1)
            times["total"].append(t2 - t0)
    return {k: 1000 * float(np.median(v)) / batch_size for k, v in times.items()}


def metrics_of(test: EvalSplit, maps: np.ndarray, scores: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """Overall and per-defect-type metrics (image AUROC, F1-max, pixel AUROC, AUPRO), as ``evaluate`` does."""
    from adtr.evaluate import compute_metrics

    keep = ("n_images", "n_anomalous", "image_auroc", "image_f1_max", "pixel_auroc", "aupro")

    def pick(sel: np.ndarray, masks_ok: bool) -> dict[str, Any]:
        # No calibrated threshold for the peers: the threshold rates are dropped.
        m = compute_metrics(test.labels[sel], scores[sel], test.masks[sel] if masks_ok else None, maps[sel],
                            float("inf"))
        return {k: m[k] for k in keep}

    everything = np.ones(len(test.labels), dtype=bool)
    overall = pick(everything, test.has_masks)
    per_type = {}
    for t in sorted({t for t, label in zip(test.defect_types, test.labels) if label == 1}):
        sel = np.array([label == 0 or dt == t for dt, label in zip(test.defect_types, test.labels)])
        per_type[t] = pick(sel, test.has_masks)
    return overall, per_type


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure(method_name: str, settings: dict[str, Any], backbone: torch.nn.Module, method: Peer, test: EvalSplit,
            device: torch.device, sigma: float, fit_seconds: float, extract_seconds: float,
            timing_repeats: tuple[int, int] = (20, 3)) -> dict[str, Any]:
    """One result row: metrics on the test split, timings at batch 1 and 32, peak RSS so far."""
    maps, scores = score_test_set(backbone, method, test, device, sigma)
    overall, per_type = metrics_of(test, maps, scores)
    images = test.images[:32]
    b1 = time_inference(backbone, method, images, 1, timing_repeats[0], sigma)
    b32 = time_inference(backbone, method, images, 32, timing_repeats[1], sigma)
    return {
        "method": method_name, "settings": settings, **overall,
        "fit_seconds": round(fit_seconds, 1), "extract_seconds": round(extract_seconds, 1),
        "ms_per_image_b1": round(b1["total"], 2), "ms_per_image_b32": round(b32["total"], 2),
        "ms_backbone_b1": round(b1["backbone"], 2), "ms_scoring_b1": round(b1["scoring"], 2),
        "ms_backbone_b32": round(b32["backbone"], 2), "ms_scoring_b32": round(b32["scoring"], 2),
        "peak_rss_mb": peak_rss_mb(), "per_type": per_type,
    }


def extract_train(backbone: torch.nn.Module, train: Sequence[Any], image_size: int, device: torch.device
                  ) -> tuple[torch.Tensor, float]:
    """Training features (N, C, h, w) in memory, and the seconds it took."""
    from adtr.features import extract_features

    t0 = time.perf_counter()
    feats = extract_features(backbone, train, image_size, device, mode="memory", desc="train features")
    return feats.to(device), time.perf_counter() - t0


def run_padim(train: Sequence[Any], test: EvalSplit, image_size: int = 256, device: str | torch.device = "cpu",
              stages: Sequence[int] = PADIM_STAGES, grid_stride: int = PADIM_STRIDE, d: int = PADIM_DIM,
              seed: int = 0, sigma: float = SIGMA, weights: str = "packaged",
              timing_repeats: tuple[int, int] = (20, 3)) -> dict[str, Any]:
    """Fit PaDiM on ``train`` samples and measure it on ``test``: one row."""
    device = torch.device(device)
    backbone = build_backbone(stages, grid_stride, weights).to(device)
    feats, extract_s = extract_train(backbone, train, image_size, device)
    t0 = time.perf_counter()
    padim = PaDiM(d=d, seed=seed).fit(feats)
    sync(device)
    fit_s = time.perf_counter() - t0 + extract_s
    del feats
    assert padim.channels is not None
    settings = {"backbone": backbone.name, "stages": list(stages), "grid_stride": grid_stride,
                "image_size": image_size, "d": int(len(padim.channels)), "channels": backbone.out_channels,
                "eps": padim.eps, "sigma": sigma, "seed": seed, "image_score": "max of map"}
    return measure("PaDiM", settings, backbone, padim, test, device, sigma, fit_s, extract_s, timing_repeats)


def run_patchcore(train: Sequence[Any], test: EvalSplit, image_size: int = 256, device: str | torch.device = "cpu",
                  ratios: Sequence[float] = (0.1,), stages: Sequence[int] = PATCHCORE_STAGES,
                  grid_stride: int = PATCHCORE_STRIDE, projection_dim: int = 128, seed: int = 0,
                  reweight: bool = False, sigma: float = SIGMA, weights: str = "packaged",
                  timing_repeats: tuple[int, int] = (20, 3)) -> list[dict[str, Any]]:
    """Fit PatchCore once per coreset ratio (sharing the extracted features) and measure each: rows."""
    device = torch.device(device)
    backbone = build_backbone(stages, grid_stride, weights).to(device)
    feats, extract_s = extract_train(backbone, train, image_size, device)
    t0 = time.perf_counter()
    full = PatchCore.patches(feats)  # (N * h * w, C)
    bank_s = time.perf_counter() - t0
    del feats
    rows = []
    for ratio in ratios:
        core = PatchCore(ratio, projection_dim, seed, reweight)
        t0 = time.perf_counter()
        core.bank = core.fit_bank(full, ratio)
        sync(device)
        fit_s = time.perf_counter() - t0 + bank_s + extract_s
        settings = {"backbone": backbone.name, "stages": list(stages), "grid_stride": grid_stride,
                    "image_size": image_size, "channels": backbone.out_channels, "coreset_ratio": ratio,
                    "projection_dim": projection_dim if backbone.out_channels > projection_dim else None,
                    "bank_size": len(core.bank), "full_bank_size": len(full), "patch_size": 3,
                    "reweight": reweight, "sigma": sigma, "seed": seed}
        rows.append(measure("PatchCore", settings, backbone, core, test, device, sigma, fit_s, extract_s,
                            timing_repeats))
    return rows


# ----------------------------------------------------------------------------- CLI


def label(row: dict[str, Any]) -> str:
    s = row["settings"]
    if row["method"] == "PatchCore":
        return f"PatchCore ({100 * s['coreset_ratio']:g}% coreset{', reweighted' if s['reweight'] else ''})"
    return f"PaDiM (d={s['d']})"


def markdown(rows: list[dict[str, Any]]) -> str:
    """Overall table: one line per (category, method)."""
    f = lambda v: "absent" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| category | method | image AUROC | pixel AUROC | AUPRO | fit (s) | ms/img b1 (backbone + scoring) "
             "| ms/img b32 | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['category']} | {label(r)} | {f(r['image_auroc'])} | {f(r['pixel_auroc'])} | "
                     f"{f(r['aupro'])} | {r['fit_seconds']:.0f} | {r['ms_per_image_b1']:.1f} "
                     f"({r['ms_backbone_b1']:.1f} + {r['ms_scoring_b1']:.1f}) | {r['ms_per_image_b32']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def report(rows: list[dict[str, Any]]) -> str:
    """The markdown file: header, overall table, settings, per-defect-type table."""
    f = lambda v: "absent" if v is None else f"{v:.3f}"  # noqa: E731
    per_type = ["| category | method | defect type | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|---|"]
    for r in rows:
        for t, m in r["per_type"].items():
            per_type.append(f"| {r['category']} | {label(r)} | {t} | {f(m['image_auroc'])} | "
                            f"{f(m['pixel_auroc'])} | {f(m['aupro'])} |")
    settings = sorted({(label(r), json.dumps({k: v for k, v in r["settings"].items()
                                              if k not in ("bank_size", "full_bank_size")})) for r in rows})
    head = rows[0]
    return ("# MVTec AD, peers on ADTR's backbone (our PaDiM and PatchCore)\n\n"
            f"Commit `{short_commit(head['commit'])}`, torch {head['torch']}, {head['threads']} threads, {head['machine']}. "
            "Timings: median over repeats, image already decoded, backbone + scoring (map, upsampling, smoothing, "
            "image score); fit time includes training-feature extraction (and, for PatchCore, the coreset). "
            "Peak RSS is per process (PatchCore's coreset ratios share one).\n\n" + markdown(rows)
            + "\nSettings:\n\n" + "\n".join(f"- {name}: `{s}`" for name, s in settings)
            + "\n\nPer defect type (each type against all good test images):\n\n" + "\n".join(per_type) + "\n")


def run_single(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One category and one method in this process: its rows."""
    from adtr.data import index_mvtec

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    train = index_mvtec(args.root, args.single, "train")
    test = load_test_set(index_mvtec(args.root, args.single, "test"), args.image_size)
    common = {"image_size": args.image_size, "device": args.device, "seed": args.seed, "weights": args.weights}
    if args.method == "padim":
        rows = [run_padim(train, test, stages=args.padim_stages, grid_stride=args.padim_stride, d=args.padim_d,
                          **common)]
    else:
        rows = run_patchcore(train, test, ratios=args.coreset, stages=args.patchcore_stages,
                             grid_stride=args.patchcore_stride, reweight=args.reweight, **common)
    machine = machine_description()
    extra = {"category": args.single, "commit": git_commit(), "torch": torch.__version__,
             "threads": torch.get_num_threads(), "machine": machine}
    return [{**extra, **r} for r in rows]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="MVTec AD root folder")
    p.add_argument("--categories", nargs="+", default=["bottle", "grid"])
    p.add_argument("--methods", nargs="+", choices=("padim", "patchcore"), default=["padim", "patchcore"])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--coreset", type=float, nargs="+", default=[0.1, 0.01], help="PatchCore coreset ratios")
    p.add_argument("--reweight", action="store_true", help="PatchCore image-score reweighting (paper Eq. 7)")
    p.add_argument("--padim-stages", type=int, nargs="+", default=list(PADIM_STAGES))
    p.add_argument("--padim-stride", type=int, default=PADIM_STRIDE)
    p.add_argument("--padim-d", type=int, default=PADIM_DIM)
    p.add_argument("--patchcore-stages", type=int, nargs="+", default=list(PATCHCORE_STAGES))
    p.add_argument("--patchcore-stride", type=int, default=PATCHCORE_STRIDE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (as benchmarks/mvtec.py times ADTR) or cuda")
    p.add_argument("--weights", default="packaged", help="backbone weights: packaged | hub | none | file")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default). On a CPU shared with another job, 1 avoids "
                        "threads waiting on each other, which can make small batches take seconds")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where NAME.json/.md go")
    p.add_argument("--name", default="peers", help="output file stem (default peers)")
    p.add_argument("--single", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--row-json", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.single:
        args.row_json.write_text(json.dumps(run_single(args), indent=2))
        return
    # The children get the same options; --categories/--methods/--out are ignored there.
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for cat in args.categories:
            for method in args.methods:
                row_json = Path(tmp) / f"{cat}-{method}.json"
                cmd = [sys.executable, __file__, *argv, "--single", cat, "--method", method, "--row-json",
                       str(row_json)]
                print(f"== {cat}: {method}", flush=True)
                subprocess.run(cmd, check=True)
                new = json.loads(row_json.read_text())
                rows.extend(new)
                print(markdown(new), flush=True)
    write_results(args.out, args.name, rows, report(rows))


if __name__ == "__main__":
    main()
