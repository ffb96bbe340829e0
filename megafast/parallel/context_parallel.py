"""Context parallelism's sequence layout: which tokens of a sequence each CP rank holds.

Causal attention costs more for late tokens than for early ones, so a sequence of length s is cut
into 2C chunks of s / (2C) tokens and CP rank i holds chunks i and 2C - 1 - i, back to back
(Megatron's load balancing): every rank then does the same attention work. For C = 2 and chunks
0 1 2 3, rank 0 holds [0, 3] and rank 1 holds [1, 2].

Every per-token tensor of a micro-batch (tokens, labels, loss mask, positions, packed segment ids,
task ids) is sliced the same way along the sequence dimension; position ids carry the global
positions of the held tokens (or the per-sample positions of packed data), so RoPE and learned
positions see the same values as without CP. Attention across ranks is
megafast.parallel.ring_attention (p2p) or megafast.parallel.ulysses (a2a).
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch

T = TypeVar("T")


def chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two chunks (of 2C) that CP rank ``cp_rank`` holds, in the order it holds them."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def local_token_index(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """int64 [s / C]: the global sequence positions this CP rank holds, in its local order."""
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x context parallel size {cp_size}")
    c = seq_len // (2 * cp_size)
    first, second = chunk_ids(cp_size, cp_rank)
    return torch.cat([torch.arange(first * c, (first + 1) * c, device=device),
                      torch.arange(second * c, (second + 1) * c, device=device)])


def slice_sequence(t: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's tokens of ``t`` along ``dim`` (e.g. [b, s] -> [b, s / C])."""
    if cp_size == 1:
        return t
    index = local_token_index(t.shape[dim], cp_size, cp_rank, t.device)
    return t.index_select(dim, index)


def gather_order(seq_len: int, cp_size: int) -> torch.Tensor:
    """int64 [s]: ``natural[j] = gathered[gather_order[j]]`` where ``gathered`` concatenates the
    ranks' local sequences in CP-rank order (the result of an all-gather along the sequence)."""
    held = torch.cat([local_token_index(seq_len, cp_size, r) for r in range(cp_size)])  # [s] global ids
    return torch.argsort(held)


def slice_microbatch(mb: T, cp_size: int, cp_rank: int) -> T:
    """A micro-batch dataclass (tokens, labels, loss_mask, position_ids, segment_ids, task_ids;
    each [b, s] or None) with every per-token field cut to this CP rank's tokens; position ids
    default to the global positions 0..s-1 before the cut."""
    if cp_size == 1:
        return mb
    fields = {f.name: getattr(mb, f.name) for f in dataclasses.fields(mb)}
    if fields.get("position_ids") is None:
        b, s = fields["tokens"].shape
        fields["position_ids"] = torch.arange(s, device=fields["tokens"].device).expand(b, s)
    out = {k: (slice_sequence(v, cp_size, cp_rank) if isinstance(v, torch.Tensor) else v) for k, v in fields.items()}
    return type(mb)(**out)


def cp_positions_needed(local_seq_len: int, cp_size: int) -> int:
    """Number of RoPE table rows the positions of a rank's ``local_seq_len`` tokens may index."""
    return local_seq_len * cp_size


__all__ = ["chunk_ids", "gather_order", "local_token_index", "slice_microbatch", "slice_sequence",
           "cp_positions_needed"]

