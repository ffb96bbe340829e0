"""Which layers of a model chunk run under activation recompute (Megatron's full-recompute methods).

For the L layers of one model chunk, ``recompute_plan`` returns consecutive groups
``(start, end, checkpointed)`` covering 0..L-1 (indices within the chunk):

- ``uniform``, N layers: groups [0, N), [N, 2N), ... (the last may be shorter), each checkpointed
  as one unit: only the group's input is kept, and backward recomputes the N layers together.
- ``block``, N layers: the first min(N, L) layers checkpointed one by one, the rest run normally
  (their activations kept): less recompute work at the price of memory.

Selective recompute (the attention core only) and no recompute give one plain group.
"""

from __future__ import annotations

from megafast.config import GPTConfig


def recompute_plan(config: GPTConfig, num_layers: int) -> list[tuple[int, int, bool]]:
    """Groups ``(start, end, checkpointed)`` of a chunk's ``num_layers`` layers (see the module doc)."""
    if config.recompute_granularity != "full":
        return [(0, num_layers, False)]
    n = config.recompute_num_layers or 1
    if (config.recompute_method or "uniform") == "uniform":
        return [(i, min(i + n, num_layers), True) for i in range(0, num_layers, n)]
    blocked = min(n, num_layers)
    plain = [(blocked, num_layers, False)] if blocked < num_layers else []
    return [(i, i + 1, True) for i in range(blocked)] + plain


def recomputed_layers(config: GPTConfig, num_layers: int) -> int:
    """Layers of the chunk whose forward runs twice."""
    return sum(end - start for start, end, checkpointed in recompute_plan(config, num_layers) if checkpointed)
