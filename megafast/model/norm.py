"""LayerNorm and RMSNorm over the last dimension, statistics in fp32.

RMSNorm: y = x / sqrt(mean(x^2) + eps) * w (as Llama/HF, normalised in fp32 then cast back).
Under sequence parallelism the weights see only this rank's sequence shard, so they are marked
``sequence_parallel`` and their gradients are summed over TP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megafast.config import GPTConfig


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype, device=device))
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype, device=device))
        self.weight.sequence_parallel = self.bias.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def build_norm(config: GPTConfig, sequence_parallel: bool, **factory) -> nn.Module:
    cls = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
    return cls(config.hidden_size, config.norm_epsilon, sequence_parallel, **factory)
