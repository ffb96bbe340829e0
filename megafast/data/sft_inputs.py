"""Where SFT records come from: ``tools/preprocess_data.py --dataset-type sft --input PATH [PATH ...]``.

Each input path is one of

- a JSON Lines file (``.jsonl``, ``.jsonl.gz``, or ``.json``/``.json.gz`` holding one value per
  line): one record per line, bad records reported by line number;
- a JSON array file (``.json``/``.json.gz`` whose whole content is one JSON array, as Alpaca and
  gdGPT/jllm publish their data): one record per element, bad records reported by the element's
  position in the array (1-based, as a line number);
- a task directory (MFTCoder's ``data_paths``): every ``.jsonl``/``.json`` file under it,
  recursively, in sorted order, all of them the task named after the directory (its records'
  own ``task``/``data_name`` fields are overridden); a directory holding no such file directly but
  sub-directories that do is a directory of task directories, one task per sub-directory.

Several inputs are read in the order given; with more than one file, bad records name their file.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from megafast.data.preprocess import _Chunk, _read_blocks

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


@dataclass(frozen=True)
class InputFile:
    path: str
    task: str | None  # the task of every record (a task directory's name), or None: the records' own
    label: str  # how bad-record messages name the file


@dataclass
class SFTChunk:
    """A chunk of JSON lines of one input file, with the file's task override and label."""

    chunk: _Chunk
    task: str | None
    label: str | None  # None with a single input file
    path: str


def _record_files(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(RECORD_SUFFIXES)]
    return found


def resolve_inputs(inputs: str | Sequence[str]) -> list[InputFile]:
    """The files behind ``--input`` (module docstring); ValueError (one line) for a bad path."""
    paths = [inputs] if isinstance(inputs, str) else list(inputs)
    if not paths:
        raise ValueError("--input is required")
    out: list[InputFile] = []
    for path in paths:
        if os.path.isfile(path):
            if not path.lower().endswith(RECORD_SUFFIXES):
                raise ValueError(f"--input {path}: --dataset-type sft reads JSON Lines or JSON array files "
                                 "(.jsonl, .jsonl.gz, .json, .json.gz) or task directories of them")
            out.append(InputFile(path, None, path))
            continue
        if not os.path.isdir(path):
            raise ValueError(f"--input {path}: file or directory not found")
        direct = [f for f in sorted(os.listdir(path))
                  if os.path.isfile(os.path.join(path, f)) and f.lower().endswith(RECORD_SUFFIXES)]
        tasks = [path] if direct else [os.path.join(path, d) for d in sorted(os.listdir(path))
                                       if os.path.isdir(os.path.join(path, d))]
        before = len(out)
        for task_dir in tasks:
            name = os.path.basename(os.path.normpath(task_dir))
            out += [InputFile(f, name, os.path.relpath(f, os.path.dirname(os.path.normpath(path))))
                    for f in _record_files(task_dir)]
        if len(out) == before:
            raise ValueError(f"--input {path}: no .jsonl/.json file in this directory or its task sub-directories")
    return out


def _is_json_array(path: str) -> bool:
    """A ``.json``/``.json.gz`` file whose whole content is one JSON array."""
    name = path.lower()
    if not name.endswith((".json", ".json.gz")):
        return False
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4096).lstrip()
        if not head.startswith(b"["):
            return False
        f.seek(0)
        try:
            return isinstance(json.loads(f.read().decode("utf-8")), list)
        except (ValueError, UnicodeDecodeError):
            return False


def _array_chunks(path: str, chunk_records: int = 4096) -> Iterator[_Chunk]:
    """The elements of a JSON array file as JSON lines (element k on "line" k + 1)."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        items = json.loads(f.read().decode("utf-8"))
    size = os.path.getsize(path)
    for start in range(0, len(items), chunk_records):
        part = items[start: start + chunk_records]
        data = "\n".join(json.dumps(x, ensure_ascii=False) for x in part).encode("utf-8") + b"\n"
        end = size if start + chunk_records >= len(items) else size * (start + len(part)) // max(len(items), 1)
        yield _Chunk("jsonl", data=data, first_line=start + 1, end_position=end)


def read_chunks(files: Sequence[InputFile], chunk_bytes: int) -> Iterator[tuple[SFTChunk, int]]:
    """(chunk, input bytes read so far over all files) for every chunk of every file, in order."""
    done = 0
    several = len(files) > 1
    for f in files:
        chunks = _array_chunks(f.path) if _is_json_array(f.path) else _read_blocks(f.path, chunk_bytes, "jsonl")
        for chunk in chunks:
            yield SFTChunk(chunk, f.task, f.label if several else None, f.path), done + chunk.end_position
        done += os.path.getsize(f.path)


def total_bytes(files: Sequence[InputFile]) -> int:
    return sum(os.path.getsize(f.path) for f in files)


__all__ = ["InputFile", "SFTChunk", "read_chunks", "resolve_inputs", "total_bytes"]
