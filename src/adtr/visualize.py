"""Heat-map overlays: image | anomaly map | overlay, for predict and the demo."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from adtr.checkpoint import atomic_write_bytes


def tensor_to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def colorize(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H, W) float map -> (H, W, 3) uint8 with the ``jet`` colour map, on a fixed scale."""
    span = max(vmax - vmin, 1e-12)
    norm = np.clip((amap - vmin) / span, 0.0, 1.0)
    return (colormaps["jet"](norm)[..., :3] * 255).astype(np.uint8)


def overlay_panel(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
                  mask: np.ndarray | None = None, alpha: float = 0.5) -> Image.Image:
    """Side by side: image | map | overlay (| ground truth when ``mask`` is given).

    ``vmin``/``vmax`` fix the colour scale across images (e.g. 0 and twice the
    threshold), so colours mean the same thing in every panel.
    """
    heat = colorize(amap, vmin, vmax)
    over = (image.astype(np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha).astype(np.uint8)
    tiles = [image, heat, over]
    if mask is not None:
        tiles.append(np.repeat((mask > 0).astype(np.uint8)[..., None] * 255, 3, axis=2))
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    row = [tiles[0]]
    for t in tiles[1:]:
        row += [gap, t]
    return Image.fromarray(np.concatenate(row, axis=1))


def save_png(img: Image.Image, path: Path) -> None:
    """Write a PNG atomically (no half-written files if interrupted)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(buf.getvalue(), path)


def montage(panels: list[Image.Image], columns: int = 1) -> Image.Image:
    """Stack panels in a grid (white background)."""
    w = max(p.width for p in panels)
    h = max(p.height for p in panels)
    rows = (len(panels) + columns - 1) // columns
    canvas = Image.new("RGB", (w * columns, h * rows), "white")
    for i, p in enumerate(panels):
        canvas.paste(p, ((i % columns) * w, (i // columns) * h))
    return canvas
