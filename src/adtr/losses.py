"""ADTR+ losses for the anomaly-available case (paper section 3.3, Eq. 6-9).

Pure, numerically stable functions; ``engine.fit`` applies them when ``config.plus.loss``
is ``pixel`` (Eq. 7) or ``image`` (Eq. 9).
"""

from __future__ import annotations

import math

import torch

#: The paper's weight of the push terms (alpha in Eq. 7 and Eq. 9).
ALPHA = 0.003


def pseudo_huber_map(features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """phi(u) = sqrt(a(u)^2 + 1) - 1 with a(u) = mean_i |d(i, u)| (Eq. 6).

    Args:
        features, reconstruction: (B, C, h, w).

    Returns:
        (B, h, w). Written as a^2 / (sqrt(a^2 + 1) + 1), which equals Eq. 6 but does not
        lose precision to cancellation when a is small.
    """
    a2 = (features - reconstruction).float().abs().mean(dim=1).pow(2)  # (B, h, w)
    return a2 / (torch.sqrt(a2 + 1.0) + 1.0)


def log1mexp(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """log(1 - exp(-x)) for x >= 0, stable at both ends (x is clamped to >= eps).

    Uses log(-expm1(-x)) below ln 2 and log1p(-exp(-x)) above (Maechler, 2012), so
    neither a tiny nor a large x gives -inf, NaN or a wrong value.
    """
    x = x.clamp_min(eps)
    small = x < math.log(2.0)
    return torch.where(small, torch.log(-torch.expm1(-x.clamp_max(math.log(2.0)))),
                       torch.log1p(-torch.exp(-x.clamp_min(math.log(2.0)))))


def pixel_push_pull_loss(phi: torch.Tensor, labels: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """L_px (Eq. 7), averaged over the batch.

    Args:
        phi: (B, h, w) pseudo-Huber map.
        labels: (B, h, w) pixel labels y(u) on the feature grid, 1 = anomalous.

    The pull term (1 - y) phi is averaged over all HW cells as in the paper. The push term
    only exists for images with anomalous cells: for an all-normal image Eq. 7's push term
    is log(1 - exp(0)) = -inf, which carries no information, so it is left out there.
    """
    y = labels.float()
    pull = ((1.0 - y) * phi).flatten(1).mean(dim=1)  # (B,)
    pushed = (y * phi).flatten(1).mean(dim=1)  # (B,)
    has_anomaly = y.flatten(1).amax(dim=1) > 0
    push = torch.where(has_anomaly, -alpha * log1mexp(pushed), torch.zeros_like(pushed))
    return (pull + push).mean()


def topk_score(phi: torch.Tensor, k: int = 20) -> torch.Tensor:
    """q = mean of the k largest phi(u) per image (Eq. 8): (B, h, w) -> (B,)."""
    flat = phi.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)


def image_push_pull_loss(phi: torch.Tensor, labels: torch.Tensor, k: int = 20, alpha: float = ALPHA) -> torch.Tensor:
    """L_img = (1 - y) q - alpha y log(1 - exp(-q)) (Eq. 9), averaged over the batch.

    Args:
        phi: (B, h, w) pseudo-Huber map. labels: (B,) image labels, 1 = anomalous.
    """
    q = topk_score(phi, k)
    y = labels.float()
    return ((1.0 - y) * q - alpha * y * log1mexp(q)).mean()
