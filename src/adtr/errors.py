"""User-facing errors.

Anything a user can cause (a bad file, an empty folder, a checkpoint from another
model) raises :class:`AdtrError` with a one-line message that names the file and
what is wrong. The CLI prints it as ``error: <message>`` and exits with status 2;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class AdtrError(Exception):
    """A problem with the user's input, data, or run directory."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): library
    errors can run to pages, and a user-facing error is one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def compile_failure(exc: BaseException) -> str:
    """One line on a failed ``torch.compile``: what failed and what the platform lacks. Such a
    failure is the environment's (Inductor generates C++ on the CPU and Triton kernels on a GPU)."""
    return (f"torch.compile failed ({type(exc).__name__}: {first_line(exc)}); it needs a C++ compiler "
            f"on the CPU and Triton on a GPU")


def file_error(path: str | Path, problem: str) -> AdtrError:
    """Build the standard ``<path>: <problem>`` error."""
    return AdtrError(f"{path}: {problem}")
