"""Pre-norm transformer layer (Megatron/Llama order) and its MLP.

    x = x + dropout(attention(input_layernorm(x)))
    x = x + dropout(mlp(pre_mlp_layernorm(x)))

With RMSNorm the first residual add and pre_mlp_layernorm are one fused op
(``megafast.kernels.add_rms_norm``). Activations are [s, b, h], or [s/p, b, h] with sequence
parallelism (norms, dropout and residuals then run on this rank's sequence shard).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megafast import kernels
from megafast.config import GPTConfig
from megafast.model import init
from megafast.model.attention import SelfAttention
from megafast.model.kv_cache import InferenceParams
from megafast.model.moe import MoELayer, MoELossTracker
from megafast.model.norm import build_norm
from megafast.model.packing import PackedSeqParams
from megafast.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megafast.parallel.random import RNGStatesTracker, tensor_parallel_dropout
from megafast.parallel.state import ParallelState


class MLP(nn.Module):
    """fc1 (column-parallel) -> activation -> fc2 (row-parallel).

    SwiGLU: fc1's full weight is [gate; up] (2 * ffn rows) and each TP rank holds [gate_r; up_r]
    (partition stride 2); act(x) = silu(gate) * up.
    """

    def __init__(self, config: GPTConfig, state: ParallelState, layer_number: int, seed: int, **factory) -> None:
        super().__init__()
        self.activation = config.activation
        self.kernel_config = config.kernel_config  # Triton or torch activations (megafast.kernels)
        swiglu = config.activation == "swiglu"
        prefix = f"decoder.layers.{layer_number}.mlp"
        self.linear_fc1 = ColumnParallelLinear(
            config.hidden_size,
            config.ffn_hidden_size * (2 if swiglu else 1),
            tp_group=state.tp_group,
            bias=config.add_bias_linear,
            sequence_parallel=state.sequence_parallel,
            init_method=init.for_param(config, seed, f"{prefix}.linear_fc1.weight"),
            partition_stride=2 if swiglu else 1,
            **factory,
        )
        self.linear_fc2 = RowParallelLinear(
            config.ffn_hidden_size,
            config.hidden_size,
            tp_group=state.tp_group,
            bias=config.add_bias_linear,
            sequence_parallel=state.sequence_parallel,
            init_method=init.for_param(config, seed, f"{prefix}.linear_fc2.weight"),
            **factory,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)  # [s, b, ffn/p] (x2 for SwiGLU)
        if self.activation == "swiglu":
            h = kernels.swiglu(h, backend=self.kernel_config.kernels)  # silu(gate) * up -> [s, b, ffn/p]
        else:
            approximate = "tanh" if self.activation == "gelu_tanh" else "none"
            h = kernels.gelu(h, approximate, backend=self.kernel_config.kernels)
        return self.linear_fc2(h)


class TransformerLayer(nn.Module):
    def __init__(
        self,
        config: GPTConfig,
        state: ParallelState,
        layer_number: int,
        tracker: RNGStatesTracker,
        seed: int,
        moe_tracker: Optional[MoELossTracker] = None,
        **factory,
    ) -> None:
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.tracker = tracker
        self.sequence_parallel = state.sequence_parallel
        self.input_layernorm = build_norm(config, state.sequence_parallel, **factory)
        self.self_attention = SelfAttention(config, state, layer_number, tracker, seed, **factory)
        self.pre_mlp_layernorm = build_norm(config, state.sequence_parallel, **factory)
        if config.is_moe_layer(layer_number):  # --num-experts with --moe-layer-freq: the MoE MLP
            self.mlp = MoELayer(config, state, layer_number, seed, moe_tracker, **factory)
        else:
            self.mlp = MLP(config, state, layer_number, seed, **factory)

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        # with sequence parallelism each TP rank holds a different shard: independent masks
        return tensor_parallel_dropout(
            x, self.hidden_dropout, training=self.training, tracker=self.tracker, sharded=self.sequence_parallel
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        inference_params: Optional[InferenceParams] = None,
    ) -> torch.Tensor:
        attention = self.dropout(
            self.self_attention(self.input_layernorm(x), rope, packed_seq_params, inference_params)
        )
        normed, x = self.pre_mlp_layernorm.add_and_norm(attention, x)  # fused for RMSNorm
        return x + self.dropout(self.mlp(normed))
