"""The ``adtr`` command's entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adtr import console


def test_importing_adtr_waits_for_no_torch_until_the_api_is_used():
    """The entry point imports the CLI inside its Ctrl-C handling; that only helps if
    ``import adtr`` itself is quick."""
    code = "import sys, adtr; a = 'torch' in sys.modules; from adtr import Detector; print(a, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
    with pytest.raises(AttributeError, match="no attribute 'Detectr'"):
        import adtr

        adtr.Detectr  # noqa: B018


def test_ctrl_c_at_any_moment_ends_the_command_quietly(monkeypatch, capsys):
    """Before ``main`` can handle it (while torch is imported, while the parser is built)."""
    import adtr.cli

    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(adtr.cli, "main", interrupted)
    assert console.run() == 130
    assert capsys.readouterr().err == "interrupted\n"
