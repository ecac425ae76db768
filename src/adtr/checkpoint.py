"""Self-describing checkpoints, written atomically and loaded without pickle code.

A run directory holds ``model.pt`` (the finished model: config, weights of the
backbone and transformer, calibration, versions) and, while training,
``last.pt`` (the same plus optimiser and progress, for ``fit --resume``). Both
are plain tensors and containers, loaded with ``torch.load(weights_only=True)``,
so a file cannot run code when it is opened.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from adtr.errors import AdtrError, file_error, first_line

FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
LAST_FILE = "last.pt"


def package_version() -> str:
    from adtr import __version__

    return __version__


def versions() -> dict[str, str]:
    return {"adtr": package_version(), "torch": str(torch.__version__)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never half of one; the
    folder is synced too, so that after a power cut the rename is on disk before anything
    that follows it (fit removes last.pt only once model.pt is). The file gets the
    permissions a plain ``open`` would give it (mkstemp's are 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk, where the system allows it (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows opens no folders; its MoveFileEx is durable enough here
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (network, FUSE) refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(buf.getvalue(), path)


#: What to do about a damaged run file (our writes are atomic, so it was damaged after them).
DAMAGED_ADVICE = {
    LAST_FILE: "delete it and fit again into this folder (without --resume), or fit into another folder",
    MODEL_FILE: "restore it from a copy, or fit the run again",
}


def damaged(path: Path) -> str:
    """A truncated or damaged file, its size, and for a run's own files what to do about it."""
    advice = DAMAGED_ADVICE.get(path.name)
    return f"the file is truncated or damaged ({path.stat().st_size} bytes)" + (f"; {advice}" if advice else "")


def not_a_checkpoint(path: Path) -> str:
    """Why a file that is not a zip archive cannot be an adtr checkpoint, and what to do."""
    if path.name in DAMAGED_ADVICE or path.stat().st_size == 0:
        return damaged(path)
    if path.suffix.lower() == ".onnx":
        return ("an ONNX graph, not a checkpoint: give the run folder, with engine 'onnx' (--engine onnx) "
                "to score with it")
    return "not a checkpoint written by adtr (those are zip archives, like every torch.save file)"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and check a checkpoint written by :func:`atomic_save`."""
    if not path.is_file():
        raise file_error(path, "checkpoint not found")
    if not zipfile.is_zipfile(path):  # what torch.save writes; anything else is not unpickled at all
        raise file_error(path, f"cannot load checkpoint: {not_a_checkpoint(path)}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable file
        msg = first_line(exc)
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            msg = "refused: the file contains pickled objects other than tensors (possible code)"
        elif isinstance(exc, EOFError) or "zip archive" in str(exc) or "central directory" in str(exc):
            msg = damaged(path)
        raise file_error(path, f"cannot load checkpoint: {msg}") from exc
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise file_error(path, "not an adtr checkpoint")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise file_error(path, f"checkpoint format {ckpt['format_version']} is not supported "
                               f"(this adtr reads format {FORMAT_VERSION})")
    return ckpt


def check_compatible(ckpt: dict[str, Any], path: Path, backbone: str | None = None,
                     image_size: int | None = None, grid_stride: int | None = None) -> None:
    """Refuse a checkpoint whose backbone, input size or feature grid differs from what is asked."""
    model = ckpt.get("config", {}).get("model", {})
    if backbone is not None and model.get("backbone") != backbone:
        raise file_error(path, f"checkpoint was trained with backbone {model.get('backbone')}, not {backbone}")
    if image_size is not None and model.get("image_size") != image_size:
        raise file_error(path, f"checkpoint expects {model.get('image_size')}px images, not {image_size}px")
    if grid_stride is not None and model.get("grid_stride", 16) != grid_stride:
        raise file_error(path, f"checkpoint has a feature grid of stride {model.get('grid_stride', 16)}, "
                               f"not {grid_stride}")


def find_run_file(run_dir: Path) -> Path:
    """``model.pt`` of a run directory (or the path itself if it is a file)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    path = run_dir / MODEL_FILE
    if not path.is_file():
        if (run_dir / LAST_FILE).is_file():
            raise file_error(run_dir, "training did not finish: run `adtr fit --resume` to complete it")
        raise AdtrError(f"{run_dir}: not an adtr run (no {MODEL_FILE})")
    return path
