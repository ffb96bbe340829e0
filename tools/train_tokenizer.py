"""Train a SentencePiece BPE or unigram tokenizer on local text or jsonl files.

    python tools/train_tokenizer.py --input data/demo.jsonl --model-prefix data/sp8k \\
        --vocab-size 8000 --model-type bpe

Inputs: `.jsonl` / `.jsonl.gz` (the `--json-keys` fields of each object are documents) or any other
file read as UTF-8 text. SentencePiece trains on sentences, so every document is fed line by line
(empty lines skipped); lines longer than `--max-sentence-length` bytes are skipped by SentencePiece.
Bad jsonl lines (invalid JSON, missing key) are skipped and counted.

Writes `{model_prefix}.model` and `{model_prefix}.vocab`. Training happens in a temporary folder
next to them and both files are moved into place only when training succeeded, so a failed run
never leaves a model that looks usable. Errors a user can cause (missing file, no text, a
vocabulary larger than the corpus can give) end the tool with one line naming the fix.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from typing import IO, Iterator, Sequence

import sentencepiece as spm


def _open_text(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_sentences(paths: Sequence[str], json_keys: Sequence[str],
                   skipped: list[int] | None = None) -> Iterator[str]:
    """Non-empty lines of every document of `paths` (jsonl fields or plain text lines).

    Undecodable or malformed jsonl lines are skipped; their count is added to `skipped[0]`.
    """
    for path in paths:
        is_jsonl = path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))
        with _open_text(path) as f:
            for raw in f:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    if skipped is not None:
                        skipped[0] += 1
                    continue
                if not is_jsonl:
                    line = line.rstrip("\r\n")
                    if line.strip():
                        yield line
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    texts = [obj[key] for key in json_keys]
                except (ValueError, KeyError, TypeError):
                    if skipped is not None:
                        skipped[0] += 1
                    continue
                for text in texts:
                    if isinstance(text, str):
                        yield from (s for s in text.split("\n") if s.strip())


def _friendly_error(message: str, vocab_size: int) -> str:
    """One line for SentencePiece's trainer errors (which name C++ source lines)."""
    match = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if match:
        return (f"--vocab-size {vocab_size} is too large for this corpus: SentencePiece can learn at "
                f"most {match.group(2)} pieces from it; lower --vocab-size or give more text")
    match = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if match:
        return (f"--vocab-size {vocab_size} is too small: the corpus's characters (and the 256 "
                f"byte pieces of --byte-fallback, if set) need {match.group(2)}; raise "
                "--vocab-size or lower --character-coverage")
    if "sentences_.empty()" in message:
        return "the input holds no text to train on; check --input and --json-keys"
    return "SentencePiece training failed: " + message.strip().splitlines()[-1]


def train_sentencepiece(
    inputs: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    json_keys: Sequence[str] = ("text",),
    byte_fallback: bool = False,
    split_digits: bool = False,
    user_defined_symbols: Sequence[str] = (),
    input_sentence_size: int = 0,
    character_coverage: float = 0.9995,
    normalization_rule_name: str = "nmt_nfkc",
    max_sentence_length: int = 16384,
    num_threads: int | None = None,
    verbose: bool = False,
) -> str:
    """Train and atomically write `{model_prefix}.model/.vocab`; returns the .model path.

    Raises ValueError with one line for user errors (missing input, bad vocabulary size, ...).
    """
    for path in inputs:
        if not os.path.isfile(path):
            raise ValueError(f"--input {path}: file not found; pass existing text or jsonl files")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type {model_type!r} is not supported; use bpe or unigram")
    if vocab_size < 2:
        raise ValueError(f"--vocab-size must be at least 2, got {vocab_size}")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".train_tokenizer.", dir=out_dir)
    try:
        tmp_prefix = os.path.join(tmp_dir, "model")
        skipped = [0]
        options = dict(
            sentence_iterator=iter_sentences(inputs, json_keys, skipped),
            model_prefix=tmp_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            split_digits=split_digits,
            character_coverage=character_coverage,
            normalization_rule_name=normalization_rule_name,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
        )
        if user_defined_symbols:
            options["user_defined_symbols"] = list(user_defined_symbols)
        if input_sentence_size > 0:
            options["input_sentence_size"] = input_sentence_size
            options["shuffle_input_sentence"] = True
        try:
            spm.SentencePieceTrainer.train(**options)
        except RuntimeError as exc:
            raise ValueError(_friendly_error(str(exc), vocab_size)) from None
        if skipped[0]:
            print(f"warning: skipped {skipped[0]} unreadable or malformed input lines",
                  file=sys.stderr)
        for ext in (".vocab", ".model"):  # the .model last: its presence means both are complete
            os.replace(tmp_prefix + ext, model_prefix + ext)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return model_prefix + ".model"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="text, .jsonl or .jsonl.gz files")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="jsonl fields holding text (default: text)")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--byte-fallback", action="store_true",
                        help="unknown characters become UTF-8 byte pieces instead of <unk>")
    parser.add_argument("--split-digits", action="store_true", help="every digit is its own piece")
    parser.add_argument("--user-defined-symbols", default="",
                        help="comma-separated pieces always kept whole, e.g. '<tab>,<br>'")
    parser.add_argument("--input-sentence-size", type=int, default=0,
                        help="train on a random sample of this many sentences (0: all)")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--normalization-rule-name", default="nmt_nfkc",
                        help="nmt_nfkc (default), nfkc, nmt_nfkc_cf, nfkc_cf or identity")
    parser.add_argument("--max-sentence-length", type=int, default=16384,
                        help="longer lines (in bytes) are skipped")
    parser.add_argument("--num-threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    args = parser.parse_args(argv)
    symbols = [s for s in args.user_defined_symbols.split(",") if s]
    try:
        path = train_sentencepiece(
            args.input, args.model_prefix, args.vocab_size, args.model_type, args.json_keys,
            args.byte_fallback, args.split_digits, symbols, args.input_sentence_size,
            args.character_coverage, args.normalization_rule_name, args.max_sentence_length,
            args.num_threads, args.verbose,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"wrote {path} and {args.model_prefix}.vocab", file=sys.stderr)


if __name__ == "__main__":
    main()
