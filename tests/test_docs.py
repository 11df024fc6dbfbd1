"""The user documentation holds together: README within its size, every link to a docs page
lands on a heading that exists, every number in the README points to where it was measured."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
LINK = re.compile(r"\]\(((?:docs/)?[\w.-]+\.md)(?:#([\w-]+))?\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lowercase, punctuation dropped, spaces to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    heads = [ln.lstrip("#").strip() for ln in page.read_text().splitlines() if ln.startswith("#")]
    return {slug(h) for h in heads}


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_for_users_and_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_link_to_a_docs_page_lands(page):
    for target, anchor in LINK.findall(page.read_text()):
        path = (page.parent / target) if not target.startswith("docs/") else ROOT / target
        assert path.is_file(), f"{page.name}: link to missing {target}"
        if anchor:
            assert anchor in anchors(path), f"{page.name}: {target}#{anchor} has no heading"


def test_the_slug_is_githubs():
    assert slug("FLOPs budget 0.3, seeds 0 to 4") == "flops-budget-03-seeds-0-to-4"
    assert slug("Does the search pay for itself?") == "does-the-search-pay-for-itself"


def test_numbers_in_the_readme_point_to_their_measurement():
    """A measured figure in the README (a percentage, a signed difference, a time) is the
    text of a link into docs/, where its command is."""
    text = (ROOT / "README.md").read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no measurements
    unlinked = []
    for line in prose.splitlines():
        if line.startswith("|"):  # tables of files and commands
            continue
        # drop every link, its text included (one level of brackets inside: "[+1 [a, b]](…)")
        bare = re.sub(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\([^)]*\)", "", line)
        unlinked += re.findall(r"[+−-]\d+\.\d+|\d+\.\d+ ?%|\d+(?:\.\d+)? ?(?:s|min)\b", bare)
    assert not unlinked, f"README figures without a link to their measurement: {unlinked}"
