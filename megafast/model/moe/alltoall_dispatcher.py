"""All-to-all token dispatcher over the expert-parallel group (Megatron's ``alltoall``).

E experts over EP ranks, ``E_l = E / EP`` on each (rank r holds experts ``r E_l ... (r+1) E_l - 1``).
Per forward pass, on each rank of the group:

1. permute this rank's T tokens by global expert (``moe_permute``: rows of expert 0, then 1, ...;
   dropped choices last, as zero rows): the rows for rank r's experts are contiguous;
2. exchange the counts: ``counts[r, e]`` rows for local expert e of rank r go out, and
   ``received[s, e]`` rows for my local expert e come from rank s (one all-to-all of [EP, E_l]
   integers, read on the host: the row all-to-all needs its split sizes there, as in Megatron);
3. all-to-all the rows (``input_splits[r] = sum_e counts[r, e]``, ``output_splits[s] = sum_e
   received[s, e]``): the received rows are ordered (source rank, local expert);
4. reorder them to (local expert, source rank), so that each local expert's rows are contiguous
   for the grouped GEMM (``tokens_per_expert[e] = sum_s received[s, e]``).

``combine`` runs the same steps in reverse (reorder back, all-to-all with the splits swapped,
pad the dropped rows back, ``moe_unpermute`` weighted by the routing probabilities). The row
all-to-all is differentiable (:func:`megafast.parallel.mappings.all_to_all`: its backward is the
reverse all-to-all), and so is the reordering (an index_select), so gradients reach the tokens,
the routing weights and the experts of every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megafast.kernels import dispatch as kernel_dispatch
from megafast.model.moe.token_dispatcher import DispatchHandle, TokenDispatcher
from megafast.parallel.mappings import Group, all_to_all, group_size


@dataclass
class _AllToAllState:
    routed: int  # rows of this rank's permutation that were sent (the rest are dropped choices)
    input_splits: list[int]  # rows sent to each EP rank
    output_splits: list[int]  # rows received from each EP rank
    order: torch.Tensor  # expert input row i = received row order[i] (_chunk_order)


def _chunk_order(received: torch.Tensor) -> torch.Tensor:
    """[N] row indices that reorder rows grouped (source rank, local expert) into (local expert,
    source rank): row i of the result is row ``order[i]`` of the input. ``received`` [EP, E_l]
    holds each chunk's row count."""
    ep, local = received.shape
    sizes = received.reshape(-1)  # chunk sizes, (source, expert) order
    starts = torch.cumsum(sizes, 0) - sizes  # where each chunk begins in the input
    by_expert = torch.arange(ep * local, device=sizes.device).view(ep, local).t().reshape(-1)
    new_sizes = sizes[by_expert]  # chunk sizes, (expert, source) order
    new_starts = torch.cumsum(new_sizes, 0) - new_sizes  # where each chunk begins in the output
    n = int(sizes.sum())
    offset = torch.repeat_interleave(starts[by_expert] - new_starts, new_sizes, output_size=n)
    return torch.arange(n, device=sizes.device) + offset


class AllToAllTokenDispatcher(TokenDispatcher):
    """Tokens to the ranks holding their experts by one all-to-all, outputs back by another."""

    def __init__(self, num_experts: int, ep_group: Group, ep_rank: int, backend: str = "auto") -> None:
        self.ep_size = group_size(ep_group)
        assert num_experts % self.ep_size == 0, "validated by megafast.config.validate_expert_parallel"
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.group = ep_group
        self.ep_rank = ep_rank
        self.backend = backend

    def dispatch(
        self, x: torch.Tensor, probs: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        permuted, row_id_map, tokens_per_expert = kernel_dispatch.moe_permute(
            x, indices, self.num_experts, backend=self.backend
        )  # [T k, h] by global expert, [T, k], [E]
        counts = tokens_per_expert.view(self.ep_size, self.num_local_experts)  # [EP, E_l] rows to rank r
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=self.group)  # [EP, E_l] rows from rank s
        input_splits = counts.sum(dim=1).tolist()
        output_splits = received.sum(dim=1).tolist()
        routed = sum(input_splits)
        rows = all_to_all(permuted[:routed], output_splits, input_splits, self.group)  # [N, h] (source, expert)
        order = _chunk_order(received)
        expert_input = rows.index_select(0, order)  # [N, h] (local expert, source)
        state = _AllToAllState(routed, input_splits, output_splits, order)
        return expert_input, received.sum(dim=0), DispatchHandle(row_id_map, probs, state)

    def combine(self, expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        st: _AllToAllState = handle.extra
        inverse = torch.empty_like(st.order)
        inverse[st.order] = torch.arange(st.order.numel(), device=st.order.device)
        rows = expert_output.index_select(0, inverse)  # back to (source, expert) order
        back = all_to_all(rows, st.input_splits, st.output_splits, self.group)  # [routed, h] by global expert
        dropped = handle.row_id_map.numel() - st.routed
        if dropped:
            back = torch.cat([back, back.new_zeros(dropped, back.shape[1])], dim=0)  # [T k, h]
        return kernel_dispatch.moe_unpermute(back, handle.row_id_map, handle.probs, backend=self.backend)  # [T, h]
