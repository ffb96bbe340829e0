"""Prompt files for batch generation (``tools/generate.py --prompt-file``): JSON Lines in, JSON
Lines out, one output line per input line, in order.

Each input line is an object with one of

    "prompt": "text"  |  "prompt": [token ids]  |  "messages": [{"role": ..., "content": ...}, ...]

and optionally ``max_tokens`` (or ``max_new_tokens``), ``temperature``, ``top_k``, ``top_p``,
``seed`` and ``stop`` (a string or a list of them), which override the command line for that
line (the default seed of line i is ``--seed + i``, so lines draw independently and the same
in any batch). An ``id`` field is copied to the output. Each output line is

    {"index": i, "id": ..., "prompt_token_ids": [...], "token_ids": [...], "text": "...",
     "finish_reason": "stop" | "length"}

(``token_ids`` the generated ids, EOS / the stop sequence's last token included; ``text`` their
decoding without the EOS and without the stop sequence, null without a tokenizer.)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from megafast.generation.generator import SequenceRequest, SequenceResult
from megafast.generation.prompts import PromptBuilder
from megafast.generation.sampling import SamplingConfig



def stop_list(value: Any, where: str) -> tuple[str, ...]:
    """``stop`` as a tuple of strings (None: none)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise ValueError(f"{where}: stop must be a string or a list of strings")


def parse_record(
    record: Any,
    where: str,
    prompts: PromptBuilder,
    defaults: SequenceRequest,
) -> SequenceRequest:
    """One input line -> a request (``defaults`` give what the line leaves out); ValueError naming ``where``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        if ("prompt" in record) == ("messages" in record):
            raise ValueError("give exactly one of \"prompt\" (text or token ids) and \"messages\"")
        if "messages" in record:
            ids = prompts.chat(record["messages"])
        elif isinstance(record["prompt"], str):
            ids = prompts.text(record["prompt"])
        else:
            ids = PromptBuilder.token_ids(record["prompt"])
        new = record.get("max_tokens", record.get("max_new_tokens", defaults.max_new_tokens))
        base = defaults.sampling
        sampling = SamplingConfig(
            float(record.get("temperature", base.temperature)),
            int(record.get("top_k", base.top_k)),
            float(record.get("top_p", base.top_p)),
        )
        stop = stop_list(record["stop"], "stop") if "stop" in record else defaults.stop
        if not isinstance(new, int) or isinstance(new, bool):
            raise ValueError(f"max_tokens must be an integer, got {new!r}")
        seed = record.get("seed", defaults.seed)
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        return dataclasses.replace(defaults, prompt=ids, max_new_tokens=new, sampling=sampling, seed=seed, stop=stop)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def read_prompt_file(path: str, prompts: PromptBuilder, defaults: SequenceRequest) -> list[tuple[Any, SequenceRequest]]:
    """(id or None, request) per non-empty line; ValueError naming the file and line of a bad one."""
    out = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--prompt-file {path}: {exc.strerror}") from None
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc})") from None
            line_defaults = dataclasses.replace(defaults, seed=defaults.seed + len(out))
            request = parse_record(record, where, prompts, line_defaults)
            out.append((record.get("id"), request))
    if not out:
        raise ValueError(f"--prompt-file {path} has no records: one JSON object per line")
    return out


def output_record(index: int, record_id: Optional[Any], request: SequenceRequest, result: SequenceResult) -> dict:
    out: dict[str, Any] = {"index": index}
    if record_id is not None:
        out["id"] = record_id
    out.update(
        prompt_token_ids=request.prompt,
        token_ids=result.token_ids,
        text=result.text,
        finish_reason=result.finish_reason,
    )
    return out


__all__ = ["output_record", "parse_record", "read_prompt_file", "stop_list"]
