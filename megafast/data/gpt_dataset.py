"""GPT pretraining dataset: fixed-length samples cut from a shuffled stream of documents.

Megatron-core 0.19.2's `GPTDataset` semantics, so that the same seed, split and sizes give the
same samples in the same order (see DESIGN.md, "GPT dataset semantics"). For the sequences
`[beg, end)` of an indexed dataset (one split), `L = seq_length`, `n = num_samples`:

1. Tokens per epoch `T = sum(sequence_lengths[beg:end])`; epochs `E` = the fewest with
   `E * T >= n * L + 1` (every sample needs L tokens plus one shared with the next).
2. Document index, int32[E * (end - beg)]: the split's sequence ids tiled E times and shuffled by
   `numpy.random.RandomState(seed)`. When E > 1 and the last epoch contributes fewer than
   `int(0.8 * samples_per_epoch)` of the n samples, the first E - 1 epochs and the last epoch are
   shuffled separately (so the partial epoch still spreads over the whole corpus).
3. Sample index, (N + 1, 2): `helpers.build_sample_idx` (rows of (document-index position,
   offset)), N = (E * T - 1) // L. Sample s is stream tokens `[s * L, s * L + L + 1)`.
4. Shuffle index: `arange(N)` shuffled by the same RandomState (uint32, or int64 for huge N); with
   a separate last epoch, `[0, N1)` and `[N1, N)` are shuffled separately,
   `N1 = ((E - 1) * T - 1) // L`.

`len(dataset) = N`, which can exceed n (every sample of the E epochs is available). Item i is
sample `shuffle_index[i]`: `s = L + 1` tokens, `tokens = s[:-1]`, `labels = s[1:]`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from megafast.data.cached_dataset import CachedIndexDataset
from megafast.data.helpers import build_sample_idx, num_samples_in_stream, sample_idx_dtype
from megafast.data.index_cache import Arrays, CacheSync
from megafast.data.indexed_dataset import IndexedDataset

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
# A last epoch giving fewer than this fraction of an epoch's samples is shuffled on its own.
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80


@dataclass(frozen=True)
class GPTDatasetConfig:
    """What a GPT dataset needs beyond its data.

    Attributes:
        seq_length: L, tokens per sample (each sample reads L + 1 tokens).
        seed: seed of the document and sample shuffles.
        cache_dir: where index arrays are cached (`--data-cache-path`); None builds in memory.
        drop_last_partial_validation_sequence: as Megatron: when False the valid split keeps a
            final partial sample, padded (tokens and labels 0, loss_mask 0 on the padding).
        eod_mask_loss: set loss_mask to 0 where the input token is the EOD (`--eod-mask-loss`).
        eod_token_id: the EOD token id; required when eod_mask_loss is set.
    """

    seq_length: int
    seed: int
    cache_dir: str | None = None
    drop_last_partial_validation_sequence: bool = True
    eod_mask_loss: bool = False
    eod_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.seq_length, bool) or not isinstance(self.seq_length, (int, np.integer)):
            raise ValueError(f"seq_length must be an integer, got {self.seq_length!r}")
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {self.seq_length}")
        if self.eod_mask_loss and self.eod_token_id is None:
            raise ValueError("eod_mask_loss needs eod_token_id (the tokenizer's EOD id)")


def num_epochs_for(tokens_per_epoch: int, num_samples: int | None, seq_length: int) -> int:
    """E = max(1, ceil((n * L + 1) / T)): the fewest epochs giving n samples (1 when n is None)."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def samples_before_last_epoch(tokens_per_epoch: int, num_epochs: int, seq_length: int) -> int:
    """N1 = ((E - 1) * T - 1) // L, the samples lying entirely in the first E - 1 epochs."""
    return ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length


def separate_last_epoch(
    tokens_per_epoch: int, num_epochs: int, num_samples: int | None, seq_length: int
) -> bool:
    """Whether the last epoch is shuffled on its own: it gives < int(0.8 * samples per epoch)."""
    if num_epochs == 1 or num_samples is None:
        return False
    from_last = num_samples - samples_before_last_epoch(tokens_per_epoch, num_epochs, seq_length)
    per_epoch = (tokens_per_epoch - 1) // seq_length
    assert 0 <= from_last <= per_epoch + 1, (from_last, per_epoch)
    return from_last < int(SEPARATE_LAST_EPOCH_THRESHOLD * per_epoch)


def build_document_index(
    sequence_ids: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last: bool
) -> np.ndarray:
    """int32[E * len(sequence_ids)]: the ids tiled E times, shuffled (the last epoch on its own)."""
    if separate_last and num_epochs > 1:
        first = build_document_index(sequence_ids, num_epochs - 1, rng, False)
        last = build_document_index(sequence_ids, 1, rng, False)
        return np.concatenate((first, last))
    index = np.tile(np.asarray(sequence_ids, dtype=np.int32), num_epochs)
    rng.shuffle(index)
    return index


def shuffle_index_dtype(num_samples: int) -> type[np.integer]:
    """uint32, or int64 when the sample count reaches 2**32 - 2 (Megatron's rule)."""
    return np.int64 if num_samples >= np.iinfo(np.uint32).max - 1 else np.uint32


def build_shuffle_index(num_first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """`arange(total)` with `[0, num_first)` and `[num_first, total)` each shuffled in place."""
    dtype = shuffle_index_dtype(total)
    first = np.arange(num_first, dtype=dtype)
    rng.shuffle(first)
    if num_first == total:
        return first
    last = np.arange(num_first, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


class GPTDataset(CachedIndexDataset):
    """Samples of `seq_length + 1` tokens from the sequences `[beg, end)` of an indexed dataset.

    Args:
        indexed: the indexed dataset (its sequences are Megatron's "documents"), or a
            `ParquetTokenDataset` (same interface).
        sequence_range: (beg, end), the split's sequences.
        num_samples: n, the samples asked for (the dataset may hold more); None = one epoch.
        split: "train", "valid" or "test" (valid may keep a partial last sample, see config).
        config: sequence length, seed, cache directory and loss-mask options.
        sync: which rank builds the cache and the barrier the others wait on.

    Item i is a dict of tensors of length L: `tokens` int64, `labels` int64 (tokens shifted by
    one), `loss_mask` float32, `position_ids` int64 (`arange(L)`).
    """

    CACHE_NAME = "GPTDataset"
    CACHE_FORMAT = "megafast-gpt-indices-1"
    INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")

    def __init__(
        self,
        indexed: IndexedDataset,
        sequence_range: tuple[int, int],
        num_samples: int | None,
        split: str,
        config: GPTDatasetConfig,
        sync: CacheSync = CacheSync(),
    ) -> None:
        beg, end = (int(x) for x in sequence_range)
        if not 0 <= beg < end <= len(indexed):
            raise ValueError(
                f"{indexed.path_prefix}: sequence range [{beg}, {end}) is empty or outside the "
                f"dataset's {len(indexed)} sequences"
            )
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.indexed = indexed
        self.sequence_range = (beg, end)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.split = split
        self.config = config
        self.drop_last_partial_sequence = split != "valid" or config.drop_last_partial_validation_sequence

        lengths = indexed.sequence_lengths
        self.tokens_per_epoch = int(np.sum(lengths[beg:end], dtype=np.int64))
        if self.tokens_per_epoch < 1:
            raise ValueError(
                f"{indexed.path_prefix}: the {split} split (sequences [{beg}, {end})) holds no tokens"
            )
        self.num_epochs = num_epochs_for(self.tokens_per_epoch, num_samples, config.seq_length)
        self.separate_last_epoch = separate_last_epoch(
            self.tokens_per_epoch, self.num_epochs, num_samples, config.seq_length
        )
        self._max_length = int(lengths.max())

        self._load_indices(config.cache_dir, sync)

    # ---- identity ----

    def _identity_fields(self) -> dict[str, Any]:
        return {
            "dataset_path": os.path.abspath(self.indexed.path_prefix),
            "dataset_num_sequences": len(self.indexed),
            "sequence_range": list(self.sequence_range),
            "tokens_per_epoch": self.tokens_per_epoch,
            "num_samples": self.num_samples,
            "split": self.split,
            "random_seed": int(self.config.seed),
            "sequence_length": int(self.config.seq_length),
            "drop_last_partial_sequence": self.drop_last_partial_sequence,
            "add_extra_token_to_sequence": True,
            # A parquet directory adds its column and files (name, size, mtime); a prefix nothing.
            **getattr(self.indexed, "source_identity", {}),
        }

    # ---- index building and checking ----

    def _expected_num_samples(self) -> int:
        return num_samples_in_stream(
            self.num_epochs * self.tokens_per_epoch,
            self.config.seq_length,
            self.drop_last_partial_sequence,
            True,
        )

    def _build_indices(self) -> Arrays:
        """Document, sample and shuffle indices (steps 2-4 of the module docstring)."""
        beg, end = self.sequence_range
        rng = np.random.RandomState(self.config.seed)
        document_index = build_document_index(
            np.arange(beg, end, dtype=np.int32), self.num_epochs, rng, self.separate_last_epoch
        )
        sample_index = build_sample_idx(
            self.indexed.sequence_lengths,
            document_index,
            self.config.seq_length,
            self.num_epochs,
            self.tokens_per_epoch,
            self.drop_last_partial_sequence,
            True,
        )
        total = sample_index.shape[0] - 1
        num_first = total
        if self.separate_last_epoch:
            num_first = samples_before_last_epoch(
                self.tokens_per_epoch, self.num_epochs, self.config.seq_length
            )
        shuffle_index = build_shuffle_index(num_first, total, rng)
        return {
            "document_index": document_index,
            "sample_index": sample_index,
            "shuffle_index": shuffle_index,
        }

    def _check(self, arrays: Mapping[str, np.ndarray]) -> str | None:
        """Why cached arrays cannot be this dataset's indices (None when they can)."""
        beg, end = self.sequence_range
        num_docs = self.num_epochs * (end - beg)
        n = self._expected_num_samples()
        expected = {
            "document_index": (np.dtype(np.int32), (num_docs,)),
            "sample_index": (np.dtype(sample_idx_dtype(num_docs, self._max_length)), (n + 1, 2)),
            "shuffle_index": (np.dtype(shuffle_index_dtype(n)), (n,)),
        }
        for name, (dtype, shape) in expected.items():
            a = arrays[name]
            if a.dtype != dtype or a.shape != shape:
                return f"{name} is {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)}"
        doc, sample, shuffle = (arrays[k] for k in self.INDEX_NAMES)
        if not (beg <= int(doc[0]) < end and beg <= int(doc[-1]) < end):
            return "document_index holds ids outside the split"
        if int(sample[0, 0]) != 0 or int(sample[0, 1]) != 0 or not 0 <= int(sample[-1, 0]) < num_docs:
            return "sample_index does not start at (0, 0) or ends outside the document index"
        if n and not (int(shuffle[0]) < n and int(shuffle[-1]) < n):
            return "shuffle_index holds samples out of range"
        return None

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def sample_tokens(self, idx: int) -> np.ndarray:
        """int64 tokens of item idx: L + 1 of them (fewer only for a kept partial last sample)."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for a dataset of {n} samples")
        s = int(self.shuffle_index[idx % n])
        pos0, off0 = (int(x) for x in self.sample_index[s])
        pos1, off1 = (int(x) for x in self.sample_index[s + 1])
        get = self.indexed.get
        if pos0 == pos1:
            parts = [get(int(self.document_index[pos0]), offset=off0, length=off1 - off0 + 1)]
        else:
            parts = [get(int(self.document_index[pos0]), offset=off0)]
            parts += [get(int(self.document_index[p])) for p in range(pos0 + 1, pos1)]
            parts.append(get(int(self.document_index[pos1]), offset=0, length=off1 + 1))
        return np.concatenate(parts).astype(np.int64, copy=False)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        L = self.config.seq_length
        sample = self.sample_tokens(idx)
        real = sample.shape[0]  # < L + 1 only for a kept partial last sample
        text = np.zeros(L + 1, dtype=np.int64)
        text[:real] = sample
        tokens = torch.from_numpy(text[:-1].copy())  # (L,)
        labels = torch.from_numpy(text[1:].copy())  # (L,)
        loss_mask = torch.ones(L, dtype=torch.float32)
        if self.config.eod_mask_loss:
            loss_mask[tokens == self.config.eod_token_id] = 0.0
        if real < L + 1:
            loss_mask[max(real - 1, 0) :] = 0.0  # labels from here on are padding
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": torch.arange(L, dtype=torch.int64),
        }

    def __repr__(self) -> str:
        beg, end = self.sequence_range
        return (
            f"GPTDataset({self.indexed.path_prefix!r}, split={self.split}, sequences=[{beg}, {end}), "
            f"samples={len(self)}, epochs={self.num_epochs}, seq_length={self.config.seq_length})"
        )
