"""The README's and docs' links lead somewhere: a `#anchor` names a heading of the page it points
at (GitHub's slugs), a relative path names a file of the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slugs(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.+)", line)):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def links(page: Path) -> list[str]:
    return [m for m in LINK.findall(page.read_text()) if not m.startswith(("http://", "https://", "mailto:"))]


def test_the_readme_has_a_table_of_contents() -> None:
    assert len([link for link in links(ROOT / "README.md") if link.startswith("#")]) >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page: Path) -> None:
    broken = []
    for link in links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        elif anchor and target.suffix == ".md" and anchor not in slugs(target):
            broken.append(f"{link}: no heading #{anchor} in {target.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_a_broken_anchor_is_found(tmp_path: Path) -> None:
    """The check above can fail: an anchor without its heading is not among the slugs."""
    page = tmp_path / "p.md"
    page.write_text("## Scaling out: workers and instances\n")
    assert slugs(page) == {"scaling-out-workers-and-instances"}
