"""What every benchmark row records about the code that produced it."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str:
    """HEAD of the checkout the benchmarks live in (``+uncommitted`` when the code, ``src`` or
    a benchmark script, differs from it: the numbers then belong to a later commit), or
    ``unknown`` outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src",
                                  "benchmarks/*.py", "pyproject.toml"], cwd=here.parent,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+uncommitted" if changed else head


def short_commit(commit: str) -> str:
    """12 hex digits, keeping the ``+uncommitted`` mark."""
    return commit[:12] + ("+uncommitted" if commit.endswith("+uncommitted") else "")
