"""The FastAPI application: OpenAI's ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``
(streamed as server-sent events or not) and ``/health``, over a BatchScheduler.

A request is checked completely before it is queued (JSON, fields, model name, prompt, the
context length), so what a client gets wrong is a 4xx answer with OpenAI's error shape and
never reaches the model. Streaming sends OpenAI's chunks (``data: {...}`` lines; the chat's first
chunk carries the role, the last of each choice its ``finish_reason``; a usage chunk when
``stream_options.include_usage``), then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Any, AsyncIterator, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from megafast.generation.generator import Generator, SequenceRequest, SequenceResult
from megafast.generation.prompts import PromptBuilder
from megafast.generation.sampling import SamplingConfig
from megafast.generation.stopping import TextTracker
from megafast.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseShape,
    usage,
    validation_error,
)
from megafast.serving.scheduler import BatchScheduler, Job

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class ServedModel:
    """What the application serves: one model under ``name``."""

    name: str
    prompts: PromptBuilder
    generator: Generator
    eos_ids: tuple[int, ...]
    scheduler: BatchScheduler

    @property
    def context_length(self) -> int:
        return self.generator.config.max_position_embeddings


def _sse(obj: Union[dict, str]) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class _Endpoints:
    def __init__(self, served: ServedModel) -> None:
        self.served = served

    async def parse(self, request: Request, chat: bool) -> Union[CompletionRequest, ChatCompletionRequest]:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise APIError(f"the request body is not valid JSON ({exc})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        try:
            req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if req.model != self.served.name:
            raise APIError(
                f"The model `{req.model}` does not exist; this server serves `{self.served.name}`",
                status=404, param="model", code="model_not_found",
            )
        bad = req.unsupported()
        if bad is not None:
            raise APIError(f"{bad}: not supported by this server", param=bad, code="unsupported_parameter")
        return req

    def prompt_ids(self, req: Union[CompletionRequest, ChatCompletionRequest]) -> list[list[int]]:
        prompts = self.served.prompts
        try:
            if isinstance(req, ChatCompletionRequest):
                return [prompts.chat(req.messages)]
            texts = req.prompts()
            if not texts:
                raise ValueError("prompt is empty")
            return [prompts.text(p) if isinstance(p, str) else prompts.token_ids(p) for p in texts]
        except ValueError as exc:
            param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
            raise APIError(str(exc), param=param) from None

    def sequences(self, req: Union[CompletionRequest, ChatCompletionRequest]) -> list[SequenceRequest]:
        """The validated sequences of a request (APIError for anything the client got wrong)."""
        ids = self.prompt_ids(req)
        chat = isinstance(req, ChatCompletionRequest)
        ctx = self.served.context_length
        longest = max(len(p) for p in ids)
        limit = req.token_limit if chat else req.max_tokens
        param = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
        if limit is None:
            limit = max(ctx - longest, 1) if chat else COMPLETION_DEFAULT_MAX_TOKENS
        if limit < 1:
            raise APIError(f"{param} must be at least 1, got {limit}", param=param, code="invalid_value")
        if longest + limit > ctx:
            where = "messages" if chat else "prompt"
            raise APIError(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{longest + limit} tokens ({longest} in the {where}, {limit} in the completion). "
                f"Please reduce the length of the {where} or completion.",
                param=param, code="context_length_exceeded",
            )
        try:
            sampling = SamplingConfig(
                1.0 if req.temperature is None else req.temperature,
                max(req.top_k or 0, 0),
                1.0 if req.top_p is None else req.top_p,
            )
        except ValueError as exc:
            raise APIError(str(exc).replace("--", "").replace("-", "_", 1), code="invalid_value") from None
        seed = req.seed if req.seed is not None else random.SystemRandom().randrange(2**31)
        out = [
            SequenceRequest(p, limit, sampling, seed + i, self.served.eos_ids, req.stop_list)
            for i, p in enumerate(ids)
        ]
        for s in out:
            try:
                self.served.generator.validate(s)
            except ValueError as exc:
                raise APIError(str(exc), param="messages" if chat else "prompt") from None
        if len(out) > self.served.scheduler.max_batch_size:
            raise APIError(
                f"at most {self.served.scheduler.max_batch_size} prompts per request, got {len(out)}",
                param="prompt",
            )
        return out

    async def complete(self, request: Request, chat: bool) -> Any:
        req = await self.parse(request, chat)
        sequences = self.sequences(req)
        shape = ResponseShape(chat, self.served.name)
        if req.stream:
            return StreamingResponse(self.stream(req, sequences, shape), media_type="text/event-stream")
        job = self.served.scheduler.submit(Job(sequences))
        results: list[SequenceResult] = await asyncio.wrap_future(job.future)
        choices = [
            shape.choice(i, r.text or "", r.finish_reason, r.token_ids if req.return_token_ids else None)
            for i, r in enumerate(results)
        ]
        prompt_tokens = sum(len(s.prompt) for s in sequences)
        return shape.response(choices, usage(prompt_tokens, sum(len(r.token_ids) for r in results)))

    async def stream(
        self, req: Union[CompletionRequest, ChatCompletionRequest], sequences: list[SequenceRequest],
        shape: ResponseShape,
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_step(i: int, tracker: TextTracker) -> None:  # on the scheduler's thread
            piece, finish = tracker.delta(), tracker.finish_reason
            if piece or finish:
                loop.call_soon_threadsafe(events.put_nowait, (i, piece, finish, len(tracker.token_ids)))

        job = Job(sequences, on_step)
        job.future.add_done_callback(
            lambda f: f.exception() is not None and loop.call_soon_threadsafe(events.put_nowait, None)
        )
        self.served.scheduler.submit(job)
        if shape.chat:
            for i in range(len(sequences)):
                yield _sse(shape.chunk(i, "", None, first=True))
        remaining, generated = len(sequences), 0
        while remaining:
            event = await events.get()
            if event is None:
                exc = job.future.exception()
                yield _sse(APIError(f"generation failed: {exc}", status=500, type="server_error").body())
                return
            i, piece, finish, count = event
            if piece:
                yield _sse(shape.chunk(i, piece, None))
            if finish:
                yield _sse(shape.chunk(i, None, finish))
                remaining -= 1
                generated += count
        if req.include_usage:
            yield _sse(shape.usage_chunk(usage(sum(len(s.prompt) for s in sequences), generated)))
        yield _sse("[DONE]")


def create_app(served: ServedModel) -> FastAPI:
    app = FastAPI(title="megafast", description="OpenAI-compatible server of a megafast checkpoint")
    app.state.served = served
    endpoints = _Endpoints(served)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(str(exc.detail), status=exc.status_code, type=kind)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(_: Request, exc: Exception) -> JSONResponse:
        err = APIError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = served.scheduler.stats
        return {"status": "ok", "model": served.name, "batches": stats.batches, "sequences": stats.sequences}

    def model_card() -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": 0, "owned_by": "megafast",
                "max_model_len": served.context_length}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != served.name:
            raise APIError(f"The model `{model_id}` does not exist", status=404, param="model",
                           code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await endpoints.complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await endpoints.complete(request, chat=True)

    return app


__all__ = ["ServedModel", "create_app"]
