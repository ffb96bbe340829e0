"""Generate text from a megafast checkpoint, at any TP/PP, with a KV cache: one prompt, or a
file of prompts in batches.

    torchrun --nproc-per-node 4 tools/generate.py --load CKPT --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --prompt "def main(" --max-new-tokens 32 --temperature 0
    python tools/generate.py --load CKPT --prompt-token-ids 1,2,3 --temperature 0.8 --top-p 0.9
    python tools/generate.py --load CKPT --prompt-file prompts.jsonl --output-file out.jsonl \
        --batch-size 8 --temperature 0 --stop "\n\n"

One prompt prints one JSON line on rank 0: ``{"token_ids": [...], "text": "...",
"prompt_token_ids": [...]}`` where ``token_ids`` are the generated tokens (the prompt excluded)
and ``text`` their decoding (null without a tokenizer).

``--prompt-file`` reads JSON Lines (``{"prompt": ...}`` or ``{"messages": [...]}`` with optional
per-line ``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``; see
megafast/generation/prompt_file.py) and writes one output line per input line, in order, to
``--output-file`` atomically (the file appears complete or not at all), generating
``--batch-size`` prompts at a time in one left-padded batch. ``messages`` are rendered with the
tokenizer's chat template, or role markers (``--chat-template``, ``--role-markers``).

The layout defaults to the checkpoint's; any other one works. The tokenizer is the checkpoint's
unless ``--tokenizer-*`` flags say otherwise. Generation stops after ``--max-new-tokens``, at an
end-of-sequence token (the tokenizer's EOD or the HF ``eos_token_id``; ``--ignore-eos``
disables), or at a ``--stop`` sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megafast.atomic_file import atomic_write  # noqa: E402
from megafast.generation.generator import SequenceRequest  # noqa: E402
from megafast.generation.launch import Loaded, add_chat_args, add_model_args, load  # noqa: E402
from megafast.generation.prompt_file import output_record, read_prompt_file  # noqa: E402
from megafast.generation.prompts import PromptBuilder  # noqa: E402
from megafast.generation.sampling import SamplingConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    prompt.add_argument("--prompt-token-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    prompt.add_argument("--prompt-file", help="JSON Lines of prompts (module docstring); needs --output-file")
    p.add_argument("--output-file", help="where --prompt-file's results go (JSON Lines)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (--prompt-file)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 (or 0) = off")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (line i of --prompt-file: seed + i)")
    p.add_argument("--stop", action="append", default=None, help="stop sequence (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--prompt-file)")
    add_model_args(p)
    add_chat_args(p)
    return p


def _single(a: argparse.Namespace, loaded: Loaded, defaults: SequenceRequest) -> None:
    tokenizer = loaded.tokenizer
    if a.prompt is not None:
        if tokenizer is None:
            raise ValueError(
                "--prompt needs a tokenizer: pass --tokenizer-type/--tokenizer-model or give --prompt-token-ids"
            )
        prompt = tokenizer.tokenize(a.prompt)
    else:
        try:
            prompt = [int(t) for t in a.prompt_token_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--prompt-token-ids {a.prompt_token_ids!r} is not comma-separated integers") from None
    result = loaded.generator.generate_batch([SequenceRequest(**{**defaults.__dict__, "prompt": prompt})])[0]
    if loaded.state.rank == 0:
        text = tokenizer.detokenize(result.token_ids) if tokenizer is not None else None
        print(json.dumps({"token_ids": result.token_ids, "text": text, "prompt_token_ids": prompt}), flush=True)


def _prompt_file(a: argparse.Namespace, loaded: Loaded, defaults: SequenceRequest) -> None:
    from tqdm import tqdm

    prompts = PromptBuilder(loaded.tokenizer, a.chat_template, a.role_markers)
    records = read_prompt_file(a.prompt_file, prompts, defaults)
    for i, (_, request) in enumerate(records):
        try:
            loaded.generator.validate(request)
        except ValueError as exc:
            raise ValueError(f"{a.prompt_file} record {i}: {exc}") from None
    rank0 = loaded.state.rank == 0
    bar = tqdm(total=len(records), unit="prompt", desc="generating", disable=a.no_progress or not rank0)
    lines = []
    for start in range(0, len(records), a.batch_size):
        chunk = records[start : start + a.batch_size]
        results = loaded.generator.generate_batch([r for _, r in chunk])
        for i, ((record_id, request), result) in enumerate(zip(chunk, results), start):
            lines.append(json.dumps(output_record(i, record_id, request, result)) + "\n")
        bar.update(len(chunk))
    bar.close()
    if rank0:
        atomic_write(a.output_file, lambda f: f.write("".join(lines).encode("utf-8")))
        print(f"wrote {len(lines)} results to {a.output_file}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> None:
    a = build_parser().parse_args(argv)
    try:
        if a.prompt_file is not None and not a.output_file:
            raise ValueError("--prompt-file needs --output-file (where the results go)")
        if a.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {a.batch_size}")
        sampling = SamplingConfig(a.temperature, a.top_k, a.top_p)
        loaded = load(a, need_tokenizer=a.prompt is not None)
        defaults = SequenceRequest(
            [], a.max_new_tokens, sampling, a.seed, tuple(loaded.eos_ids), tuple(a.stop or ())
        )
        if a.prompt_file is not None:
            _prompt_file(a, loaded, defaults)
        else:
            _single(a, loaded, defaults)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
