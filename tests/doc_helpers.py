"""Reading the README and docs/*.md in tests: one `## ` section of a page."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def section(path: str, heading: str) -> str:
    """The body of the one `## heading` section of `path` (relative to the repository)."""
    text = (REPO / path).read_text(encoding="utf-8")
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    bodies = [body for title, body in zip(parts[1::2], parts[2::2]) if title.strip() == heading]
    assert len(bodies) == 1, f"{path} has {len(bodies)} sections '## {heading}'"
    return bodies[0]
