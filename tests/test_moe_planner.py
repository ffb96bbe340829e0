"""MoE in the planner: parameter names/shapes/order equal the model's, total and active counts,
and forward/backward FLOPs (top-k experts, router, shared experts) equal torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megafast.config import GPTConfig
from megafast.model import GPTModel
from megafast.planner import (
    Stage,
    active_parameter_count,
    attention_flops_per_token,
    forward_flops_per_token,
    total_parameter_count,
    training_flops_per_token,
)
from megafast.planner.parameters import stage_parameters

VOCAB = 256


def moe(**kw) -> GPTConfig:
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB,
                ffn_hidden_size=48, position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
                add_bias_linear=False, tie_embeddings=False, make_vocab_size_divisible_by=128,
                num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24)
    base.update(kw)
    return GPTConfig(**base)


CONFIGS = {
    "mixtral_like": moe(),
    "qwen_like": moe(moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True, moe_layer_freq=(1, 1, 0, 1)),
    "gelu_every_other": moe(activation="gelu", moe_layer_freq=2, moe_router_topk=1),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameters_equal_the_model(name):
    config = CONFIGS[name]
    model = GPTModel(config, seed=1)
    got = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    want = [(p.name, p.shape) for p in stage_parameters(config, Stage((0, config.num_layers), True, True))]
    assert got == want
    assert total_parameter_count(config) == sum(p.numel() for p in model.parameters())
    glu = 2 if config.activation == "swiglu" else 1
    unused = sum(config.is_moe_layer(i) for i in range(4)) * (4 - config.moe_router_topk) * (glu + 1) * 24 * 32
    assert active_parameter_count(config) == total_parameter_count(config) - unused


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_flops_equal_flop_counter(name):
    config = CONFIGS[name]
    b, s = 2, 16
    model = GPTModel(config, seed=1)
    ids = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fwd:
        loss = model(ids, labels=ids).sum()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    attention = b * s * config.num_layers * attention_flops_per_token(config, s)
    matmul = b * s * forward_flops_per_token(config, s) - attention  # CPU attention is not counted
    assert fwd.get_total_flops() == matmul
    assert bwd.get_total_flops() == 2 * matmul
    assert training_flops_per_token(config, s) == 3 * forward_flops_per_token(config, s)
