"""Tokenize a corpus into Megatron indexed datasets: streaming, parallel, exact.

    preprocess(PreprocessConfig(input="corpus.jsonl", output_prefix="data/corpus",
                                tokenizer_type="SentencePieceTokenizer",
                                tokenizer_model="sp.model", append_eod=True, workers=8))

writes `{output_prefix}_{key}_document.{bin,idx}` for each json key (`tools/preprocess_data.py`
is the command line for it). Token dtype: uint16 when the vocabulary has fewer than 65500 ids,
else int32. With `append_eod`, each non-empty document ends with the tokenizer's EOD; a document
that tokenizes to nothing still gets a document entry, with no sequence and no EOD (Megatron's
behaviour).

Inputs, by file name:

- `.jsonl` / `.json` / `.jsonl.gz` / `.json.gz`: one JSON object per line; the `json_keys` fields
  are the documents (blank lines are skipped silently).
- `.txt`: plain UTF-8 text, documents separated by one or more blank lines; a document keeps its
  line breaks. `json_keys` must name one key, used for the output name.
- `.parquet`: read in record batches of about `chunk_bytes`; a string column is text, an integer
  list column (as Spark writes token ids) is written as-is, without EOD, ids checked against the
  vocabulary. A row with a null in any key column is a bad row.
- a directory: its parquet files (Spark's `part-*.parquet`, nested folders too; `_SUCCESS`, `.crc`
  and other hidden/metadata files ignored; see `megafast.data.parquet_dataset.list_parquet_files`)
  in sorted path order, read as one input: the output is the one of the files' rows concatenated
  in that order, whatever the number of workers. Every file's columns are checked before any
  tokenizing; bad rows are reported with their file.

Pipeline (megafast.data.worker_pool): the main process reads the input in chunks of about
`chunk_bytes` (whole lines, whole documents), hands them to `workers` processes (each holding its
own tokenizer and word cache, see `megafast.data.word_cache`) and writes their results in input
order to one `IndexedDatasetBuilder` per key. At most `4 * workers` chunks are in flight, so
memory does not grow with the input. Output goes to temporary names that are renamed only when
everything succeeded; on any failure (or Ctrl-C) the temporary files are deleted.

Bad input lines (invalid JSON, not an object, missing key, a non-string value, bytes that are not
UTF-8, a string with lone surrogates, text the tokenizer rejects) are skipped in every key, counted
and reported (the first few with line numbers); with `strict` the first one stops the run with a
ValueError naming the line.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import IO, Any, Iterator, Sequence

import numpy as np

from megafast.data.indexed_dataset import IndexedDatasetBuilder, best_fitting_dtype
from megafast.data.parquet_dataset import list_parquet_files
from megafast.data.tokenizer import SentencePieceTokenizer, Tokenizer, build_tokenizer
from megafast.data.word_cache import make_encoder, protobuf_missing
from megafast.data.worker_pool import IndexedOutputs, Progress, WorkerPool
from megafast.extras import require

_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def input_format(path: str) -> str:
    """'jsonl', 'text' or 'parquet', from the file name; ValueError otherwise."""
    name = path.lower()
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".txt"):
        return "text"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"--input {path}: cannot tell the format from the name; use a .jsonl, "
                     ".jsonl.gz, .txt or .parquet file")


def output_prefix_of(output_prefix: str, key: str) -> str:
    """`{output_prefix}_{key}_document` (Megatron's naming)."""
    return f"{output_prefix}_{key}_document"


@dataclass
class PreprocessConfig:
    """What to tokenize, how, and where to (Megatron's flags of tools/preprocess_data.py)."""

    input: str
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None
    json_keys: Sequence[str] = ("text",)
    append_eod: bool = False
    workers: int = 1
    log_interval: int = 1000
    strict: bool = False
    word_cache: bool = True
    chunk_bytes: int = 1 << 20
    progress: bool | None = None  # None: a progress bar when stderr is a terminal, else log lines
    max_bad_examples: int = 5

    def __post_init__(self) -> None:
        self.json_keys = tuple(self.json_keys)
        if os.path.isdir(self.input):  # a directory of parquet files, e.g. written by Spark
            self.files = list_parquet_files(self.input, "--input")
            self.format = "parquet"
        elif not os.path.isfile(self.input):
            raise ValueError(f"--input {self.input}: file not found")
        else:
            self.format = input_format(self.input)
            self.files = [self.input]
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"--json-keys {list(self.json_keys)}: give one or more distinct keys")
        if self.format == "text" and len(self.json_keys) != 1:
            raise ValueError(f"--json-keys {list(self.json_keys)}: a .txt input has one text "
                             "stream, so give one key (it names the output)")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.chunk_bytes < 1 or self.log_interval < 1:
            raise ValueError("chunk_bytes and --log-interval must be positive")
        if not self.output_prefix:
            raise ValueError("--output-prefix is required")


@dataclass
class PreprocessStats:
    """What a run did."""

    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    empty_documents: dict[str, int] = field(default_factory=dict)
    input_bytes: int = 0
    bad_lines: int = 0
    bad_examples: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)


# ---- work units ----


@dataclass
class _Chunk:
    """A slice of the input: raw bytes of whole lines/documents, or parquet rows."""

    kind: str  # "jsonl" | "text" | "rows"
    data: bytes = b""
    first_line: int = 1
    rows: dict[str, list[str]] | None = None  # text columns of parquet rows
    row_numbers: list[int] | None = None
    bad: list[tuple[int, str]] = field(default_factory=list)  # rows found bad while reading
    end_position: int = 0  # input position reached after this chunk (for progress)
    pretokenized: dict[str, tuple[bytes, list[int]]] | None = None  # kept in the main process


@dataclass
class _Result:
    per_key: list[tuple[bytes, list[int]]]  # per text key: token bytes, tokens per document
    documents: int
    bad: list[tuple[int, str]]


@dataclass(frozen=True)
class _EncoderSpec:
    """Everything a worker needs to rebuild the tokenizer and encoder (picklable)."""

    tokenizer_type: str
    tokenizer_model: str | None
    vocab_file: str | None
    merge_file: str | None
    vocab_size: int | None
    keys: tuple[str, ...]  # the keys tokenized from text
    dtype: str
    eod: int | None
    word_cache: bool


def iter_json_lines(data: bytes, first_line: int, bad: list[tuple[int, str]]) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a jsonl block; lines that are not
    UTF-8 or not JSON go to ``bad`` as (line number, reason)."""
    for offset, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        number = first_line + offset
        try:
            yield number, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append((number, "not valid UTF-8"))
        except ValueError as exc:
            bad.append((number, f"invalid JSON ({str(exc).split(':')[0]})"))


def _parse_jsonl(data: bytes, first_line: int, keys: Sequence[str]
                 ) -> tuple[list[list[str]], list[int], list[tuple[int, str]]]:
    """Documents per key, their line numbers, and (line, reason) of bad lines."""
    texts: list[list[str]] = [[] for _ in keys]
    lines: list[int] = []
    bad: list[tuple[int, str]] = []
    for number, obj in iter_json_lines(data, first_line, bad):
        if not isinstance(obj, dict):
            bad.append((number, f"not a JSON object (a {type(obj).__name__})"))
            continue
        values = []
        for key in keys:
            value = obj.get(key)
            if not isinstance(value, str):
                values = f"missing key {key!r}" if key not in obj else (
                    f"key {key!r} is a {type(value).__name__}, not a string")
                break
            if not value.isascii() and not _utf8_encodable(value):
                values = f"key {key!r} holds a lone surrogate (an unpaired \\ud8xx escape)"
                break
            values.append(value)
        if isinstance(values, str):
            bad.append((number, values))
            continue
        for column, value in zip(texts, values):
            column.append(value)
        lines.append(number)
    return texts, lines, bad


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_text(data: bytes, first_line: int
                ) -> tuple[list[list[str]], list[int], list[tuple[int, str]]]:
    """Blank-line separated documents (their first line numbers) and undecodable ones."""
    docs: list[str] = []
    lines: list[int] = []
    bad: list[tuple[int, str]] = []
    current: list[bytes] = []
    start = first_line

    def flush() -> None:
        try:
            docs.append(b"\n".join(current).decode("utf-8"))
            lines.append(start)
        except UnicodeDecodeError:
            bad.append((start, "not valid UTF-8"))
        current.clear()

    for offset, raw in enumerate(data.split(b"\n")):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if raw.strip():
            if not current:
                start = first_line + offset
            current.append(raw)
        elif current:
            flush()
    if current:
        flush()
    return [docs], lines, bad


class _ChunkEncoder:
    """Parses and encodes chunks (in a worker process, or in the main one for one worker)."""

    def __init__(self, spec: _EncoderSpec, tokenizer: Tokenizer | None = None) -> None:
        if tokenizer is None:
            tokenizer = build_tokenizer(spec.tokenizer_type, spec.tokenizer_model,
                                        spec.vocab_file, spec.merge_file, spec.vocab_size)
        self.keys = spec.keys
        self.encoder = make_encoder(tokenizer, np.dtype(spec.dtype), spec.eod, spec.word_cache)

    def __call__(self, chunk: _Chunk) -> _Result:
        if chunk.kind == "jsonl":
            texts, numbers, bad = _parse_jsonl(chunk.data, chunk.first_line, self.keys)
        elif chunk.kind == "text":
            texts, numbers, bad = _parse_text(chunk.data, chunk.first_line)
        else:
            assert chunk.rows is not None and chunk.row_numbers is not None
            texts, numbers, bad = [chunk.rows[k] for k in self.keys], chunk.row_numbers, []
        try:
            per_key = [self.encoder.encode(column) for column in texts]
        except (ValueError, UnicodeError, RuntimeError, TypeError):
            texts, numbers, rejected = self._drop_rejected(texts, numbers)
            bad = sorted(bad + rejected)
            per_key = [self.encoder.encode(column) for column in texts]
        return _Result(per_key, len(numbers), bad)

    def _drop_rejected(self, texts: list[list[str]], numbers: list[int]
                       ) -> tuple[list[list[str]], list[int], list[tuple[int, str]]]:
        """Find the documents the tokenizer refuses, one by one, and drop them from every key."""
        reasons: dict[int, str] = {}
        for column in texts:
            for i, text in enumerate(column):
                if i in reasons:
                    continue
                try:
                    self.encoder.encode([text])
                except (ValueError, UnicodeError, RuntimeError, TypeError) as exc:
                    reasons[i] = f"rejected by the tokenizer ({str(exc).splitlines()[0][:120]})"
        keep = [i for i in range(len(numbers)) if i not in reasons]
        return ([[column[i] for i in keep] for column in texts], [numbers[i] for i in keep],
                [(numbers[i], r) for i, r in reasons.items()])


# ---- readers (main process) ----


def _read_blocks(path: str, chunk_bytes: int, kind: str) -> Iterator[_Chunk]:
    """Chunks of whole lines (jsonl) or whole blank-line separated documents (text)."""
    with open(path, "rb") as raw:
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        line = 1
        while True:
            block = stream.read(chunk_bytes)
            if not block:
                return
            block += stream.readline()  # complete the last line
            if kind == "text":  # extend to a blank line, the end of a document
                last = block[block.rfind(b"\n", 0, len(block) - 1) + 1:]
                extra = []
                while last.strip():
                    last = stream.readline()
                    if not last:
                        break
                    extra.append(last)
                block += b"".join(extra)
            yield _Chunk(kind, data=block, first_line=line, end_position=raw.tell())
            line += block.count(b"\n")


class _ParquetInput:
    """A parquet file's key columns: which are text, which are token ids; chunks of rows."""

    def __init__(self, path: str, keys: Sequence[str], chunk_bytes: int, vocab_size: int,
                 dtype: np.dtype, position: int = 0, where: str = "") -> None:
        """`position`: input bytes before this file (progress); `where`: its name in bad-row reasons."""
        require("pyarrow", "data", "parquet input")
        self.position, self.where = position, where
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.keys, self.vocab_size, self.dtype = path, tuple(keys), vocab_size, dtype
        try:
            self.file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"--input {path}: not a readable parquet file ({exc})") from None
        schema = self.file.schema_arrow
        self.token_keys: set[str] = set()
        for key in keys:
            if key not in schema.names:
                raise ValueError(f"--input {path} has no column {key!r} (columns: "
                                 f"{', '.join(schema.names)}); pass --json-keys with one of them")
            column_type = schema.field(key).type
            if pa.types.is_list(column_type) or pa.types.is_large_list(column_type):
                if not pa.types.is_integer(column_type.value_type):
                    raise ValueError(f"--input {path}: column {key!r} is {column_type}; a list "
                                     "column must hold integer token ids")
                self.token_keys.add(key)
            elif not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
                raise ValueError(f"--input {path}: column {key!r} is {column_type}; use a string "
                                 "column (text) or a list of integers (token ids)")
        self.text_keys = tuple(k for k in keys if k not in self.token_keys)
        metadata = self.file.metadata
        self.rows_total = max(1, metadata.num_rows)
        row_bytes = sum(metadata.row_group(i).total_byte_size
                        for i in range(metadata.num_row_groups)) / self.rows_total
        self.batch_rows = max(1, int(chunk_bytes / max(row_bytes, 1.0)))

    def chunks(self) -> Iterator[_Chunk]:
        """Record batches: text columns as strings, token columns encoded here (main process)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        file_size = os.path.getsize(self.path)
        row = 1
        for batch in self.file.iter_batches(batch_size=self.batch_rows, columns=list(self.keys)):
            n = batch.num_rows
            invalid = np.zeros(n, dtype=bool)
            for key in self.keys:
                invalid |= pc.is_null(batch.column(key)).to_numpy(zero_copy_only=False)
            valid = pa.array(~invalid)
            numbers = [row + i for i in np.flatnonzero(~invalid).tolist()]
            rows: dict[str, list[str]] = {}
            pretokenized: dict[str, tuple[bytes, list[int]]] = {}
            for key in self.keys:
                column = batch.column(key).filter(valid)
                if key in self.token_keys:
                    pretokenized[key] = _token_column(column, self.path, key, numbers,
                                                      self.vocab_size, self.dtype)
                else:
                    rows[key] = column.to_pylist()
            bad = [(row + i, "null value" + self.where) for i in np.flatnonzero(invalid).tolist()]
            row += n
            done = int(file_size * min(1.0, (row - 1) / self.rows_total))
            yield _Chunk("rows", rows=rows, row_numbers=numbers, bad=bad, end_position=self.position + done,
                         pretokenized=pretokenized)


def _parquet_inputs(config: PreprocessConfig, vocab_size: int, dtype: np.dtype
                    ) -> tuple[Iterator[_Chunk], tuple[str, ...]]:
    """Chunks of every parquet file of the input, in order, and the keys tokenized from text.

    Every file is opened and its columns checked first (one-line errors before any tokenizing);
    a key must be text in every file or token ids in every file."""
    inputs: list[_ParquetInput] = []
    position = 0
    directory = len(config.files) > 1 or config.files[0] != config.input
    for path in config.files:
        where = f" (in {os.path.relpath(path, config.input)})" if directory else ""
        inputs.append(_ParquetInput(path, config.json_keys, config.chunk_bytes, vocab_size, dtype,
                                    position, where))
        position += os.path.getsize(path)
        if inputs[-1].text_keys != inputs[0].text_keys:
            raise ValueError(f"--input {config.input}: {path} has text columns {list(inputs[-1].text_keys)} "
                             f"but {config.files[0]} has {list(inputs[0].text_keys)}; give files of one "
                             "schema")

    def chunks() -> Iterator[_Chunk]:
        for parquet in inputs:
            yield from parquet.chunks()

    return chunks(), inputs[0].text_keys


def _token_column(column: Any, path: str, key: str, numbers: list[int], vocab_size: int,
                  dtype: np.dtype) -> tuple[bytes, list[int]]:
    """An integer list column as (dtype bytes, lengths); ids must be in [0, vocab_size)."""
    offsets = column.offsets.to_numpy()
    values = column.flatten().to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets).tolist()
    if values.size:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            where = int(np.argmax((values < 0) | (values >= vocab_size)))
            doc = int(np.searchsorted(offsets, where, side="right")) - 1
            raise ValueError(f"--input {path} row {numbers[doc]} column {key!r}: token id {bad} "
                             f"is outside the vocabulary [0, {vocab_size}); pass the tokenizer "
                             "the ids were made with")
    return values.astype(dtype).tobytes(), lengths


# ---- the run ----


def _describe_bad(stats: PreprocessStats, unit: str) -> str:
    shown = "; ".join(f"{unit} {n}: {reason}" for n, reason in stats.bad_examples)
    more = "" if stats.bad_lines <= len(stats.bad_examples) else "; ..."
    return f"skipped {stats.bad_lines} bad input {unit}s ({shown}{more})"


def preprocess(config: PreprocessConfig) -> PreprocessStats:
    """Run the whole conversion (see the module docstring); returns what it did.

    Raises ValueError (one line) for user errors: missing files, unknown tokenizer, a bad line
    under `strict`, unusable parquet columns.
    """
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model, config.vocab_file,
                                config.merge_file, config.vocab_size)
    if config.word_cache and isinstance(tokenizer, SentencePieceTokenizer):
        protobuf_missing()  # warns here, once, before the workers fork
    dtype = best_fitting_dtype(tokenizer.vocab_size)
    eod = tokenizer.eod if config.append_eod else None
    keys = config.json_keys
    unit = "row" if config.format == "parquet" else "line"
    chunks: Iterator[_Chunk]
    if config.format == "parquet":
        chunks, text_keys = _parquet_inputs(config, tokenizer.vocab_size, dtype)
    else:
        chunks = _read_blocks(config.input, config.chunk_bytes, config.format)
        text_keys = keys
    spec = _EncoderSpec(config.tokenizer_type, config.tokenizer_model, config.vocab_file,
                        config.merge_file, config.vocab_size, text_keys, dtype.str, eod,
                        config.word_cache)
    stats = PreprocessStats(tokens={k: 0 for k in keys}, empty_documents={k: 0 for k in keys},
                            input_bytes=sum(os.path.getsize(f) for f in config.files))
    start = time.perf_counter()
    with ExitStack() as stack:
        outputs = IndexedOutputs(stack, {k: (output_prefix_of(config.output_prefix, k), dtype) for k in keys})
        # Token columns need no worker: with no text key, everything runs here.
        workers = config.workers if text_keys else 1
        inline = _ChunkEncoder(spec, tokenizer) if workers == 1 else None  # shares our tokenizer
        pool = WorkerPool(stack, workers, _ChunkEncoder, (spec,), inline)
        progress = Progress(stats.input_bytes, config.progress, config.log_interval,
                            os.path.basename(config.input), "documents", "docs")
        stack.callback(progress.close)
        # Token columns stay here: the workers get a copy without them.
        for chunk, result in pool.imap(chunks, send=lambda c: replace(c, pretokenized=None)):
            _write(chunk, result, keys, text_keys, outputs.builders, dtype, stats, config, unit)
            progress.update(stats.documents, chunk.end_position)
        stats.outputs += outputs.finalize()
    stats.seconds = time.perf_counter() - start
    if stats.bad_lines:
        print("warning: " + _describe_bad(stats, unit), file=sys.stderr)
    return stats


def _write(chunk: _Chunk, result: _Result, keys: Sequence[str], text_keys: Sequence[str],
           builders: dict[str, IndexedDatasetBuilder], dtype: np.dtype, stats: PreprocessStats,
           config: PreprocessConfig, unit: str) -> None:
    """Append one chunk's documents to every key's builder (main process, input order)."""
    bad = sorted(chunk.bad + result.bad)
    if bad:
        if config.strict:
            number, reason = bad[0]
            raise ValueError(f"{config.input} {unit} {number}: {reason} (--strict stops at the "
                             "first bad input; drop it to skip and count bad lines)")
        stats.bad_lines += len(bad)
        room = config.max_bad_examples - len(stats.bad_examples)
        stats.bad_examples.extend(bad[:max(room, 0)])
    encoded = dict(zip(text_keys, result.per_key))
    encoded.update(chunk.pretokenized or {})
    for key in keys:
        blob, lengths = encoded[key]
        builder = builders[key]
        tokens = np.frombuffer(blob, dtype=dtype)
        offset = 0
        empty = 0
        for n in lengths:
            if n:
                builder.add_item(tokens[offset:offset + n])
                offset += n
            else:
                empty += 1
            builder.end_document()
        stats.tokens[key] += offset
        stats.empty_documents[key] += empty
    stats.documents += result.documents
