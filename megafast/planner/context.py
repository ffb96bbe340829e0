"""Context parallelism in the cost model: attention work and communication per rank, and the
longest sequence that fits a GPU under a layout.

Memory with CP is :mod:`~megafast.planner.memory` with ``Layout.cp`` (activations scale with the
``seq_length / cp`` tokens a rank holds). Here, for one layer and one micro-batch of b sequences
of s tokens on one rank (t = TP size, C = CP size, c = s / 2C tokens per chunk, e bytes per
activation element, H/G/d heads/groups/head dim):

- attention FLOPs (forward, QK^T and PV, causal): ``2 * 2 * b * s^2 / 2 * H/t * d / C`` — the
  load-balanced chunks give every rank exactly 1/C of the causal work (the local diagonal block
  is half-masked, the C - 1 others are 2c x c rectangles);
- ring (p2p) bytes sent per rank: forward ``(C - 1)`` K/V blocks of ``2 * b * G/t * 2c * d * e``;
  backward the same K/V again plus C fp32 dK/dV blocks (``2 * b * G/t * 2c * d * 4``: they
  accumulate in fp32 on their way around the ring);
- all-to-all (a2a) bytes sent per rank: (C - 1)/C of q, k, v and the output
  (``b * s/C * d * e * (2 H/t + 2 G')``, G' = G/t, or H/t when the groups do not split over C),
  the same again in backward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megafast.config import GPTConfig
from megafast.planner.layout import DTYPE_BYTES, Layout
from megafast.planner.memory import Device, peak_memory


@dataclass(frozen=True)
class ContextParallelCost:
    """One layer, one micro-batch, one rank."""

    attention_flops: float  # forward
    forward_bytes: int  # sent by this rank
    backward_bytes: int


def context_parallel_cost(config: GPTConfig, layout: Layout) -> ContextParallelCost:
    """Attention FLOPs and CP traffic of one layer and micro-batch on one rank (module docstring)."""
    c, t, cp = config, layout.tp, layout.cp
    b, s, e, d = layout.micro_batch_size, layout.seq_length, DTYPE_BYTES[layout.dtype], c.head_dim
    heads, groups = c.num_attention_heads // t, c.num_query_groups // t
    flops = 2.0 * 2.0 * b * s * s / 2.0 * heads * d / cp
    if cp == 1:
        return ContextParallelCost(flops, 0, 0)
    local = s // cp
    if layout.cp_comm_type == "p2p":
        kv = 2 * b * groups * local * d
        return ContextParallelCost(flops, (cp - 1) * kv * e, (cp - 1) * kv * e + cp * kv * 4)
    kv_heads = groups if groups % cp == 0 else heads
    moved = b * local * d * e * (2 * heads + 2 * kv_heads) * (cp - 1) // cp
    return ContextParallelCost(flops, moved, moved)


def sequence_multiple(layout: Layout) -> int:
    """Sequence lengths must be multiples of this: 2C chunks (x TP with sequence parallelism)."""
    tp = layout.tp if layout.sequence_parallel else 1
    return 2 * layout.cp * tp if layout.cp > 1 else tp


def longest_sequence(
    config: GPTConfig,
    layout: Layout,
    memory_bytes: float,
    device: Device = "cuda",
    limit: int = 1 << 24,
) -> Optional[int]:
    """The longest ``seq_length`` (a multiple of :func:`sequence_multiple`, at most ``limit``) whose
    peak memory on the most loaded GPU fits ``memory_bytes`` under ``layout`` (its other fields
    fixed); None when not even the shortest fits. Memory grows with the sequence, so a bisection
    over multiples finds it."""
    step = sequence_multiple(layout)

    def fits(n: int) -> bool:
        if config.position_embedding_type == "learned_absolute" and n * step > config.max_position_embeddings:
            return False
        return peak_memory(config, dataclasses.replace(layout, seq_length=n * step), device).total <= memory_bytes

    if not fits(1):
        return None
    lo, hi = 1, limit // step  # invariant: fits(lo); the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo * step


__all__ = ["ContextParallelCost", "context_parallel_cost", "longest_sequence", "sequence_multiple"]
