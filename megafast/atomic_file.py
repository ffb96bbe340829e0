"""Files that appear complete or not at all: write a temporary sibling, fsync, rename, fsync the
directory. A crash at any moment leaves either the old file or the new one, never a partial one
under the final name."""

from __future__ import annotations

import os
import uuid
from typing import BinaryIO, Callable


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Create ``path`` with ``write(f)`` on a binary file object, atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(directory)
