from __future__ import annotations

import os
import pickle

import pytest
import torch

from adtr import checkpoint as ckpt_io
from adtr.errors import AdtrError


def test_atomic_save_roundtrip_and_no_leftovers(tmp_path):
    path = tmp_path / "run" / "x.pt"
    ckpt_io.atomic_save({"format_version": ckpt_io.FORMAT_VERSION, "w": torch.ones(3)}, path)
    assert torch.equal(ckpt_io.load_checkpoint(path)["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]


def test_atomic_write_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    """The rename reaches the disk with the data: a power cut cannot undo it after fit has
    gone on to remove last.pt."""
    import stat

    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    ckpt_io.atomic_write_bytes(b"data", tmp_path / "f.bin")
    assert synced == [False, True] and (tmp_path / "f.bin").read_bytes() == b"data"


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.pt"
    ckpt_io.atomic_save({"format_version": ckpt_io.FORMAT_VERSION, "v": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt_io.atomic_save({"format_version": ckpt_io.FORMAT_VERSION, "v": Boom()}, path)
    assert ckpt_io.load_checkpoint(path)["v"] == 1
    assert len(list(tmp_path.iterdir())) == 1


class _Payload:
    """Pickled, this would create a marker file when loaded with full unpickling."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        torch.save({"format_version": 1, "x": _Payload(marker)}, fh, pickle_module=pickle)
    with pytest.raises(AdtrError, match="refused"):
        ckpt_io.load_checkpoint(path)
    assert not marker.exists()


def test_garbage_version_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AdtrError, match="bad.pt: cannot load checkpoint"):
        ckpt_io.load_checkpoint(bad)
    old = tmp_path / "old.pt"
    torch.save({"format_version": 99}, old)
    with pytest.raises(AdtrError, match="format 99 is not supported"):
        ckpt_io.load_checkpoint(old)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.ones(1)}, plain)
    with pytest.raises(AdtrError, match="not an adtr checkpoint"):
        ckpt_io.load_checkpoint(plain)
    with pytest.raises(AdtrError, match="not an adtr run"):
        ckpt_io.find_run_file(tmp_path)


def test_a_file_that_is_no_checkpoint_is_named_as_such_not_as_a_threat(tmp_path):
    """An image, a text file or the exported ONNX graph given where a checkpoint belongs said
    "pickled objects other than tensors (possible code)" or torch's bare "101"; none of them is
    unpickled now, and the message says what the file is not, or what to give instead."""
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "000.png")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    for name, expected in (("000.png", "not a checkpoint written by adtr"), ("notes.txt", "not a checkpoint written"),
                           ("model.onnx", "an ONNX graph, not a checkpoint: give the run folder")):
        with pytest.raises(AdtrError) as info:
            ckpt_io.load_checkpoint(tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name}: cannot load checkpoint: {expected}"), message
        assert "possible code" not in message


@pytest.mark.parametrize("keep", [0, 100])
def test_a_damaged_run_file_says_so_and_what_to_do(tmp_path, keep):
    """A truncated or emptied last.pt (a disk that filled up, a bad copy) names the file, says it
    is damaged and how to go on, instead of repeating torch's zip-reader message."""
    whole = tmp_path / "whole.pt"
    ckpt_io.atomic_save({"format_version": ckpt_io.FORMAT_VERSION, "w": torch.ones(1000)}, whole)
    for name, advice in ((ckpt_io.LAST_FILE, "delete it and fit again"), (ckpt_io.MODEL_FILE, "restore it")):
        damaged = tmp_path / name
        damaged.write_bytes(whole.read_bytes()[:keep])
        with pytest.raises(AdtrError) as info:
            ckpt_io.load_checkpoint(damaged)
        message = str(info.value)
        assert message.startswith(f"{damaged}: cannot load checkpoint: the file is truncated or damaged ({keep} bytes)")
        assert advice in message and "miniz" not in message and "\n" not in message


def test_compatibility_check_names_the_difference(tmp_path):
    ckpt = {"config": {"model": {"backbone": "tf_efficientnet_lite0", "image_size": 256}}}
    with pytest.raises(AdtrError, match="trained with backbone tf_efficientnet_lite0, not resnet18"):
        ckpt_io.check_compatible(ckpt, tmp_path / "m.pt", backbone="resnet18")
    with pytest.raises(AdtrError, match="expects 256px images, not 128px"):
        ckpt_io.check_compatible(ckpt, tmp_path / "m.pt", image_size=128)
    with pytest.raises(AdtrError, match="grid of stride 16, not 8"):
        ckpt_io.check_compatible(ckpt, tmp_path / "m.pt", grid_stride=8)
    ckpt_io.check_compatible(ckpt, tmp_path / "m.pt", "tf_efficientnet_lite0", 256, 16)  # all equal: accepted


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from adtr.checkpoint import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(b"x", tmp_path / "f.bin")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o644
