"""Index builders of the GPT data path: the C++ fast paths and their NumPy references.

Two hot loops from Megatron-LM, computed by `megafast._C` (csrc/dataset_helpers.cpp):

* `build_sample_idx` -- where each sample starts. Documents are laid end to end in
  `document_index` order, giving one token stream of `T = num_epochs * tokens_per_epoch` tokens.
  Sample `s` covers the stream tokens `[s * L, s * L + L + e)` (`L = seq_length`,
  `e = add_extra_token`, so consecutive samples share `e` tokens). Row `s` of the result is
  `(j, o)`: position `j` in `document_index` and token offset `o` inside document
  `document_index[j]` where sample `s` starts. Shape `(N + 1, 2)`; row `N` closes the last
  sample, with

      N = (T - e) // L                      (drop_last_partial_sequence)
      N = ceil(float32(T - e) / float32(L)) (otherwise; float32 as Megatron computes it)

* `build_blending_indices` -- greedy blending of several datasets: sample `i` goes to the dataset
  `d` that is furthest behind its share, `argmax_d w_d * max(i, 1) - n_d` (first wins ties), where
  `n_d` counts the samples `d` has received so far; it gets that dataset's sample number `n_d`.

The `*_reference` functions compute the same results another way (vectorised stream positions,
a plain Python loop) and exist for the tests.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from megafast import _C

_INT32_MAX = int(np.iinfo(np.int32).max)


def _as_int32(name: str, values: np.ndarray) -> np.ndarray:
    """Return `values` as a contiguous 1-D int32 array, refusing values that do not fit."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.dtype == np.int32:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _INT32_MAX):
        raise ValueError(f"{name} holds values outside [0, 2**31 - 1]")
    return np.ascontiguousarray(arr, dtype=np.int32)


def sample_idx_dtype(num_document_index: int, max_document_length: int) -> type[np.integer]:
    """Element type of the sample index, chosen as Megatron does.

    int32 when every value the index can hold (a position in `document_index`, an offset inside a
    document) is at most 2**31 - 1, i.e. `max(len(document_index), max(sizes)) <= 2**31 - 1`;
    int64 otherwise.
    """
    return np.int32 if max(num_document_index, max_document_length) <= _INT32_MAX else np.int64


def num_samples_in_stream(
    num_tokens: int, seq_length: int, drop_last_partial_sequence: bool, add_extra_token: bool
) -> int:
    """Number of samples N of `seq_length` (+ the shared extra token) in a stream of `num_tokens`.

    N = (num_tokens - e) // L, or ceil(float32(num_tokens - e) / float32(L)) when the last partial
    sequence is kept (Megatron computes that quotient in single precision; so do we).
    """
    usable = num_tokens - int(add_extra_token)
    if drop_last_partial_sequence:
        return usable // seq_length
    return int(np.ceil(np.float32(usable) / np.float32(seq_length)))


def _check_sample_idx_args(seq_length: int, num_epochs: int, tokens_per_epoch: int) -> None:
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if tokens_per_epoch < 1:
        raise ValueError(f"tokens_per_epoch must be >= 1, got {tokens_per_epoch}")


def build_sample_idx(
    sizes: np.ndarray,
    document_index: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token: bool = True,
) -> np.ndarray:
    """Sample start positions, `(N + 1, 2)` rows of (position in document_index, offset); C++.

    Args:
        sizes: int32[D], token count of every sequence of the indexed dataset.
        document_index: int32[K], sequence ids in stream order (the split's ids tiled over
            `num_epochs` and shuffled).
        seq_length: L, tokens per sample (excluding the shared extra token).
        num_epochs: number of epochs tiled in `document_index`.
        tokens_per_epoch: sum of `sizes` over one epoch's sequences.
        drop_last_partial_sequence: drop a final sample that would run past the stream.
        add_extra_token: samples hold L + 1 tokens, the last shared with the next sample.

    Returns:
        int32 or int64 array (see `sample_idx_dtype`) of shape (N + 1, 2).
    """
    _check_sample_idx_args(seq_length, num_epochs, tokens_per_epoch)
    sizes = _as_int32("sizes", sizes)
    document_index = _as_int32("document_index", document_index)
    if document_index.size == 0:
        raise ValueError("document_index is empty: there are no documents to draw samples from")
    max_size = int(sizes.max()) if sizes.size else 0
    dtype = sample_idx_dtype(document_index.shape[0], max_size)
    build = _C.build_sample_idx_int32 if dtype == np.int32 else _C.build_sample_idx_int64
    return build(
        sizes,
        document_index,
        int(seq_length),
        int(num_epochs),
        int(tokens_per_epoch),
        bool(drop_last_partial_sequence),
        1 if add_extra_token else 0,
    )


def build_sample_idx_reference(
    sizes: np.ndarray,
    document_index: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token: bool = True,
    dtype: type[np.integer] = np.int64,
) -> np.ndarray:
    """NumPy reference of `build_sample_idx`, computed from global stream positions.

    With `c[j] = sum(sizes[document_index[:j]])` (c[0] = 0, c[K] = total), sample s >= 1 starts at
    stream token g = s * L. Its row names the document holding the token the builder stopped on:
    token g when e = 1 (the shared token), token g - 1 when e = 0 (the sample's own last token,
    with the offset pointing one past it). If that token lies past the stream (only for a kept
    partial last sample), the row is (K - 1, sizes[document_index[K - 1]] - e).
    """
    _check_sample_idx_args(seq_length, num_epochs, tokens_per_epoch)
    e = 1 if add_extra_token else 0
    doc_sizes = np.asarray(sizes, dtype=np.int64)[np.asarray(document_index, dtype=np.int64)]
    starts = np.zeros(doc_sizes.shape[0] + 1, dtype=np.int64)
    np.cumsum(doc_sizes, out=starts[1:])
    total = int(starts[-1])
    n = num_samples_in_stream(num_epochs * tokens_per_epoch, seq_length, drop_last_partial_sequence, e)

    out = np.zeros((n + 1, 2), dtype=np.int64)
    g = np.arange(1, n + 1, dtype=np.int64) * seq_length
    stop_token = g - (1 - e)  # the token the walk stops on
    inside = stop_token < total
    # Largest j with starts[j] <= token: the document containing it (empty documents never do).
    j = np.searchsorted(starts, stop_token[inside], side="right") - 1
    out[1:][inside, 0] = j
    out[1:][inside, 1] = g[inside] - starts[j]
    out[1:][~inside, 0] = doc_sizes.shape[0] - 1
    out[1:][~inside, 1] = doc_sizes[-1] - e
    return out.astype(dtype)


def _checked_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.ascontiguousarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError("weights must be a non-empty 1-D sequence")
    if w.size >= np.iinfo(np.int16).max:
        raise ValueError(f"at most {np.iinfo(np.int16).max - 1} datasets can be blended, got {w.size}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"blend weights must be finite and > 0, got {w.tolist()}")
    return w


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy blend of `len(weights)` datasets into `size` samples; C++.

    Args:
        weights: float64[n] dataset shares, used as given (Megatron normalises them first).
        size: number of blended samples.

    Returns:
        (dataset_index int16[size], dataset_sample_index int64[size]): blended sample i is sample
        `dataset_sample_index[i]` of dataset `dataset_index[i]`.
    """
    w = _checked_weights(weights)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    _C.build_blending_indices(dataset_index, dataset_sample_index, w, int(w.size), int(size), False)
    return dataset_index, dataset_sample_index


def build_blending_indices_reference(
    weights: Sequence[float], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Plain-Python reference of `build_blending_indices` (same float64 arithmetic)."""
    w = [float(x) for x in _checked_weights(weights)]
    counts = [0] * len(w)
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    for i in range(size):
        target = max(float(i), 1.0)
        errors = [w[d] * target - counts[d] for d in range(len(w))]
        best = errors.index(max(errors))  # first maximum, as the strict ">" scan picks
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index
