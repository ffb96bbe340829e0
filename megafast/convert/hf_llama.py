"""Llama-family checkpoints (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``): Llama 2/3/3.1-3.3, DeepSeek-Coder, Mistral, Qwen2, Qwen3 dense.

Config mapping (HF config.json -> GPTConfig):

| HF                                   | megafast                                            |
|--------------------------------------|-----------------------------------------------------|
| num_hidden_layers, hidden_size       | num_layers, hidden_size                             |
| num_attention_heads                  | num_attention_heads                                 |
| num_key_value_heads                  | num_query_groups (GQA; = heads when absent)         |
| head_dim                             | kv_channels (= hidden / heads when absent)          |
| intermediate_size                    | ffn_hidden_size (activation "swiglu", silu only)    |
| rope_theta / rope_parameters         | rotary_base                                         |
| rope_scaling / rope_parameters type  | use_rope_scaling, rope_scaling_* and yarn_* fields  |
|   linear, llama3, yarn               |   (megafast.model.rotary; others are refused)       |
| sliding_window (Mistral; Qwen2/3     | window_size = (sliding_window - 1, 0) on every      |
|   with use_sliding_window)           |   layer (mixed full/sliding layers are refused)     |
| rms_norm_eps                         | norm_epsilon (normalization "RMSNorm")              |
| tie_word_embeddings                  | tie_embeddings                                      |
| attention_bias and mlp_bias (Llama)  | add_bias_linear (both or neither)                   |
| q/k/v bias (always, Qwen2)           | add_qkv_bias                                        |
| q_norm / k_norm (Qwen3)              | qk_layernorm                                        |
| initializer_range, attention_dropout | init_method_std, attention_dropout                  |

Every other config.json field must be generic (megafast.convert.hf_fields) or is refused by name:
an unknown field could change the model.

Tensor map (per layer ``i``; ``m`` = ``decoder.layers.i.``, ``h`` = ``model.layers.i.``):

    m.input_layernorm.weight              <- h.input_layernorm.weight
    m.self_attention.linear_qkv.{w,b}     <- h.self_attn.{q,k,v}_proj.{w,b}   (fused per group)
    m.self_attention.linear_proj.{w,b}    <- h.self_attn.o_proj.{w,b}
    m.self_attention.{q,k}_layernorm.w    <- h.self_attn.{q,k}_norm.weight     (Qwen3)
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
from megafast.convert.hf_fields import check_known_fields
from megafast.convert.hf_keymap import Rule

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# HF fields megafast does not model but an export should give back unchanged.
# max_window_layers (Qwen2/3) only while no layer slides (then it changes nothing).
PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "pretraining_tp", "max_window_layers")
# The model fields each family's config_from_hf reads (besides hf_fields.GENERIC_FIELDS).
COMMON_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "tie_word_embeddings",
    "attention_dropout", "initializer_range",
)
WINDOW_FIELDS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")
KNOWN_FIELDS = {
    "llama": COMMON_FIELDS + ("attention_bias", "mlp_bias", "pretraining_tp"),
    "mistral": COMMON_FIELDS + ("sliding_window",),
    "qwen2": COMMON_FIELDS + WINDOW_FIELDS,
    "qwen3": COMMON_FIELDS + WINDOW_FIELDS + ("attention_bias",),
}
# Keys of a rope_scaling / rope_parameters dict, per RoPE type ("type" is the old name of "rope_type").
ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
        "mscale", "mscale_all_dim", "truncate",
    ),
}


def _unsupported(where: str, key: str, value: Any, why: str) -> ValueError:
    return ValueError(
        f"{where}: config.json sets {key}={value!r} ({why}), which megafast's model does not implement: "
        "it cannot be converted exactly"
    )


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """GPTConfig fields of the RoPE base and scaling (rope_parameters of transformers 5, else the
    rope_theta / rope_scaling of 4.x)."""
    params = hf.get("rope_parameters")
    key = "rope_parameters"
    if not (isinstance(params, dict) and params):
        params, key = hf.get("rope_scaling") or {}, "rope_scaling"
    if not isinstance(params, dict):
        raise _unsupported(where, key, params, "not a dict")
    if any(isinstance(v, dict) for v in params.values()):
        raise _unsupported(where, key, params, "a different RoPE per layer type")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_KEYS:
        raise _unsupported(where, key, params, f"RoPE scaling {kind!r}; megafast has linear, llama3, yarn")
    known = {"rope_type", "type", "rope_theta", "partial_rotary_factor", *ROPE_KEYS[kind]}
    extra = sorted(set(params) - known)
    if extra:
        raise _unsupported(where, f"{key}.{extra[0]}", params[extra[0]], f"unknown for RoPE type {kind!r}")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _unsupported(where, "partial_rotary_factor", partial, "partial rotary embedding")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    fields: dict[str, Any] = {"rotary_base": float(10000.0 if theta is None else theta)}
    if kind == "default":
        return fields
    max_positions = hf.get("max_position_embeddings", 2048)
    original = params.get("original_max_position_embeddings") or max_positions  # HF's default
    factor = params.get("factor")
    if factor is None and kind == "yarn":
        factor = max_positions / original
    if factor is None:
        raise _unsupported(where, key, params, f"RoPE scaling {kind!r} without a factor")
    fields.update(use_rope_scaling=True, rope_scaling_type=kind, rope_scaling_factor=float(factor))
    if kind == "llama3":
        for name in ("low_freq_factor", "high_freq_factor"):
            if params.get(name) is None:
                raise _unsupported(where, key, params, f"llama3 RoPE scaling without {name}")
        fields.update(
            rope_scaling_low_freq_factor=float(params["low_freq_factor"]),
            rope_scaling_high_freq_factor=float(params["high_freq_factor"]),
            rope_scaling_original_max_position_embeddings=int(original),
        )
    elif kind == "yarn":
        optional = {
            name: None if params.get(name) is None else float(params[name])
            for name in ("mscale", "mscale_all_dim", "attention_factor")
        }
        fields.update(
            rope_scaling_original_max_position_embeddings=int(original),
            yarn_beta_fast=float(params.get("beta_fast") or 32),  # HF: `or 32`, `or 1`
            yarn_beta_slow=float(params.get("beta_slow") or 1),
            yarn_mscale=optional["mscale"],
            yarn_mscale_all_dim=optional["mscale_all_dim"],
            yarn_attention_factor=optional["attention_factor"],
            yarn_correction_range_round_to_int=bool(params.get("truncate", True)),
        )
    return fields


def _rope_to_hf(config: GPTConfig) -> dict[str, Any]:
    """The rope_parameters dict of ``config`` (rope_theta and the scaling, HF's key names)."""
    params: dict[str, Any] = {"rope_theta": config.rotary_base, "rope_type": "default"}
    if not config.use_rope_scaling:
        return params
    kind = config.rope_scaling_type
    params.update(rope_type=kind, factor=config.rope_scaling_factor)
    if kind == "llama3":
        params.update(
            low_freq_factor=config.rope_scaling_low_freq_factor,
            high_freq_factor=config.rope_scaling_high_freq_factor,
            original_max_position_embeddings=config.rope_scaling_original_max_position_embeddings,
        )
    elif kind == "yarn":
        params.update(
            original_max_position_embeddings=config.rope_scaling_original_max_position_embeddings,
            beta_fast=config.yarn_beta_fast,
            beta_slow=config.yarn_beta_slow,
        )
        if not config.yarn_correction_range_round_to_int:  # HF's default truncate is true
            params["truncate"] = False
        for name, value in (
            ("mscale", config.yarn_mscale),
            ("mscale_all_dim", config.yarn_mscale_all_dim),
            ("attention_factor", config.yarn_attention_factor),
        ):
            if value is not None:
                params[name] = value
    return params


def _window(hf: dict[str, Any], model_type: str, num_layers: int, where: str) -> tuple[int, int] | None:
    """megafast's window (W - 1, 0) when every layer slides over W tokens, None when none does."""
    window = hf.get("sliding_window")
    if model_type == "mistral":
        uses = window is not None
    else:
        uses = bool(hf.get("use_sliding_window", False)) and window is not None
    if model_type in ("qwen2", "qwen3"):
        kinds = hf.get("layer_types")
        if kinds is None:  # transformers' rule: sliding from layer max_window_layers on
            first = hf.get("max_window_layers", 28)
            kinds = ["sliding_attention" if uses and i >= first else "full_attention"
                     for i in range(num_layers)]
        unknown = sorted(set(kinds) - {"full_attention", "sliding_attention"})
        if unknown or len(kinds) != num_layers:
            raise _unsupported(where, "layer_types", kinds, "attention kinds per layer")
        if not uses and "sliding_attention" in kinds:
            raise _unsupported(where, "layer_types", kinds, "sliding layers without a sliding_window")
        if uses and "full_attention" in kinds:
            key = "layer_types" if "layer_types" in hf else "max_window_layers"
            raise _unsupported(
                where, key, hf.get(key, 28),
                "full and sliding-window layers mixed; megafast slides on all or none",
            )
    if not uses:
        return None
    if not isinstance(window, int) or window < 1:
        raise _unsupported(where, "sliding_window", window, "a window must be a positive number of tokens")
    return (window - 1, 0)


def config_from_hf(
    hf: dict[str, Any], architecture: str, make_vocab_size_divisible_by: int, where: str,
    extra_fields: tuple[str, ...] = (),
) -> tuple[GPTConfig, dict[str, Any]]:
    """(GPTConfig, metadata) of an HF Llama/Mistral/Qwen2/Qwen3 config.json dict. ``extra_fields``:
    config.json fields a caller building on this family reads itself (the MoE families' experts)."""
    model_type = ARCHITECTURES[architecture]
    check_known_fields(hf, KNOWN_FIELDS[model_type] + extra_fields, architecture, where)

    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise ValueError(f"{where}: config.json lacks {key!r}, which a {architecture} config must have")
        return hf[key]

    heads, hidden = need("num_attention_heads"), need("hidden_size")
    num_layers = need("num_hidden_layers")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise _unsupported(where, "hidden_act", hf["hidden_act"], "megafast's SwiGLU uses silu")
    max_positions = hf.get("max_position_embeddings", 2048)
    if model_type == "qwen2":
        qkv_bias, bias = True, False
    elif model_type == "mistral":
        qkv_bias = bias = False
    elif model_type == "qwen3":
        if hf.get("attention_bias", False):
            raise _unsupported(
                where, "attention_bias", hf["attention_bias"],
                "megafast has no o_proj bias without MLP biases",
            )
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
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        vocab_size=need("vocab_size"),
        ffn_hidden_size=need("intermediate_size"),
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hidden // heads,
        max_position_embeddings=max_positions,
        position_embedding_type="rope",
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
        window_size=_window(hf, model_type, num_layers, where),
        qk_layernorm=model_type == "qwen3",
        **_rope(hf, where),
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
    if config.qk_layernorm:
        return "Qwen3ForCausalLM" if not (config.add_bias_linear or config.add_qkv_bias) else None
    if config.add_qkv_bias and not config.add_bias_linear:
        return (
            "Qwen2ForCausalLM"
            if config.kv_channels * config.num_attention_heads == config.hidden_size
            else None
        )
    if config.window_size is not None:  # Llama has no sliding window
        return "MistralForCausalLM" if not config.add_bias_linear else None
    return "LlamaForCausalLM"


def config_to_hf(config: GPTConfig, metadata: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """config.json dict of the HF model holding ``config`` (metadata: architecture, token ids, ...)."""
    fits = architecture_for(config)
    if fits is None:
        raise ValueError(
            "the model cannot be written as LlamaForCausalLM/MistralForCausalLM/Qwen2ForCausalLM/"
            "Qwen3ForCausalLM: they need RoPE, RMSNorm, SwiGLU and biases on every linear layer, on none, "
            "or on QKV only (with head_dim = hidden/heads); q/k norms and sliding windows without biases"
        )
    architecture = metadata.get("architecture")  # the one it was imported from, when it still fits
    mistral_fits = fits == "LlamaForCausalLM" and not config.add_bias_linear
    if not (architecture == fits or (architecture == "MistralForCausalLM" and mistral_fits)):
        architecture = fits
    model_type = ARCHITECTURES[architecture]
    rope = _rope_to_hf(config)
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
        "rope_theta": config.rotary_base,  # transformers 4.x reads this and rope_scaling, 5.x rope_parameters
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": config.attention_dropout,
        "initializer_range": config.init_method_std,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if config.use_rope_scaling:
        hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    window = None if config.window_size is None else config.window_size[0] + 1  # HF's sliding_window
    if model_type != "qwen2":
        hf["head_dim"] = config.kv_channels
    if model_type == "llama":
        hf.update(attention_bias=config.add_bias_linear, mlp_bias=config.add_bias_linear, pretraining_tp=1)
    elif model_type == "mistral":
        hf["sliding_window"] = window
    else:
        hf.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=0 if window is not None else config.num_layers,
        )
        if model_type == "qwen3":
            hf["attention_bias"] = False
    passed = [k for k in PASSTHROUGH if k in metadata and k in KNOWN_FIELDS[model_type] + PASSTHROUGH[:3]]
    hf.update({k: metadata[k] for k in passed if k != "max_window_layers" or window is None})
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
        if config.qk_layernorm:
            rules += [
                Rule(f"{m}self_attention.q_layernorm.weight", (f"{attn}q_norm.weight",)),
                Rule(f"{m}self_attention.k_layernorm.weight", (f"{attn}k_norm.weight",)),
            ]
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
