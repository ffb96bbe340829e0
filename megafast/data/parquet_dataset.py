"""Token ids written by Spark: a directory of parquet files read as an indexed dataset, no conversion.

`--data-path DIR` (and every prefix of a blend, or of `--train/valid/test-data-path`) may be a
directory of parquet files instead of a `.bin`/`.idx` prefix:

* Files: every `*.parquet` under DIR, recursively, in sorted relative-path order (compared path
  component by component, so a folder's files stay together). Names starting with `.` or `_`
  (Spark's `_SUCCESS`, `_metadata`, `_temporary/`, the `.part-*.crc` checksums) and files of other
  extensions are ignored. Spark's `part-00000-<uuid>-c000.snappy.parquet` files thus come in
  partition order, and jllm's nested per-dataset folders (`DIR/wiki/part-*.parquet`,
  `DIR/code/part-*.parquet`) are one dataset over the whole tree; give each folder its own
  `--data-path` entry (with a weight) to blend them as separate datasets.
* Column: `column` (`--parquet-column`), or the one column whose type is a list of integers.
* Documents are the rows, in file order then row order. A row with an empty (or null) list is an
  empty document: a document entry with no sequence, as `tools/preprocess_data.py` writes it, so
  the sequence/document indices (and hence the split, the shuffles and the blend) are exactly those
  of the same rows converted to `.bin`/`.idx`.

`ParquetTokenDataset` has the interface the GPT dataset builder uses from `IndexedDataset`
(`len`, `sequence_lengths`, `document_indices`, `get(i, offset, length)`, `path_prefix`,
pickling). Opening makes one vectorised pass over the column (Arrow, memory-mapped files, one row
group at a time) for the row lengths and the min/max token id; `get` decodes the row group holding
the row and keeps the last few decoded row groups (an LRU), so random access costs one row-group
decode per miss: write the data with modest row groups (Spark's `parquet.block.size`) for
training straight from parquet. Needs pyarrow (`pip install 'megafast[data]'`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import numpy as np

from megafast.extras import require

PARQUET_SUFFIX = ".parquet"
ROW_GROUP_CACHE = 8  # decoded row groups kept by get()
_INT32_MAX = np.iinfo(np.int32).max


def _ignored(name: str) -> bool:
    """Spark/Hadoop metadata and hidden entries: `_SUCCESS`, `_temporary`, `.x.crc`, ..."""
    return name.startswith((".", "_"))


def list_parquet_files(directory: str, flag: str = "--data-path") -> list[str]:
    """The parquet files under `directory` (module doc's rules), sorted; ValueError when none."""
    if not os.path.isdir(directory):
        raise ValueError(f"{flag} {directory}: not a directory")
    found: list[tuple[tuple[str, ...], str]] = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = [d for d in dirs if not _ignored(d)]
        for name in files:
            if _ignored(name) or not name.lower().endswith(PARQUET_SUFFIX):
                continue
            path = os.path.join(root, name)
            found.append((tuple(os.path.relpath(path, directory).split(os.sep)), path))
    if not found:
        raise ValueError(
            f"{flag} {directory}: no parquet files in this directory (looked for *.parquet, "
            "recursively, ignoring _SUCCESS, .crc and other hidden/metadata files); give a "
            "directory Spark wrote, or a .bin/.idx prefix"
        )
    return [path for _, path in sorted(found)]


def is_parquet_dir(path: str) -> bool:
    """Whether a `--data-path` entry names a directory (read as parquet) rather than a prefix."""
    return os.path.isdir(path)


def _pyarrow(directory: str) -> Any:
    require("pyarrow", "data", f"--data-path {directory} (a directory of parquet files)")
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401  (loads pa.compute)
    import pyarrow.parquet  # noqa: F401

    return pa


def token_column_of(schema: Any, column: str | None, where: str) -> str:
    """The token-id column of a parquet schema: `column` checked, or the single list<int> column."""
    pa = _pyarrow(where)
    names = list(schema.names)
    hint = "pass --parquet-column NAME with a column holding lists of integer token ids"
    if column is None:
        candidates = [f.name for f in schema if _is_int_list(pa, f.type)]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise ValueError(
                f"{where}: no column holds lists of integer token ids (columns: "
                f"{_describe(schema)}); {hint}, or tokenize a text column with "
                "tools/preprocess_data.py --input DIR"
            )
        raise ValueError(
            f"{where}: several columns hold lists of integers ({', '.join(candidates)}); "
            "pass --parquet-column NAME to choose one"
        )
    if column not in names:
        raise ValueError(f"{where}: no column {column!r} (columns: {_describe(schema)}); {hint}")
    kind = schema.field(column).type
    if not _is_int_list(pa, kind):
        raise ValueError(
            f"{where}: column {column!r} is {kind}, not a list of integer token ids; {hint} "
            "(a text column is tokenized by tools/preprocess_data.py --input DIR)"
        )
    return column


def _is_int_list(pa: Any, kind: Any) -> bool:
    lists = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    return lists and pa.types.is_integer(kind.value_type)


def _describe(schema: Any) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


class ParquetTokenDataset:
    """A directory of parquet token-id files as an `IndexedDataset` (same reading interface).

    `len(ds)` is the number of sequences N (the non-empty rows); `ds.get(i, offset, length)` is a
    part of sequence i (read-only numpy array of the column's integer type); `sequence_lengths`
    int32[N], `document_indices` int64[rows + 1] as `.bin`/`.idx` would hold them.

    Raises ValueError (one line) for an empty directory, a missing or non-integer column, an
    ambiguous default column, null or negative token ids; `check_vocab` for ids >= the vocabulary.
    """

    def __init__(self, directory: str | os.PathLike[str], column: str | None = None) -> None:
        self.path_prefix = os.fspath(directory)
        files = list_parquet_files(self.path_prefix)
        pa = _pyarrow(self.path_prefix)
        pq = pa.parquet
        first = self._open_file(pq, files[0])
        self.column = token_column_of(first.schema_arrow, column, files[0])
        self.files = files
        self._readers: dict[int, Any] = {0: first}
        # Per row group: (file index, row group index); rg_rows[g] = rows before row group g.
        groups: list[tuple[int, int]] = []
        rows_per_group: list[int] = []
        row_lengths: list[np.ndarray] = []
        self.file_max_token: list[int | None] = []
        values_type = None
        for f, path in enumerate(files):
            reader = self._reader(f)
            token_column_of(reader.schema_arrow, self.column, path)  # every file has the column
            file_max = None
            for g in range(reader.metadata.num_row_groups):
                lists = self._decode(reader, g)
                values = lists.flatten()  # this row group's tokens (nulls and slicing handled)
                if values.null_count:
                    raise ValueError(
                        f"{path}: column {self.column!r} holds null token ids inside its lists; "
                        "write the token ids without nulls"
                    )
                if len(values):
                    low, high = (int(x.as_py()) for x in pa.compute.min_max(values).values())
                    if low < 0:
                        raise ValueError(
                            f"{path}: column {self.column!r} holds the negative token id {low}; "
                            "token ids must be in [0, vocabulary size)"
                        )
                    file_max = high if file_max is None else max(file_max, high)
                lengths = pa.compute.list_value_length(lists).fill_null(0).to_numpy()
                groups.append((f, g))
                rows_per_group.append(len(lengths))
                row_lengths.append(lengths.astype(np.int64, copy=False))
                values_type = values.type
            self.file_max_token.append(file_max)
        lengths = np.concatenate(row_lengths) if row_lengths else np.zeros(0, np.int64)
        if lengths.size and int(lengths.max()) > _INT32_MAX:
            raise ValueError(f"{self.path_prefix}: a row holds more than 2**31 - 1 tokens")
        self._groups = groups
        self._group_start = np.concatenate(([0], np.cumsum(rows_per_group, dtype=np.int64)))
        non_empty = lengths > 0
        self._sequence_rows = np.flatnonzero(non_empty).astype(np.int64)  # row of each sequence
        self._sequence_lengths = lengths[non_empty].astype(np.int32)
        self._document_indices = np.concatenate(([0], np.cumsum(non_empty, dtype=np.int64)))
        self._dtype = np.dtype(np.int64 if values_type is None else values_type.to_pandas_dtype())
        if not self._sequence_lengths.size:
            raise ValueError(
                f"{self.path_prefix}: column {self.column!r} holds no tokens ({lengths.size} rows, "
                "all empty); check the directory and --parquet-column"
            )
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    # ---- files ----

    @staticmethod
    def _open_file(pq: Any, path: str) -> Any:
        try:
            return pq.ParquetFile(path, memory_map=True)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a bad file
            raise ValueError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None

    def _reader(self, f: int) -> Any:
        if f not in self._readers:
            self._readers[f] = self._open_file(_pyarrow(self.path_prefix).parquet, self.files[f])
        return self._readers[f]

    def _decode(self, reader: Any, g: int) -> Any:
        """Row group g's token column as one (large) ListArray."""
        return reader.read_row_group(g, columns=[self.column]).column(0).combine_chunks()

    def _row_group(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, offsets) of a row group: row r is `values[offsets[r]:offsets[r + 1]]`."""
        hit = self._cache.get(group)
        if hit is not None:
            self._cache.move_to_end(group)
            return hit
        f, g = self._groups[group]
        lists = self._decode(self._reader(f), g)
        offsets = lists.offsets.to_numpy()
        values = lists.values.to_numpy(zero_copy_only=False)
        self._cache[group] = (values, offsets)
        if len(self._cache) > ROW_GROUP_CACHE:
            self._cache.popitem(last=False)
        return values, offsets

    # ---- pickling: the arrays travel, file handles and decoded row groups do not ----

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = {}
        state["_cache"] = OrderedDict()
        return state

    # ---- access (IndexedDataset's) ----

    def __len__(self) -> int:
        return len(self._sequence_lengths)

    def __getitem__(self, idx: int | np.integer | slice) -> np.ndarray | list[np.ndarray]:
        """Sequence `idx`, or a list of sequences for a slice."""
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        if isinstance(idx, (int, np.integer)):
            return self.get(idx)
        raise TypeError(f"ParquetTokenDataset indices must be integers or slices, not {type(idx)}")

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence `idx` (to its end when length is None)."""
        n = len(self)
        i = int(idx) + (n if int(idx) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences")
        seq_len = int(self._sequence_lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {seq_len}"
            )
        row = int(self._sequence_rows[i])
        group = int(np.searchsorted(self._group_start, row, side="right")) - 1
        values, offsets = self._row_group(group)
        start = int(offsets[row - int(self._group_start[group])]) + offset
        out = values[start : start + length]
        out.flags.writeable = False
        return out

    # ---- index arrays (IndexedDataset's) ----

    @property
    def dtype(self) -> np.dtype:
        """The token column's integer type."""
        return self._dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32[N]: tokens per sequence (per non-empty row)."""
        return self._sequence_lengths

    @property
    def document_indices(self) -> np.ndarray:
        """int64[rows + 1]: document (row) d is sequences `document_indices[d] : [d + 1]`."""
        return self._document_indices

    @property
    def num_documents(self) -> int:
        """Rows, empty ones included."""
        return len(self._document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self._sequence_lengths.sum(dtype=np.int64))

    @property
    def max_token_id(self) -> int:
        return max(m for m in self.file_max_token if m is not None)

    @property
    def source_identity(self) -> dict[str, Any]:
        """What the index cache must also key on: the column and every file's name, size, mtime."""
        files = []
        for path in self.files:
            st = os.stat(path)
            files.append([os.path.relpath(path, self.path_prefix), st.st_size, st.st_mtime_ns])
        return {"parquet_column": self.column, "parquet_files": files}

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError (one line) when a token id is >= `vocab_size` (the model's padded vocabulary)."""
        for path, high in zip(self.files, self.file_max_token):
            if high is not None and high >= vocab_size:
                raise ValueError(_out_of_vocab(path, high, self.column, vocab_size))

    def __repr__(self) -> str:
        return (
            f"ParquetTokenDataset({self.path_prefix!r}, column={self.column!r}, files={len(self.files)}, "
            f"sequences={len(self)}, documents={self.num_documents}, tokens={self.num_tokens})"
        )


def check_parquet_dir(directory: str, column: str | None = None, vocab_size: int | None = None) -> None:
    """Cheap checks of a parquet directory from the files' footers only, before any heavy work:
    files present, the token column in every file with an integer list type, and the row-group
    statistics (when the writer kept them, as Spark and pyarrow do) free of negative ids and of
    ids >= `vocab_size`. ValueError (one line) naming the file; the full pass of
    `ParquetTokenDataset` checks the same ids again without statistics."""
    files = list_parquet_files(directory)
    pq = _pyarrow(directory).parquet
    for path in files:
        try:
            meta = pq.read_metadata(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a bad file
            raise ValueError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
        column = token_column_of(meta.schema.to_arrow_schema(), column, path)
        leaf = [i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] == column]
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(leaf[0]).statistics
            if stats is None or not stats.has_min_max:
                continue
            if int(stats.min) < 0:
                raise ValueError(
                    f"{path}: column {column!r} holds the negative token id {int(stats.min)}; "
                    "token ids must be in [0, vocabulary size)"
                )
            if vocab_size is not None and int(stats.max) >= vocab_size:
                raise ValueError(_out_of_vocab(path, int(stats.max), column, vocab_size))


def _out_of_vocab(path: str, token: int, column: str, vocab_size: int) -> str:
    return (
        f"{path}: token id {token} in column {column!r} is outside the model's vocabulary "
        f"[0, {vocab_size}); pass the tokenizer (or --vocab-size) the ids were made with"
    )


def open_token_dataset(path: str, parquet_column: str | None = None) -> Any:
    """`--data-path` entry -> its dataset: a parquet directory, or an `IndexedDataset` prefix."""
    if is_parquet_dir(path):
        return ParquetTokenDataset(path, parquet_column)
    from megafast.data.indexed_dataset import IndexedDataset

    return IndexedDataset(path)
