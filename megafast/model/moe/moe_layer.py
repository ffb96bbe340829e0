"""The MoE MLP: router -> token dispatcher -> experts -> combine (+ shared experts).

    y = sum over the kept top-k experts e of token t: p[t, e] * expert_e(x_t)  (+ shared(x_t))

Input/output [s, b, h], or this rank's [s/p, b, h] with sequence parallelism. Expert tensor
parallelism is 1 (Megatron's default): the router, the experts and the shared experts are
replicated over the TP ranks, each of which computes them on the full hidden state. With
sequence parallelism the layer first gathers the sequence shards (backward: each rank keeps its
shard's gradient, which is complete there) and gives each rank its shard of the output back.
Without it, the hidden state is already replicated and no communication happens; either way
every TP rank computes the same expert gradients, so they need no TP reduction.

Expert parallelism (``state.ep_size`` EP > 1, EP ranks drawn from the data-parallel ranks): this
rank holds E / EP of the experts, and the token dispatcher (``moe_token_dispatcher_type``) moves
the routed tokens to the EP rank holding their expert and the outputs back, by all-to-all
(:mod:`~megafast.model.moe.alltoall_dispatcher`) or all-gather + reduce-scatter
(:mod:`~megafast.model.moe.allgather_dispatcher`). With TP the experts stay replicated over the
TP ranks (expert tensor parallelism 1): the EP group joins ranks of equal TP rank, each TP rank
runs the same dispatch on the same (sequence-gathered) tokens. The router and shared experts are
dense parameters. The load-balancing losses are computed, as in Megatron, from the tokens this
rank's router sees (the micro-batch's whole sequence, TP-gathered), before any dispatch, so they
do not depend on EP. With EP = 1 every expert is here
(:class:`~megafast.model.moe.token_dispatcher.LocalTokenDispatcher`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megafast.config import GPTConfig
from megafast.model.moe.allgather_dispatcher import AllGatherTokenDispatcher
from megafast.model.moe.alltoall_dispatcher import AllToAllTokenDispatcher
from megafast.model.moe.aux_loss import MoELossTracker
from megafast.model.moe.experts import Experts
from megafast.model.moe.router import TopKRouter
from megafast.model.moe.shared_experts import SharedExperts
from megafast.model.moe.token_dispatcher import LocalTokenDispatcher, TokenDispatcher
from megafast.parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megafast.parallel.state import ParallelState


def make_dispatcher(config: GPTConfig, state: ParallelState) -> TokenDispatcher:
    """The token dispatcher of ``config.moe_token_dispatcher_type`` over ``state.ep_group``."""
    if state.ep_size == 1:
        return LocalTokenDispatcher(config.num_experts, config.kernels)
    kind = AllToAllTokenDispatcher if config.moe_token_dispatcher_type == "alltoall" else AllGatherTokenDispatcher
    return kind(config.num_experts, state.ep_group, state.ep_rank, config.kernels)


class MoELayer(nn.Module):
    """Registered as a transformer layer's ``mlp``: keys ``mlp.router.weight``,
    ``mlp.experts.linear_fc{1,2}.weight`` [E, ...], ``mlp.shared_experts.*``."""

    def __init__(
        self,
        config: GPTConfig,
        state: ParallelState,
        layer_number: int,
        seed: int,
        tracker: Optional[MoELossTracker] = None,
        params_dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        super().__init__()
        self.tp_group = state.tp_group
        self.sequence_parallel = state.sequence_parallel and state.tp_size > 1
        factory = dict(params_dtype=params_dtype, device=device)
        self.router = TopKRouter(config, layer_number, seed, tracker, **factory)
        self.experts = Experts(config, layer_number, seed, **factory, ep_rank=state.ep_rank, ep_size=state.ep_size)
        self.shared_experts = (
            SharedExperts(config, layer_number, seed, **factory)
            if config.moe_shared_expert_intermediate_size
            else None
        )
        self.dispatcher: TokenDispatcher = make_dispatcher(config, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # [s/p, b, h] -> [s, b, h]; backward keeps this rank's rows
            x = gather_from_sequence_parallel_region(x, self.tp_group, tensor_parallel_output_grad=False)
        s, b, h = x.shape
        tokens = x.reshape(s * b, h)  # [T, h], sequence-major
        probs, indices = self.router(tokens, (s, b))  # [T, k] each
        expert_input, tokens_per_expert, handle = self.dispatcher.dispatch(tokens, probs, indices)
        out = self.dispatcher.combine(self.experts(expert_input, tokens_per_expert), handle)  # [T, h]
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        out = out.reshape(s, b, h)
        if self.sequence_parallel:
            out = scatter_to_sequence_parallel_region(out, self.tp_group)  # [s/p, b, h]
        return out
