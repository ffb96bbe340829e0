"""The commit marker: ``{root}/latest_checkpointed_iteration.txt`` names the one iteration to load.

It holds the iteration number (Megatron's format: ``"100"``, no newline) or ``release``, and is
written last, atomically (temporary file, fsync, rename, directory fsync), once every file of the
iteration is on disk. Readers load only the committed iteration, so a half-written iteration
directory is never read. (Agreeing that every rank has finished is the writer's business:
:class:`megafast.training.checkpointing.Checkpointer` for training runs, a single process for
conversions.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from megafast.checkpoint.paths import RELEASE, TRACKER_FILE, iteration_dir
from megafast.checkpoint.state_dict import atomic_write_text


@dataclass(frozen=True)
class Committed:
    """The committed iteration of a checkpoint root and its directory."""

    iteration: int  # 0 for a release checkpoint
    release: bool
    directory: str


def read_latest_checkpoint(root: str) -> Optional[tuple[int, bool]]:
    """The committed ``(iteration, is_release)`` of ``root``, or None when nothing was committed."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if text == RELEASE:
        return 0, True
    if not text.isdigit():
        raise ValueError(f"{path} holds {text[:40]!r}, expected an iteration number or 'release': fix it")
    return int(text), False


def committed(root: str) -> Optional[Committed]:
    """The committed iteration of ``root`` (None without a commit file); ValueError when the
    iteration it names does not exist."""
    latest = read_latest_checkpoint(root)
    if latest is None:
        return None
    iteration, release = latest
    directory = iteration_dir(root, iteration, release)
    if not os.path.isdir(directory):
        what = RELEASE if release else f"iteration {iteration}"
        raise ValueError(
            f"{os.path.join(root, TRACKER_FILE)} commits {what} but {directory} "
            "does not exist: it was moved or deleted; restore it or fix the commit file"
        )
    return Committed(iteration, release, directory)


def write_commit(root: str, iteration: Optional[int]) -> None:
    """Commit ``iteration`` of ``root`` (None: the ``release`` checkpoint). Call it last."""
    atomic_write_text(os.path.join(root, TRACKER_FILE), RELEASE if iteration is None else str(iteration))
