"""Merge several indexed datasets (`.bin`/`.idx` pairs) into one, as Megatron-LM's tool does.

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \
        --output-prefix data/ab_text_document
    python tools/merge_datasets.py --input-dir data/shards --output-prefix data/all_text_document

Inputs are appended in the order given (`--input`) or sorted by name (`--input-dir`, like
Megatron's `--input`); sequences and documents keep their order, document indices are shifted.
The output is byte-identical to Megatron's merge. Every input is checked first (files present,
valid, one token dtype), and the output is written under temporary names and renamed only when
complete, so a failed merge leaves no output.
"""

from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

try:
    from megafast.data.indexed_dataset import (
        IndexedDataset,
        IndexedDatasetBuilder,
        bin_path_of,
        idx_path_of,
    )
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megafast.data.indexed_dataset import (
        IndexedDataset,
        IndexedDatasetBuilder,
        bin_path_of,
        idx_path_of,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PREFIX", help="dataset prefixes, merged in this order")
    source.add_argument(
        "--input-dir", metavar="DIR", help="merge every .bin/.idx pair in DIR, sorted by name"
    )
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and .idx")
    return parser.parse_args(argv)


def prefixes_in_dir(directory: str) -> list[str]:
    """Sorted prefixes of the `.bin`/`.idx` pairs in `directory`; a file without its pair is an error."""
    if not os.path.isdir(directory):
        raise ValueError(
            f"--input-dir {directory}: not a directory; pass the folder holding the .bin/.idx files"
        )
    names = sorted(os.listdir(directory))
    stems = {name[:-4] for name in names if name.endswith((".bin", ".idx"))}
    for stem in sorted(stems):
        for path in (bin_path_of(stem), idx_path_of(stem)):
            if path not in names:
                raise ValueError(
                    f"{os.path.join(directory, path)}: missing; every dataset in --input-dir needs "
                    "both its .bin and .idx (remove the stray file or regenerate the pair)"
                )
    if not stems:
        raise ValueError(f"--input-dir {directory}: no .bin/.idx pairs found; check the folder")
    return [os.path.join(directory, stem) for stem in sorted(stems)]


def merge(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    """Check every input, then append them in order into `output_prefix`; returns the result."""
    output_real = os.path.realpath(output_prefix)
    if any(os.path.realpath(p) == output_real for p in prefixes):
        raise ValueError(
            f"--output-prefix {output_prefix} is also an input; choose an output prefix that is not merged"
        )
    datasets = [IndexedDataset(p) for p in prefixes]  # validates each input up front
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) > 1:
        listing = ", ".join(f"{ds.path_prefix} ({ds.dtype.name})" for ds in datasets)
        raise ValueError(
            f"inputs have different token dtypes: {listing}; merge only datasets made with the same "
            "tokenizer (preprocess them again with the same --tokenizer-model)"
        )
    dtype = datasets[0].dtype
    total_bytes = sum(ds.num_tokens * dtype.itemsize for ds in datasets)
    del datasets

    directory = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(directory, exist_ok=True)
    with IndexedDatasetBuilder(bin_path_of(output_prefix), dtype=dtype) as builder:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="merge") as progress:
            for prefix in prefixes:
                builder.add_index(prefix)
                progress.update(os.path.getsize(bin_path_of(prefix)))
        builder.finalize(idx_path_of(output_prefix))
    return IndexedDataset(output_prefix)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        prefixes = args.input if args.input is not None else prefixes_in_dir(args.input_dir)
        merged = merge(prefixes, args.output_prefix)
    except ValueError as exc:
        sys.exit(f"merge_datasets.py: error: {exc}")
    print(
        f"merged {len(prefixes)} datasets into {args.output_prefix}.{{bin,idx}}: {len(merged)} sequences, "
        f"{merged.num_documents} documents, {merged.num_tokens} tokens ({merged.dtype.name})"
    )


if __name__ == "__main__":
    main()
