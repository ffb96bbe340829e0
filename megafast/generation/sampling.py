"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

Same order and semantics as transformers' logits warpers, so ``--temperature T --top-k K
--top-p P`` means what it means in ``model.generate``:

    logits / T  ->  keep the K largest  ->  keep the smallest set whose probability >= P
                ->  softmax  ->  sample

Temperature 0 is greedy (argmax). Filtered-out tokens get -inf; at least one token always stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0 (or 0.0, Megatron's "off"): no nucleus filter

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in [0, 1] (1 or 0 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits [b, V] with all but the k largest per row set to -inf (k = 0: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [b, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """logits [b, V] keeping the smallest high-probability set with total probability >= p."""
    if p <= 0.0 or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # ascending: the tail to drop comes first
    drop = cumulative <= (1.0 - p)
    drop[..., -1] = False  # always keep the most likely token
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample(
    logits: torch.Tensor, config: SamplingConfig, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Next token ids [b] from fp32 logits [b, V]."""
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / config.temperature, config.top_k), config.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
