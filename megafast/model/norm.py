"""LayerNorm and RMSNorm over the last dimension, statistics in fp32.

RMSNorm: y = x / sqrt(mean(x^2) + eps) * w (as Llama/HF, normalised in fp32 then cast back).
Under sequence parallelism the weights see only this rank's sequence shard, so they are marked
``sequence_parallel`` and their gradients are summed over TP. The arithmetic is
``megafast.kernels`` (Triton or plain torch, chosen by the module's ``KernelConfig``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megafast.config import GPTConfig
from megafast.config import KernelConfig
from megafast.kernels import add_rms_norm, layer_norm, rms_norm


class _Norm(nn.Module):
    """Weight (ones) over the last dimension, ``eps`` and the kernel choice, shared by both norms."""

    def __init__(
        self,
        hidden_size: int,
        eps: float,
        sequence_parallel: bool = False,
        params_dtype: torch.dtype = torch.float32,
        device=None,
        kernels: Optional[KernelConfig] = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.kernel_config = kernels or KernelConfig()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype, device=device))
        self.weight.sequence_parallel = sequence_parallel

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = x + residual``; returns ``(norm(h), h)`` (the pre-norm layer's residual step)."""
        h = x + residual
        return self(h), h


class RMSNorm(_Norm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, backend=self.kernel_config.kernels)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One fused pass with Triton (``megafast.kernels.add_rms_norm``)."""
        return add_rms_norm(x, residual, self.weight, self.eps, backend=self.kernel_config.kernels)


class LayerNorm(_Norm):
    def __init__(self, hidden_size: int, eps: float, sequence_parallel: bool = False, **kw) -> None:
        super().__init__(hidden_size, eps, sequence_parallel, **kw)
        self.bias = nn.Parameter(torch.zeros_like(self.weight))
        self.bias.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps, backend=self.kernel_config.kernels)


def build_norm(config: GPTConfig, sequence_parallel: bool, **factory) -> nn.Module:
    cls = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
    kernels = config.kernel_config
    return cls(config.hidden_size, config.norm_epsilon, sequence_parallel, kernels=kernels, **factory)


def build_head_norm(config: GPTConfig, tp_size: int, **factory) -> nn.Module:
    """Per-head norm over the head dim d (``--qk-layernorm``, Qwen3's q_norm/k_norm).

    Each TP rank applies the one weight [d] to its own heads, so its gradient is partial: marked
    ``sequence_parallel`` (summed over TP) when TP > 1.
    """
    cls = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
    return cls(config.head_dim, config.norm_epsilon, tp_size > 1, kernels=config.kernel_config, **factory)
