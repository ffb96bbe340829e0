"""All-to-all context parallelism (``--cp-comm-type a2a``, DeepSpeed-Ulysses): before attention an
all-to-all over the CP group trades heads for sequence, so each rank holds H/C heads of the WHOLE
sequence; ordinary attention runs on them; a second all-to-all trades back.

    q [b, H, s/C, d] (this rank's load-balanced tokens, megafast.parallel.context_parallel)
      -> all-to-all: head slice j to CP rank j, every rank's tokens from it
      -> [b, H/C, s, d] in CP-rank order, reordered to natural order (the causal mask needs it)
      -> attention -> the reverse.

The all-to-all is its own inverse's adjoint: the backward of "heads -> sequence" is
"sequence -> heads" on the gradient. Needs H/C whole heads per rank; when the query groups G do
not split over C, K/V are first replicated to one head per query head (repeat_interleave), which
every backend handles like plain multi-head attention.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from megafast.parallel.context_parallel import gather_order


def _to_sequence(x: torch.Tensor, group, cp: int, order: torch.Tensor) -> torch.Tensor:
    """[b, H, s/C, d] -> [b, H/C, s, d] (natural order)."""
    b, h, sl, d = x.shape
    send = x.reshape(b, cp, h // cp, sl, d).transpose(0, 1).contiguous()  # [C, b, H/C, s/C, d]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's tokens of my head slice
    gathered = recv.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * sl, d)  # [b, H/C, s, d] rank order
    return gathered.index_select(2, order)


def _to_heads(x: torch.Tensor, group, cp: int, order: torch.Tensor) -> torch.Tensor:
    """[b, H/C, s, d] (natural order) -> [b, H, s/C, d]."""
    b, hc, s, d = x.shape
    gathered = torch.empty_like(x).index_copy_(2, order, x)  # back to CP-rank order
    send = gathered.reshape(b, hc, cp, s // cp, d).permute(2, 0, 1, 3, 4).contiguous()  # [C, b, H/C, s/C, d]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: my tokens of head slice j
    return recv.transpose(0, 1).reshape(b, hc * cp, s // cp, d)


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, cp, order):
        ctx.args = (group, cp, order)
        return _to_sequence(x, group, cp, order)

    @staticmethod
    def backward(ctx, g):
        return _to_heads(g.contiguous(), *ctx.args), None, None, None


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, cp, order):
        ctx.args = (group, cp, order)
        return _to_heads(x, group, cp, order)

    @staticmethod
    def backward(ctx, g):
        return _to_sequence(g.contiguous(), *ctx.args), None, None, None


def gather_sequence(t: torch.Tensor, group, cp: int) -> torch.Tensor:
    """A per-token tensor [b, s/C] of every CP rank -> [b, s] in natural order (no gradient)."""
    parts = [torch.empty_like(t) for _ in range(cp)]
    dist.all_gather(parts, t.contiguous(), group=group)
    gathered = torch.cat(parts, dim=1)
    return gathered.index_select(1, gather_order(gathered.shape[1], cp).to(t.device))


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Optional[dist.ProcessGroup],
    cp: int,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """q [b, H, s/C, d], k/v [b, G, s/C, d] -> [b, H, s/C, d]; ``attend(q, k, v)`` is causal
    attention on [b, H/C, s, d] queries (packed callers close over the gathered segment ids)."""
    heads, groups = q.shape[1], k.shape[1]
    if heads % cp:
        raise ValueError(f"--cp-comm-type a2a needs the {heads} attention heads per rank divisible by {cp}")
    if groups % cp:  # replicate K/V to one per query head so that whole groups land on each rank
        k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
    order = gather_order(q.shape[2] * cp, cp).to(q.device)
    q, k, v = (_HeadsToSequence.apply(t, group, cp, order) for t in (q, k, v))
    return _SequenceToHeads.apply(attend(q, k, v), group, cp, order)


__all__ = ["gather_sequence", "ulysses_attention"]
