"""Serve a megafast checkpoint with an OpenAI-compatible HTTP API (needs ``pip install megafast[serve]``).

    python tools/serve.py --load CKPT --port 8000
    torchrun --nproc-per-node 4 tools/serve.py --load CKPT --port 8000 \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``:
server-sent events), ``GET /health``. The model's name is the checkpoint directory's name unless
``--served-model-name`` says otherwise. Concurrent requests are batched (static batching: requests
waiting when a batch starts, collected while they keep coming (``--batch-wait-ms``), at most ``--max-batch-size``
sequences; megafast/serving/scheduler.py). Under torchrun, rank 0 serves HTTP and broadcasts each
batch to the other ranks, which compute with it. Chat messages become prompts with the tokenizer's
chat template or role markers (``--chat-template``, ``--role-markers``), as in fine-tuning.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megafast.extras import require  # noqa: E402
from megafast.generation.launch import add_chat_args, add_model_args, load  # noqa: E402
from megafast.generation.prompts import PromptBuilder  # noqa: E402
from megafast.serving.engine import ServingEngine  # noqa: E402
from megafast.serving.scheduler import BatchScheduler  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="default: the --load directory's name")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences generated together at most")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="a batch collects requests until this long passes without a new one (4x at most)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level")
    add_model_args(p)
    add_chat_args(p)
    return p


def prepare(argv: Optional[Sequence[str]] = None):
    """(args, engine, app): the FastAPI app on rank 0 (None on the other ranks)."""
    a = build_parser().parse_args(argv)
    require("fastapi", "serve", "tools/serve.py")
    require("uvicorn", "serve", "tools/serve.py")
    from megafast.serving.app import ServedModel, create_app

    loaded = load(a, need_tokenizer=True)
    if loaded.tokenizer is None:
        raise ValueError("tools/serve.py needs a tokenizer: pass --tokenizer-type/--tokenizer-model")
    prompts = PromptBuilder(loaded.tokenizer, a.chat_template, a.role_markers)
    engine = ServingEngine(loaded.generator)
    if not engine.is_leader:
        return a, engine, None
    scheduler = BatchScheduler(engine, a.max_batch_size, a.batch_wait_ms / 1000.0)
    name = a.served_model_name or os.path.basename(os.path.normpath(a.load))
    served = ServedModel(name, prompts, loaded.generator, tuple(loaded.eos_ids), scheduler)
    return a, engine, create_app(served)


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        a, engine, app = prepare(argv)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if app is None:
        engine.follow()
    else:
        import uvicorn

        try:
            uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
        finally:
            app.state.served.scheduler.close()  # finishes the queued work, releases the other ranks
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
