"""Generate text from a megafast checkpoint, at any TP/PP, with a KV cache.

    torchrun --nproc-per-node 4 tools/generate.py --load CKPT --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --prompt "def main(" --max-new-tokens 32 --temperature 0
    python tools/generate.py --load CKPT --prompt-token-ids 1,2,3 --temperature 0.8 --top-p 0.9

Prints one JSON line on rank 0: ``{"token_ids": [...], "text": "...", "prompt_token_ids": [...]}``
where ``token_ids`` are the generated tokens (the prompt excluded) and ``text`` their decoding
(null without a tokenizer). The layout defaults to the checkpoint's; any other one works (each
rank reads and re-shards the weights of its own stage). The tokenizer is the one the
checkpoint's args name (converted checkpoints carry theirs), unless ``--tokenizer-*`` flags say
otherwise. Generation stops after ``--max-new-tokens`` or at an end-of-sequence token: the
tokenizer's EOD, or the HF ``eos_token_id`` of a converted checkpoint (``--ignore-eos`` disables).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megafast.checkpoint.args import HF_METADATA, tokenizer_from_args  # noqa: E402
from megafast.checkpoint.megatron_format import megatron_format, open_megatron_checkpoint  # noqa: E402
from megafast.checkpoint.reader import MegafastCheckpointReader  # noqa: E402
from megafast.config import ParallelConfig  # noqa: E402
from megafast.generation.generator import Generator, load_for_generation  # noqa: E402
from megafast.generation.sampling import SamplingConfig  # noqa: E402
from megafast.parallel.state import ParallelState  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="megafast checkpoint directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    prompt.add_argument("--prompt-token-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 (or 0) = off")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed")
    p.add_argument(
        "--eos-id",
        type=int,
        action="append",
        default=None,
        help="stop at this token (repeatable); default the tokenizer's EOD / HF eos_token_id",
    )
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
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
    return p


def _tokenizer(a: argparse.Namespace, reader: MegafastCheckpointReader):
    """The tokenizer of the flags, else of the checkpoint args; None when there is none."""
    if a.tokenizer_type is not None:
        args: dict[str, Any] = {
            "tokenizer_type": a.tokenizer_type,
            "tokenizer_model": a.tokenizer_model,
            "vocab_file": a.vocab_file,
            "merge_file": a.merge_file,
            "vocab_size": a.true_vocab_size,
        }
        return tokenizer_from_args(args)
    return tokenizer_from_args(reader.args, reader.root)


def _eos_ids(a: argparse.Namespace, tokenizer, reader: MegafastCheckpointReader) -> list[int]:
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


def main(argv: Optional[Sequence[str]] = None) -> None:
    a = build_parser().parse_args(argv)
    if a.bf16 and a.fp16:
        raise SystemExit("error: --bf16 and --fp16 are exclusive: choose one")
    try:
        sampling = SamplingConfig(a.temperature, a.top_k, a.top_p)
        if megatron_format(a.load):  # a Megatron-LM checkpoint (legacy or torch_dist), read as is
            reader = open_megatron_checkpoint(a.load, a.true_vocab_size)
        else:
            reader = MegafastCheckpointReader(a.load, a.true_vocab_size)
        tokenizer = None
        try:
            tokenizer = _tokenizer(a, reader)
        except ValueError as exc:
            if a.prompt is not None:
                raise
            print(f"warning: no tokenizer ({exc}); the output has no text", file=sys.stderr)
        if a.prompt is not None:
            if tokenizer is None:
                raise ValueError(
                    "--prompt needs a tokenizer: pass --tokenizer-type/--tokenizer-model "
                    "or give --prompt-token-ids"
                )
            prompt = tokenizer.tokenize(a.prompt)
        else:
            try:
                prompt = [int(t) for t in a.prompt_token_ids.split(",") if t.strip()]
            except ValueError:
                raise ValueError(
                    f"--prompt-token-ids {a.prompt_token_ids!r} is not comma-separated integers"
                ) from None
        parallel = ParallelConfig(
            a.tensor_model_parallel_size or reader.tp, a.pipeline_model_parallel_size or reader.pp
        )
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
        new = Generator(model, state).generate(
            prompt, a.max_new_tokens, sampling, eos_ids=_eos_ids(a, tokenizer, reader), seed=a.seed
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if state.rank == 0:
        text = tokenizer.detokenize(new) if tokenizer is not None else None
        print(json.dumps({"token_ids": new, "text": text, "prompt_token_ids": prompt}), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
