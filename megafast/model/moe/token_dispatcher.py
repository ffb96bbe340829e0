"""Token dispatchers: move each token to the experts that process it, and their outputs back.

A dispatcher turns the router's decision into the experts' input and back:

    dispatch(x [T, h], probs [T, k], indices [T, k] (expert ids, -1: a dropped choice))
        -> expert input [N, h], rows sorted by (local) expert, tokens_per_expert [E_local] int64, handle
    combine(expert output [N, h], handle) -> [T, h]: sum over token t's kept choices j of
        probs[t, j] * (the expert's output row of choice (t, j))

:class:`TokenDispatcher` is the interface; an expert-parallel dispatcher (all-to-all or
all-gather over an explicit expert-parallel process group) implements the same two calls with
communication between the permutation and the experts. :class:`LocalTokenDispatcher` is
expert-parallel size 1: every expert is on this rank, so dispatching is the fused permutation
``megafast.kernels`` ``moe_permute``/``moe_unpermute`` (Triton on the GPU, torch on CPU): N = T k
rows, expert 0's tokens in token order, then expert 1's, ..., then zero rows for dropped choices
(Megatron's ``permute`` order).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from megafast.kernels import dispatch as kernel_dispatch


@dataclass
class DispatchHandle:
    """What ``combine`` needs from its ``dispatch`` (a dispatcher keeps no state between calls)."""

    row_id_map: torch.Tensor  # [T, k] permuted row of each choice, -1 when dropped
    probs: torch.Tensor  # [T, k] routing weights (differentiable)
    extra: Any = None  # an expert-parallel dispatcher's own bookkeeping (split sizes, ...)


class TokenDispatcher(ABC):
    """Interface of the token dispatchers (one dispatch/combine pair per forward pass)."""

    num_local_experts: int

    @abstractmethod
    def dispatch(
        self, x: torch.Tensor, probs: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        """(expert input [N, h] sorted by local expert, tokens_per_expert [E_local] int64, handle)."""

    @abstractmethod
    def combine(self, expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Expert output [N, h] -> [T, h], weighted by the routing probabilities."""


class LocalTokenDispatcher(TokenDispatcher):
    """Expert-parallel size 1: permute the routed rows, combine them back weighted."""

    def __init__(self, num_experts: int, backend: str = "auto") -> None:
        self.num_local_experts = num_experts
        self.backend = backend  # --kernels (megafast.kernels.dispatch)

    def dispatch(
        self, x: torch.Tensor, probs: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        permuted, row_id_map, tokens_per_expert = kernel_dispatch.moe_permute(
            x, indices, self.num_local_experts, backend=self.backend
        )  # [T k, h], [T, k], [E]
        return permuted, tokens_per_expert, DispatchHandle(row_id_map, probs)

    def combine(self, expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        return kernel_dispatch.moe_unpermute(
            expert_output, handle.row_id_map, handle.probs, backend=self.backend
        )  # [T, h]
