"""OpenAI's API shapes: requests (validated with pydantic), responses, stream chunks and errors.

Requests accept OpenAI's fields; ``top_k`` (0 or -1 = off) and ``return_token_ids`` (add each
choice's generated ``token_ids``, as vLLM does) are extensions. Fields this server cannot honour
with a non-default value (``n`` > 1, ``best_of`` > 1, ``echo``, ``logprobs``, ``suffix``, tools,
a non-text ``response_format``) are refused with a 400 error naming the field; other unknown
fields are ignored, as OpenAI-compatible servers do.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx
status for what the client got wrong.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(exc: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field."""
    first = exc.errors()[0]
    loc = first["loc"]
    param = str(loc[0]) if loc else None
    where = ".".join(str(p) for p in loc)
    return APIError(f"{where}: {first['msg']}" if where else first["msg"], param=param, code="invalid_value")


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=-1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None
    n: Optional[int] = 1
    return_token_ids: Optional[bool] = False

    def unsupported(self) -> Optional[str]:
        """The first field set to something this server cannot do."""
        if self.n not in (None, 1):
            return "n"
        return None

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> Optional[str]:
        if self.echo:
            return "echo"
        if self.logprobs is not None:
            return "logprobs"
        if self.best_of not in (None, 1):
            return "best_of"
        if self.suffix:
            return "suffix"
        return super().unsupported()

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts, one per choice (text, or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatCompletionRequest(_Common):
    messages: list[dict[str, Any]]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None

    def unsupported(self) -> Optional[str]:
        if self.logprobs:
            return "logprobs"
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format"
        return super().unsupported()

    @property
    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseShape:
    """Builds the response objects of one request (shared id, creation time and model)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, choices: list[dict[str, Any]], usage_: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": usage_}

    def choice(self, index: int, text: str, finish_reason: str, token_ids: Optional[list[int]]) -> dict[str, Any]:
        out: dict[str, Any] = {"index": index}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["text"] = text
        out.update(logprobs=None, finish_reason=finish_reason)
        if token_ids is not None:
            out["token_ids"] = token_ids
        return out

    def chunk(self, index: int, text: Optional[str], finish_reason: Optional[str], first: bool = False) -> dict:
        """One server-sent event's object: a text piece of choice ``index`` (or its end)."""
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage_: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage_}


__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "ResponseShape",
    "usage",
    "validation_error",
]
