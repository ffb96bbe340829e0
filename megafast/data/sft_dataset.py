"""Fine-tuning datasets over the files of ``tools/preprocess_data.py --dataset-type sft``.

A record of n tokens t with loss mask m gives n - 1 training positions: inputs t[:-1], labels
t[1:], loss mask m[1:] (a label is learned from when it is an answer token or an answer's EOS),
positions 0..n-2. Records longer than ``seq_length + 1`` tokens are cut to that (counted in
``num_truncated``; those left without an answer token are left out, ``unlearnable``). Each epoch visits the records of the split in an order shuffled by
``numpy.random.RandomState(seed)`` (one generator for all epochs); epochs are added until there
are at least ``num_samples`` items. Two ways to fill the ``seq_length`` positions of an item:

- padding (default): one record per item, the rest padded (token 0, loss mask 0);
- packing (``--packing``): records are packed, in the shuffled order, first-fit into the first of
  at most ``MAX_OPEN_BINS`` partly filled items with room (a full item, or the oldest when too
  many are open, is closed). Items carry ``segment_ids`` (record k of the item has id k; padding
  at the end one more id) so that attention stays inside each record, and positions restart at 0
  in every record: a packed item computes exactly what its records compute one by one.

Item i is a dict of [seq_length] tensors: ``tokens``, ``labels`` (int64), ``loss_mask`` (float32),
``position_ids``, ``task_ids`` (int64, the global task id of each position's record; padding 0)
and, when packing, ``segment_ids``. Task ids are global over every dataset of a run: the task
names of all ``--data-path`` datasets, in order of first appearance.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megafast.data.blended_dataset import BlendedDataset, normalize_weights
from megafast.data.builder import MID_LEVEL_SURPLUS, parse_data_path, parse_split, split_bookends, split_range
from megafast.data.cached_dataset import CachedIndexDataset
from megafast.data.gpt_dataset import SPLIT_NAMES
from megafast.data.index_cache import Arrays, CacheSync
from megafast.data.indexed_dataset import IndexedDataset, bin_path_of
from megafast.data.sft_format import read_info, sft_paths

logger = logging.getLogger(__name__)

MAX_OPEN_BINS = 64


class SFTSource:
    """The three indexed datasets and the task names of one SFT dataset (``P_K_document`` prefix)."""

    def __init__(self, prefix: str) -> None:
        paths = sft_paths(prefix)
        info = read_info(prefix)
        self.path_prefix = prefix
        self.tokens = IndexedDataset(paths.tokens)
        self.loss_mask = IndexedDataset(paths.loss_mask)
        task_ids = IndexedDataset(paths.task_ids)
        n = len(self.tokens)
        if len(self.loss_mask) != n or len(task_ids) != n:
            raise ValueError(f"{prefix}: {n} token records but {len(self.loss_mask)} loss masks and "
                             f"{len(task_ids)} task ids; the files come from different runs: re-run the preprocessing")
        if not np.array_equal(self.tokens.sequence_lengths, self.loss_mask.sequence_lengths):
            raise ValueError(f"{prefix}: loss-mask lengths differ from the token lengths; re-run the preprocessing")
        self.task_ids = _one_per_record(task_ids)  # int64 [n]
        self.task_names: list[str] = [str(t) for t in info["tasks"]]
        if n and int(self.task_ids.max()) >= len(self.task_names):
            raise ValueError(f"{prefix}: a task id exceeds the {len(self.task_names)} task names of its sft.json")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.sequence_lengths


def _one_per_record(dataset: IndexedDataset) -> np.ndarray:
    """int64 [n]: the single value of each of the n sequences (the .bin is exactly those values)."""
    if np.any(dataset.sequence_lengths != 1):
        raise ValueError(f"{dataset.path_prefix}: task-id records must hold exactly one id each; "
                         "re-run the preprocessing")
    return np.fromfile(bin_path_of(dataset.path_prefix), dtype=dataset.dtype).astype(np.int64)


@dataclass(frozen=True)
class SFTDatasetConfig:
    seq_length: int
    seed: int
    packing: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {self.seq_length}")


def pack_first_fit(costs: np.ndarray, capacity: int, max_open: int = MAX_OPEN_BINS) -> list[list[int]]:
    """Indices of ``costs`` grouped into bins of ``capacity``: each goes, in order, into the first
    open bin with room; a full bin, or the oldest when ``max_open`` are open, is closed. Bins are
    returned in the order they were closed."""
    closed: list[list[int]] = []
    free = np.zeros(0, dtype=np.int64)  # room left in each open bin, oldest first
    members: list[list[int]] = []
    for i, cost in enumerate(costs.tolist()):
        fits = np.flatnonzero(free >= cost)
        if fits.size:
            b = int(fits[0])
        else:
            if len(members) == max_open:
                closed.append(members.pop(0))
                free = free[1:]
            members.append([])
            free = np.append(free, capacity)
            b = len(members) - 1
        members[b].append(i)
        free[b] -= cost
        if free[b] == 0:
            closed.append(members.pop(b))
            free = np.delete(free, b)
    return closed + members


class SFTDataset(CachedIndexDataset):
    """Items of one split of one SFT dataset (module docstring).

    Args:
        source: the dataset's files.
        record_range: (beg, end), the split's records.
        num_samples: items wanted (the dataset may hold more); None = one epoch.
        split: "train", "valid" or "test".
        config: sequence length, seed, packing and cache directory.
        task_map: global task id of each of the source's task ids.
        sync: which rank builds the cache and the barrier the others wait on.
    """

    CACHE_NAME = "SFTDataset"
    CACHE_FORMAT = "megafast-sft-indices-1"
    INDEX_NAMES = ("item_offsets", "item_records")

    def __init__(
        self,
        source: SFTSource,
        record_range: tuple[int, int],
        num_samples: int | None,
        split: str,
        config: SFTDatasetConfig,
        task_map: Sequence[int],
        sync: CacheSync = CacheSync(),
    ) -> None:
        beg, end = (int(x) for x in record_range)
        if not 0 <= beg < end <= len(source):
            raise ValueError(f"{source.path_prefix}: record range [{beg}, {end}) is empty or outside the "
                             f"dataset's {len(source)} records")
        self.source = source
        self.indexed = source.tokens  # what BlendedDataset's messages name
        self.record_range = (beg, end)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.split = split
        self.config = config
        self.task_map = np.asarray(task_map, dtype=np.int64)
        lengths = source.lengths[beg:end]
        long = np.flatnonzero(lengths > config.seq_length + 1) + beg
        self.num_truncated = len(long)
        # A record cut so short that no answer token is left teaches nothing: it is left out.
        self.unlearnable = np.array([r for r in long.tolist() if not self.record(r)[1][1:].any()], dtype=np.int64)
        if not np.any(lengths >= 2):
            raise ValueError(f"{source.path_prefix}: no record of the {split} split has 2 tokens or more")
        if self.num_truncated:
            logger.warning("%s (%s): %d records longer than --seq-length + 1 = %d tokens are cut, %d of them left "
                           "out (no answer token left)", source.path_prefix, split, self.num_truncated,
                           config.seq_length + 1, len(self.unlearnable))
        self._load_indices(config.cache_dir or None, sync)

    def _identity_fields(self) -> dict[str, Any]:
        return {
            "dataset_path": os.path.abspath(self.source.path_prefix),
            "dataset_num_records": len(self.source),
            "record_range": list(self.record_range),
            "num_samples": self.num_samples,
            "split": self.split,
            "random_seed": int(self.config.seed),
            "sequence_length": int(self.config.seq_length),
            "packing": self.config.packing,
            "max_open_bins": MAX_OPEN_BINS,
        }

    def _build_indices(self) -> Arrays:
        """``item_records``: record ids of all items back to back; ``item_offsets`` [items + 1]."""
        beg, end = self.record_range
        s = self.config.seq_length
        ids = np.arange(beg, end, dtype=np.int64)
        costs = np.minimum(self.source.lengths[beg:end].astype(np.int64), s + 1) - 1  # positions used
        keep = (costs > 0) & ~np.isin(ids, self.unlearnable)
        ids, costs = ids[keep], costs[keep]
        if not len(ids):
            raise ValueError(f"{self.source.path_prefix}: no record of the {self.split} split keeps an answer "
                             f"token within --seq-length {s}: raise --seq-length")
        rng = np.random.RandomState(self.config.seed)
        records: list[np.ndarray] = []
        sizes: list[np.ndarray] = []
        items = 0
        while True:
            order = rng.permutation(len(ids))
            if self.config.packing:
                bins = pack_first_fit(costs[order], s)
                records += [ids[order[b]] for b in bins]
                sizes.append(np.array([len(b) for b in bins], dtype=np.int64))
            else:
                records.append(ids[order])
                sizes.append(np.ones(len(ids), dtype=np.int64))
            items += len(sizes[-1])
            if self.num_samples is None or items >= self.num_samples:
                break
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(sizes))]).astype(np.int64)
        return {"item_offsets": offsets, "item_records": np.concatenate(records).astype(np.int64)}

    def _check(self, arrays: Mapping[str, np.ndarray]) -> str | None:
        offsets, records = arrays["item_offsets"], arrays["item_records"]
        if offsets.dtype != np.int64 or records.dtype != np.int64 or offsets.ndim != 1 or len(offsets) < 2:
            return "index arrays have the wrong dtype or shape"
        if int(offsets[-1]) != len(records) or int(offsets[0]) != 0:
            return "item_offsets do not cover item_records"
        return None

    def __len__(self) -> int:
        return len(self.item_offsets) - 1

    def record(self, record_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64, loss mask) of one record, cut to seq_length + 1 tokens."""
        n = self.config.seq_length + 1
        tokens = self.source.tokens.get(record_id, 0, None)[:n].astype(np.int64)
        mask = self.source.loss_mask.get(record_id, 0, None)[:n]
        return tokens, mask

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"item {idx} out of range for a dataset of {n} items")
        idx %= n
        s = self.config.seq_length
        tokens = np.zeros(s, dtype=np.int64)
        labels = np.zeros(s, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        segment_ids = np.zeros(s, dtype=np.int64)
        task_ids = np.zeros(s, dtype=np.int64)
        pos = 0
        members = self.item_records[int(self.item_offsets[idx]):int(self.item_offsets[idx + 1])]
        for k, rid in enumerate(members.tolist()):
            t, m = self.record(rid)
            used = len(t) - 1
            tokens[pos:pos + used], labels[pos:pos + used] = t[:-1], t[1:]
            loss_mask[pos:pos + used] = m[1:]
            position_ids[pos:pos + used] = np.arange(used)
            segment_ids[pos:pos + used] = k
            task_ids[pos:pos + used] = self.task_map[self.source.task_ids[rid]]
            pos += used
        position_ids[pos:] = np.arange(s - pos) if self.config.packing else np.arange(pos, s)
        segment_ids[pos:] = len(members)
        item = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "task_ids": torch.from_numpy(task_ids),
        }
        if self.config.packing:
            item["segment_ids"] = torch.from_numpy(segment_ids)
        return item

    def __repr__(self) -> str:
        beg, end = self.record_range
        return (f"SFTDataset({self.source.path_prefix!r}, split={self.split}, records=[{beg}, {end}), "
                f"items={len(self)}, packing={self.config.packing}, seq_length={self.config.seq_length})")


def build_sft_datasets(
    data_path: Sequence[str] | str | None,
    split: str,
    seq_length: int,
    num_samples: Sequence[int | None],
    seed: int,
    cache_dir: str | None = None,
    *,
    packing: bool = False,
    group: torch.distributed.ProcessGroup | None = None,
    split_paths: Sequence[Sequence[str] | None] | None = None,
) -> tuple[tuple[Any, Any, Any], list[str]]:
    """(train, valid, test) SFT datasets (or blends of them) and the run's task names.

    ``data_path``, ``split`` and the blending of weighted prefixes work as for GPT data
    (megafast.data.builder): a split with a zero share is None. With ``split_paths`` (Megatron's
    ``--train/valid/test-data-path``, ``data_path`` None) split k is built from its own blend, all
    of each dataset's records going to it (None where a split has no path); task ids are global
    over every dataset of every split (train first). ValueError for bad files/flags.
    """
    if split_paths is None:
        prefixes, weights = parse_data_path(data_path)
        bookends = split_bookends(parse_split(split))
        plans = [(prefixes, weights, bookends[k]) for k in range(3)]
    else:
        plans = []
        for paths in split_paths:
            plans.append((*parse_data_path(paths), (0.0, 1.0)) if paths is not None else ([], None, None))
    config = SFTDatasetConfig(seq_length, int(seed), packing, cache_dir)
    sync = CacheSync.from_process_group(group) if group is not None else CacheSync()
    sources = {p: SFTSource(p) for plan in plans for p in dict.fromkeys(plan[0])}
    tasks: list[str] = []
    for source in sources.values():
        tasks += [t for t in source.task_names if t not in tasks]
    task_maps = {p: [tasks.index(t) for t in s.task_names] for p, s in sources.items()}

    def one(prefix: str, k: int, count: int | None) -> SFTDataset | None:
        bookend = plans[k][2]
        if bookend is None:
            return None
        beg, end = split_range(bookend, len(sources[prefix]))
        if beg == end:
            if not count:
                return None
            raise ValueError(f"{prefix}: split {split!r} gives the {SPLIT_NAMES[k]} split no records out of "
                             f"{len(sources[prefix])}; give it a larger or a zero share")
        return SFTDataset(sources[prefix], (beg, end), count, SPLIT_NAMES[k], config, task_maps[prefix], sync)

    result = []
    for k, (prefixes, weights, bookend) in enumerate(plans):
        if bookend is None:
            result.append(None)
        elif weights is None:
            result.append(one(prefixes[0], k, num_samples[k]))
        else:
            w = normalize_weights(weights)
            n = num_samples[k] or 0
            target = [math.ceil(n * wd) for wd in w]
            parts = [one(p, k, math.ceil(t * (1 + MID_LEVEL_SURPLUS))) for p, t in zip(prefixes, target)]
            result.append(None if any(p is None for p in parts) else BlendedDataset(parts, w, sum(target),
                                                                                     cache_dir, sync))
    return tuple(result), tasks  # type: ignore[return-value]


__all__ = ["SFTDataset", "SFTDatasetConfig", "SFTSource", "build_sft_datasets", "pack_first_fit"]
