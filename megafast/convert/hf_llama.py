"""Llama-family checkpoints (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``).

Config mapping (HF config.json -> GPTConfig):

| HF                                   | megafast                                            |
|--------------------------------------|-----------------------------------------------------|
| num_hidden_layers, hidden_size       | num_layers, hidden_size                             |
| num_attention_heads                  | num_attention_heads                                 |
| num_key_value_heads                  | num_query_groups (GQA; = heads when absent)         |
| head_dim                             | kv_channels (= hidden / heads when absent)          |
| intermediate_size                    | ffn_hidden_size (activation "swiglu", silu only)    |
| rope_theta / rope_parameters         | rotary_base (plain RoPE only: no rope scaling)      |
| rms_norm_eps                         | norm_epsilon (normalization "RMSNorm")              |
| tie_word_embeddings                  | tie_embeddings                                      |
| attention_bias and mlp_bias (Llama)  | add_bias_linear (both or neither)                   |
| q/k/v bias (always, Qwen2)           | add_qkv_bias                                        |
| initializer_range, attention_dropout | init_method_std, attention_dropout                  |

Sliding-window attention (Mistral v0.1, Qwen2 with ``use_sliding_window``) and RoPE scaling
(Llama 3.1's "llama3", YaRN, ...) change the maths, and megafast has neither: such configs are
refused with a clear error instead of converted wrongly.

Tensor map (per layer ``i``; ``m`` = ``decoder.layers.i.``, ``h`` = ``model.layers.i.``):

    m.input_layernorm.weight              <- h.input_layernorm.weight
    m.self_attention.linear_qkv.{w,b}     <- h.self_attn.{q,k,v}_proj.{w,b}   (fused per group)
    m.self_attention.linear_proj.{w,b}    <- h.self_attn.o_proj.{w,b}
    m.pre_mlp_layernorm.weight            <- h.post_attention_layernorm.weight
    m.mlp.linear_fc1.{w,b}                <- [h.mlp.gate_proj; h.mlp.up_proj].{w,b}
    m.mlp.linear_fc2.{w,b}                <- h.mlp.down_proj.{w,b}
    embedding.word_embeddings.weight      <- model.embed_tokens.weight
    decoder.final_layernorm.weight        <- model.norm.weight
    output_layer.weight                   <- lm_head.weight (untied only)

RoPE is half-split in both, so q/k need no permutation.
"""

from __future__ import annotations

from typing import Any

import torch

from megafast.checkpoint import layout
from megafast.config import GPTConfig
from megafast.convert.hf_keymap import Rule

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# HF fields megafast does not model but an export should give back unchanged.
PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "pretraining_tp", "max_window_layers")


def _unsupported(where: str, key: str, value: Any, why: str) -> ValueError:
    return ValueError(
        f"{where}: config.json sets {key}={value!r} ({why}), which megafast's model does not implement: "
        "it cannot be converted exactly"
    )


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise _unsupported(where, "rope_parameters", params, f"RoPE scaling {kind!r}")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise _unsupported(where, "rope_parameters", params, "partial rotary embedding")
        return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise _unsupported(where, "rope_scaling", scaling, "RoPE scaling")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(
            where, "partial_rotary_factor", hf["partial_rotary_factor"], "partial rotary embedding"
        )
    return float(hf.get("rope_theta", 10000.0))


def config_from_hf(
    hf: dict[str, Any], architecture: str, make_vocab_size_divisible_by: int, where: str
) -> tuple[GPTConfig, dict[str, Any]]:
    """(GPTConfig, metadata) of an HF Llama/Mistral/Qwen2 config.json dict."""
    model_type = ARCHITECTURES[architecture]

    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise ValueError(f"{where}: config.json lacks {key!r}, which a {architecture} config must have")
        return hf[key]

    heads, hidden = need("num_attention_heads"), need("hidden_size")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise _unsupported(where, "hidden_act", hf["hidden_act"], "megafast's SwiGLU uses silu")
    max_positions = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and window < max_positions:
        raise _unsupported(where, "sliding_window", window, "sliding-window attention")
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"} and uses_window:
        raise _unsupported(where, "layer_types", sorted(kinds), "sliding-window layers")
    if model_type == "qwen2":
        qkv_bias, bias = True, False
    elif model_type == "mistral":
        qkv_bias = bias = False
    else:
        attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise _unsupported(
                where,
                "attention_bias/mlp_bias",
                (attention_bias, mlp_bias),
                "megafast has biases on every linear layer or on none (besides QKV)",
            )
        qkv_bias = bias = attention_bias
    config = GPTConfig(
        num_layers=need("num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        vocab_size=need("vocab_size"),
        ffn_hidden_size=need("intermediate_size"),
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hidden // heads,
        max_position_embeddings=max_positions,
        position_embedding_type="rope",
        rotary_base=_rope_theta(hf, where),
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        add_bias_linear=bias,
        add_qkv_bias=qkv_bias and not bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        hidden_dropout=0.0,
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    metadata = {"architecture": architecture, **{k: hf[k] for k in PASSTHROUGH if k in hf}}
    return config, metadata


def architecture_for(config: GPTConfig) -> str | None:
    """The Llama-family architecture that can hold ``config`` exactly, or None."""
    if config.is_moe:  # experts: megafast.convert.hf_moe
        return None
    if (config.position_embedding_type, config.normalization, config.activation) != (
        "rope",
        "RMSNorm",
        "swiglu",
    ):
        return None
    if config.add_qkv_bias and not config.add_bias_linear:
        return (
            "Qwen2ForCausalLM"
            if config.kv_channels * config.num_attention_heads == config.hidden_size
            else None
        )
    return "LlamaForCausalLM"


def config_to_hf(config: GPTConfig, metadata: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """config.json dict of the HF model holding ``config`` (metadata: architecture, token ids, ...)."""
    fits = architecture_for(config)
    if fits is None:
        raise ValueError(
            "the model cannot be written as LlamaForCausalLM/MistralForCausalLM/Qwen2ForCausalLM: they "
            "need RoPE, RMSNorm, SwiGLU and biases on every linear layer, on none, or on QKV only "
            "(with head_dim = hidden/heads)"
        )
    architecture = metadata.get("architecture")  # the one it was imported from, when it still fits
    mistral_fits = fits == "LlamaForCausalLM" and not config.add_bias_linear
    if not (architecture == fits or (architecture == "MistralForCausalLM" and mistral_fits)):
        architecture = fits
    model_type = ARCHITECTURES[architecture]
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_epsilon,
        "rope_theta": config.rotary_base,  # transformers 4.x reads this, 5.x rope_parameters
        "rope_parameters": {"rope_theta": config.rotary_base, "rope_type": "default"},
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": config.attention_dropout,
        "initializer_range": config.init_method_std,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if model_type != "qwen2":
        hf["head_dim"] = config.kv_channels
    if model_type == "llama":
        hf.update(attention_bias=config.add_bias_linear, mlp_bias=config.add_bias_linear, pretraining_tp=1)
    elif model_type == "mistral":
        hf["sliding_window"] = None
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
    hf.update({k: metadata[k] for k in PASSTHROUGH if k in metadata})
    return hf


def rule_groups(config: GPTConfig, hf_names: set[str] | None = None) -> list[tuple[str, list[Rule]]]:
    """The explicit key map, group by group (labels as megafast.checkpoint.layout.groups)."""
    out = [("embedding", [Rule(layout.WORD_EMBEDDINGS, ("model.embed_tokens.weight",))])]
    for i in range(config.num_layers):
        m, h = layout.layer_prefix(i), f"model.layers.{i}."
        attn = f"{h}self_attn."
        rules = [
            Rule(f"{m}input_layernorm.weight", (f"{h}input_layernorm.weight",)),
            Rule(
                f"{m}self_attention.linear_qkv.weight",
                (f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"),
                "qkv",
            ),
        ]
        if config.qkv_bias:
            rules.append(
                Rule(
                    f"{m}self_attention.linear_qkv.bias",
                    (f"{attn}q_proj.bias", f"{attn}k_proj.bias", f"{attn}v_proj.bias"),
                    "qkv",
                )
            )
        rules.append(Rule(f"{m}self_attention.linear_proj.weight", (f"{attn}o_proj.weight",)))
        if config.add_bias_linear:
            rules.append(Rule(f"{m}self_attention.linear_proj.bias", (f"{attn}o_proj.bias",)))
        rules += [
            Rule(f"{m}pre_mlp_layernorm.weight", (f"{h}post_attention_layernorm.weight",)),
            Rule(
                f"{m}mlp.linear_fc1.weight", (f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"), "gate_up"
            ),
        ]
        if config.add_bias_linear:
            rules.append(
                Rule(f"{m}mlp.linear_fc1.bias", (f"{h}mlp.gate_proj.bias", f"{h}mlp.up_proj.bias"), "gate_up")
            )
        rules.append(Rule(f"{m}mlp.linear_fc2.weight", (f"{h}mlp.down_proj.weight",)))
        if config.add_bias_linear:
            rules.append(Rule(f"{m}mlp.linear_fc2.bias", (f"{h}mlp.down_proj.bias",)))
        out.append((f"layer {i}", rules))
    final = [Rule("decoder.final_layernorm.weight", ("model.norm.weight",))]
    if not config.tie_embeddings:
        final.append(Rule(layout.OUTPUT_LAYER, ("lm_head.weight",)))
    out.append(("final", final))
    return out


def ignored(name: str, config: GPTConfig) -> bool:
    """HF tensors that carry nothing to convert: RoPE buffers, a tied model's copy of the embedding."""
    return name.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and name == "lm_head.weight")
