"""Progress: a redrawn bar on a terminal or in a notebook, plain log lines elsewhere.

tqdm redraws its line with carriage returns, which a file, ``nohup.out`` or a container's log
keeps as one ever-growing line. Elsewhere, batch loops therefore log a plain line at most
every ``LOG_EVERY_S`` seconds, and a fit one line per epoch, at INFO on the ``adtr.progress``
logger: the CLI shows them; a program that uses the API sees them once it configures logging.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
LOG_EVERY_S = 30.0


log = logging.getLogger(__name__)


def on_terminal() -> bool:
    """True when stderr redraws a line: an open terminal, or a Jupyter notebook's output."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def log_line(text: str) -> None:
    log.info(text)


def batches(items: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterator[T]:
    """``items``, with a tqdm bar on a terminal, otherwise ``desc: i/total batches`` lines."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if on_terminal():
        yield from tqdm(items, desc=desc, unit="batch", total=total, leave=leave)
        return
    last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        if time.monotonic() - last >= LOG_EVERY_S and done != total:
            log_line(f"{desc}: {done}/{total if total is not None else '?'} batches")
            last = time.monotonic()


class EpochProgress:
    """A fit's progress: a tqdm bar of epochs on a terminal, a line per epoch in a log."""

    def __init__(self, desc: str, done: int, total: int):
        self.desc, self.total = desc, total
        self.bar = tqdm(desc=desc, unit="epoch", initial=done, total=total) if on_terminal() else None

    def replan(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total

    def epoch_done(self, record: dict[str, Any]) -> None:
        """``record`` is the history entry: ``epoch``, ``train_loss``, maybe ``val_loss``."""
        held_out = record.get("val_loss")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                                 val=f"{held_out:.3f}" if held_out is not None else "nan")
            self.bar.update(1)
            return
        text = f"{self.desc}: epoch {record['epoch']}/{self.total}, loss {record['train_loss']:.4f}"
        log_line(text + (f", held-out loss {held_out:.4f}" if held_out is not None else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
