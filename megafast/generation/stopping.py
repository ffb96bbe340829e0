"""When one generated sequence stops, and its text so far (stop sequences, streamed deltas).

A sequence stops at the first of: one of its EOS ids (finish reason ``stop``; the id stays in
the token ids, not in the text), a stop sequence appearing in its decoded text (``stop``; the text
ends just before the earliest occurrence, the token ids end with the token that completed it), or
``max_new_tokens`` tokens (``length``). These are OpenAI's ``finish_reason`` values.

Streaming: :meth:`TextTracker.delta` gives the text not yet emitted, holding back a tail that could
still become a stop sequence (the longest suffix of the text that is a prefix of one) or an
unfinished multi-byte character (a trailing U+FFFD), so the streamed pieces concatenate to exactly
the final text.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

Detokenize = Callable[[Sequence[int]], str]
REPLACEMENT = "\ufffd"


class TextTracker:
    """Token ids -> text of one sequence, watching for its stop sequences and EOS ids."""

    def __init__(
        self,
        detokenize: Optional[Detokenize],
        stop: Sequence[str] = (),
        eos_ids: Sequence[int] = (),
    ) -> None:
        if stop and detokenize is None:
            raise ValueError("stop sequences need a tokenizer to decode the text: pass --tokenizer-* flags")
        self.detokenize = detokenize
        self.stop = tuple(s for s in stop if s)
        self.eos_ids = frozenset(eos_ids)
        self.token_ids: list[int] = []
        self.text = ""  # the decoded text, cut before a stop sequence once one appeared
        self.finish_reason: Optional[str] = None
        self._emitted = 0  # characters of ``text`` already handed out by delta()

    def add(self, token: int) -> Optional[str]:
        """Append one generated token; the finish reason (``stop``) when it ends the sequence."""
        self.token_ids.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self.finish_reason
        if self.detokenize is None:
            return None
        text = self.detokenize([t for t in self.token_ids if t not in self.eos_ids])
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            self.finish_reason = "stop"
        else:
            self.text = text
        return self.finish_reason

    def finish(self, reason: str) -> None:
        """End the sequence for another reason (``length``) unless it already ended."""
        if self.finish_reason is None:
            self.finish_reason = reason

    def delta(self) -> str:
        """The text not yet emitted that can no longer change (all of it once finished)."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= self._held_back()
        if end <= self._emitted:
            return ""
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def _held_back(self) -> int:
        """Characters at the end of the text that a later token may still change or cut."""
        text = self.text
        hold = len(text) - len(text.rstrip(REPLACEMENT))
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold


__all__ = ["TextTracker"]
