"""Progress on a terminal or in a notebook (tqdm bars) and in a log (plain lines, no carriage returns)."""

from __future__ import annotations

import logging
import re
import sys
import types

import adtr.progress
from adtr.cli import main
from adtr.progress import EpochProgress, batches

from conftest import TINY_FIT_ARGS


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "adtr.progress" and r.levelno == logging.INFO]


def test_a_fit_logged_to_a_file_writes_one_plain_line_per_epoch(tiny_category, tmp_path, capsys, caplog):
    """capsys's stderr is not a terminal, as in ``adtr fit ... 2> fit.log`` or a container: no
    carriage-return redraws, and one line per epoch on the ``adtr.progress`` logger, which the
    CLI shows (the CLI's own handler is pytest's here, hence caplog)."""
    assert main(["fit", str(tiny_category), "--out", str(tmp_path / "run"), *TINY_FIT_ARGS]) == 0
    assert "\r" not in capsys.readouterr().err
    epochs = [line for line in progress_lines(caplog) if line.startswith("fit: epoch")]
    assert len(epochs) == 3, progress_lines(caplog)
    assert re.fullmatch(r"fit: epoch 3/3, loss \d+\.\d{4}, held-out loss \d+\.\d{4}", epochs[-1]), epochs


def test_batches_in_a_log_log_a_line_now_and_then_but_never_for_the_last(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="adtr.progress")
    monkeypatch.setattr(adtr.progress, "LOG_EVERY_S", 0.0)
    assert list(batches(range(3), "predict")) == [0, 1, 2]
    assert progress_lines(caplog) == ["predict: 1/3 batches", "predict: 2/3 batches"]
    caplog.clear()
    assert list(batches(iter("ab"), "features")) == ["a", "b"]  # no length: the total is unknown
    assert progress_lines(caplog) == ["features: 1/? batches", "features: 2/? batches"]
    caplog.clear()
    monkeypatch.setattr(adtr.progress, "LOG_EVERY_S", 3600.0)
    assert list(batches(range(3), "predict")) == [0, 1, 2]
    assert progress_lines(caplog) == []


def test_a_terminal_gets_redrawn_bars(monkeypatch, capsys):
    monkeypatch.setattr(adtr.progress, "on_terminal", lambda: True)
    assert list(batches(range(2), "test", leave=True)) == [0, 1]
    progress = EpochProgress("fit", 0, 2)
    progress.epoch_done({"epoch": 1, "train_loss": 1.5})
    progress.replan(3)
    progress.epoch_done({"epoch": 2, "train_loss": 1.25, "val_loss": 1.0})
    progress.close()
    err = capsys.readouterr().err
    assert "\r" in err and "2/2" in err and "2/3" in err and "val=1.000" in err and "val=nan" in err
    assert "fit: epoch" not in err


def test_a_notebook_redraws_but_a_closed_or_missing_stderr_does_not(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert adtr.progress.on_terminal()
    monkeypatch.delitem(sys.modules, "ipykernel")
    monkeypatch.setattr("sys.stderr", None)
    assert not adtr.progress.on_terminal()
