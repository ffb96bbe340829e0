"""Memory-mapped indexed dataset: Megatron-LM's `MMIDIDX` format, read and written.

A dataset is a pair of files sharing a prefix:

`{prefix}.bin`: the token arrays of every sequence, concatenated, no header.

`{prefix}.idx`, little-endian:

| offset  | field                                                        | type      |
|---------|--------------------------------------------------------------|-----------|
| 0       | magic `b"MMIDIDX\\x00\\x00"`                                 | 9 bytes   |
| 9       | version = 1                                                  | uint64    |
| 17      | dtype code (see `DTYPE_CODES`)                               | uint8     |
| 18      | sequence count N                                             | uint64    |
| 26      | document count D (= documents + 1)                           | uint64    |
| 34      | sequence lengths, in tokens                                  | int32[N]  |
| 34+4N   | sequence byte offsets into .bin (first 0, then cumulative)   | int64[N]  |
| 34+12N  | document indices: 0, then the sequence count after each doc  | int64[D]  |

Document `d` is made of sequences `document_indices[d] : document_indices[d + 1]`. A document
with no sequence (text that tokenized to nothing) repeats the previous value, exactly as
Megatron writes it. Files written here are byte-identical to those of Megatron-core's
`IndexedDatasetBuilder` given the same input.

Robustness: `IndexedDatasetBuilder` writes `{path}.tmp` files and renames them into place only in
`finalize` (the `.bin` first, the `.idx` last), so an interrupted build never leaves a pair that
looks valid; `IndexedDataset` checks the header, the sizes of both files and the document indices
when it opens them, and says in one line what is wrong and how to fix it.
"""

from __future__ import annotations

import os
import shutil
import struct
from types import TracebackType
from typing import Any, Iterable, Sequence

import numpy as np
import numpy.typing as npt

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 34  # 9 (magic) + 8 (version) + 1 (dtype code) + 8 (N) + 8 (D)

# The format is little-endian whatever the machine, so every dtype is spelled with '<'.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<u1"),  # uint8
    2: np.dtype("<i1"),  # int8
    3: np.dtype("<i2"),  # int16
    4: np.dtype("<i4"),  # int32
    5: np.dtype("<i8"),  # int64
    6: np.dtype("<f8"),  # float64
    7: np.dtype("<f4"),  # float32
    8: np.dtype("<u2"),  # uint16
}
_CODE_OF_DTYPE: dict[np.dtype, int] = {dtype: code for code, dtype in DTYPE_CODES.items()}

# Megatron's threshold: a vocabulary below this fits uint16 with room for added special tokens.
UINT16_VOCAB_LIMIT = 65500

_COPY_CHUNK_BYTES = 16 << 20
_SORT_CHECK_CHUNK = 1 << 22


def idx_path_of(path_prefix: str) -> str:
    """`{prefix}.idx`."""
    return path_prefix + ".idx"


def bin_path_of(path_prefix: str) -> str:
    """`{prefix}.bin`."""
    return path_prefix + ".bin"


def dataset_exists(path_prefix: str) -> bool:
    """Whether both `{prefix}.idx` and `{prefix}.bin` exist (their content is not checked)."""
    return os.path.isfile(idx_path_of(path_prefix)) and os.path.isfile(bin_path_of(path_prefix))


def dtype_to_code(dtype: npt.DTypeLike) -> int:
    """The `.idx` dtype code of a numpy dtype (np.uint16 -> 8, np.int32 -> 4, ...)."""
    if dtype is None:  # np.dtype(None) would silently mean float64
        raise ValueError(f"a token dtype is required; use one of {_dtype_names()}")
    try:
        normalized = np.dtype(dtype).newbyteorder("<")
    except TypeError as exc:
        raise ValueError(f"{dtype!r} is not a numpy dtype; use one of {_dtype_names()}") from exc
    if normalized not in _CODE_OF_DTYPE:
        raise ValueError(
            f"dtype {np.dtype(dtype)} has no code in the indexed dataset format; "
            f"use one of {_dtype_names()}"
        )
    return _CODE_OF_DTYPE[normalized]


def code_to_dtype(code: int) -> np.dtype:
    """The numpy dtype (little-endian) of an `.idx` dtype code (8 -> uint16, 4 -> int32, ...)."""
    if code not in DTYPE_CODES:
        raise ValueError(
            f"unknown dtype code {code}; valid codes are 1-8 ({_dtype_names(with_codes=True)})"
        )
    return DTYPE_CODES[code]


def best_fitting_dtype(vocab_size: int | None) -> np.dtype:
    """Token dtype for a vocabulary: uint16 when `vocab_size < 65500`, else (or unknown) int32."""
    if vocab_size is not None and vocab_size < UINT16_VOCAB_LIMIT:
        return np.dtype("<u2")
    return np.dtype("<i4")


def _dtype_names(with_codes: bool = False) -> str:
    if with_codes:
        return ", ".join(f"{c} {d.name}" for c, d in DTYPE_CODES.items())
    return ", ".join(d.name for d in DTYPE_CODES.values())


def _sequence_pointers(lengths: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte offset of each sequence in the .bin: 0, then the cumulative byte lengths."""
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= itemsize
    return pointers


class IndexedDataset:
    """Read-only view of a `{prefix}.idx` / `{prefix}.bin` pair, memory-mapped (zero copy).

    `len(ds)` is the number of sequences N; `ds[i]` is sequence i as a read-only numpy array
    viewing the mapped `.bin` (negative indices work; a slice gives a list of arrays);
    `ds.get(i, offset, length)` is a part of sequence i. The index arrays `sequence_lengths`
    (int32[N]), `sequence_pointers` (int64[N], byte offsets) and `document_indices` (int64[D]) are
    views of the mapped `.idx`. Picklable (reopens by prefix), so it can go to DataLoader workers.

    Raises ValueError with one line naming the file, the problem and the fix when the files are
    missing, truncated, of another format or inconsistent with each other.
    """

    def __init__(self, path_prefix: str | os.PathLike[str]) -> None:
        self.path_prefix = os.fspath(path_prefix)
        self._open()

    # ---- opening and validation ----

    def _open(self) -> None:
        idx_path = idx_path_of(self.path_prefix)
        bin_path = bin_path_of(self.path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise ValueError(
                    f"{path}: file not found; check the dataset prefix ({self.path_prefix!r}, "
                    "given without .idx/.bin) or create the dataset with tools/preprocess_data.py"
                )
        idx_size = os.path.getsize(idx_path)
        regenerate = "regenerate it with tools/preprocess_data.py"
        if idx_size < HEADER_SIZE:
            raise ValueError(
                f"{idx_path}: truncated index, {idx_size} bytes but the header alone needs "
                f"{HEADER_SIZE} (an interrupted write?); {regenerate}"
            )
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[:9] != INDEX_MAGIC:
            raise ValueError(
                f"{idx_path}: not a Megatron indexed dataset index (magic {header[:9]!r}, expected "
                f"{INDEX_MAGIC!r}); pass the prefix of files made by tools/preprocess_data.py"
            )
        (version,) = struct.unpack_from("<Q", header, 9)
        if version != INDEX_VERSION:
            raise ValueError(
                f"{idx_path}: unknown index version {version} (only version {INDEX_VERSION} "
                f"is supported); {regenerate}"
            )
        code = header[17]
        if code not in DTYPE_CODES:
            raise ValueError(
                f"{idx_path}: unknown dtype code {code} (valid: {_dtype_names(with_codes=True)}); "
                f"the index is corrupt or from another format, {regenerate}"
            )
        self._dtype = DTYPE_CODES[code]
        num_sequences, num_doc_entries = struct.unpack_from("<QQ", header, 18)
        expected = HEADER_SIZE + 12 * num_sequences + 8 * num_doc_entries
        if idx_size < expected:
            raise ValueError(
                f"{idx_path}: truncated index, {idx_size} bytes but its header (N={num_sequences} "
                f"sequences, D={num_doc_entries} document entries) needs {expected} "
                f"(an interrupted write?); {regenerate}"
            )
        if idx_size > expected:
            raise ValueError(
                f"{idx_path}: index longer than expected, {idx_size} bytes but its header "
                f"(N={num_sequences}, D={num_doc_entries}) accounts for {expected} (corrupt, or a "
                f"multimodal index with sequence modes, which is not supported); {regenerate}"
            )

        self._idx_map = np.memmap(idx_path, dtype=np.uint8, mode="r")
        n, d = num_sequences, num_doc_entries
        self._sequence_lengths = np.frombuffer(self._idx_map, "<i4", n, HEADER_SIZE)
        self._sequence_pointers = np.frombuffer(self._idx_map, "<i8", n, HEADER_SIZE + 4 * n)
        self._document_indices = np.frombuffer(self._idx_map, "<i8", d, HEADER_SIZE + 12 * n)
        self._check_document_indices(idx_path, n)
        self._open_bin(bin_path, idx_path, n)

    def _check_document_indices(self, idx_path: str, n: int) -> None:
        docs = self._document_indices
        problem = None
        if len(docs) == 0:
            problem = "no document indices (at least the leading 0 is required)"
        elif docs[0] != 0:
            problem = f"document indices start at {docs[0]}, not 0"
        elif docs[-1] != n:
            problem = f"document indices end at {docs[-1]}, not at the sequence count {n}"
        else:
            # Chunked (overlapping by one) so a huge index never needs a full-size temporary.
            for start in range(0, len(docs) - 1, _SORT_CHECK_CHUNK):
                chunk = docs[start : start + _SORT_CHECK_CHUNK + 1]
                if np.any(chunk[1:] < chunk[:-1]):
                    where = start + int(np.argmax(chunk[1:] < chunk[:-1]))
                    problem = (
                        f"document indices are not sorted (entry {where + 1} = {docs[where + 1]} "
                        f"< entry {where} = {docs[where]})"
                    )
                    break
        if problem is not None:
            raise ValueError(
                f"{idx_path}: {problem}; the index is corrupt, "
                "regenerate it with tools/preprocess_data.py"
            )

    def _open_bin(self, bin_path: str, idx_path: str, n: int) -> None:
        bin_size = os.path.getsize(bin_path)
        expected = 0
        if n > 0:
            if self._sequence_pointers[0] != 0:
                raise ValueError(
                    f"{idx_path}: the first sequence pointer is {self._sequence_pointers[0]}, "
                    "not 0; the index is corrupt, regenerate it with tools/preprocess_data.py"
                )
            last_length = int(self._sequence_lengths[-1])
            expected = int(self._sequence_pointers[-1]) + last_length * self._dtype.itemsize
        if bin_size != expected:
            relation = "shorter" if bin_size < expected else "longer"
            raise ValueError(
                f"{bin_path}: data file {relation} than its index says ({bin_size} bytes, "
                f"{idx_path} needs {expected}); the .bin and .idx do not belong together or the "
                "write was interrupted, regenerate both with tools/preprocess_data.py"
            )
        # numpy cannot map an empty file; an empty .bin (no tokens at all) is still valid.
        if bin_size == 0:
            self._bin_map: np.ndarray = np.zeros(0, dtype=np.uint8)
        else:
            self._bin_map = np.memmap(bin_path, dtype=np.uint8, mode="r")

    # ---- pickling: reopen by prefix instead of pickling the maps ----

    def __getstate__(self) -> dict[str, Any]:
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path_prefix = state["path_prefix"]
        self._open()

    # ---- access ----

    def __len__(self) -> int:
        return len(self._sequence_lengths)

    def __getitem__(self, idx: int | np.integer | slice) -> np.ndarray | list[np.ndarray]:
        """Sequence `idx` (zero-copy, read-only), or a list of sequences for a slice."""
        if isinstance(idx, slice):
            return [self._read(i, 0, None) for i in range(*idx.indices(len(self)))]
        if isinstance(idx, (int, np.integer)):
            return self._read(self._normalize(idx), 0, None)
        raise TypeError(f"IndexedDataset indices must be integers or slices, not {type(idx)}")

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence `idx` (to its end when length is None)."""
        return self._read(self._normalize(idx), offset, length)

    def _normalize(self, idx: int | np.integer) -> int:
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences")
        return i

    def _read(self, i: int, offset: int, length: int | None) -> np.ndarray:
        seq_len = int(self._sequence_lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {i} "
                f"of length {seq_len}"
            )
        start = int(self._sequence_pointers[i]) + offset * self._dtype.itemsize
        return np.frombuffer(self._bin_map, dtype=self._dtype, count=length, offset=start)

    # ---- index arrays ----

    @property
    def dtype(self) -> np.dtype:
        """Token dtype (from the `.idx` dtype code)."""
        return self._dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32[N]: tokens per sequence."""
        return self._sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64[N]: byte offset of each sequence in the `.bin`."""
        return self._sequence_pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64[D]: document d is sequences `document_indices[d] : document_indices[d + 1]`."""
        return self._document_indices

    @property
    def num_documents(self) -> int:
        """Number of documents (D - 1), empty documents included."""
        return len(self._document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """Total tokens in the `.bin`."""
        return self._bin_map.nbytes // self._dtype.itemsize

    @staticmethod
    def exists(path_prefix: str) -> bool:
        """Whether both files of the prefix exist (their content is not checked)."""
        return dataset_exists(path_prefix)

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}, dtype={self._dtype.name}, "
            f"sequences={len(self)}, documents={self.num_documents}, tokens={self.num_tokens})"
        )


class IndexedDatasetBuilder:
    """Writes a `.bin`/`.idx` pair, byte-identical to Megatron-core's `IndexedDatasetBuilder`.

    Tokens go to `{bin_path}.tmp` as they are added; `finalize(idx_path)` writes `{idx_path}.tmp`,
    syncs both and renames them into place (`.bin` first, `.idx` last, so a complete `.idx` always
    means a complete `.bin`). Until then nothing exists under the final names. `abort()` (called
    automatically when a `with` block exits without `finalize`, for example on an exception)
    deletes the temporary files.

        with IndexedDatasetBuilder(prefix + ".bin", dtype=best_fitting_dtype(vocab)) as builder:
            for doc in docs:
                builder.add_document(doc_tokens, [len(doc_tokens)])
            builder.finalize(prefix + ".idx")
    """

    def __init__(self, bin_path: str | os.PathLike[str], dtype: npt.DTypeLike = np.int32) -> None:
        self.bin_path = os.fspath(bin_path)
        self.dtype = code_to_dtype(dtype_to_code(dtype))
        self._bin_tmp = self.bin_path + ".tmp"
        self._idx_tmp: str | None = None
        # Lengths and document indices are kept as numpy chunks (merges add whole arrays at once)
        # plus a list for the pending per-sequence / per-document entries.
        self._length_chunks: list[np.ndarray] = []
        self._pending_lengths: list[int] = []
        self._doc_chunks: list[np.ndarray] = []
        self._pending_docs: list[int] = [0]
        self._num_sequences = 0
        self._state = "open"
        self._bin_file = open(self._bin_tmp, "wb")

    # ---- context manager ----

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state == "open":
            self.abort()

    # ---- adding data ----

    def add_item(self, tokens: Any) -> None:
        """Append one sequence (1-D array-like: numpy array, list, CPU torch tensor)."""
        array = self._as_tokens(tokens)
        self._bin_file.write(array.tobytes())
        self._pending_lengths.append(array.size)
        self._num_sequences += 1

    def end_document(self) -> None:
        """Close the current document: it holds the sequences added since the previous one."""
        self._check_open()
        self._pending_docs.append(self._num_sequences)

    def add_document(self, tokens: Any, lengths: Sequence[int] | np.ndarray) -> None:
        """Append a document: `tokens` are its sequences concatenated, `lengths` their lengths.

        Empty `tokens` with `lengths=[]` records an empty document (no sequence), as Megatron does.
        """
        array = self._as_tokens(tokens)
        lengths_array = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if np.any(lengths_array < 0) or int(lengths_array.sum()) != array.size:
            raise ValueError(
                f"add_document: lengths {lengths_array.tolist()[:8]}... must be non-negative and "
                f"sum to the number of tokens ({array.size}); pass one length per sequence"
            )
        self._bin_file.write(array.tobytes())
        self._pending_lengths.extend(int(x) for x in lengths_array)
        self._num_sequences += len(lengths_array)
        self._pending_docs.append(self._num_sequences)

    def add_index(self, path_prefix: str | os.PathLike[str]) -> None:
        """Append a whole dataset: its tokens, sequences and documents, after the current ones.

        Same as Megatron's `add_index` (used by merging): the other `.bin` is copied as is and its
        document indices are shifted by the current sequence count (its leading 0 dropped).
        """
        self._check_open()
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise ValueError(
                f"{idx_path_of(os.fspath(path_prefix))}: token dtype {other.dtype.name} differs "
                f"from this dataset's {self.dtype.name}; merge only datasets made with the same "
                "tokenizer (or rebuild them with the same dtype)"
            )
        self._flush_pending()
        self._length_chunks.append(np.array(other.sequence_lengths, dtype=np.int32))
        self._doc_chunks.append(other.document_indices[1:] + self._num_sequences)
        self._num_sequences += len(other)
        with open(bin_path_of(other.path_prefix), "rb") as source:
            shutil.copyfileobj(source, self._bin_file, _COPY_CHUNK_BYTES)
        del other

    # ---- finishing ----

    def finalize(self, idx_path: str | os.PathLike[str]) -> None:
        """Write the index and move both files into place (atomically: temp file, sync, rename)."""
        self._check_open()
        idx_path = os.fspath(idx_path)
        self._idx_tmp = idx_path + ".tmp"
        try:
            self._flush_pending()
            lengths = np.concatenate(self._length_chunks or [np.zeros(0, np.int32)])
            documents = np.concatenate(self._doc_chunks)
            pointers = _sequence_pointers(lengths, self.dtype.itemsize)
            self._bin_file.flush()
            os.fsync(self._bin_file.fileno())
            self._bin_file.close()
            with open(self._idx_tmp, "wb") as f:
                f.write(INDEX_MAGIC)
                f.write(struct.pack("<Q", INDEX_VERSION))
                f.write(struct.pack("<B", dtype_to_code(self.dtype)))
                f.write(struct.pack("<Q", len(lengths)))
                f.write(struct.pack("<Q", len(documents)))
                f.write(lengths.astype("<i4", copy=False).tobytes())
                f.write(pointers.astype("<i8", copy=False).tobytes())
                f.write(documents.astype("<i8", copy=False).tobytes())
                f.flush()
                os.fsync(f.fileno())
            # A stale .idx must not pair with the new .bin, even for a moment.
            if os.path.lexists(idx_path):
                os.remove(idx_path)
            os.replace(self._bin_tmp, self.bin_path)
            os.replace(self._idx_tmp, idx_path)
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"

    def abort(self) -> None:
        """Discard everything written so far: close and delete the temporary files."""
        if self._state == "finalized":
            return
        self._state = "aborted"
        if not self._bin_file.closed:
            self._bin_file.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if path is not None and os.path.lexists(path):
                os.remove(path)

    # ---- helpers ----

    @property
    def num_sequences(self) -> int:
        """Sequences added so far."""
        return self._num_sequences

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"IndexedDatasetBuilder({self.bin_path!r}) is already {self._state}")

    def _flush_pending(self) -> None:
        if self._pending_lengths:
            self._length_chunks.append(np.array(self._pending_lengths, dtype=np.int32))
            self._pending_lengths = []
        if self._pending_docs:
            self._doc_chunks.append(np.array(self._pending_docs, dtype=np.int64))
            self._pending_docs = []

    def _as_tokens(self, tokens: Any) -> np.ndarray:
        """Tokens as a flat little-endian array of the dataset dtype; integer overflow refused."""
        self._check_open()
        source = np.asarray(tokens).reshape(-1)
        if source.size and self.dtype.kind in "iu" and source.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            low, high = int(source.min()), int(source.max())
            if low < info.min or high > info.max:
                bad = low if low < info.min else high
                raise ValueError(
                    f"token id {bad} does not fit the dataset dtype {self.dtype.name} "
                    f"[{info.min}, {info.max}]; build with a wider dtype "
                    f"(best_fitting_dtype(vocab_size); int32 for vocabularies >= "
                    f"{UINT16_VOCAB_LIMIT})"
                )
        return source.astype(self.dtype, copy=False)


def write_dataset(
    path_prefix: str,
    documents: Iterable[Sequence[Any]],
    dtype: npt.DTypeLike = np.int32,
) -> None:
    """Write a dataset where each document is a list of sequences (each a 1-D token array-like).

    A convenience for tests and small tools; an empty list is an empty document.
    """
    with IndexedDatasetBuilder(bin_path_of(path_prefix), dtype=dtype) as builder:
        for document in documents:
            for sequence in document:
                builder.add_item(sequence)
            builder.end_document()
        builder.finalize(idx_path_of(path_prefix))
