"""Where every parameter of a megafast model lives: names, shapes and counts per rank.

Parameters (h hidden, H heads, G query groups, d head dim, f FFN size, V vocabulary, padded to
a multiple of ``make_vocab_size_divisible_by * tp``), per transformer layer::

    norms       2 * h * (2 if LayerNorm else 1)                        (weight [+ bias])
    linear_qkv  (H + 2G) d * h  [+ (H + 2G) d bias with add_bias_linear or add_qkv_bias]
    linear_proj h * H d         [+ h]
    linear_fc1  f_1 * h         [+ f_1],   f_1 = 2f for SwiGLU ([gate; up]) else f
    linear_fc2  h * f           [+ h]

An MoE layer (E experts of FFN size F, shared-expert size S) has instead of linear_fc1/fc2 the
router [E, h], the experts' stacked [E, F_1, h] and [E, h, F] (F_1 = 2F for SwiGLU) and the shared
experts' [S_1, h], [h, S] (+ gate [1, h]), all replicated over TP (expert tensor parallelism 1).
:func:`active_parameter_count` counts what one token uses: top-k experts of every MoE layer.

plus ``V * h`` word embeddings (and ``max_position_embeddings * h`` learned positions) on the
first stage, and the final norm and ``V * h`` output layer on the last. With tied embeddings the
output layer reuses the word embeddings on a single stage; with pipelining the last stage keeps
its own copy (``output_layer.weight``, summed with the first stage's gradient, as Megatron does).
:func:`total_parameter_count` counts the model's *unique* parameters, so that copy is excluded
unless ``include_tied_copy``; per-rank counts (:func:`rank_parameter_count`) include it, since it
occupies memory there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megafast.config import GPTConfig
from megafast.planner.layout import Layout, Stage, rank_stages


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of one rank: Megatron name (global layer index) and this TP rank's shape."""

    name: str
    shape: tuple[int, ...]
    tensor_parallel: bool  # sharded over TP (else replicated on every TP rank)
    shared_embedding: bool = False  # tied embedding whose gradient is summed over first+last stage

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


def _linear(name: str, rows: int, cols: int, bias: bool, tp: int, column: bool) -> list[ParamSpec]:
    """A column-parallel ([rows/tp, cols], bias [rows/tp]) or row-parallel ([rows, cols/tp]) linear."""
    if column:
        specs = [ParamSpec(f"{name}.weight", (rows // tp, cols), True)]
        return specs + ([ParamSpec(f"{name}.bias", (rows // tp,), True)] if bias else [])
    specs = [ParamSpec(f"{name}.weight", (rows, cols // tp), True)]
    return specs + ([ParamSpec(f"{name}.bias", (rows,), False)] if bias else [])


def _norm(name: str, config: GPTConfig) -> list[ParamSpec]:
    h = config.hidden_size
    specs = [ParamSpec(f"{name}.weight", (h,), False)]
    return specs + ([ParamSpec(f"{name}.bias", (h,), False)] if config.normalization == "LayerNorm" else [])


def moe_parameters(config: GPTConfig, layer: int) -> list[ParamSpec]:
    """The MoE MLP of layer ``layer`` (replicated over TP), in ``named_parameters()`` order."""
    c, h, p = config, config.hidden_size, f"decoder.layers.{layer}.mlp"
    glu = 2 if c.activation == "swiglu" else 1
    E, F = c.num_experts, c.moe_ffn_hidden_size
    specs = [
        ParamSpec(f"{p}.router.weight", (E, h), False),
        ParamSpec(f"{p}.experts.linear_fc1.weight", (E, glu * F, h), False),
        ParamSpec(f"{p}.experts.linear_fc2.weight", (E, h, F), False),
    ]
    S = c.moe_shared_expert_intermediate_size
    if S:
        if c.moe_shared_expert_gate:
            specs.append(ParamSpec(f"{p}.shared_experts.gate_weight", (1, h), False))
        specs += [ParamSpec(f"{p}.shared_experts.linear_fc1.weight", (glu * S, h), False),
                  ParamSpec(f"{p}.shared_experts.linear_fc2.weight", (h, S), False)]
    return specs


def _head_norms(prefix: str, config: GPTConfig) -> list[ParamSpec]:
    """--qk-layernorm: q_layernorm and k_layernorm over the head dim d, replicated."""
    d, bias = config.head_dim, config.normalization == "LayerNorm"
    return [
        ParamSpec(f"{prefix}.{which}.{kind}", (d,), False)
        for which in ("q_layernorm", "k_layernorm")
        for kind in (("weight", "bias") if bias else ("weight",))
    ]


def layer_parameters(config: GPTConfig, layer: int, tp: int = 1) -> list[ParamSpec]:
    """Transformer layer ``layer`` on one TP rank, in ``named_parameters()`` order."""
    c, h, p = config, config.hidden_size, f"decoder.layers.{layer}"
    fc1_rows = c.ffn_hidden_size * (2 if c.activation == "swiglu" else 1)
    if c.is_moe_layer(layer):
        dense = layer_parameters(dataclasses.replace(c, num_experts=None), layer, tp)
        attention = dense[:-2]  # without the dense fc1, fc2 (MoE models have no linear biases)
        return attention + moe_parameters(c, layer)
    return (
        _norm(f"{p}.input_layernorm", c)
        + _linear(f"{p}.self_attention.linear_qkv", c.qkv_size, h, c.qkv_bias, tp, column=True)
        + _linear(
            f"{p}.self_attention.linear_proj",
            h,
            c.num_attention_heads * c.head_dim,
            c.add_bias_linear,
            tp,
            False,
        )
        + (_head_norms(f"{p}.self_attention", c) if c.qk_layernorm else [])
        + _norm(f"{p}.pre_mlp_layernorm", c)
        + _linear(f"{p}.mlp.linear_fc1", fc1_rows, h, c.add_bias_linear, tp, column=True)
        + _linear(f"{p}.mlp.linear_fc2", h, c.ffn_hidden_size, c.add_bias_linear, tp, column=False)
    )


def stage_parameters(config: GPTConfig, stage: Stage, tp: int = 1) -> list[ParamSpec]:
    """Every parameter of one chunk on one TP rank, in ``GPTModel.parameters()`` order (the order
    the gradient buffers are built from)."""
    h, vocab = config.hidden_size, config.padded_vocab_size(tp)
    single = stage.pre_process and stage.post_process
    shared = config.tie_embeddings and not single
    specs: list[ParamSpec] = []
    if stage.pre_process:
        specs.append(ParamSpec("embedding.word_embeddings.weight", (vocab // tp, h), True, shared))
        if config.position_embedding_type == "learned_absolute":
            specs.append(
                ParamSpec("embedding.position_embeddings.weight", (config.max_position_embeddings, h), False)
            )
    for layer in range(*stage.layer_range):
        specs += layer_parameters(config, layer, tp)
    if stage.post_process:
        specs += _norm("decoder.final_layernorm", config)
        if not (config.tie_embeddings and stage.pre_process):
            specs.append(ParamSpec("output_layer.weight", (vocab // tp, h), True, shared))
    return specs


def rank_parameters(config: GPTConfig, layout: Layout, pp_rank: int) -> list[list[ParamSpec]]:
    """Parameters of each model chunk of pipeline rank ``pp_rank`` (any TP rank: shards are equal)."""
    return [stage_parameters(config, s, layout.tp) for s in rank_stages(config, layout, pp_rank)]


def rank_parameter_count(config: GPTConfig, layout: Layout, pp_rank: int) -> int:
    """Parameters held by one GPU of pipeline rank ``pp_rank`` (tied output-layer copy included)."""
    return sum(p.numel for chunk in rank_parameters(config, layout, pp_rank) for p in chunk)


def total_parameter_count(
    config: GPTConfig, tp: int = 1, *, padded: bool = True, include_tied_copy: bool = False
) -> int:
    """Unique parameters of the model: TP shards summed, replicated parameters counted once.

    ``padded``: the vocabulary padded for TP size ``tp`` (what megafast allocates), else the
    tokenizer's (what an HF checkpoint holds). ``include_tied_copy`` adds the last stage's copy of
    tied embeddings, which exists only with pipelining.
    """
    c = config
    vocab = c.padded_vocab_size(tp) if padded else c.vocab_size
    if c.is_moe:
        layers = sum(p.numel for i in range(c.num_layers) for p in layer_parameters(c, i))
    else:
        layers = c.num_layers * sum(p.numel for p in layer_parameters(c, 0))
    norm = c.hidden_size * (2 if c.normalization == "LayerNorm" else 1)
    positions = (
        c.max_position_embeddings * c.hidden_size if c.position_embedding_type == "learned_absolute" else 0
    )
    outputs = 1 if not c.tie_embeddings or include_tied_copy else 0
    return layers + (1 + outputs) * vocab * c.hidden_size + positions + norm


def active_parameter_count(config: GPTConfig, tp: int = 1, *, padded: bool = True) -> int:
    """Parameters one token uses: :func:`total_parameter_count` less, in every MoE layer, the
    experts it is not routed to (E - k of them); equal to the total for a dense model."""
    total = total_parameter_count(config, tp, padded=padded)
    if not config.is_moe:
        return total
    glu = 2 if config.activation == "swiglu" else 1
    per_expert = (glu + 1) * config.moe_ffn_hidden_size * config.hidden_size
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    return total - moe_layers * (config.num_experts - config.moe_router_topk) * per_expert


__all__ = [
    "ParamSpec",
    "active_parameter_count",
    "moe_parameters",
    "layer_parameters",
    "rank_parameter_count",
    "rank_parameters",
    "stage_parameters",
    "total_parameter_count",
]
