"""On-disk cache of dataset index arrays, shared by the ranks of a job.

Building the document/sample/shuffle indices of a large corpus takes seconds to minutes, so, as
in Megatron-LM, they are saved once as `.npy` files under a cache directory and memory-mapped by
every later run and every rank:

    {cache_dir}/{md5(description)}-{kind}-{name}.npy     one file per index array
    {cache_dir}/{md5(description)}-{kind}-description.txt

`description` is a text (JSON) naming everything the arrays depend on, so a changed config or
data set gives a new hash and never picks up stale arrays. Each file is written to a temporary
name, fsynced and renamed into place; the description is removed before and written after the
arrays, so it doubles as the commit marker: arrays without a matching description are never used.
A loaded cache is also checked (each array readable, its dtype and shape as the caller expects)
and rebuilt when it fails, so a truncated or half-written file is never used silently.

Ranks: one rank (the builder) loads or builds and saves, then all ranks meet at a barrier, then
the others load. `CacheSync` carries that role and the barrier explicitly (no global state).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from megafast.atomic_file import atomic_write

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
# Validates loaded arrays; returns None when they are fine, else one line saying what is wrong.
Checker = Callable[[Mapping[str, np.ndarray]], str | None]


def _no_barrier() -> None:
    """Barrier of a single-process job: nothing to wait for."""


@dataclass(frozen=True)
class CacheSync:
    """Which rank builds a shared cache, and how the other ranks wait for it.

    Attributes:
        is_builder: True on exactly one rank of the ranks sharing the cache directory (rank 0).
        barrier: called once per cached object by every rank: the builder after saving, the
            others before loading. The default does nothing (one process).
    """

    is_builder: bool = True
    barrier: Callable[[], None] = _no_barrier

    @classmethod
    def from_process_group(cls, group: object) -> CacheSync:
        """Rank 0 of `group` (a `torch.distributed` ProcessGroup) builds; all wait on its barrier."""
        import torch.distributed as dist

        rank = dist.get_rank(group=group)
        return cls(is_builder=rank == 0, barrier=lambda: dist.barrier(group=group))


def description_hash(description: str) -> str:
    """md5 hex digest of the description text (a cache key, not a security measure)."""
    return hashlib.md5(description.encode("utf-8"), usedforsecurity=False).hexdigest()


class IndexCache:
    """The cache files of one object (e.g. the train split of one GPT dataset).

    Args:
        cache_dir: directory holding the cache (created on save).
        kind: object type and split, part of the file names, e.g. "GPTDataset-train".
        description: everything the arrays depend on; its md5 keys the files.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], kind: str, description: str) -> None:
        self.cache_dir = os.fspath(cache_dir)
        self.kind = kind
        self.description = description
        self.hash = description_hash(description)
        self._base = os.path.join(self.cache_dir, f"{self.hash}-{kind}")

    @property
    def description_path(self) -> str:
        """`{hash}-{kind}-description.txt`, written last: the cache's commit marker."""
        return f"{self._base}-description.txt"

    def array_path(self, name: str) -> str:
        """`{hash}-{kind}-{name}.npy`."""
        return f"{self._base}-{name}.npy"

    def load(self, names: tuple[str, ...], check: Checker) -> Arrays | None:
        """Memory-map the named arrays, or None when the cache is absent, incomplete or invalid."""
        if not os.path.isfile(self.description_path):
            return None
        with open(self.description_path, encoding="utf-8") as f:
            if f.read() != self.description:
                logger.warning("ignoring %s: its description does not match", self.description_path)
                return None
        arrays: Arrays = {}
        for name in names:
            path = self.array_path(name)
            try:
                arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                logger.warning("ignoring the %s cache: %s is unreadable (%s)", self.kind, path, err)
                return None
        problem = check(arrays)
        if problem is not None:
            logger.warning("ignoring the %s cache under %s: %s", self.kind, self.cache_dir, problem)
            return None
        return arrays

    def save(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Write every array, then the description (atomically, each file on its own)."""
        os.makedirs(self.cache_dir, exist_ok=True)
        if os.path.exists(self.description_path):
            os.remove(self.description_path)  # uncommit while the arrays are replaced
        for name, array in arrays.items():
            atomic_write(self.array_path(name), lambda f, a=array: np.save(f, a, allow_pickle=False))
        atomic_write(self.description_path, lambda f: f.write(self.description.encode("utf-8")))


def load_or_build(
    cache: IndexCache | None,
    sync: CacheSync,
    names: tuple[str, ...],
    build: Callable[[], Arrays],
    check: Checker,
) -> tuple[Arrays, bool]:
    """Arrays from the cache, or built (and cached by the builder rank).

    Without a cache every rank builds in memory and no barrier is called. With one, the builder
    loads a valid cache or builds and saves; then `sync.barrier()`; then the other ranks load.

    Returns:
        (arrays, cache_hit): cache_hit is True when the arrays came from existing files.

    Raises:
        RuntimeError: on a non-builder rank when the builder left no valid cache (for example a
            cache directory that is not on a file system shared by all ranks).
    """
    if cache is None:
        return build(), False
    arrays: Arrays | None = None
    hit = False
    if sync.is_builder:
        try:
            arrays = cache.load(names, check)
            hit = arrays is not None
            if arrays is None:
                logger.info("building the %s indices (cache %s)", cache.kind, cache.hash)
                arrays = build()
                cache.save(arrays)
            else:
                logger.info("loaded the %s indices from the cache %s", cache.kind, cache.hash)
        except BaseException:
            sync.barrier()  # release the waiting ranks (they then fail to load) instead of a hang
            raise
    sync.barrier()
    if not sync.is_builder:
        arrays = cache.load(names, check)
        if arrays is None:
            raise RuntimeError(
                f"the {cache.kind} index cache {cache.description_path} is missing or invalid after "
                "the building rank finished; the cache directory must be on a file system that "
                "every rank sees"
            )
        hit = True
    assert arrays is not None
    return arrays, hit

