"""The routed experts: E feed-forward networks with weights stacked per expert.

    linear_fc1.weight  [E, 2f, h] (SwiGLU: [gate_e; up_e] per expert, as the dense fc1) or [E, f, h] (GELU)
    linear_fc2.weight  [E, h, f]

Input rows are sorted by expert (``tokens_per_expert[e]`` rows for expert e, in expert order, as
the token dispatcher produces them); row r of expert e gives

    y_r = act(x_r W1_e^T) W2_e^T      act: silu(gate) * up (SwiGLU) or GELU

``moe_grouped_gemm``: each of the two products is one grouped GEMM over all experts
(``megafast.kernels.grouped_gemm``: Triton on the GPU, its torch twin on CPU; no per-expert
Python loop and no host synchronisation); otherwise a loop over the experts (Megatron's
SequentialMLP), which reads the token counts on the host.

Expert tensor parallelism is 1 (Megatron's default): every TP rank holds every expert in full and
computes them on the full hidden state (see megafast.model.moe.moe_layer). No biases.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megafast import kernels
from megafast.kernels import dispatch as kernel_dispatch
from megafast.config import GPTConfig
from megafast.model import init


class StackedWeight(nn.Module):
    """A module holding one ``weight`` (so the state-dict key is ``<name>.weight``), drawn in full
    from the seed of its global name (``init.normal``)."""

    def __init__(
        self, shape: tuple[int, ...], seed: int, name: str, std: float, params_dtype, device,
        rows: Optional[tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        full = torch.empty(shape)
        init.normal(seed, name, std)(full)
        if rows is not None:  # this expert-parallel rank's experts [lo, hi) of the full stack
            full = full[rows[0] : rows[1]]
        self.weight = nn.Parameter(full.to(dtype=params_dtype, device=device))


class Experts(nn.Module):
    """forward(x [N, h] sorted by local expert, tokens_per_expert [E_l] int64) -> [N, h]; rows past
    sum(tokens_per_expert) (slots of dropped choices) give 0.

    Expert parallelism (``ep_size`` EP): this rank holds experts ``ep_rank E_l ... (ep_rank+1) E_l - 1``
    (E_l = E / EP), drawn from the full stack's seed (so every layout starts from the same experts);
    its weights are marked ``expert_parallel`` (reduced over the expert-data-parallel group)."""

    def __init__(
        self, config: GPTConfig, layer_number: int, seed: int, params_dtype=torch.float32, device=None,
        ep_rank: int = 0, ep_size: int = 1,
    ) -> None:
        super().__init__()
        self.num_experts = config.num_experts // ep_size  # local experts
        rows = (ep_rank * self.num_experts, (ep_rank + 1) * self.num_experts) if ep_size > 1 else None
        self.activation = config.activation
        self.grouped_gemm = config.moe_grouped_gemm
        self.kernel_config = config.kernel_config
        f, h = config.moe_ffn_hidden_size, config.hidden_size
        fc1_rows = 2 * f if config.activation == "swiglu" else f
        prefix = f"decoder.layers.{layer_number}.mlp.experts"
        std = config.init_method_std
        num = config.num_experts  # drawn in full, then this rank's rows kept
        self.linear_fc1 = StackedWeight(
            (num, fc1_rows, h), seed, f"{prefix}.linear_fc1.weight", std, params_dtype, device, rows
        )
        self.linear_fc2 = StackedWeight(  # output projection: Megatron's scaled init
            (num, h, f), seed, f"{prefix}.linear_fc2.weight",
            std / math.sqrt(2.0 * config.num_layers), params_dtype, device, rows,
        )
        if ep_size > 1:
            for p in self.parameters():
                p.expert_parallel = True

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        backend = self.kernel_config.kernels
        if self.activation == "swiglu":
            return kernels.swiglu(h, backend=backend)  # [N, 2f] -> [N, f]
        return kernels.gelu(h, "tanh" if self.activation == "gelu_tanh" else "none", backend=backend)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.linear_fc1.weight, self.linear_fc2.weight
        if self.grouped_gemm:
            backend = self.kernel_config.kernels
            gemm = kernel_dispatch.grouped_gemm  # w [E, K, N]: the weights' transposed views
            h = gemm(x, w1.transpose(1, 2), tokens_per_expert, backend=backend)  # [N, 2f]
            return gemm(self._act(h), w2.transpose(1, 2), tokens_per_expert, backend=backend)  # [N, h]
        counts = tokens_per_expert.tolist()  # host sync: the loop needs the sizes
        *groups, dropped = x.split(counts + [x.shape[0] - sum(counts)], dim=0)
        outputs = [  # [c_e, h] each
            F.linear(self._act(F.linear(rows, w1[e])), w2[e]) for e, rows in enumerate(groups)
        ]
        return torch.cat(outputs + [x.new_zeros(dropped.shape[0], w2.shape[1])], dim=0)
