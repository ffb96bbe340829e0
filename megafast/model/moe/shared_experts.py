"""Shared experts (Qwen2-MoE, DeepSeek): a dense FFN every token goes through, added to the
routed experts' output, optionally gated per token (Qwen2-MoE's ``shared_expert_gate``):

    shared(x) = act(x W1^T) W2^T * sigmoid(x g^T)      g: ``gate_weight`` [1, h] (with the gate)

W1 (``linear_fc1.weight``) is [2 F, h] ([gate; up] for SwiGLU) or [F, h], W2 (``linear_fc2.weight``)
[h, F], F = ``moe_shared_expert_intermediate_size`` (all shared experts together, as Megatron
sizes it). Replicated over TP, like the routed experts (see megafast.model.moe.experts). No biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megafast import kernels
from megafast.config import GPTConfig
from megafast.model import init
from megafast.model.moe.experts import StackedWeight


class SharedExperts(nn.Module):
    """forward(x [T, h]) -> [T, h]."""

    def __init__(
        self, config: GPTConfig, layer_number: int, seed: int, params_dtype=torch.float32, device=None
    ) -> None:
        super().__init__()
        self.activation = config.activation
        self.kernel_config = config.kernel_config
        size, h = config.moe_shared_expert_intermediate_size, config.hidden_size
        prefix = f"decoder.layers.{layer_number}.mlp.shared_experts"
        std = config.init_method_std
        rows = 2 * size if config.activation == "swiglu" else size
        self.linear_fc1 = StackedWeight(
            (rows, h), seed, f"{prefix}.linear_fc1.weight", std, params_dtype, device
        )
        self.linear_fc2 = StackedWeight(
            (h, size), seed, f"{prefix}.linear_fc2.weight", std / math.sqrt(2.0 * config.num_layers),
            params_dtype, device,
        )
        if config.moe_shared_expert_gate:
            full = torch.empty(1, h)
            init.normal(seed, f"{prefix}.gate_weight", std)(full)
            self.gate_weight = nn.Parameter(full.to(dtype=params_dtype, device=device))
        else:
            self.gate_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.kernel_config.kernels
        h = F.linear(x, self.linear_fc1.weight)
        if self.activation == "swiglu":
            h = kernels.swiglu(h, backend=backend)
        else:
            h = kernels.gelu(h, "tanh" if self.activation == "gelu_tanh" else "none", backend=backend)
        y = F.linear(h, self.linear_fc2.weight)  # [T, h]
        if self.gate_weight is not None:
            y = y * torch.sigmoid(F.linear(x, self.gate_weight))  # [T, 1] gate per token
        return y
