"""Packed sequences: several samples share one row of a batch and never attend to each other.

A packed row of length s holds samples back to back; ``segment_ids`` [b, s] numbers them
(0, 0, 0, 1, 1, 2, 2, 2, ... ; trailing padding is a segment of its own). Token t may attend to
token u only when u <= t and both lie in the same segment:

    allowed[b, t, u] = (u <= t) and (segment_ids[b, t] == segment_ids[b, u])

which is a block-diagonal causal mask. Positions restart at 0 in every segment (the data sets
``position_ids`` that way; RoPE and learned positions read them), so a packed row computes
exactly what each of its samples computes alone.

Two equivalent encodings are derived here, once per forward and shared by every layer:

- ``attention_mask()`` [b, 1, s, s] bool (True = may attend), for
  ``torch.nn.functional.scaled_dot_product_attention``;
- ``cu_seqlens`` int32 [n + 1] and ``max_seqlen`` over the flattened [b * s] tokens (every segment
  of every row is one sequence), for flash-attn's ``flash_attn_varlen_func`` (Megatron's "thd").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def segment_ids_from_lengths(lengths: list[list[int]], seq_length: int) -> torch.Tensor:
    """[b, s] segment ids of rows holding samples of the given lengths (the rest: one more segment)."""
    out = torch.empty(len(lengths), seq_length, dtype=torch.int64)
    for row, row_lengths in enumerate(lengths):
        if sum(row_lengths) > seq_length:
            raise ValueError(f"row {row}: samples of {sum(row_lengths)} tokens exceed the sequence length {seq_length}")
        start = 0
        for seg, n in enumerate(row_lengths):
            out[row, start:start + n] = seg
            start += n
        out[row, start:] = len(row_lengths)
    return out


@dataclass(eq=False)
class PackedSeqParams:
    """Segment layout of a packed batch (see the module docstring); built by the pipeline engine.

    ``segment_ids`` [b, s] int: tokens with equal ids in a row belong to one sample. The mask and
    the cumulative lengths are computed on first use and cached.
    """

    segment_ids: torch.Tensor
    _mask: torch.Tensor | None = field(default=None, init=False, repr=False)
    _cu: tuple[torch.Tensor, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.segment_ids.dim() != 2:
            raise ValueError(f"segment_ids must be [batch, seq], got shape {tuple(self.segment_ids.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        b, s = self.segment_ids.shape
        return b, s

    def attention_mask(self) -> torch.Tensor:
        """[b, 1, s, s] bool, True where query t may attend to key u (causal, same segment)."""
        if self._mask is None:
            ids = self.segment_ids
            s = ids.shape[1]
            same = ids[:, :, None] == ids[:, None, :]  # [b, s, s]
            causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
            self._mask = (same & causal)[:, None]  # [b, 1, s, s]
        return self._mask

    def _cumulative(self) -> tuple[torch.Tensor, int]:
        if self._cu is None:
            ids = self.segment_ids
            b, s = ids.shape
            starts = torch.ones(b, s, dtype=torch.bool, device=ids.device)  # a new sequence starts here
            starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
            begin = starts.flatten().nonzero().flatten()  # [n] offsets into the flattened b*s tokens
            end = torch.tensor([b * s], device=ids.device)
            cu = torch.cat([begin, end]).to(torch.int32)  # [n + 1]
            self._cu = (cu, int((cu[1:] - cu[:-1]).max()))
        return self._cu

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 [n + 1]: start offset of every segment in the flattened [b * s] tokens, then b * s."""
        return self._cumulative()[0]

    @property
    def max_seqlen(self) -> int:
        """Length of the longest segment."""
        return self._cumulative()[1]


__all__ = ["PackedSeqParams", "segment_ids_from_lengths"]
