"""`tools/preprocess_data.py --dataset-type sft`: chat/instruction JSONL -> token, loss-mask and
task-id indexed datasets (file layout and record formats: megafast.data.sft_format; templates:
megafast.data.chat_template).

    preprocess_sft(SFTPreprocessConfig(input="chat.jsonl", output_prefix="data/chat",
                                       tokenizer_type="HuggingFaceTokenizer", tokenizer_model="tok/",
                                       max_seq_length=4096, truncation="truncate", workers=4))

Truncation policy (``max_seq_length`` tokens per record, explicit and counted in the report):
``truncate`` keeps the first ``max_seq_length`` tokens (a record left with no answer token is
dropped and counted as such), ``drop`` drops every longer record. Without ``max_seq_length``
nothing is cut here; training truncates samples longer than ``--seq-length + 1`` tokens.

Bad records (see sft_format) are skipped, counted and listed with their line numbers in the
report (``P_K_sft.json`` keeps up to 10000 of them, stderr the first few); with ``strict`` the
first one stops the run. Inputs (JSON Lines files, JSON array files, MFTCoder-style task
directories; several at once) are megafast.data.sft_inputs'; reading works as in
megafast.data.preprocess; workers, order, progress lines and temporary files are
megafast.data.worker_pool's.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megafast.data.chat_template import TEMPLATE_MODES, ChatTemplate
from megafast.data.indexed_dataset import best_fitting_dtype
from megafast.data.preprocess import iter_json_lines
from megafast.data.sft_format import BadRecord, parse_record, sft_paths, write_info
from megafast.data.sft_inputs import SFTChunk, read_chunks, resolve_inputs, total_bytes
from megafast.data.tokenizer import build_tokenizer
from megafast.data.worker_pool import IndexedOutputs, Progress, WorkerPool

TRUNCATION_POLICIES = ("truncate", "drop")
MAX_LISTED_BAD_RECORDS = 10000
TASK_ID_DTYPE = np.uint16


@dataclass
class SFTPreprocessConfig:
    """What to convert and how (the SFT flags of tools/preprocess_data.py)."""

    input: str | Sequence[str]  # files and/or task directories (megafast.data.sft_inputs)
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None
    json_key: str = "text"
    max_seq_length: int | None = None
    truncation: str = "truncate"
    chat_template: str = "auto"
    role_markers: str | None = None
    workers: int = 1
    strict: bool = False
    chunk_bytes: int = 1 << 20
    log_interval: int = 1000
    max_bad_examples: int = 5

    def __post_init__(self) -> None:
        resolve_inputs(self.input)  # ValueError naming a missing or unreadable path
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise ValueError(f"--max-seq-length must be at least 2, got {self.max_seq_length}")
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"--truncation {self.truncation!r}: choose {' or '.join(TRUNCATION_POLICIES)}")
        if self.chat_template not in TEMPLATE_MODES:
            raise ValueError(f"--chat-template {self.chat_template!r}: choose one of {', '.join(TEMPLATE_MODES)}")
        if self.workers < 1 or self.chunk_bytes < 1 or self.log_interval < 1:
            raise ValueError("--workers, chunk_bytes and --log-interval must be positive")
        if not self.output_prefix:
            raise ValueError("--output-prefix is required")


@dataclass
class SFTStats:
    """What a run did (also written to the dataset's sidecar JSON)."""

    records: int = 0  # written
    tokens: int = 0
    answer_tokens: int = 0  # loss-mask ones
    per_task: dict[str, dict[str, int]] = field(default_factory=dict)
    truncated: int = 0  # cut to max_seq_length and kept
    dropped_too_long: int = 0  # over max_seq_length with truncation "drop"
    dropped_no_answer: int = 0  # no answer token left after truncation
    bad_records: int = 0
    bad_examples: list[tuple[int, str]] = field(default_factory=list)  # (line, reason), first 10000
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    def report(self, max_examples: int = 5) -> list[str]:
        """Human-readable summary lines (bad records with their line numbers)."""
        lines = [f"{self.records} records, {self.tokens} tokens, {self.answer_tokens} answer tokens, "
                 f"{len(self.per_task)} task(s): " + ", ".join(
                     f"{t} ({c['records']} records)" for t, c in self.per_task.items())]
        lines.append(f"truncation: {self.truncated} truncated, {self.dropped_too_long} dropped as too long, "
                     f"{self.dropped_no_answer} dropped with no answer left")
        if self.bad_records:
            shown = "; ".join(f"line {n}: {r}" for n, r in self.bad_examples[:max_examples])
            more = "; ..." if self.bad_records > max_examples else ""
            lines.append(f"skipped {self.bad_records} bad records ({shown}{more})")
        return lines


@dataclass
class _Record:
    line: int
    task: str
    ids: np.ndarray
    mask: np.ndarray


@dataclass
class _Result:
    records: list[_Record]
    bad: list[tuple[int, str]]
    path: str = ""  # the input file of these records
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_answer: int = 0


class _Encoder:
    """Parses, templates, tokenizes and truncates chunks of JSONL lines (in a worker or inline)."""

    def __init__(self, config: SFTPreprocessConfig) -> None:
        tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model, config.vocab_file,
                                    config.merge_file, config.vocab_size)
        self.template = ChatTemplate.build(tokenizer, config.chat_template, config.role_markers)
        self.max_len = config.max_seq_length
        self.truncation = config.truncation

    def __call__(self, item: SFTChunk) -> _Result:
        chunk = item.chunk
        bad: list[tuple[int, str]] = []
        parsed = []  # (line, task, pieces)
        for line, obj in iter_json_lines(chunk.data, chunk.first_line, bad):
            try:
                conversation = parse_record(obj)
                if item.task is not None:  # a task directory names the task of all its records
                    conversation = dataclasses.replace(conversation, task=item.task)
                parsed.append((line, conversation.task, self.template.pieces(conversation)))
            except BadRecord as exc:
                bad.append((line, str(exc)))
        if item.label is not None:
            bad = [(line, f"{reason} (in {item.label})") for line, reason in bad]
        result = _Result([], bad, item.path)
        encoded = self.template.encode_pieces([p for _, _, p in parsed])
        for (line, task, _), (ids, mask) in zip(parsed, encoded):
            if self.max_len is not None and len(ids) > self.max_len:
                if self.truncation == "drop":
                    result.dropped_too_long += 1
                    continue
                ids, mask = ids[: self.max_len], mask[: self.max_len]
                if not mask.any():
                    result.dropped_no_answer += 1
                    continue
                result.truncated += 1
            result.records.append(_Record(line, task, ids, mask))
        return result


class _Writer:
    """Appends results, in input order, to the three builders and the statistics."""

    def __init__(self, stack: ExitStack, config: SFTPreprocessConfig, vocab_size: int) -> None:
        self.config = config
        self.paths = sft_paths(f"{config.output_prefix}_{config.json_key}_document")
        self.dtype = best_fitting_dtype(vocab_size)
        self.outputs = IndexedOutputs(stack, {"tokens": (self.paths.tokens, self.dtype),
                                              "loss_mask": (self.paths.loss_mask, np.uint8),
                                              "task_ids": (self.paths.task_ids, TASK_ID_DTYPE)})
        self.tokens, self.mask, self.tasks = (self.outputs[k] for k in ("tokens", "loss_mask", "task_ids"))
        self.task_ids: dict[str, int] = {}
        self.stats = SFTStats()

    def write(self, result: _Result) -> None:
        stats = self.stats
        if result.bad:
            if self.config.strict:
                line, reason = result.bad[0]
                raise ValueError(f"{result.path} line {line}: {reason} (--strict stops at the first "
                                 "bad record; drop it to skip and count bad records)")
            stats.bad_records += len(result.bad)
            room = MAX_LISTED_BAD_RECORDS - len(stats.bad_examples)
            stats.bad_examples.extend(result.bad[: max(room, 0)])
        stats.truncated += result.truncated
        stats.dropped_too_long += result.dropped_too_long
        stats.dropped_no_answer += result.dropped_no_answer
        for rec in result.records:
            if rec.task not in self.task_ids:
                if len(self.task_ids) >= np.iinfo(TASK_ID_DTYPE).max:
                    raise ValueError(f"{self.config.input} line {rec.line}: more than "
                                     f"{np.iinfo(TASK_ID_DTYPE).max} task names")
                self.task_ids[rec.task] = len(self.task_ids)
                stats.per_task[rec.task] = {"records": 0, "tokens": 0, "answer_tokens": 0}
            self.tokens.add_document(rec.ids.astype(self.dtype), [len(rec.ids)])
            self.mask.add_document(rec.mask, [len(rec.mask)])
            self.tasks.add_document(np.array([self.task_ids[rec.task]], dtype=TASK_ID_DTYPE), [1])
            answer = int(rec.mask.sum())
            counts = stats.per_task[rec.task]
            counts["records"] += 1
            counts["tokens"] += len(rec.ids)
            counts["answer_tokens"] += answer
            stats.records += 1
            stats.tokens += len(rec.ids)
            stats.answer_tokens += answer

    def finalize(self, template: dict[str, Any]) -> None:
        self.stats.outputs += self.outputs.finalize()
        s = self.stats
        write_info(self.paths.info, {
            "tasks": list(self.task_ids), "records": s.records, "tokens": s.tokens,
            "answer_tokens": s.answer_tokens, "per_task": s.per_task,
            "input": (os.path.abspath(self.config.input) if isinstance(self.config.input, str)
                      else [os.path.abspath(p) for p in self.config.input]),
            "max_seq_length": self.config.max_seq_length, "truncation": self.config.truncation,
            "truncated": s.truncated, "dropped_too_long": s.dropped_too_long,
            "dropped_no_answer": s.dropped_no_answer, "bad_records": s.bad_records,
            "bad_examples": [list(x) for x in s.bad_examples], "template": template,
        })
        self.stats.outputs.append(self.paths.info)


def preprocess_sft(config: SFTPreprocessConfig) -> SFTStats:
    """Run the whole conversion; ValueError (one line) for user errors. Returns the statistics."""
    inline = _Encoder(config)  # also validates the tokenizer and template before any work
    vocab_size = inline.template.tokenizer.vocab_size
    start = time.perf_counter()
    with ExitStack() as stack:
        writer = _Writer(stack, config, vocab_size)
        pool = WorkerPool(stack, config.workers, _Encoder, (config,), inline)
        files = resolve_inputs(config.input)
        name = os.path.basename(files[0].path) if len(files) == 1 else f"{len(files)} files"
        progress = Progress(total_bytes(files), False, config.log_interval, name, "records")
        positions: dict[int, int] = {}
        chunks = read_chunks(files, config.chunk_bytes)

        def items():
            for item, position in chunks:
                positions[id(item)] = position
                yield item

        for item, result in pool.imap(items()):
            writer.write(result)
            progress.update(writer.stats.records, positions.pop(id(item)))
        if writer.stats.records == 0:
            raise ValueError(f"--input {config.input}: no usable record (" +
                             ("; ".join(writer.stats.report(config.max_bad_examples)[1:]) or "empty input") + ")")
        writer.finalize(inline.template.description)
    stats = writer.stats
    stats.seconds = time.perf_counter() - start
    return stats


__all__ = ["TRUNCATION_POLICIES", "SFTPreprocessConfig", "SFTStats", "preprocess_sft"]
