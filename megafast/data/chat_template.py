"""Chat templates: a conversation -> token ids and a loss mask (1 on the answers and their EOS).

Two kinds of template:

- role markers (the default, or ``--role-markers``): each role has a prefix and a suffix, and a
  turn is ``prefix + content + suffix``, except that an answer is ``prefix + content + EOS +
  suffix`` where EOS is the tokenizer's end-of-document token. The default is ChatML-like::

      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n
      <|im_start|>assistant\\n{answer}<EOS>\\n

  ``--role-markers`` is JSON (or a path to a JSON file) mapping roles to ``[prefix, suffix]`` or
  ``{"prefix": ..., "suffix": ...}``; roles it leaves out keep the default markers.
- the tokenizer's own ``chat_template`` (a Hugging Face tokenizer directory that has one): the
  whole conversation is rendered by it, and each answer is located in the rendered text (after
  the rendered prompt with the generation prompt); the EOS text right after an answer is taken as
  the EOS token, else an EOS token is inserted there.

Texts are tokenized piece by piece (prompt text, answer, prompt text, ...; the EOS is the token
id itself), so the learned tokens are exactly ``tokenize(answer) + [EOS]`` for every answer. A
plain-text record is ``tokenize(text) + [EOS]``, all learned from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from megafast.data.sft_format import TEXT, BadRecord, Conversation
from megafast.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_ROLE_MARKERS: dict[str, tuple[str, str]] = {
    "system": ("<|im_start|>system\n", "<|im_end|>\n"),
    "user": ("<|im_start|>user\n", "<|im_end|>\n"),
    "assistant": ("<|im_start|>assistant\n", "\n"),  # the EOS token ends the answer
    "tool": ("<|im_start|>tool\n", "<|im_end|>\n"),  # an API's output (typed conver_has_api records)
}
TEMPLATE_MODES = ("auto", "default", "tokenizer")

# A piece of a conversation: text (None for the EOS token) and whether it is learned from.
Piece = tuple[str | None, bool]


def parse_role_markers(spec: str | dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    """Role markers from JSON text, a JSON file path or a dict, over the defaults (module doc)."""
    markers = dict(DEFAULT_ROLE_MARKERS)
    if spec is None:
        return markers
    if isinstance(spec, str):
        text = spec
        if not spec.lstrip().startswith("{") and os.path.isfile(spec):
            with open(spec, encoding="utf-8") as f:
                text = f.read()
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"--role-markers is not valid JSON ({exc}); give e.g. "
                             '\'{"user": ["<user>", "</user>"], "assistant": ["<bot>", ""]}\'') from None
    if not isinstance(spec, dict):
        raise ValueError("--role-markers must be a JSON object mapping roles to [prefix, suffix]")
    for role, value in spec.items():
        if role not in ROLES:
            raise ValueError(f"--role-markers: unknown role {role!r}; use {', '.join(ROLES)}")
        if isinstance(value, dict):
            value = [value.get("prefix", ""), value.get("suffix", "")]
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise ValueError(f"--role-markers: {role!r} must be [prefix, suffix] or {{\"prefix\", \"suffix\"}} strings")
        markers[role] = (value[0], value[1])
    return markers


class ChatTemplate:
    """Encodes conversations for one tokenizer (see the module docstring).

    Build with :meth:`build`; ``markers`` None means the tokenizer's own chat template.
    """

    def __init__(self, tokenizer: Tokenizer, markers: dict[str, tuple[str, str]] | None) -> None:
        self.tokenizer = tokenizer
        self.markers = markers
        self.eos = tokenizer.eod
        self.eos_text = tokenizer.detokenize([self.eos]) if markers is None else ""

    @classmethod
    def build(cls, tokenizer: Tokenizer, mode: str = "auto", role_markers: str | dict | None = None) -> ChatTemplate:
        """``mode`` auto: --role-markers if given, else the tokenizer's template if it has one, else
        the default markers; ``default``: markers; ``tokenizer``: the tokenizer's template."""
        if mode not in TEMPLATE_MODES:
            raise ValueError(f"--chat-template {mode!r}: choose one of {', '.join(TEMPLATE_MODES)}")
        if mode == "tokenizer":
            if role_markers is not None:
                raise ValueError("--role-markers and --chat-template tokenizer exclude each other: drop one")
            if tokenizer.chat_template is None:
                raise ValueError(f"--chat-template tokenizer: {tokenizer!r} has no chat_template; use "
                                 "--chat-template default (or --role-markers)")
            return cls(tokenizer, None)
        if mode == "auto" and role_markers is None and tokenizer.chat_template is not None:
            return cls(tokenizer, None)
        return cls(tokenizer, parse_role_markers(role_markers))

    @property
    def description(self) -> dict[str, Any]:
        """What was used (for the dataset's sidecar JSON)."""
        if self.markers is None:
            return {"kind": "tokenizer", "chat_template": self.tokenizer.chat_template}
        return {"kind": "role_markers", "role_markers": {r: list(v) for r, v in self.markers.items()}}

    # ---- conversation -> pieces ----

    def pieces(self, conversation: Conversation) -> list[Piece]:
        """Texts (None = EOS) with their learned flag; adjacent prompt texts are merged."""
        if conversation.is_text:
            return [(conversation.messages[0].content, True), (None, True)]
        raw = self._template_pieces(conversation) if self.markers is None else self._marker_pieces(conversation)
        merged: list[Piece] = []
        for text, learn in raw:
            if text == "":
                continue
            if merged and not learn and not merged[-1][1] and merged[-1][0] is not None:
                merged[-1] = (merged[-1][0] + text, False)
            else:
                merged.append((text, learn))
        return merged

    def _marker_pieces(self, conversation: Conversation) -> list[Piece]:
        assert self.markers is not None
        out: list[Piece] = []
        for m in conversation.messages:
            prefix, suffix = self.markers[m.role]
            if m.role == "assistant":
                out += [(prefix, False), (m.content, True), (None, True), (suffix, False)]
            else:
                out.append((prefix + m.content + suffix, False))
        return out

    def _template_pieces(self, conversation: Conversation) -> list[Piece]:
        dicts = [{"role": m.role, "content": m.content} for m in conversation.messages if m.role != TEXT]
        full = self.tokenizer.render_chat(dicts)
        out: list[Piece] = []
        pos = 0
        answer = 0
        for i, m in enumerate(conversation.messages):
            if m.role != "assistant":
                continue
            answer += 1
            prompt = self.tokenizer.render_chat(dicts[:i], add_generation_prompt=True)
            start = max(pos, len(prompt) if full.startswith(prompt) else pos)
            content = m.content
            at = full.find(content, start)
            if at < 0:  # templates that trim the answer
                content = m.content.strip()
                at = full.find(content, start)
            if at < 0:
                raise BadRecord(f"the tokenizer's chat template does not render answer {answer} verbatim")
            out += [(full[pos:at], False), (content, True), (None, True)]
            pos = at + len(content)
            if self.eos_text and full.startswith(self.eos_text, pos):
                pos += len(self.eos_text)
        out.append((full[pos:], False))
        return out

    # ---- pieces -> ids ----

    def encode_batch(self, conversations: Sequence[Conversation]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids int64, loss mask uint8) per conversation, one batched tokenizer call.

        Raises BadRecord for a conversation the tokenizer's template cannot render.
        """
        return self.encode_pieces([self.pieces(c) for c in conversations])

    def encode_pieces(self, all_pieces: Sequence[list[Piece]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`encode_batch` of conversations already split by :meth:`pieces`."""
        texts = [t for pieces in all_pieces for t, _ in pieces if t is not None]
        encoded = iter(self.tokenizer.tokenize_batch(texts) if texts else [])
        out = []
        for pieces in all_pieces:
            ids: list[int] = []
            mask: list[int] = []
            for text, learn in pieces:
                piece = [self.eos] if text is None else list(next(encoded))
                ids += piece
                mask += [int(learn)] * len(piece)
            out.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)))
        return out

    def encode(self, conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, loss mask) of one conversation."""
        return self.encode_batch([conversation])[0]


__all__ = ["DEFAULT_ROLE_MARKERS", "TEMPLATE_MODES", "ChatTemplate", "parse_role_markers"]
