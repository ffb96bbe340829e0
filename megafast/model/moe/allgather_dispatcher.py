"""All-gather token dispatcher over the expert-parallel group (Megatron's ``allgather``).

E experts over EP ranks, ``E_l = E / EP`` on each (rank r holds experts ``r E_l ... (r+1) E_l - 1``).
Per forward pass, on each rank of the group (every rank routes the same number T of tokens):

1. all-gather the tokens [T, h], routing weights [T, k] and expert ids [T, k] of the EP group:
   [EP T, ...] in rank order;
2. keep the choices of this rank's experts (ids shifted to 0 ... E_l - 1; other ranks' choices
   become -1, i.e. not routed here) and permute the gathered tokens by local expert
   (``moe_permute``);
3. after the experts, ``moe_unpermute`` weighted by the gathered weights gives every gathered
   token the sum over its choices of *this rank's* experts, [EP T, h];
4. reduce-scatter over the group: token t of rank s gets the sum over all ranks, i.e. over all
   its chosen experts, [T, h].

Autograd: the all-gathers' backward is a reduce-scatter (each rank holds a partial gradient of
every gathered token and weight: that of its own experts) and the reduce-scatter's backward an
all-gather (:mod:`megafast.parallel.mappings`). No host synchronisation.
"""

from __future__ import annotations

import torch

from megafast.kernels import dispatch as kernel_dispatch
from megafast.model.moe.token_dispatcher import DispatchHandle, TokenDispatcher
from megafast.parallel.mappings import (
    Group,
    all_gather,
    gather_from_sequence_parallel_region,
    group_size,
    reduce_scatter_to_sequence_parallel_region,
)


class AllGatherTokenDispatcher(TokenDispatcher):
    """Every rank sees every token of the group, computes its own experts, and the partial
    outputs are summed back to the tokens' ranks."""

    def __init__(self, num_experts: int, ep_group: Group, ep_rank: int, backend: str = "auto") -> None:
        self.ep_size = group_size(ep_group)
        assert num_experts % self.ep_size == 0, "validated by megafast.config.validate_expert_parallel"
        self.num_local_experts = num_experts // self.ep_size
        self.group = ep_group
        self.first_expert = ep_rank * self.num_local_experts
        self.backend = backend

    def dispatch(
        self, x: torch.Tensor, probs: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        # gathered [EP T, ...]; backward: reduce-scatter (each rank's experts' share of the gradient)
        tokens = gather_from_sequence_parallel_region(x, self.group, tensor_parallel_output_grad=True)
        weights = gather_from_sequence_parallel_region(probs, self.group, tensor_parallel_output_grad=True)
        ids = all_gather(indices, 0, self.group) - self.first_expert  # [EP T, k]
        ids = torch.where((ids >= 0) & (ids < self.num_local_experts), ids, -1)  # dropped (-1) stays out
        permuted, row_id_map, tokens_per_expert = kernel_dispatch.moe_permute(
            tokens, ids, self.num_local_experts, backend=self.backend
        )  # [EP T k, h] by local expert (other ranks' choices: zero rows at the end), [EP T, k], [E_l]
        return permuted, tokens_per_expert, DispatchHandle(row_id_map, weights)

    def combine(self, expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        partial = kernel_dispatch.moe_unpermute(
            expert_output, handle.row_id_map, handle.probs, backend=self.backend
        )  # [EP T, h]: this rank's experts' share of every gathered token
        return reduce_scatter_to_sequence_parallel_region(partial, self.group)  # [T, h]
