"""Token dispatchers: move each token to the experts that process it, and their outputs back.

A dispatcher turns the router's decision into the experts' input and back:

    dispatch(x [T, h], probs [T, E], routing_map [T, E] bool)
        -> expert input [N, h], rows sorted by (local) expert, and tokens_per_expert [E_local] int64
    combine(expert output [N, h]) -> [T, h]: sum over each token's experts of probs[t, e] * y_{t,e}

N = the number of kept (token, expert) pairs. :class:`TokenDispatcher` is the interface; an
expert-parallel dispatcher (all-to-all or all-gather over an explicit expert-parallel process
group) implements the same two calls with communication between the permutation and the
experts. :class:`LocalTokenDispatcher` is expert-parallel size 1: every expert is on this rank,
so dispatching is a permutation.

Permutation order (Megatron's ``permute``): expert 0's tokens in token order, then expert 1's, ...
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DispatchHandle:
    """What ``combine`` needs from its ``dispatch`` (a dispatcher keeps no state between calls)."""

    token_index: torch.Tensor  # [N] token of each permuted row
    weights: torch.Tensor  # [N] its routing weight (differentiable)
    num_tokens: int
    extra: Any = None  # an expert-parallel dispatcher's own bookkeeping (split sizes, ...)


class TokenDispatcher(ABC):
    """Interface of the token dispatchers (one dispatch/combine pair per forward pass)."""

    num_local_experts: int

    @abstractmethod
    def dispatch(
        self, x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        """(expert input [N, h] sorted by local expert, tokens_per_expert [E_local] int64, handle)."""

    @abstractmethod
    def combine(self, expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Expert output [N, h] -> [T, h], weighted by the routing probabilities."""


class LocalTokenDispatcher(TokenDispatcher):
    """Expert-parallel size 1: a gather of the routed rows and a weighted scatter-add back."""

    def __init__(self, num_experts: int) -> None:
        self.num_local_experts = num_experts

    def dispatch(
        self, x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        num_tokens = x.shape[0]
        by_expert = routing_map.t()  # [E, T]
        token_ids = torch.arange(num_tokens, device=x.device).expand(by_expert.shape)
        token_index = token_ids.masked_select(by_expert)  # [N]
        weights = probs.t().masked_select(by_expert)  # [N]
        tokens_per_expert = by_expert.sum(dim=1)  # [E] int64
        return x.index_select(0, token_index), tokens_per_expert, DispatchHandle(token_index, weights, num_tokens)

    def combine(self, expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        weighted = expert_output * handle.weights.unsqueeze(-1).to(expert_output.dtype)  # [N, h]
        out = expert_output.new_zeros(handle.num_tokens, expert_output.shape[-1])
        return out.index_add(0, handle.token_index, weighted)  # [T, h]
