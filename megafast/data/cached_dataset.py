"""The base of the datasets whose index arrays are built once and cached (GPT, SFT, blends).

A subclass states what its index arrays depend on (`_identity_fields`), how to build them
(`_build_indices`) and how to tell that loaded arrays are usable (`_check`); this base turns that
into Megatron's cache (megafast.data.index_cache):

    {cache_dir}/{md5(description)}-{CACHE_NAME}-{split}-{name}.npy     one per INDEX_NAMES entry
    {cache_dir}/{md5(description)}-{CACHE_NAME}-{split}-description.txt

where the description is `identity` as indented JSON: `{"format": CACHE_FORMAT, "class":
CACHE_NAME, ...fields}`, so a changed config, data set or format version gives new files. The
arrays become attributes named like the files. Pickling (DataLoader workers) sends the cache
paths, not the arrays; unpickling memory-maps the files again. Without a cache directory the
arrays are built in memory (and pickled with the dataset).
"""

from __future__ import annotations

import abc
import json
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from megafast.data.index_cache import Arrays, CacheSync, IndexCache, load_or_build


class CachedIndexDataset(torch.utils.data.Dataset, abc.ABC):
    """A dataset over index arrays held as attributes and cached as `.npy` files (module doc).

    Subclasses set the class attributes and `self.split` before calling `_load_indices`.

    Attributes:
        CACHE_NAME: the class's name in cache files and descriptions, e.g. "GPTDataset".
        CACHE_FORMAT: version of the index layout, e.g. "megafast-gpt-indices-1".
        INDEX_NAMES: the index arrays, in cache order.
        cache_hit: True when the arrays came from existing cache files.
    """

    CACHE_NAME: ClassVar[str]
    CACHE_FORMAT: ClassVar[str]
    INDEX_NAMES: ClassVar[tuple[str, ...]]

    split: str
    cache_hit: bool
    _cache_paths: dict[str, str] | None

    # ---- identity ----

    @abc.abstractmethod
    def _identity_fields(self) -> dict[str, Any]:
        """Everything the index arrays depend on besides format and class (JSON-serialisable)."""

    @property
    def identity(self) -> dict[str, Any]:
        """`{"format", "class", ...}`: everything the index arrays depend on (JSON-serialisable)."""
        return {"format": self.CACHE_FORMAT, "class": self.CACHE_NAME, **self._identity_fields()}

    @property
    def description(self) -> str:
        """`identity` as indented JSON; its md5 names the cache files."""
        return json.dumps(self.identity, indent=4)

    # ---- building, checking, loading ----

    @abc.abstractmethod
    def _build_indices(self) -> Arrays:
        """The index arrays, one per INDEX_NAMES entry."""

    @abc.abstractmethod
    def _check(self, arrays: Mapping[str, np.ndarray]) -> str | None:
        """Why loaded arrays cannot be this dataset's indices (one line), None when they can."""

    def _load_indices(self, cache_dir: str | None, sync: CacheSync) -> None:
        """Load or build the indices (the builder rank of `sync` saves them under `cache_dir`)."""
        cache = None
        if cache_dir is not None:
            cache = IndexCache(cache_dir, f"{self.CACHE_NAME}-{self.split}", self.description)
        names = self.INDEX_NAMES
        arrays, self.cache_hit = load_or_build(cache, sync, names, self._build_indices, self._check)
        self._cache_paths = {n: cache.array_path(n) for n in names} if cache else None
        self._set_indices(arrays)

    def _set_indices(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name, array in arrays.items():
            setattr(self, name, array)

    # ---- pickling: cache paths instead of arrays ----

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in self._cache_paths or ():
            del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._cache_paths is not None:
            self._set_indices({n: np.load(p, mmap_mode="r") for n, p in self._cache_paths.items()})
