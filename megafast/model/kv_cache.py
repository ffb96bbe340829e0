"""Key/value cache for incremental decoding (Megatron's ``InferenceParams``).

Generation runs the prompt once (prefill, ``sequence_len_offset == 0``) and then one new token at
a time. Each attention layer of this pipeline stage stores the keys and values of every position
it has seen, so a decoding step costs one token's projections plus attention over the cache:

    cache_k[layer][:, :, offset : offset + s] = k_new          # [b, G/p, s, d]
    out = softmax(q_new K[:offset + s]^T / sqrt(d)) V[:offset + s]

with the causal rule "position offset + i sees positions <= offset + i". The caller moves the
offset forward (:meth:`InferenceParams.advance`) after every forward of all stages, and passes
the matching ``position_ids`` (offset .. offset + s - 1) so RoPE / learned positions agree.

Batches of prompts of different lengths are left-padded: row r's first ``padding[r]`` cache slots
hold padding, its tokens sit at slots ``padding[r]`` .. and its position ids are ``slot -
padding[r]``. With ``padding`` set, a query at slot i of row r sees the keys at slots
``padding[r] <= j <= i`` (a padding query sees only itself, so no row of the softmax is empty and
the cached values of padding stay finite; they get weight exactly 0 in every real row).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megafast.model.sliding_window import window_mask


class InferenceParams:
    """The KV cache of one model chunk: per layer, keys and values [b_max, G/p, max_len, d]."""

    def __init__(
        self, max_batch_size: int, max_sequence_length: int, padding: Optional[torch.Tensor] = None
    ) -> None:
        if max_batch_size < 1 or max_sequence_length < 1:
            raise ValueError(
                f"KV cache needs a positive batch and length, got {max_batch_size} x {max_sequence_length}"
            )
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.sequence_len_offset = 0
        self.key_value_memory_dict: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if padding is not None and padding.shape != (max_batch_size,):
            raise ValueError(f"padding must hold one length per row [{max_batch_size}], got {tuple(padding.shape)}")
        self.padding = padding  # [b] left-padding slots per row, or None (no padding)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (int64 [b']), in that order: finished sequences leave."""
        self.key_value_memory_dict = {
            layer: (k.index_select(0, rows), v.index_select(0, rows))
            for layer, (k, v) in self.key_value_memory_dict.items()
        }
        self.max_batch_size = int(rows.numel())
        if self.padding is not None:
            self.padding = self.padding.index_select(0, rows.to(self.padding.device))

    def advance(self, num_tokens: int) -> None:
        """The forward of ``num_tokens`` positions has run on every layer: move past them."""
        self.sequence_len_offset += num_tokens

    def reset(self) -> None:
        """Forget every position (the allocated memory is kept for the next sequence)."""
        self.sequence_len_offset = 0

    def _memory(self, layer_number: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value buffers [b_max, G/p, max_len, d] of one layer, allocated on first use."""
        memory = self.key_value_memory_dict.get(layer_number)
        if memory is None:
            _, groups, _, d = like.shape
            shape = (self.max_batch_size, groups, self.max_sequence_length, d)
            memory = (like.new_zeros(shape), like.new_zeros(shape))
            self.key_value_memory_dict[layer_number] = memory
        return memory

    def attend(
        self,
        layer_number: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: Optional[tuple[int, int]] = None,
    ) -> torch.Tensor:
        """Store this step's k/v and attend over everything cached (within the sliding ``window``
        (left, 0) when given: position i sees i - left .. i, megafast.model.sliding_window).

        q [b, H/p, s, d]; k, v [b, G/p, s, d] for positions offset .. offset + s - 1
        -> [b, H/p, s, d].
        """
        b, groups, s, _ = k.shape
        start, end = self.sequence_len_offset, self.sequence_len_offset + s
        if end > self.max_sequence_length:
            raise ValueError(
                f"KV cache holds {self.max_sequence_length} positions, decoding reached {end}: "
                "allocate a longer cache (prompt + new tokens)"
            )
        if b > self.max_batch_size:
            raise ValueError(f"KV cache was allocated for batch {self.max_batch_size}, got {b}")
        cache_k, cache_v = self._memory(layer_number, k)
        cache_k[:b, :, start:end] = k
        cache_v[:b, :, start:end] = v
        keys, values = cache_k[:b, :, :end], cache_v[:b, :, :end]  # [b, G/p, end, d]
        heads = q.shape[1]
        if heads != groups:  # each group's k/v serves its H/G consecutive query heads
            keys = keys.repeat_interleave(heads // groups, dim=1)
            values = values.repeat_interleave(heads // groups, dim=1)
        mask: Optional[torch.Tensor] = None
        if self.padding is not None:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=self._padded_mask(b, start, end, window))
        if window is not None and end - 1 - window[0] > 0:  # the window hides the oldest positions
            positions = torch.arange(end, device=q.device)
            mask = window_mask(positions[start:end], positions, window)  # [s, end]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        if s > 1 and start > 0:  # several new tokens after a prefix: causal, shifted by the offset
            mask = (
                torch.arange(end, device=q.device)[None, :]
                <= torch.arange(start, end, device=q.device)[:, None]
            )
        # s == 1: the newest token sees every cached position; start == 0: plain causal prefill
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=s > 1 and start == 0)

    def _padded_mask(self, b: int, start: int, end: int, window: Optional[tuple[int, int]]) -> torch.Tensor:
        """[b, 1, s, end] bool: slot j visible from slot i of row r (module docstring)."""
        assert self.padding is not None
        device = self.padding.device
        keys = torch.arange(end, device=device)
        queries = keys[start:end]
        visible = window_mask(queries, keys, window) if window is not None else keys[None, :] <= queries[:, None]
        real = keys[None, :] >= self.padding[:b, None]  # [b, end]
        mask = visible[None] & real[:, None, :]  # [b, s, end]
        mask |= (keys[None, :] == queries[:, None])[None]  # padding queries see themselves
        return mask[:, None]
