"""`build_gpt_datasets`: train/valid/test GPT datasets from `--data-path` and `--split`.

Megatron-core 0.19.2's `BlendedMegatronDatasetBuilder(GPTDataset, sizes, ..., config).build()`
for a single blend, so the same arguments give the same samples:

* `split` "969,30,1" is normalised, `w = s / sum(s)`, and turned into book-ends
  `[(0, w0), (w0, w0 + w1), (w0 + w1, w0 + w1 + w2)]` (a zero share gives no dataset, None).
  Over a dataset of N sequences, split k takes sequences
  `[int(round(lo_k * N)), int(round(hi_k * N)))`.
* One prefix: one `GPTDataset` per split, asking for `num_samples[k]` samples.
* Weighted prefixes `["0.3", "A", "0.7", "B"]`: weights normalised (`w_d`); every prefix is split
  as above and its split k asked for `ceil(ceil(n_k * w_d) * 1.005)` samples; split k is then a
  `BlendedDataset` of `sum_d ceil(n_k * w_d)` samples (slightly more than n_k, as Megatron does).

A split asked for 0 samples still gets a dataset (one epoch, as in Megatron); a split whose
share of a dataset rounds to no sequence is None when 0 samples are asked of it, and an error
otherwise (Megatron would loop forever there).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Sequence

import numpy as np
import torch

from megafast.data.blended_dataset import BlendedDataset, normalize_weights
from megafast.data.gpt_dataset import SPLIT_NAMES, GPTDataset, GPTDatasetConfig
from megafast.data.index_cache import CacheSync
from megafast.data.indexed_dataset import IndexedDataset
from megafast.data.parquet_dataset import ParquetTokenDataset, open_token_dataset

logger = logging.getLogger(__name__)

# Extra samples asked of each blended dataset, so the greedy blend never runs past one.
MID_LEVEL_SURPLUS = 0.005
_SPLIT_NUMBER = re.compile(r"\d+(\.\d*)?|\.\d+")

SplitBookends = list[tuple[float, float] | None]


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> [0.969, 0.03, 0.001]: up to three shares (',', '/' or space separated), normalised.

    Missing shares are 0 ("99,1" = "99,1,0").
    """
    usage = 'give up to three non-negative shares for train, valid, test, e.g. "969,30,1"'
    if not isinstance(split, str):
        raise ValueError(f"split must be a string, got {split!r}; {usage}")
    parts = re.split(r"\s*[,/]\s*|\s+", split.strip())
    if len(parts) > len(SPLIT_NAMES):
        raise ValueError(f"split {split!r} has {len(parts)} shares; {usage}")
    for p in parts:
        if not _SPLIT_NUMBER.fullmatch(p):
            raise ValueError(f"split {split!r}: {p!r} is not a non-negative number; {usage}")
    shares = [float(p) for p in parts] + [0.0] * (len(SPLIT_NAMES) - len(parts))
    if sum(shares) <= 0:
        raise ValueError(f"split {split!r} gives every split a zero share; {usage}")
    return normalize_weights(shares)


def split_bookends(shares: Sequence[float]) -> SplitBookends:
    """[0.969, 0.03, 0.001] -> [(0, 0.969), (0.969, 0.999), (0.999, 1.0)]; None for empty shares."""
    edges = [0.0]
    for s in shares:
        edges.append(edges[-1] + s)
    return [(lo, hi) if hi > lo else None for lo, hi in zip(edges[:-1], edges[1:])]


def split_range(bookend: tuple[float, float], num_sequences: int) -> tuple[int, int]:
    """Sequences [round(lo * N), round(hi * N)) of a dataset of N sequences."""
    lo, hi = bookend
    return int(round(lo * float(num_sequences))), int(round(hi * float(num_sequences)))


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], list[float] | None]:
    """`["prefix"]` -> (["prefix"], None); `["0.3", "A", "0.7", "B"]` -> (["A", "B"], [0.3, 0.7])."""
    usage = 'give one prefix, or weight/prefix pairs such as ["0.3", "A", "0.7", "B"]'
    if isinstance(data_path, str):
        data_path = [data_path]
    items = [str(x).strip() for x in data_path]
    if not items or any(not x for x in items):
        raise ValueError(f"data_path {list(data_path)!r} is empty or has an empty entry; {usage}")
    if len(items) == 1:
        return items, None
    if len(items) % 2 == 1:
        raise ValueError(f"data_path has {len(items)} entries, an odd number; {usage}")
    weights: list[float] = []
    for raw in items[0::2]:
        try:
            w = float(raw)
        except ValueError:
            raise ValueError(f"data_path entry {raw!r} is not a weight; {usage}") from None
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"data_path weight {raw!r} must be a finite number > 0; {usage}")
        weights.append(w)
    return items[1::2], weights


def _check_num_samples(num_samples: Sequence[int | None]) -> list[int | None]:
    counts = list(num_samples)
    if len(counts) != len(SPLIT_NAMES):
        raise ValueError(f"num_samples must be a (train, valid, test) triple, got {num_samples!r}")
    for name, n in zip(SPLIT_NAMES, counts):
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0):
            raise ValueError(f"num_samples for {name} must be an integer >= 0 (or None), got {n!r}")
    return [None if n is None else int(n) for n in counts]


def _build_split(
    indexed: IndexedDataset | ParquetTokenDataset,
    bookend: tuple[float, float] | None,
    num_samples: int | None,
    split_index: int,
    split: str,
    config: GPTDatasetConfig,
    sync: CacheSync,
) -> GPTDataset | None:
    """The GPTDataset of one split of one indexed dataset (None for a zero share)."""
    if bookend is None:
        return None
    name = SPLIT_NAMES[split_index]
    beg, end = split_range(bookend, len(indexed))
    if beg == end:
        if num_samples == 0:
            logger.warning("%s: no sequences in the %s split; it is None", indexed.path_prefix, name)
            return None
        raise ValueError(
            f"{indexed.path_prefix}: split {split!r} gives the {name} split no sequences out of "
            f"{len(indexed)}, but {num_samples if num_samples is not None else 'one epoch of'} "
            f"samples were asked of it; give {name} a larger share, a zero share, or use more data"
        )
    return GPTDataset(indexed, (beg, end), num_samples, name, config, sync)


def build_gpt_datasets(
    data_path: Sequence[str] | str,
    split: str,
    seq_length: int,
    num_samples: Sequence[int | None],
    seed: int,
    cache_dir: str | None = None,
    *,
    eod_mask_loss: bool = False,
    eod_token_id: int | None = None,
    drop_last_partial_validation_sequence: bool = True,
    group: torch.distributed.ProcessGroup | None = None,
    sync: CacheSync | None = None,
    parquet_column: str | None = None,
    vocab_size: int | None = None,
) -> tuple[GPTDataset | BlendedDataset | None, ...]:
    """Train, valid and test datasets, as Megatron-core builds them from the same arguments.

    Args:
        data_path: `--data-path`: `["prefix"]` or `["w1", "prefix1", "w2", "prefix2", ...]`; a
            prefix may be a directory of parquet token files (megafast.data.parquet_dataset).
        split: `--split`, e.g. "969,30,1".
        seq_length: tokens per sample (each sample reads seq_length + 1).
        num_samples: samples wanted for (train, valid, test); None = one epoch (single prefix).
        seed: `--seed` of the shuffles.
        cache_dir: `--data-cache-path`; None builds the indices in memory on every rank.
        eod_mask_loss, eod_token_id: zero the loss mask where the input token is the EOD.
        drop_last_partial_validation_sequence: keep a padded partial last valid sample if False.
        group: ProcessGroup whose rank 0 builds the cache while the others wait (or pass `sync`).
        sync: explicit builder flag and barrier, instead of `group`.
        parquet_column: `--parquet-column`, the token-id column of parquet directories.
        vocab_size: the model's (padded) vocabulary: token ids of parquet directories are checked
            against it before any index is built.

    Returns:
        (train, valid, test): each a GPTDataset (one prefix), a BlendedDataset (weighted
        prefixes), or None for a split with a zero share (or no sequences and 0 samples asked).

    Raises:
        ValueError: bad split string, data_path, weights, seq_length, seed or sample counts; a
            missing or corrupt `.idx`/`.bin` (the message names the file); a split left without
            sequences that samples are asked of.
    """
    counts = _check_num_samples(num_samples)
    prefixes, weights = parse_data_path(data_path)
    bookends = split_bookends(parse_split(split))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    config = GPTDatasetConfig(
        seq_length=seq_length,
        seed=int(seed),
        cache_dir=cache_dir,
        drop_last_partial_validation_sequence=drop_last_partial_validation_sequence,
        eod_mask_loss=eod_mask_loss,
        eod_token_id=eod_token_id,
    )
    if group is not None and sync is not None:
        raise ValueError("pass either group or sync, not both")
    sync = CacheSync.from_process_group(group) if group is not None else (sync or CacheSync())
    # Names a missing file, a bad parquet directory or column.
    indexed = {p: open_token_dataset(p, parquet_column) for p in dict.fromkeys(prefixes)}
    for source in indexed.values():
        if vocab_size is not None and isinstance(source, ParquetTokenDataset):
            source.check_vocab(vocab_size)

    if weights is None:
        return tuple(
            _build_split(indexed[prefixes[0]], bookends[k], counts[k], k, split, config, sync)
            for k in range(len(SPLIT_NAMES))
        )

    for k, name in enumerate(SPLIT_NAMES):
        if bookends[k] is not None and counts[k] is None:
            raise ValueError(f"a weighted data_path needs a sample count for {name}, got None")
    w = normalize_weights(weights)
    # target[d][k]: samples the blend takes from dataset d for split k; asked: with the surplus.
    target = [[math.ceil(n * wd) if n is not None else 0 for n in counts] for wd in w]
    asked = [[int(math.ceil(t * (1 + MID_LEVEL_SURPLUS))) for t in row] for row in target]
    per_prefix = [
        [_build_split(indexed[p], bookends[k], asked[d][k], k, split, config, sync) for k in range(3)]
        for d, p in enumerate(prefixes)
    ]
    result: list[BlendedDataset | None] = []
    for k in range(len(SPLIT_NAMES)):
        parts = [per_prefix[d][k] for d in range(len(prefixes))]
        if bookends[k] is None or any(part is None for part in parts):
            result.append(None)
            continue
        size = sum(target[d][k] for d in range(len(prefixes)))
        result.append(BlendedDataset(parts, w, size, cache_dir, sync))
    return tuple(result)


SPLIT_ONLY = ("1,0,0", "0,1,0", "0,0,1")  # the --split that makes a whole dataset one split


def build_gpt_split_datasets(
    split_paths: Sequence[Sequence[str] | None],
    seq_length: int,
    num_samples: Sequence[int | None],
    seed: int,
    cache_dir: str | None = None,
    **kwargs,
) -> tuple[GPTDataset | BlendedDataset | None, ...]:
    """Megatron's ``--train-data-path``/``--valid-data-path``/``--test-data-path``: split k is built
    from its own blend, all of each dataset's sequences going to that split (the split named k, so
    its samples are those ``build_gpt_datasets`` gives a "1,0,0"-style ``--split``); None where a
    split has no path. Other arguments as :func:`build_gpt_datasets`."""
    counts = _check_num_samples(num_samples)
    out: list[GPTDataset | BlendedDataset | None] = []
    for k, paths in enumerate(split_paths):
        if paths is None:
            out.append(None)
            continue
        wanted = [0, 0, 0]
        wanted[k] = counts[k]
        out.append(build_gpt_datasets(paths, SPLIT_ONLY[k], seq_length, wanted, seed, cache_dir, **kwargs)[k])
    return tuple(out)


def samples_per_epoch(build_one, data_path: Sequence[str] | str) -> int:
    """Training samples in one pass over the training data: the sum over the blend's datasets of
    one epoch of each (``build_one(prefix)`` builds the training split of one prefix, one epoch)."""
    prefixes, _ = parse_data_path(data_path)
    return sum(len(build_one(p)) for p in prefixes)

