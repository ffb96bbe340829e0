"""Each benchmark owns one section of docs/benchmarks.md, between ``<!-- name:start -->`` and
``<!-- name:end -->``; re-running it replaces that section and keeps the rest of the file."""

from __future__ import annotations

import os

from megafast.atomic_file import atomic_write


def write_section(path: str, name: str, body: str) -> None:
    """Replace (or append) section ``name`` of the markdown file ``path`` with ``body``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    text = "# megafast benchmarks\n"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
