"""Results into the docs: scripts write their figures between markers in a markdown file, so reruns replace them."""
from __future__ import annotations

from pathlib import Path

from ddm.io import atomic_write_bytes


def update_fragment(path: Path, section: str, text: str) -> None:
    """Replace (or append) the text between `<!-- section:start -->` and `<!-- section:end -->` in a markdown file."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    old = path.read_text() if path.is_file() else ""
    block = f"{start}\n{text}{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + block + "\n"
    atomic_write_bytes(path, new.encode())
