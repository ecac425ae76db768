"""Crash safety of ``adtr fit``: SIGKILL at chosen moments, Ctrl-C, then ``fit --resume``.

Each fit runs as a child process through a small driver (written into the test's folder)
that, in that child only, pauses at one moment: while caching features, at a given
training step, or half-way through writing a checkpoint. The test waits for the driver's
marker file and then kills the child. The library itself has no test hooks.

After every kill the run folder must hold only loadable checkpoints (a temporary file of
a killed write is allowed, and the next resume removes it) and at most one epoch may be
lost (these fits write last.pt after every epoch: ``--checkpoint-every 0``). The run,
resumed to the end, must equal an uninterrupted one bit for bit: weights, calibration and
training history. All children run on the CPU with OMP_NUM_THREADS=1, so
that the features and the training steps compute the same numbers in every process. Each
child starts (and imports torch) while the previous one runs, which halves the wall time
on two idle cores.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from adtr import checkpoint as ckpt_io
from adtr.cli import main
from adtr.engine import batch_order, split_train_val
from adtr.errors import AdtrError

EPOCHS, BATCH, SEED, N_TRAIN_IMAGES = 4, 4, 3, 12
FIT_ARGS = ["--image-size", "64", "--weights", "none", "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
            "--seed", str(SEED), "--feature-cache", "disk", "--checkpoint-every", "0"]
# One thread and the CPU in every child: the same arithmetic in each process, and no GPU
# kernel whose reductions may differ from run to run.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
WAIT_S = 240  # for a child to reach its moment, on a loaded 2-core machine

DRIVER = textwrap.dedent('''
    """`adtr fit` paused at one moment, for the crash tests: argv = NAME.

    The driver imports everything first, then waits for NAME.go (JSON: the CLI arguments
    and STOP), so a test can start the next child while the current one runs. STOP is
    "none", "features" (after the first batch of cached features), "step:K" (before global
    training step K), "ckpt:E" (half-way through writing last.pt for epoch E) or "model"
    (half-way through writing model.pt). At that moment it writes NAME.marker and sleeps,
    waiting to be killed.
    """
    import io, json, os, signal, sys, tempfile, time
    from pathlib import Path

    # A shell without job control starts background commands with SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: the suite run as `pytest &` would
    # send its Ctrl-C into the void. A terminal's Ctrl-C reaches the default handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    import torch

    import adtr.checkpoint, adtr.engine, adtr.features
    from adtr.cli import main

    name = sys.argv[1]
    go, marker = Path(name + ".go"), Path(name + ".marker")
    while not go.exists():
        time.sleep(0.02)
    task = json.loads(go.read_text())
    stop = task["stop"]

    def reached(what):
        marker.write_text(what)
        time.sleep(600)

    if stop == "features":
        real_loader = adtr.features.loader

        def loader(samples, image_size, batch_size, workers=0):
            for batch in real_loader(samples, image_size, 4, workers):  # small batches: several
                yield batch
                reached(stop)  # the first batch is in the disk cache, the rest is not

        adtr.features.loader = loader
    elif stop.startswith("step:"):
        real_lr_factor, target = adtr.engine.lr_factor, int(stop[5:])

        def lr_factor(schedule, step, *args, **kwargs):
            if step == target:
                reached(stop)
            return real_lr_factor(schedule, step, *args, **kwargs)

        adtr.engine.lr_factor = lr_factor
    elif stop.startswith("ckpt:") or stop == "model":
        real_save = adtr.checkpoint.atomic_save

        def atomic_save(obj, path):
            path = Path(path)
            if path.name == "model.pt" if stop == "model" else path.name == "last.pt" and obj["epoch"] == int(stop[5:]):
                buf = io.BytesIO()
                torch.save(obj, buf)
                data = buf.getvalue()
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                os.write(fd, data[:len(data) // 2])
                os.fsync(fd)
                reached(stop)
            return real_save(obj, path)

        adtr.checkpoint.atomic_save = atomic_save
    sys.exit(main(task["argv"]))
''')


def steps_per_epoch() -> int:
    n_train = len(split_train_val(list(range(N_TRAIN_IMAGES)), 0.1, SEED)[0])
    return len(batch_order(n_train, BATCH, SEED, 0))


def fit_argv(data: Path, run: Path, *extra: str) -> list[str]:
    return ["fit", str(data), "--out", str(run), *FIT_ARGS, *extra]


class Child:
    """A driver process, started (importing torch and adtr) before it is given its task."""

    def __init__(self, tmp: Path, name: str):
        driver = tmp / "driver.py"
        if not driver.exists():
            driver.write_text(DRIVER)
        self.name, self.stop = tmp / name, "none"
        self.marker, self.err = tmp / f"{name}.marker", tmp / f"{name}.err"
        with self.err.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, str(driver), str(self.name)],
                                         stdout=subprocess.DEVNULL, stderr=err, env=CHILD_ENV)

    def go(self, argv: list[str], stop: str = "none") -> Child:
        self.stop = stop
        tmp = self.name.with_suffix(".tmp")
        tmp.write_text(json.dumps({"argv": argv, "stop": stop}))
        os.replace(tmp, self.name.with_suffix(".go"))
        return self

    def wait_for_marker(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while not (self.marker.is_file() and self.marker.read_text()):
            if self.proc.poll() is not None:
                pytest.fail(f"child ended (status {self.proc.returncode}) before {self.stop}:\n{self.err.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"child did not reach {self.stop} in {WAIT_S} s")
            time.sleep(0.05)

    def stop_with(self, sig: int) -> int:
        self.wait_for_marker()
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=WAIT_S)

    def finish(self) -> None:
        assert self.proc.wait(timeout=WAIT_S) == 0, self.err.read_text()


@pytest.fixture
def spawn(tmp_path):
    """``spawn()``: a new waiting :class:`Child`; all are ended with the test."""
    children: list[Child] = []

    def new() -> Child:
        children.append(Child(tmp_path, f"child{len(children)}"))
        return children[-1]

    yield new
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


class Reference:
    """The uninterrupted run, started at once and awaited only when a test compares with it."""

    def __init__(self, data: Path, run: Path):
        self.run = run
        self.err = run.parent / "reference.err"
        with self.err.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "adtr.cli", *fit_argv(data, run)],
                                         stdout=subprocess.DEVNULL, stderr=err, env=CHILD_ENV)

    def model(self) -> dict:
        assert self.proc.wait(timeout=WAIT_S) == 0, self.err.read_text()
        return ckpt_io.load_checkpoint(self.run / ckpt_io.MODEL_FILE)


@pytest.fixture(scope="module")
def reference(tiny_category, tmp_path_factory):
    ref = Reference(tiny_category, tmp_path_factory.mktemp("reference") / "run")
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


def check_after_kill(run: Path, completed: int) -> int | None:
    """Only loadable checkpoints, at most one epoch lost; returns the saved epoch count (None: no last.pt)."""
    for path in run.glob("*.pt"):
        ckpt_io.load_checkpoint(path)  # raises on a half-written file
    last = run / ckpt_io.LAST_FILE
    saved = ckpt_io.load_checkpoint(last)["epoch"] if last.is_file() else None
    assert (saved or 0) >= completed - 1, f"{completed} epochs done, {saved} saved"
    return saved


def stale_temp_files(run: Path) -> list[Path]:
    return sorted(run.glob(".*.pt.*.tmp"))


def assert_same_model(run: Path, reference: Reference) -> None:
    """Bit-identical to the uninterrupted run: weights, calibration, history (timings aside)."""
    a, b = reference.model(), ckpt_io.load_checkpoint(run / ckpt_io.MODEL_FILE)
    for part in ("model", "backbone"):
        assert a[part].keys() == b[part].keys()
        different = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not different, f"{part} weights differ: {different}"
    assert a["calibration"] == b["calibration"]
    timeless = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert timeless(a["history"]) == timeless(b["history"])
    assert not (run / ckpt_io.LAST_FILE).exists() and not stale_temp_files(run)
    assert not (run / "cache" / "train_features.npy").exists()


def test_sigkill_at_any_moment_then_resume_matches_uninterrupted(tiny_category, reference, tmp_path, spawn):
    """One run killed five times, each resume carrying on from what the previous one saved:
    while caching features (nothing saved yet: the resume starts afresh), at two training
    steps drawn by a seeded generator, half-way through writing last.pt and model.pt."""
    rng, spe, run = random.Random(20240607), steps_per_epoch(), tmp_path / "run"
    ready = spawn()

    def kill_at(stop: str, resume: bool = True) -> Child:
        nonlocal ready
        child, ready = ready.go(fit_argv(tiny_category, run, *(["--resume"] if resume else [])), stop), spawn()
        assert child.stop_with(signal.SIGKILL) == -signal.SIGKILL
        return child

    # 1. While caching features: the disk cache is half-written, no checkpoint exists yet.
    kill_at("features", resume=False)
    assert (run / "cache" / "train_features.npy").is_file()
    assert check_after_kill(run, completed=0) is None
    # 2. At a training step in the first two epochs; this resume finds nothing and starts afresh.
    step = rng.randrange(1, 2 * spe)
    child = kill_at(f"step:{step}")
    assert "starting afresh" in child.err.read_text()
    saved = check_after_kill(run, completed=step // spe)
    assert saved == step // spe  # an epoch's checkpoint precedes the next epoch's first step (epoch 0 too)
    # 3. Half-way through writing the checkpoint of a later epoch: that epoch is lost, the
    #    previous checkpoint stays intact, the temporary file stays behind.
    epoch = rng.randint(saved + 1, saved + 2)
    kill_at(f"ckpt:{epoch}")
    assert check_after_kill(run, completed=epoch) == epoch - 1
    assert [p.name.startswith(".last.pt.") for p in stale_temp_files(run)] == [True]
    # 4. At another training step: the resume removed the temporary file.
    step = rng.randrange((epoch - 1) * spe, (EPOCHS - 1) * spe)
    kill_at(f"step:{step}")
    assert check_after_kill(run, completed=step // spe) == step // spe
    assert not stale_temp_files(run)
    # 5. Half-way through writing model.pt: all epochs are saved, model.pt is not there.
    kill_at("model")
    assert check_after_kill(run, completed=EPOCHS) == EPOCHS
    assert not (run / ckpt_io.MODEL_FILE).exists()
    with pytest.raises(AdtrError, match="did not finish"):
        ckpt_io.find_run_file(run)
    # 6. The last resume only calibrates and saves.
    ready.go(fit_argv(tiny_category, run, "--resume")).finish()
    assert_same_model(run, reference)


def last_line(text: str) -> str:
    """What a terminal shows last: progress bars redraw their line with carriage returns."""
    return re.split(r"[\r\n]", text.rstrip("\n"))[-1]


def test_ctrl_c_saves_and_says_how_to_resume(tiny_category, reference, tmp_path, spawn):
    run = tmp_path / "run"
    step = 2 * steps_per_epoch() + 1  # in the third epoch: two are saved
    child, ready = spawn().go(fit_argv(tiny_category, run), f"step:{step}"), spawn()
    assert child.stop_with(signal.SIGINT) == 130
    err = child.err.read_text()
    assert "Traceback" not in err
    message = last_line(err)
    assert err.rstrip("\n").split("\n")[-1] == message  # on a line of its own, after the bars
    assert message.startswith(f"interrupted: 2 of {EPOCHS} epochs saved in {run / 'last.pt'}; continue with: adtr ")
    command = shlex.split(message.split("continue with: ")[1])
    assert command == ["adtr", *fit_argv(tiny_category, run), "--resume"]
    assert ckpt_io.load_checkpoint(run / ckpt_io.LAST_FILE)["epoch"] == 2
    ready.go(command[1:]).finish()  # the printed command, run by the CLI's main
    assert_same_model(run, reference)


def test_ctrl_c_before_the_first_checkpoint(tiny_category, tmp_path, monkeypatch, capsys, caplog):
    """Interrupted while caching features: nothing saved, yet the printed command goes on
    (starting afresh); --resume on a folder that does not exist stays a one-line error."""
    import adtr.engine

    run = tmp_path / "run"
    argv = ["fit", str(tiny_category), "--out", str(run), *FIT_ARGS, "--epochs", "1"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(adtr.engine, "extract_features", interrupted)
        assert main(argv) == 130
    message = capsys.readouterr().err.strip()
    assert message == f"interrupted before the first checkpoint (no epoch saved); continue with: adtr " \
                      f"{shlex.join(argv)} --resume"
    assert not list(run.glob("*.pt"))
    with monkeypatch.context() as patch:  # the whole fit is tested above: here only its start
        patch.setattr(adtr.engine, "extract_features", interrupted)
        assert main([*argv, "--resume"]) == 130
    assert "starting afresh" in caplog.text
    assert capsys.readouterr().err.strip() == message

    assert main(["fit", str(tiny_category), "--out", str(tmp_path / "typo"), *FIT_ARGS, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nothing to resume" in err and "drop --resume" in err and "\n" not in err
    assert not (tmp_path / "typo").exists()
