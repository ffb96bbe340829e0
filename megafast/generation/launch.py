"""The command-line part shared by tools/generate.py and tools/serve.py: flags naming a checkpoint,
its layout, tokenizer, dtype and device, and loading this rank's stage into a Generator.

The layout defaults to the checkpoint's; any other one works (each rank reads and re-shards the
weights of its own stage). The tokenizer is the one the checkpoint's args name (converted
checkpoints carry theirs), unless ``--tokenizer-*`` flags say otherwise. Generation stops at an
end-of-sequence token: the tokenizer's EOD, or the HF ``eos_token_id`` of a converted checkpoint
(``--eos-id`` replaces them, ``--ignore-eos`` disables).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megafast.checkpoint.args import HF_METADATA, tokenizer_from_args
from megafast.checkpoint.megatron_format import megatron_format, open_megatron_checkpoint
from megafast.checkpoint.reader import MegafastCheckpointReader
from megafast.config import ParallelConfig
from megafast.data.tokenizer import Tokenizer
from megafast.generation.generator import Generator, load_for_generation
from megafast.parallel.state import ParallelState


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", required=True, help="megafast checkpoint directory")
    p.add_argument(
        "--eos-id",
        type=int,
        action="append",
        default=None,
        help="stop at this token (repeatable); default the tokenizer's EOD / HF eos_token_id",
    )
    p.add_argument("--ignore-eos", action="store_true", help="always generate the maximum number of tokens")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument(
        "--tokenizer-type",
        default=None,
        choices=["SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer"],
    )
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument(
        "--true-vocab-size",
        type=int,
        default=None,
        help="the unpadded vocabulary, when the checkpoint's tokenizer is unavailable",
    )
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default cuda when available")
    p.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None)


def add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chat-template",
        choices=["auto", "default", "tokenizer"],
        default="auto",
        help="how messages become a prompt: auto = --role-markers if given, else the tokenizer's "
        "chat_template if it has one, else the default ChatML-like markers",
    )
    p.add_argument("--role-markers", default=None, help="JSON (or a JSON file): role -> [prefix, suffix]")


@dataclass
class Loaded:
    reader: MegafastCheckpointReader
    tokenizer: Optional[Tokenizer]
    state: ParallelState
    generator: Generator
    eos_ids: list[int]


def _tokenizer(a: argparse.Namespace, reader: MegafastCheckpointReader) -> Tokenizer:
    """The tokenizer of the flags, else of the checkpoint args (ValueError when there is none)."""
    if a.tokenizer_type is not None:
        args: dict[str, Any] = {
            "tokenizer_type": a.tokenizer_type,
            "tokenizer_model": a.tokenizer_model,
            "vocab_file": a.vocab_file,
            "merge_file": a.merge_file,
            "vocab_size": a.true_vocab_size,
            "null_tokenizer_eod_id": None,  # NullTokenizer: megatron-core 0.19's convention (EOD V-1)
        }
        return tokenizer_from_args(args)
    return tokenizer_from_args(reader.args, reader.root)


def _eos_ids(a: argparse.Namespace, tokenizer: Optional[Tokenizer], reader: MegafastCheckpointReader) -> list[int]:
    if a.ignore_eos:
        return []
    if a.eos_id:
        return a.eos_id
    if tokenizer is not None:
        try:
            return [tokenizer.eod]
        except ValueError:
            return []
    eos = (reader.args.get(HF_METADATA) or {}).get("eos_token_id")
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


def load(a: argparse.Namespace, *, need_tokenizer: bool) -> Loaded:
    """Tokenizer, process groups and this rank's stage; ValueError (one line) for a user error.

    Without a tokenizer the output has no text; ``need_tokenizer`` makes that an error."""
    if a.bf16 and a.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive: choose one")
    if megatron_format(a.load):  # a Megatron-LM checkpoint (legacy or torch_dist), read as is
        reader = open_megatron_checkpoint(a.load, a.true_vocab_size)
    else:
        reader = MegafastCheckpointReader(a.load, a.true_vocab_size)
    tokenizer = None
    try:
        tokenizer = _tokenizer(a, reader)
    except ValueError as exc:
        if need_tokenizer:
            raise
        print(f"warning: no tokenizer ({exc}); the output has no text", file=sys.stderr)
    parallel = ParallelConfig(a.tensor_model_parallel_size or reader.tp, a.pipeline_model_parallel_size or reader.pp)
    if "RANK" in os.environ:
        state = ParallelState.from_env(parallel, a.distributed_backend)
    elif parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size > 1:
        raise ValueError(
            f"TP={parallel.tensor_model_parallel_size} x PP={parallel.pipeline_model_parallel_size} "
            "needs several processes: launch with torchrun --nproc-per-node N, or pass sizes 1"
        )
    else:
        state = ParallelState.single()
    use_cuda = a.device == "cuda" or (a.device is None and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if a.bf16 else torch.float16 if a.fp16 else torch.float32
    model = load_for_generation(reader, state, params_dtype=dtype, device=device)
    detokenize = tokenizer.detokenize if tokenizer is not None else None
    generator = Generator(model, state, detokenize)
    return Loaded(reader, tokenizer, state, generator, _eos_ids(a, tokenizer, reader))


__all__ = ["Loaded", "add_chat_args", "add_model_args", "load"]
