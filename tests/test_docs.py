"""The README and docs/ link to each other and to committed files: every relative link must
resolve, anchors included, so moving a section cannot leave a dead link behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(h) for h in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8")))}


def test_anchor_follows_github():
    assert anchor("Newton-Schulz in bf16 where training runs in bf16 (the default)") == \
        "newton-schulz-in-bf16-where-training-runs-in-bf16-the-default"
    assert anchor("Muon on the transformer's matrices (the default)") == "muon-on-the-transformers-matrices-the-default"
    assert anchor("A larger Muon step: --muon-rms 0.8") == "a-larger-muon-step---muon-rms-08"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    dead = []
    for link in LINK.findall(text):
        if re.match(r"[a-z]+:", link):  # http(s), mailto: not checked offline
            continue
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            dead.append(f"{link} (no such file)")
        elif fragment and target.suffix == ".md" and fragment not in anchors(target):
            dead.append(f"{link} (no heading with that anchor)")
    assert not dead, f"{page.relative_to(ROOT)}: dead links: {dead}"
