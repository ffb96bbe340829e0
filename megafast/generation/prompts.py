"""Prompts for generation: plain text, token ids, or a chat conversation rendered for a reply.

A conversation (OpenAI's ``messages``: ``[{"role": ..., "content": ...}, ...]`` with roles
system / user / assistant / tool) is rendered the way fine-tuning rendered it
(megafast.data.chat_template), followed by the assistant's opening:

- role markers (the defaults, or ``--role-markers``): ``prefix + content + suffix`` per message,
  each assistant message ``prefix + content + EOS + suffix``, then the assistant prefix;
- the tokenizer's own ``chat_template``: ``apply_chat_template(messages, add_generation_prompt=True)``.

Tokenized piece by piece as fine-tuning did (an earlier answer's EOS is the token itself).
``content`` may also be OpenAI's list of parts (``[{"type": "text", "text": ...}]``).
"""

from __future__ import annotations

from typing import Any, Optional

from megafast.data.chat_template import ROLES, TEMPLATE_MODES, ChatTemplate, parse_role_markers
from megafast.data.sft_format import Conversation, Message
from megafast.data.tokenizer import Tokenizer


def message_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or the concatenated text of OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ValueError(f"{where}: content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts")


def normalise_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """Validated ``[{"role", "content"}]`` (content as text); ValueError naming the bad message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty list of {{\"role\": ..., \"content\": ...}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}[{i}] must be an object with \"role\" and \"content\"")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ROLES:
            raise ValueError(f"{where}[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
        out.append({"role": role, "content": message_text(m["content"], f"{where}[{i}]")})
    return out


class PromptBuilder:
    """Text, token ids or conversations -> prompt token ids, for one tokenizer (may be None)."""

    def __init__(
        self,
        tokenizer: Optional[Tokenizer],
        chat_template: str = "auto",
        role_markers: Optional[str] = None,
    ) -> None:
        if chat_template not in TEMPLATE_MODES:
            raise ValueError(f"--chat-template {chat_template!r}: choose one of {', '.join(TEMPLATE_MODES)}")
        self.tokenizer = tokenizer
        self.markers: Optional[dict[str, tuple[str, str]]] = None
        if tokenizer is None:
            return
        own = tokenizer.chat_template is not None
        if chat_template == "tokenizer" and (role_markers is not None or not own):
            raise ValueError("--chat-template tokenizer needs a tokenizer with a chat_template and no --role-markers")
        if chat_template == "default" or role_markers is not None or not own:
            self.markers = parse_role_markers(role_markers)

    def _need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer: pass --tokenizer-type/--tokenizer-model, or give token ids")
        return self.tokenizer

    def text(self, text: str) -> list[int]:
        ids = self._need_tokenizer("a text prompt").tokenize(text)
        if not ids:
            raise ValueError("the prompt tokenizes to nothing: give some text")
        return ids

    def chat(self, messages: Any) -> list[int]:
        """Prompt ids of a conversation followed by the assistant's opening (module docstring)."""
        tokenizer = self._need_tokenizer("a chat prompt")
        messages = normalise_messages(messages)
        if self.markers is None:
            return self.text(tokenizer.render_chat(messages, add_generation_prompt=True))
        template = ChatTemplate(tokenizer, self.markers)
        conversation = Conversation(tuple(Message(m["role"], m["content"]) for m in messages))
        pieces = template.pieces(conversation)
        opening = self.markers["assistant"][0]
        if pieces and pieces[-1][0] is not None and not pieces[-1][1]:
            pieces[-1] = (pieces[-1][0] + opening, False)
        else:
            pieces.append((opening, False))
        return [int(t) for t in template.encode_pieces([pieces])[0][0]]

    @staticmethod
    def token_ids(ids: Any, where: str = "prompt") -> list[int]:
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"{where} must be a non-empty list of integer token ids")
        return list(ids)


__all__ = ["PromptBuilder", "message_text", "normalise_messages"]
