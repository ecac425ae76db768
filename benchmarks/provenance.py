"""What every benchmark row records about the code that produced it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


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


def machine_description() -> str:
    """The CPU that produced a row, e.g. ``AMD EPYC, AVX2, no fast bf16``: benchmark machines
    differ between sessions (an AVX2 CPU has neither AMX nor bf16 dot products, which sets
    both the roofline and what ``--precision auto`` picks), so every row says which it was."""
    import platform

    import torch

    from adtr.engine import bf16_is_fast

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    bf16 = "fast bf16" if bf16_is_fast(torch.device("cpu")) else "no fast bf16"
    return f"{name}, {isa}, {bf16}"


def write_results(out: Path, name: str, data: Any, table: str, echo: bool = True) -> None:
    """``out/NAME.json`` and ``out/NAME.md``, each written whole or not at all, and the table printed
    unless ``echo`` is false (scripts that rewrite both after every row, so that a run cut short
    keeps the rows it finished, print once at the end)."""
    from adtr.checkpoint import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes((json.dumps(data, indent=2) + "\n").encode(), out / f"{name}.json")
    atomic_write_bytes(table.encode(), out / f"{name}.md")
    if echo:
        print(table)
