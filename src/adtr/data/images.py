"""Finding and decoding image and mask files.

Every decode goes through :func:`_open_loaded`, so a missing, empty, truncated or
non-image file surfaces as a one-line :class:`AdtrError` naming the file instead
of a traceback from deep inside PIL. Unusual modes (16-bit, float, CMYK, palette
with transparency) are normalised here so the rest of the code only sees RGB.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from adtr.errors import AdtrError, file_error, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# The PIL decoders behind IMAGE_SUFFIXES, and the only ones any file or upload is given to,
# whatever its suffix: an EPS named .png would otherwise reach Ghostscript where installed.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")

_UINT16_MAX = 65535.0


def require_dir(folder: str | Path, what: str = "folder") -> Path:
    """Return ``folder`` as a Path, or raise if it is not an existing directory."""
    folder = Path(folder)
    if not folder.exists():
        raise file_error(folder, f"{what} does not exist")
    if not folder.is_dir():
        raise file_error(folder, f"{what} is not a directory")
    return folder


def list_images(folder: str | Path, *, allow_empty: bool = False) -> list[Path]:
    """Sorted image files directly inside ``folder`` (hidden files skipped).

    Two files with the same stem (``000.png`` and ``000.jpg``) are an error: masks
    and per-image outputs are matched by stem, so the pairing would be ambiguous.
    """
    folder = require_dir(folder)
    candidates = [p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES]
    images = sorted(p for p in candidates if p.is_file())
    for path in candidates:  # an image name that is not a readable file is a mistake worth stopping for
        if path.is_symlink() and not path.exists():
            raise file_error(path, "symbolic link that leads nowhere (missing target or a loop)")
        if path.exists() and not path.is_file() and not path.is_dir():
            raise file_error(path, "not a regular file (a folder, pipe, socket or device)")
    if not images and not allow_empty:
        raise file_error(folder, f"no images found (accepted suffixes: {', '.join(IMAGE_SUFFIXES)})")
    seen: dict[str, Path] = {}
    for path in images:
        if path.stem in seen:
            raise file_error(
                path, f"same name as {seen[path.stem].name} in the same folder; keep only one of them"
            )
        seen[path.stem] = path
    return images


def _open_loaded(path: str | Path) -> Image.Image:
    """Open and fully decode ``path``, turning every failure into an AdtrError."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise file_error(path, "symbolic link that leads nowhere (missing target or a loop)")
    if not path.exists():
        raise file_error(path, "file does not exist")
    if not path.is_file():
        raise file_error(path, "not a regular file (a folder, pipe, socket or device)")
    if path.stat().st_size == 0:
        raise file_error(path, "file is empty (0 bytes)")
    return _decode(path, path, formats=IMAGE_FORMATS)


def _decode(source: str | Path | BinaryIO, name: str | Path, max_pixels: int | None = None,
            formats: tuple[str, ...] | None = None) -> Image.Image:
    """Fully decode ``source`` (a path or a binary stream); errors name ``name``.

    ``max_pixels`` refuses larger images from their header, before any pixel is decoded;
    ``formats`` (PIL format names) restricts the decoders tried.
    """
    try:
        with Image.open(source, formats=formats) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise file_error(name, f"image is {img.width}x{img.height} pixels, more than the limit of "
                                       f"{max_pixels} pixels")
            img.load()
            return img
    except AdtrError:
        raise
    except UnidentifiedImageError as exc:  # PIL's own message names a stream object, not the file
        accepted = f" (accepted: {', '.join(formats)})" if formats else ""
        raise file_error(name, f"cannot read image: not a recognised image file{accepted}") from exc
    except Exception as exc:  # PIL raises many unrelated types on corrupt input.
        raise file_error(name, f"cannot read image: {failure_reason(exc)}") from exc


def failure_reason(exc: BaseException) -> str:
    """One line saying why a file could not be read, without repeating its path."""
    if isinstance(exc, UnidentifiedImageError):
        return f"not a recognised image file (accepted: {', '.join(IMAGE_FORMATS)})"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return exc.strerror
    return first_line(exc)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding pixels."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            return img.size
    except Exception as exc:  # noqa: BLE001 - any failure means an unreadable file
        raise file_error(path, f"cannot read image: {failure_reason(exc)}") from exc


def check_mask_fits(image: tuple[int, int], mask: tuple[int, int], mask_path: str | Path,
                    image_path: str | Path) -> None:
    """A mask must cover its image: the same size, or a rescaled copy (same aspect ratio within 2%).

    Masks are resized to the model's input with nearest neighbour, so a mask of another
    shape would silently mark the wrong pixels.
    """
    (iw, ih), (mw, mh) = image, mask
    if (iw, ih) == (mw, mh):
        return
    if abs((mw / mh) / (iw / ih) - 1) > 0.02:
        raise file_error(mask_path, f"mask is {mw}x{mh} pixels but its image {Path(image_path).name} is {iw}x{ih}: "
                                    "a mask must have its image's size (or the same aspect ratio)")


def verify_image(path: str | Path) -> None:
    """Cheaply check that ``path`` is a readable image, without decoding pixels."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        _open_loaded(path)  # Raises the matching "missing"/"empty" error.
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            img.verify()
    except Exception as exc:
        raise file_error(path, f"cannot read image: {failure_reason(exc)}") from exc


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a 16-bit, 32-bit int or float grey image to 0..255 by its type's range.

    Mode ``I`` is assumed to hold 16-bit data (16-bit PNG/TIFF is where it comes from).
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
    else:
        arr = np.clip(arr, 0.0, _UINT16_MAX) / 257.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become black."""
    if img.mode == "RGB":
        return img
    if img.mode == "F" or img.mode == "I" or img.mode.startswith("I;16"):
        return Image.fromarray(_high_depth_to_uint8(img)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        black = Image.new("RGB", rgba.size, (0, 0, 0))
        black.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return black
    return img.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    """Read ``path`` as an RGB image, or raise AdtrError naming the file."""
    img = _open_loaded(path)
    try:
        return to_rgb(img)
    except Exception as exc:  # An exotic mode PIL cannot convert.
        raise file_error(path, f"cannot convert image mode {img.mode} to RGB: {exc}") from exc


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """Decode an in-memory image file (an upload) as RGB, with :func:`read_image`'s errors naming ``name``."""
    if not data:
        raise file_error(name, "file is empty (0 bytes)")
    img = _decode(io.BytesIO(data), name, max_pixels, IMAGE_FORMATS)
    try:
        return to_rgb(img)
    except Exception as exc:  # An exotic mode PIL cannot convert.
        raise file_error(name, f"cannot convert image mode {img.mode} to RGB: {exc}") from exc


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise AdtrError(f"image size must be a positive integer, got {size!r}")


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Resize to ``size`` x ``size`` (bilinear, antialiased) as float32 (3,S,S) in [0,1]."""
    _check_size(size)
    img = to_rgb(img).resize((size, size), Image.Resampling.BILINEAR)
    arr = np.array(img, dtype=np.uint8)  # Copy: torch needs a writable buffer.
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def _mask_values(img: Image.Image) -> tuple[np.ndarray, float]:
    """Mask pixel values in their native range, plus that range's maximum."""
    if img.mode == "F":
        return np.nan_to_num(np.asarray(img, dtype=np.float64)), 255.0
    if img.mode == "I" or img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.float64), _UINT16_MAX
    if img.mode in ("1", "L"):
        return np.asarray(img.convert("L"), dtype=np.float64), 255.0
    # Colour masks: a pixel is marked if any colour channel is (alpha ignored).
    rgb = np.asarray(img.convert("RGBA"), dtype=np.float64)[..., :3]  # via RGBA: no PIL warning for P+tRNS
    return rgb.max(axis=2), 255.0


def read_mask(path: str | Path, size: int) -> torch.Tensor:
    """Read a defect mask as a bool (S,S) tensor, resized with nearest neighbour.

    Masks saved as 0/1 (max value <= 1) count any nonzero pixel as defect; others
    use half the type's range (128 for 8-bit), which tolerates JPEG-ish noise.
    """
    _check_size(size)
    img = _open_loaded(path)
    try:
        values, type_max = _mask_values(img)
    except Exception as exc:
        raise file_error(path, f"cannot read mask with image mode {img.mode}: {exc}") from exc
    if values.size and values.max() <= 1.0:
        binary = values > 0
    else:
        binary = values >= (type_max + 1.0) / 2.0
    small = Image.fromarray(binary.astype(np.uint8) * 255)
    small = small.resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.array(small) > 0)
