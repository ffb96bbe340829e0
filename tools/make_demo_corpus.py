"""Write a demo corpus of real text found on every machine: Python's standard library.

    python tools/make_demo_corpus.py --output data/demo.jsonl --size-mb 8

Output is jsonl, one `{"text": ...}` object per line. Documents come from the `.py` files under
`sysconfig.get_paths()["stdlib"]` (site-packages excluded), visited in sorted path order so the
same Python version always gives the same bytes:

- for each module, one prose document holding its docstrings (module, classes, functions), when
  it has any;
- then its source, cut at blank lines into documents of about `--doc-chars` characters (a block
  longer than that is one document of its own).

Writing stops once the output reaches `--size-mb` megabytes (10^6 bytes); if the standard library
runs out first the tool says so and keeps what it wrote. The file is written under a temporary
name and renamed when complete, so an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
from typing import Iterator

from tqdm import tqdm

from megafast.atomic_file import atomic_write

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_python_files(root: str | None = None) -> list[str]:
    """Every `.py` file of the standard library, as sorted absolute paths (site-packages excluded)."""
    root = root or sysconfig.get_paths()["stdlib"]
    found: list[str] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS)
        found.extend(os.path.join(directory, f) for f in sorted(files) if f.endswith(".py"))
    return sorted(found, key=lambda p: os.path.relpath(p, root))


def module_docstrings(source: str) -> str:
    """The docstrings of a module: its own, then those of its classes and functions (ast.walk order).

    Returns "" when the source does not parse (the stdlib holds a few deliberately broken files).
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    docs = []
    for node in ast.walk(tree):  # the module itself comes first
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
    return "\n\n".join(docs)


def split_source(source: str, doc_chars: int) -> list[str]:
    """Cut source text at blank lines into pieces of about `doc_chars` characters."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for block in source.split("\n\n"):
        if current and size + len(block) > doc_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(block)
        size += len(block) + 2
    if current:
        pieces.append("\n\n".join(current))
    return [p for p in pieces if p.strip()]


def iter_documents(doc_chars: int = 2048, root: str | None = None) -> Iterator[str]:
    """Documents of the standard library in a fixed order (see the module docstring)."""
    for path in stdlib_python_files(root):
        try:
            with open(path, "rb") as f:
                source = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # unreadable, or a test file that is deliberately not UTF-8
        docstrings = module_docstrings(source)
        if docstrings:
            yield docstrings
        yield from split_source(source, doc_chars)


def make_demo_corpus(output: str, size_mb: float = 8.0, doc_chars: int = 2048,
                     progress: bool = True) -> tuple[int, int]:
    """Write the corpus to `output` (atomically); returns (documents, bytes) written."""
    if size_mb <= 0:
        raise ValueError(f"--size-mb must be positive, got {size_mb}")
    if doc_chars < 1:
        raise ValueError(f"--doc-chars must be at least 1, got {doc_chars}")
    target = int(size_mb * 1e6)
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    written = docs = 0

    def write(f) -> None:
        nonlocal written, docs
        for text in iter_documents(doc_chars):
            line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            written += len(line)
            docs += 1
            bar.update(min(len(line), max(0, target - bar.n)))
            if written >= target:
                break

    bar = tqdm(total=target, unit="B", unit_scale=True, desc="demo corpus", disable=not progress)
    try:
        atomic_write(output, write)
    finally:
        bar.close()
    return docs, written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="jsonl file to write")
    parser.add_argument("--size-mb", type=float, default=8.0,
                        help="stop once this many megabytes (10^6 bytes) are written (default 8)")
    parser.add_argument("--doc-chars", type=int, default=2048,
                        help="approximate characters per source document (default 2048)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        docs, written = make_demo_corpus(args.output, args.size_mb, args.doc_chars,
                                         progress=not args.no_progress)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    target = int(args.size_mb * 1e6)
    if written < target:
        print(f"warning: the standard library holds only {written / 1e6:.1f} MB of text; "
              f"wrote all of it ({docs} documents) instead of {args.size_mb} MB", file=sys.stderr)
    print(f"wrote {docs} documents, {written / 1e6:.1f} MB to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
