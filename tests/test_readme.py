"""The README's links into itself lead somewhere: each `(#anchor)` is a heading's slug as
GitHub makes it (lower case, punctuation dropped, spaces to hyphens)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_to_a_section_names_a_heading():
    text = README.read_text(encoding="utf-8")
    fenced = re.sub(r"```.*?```", "", text, flags=re.S)  # '#' lines in code are not headings
    headings = {slug(line.lstrip("#")) for line in fenced.splitlines()
                if re.match(r"#{1,6} ", line)}
    links = re.findall(r"\]\(#([^)]+)\)", fenced)
    assert links, "the README links to none of its sections"
    assert sorted(set(links) - headings) == []
