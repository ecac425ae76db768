"""The hostile-input corpus: messy production folders through fit, test and predict.

Every case is generated here (nothing large is committed) and goes through the CLI and
the Python API for each command it concerns. A case either works (and the test checks
that the output is there) or is refused with a one-line error that names the file, a
non-zero exit status, and no output folder left behind. The behaviour observed is the
table in docs/hostile-inputs.md: the test fails when the committed table differs from
what this run saw, and ``ADTR_WRITE_DOCS=1`` rewrites it.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adtr.cli import main
from adtr.data import index_folder, index_test_folder
from adtr.detector import Detector
from adtr.engine import fit
from adtr.errors import AdtrError
from adtr.evaluate import evaluate

from conftest import TINY_FIT_ARGS, tiny_config

DOCS = Path(__file__).resolve().parents[1] / "docs" / "hostile-inputs.md"
STAGES = ("fit", "test", "predict")
RNG_SEED = 7


def noise(width: int, height: int, mode: str = "RGB", seed: int = RNG_SEED) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "CMYK": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(side: int = 20_000) -> bytes:
    """A tiny file whose header claims side x side grey pixels (over Pillow's bomb limit)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


# ---------------------------------------------------------------- image cases


def write(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name
    return make


def palette_with_transparency(folder: Path) -> Path:
    img = noise(40, 30).convert("P")
    img.save(folder / "palette.png", transparency=0)
    return folder / "palette.png"


def duplicate_stems(folder: Path) -> Path:
    (folder / "dup.png").write_bytes(encoded(noise(32, 32), "PNG"))
    (folder / "dup.jpg").write_bytes(encoded(noise(32, 32), "JPEG"))
    return folder  # predict is given the folder: the pair is the problem, not either file


def non_utf8_name(folder: Path) -> Path:
    path = folder / os.fsdecode(b"pi\xe8ce.png")  # Latin-1 bytes, not UTF-8
    path.write_bytes(encoded(noise(48, 48), "PNG"))
    return path


def symlink_loop(folder: Path) -> Path:
    os.symlink("loop.png", folder / "loop.png")
    return folder / "loop.png"


def named_pipe(folder: Path) -> Path:
    os.mkfifo(folder / "pipe.png")
    return folder / "pipe.png"


def unreadable(folder: Path) -> Path:
    path = folder / "locked.png"
    path.write_bytes(encoded(noise(32, 32), "PNG"))
    path.chmod(0)
    return path


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    make: Callable[[Path], Path]
    works: bool  # expected: True = handled correctly, False = refused with a one-line error
    file: str  # what every error message must name
    note: str = ""
    dropped_privileges: bool = False  # run in a child without root's permission override


_PNG = encoded(noise(64, 64), "PNG")
_JPEG = encoded(noise(64, 64), "JPEG", quality=90)

IMAGE_CASES = [
    Case("truncated PNG", "the first half of a 64x64 PNG", write("cut.png", _PNG[: len(_PNG) // 2]), False, "cut.png"),
    Case("truncated JPEG", "the first 60% of a 64x64 JPEG", write("cut.jpg", _JPEG[: len(_JPEG) * 6 // 10]), False,
         "cut.jpg"),
    Case("zero bytes", "an empty file named .png", write("empty.png", b""), False, "empty.png"),
    Case("text named .png", "a text file with an image suffix", write("notes.png", b"batch 7: all good\n"), False,
         "notes.png"),
    Case("PostScript named .png", "an EPS file with an image suffix (PIL would hand it to Ghostscript)",
         write("drawing.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"), False, "drawing.png"),
    Case("GIF named .png", "another format than its suffix says", write("anim.png", encoded(noise(16, 16).convert("P"),
         "GIF")), False, "anim.png"),
    Case("16-bit TIFF", "grey uint16 TIFF", write("deep.tif", encoded(
        Image.fromarray(np.random.default_rng(1).integers(0, 65536, (40, 40), dtype=np.uint16)), "TIFF")), True,
        "deep.tif", "scaled by 1/257 to 8 bits"),
    Case("float TIFF", "grey float32 TIFF in [0, 1]", write("float.tif", encoded(
        Image.fromarray(np.random.default_rng(2).random((40, 40), dtype=np.float32)), "TIFF")), True,
        "float.tif", "values <= 1 scaled by 255"),
    Case("CMYK JPEG", "a 4-channel print-style JPEG", write("cmyk.jpg", encoded(noise(48, 48, "CMYK"), "JPEG")), True,
         "cmyk.jpg", "converted to RGB"),
    Case("palette PNG with transparency", "P mode, colour 0 transparent", palette_with_transparency, True,
         "palette.png", "transparent pixels become black"),
    Case("1x1 image", "a single pixel", write("dot.png", encoded(noise(1, 1), "PNG")), True, "dot.png",
         "upsampled to the input size"),
    Case("3x50000 image", "an extreme strip", write("strip.png", encoded(noise(3, 50_000), "PNG")), True,
         "strip.png", "resized to the input square"),
    Case("decompression bomb", "PNG header claiming 20000x20000 pixels", write("bomb.png", bomb_png()), False,
         "bomb.png"),
    Case("duplicate stems", "dup.png and dup.jpg side by side", duplicate_stems, False, "dup."),
    Case("non-UTF-8 name", "a Latin-1 byte in the file name", non_utf8_name, True, "pi",
         "written back as the same bytes"),
    Case("space in name", "`good part 1.png`", write("good part 1.png", encoded(noise(48, 48), "PNG")), True,
         "good part 1.png"),
    Case("symlink loop", "loop.png links to itself", symlink_loop, False, "loop.png"),
    Case("named pipe", "a FIFO named pipe.png (reading would block)", named_pipe, False, "pipe.png"),
    Case("unreadable file", "permissions 000", unreadable, False, "locked.png", dropped_privileges=True),
]


# ---------------------------------------------------------------- mask cases (test only)


def resized_mask(scale: float):
    def change(mask: Path) -> None:
        img = Image.open(mask)
        img.resize((int(img.width * scale), int(img.height * scale)), Image.NEAREST).save(mask)
    return change


def zero_one_mask(mask: Path) -> None:
    arr = (np.asarray(Image.open(mask).convert("L")) > 127).astype(np.uint8)
    Image.fromarray(arr).save(mask)


def orphan_mask(mask: Path) -> None:
    shutil.copy(mask, mask.with_name("999_mask.png"))


def missing_mask(mask: Path) -> None:
    mask.unlink()


def truncated_mask(mask: Path) -> None:
    data = mask.read_bytes()
    mask.write_bytes(data[: len(data) // 2])


@dataclass(frozen=True)
class MaskCase:
    name: str
    what: str
    change: Callable[[Path], None]  # applied to the first mask of the defect folder
    works: bool
    note: str = ""


def squashed_mask(mask: Path) -> None:
    img = Image.open(mask)
    img.resize((img.width, img.height // 2), Image.NEAREST).save(mask)


MASK_CASES = [
    MaskCase("mask of the wrong size", "64x64 image, 64x32 mask", squashed_mask, False),
    MaskCase("mask at another resolution", "64x64 image, 32x32 mask (same aspect)", resized_mask(0.5), True,
             "resized with nearest neighbour"),
    MaskCase("mask values {0, 1}", "0/1 instead of 0/255", zero_one_mask, True, "any nonzero pixel is a defect"),
    MaskCase("mask without image", "999_mask.png with no 999.png", orphan_mask, False),
    MaskCase("image without mask", "a defect image whose mask is missing", missing_mask, False),
    MaskCase("truncated mask", "the first half of a mask PNG", truncated_mask, False),
]


# ---------------------------------------------------------------- running a case


@dataclass
class Outcome:
    works: bool
    message: str = ""  # the one-line error, paths relative to the case folder


def cli_outcome(argv: list[str], output: Path, base: Path) -> Outcome:
    """Run the CLI in-process; its stderr's last line is the error (progress bars come before it)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    text = err.getvalue()
    if code == 0:
        assert output.exists(), f"{argv[0]} exited 0 but wrote no {output.name}"
        return Outcome(True)
    last = text.strip().splitlines()[-1].split("\r")[-1] if text.strip() else ""
    assert code == 2, f"{argv[0]}: exit status {code}: {text[-2000:]}"
    assert last.startswith("error: ") and "Traceback" not in text, text[-2000:]
    assert not output.parent.exists(), f"{argv[0]} failed but left {output.parent} behind"
    return Outcome(False, last.removeprefix("error: ").replace(f"{base}/", ""))


def api_outcome(call: Callable[[], object], output: Path | None, base: Path) -> Outcome:
    try:
        call()
    except AdtrError as exc:
        message = str(exc)
        assert "\n" not in message, message
        if output is not None:
            assert not output.exists(), f"the API failed but left {output} behind"
        return Outcome(False, message.replace(f"{base}/", ""))
    return Outcome(True)


def fresh(base: Path, name: str) -> Path:
    folder = base / name
    folder.mkdir(parents=True)
    return folder


def observe_image_case(case: Case, base: Path, tiny_category: Path, run: Path) -> dict:
    """Behaviour of one image case in fit, test and predict, through the CLI and the API."""
    goods = sorted((tiny_category / "train" / "good").glob("*.png"))[:4]
    result = {}
    # fit: four good images and the hostile file
    data = fresh(base, "fit_data")
    for g in goods:
        shutil.copy(g, data)
    hostile = case.make(data)
    result["fit"] = (
        cli_outcome(["fit", str(data), "--out", str(base / "fit_cli"), *TINY_FIT_ARGS, "--epochs", "1"],
                    base / "fit_cli" / "model.pt", base),
        api_outcome(lambda: fit(tiny_config(epochs=1), index_folder(data), base / "fit_api"), base / "fit_api", base))
    # test: good/ with two good images and the hostile file, one defect folder (image level)
    test = fresh(base, "test_data")
    shutil.copytree(tiny_category / "test" / "good", test / "good")
    shutil.copytree(tiny_category / "test" / "hole", test / "hole")
    case.make(test / "good")
    # The HTML report (slow to draw) is written only where a file name could break it.
    no_report = [] if "name" in case.name else ["--no-report"]
    result["test"] = (
        cli_outcome(["test", str(run), "--data", str(test), "--out", str(base / "test_cli"), *no_report],
                    base / "test_cli" / "metrics.json", base),
        api_outcome(lambda: evaluate(Detector.load(run), index_test_folder(test)), None, base))
    # predict: the hostile file itself (the folder for a pair of files)
    predict_api = (lambda: Detector.load(run).predict(hostile)) if hostile.name != data.name else None
    result["predict"] = (
        cli_outcome(["predict", str(run), str(hostile), "--out", str(base / "predict_cli")],
                    base / "predict_cli" / "results.csv", base),
        api_outcome(predict_api, None, base) if predict_api else None)
    return result


def drop_file_permission_override() -> None:
    """In a root child process: give up CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (from the
    bounding set, so the exec'd Python starts without them) so that mode 000 means unreadable."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP


def observe_in_child(case: Case, base: Path, tiny_category: Path, run: Path) -> dict:
    """Run :func:`observe_image_case` in a process that cannot bypass file permissions."""
    code = (f"import sys, json; sys.path[:0] = [{str(Path(__file__).parent)!r}]\n"
            f"probe = __import__('pathlib').Path({str(base / 'probe')!r}); probe.write_text('x'); probe.chmod(0)\n"
            "try:\n    probe.read_text(); print('CANNOT-DROP'); sys.exit(0)\nexcept PermissionError:\n    probe.unlink()\n"
            "import test_hostile_inputs as t\n"
            "from pathlib import Path\n"
            f"case = next(c for c in t.IMAGE_CASES if c.name == {case.name!r})\n"
            f"r = t.observe_image_case(case, Path({str(base)!r}), Path({str(tiny_category)!r}), Path({str(run)!r}))\n"
            "print(json.dumps({k: [None if o is None else [o.works, o.message] for o in v] for k, v in r.items()}))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          preexec_fn=drop_file_permission_override, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.strip() == "CANNOT-DROP":
        pytest.skip("this process cannot give up root's permission override, so no file is unreadable to it")
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: tuple(None if o is None else Outcome(*o) for o in v) for k, v in raw.items()}


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    """The finished tiny run every case is tested and predicted with."""
    return tiny_run


@pytest.fixture(scope="module")
def table_rows() -> list[str]:
    rows: list[str] = []
    yield rows
    write_docs(rows)


def verdict(outcomes: tuple, case_name: str, stage: str, works: bool) -> str:
    cli, api = outcomes
    assert cli.works == works, f"{case_name} / {stage} (CLI): expected {'works' if works else 'an error'}, " \
                               f"got {'works' if cli.works else cli.message}"
    if api is not None:
        assert api.works == cli.works, f"{case_name} / {stage}: the API and the CLI disagree ({api} vs {cli})"
    return "works" if cli.works else "refused"


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c.name for c in IMAGE_CASES])
def test_image_case(case, tiny_category, run, tmp_path, table_rows):
    base = tmp_path / "case"
    base.mkdir()
    if case.dropped_privileges:
        result = observe_in_child(case, base, tiny_category, run)
    else:
        result = observe_image_case(case, base, tiny_category, run)
    cells = [verdict(result[s], case.name, s, case.works) for s in STAGES]
    if case.name == "non-UTF-8 name":  # the CSV names the file with the bytes it has on disk
        assert b"pi\xe8ce.png" in (base / "predict_cli" / "results.csv").read_bytes()
    messages = {o.message for s in STAGES for o in result[s] if o is not None and not o.works}
    for message in messages:
        assert case.file in message, f"the error does not name {case.file}: {message}"
    shown = [o.message for s in reversed(STAGES) for o in result[s][:1] if not o.works]  # predict's, else test's
    message = shown[0].split(": ", 1)[0].rsplit("/", 1)[-1] + ": " + shown[0].split(": ", 1)[1] if shown else case.note
    table_rows.append(f"| {case.name} | {case.what} | {' | '.join(cells)} | {md(message)} |")


def md(text: str) -> str:
    return text.replace("|", "\\|") if text else ""


@pytest.mark.parametrize("case", MASK_CASES, ids=[c.name for c in MASK_CASES])
def test_mask_case(case, tiny_category, run, tmp_path, table_rows):
    data = tmp_path / "test"
    shutil.copytree(tiny_category / "test" / "good", data / "good")
    shutil.copytree(tiny_category / "test" / "hole", data / "hole")
    masks = tmp_path / "masks"
    shutil.copytree(tiny_category / "ground_truth" / "hole", masks / "hole")
    first = sorted((masks / "hole").glob("*.png"))[0]
    case.change(first)
    cli = cli_outcome(["test", str(run), "--data", str(data), "--masks", str(masks), "--out", str(tmp_path / "out")],
                      tmp_path / "out" / "metrics.json", tmp_path)
    api = api_outcome(lambda: evaluate(Detector.load(run), index_test_folder(data, masks)), None, tmp_path)
    cell = verdict((cli, api), case.name, "test", case.works)
    if cli.works:  # pixel metrics come out, not absent
        metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
        assert metrics["pixel_auroc"] is not None
    else:
        assert first.stem.removesuffix("_mask") in cli.message or "999_mask" in cli.message, cli.message
    table_rows.append(f"| {case.name} | {case.what} | n/a | {cell} | n/a | {md(cli.message or case.note)} |")


def write_docs(rows: list[str]) -> None:
    """Compare the observed table with docs/hostile-inputs.md (or rewrite it with ADTR_WRITE_DOCS=1)."""
    order = [c.name for c in IMAGE_CASES] + [c.name for c in MASK_CASES]
    if len(rows) != len(order):
        return  # a partial run (-k) leaves the document alone
    rows = sorted(rows, key=lambda r: order.index(r.split(" | ")[0].removeprefix("| ")))
    text = (HEADER + "| case | what | fit | test | predict | error message, or how it is handled |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    if os.environ.get("ADTR_WRITE_DOCS") == "1":
        DOCS.write_text(text)
        return
    assert DOCS.exists() and DOCS.read_text() == text, (
        f"{DOCS} differs from what this test run observed; rerun with ADTR_WRITE_DOCS=1 and review the diff")


HEADER = """# Hostile inputs

What `adtr` does with the files that production folders really contain. Generated by
`tests/test_hostile_inputs.py` (rerun it with `ADTR_WRITE_DOCS=1` to refresh this file;
the test fails when the behaviour and this table disagree). Each image case is placed in
a training folder (`fit`), in the `good/` folder of a test set (`test`) and given to
`predict`, through both the CLI and the Python API (`adtr.engine.fit`,
`adtr.evaluate.evaluate`, `Detector.predict`), which must agree. *Refused* means: exit
status 2, one line `error: <file>: <reason>` naming the file, and no output folder left
behind. Mask cases go through `adtr test --masks`.

"""
