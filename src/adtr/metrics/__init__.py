"""Evaluation metrics: image/pixel AUROC, F1-max and MVTec AD AU-PRO."""

from __future__ import annotations

from adtr.metrics.aupro import aupro, pro_curve
from adtr.metrics.auroc import f1_max, image_auroc, pixel_auroc, pixel_roc_curve, roc_curve

__all__ = ["aupro", "f1_max", "image_auroc", "pixel_auroc", "pixel_roc_curve", "pro_curve", "roc_curve"]
