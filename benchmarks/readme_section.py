"""Rewrite one marked section of the README with a benchmark's printed results."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def replace_section(name: str, text: str, readme: Path = README) -> None:
    """Put ``text`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in the README."""
    pattern = rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)"
    content = readme.read_text()
    if not re.search(pattern, content, flags=re.DOTALL):
        raise SystemExit(f"{readme.name} has no <!-- {name}:start/end --> markers")
    readme.write_text(
        re.sub(pattern, lambda m: m.group(1) + text + m.group(2), content, flags=re.DOTALL)
    )
