"""The ``adtr`` command's entry point: the CLI imported inside the Ctrl-C handling."""

from __future__ import annotations

import sys


def run() -> int:
    """Run :func:`adtr.cli.main`; Ctrl-C while torch is still being imported (seconds on a
    small CPU) ends the command quietly, as it does later (``main`` handles it from then on)."""
    try:
        from adtr.cli import main

        return main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
