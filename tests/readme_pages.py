"""The user documentation: the README and the guide pages it links as "The full guide" (docs/),
in the README's order, for tests that check what the documentation says."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def pages() -> list[Path]:
    """The README, then each guide page in the order the README links them."""
    guides = re.findall(r"^The full guide: \[docs/([\w.-]+\.md)\]", README.read_text(), re.MULTILINE)
    return [README, *(ROOT / "docs" / name for name in guides)]


def manual_text() -> str:
    """All the pages' text, the README first."""
    return "\n\n".join(page.read_text() for page in pages())
