"""Tokenize a corpus into Megatron indexed datasets (`{output_prefix}_{key}_document.{bin,idx}`).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model sp.model \\
        --json-keys text --append-eod --workers 8

Inputs: .jsonl, .jsonl.gz, .txt (documents separated by blank lines), .parquet (string
columns, or integer-list columns of token ids written as-is) and directories of parquet files
(Spark's `part-*.parquet` layout, nested folders included, read in sorted path order). The logic lives in
`megafast.data.preprocess`; this is its command line, with Megatron's flag names.

Fine-tuning data (`--dataset-type sft`): conversation, instruction or text JSONL records become
token ids plus a loss mask (1 on the answers and their EOS) and task ids, `{prefix}_{key}_document`,
`{prefix}_{key}_loss_mask_document`, `{prefix}_{key}_task_ids_document` and `{prefix}_{key}_sft.json`
(see `megafast.data.sft_format`), with an explicit truncation policy:

    python tools/preprocess_data.py --dataset-type sft --input chat.jsonl --output-prefix data/chat \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ --max-seq-length 4096 \
        --truncation drop --workers 4
Exit status 1 with one `error:` line for user errors (missing file, unknown tokenizer, a bad line
with --strict); nothing that looks like a finished dataset is left behind on failure.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megafast.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megafast.data.sft_preprocess import SFTPreprocessConfig, preprocess_sft  # noqa: E402
from megafast.data.tokenizer import TOKENIZER_TYPES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, nargs="+",
                       help=".jsonl, .jsonl.gz, .txt or .parquet file, or a directory of parquet files; with --dataset-type sft also JSON array "
                            "files and task directories of JSONL files, several at once (megafast.data.sft_inputs)")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="fields (parquet: columns) to tokenize, one dataset each (default text)")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES +
                       ("GPTSentencePieceTokenizer", "Llama2Tokenizer"))
    group.add_argument("--tokenizer-model", help="SentencePiece .model, or a HF tokenizer "
                       "directory / tokenizer.json")
    group.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json")
    group.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")
    group.add_argument("--vocab-size", type=int, help="NullTokenizer: vocabulary V, ids 0..V-1, EOD is V-1 (megatron-core 0.19)")
    group.add_argument("--append-eod", action="store_true",
                       help="end every non-empty document with the tokenizer's EOD")
    group = parser.add_argument_group("fine-tuning data (--dataset-type sft)")
    group.add_argument("--dataset-type", choices=["gpt", "sft"], default="gpt",
                       help="gpt: documents for pretraining (default); sft: chat/instruction records "
                            "with loss masks and task ids")
    group.add_argument("--max-seq-length", type=int, default=None,
                       help="sft: longest record in tokens; longer ones follow --truncation")
    group.add_argument("--truncation", choices=["truncate", "drop"], default="truncate",
                       help="sft: keep the first --max-seq-length tokens of a longer record, or drop it "
                            "(both counted in the report)")
    group.add_argument("--chat-template", choices=["auto", "default", "tokenizer"], default="auto",
                       help="sft: auto = --role-markers if given, else the HF tokenizer's chat_template "
                            "if it has one, else the default ChatML-like markers")
    group.add_argument("--role-markers", default=None,
                       help='sft: JSON (or a .json file) such as \'{"user": ["<u>", "</u>"], '
                            '"assistant": ["<a>", ""]}\' (the EOS follows every answer)')
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes PREFIX_{key}_document.bin/.idx")
    group.add_argument("--dataset-impl", default="mmap",
                       help="Megatron's flag: mmap (the .bin/.idx format) is the only one, and the default")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    group.add_argument("--partitions", type=int, default=1,
                       help="accepted for compatibility: the input is streamed with bounded "
                            "memory, so it is never split; output keeps the input order")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="documents between progress lines when stderr is not a terminal")
    group.add_argument("--strict", action="store_true",
                       help="stop at the first bad input line instead of skipping it")
    group.add_argument("--no-word-cache", action="store_true",
                       help="encode whole documents with the tokenizer (no per-word cache)")
    group.add_argument("--no-progress-bar", action="store_true", help="log lines instead of a bar")
    return parser.parse_args(argv)


def main_sft(args: argparse.Namespace) -> None:
    """--dataset-type sft: JSONL / JSON array files and task directories, one output key."""
    if len(args.json_keys) != 1:
        raise SystemExit(f"error: --dataset-type sft writes one dataset: give one --json-keys name, "
                         f"got {args.json_keys}")
    try:
        config = SFTPreprocessConfig(
            input=args.input[0] if len(args.input) == 1 else args.input, output_prefix=args.output_prefix,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file, merge_file=args.merge_file,
            vocab_size=args.vocab_size, json_key=args.json_keys[0], max_seq_length=args.max_seq_length,
            truncation=args.truncation, chat_template=args.chat_template, role_markers=args.role_markers,
            workers=args.workers, strict=args.strict, log_interval=args.log_interval,
        )
        stats = preprocess_sft(config)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: temporary output files were removed") from None
    for line in stats.report():
        print(line, file=sys.stderr)
    for prefix in stats.outputs:
        print(f"wrote {prefix}" + ("" if prefix.endswith(".json") else ".bin and .idx"), file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dataset_impl != "mmap":
        raise SystemExit(f"error: --dataset-impl {args.dataset_impl}: only mmap (the .bin/.idx format Megatron "
                         "reads) is written; drop the flag or pass --dataset-impl mmap")
    if args.dataset_type == "sft":
        main_sft(args)
        return
    if len(args.input) != 1:
        raise SystemExit(f"error: --input takes one file (or directory) for pretraining data, got {len(args.input)}: "
                         "merge the outputs with tools/merge_datasets.py or blend them with --data-path")
    args.input = args.input[0]
    if args.partitions > 1:
        print(f"note: --partitions {args.partitions} is not needed (the input is streamed); "
              "writing one dataset per key in input order", file=sys.stderr)
    try:
        config = PreprocessConfig(
            input=args.input, output_prefix=args.output_prefix,
            tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
            vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size,
            json_keys=args.json_keys, append_eod=args.append_eod, workers=args.workers,
            log_interval=args.log_interval, strict=args.strict,
            word_cache=not args.no_word_cache,
            progress=False if args.no_progress_bar else None,
        )
        stats = preprocess(config)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: temporary output files were removed") from None
    mb = stats.input_bytes / 1e6
    rate = f"{stats.documents / stats.seconds:,.0f} docs/s, {mb / stats.seconds:.2f} MB/s"
    print(f"{stats.documents} documents, {mb:.1f} MB in {stats.seconds:.1f} s ({rate})",
          file=sys.stderr)
    for prefix in stats.outputs:
        print(f"wrote {prefix}.bin and {prefix}.idx", file=sys.stderr)


if __name__ == "__main__":
    main()
