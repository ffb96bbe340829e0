"""Point-to-point transfer of activations and gradients between adjacent pipeline stages.

One schedule step's communication actions are issued together with ``batch_isend_irecv`` and
waited on together (works on gloo and nccl). Tensors travel over the pipeline group; peers are
named by their pipeline rank and mapped to global ranks through ``ParallelState.pp_ranks``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from megafast.parallel.state import ParallelState
from megafast.pipeline.schedules import Action, peer_rank


def exchange(
    ops: Sequence[Action],
    state: ParallelState,
    outgoing: Callable[[Action], torch.Tensor],
    make_buffer: Callable[[Action], torch.Tensor],
) -> dict[Action, torch.Tensor]:
    """Run one step's sends and receives; return the received tensors keyed by their action.

    ``outgoing(op)`` gives the tensor a send op ships; ``make_buffer(op)`` an empty tensor of the
    right shape and dtype for a receive.
    """
    p2p_ops, received = [], {}
    for op in ops:
        peer = state.pp_ranks[peer_rank(op, state.pp_size, state.pp_rank)]
        if op.is_send:
            p2p_ops.append(dist.P2POp(dist.isend, outgoing(op).contiguous(), peer, state.pp_group))
        else:
            buf = make_buffer(op)
            received[op] = buf
            p2p_ops.append(dist.P2POp(dist.irecv, buf, peer, state.pp_group))
    if p2p_ops:
        for request in dist.batch_isend_irecv(p2p_ops):
            request.wait()
    return received

